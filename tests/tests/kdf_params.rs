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

/// Rewrites the JSON of both LUKS2 header copies of `bytes` with `f`,
/// recomputing each copy's SHA-256 checksum.
fn forge_luks2_json(bytes: &mut [u8], f: impl Fn(&str) -> String) {
    use sha2::Digest as _;
    let hs = usize::try_from(u64::from_be_bytes(bytes[8..16].try_into().unwrap())).unwrap();
    for at in [0, hs] {
        let area = &mut bytes[at + 4096..at + hs];
        let end = area.iter().position(|&c| c == 0).unwrap();
        let text = f(std::str::from_utf8(&area[..end]).unwrap());
        assert!(text.len() < area.len());
        area.fill(0);
        area[..text.len()].copy_from_slice(text.as_bytes());
        bytes[at + 448..at + 512].fill(0);
        let sum = sha2::Sha256::digest(&bytes[at..at + hs]);
        bytes[at + 448..at + 480].copy_from_slice(&sum);
    }
}

#[test]
fn luks2_digest_iterations_of_2_pow_32_minus_1_are_refused_naming_digest_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", PW.as_bytes());
    let vol = dir.path().join("v2.luks");
    qimg_create_luks(
        &vol,
        &key,
        "luks-version=2,pbkdf=pbkdf2,pbkdf-iterations=1000",
        "1M",
    );
    let mut bytes = std::fs::read(&vol).unwrap();
    // Key slots come before digests in the JSON: the last "iterations" is
    // the digest's.
    forge_luks2_json(&mut bytes, |t| {
        let at = t.rfind("\"iterations\":").unwrap() + "\"iterations\":".len();
        let end = at + t[at..].find([',', '}']).unwrap();
        format!("{}{}{}", &t[..at], u32::MAX, &t[end..])
    });
    std::fs::write(&vol, &bytes).unwrap();
    let out = dir.path().join("out.raw");
    let err = run_fails(&mut qimg_luks_to_raw(&vol, None, &key, &out));
    for want in [
        "digests.0.iterations",
        "4294967295",
        "1073741824",
        "v2.luks",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    assert_eq!(std::fs::read(&vol).unwrap(), bytes, "volume changed");
    // The key slot verbs read the same header: refused the same way.
    let err = run_fails(qimg().args(["luks", "dump"]).arg(&vol));
    assert!(err.contains("digests.0.iterations"), "{err}");
    assert_eq!(std::fs::read(&vol).unwrap(), bytes, "volume changed");
}
