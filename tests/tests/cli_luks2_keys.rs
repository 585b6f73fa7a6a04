//! `qimg luks add-key | remove-key | change-key | header-backup |
//! header-restore` on LUKS2 volumes beside cryptsetup: keys qimg adds,
//! changes and removes are what cryptsetup then finds, keys cryptsetup adds
//! open in qimg, header backups are byte-identical to luksHeaderBackup's,
//! and a LUKS2 volume cut short is reported as too small.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::{qimg, run_ok, tool};

/// Writes `text` to a key file in `dir`.
fn key_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A sparse 17 MiB file formatted by cryptsetup as LUKS2 (16 MiB data
/// offset), key `key`, fast PBKDF2.
fn cryptsetup_volume(cs: &Path, img: &Path, key: &Path) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let mut c = Command::new(cs);
    c.args([
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
    ])
    .arg(key)
    .arg(img);
    run_ok(&mut c);
}

/// Whether cryptsetup opens `img` with `key` (in `slot` only, if given).
fn cs_opens(cs: &Path, img: &Path, key: &Path, slot: Option<u8>) -> bool {
    let mut c = Command::new(cs);
    c.args(["open", "--test-passphrase", "--key-file"]).arg(key);
    if let Some(s) = slot {
        c.arg("--key-slot").arg(s.to_string());
    }
    c.arg(img).output().unwrap().status.success()
}

/// The key slot ids cryptsetup's JSON dump lists.
fn slots(cs: &Path, img: &Path) -> Vec<u8> {
    let out = run_ok(
        Command::new(cs)
            .args(["luksDump", "--dump-json-metadata"])
            .arg(img),
    );
    let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut v: Vec<u8> = j["keyslots"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    v.sort_unstable();
    v
}

fn qimg_key(
    verb: &str,
    img: &Path,
    existing: &Path,
    arg: Option<&Path>,
    extra: &[&str],
) -> std::process::Output {
    let mut c = qimg();
    c.args(["luks", verb])
        .args(extra)
        .arg("--key-file")
        .arg(existing)
        .arg(img);
    if let Some(a) = arg {
        c.arg(a);
    }
    c.output().unwrap()
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn qimg_changes_key_slots_of_cryptsetup_luks2() {
    let Some(cs) = tool("cryptsetup") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = key_file(d, "k0", "first key");
    let k1 = key_file(d, "k1", "second key");
    let k2 = key_file(d, "k2", "third key");
    let img = d.join("v.luks");
    cryptsetup_volume(&cs, &img, &k0);
    // PBKDF2 taken from slot 0, calibrated to 10 ms.
    ok(&qimg_key("add-key", &img, &k0, Some(&k1), &["-i", "10"]));
    assert_eq!(slots(&cs, &img), [0, 1]);
    assert!(cs_opens(&cs, &img, &k1, Some(1)));
    let j: serde_json::Value = serde_json::from_slice(&run_ok(
        Command::new(&cs)
            .args(["luksDump", "--dump-json-metadata"])
            .arg(&img),
    ))
    .unwrap();
    assert_eq!(j["keyslots"]["1"]["kdf"]["type"], "pbkdf2", "{j}");
    // LUKS2 slot numbers go up to 31, and no further.
    ok(&qimg_key(
        "add-key",
        &img,
        &k1,
        Some(&k2),
        &[
            "-S",
            "31",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "8192",
            "--pbkdf-force-iterations",
            "4",
        ],
    ));
    assert!(cs_opens(&cs, &img, &k2, Some(31)));
    assert_eq!(j["keyslots"]["1"]["kdf"]["type"], "pbkdf2");
    let o = qimg_key("add-key", &img, &k0, Some(&k2), &["-S", "32", "-i", "10"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("between 0 and 31"));
    let o = qimg_key("add-key", &img, &k0, Some(&k2), &["-S", "1", "-i", "10"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Key slot 1 is full"));
    // A wrong existing key: cryptsetup's message and exit code 2.
    let o = qimg_key("add-key", &img, &d.join("k0x"), Some(&k2), &["-i", "10"]);
    assert!(!o.status.success());
    std::fs::write(d.join("bad"), "wrong").unwrap();
    let o = qimg_key("add-key", &img, &d.join("bad"), Some(&k2), &["-i", "10"]);
    assert_eq!(o.status.code(), Some(2));
    // change-key: slot 0's key becomes k3 (in the lowest free slot, 2).
    let k3 = key_file(d, "k3", "fourth key");
    ok(&qimg_key("change-key", &img, &k0, Some(&k3), &["-i", "10"]));
    assert_eq!(slots(&cs, &img), [1, 2, 31]);
    assert!(cs_opens(&cs, &img, &k3, None));
    assert!(!cs_opens(&cs, &img, &k0, None));
    // With --key-slot the new key keeps that slot number, as cryptsetup's.
    let k4 = key_file(d, "k4", "fifth key");
    ok(&qimg_key(
        "change-key",
        &img,
        &k3,
        Some(&k4),
        &["-S", "2", "-i", "10"],
    ));
    assert_eq!(slots(&cs, &img), [1, 2, 31]);
    assert!(cs_opens(&cs, &img, &k4, Some(2)));
    ok(&qimg_key(
        "change-key",
        &img,
        &k4,
        Some(&k3),
        &["-S", "2", "-i", "10"],
    ));
    assert!(cs_opens(&cs, &img, &k3, Some(2)));
    // remove-key: the slot k2 opens goes.
    ok(&qimg_key("remove-key", &img, &k1, Some(&k2), &[]));
    assert_eq!(slots(&cs, &img), [1, 2]);
    assert!(!cs_opens(&cs, &img, &k2, None));
    ok(&qimg_key("remove-key", &img, &k1, Some(&k1), &[]));
    assert_eq!(slots(&cs, &img), [2]);
    // The last key slot: refused without -q (stdin is no terminal) ...
    let o = qimg_key("remove-key", &img, &k3, Some(&k3), &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("last key slot"));
    assert!(cs_opens(&cs, &img, &k3, None));
    // ... and done with it, as cryptsetup -q does.
    ok(&qimg_key("remove-key", &img, &k3, Some(&k3), &["-q"]));
    assert!(slots(&cs, &img).is_empty());
}

#[test]
fn cryptsetup_adds_keys_to_qimg_luks2() {
    let Some(cs) = tool("cryptsetup") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = key_file(d, "k0", "qimg key");
    let k1 = key_file(d, "k1", "qimg added");
    let k2 = key_file(d, "k2", "cryptsetup added");
    let img = d.join("q.luks");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--key-file"])
            .arg(&k0)
            .args([
                "-o",
                "luks-version=2,iter-time=10,pbkdf=argon2id,pbkdf-memory=8192,pbkdf-parallel=1,pbkdf-iterations=4",
            ])
            .arg(&img)
            .arg("1M"),
    );
    // Argon2id with slot 0's memory and lanes.
    ok(&qimg_key(
        "add-key",
        &img,
        &k0,
        Some(&k1),
        &["--pbkdf-force-iterations", "4"],
    ));
    assert!(cs_opens(&cs, &img, &k1, Some(1)));
    let mut c = Command::new(&cs);
    c.args([
        "luksAddKey",
        "-q",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
    ])
    .arg(&k1)
    .arg(&img)
    .arg(&k2);
    run_ok(&mut c);
    // qimg opens with cryptsetup's key (it is the existing key here).
    let k3 = key_file(d, "k3", "qimg again");
    ok(&qimg_key(
        "add-key",
        &img,
        &k2,
        Some(&k3),
        &["-S", "9", "--pbkdf", "pbkdf2", "-i", "10"],
    ));
    assert_eq!(slots(&cs, &img), [0, 1, 2, 9]);
    assert!(cs_opens(&cs, &img, &k3, Some(9)));
    let out = d.join("o.raw");
    run_ok(
        qimg()
            .args(["convert", "-f", "luks", "-O", "raw", "--key-file"])
            .arg(&k2)
            .arg(&img)
            .arg(&out),
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 20);
}

#[test]
fn luks2_header_backup_and_restore() {
    let Some(cs) = tool("cryptsetup") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = key_file(d, "k0", "first key");
    let k1 = key_file(d, "k1", "second key");
    let img = d.join("v.luks");
    cryptsetup_volume(&cs, &img, &k0);
    ok(&qimg_key("add-key", &img, &k0, Some(&k1), &["-i", "10"]));
    let theirs = d.join("theirs.bak");
    run_ok(
        Command::new(&cs)
            .args(["luksHeaderBackup", "--header-backup-file"])
            .arg(&theirs)
            .arg(&img),
    );
    let ours = d.join("ours.bak");
    let backup = |to: &Path| {
        qimg()
            .args(["luks", "header-backup", "--header-backup-file"])
            .arg(to)
            .arg(&img)
            .output()
            .unwrap()
    };
    ok(&backup(&ours));
    let (a, b) = (
        std::fs::read(&theirs).unwrap(),
        std::fs::read(&ours).unwrap(),
    );
    assert_eq!(a.len(), 16 << 20);
    assert!(a == b, "header backups differ");
    // An existing backup file is not overwritten.
    assert!(!backup(&ours).status.success());
    // Restore round trip: the removed slot comes back.
    ok(&qimg_key("remove-key", &img, &k0, Some(&k1), &[]));
    assert!(!cs_opens(&cs, &img, &k1, None));
    let restore = |from: &Path, to: &Path| {
        qimg()
            .args(["luks", "header-restore", "-q", "--header-backup-file"])
            .arg(from)
            .arg(to)
            .output()
            .unwrap()
    };
    ok(&restore(&ours, &img));
    assert!(cs_opens(&cs, &img, &k1, Some(1)));
    assert_eq!(std::fs::read(&img).unwrap()[..16 << 20], b[..]);
    // Another volume's backup (other UUID) is refused, the volume kept.
    let other = d.join("w.luks");
    cryptsetup_volume(&cs, &other, &k1);
    let o = restore(&ours, &other);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("UUID"));
    assert!(cs_opens(&cs, &other, &k1, None));
    // So is a LUKS1 backup over a LUKS2 volume.
    let v1 = d.join("v1.luks");
    std::fs::File::create(&v1)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut c = Command::new(&cs);
    c.args([
        "luksFormat",
        "-q",
        "--type",
        "luks1",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
    ])
    .arg(&k1)
    .arg(&v1);
    run_ok(&mut c);
    let b1 = d.join("v1.bak");
    run_ok(
        qimg()
            .args(["luks", "header-backup", "--header-backup-file"])
            .arg(&b1)
            .arg(&v1),
    );
    let o = restore(&b1, &other);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("LUKS2"));
    assert!(cs_opens(&cs, &other, &k1, None));
    // cryptsetup restores qimg's backup of a qimg-made volume.
    let q = d.join("q.luks");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--key-file"])
            .arg(&k0)
            .args([
                "-o",
                "luks-version=2,iter-time=10,pbkdf=pbkdf2,pbkdf-iterations=1000",
            ])
            .arg(&q)
            .arg("1M"),
    );
    let qb = d.join("q.bak");
    run_ok(
        qimg()
            .args(["luks", "header-backup", "--header-backup-file"])
            .arg(&qb)
            .arg(&q),
    );
    let cb = d.join("qc.bak");
    run_ok(
        Command::new(&cs)
            .args(["luksHeaderBackup", "--header-backup-file"])
            .arg(&cb)
            .arg(&q),
    );
    assert!(std::fs::read(&qb).unwrap() == std::fs::read(&cb).unwrap());
    run_ok(
        Command::new(&cs)
            .args(["luksHeaderRestore", "-q", "--header-backup-file"])
            .arg(&qb)
            .arg(&q),
    );
    assert!(cs_opens(&cs, &q, &k0, None));
}

#[test]
fn truncated_luks2_is_too_small() {
    let Some(cs) = tool("cryptsetup") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = key_file(d, "k0", "first key");
    let img = d.join("v.luks");
    cryptsetup_volume(&cs, &img, &k0);
    let o = qimg().arg("check").arg(&img).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Cut inside the key slots area, then just before the payload.
    for len in [40 << 10, 1 << 20, (16 << 20) - 4096] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len)
            .unwrap();
        let o = qimg().arg("info").arg(&img).output().unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("device too small"), "{e}");
        let o = qimg()
            .args(["convert", "-f", "luks", "-O", "raw", "--key-file"])
            .arg(&k0)
            .arg(&img)
            .arg(d.join("o.raw"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("device too small"), "{e}");
        assert!(!e.contains("No key"), "{e}");
        // check reports it as a corruption (exit 2).
        let o = qimg().arg("check").arg(&img).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("past the end of the file"));
        // The key verbs refuse it too, and do not extend the file.
        let o = qimg_key("add-key", &img, &k0, Some(&k0), &["-i", "10"]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("device too small"), "{e}");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
    }
}

#[test]
fn amend_changes_luks2_key_slots() {
    let Some(cs) = tool("cryptsetup") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = key_file(d, "k0", "first key");
    let k1 = key_file(d, "k1", "second key");
    let img = d.join("v.luks");
    cryptsetup_volume(&cs, &img, &k0);
    let amend = |unlock: &str, opts: &str, force: bool| {
        let mut c = qimg();
        c.arg("amend");
        for (id, k) in [("s0", &k0), ("s1", &k1)] {
            c.arg("--object")
                .arg(format!("secret,id={id},file={}", k.display()));
        }
        if force {
            c.arg("--force");
        }
        c.args(["--key-secret", unlock, "-o", opts])
            .arg(&img)
            .output()
            .unwrap()
    };
    ok(&amend(
        "s0",
        "state=active,new-secret=s1,keyslot=20,iter-time=10",
        false,
    ));
    assert!(cs_opens(&cs, &img, &k1, Some(20)));
    let o = amend("s0", "state=active,new-secret=s1,keyslot=20", false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Refusing to overwrite active keyslot 20"));
    let o = amend("s0", "state=active,new-secret=s1,keyslot=32", false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("between 0 and 31"));
    // Erase by old password: slot 0 goes.
    ok(&amend("s1", "state=inactive,old-secret=s0", false));
    assert_eq!(slots(&cs, &img), [20]);
    assert!(!cs_opens(&cs, &img, &k0, None));
    // The only key slot left: refused without --force.
    let o = amend("s1", "state=inactive,keyslot=20", false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing operation"));
    assert!(cs_opens(&cs, &img, &k1, Some(20)));
}
