//! KDF costs qimg chooses for new LUKS key slots, beside cryptsetup's
//! choices: Argon2 memory and lanes within what cryptsetup would use on
//! this machine, so the volume opens where a cryptsetup-made one does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use qimg_tests::cryptsetup::Cryptsetup;
use qimg_tests::qemu::write_tmp;
use qimg_tests::{qimg, qimg_create_luks, qimg_luks_dump, qimg_luks_to_raw, run_fails, run_ok};

const PW: &str = "kdf params pass";

/// Half of MemTotal in KiB (cryptsetup's ceiling), from /proc/meminfo.
fn half_memory_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = s.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 2
}

#[test]
fn luks2_default_argon2_fits_the_machine_and_opens_under_ulimit() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", PW.as_bytes());
    let img = dir.path().join("v.luks");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--object"])
            .arg(format!("secret,id=s0,data={PW}"))
            .args(["-o", "luks-version=2,key-secret=s0,iter-time=300"])
            .arg(&img)
            .arg("2M"),
    );
    let j = qimg_luks_dump(&img);
    let kdf = &j["keyslots"]["0"]["kdf"];
    assert_eq!(kdf["type"], "argon2id", "{j}");
    let memory = kdf["memory"].as_u64().unwrap();
    let cpus = kdf["cpus"].as_u64().unwrap();
    let time = kdf["time"].as_u64().unwrap();
    let online = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(memory <= 1 << 20, "memory {memory} KiB above 1 GiB");
    assert!(
        memory <= half_memory_kib(),
        "memory {memory} KiB above half of RAM"
    );
    assert!(
        cpus >= 1 && cpus <= online.min(4),
        "cpus {cpus}, online {online}"
    );
    assert!(time >= 4, "time {time} below cryptsetup's minimum 4");
    // cryptsetup opens it with 800 MB of address space, as it opens its own.
    let script = format!(
        "ulimit -v 800000; exec '{}' open --test-passphrase --key-file '{}' '{}'",
        cs.bin.display(),
        key.display(),
        img.display()
    );
    run_ok(std::process::Command::new("bash").args(["-c", &script]));
}

#[test]
fn luks1_slot_iterations_of_2_pow_32_minus_1_are_refused_naming_slot_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", PW.as_bytes());
    let vol = dir.path().join("v.luks");
    qimg_create_luks(&vol, &key, "iter-time=10", "1M");
    // Key slot 0's iterations: phdr offset 208 + 4, big-endian.
    let mut bytes = std::fs::read(&vol).unwrap();
    bytes[212..216].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&vol, &bytes).unwrap();
    let out = dir.path().join("out.raw");
    let err = run_fails(&mut qimg_luks_to_raw(&vol, None, &key, &out));
    for want in ["key slot 0", "4294967295", "212", "v.luks"] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    assert_eq!(std::fs::read(&vol).unwrap(), bytes, "volume changed");
}
