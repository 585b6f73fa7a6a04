//! `qimg luks add-key | remove-key | change-key | header-backup |
//! header-restore` on LUKS2 volumes beside cryptsetup: keys qimg adds,
//! changes and removes are what cryptsetup then finds, keys cryptsetup adds
//! open in qimg, header backups are byte-identical to luksHeaderBackup's,
//! and a LUKS2 volume cut short is reported as too small.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use qimg_tests::cryptsetup::{Cryptsetup, LUKS1_FAST, PBKDF2_FAST};
use qimg_tests::qemu::write_tmp;
use qimg_tests::{
    qimg, qimg_create_luks, qimg_header_backup, qimg_header_restore, qimg_luks, run_fails, run_ok,
    sparse_file,
};

/// A sparse 17 MiB file formatted by cryptsetup as LUKS2 (16 MiB data
/// offset), key `key`, fast PBKDF2.
fn cryptsetup_volume(cs: &Cryptsetup, img: &Path, key: &Path) {
    sparse_file(img, 17 << 20);
    cs.format(
        img,
        None,
        key,
        &[&["--type", "luks2"], PBKDF2_FAST].concat(),
    );
}

fn qimg_key(
    verb: &str,
    img: &Path,
    existing: &Path,
    arg: Option<&Path>,
    extra: &[&str],
) -> std::process::Output {
    qimg_luks(verb, extra, Some(existing), img, arg)
        .output()
        .unwrap()
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
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = write_tmp(d, "k0", b"first key");
    let k1 = write_tmp(d, "k1", b"second key");
    let k2 = write_tmp(d, "k2", b"third key");
    let img = d.join("v.luks");
    cryptsetup_volume(&cs, &img, &k0);
    // PBKDF2 taken from slot 0, calibrated to 10 ms.
    ok(&qimg_key("add-key", &img, &k0, Some(&k1), &["-i", "10"]));
    assert_eq!(cs.keyslots(&img), [0, 1]);
    assert!(cs.opens(&img, None, &k1, Some(1)));
    let j = cs.dump_json(&img);
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
    assert!(cs.opens(&img, None, &k2, Some(31)));
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
    let k3 = write_tmp(d, "k3", b"fourth key");
    ok(&qimg_key("change-key", &img, &k0, Some(&k3), &["-i", "10"]));
    assert_eq!(cs.keyslots(&img), [1, 2, 31]);
    assert!(cs.opens(&img, None, &k3, None));
    assert!(!cs.opens(&img, None, &k0, None));
    // With --key-slot the new key keeps that slot number, as cryptsetup's.
    let k4 = write_tmp(d, "k4", b"fifth key");
    ok(&qimg_key(
        "change-key",
        &img,
        &k3,
        Some(&k4),
        &["-S", "2", "-i", "10"],
    ));
    assert_eq!(cs.keyslots(&img), [1, 2, 31]);
    assert!(cs.opens(&img, None, &k4, Some(2)));
    ok(&qimg_key(
        "change-key",
        &img,
        &k4,
        Some(&k3),
        &["-S", "2", "-i", "10"],
    ));
    assert!(cs.opens(&img, None, &k3, Some(2)));
    // remove-key: the slot k2 opens goes.
    ok(&qimg_key("remove-key", &img, &k1, Some(&k2), &[]));
    assert_eq!(cs.keyslots(&img), [1, 2]);
    assert!(!cs.opens(&img, None, &k2, None));
    ok(&qimg_key("remove-key", &img, &k1, Some(&k1), &[]));
    assert_eq!(cs.keyslots(&img), [2]);
    // The last key slot: refused without -q (stdin is no terminal) ...
    let o = qimg_key("remove-key", &img, &k3, Some(&k3), &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("last key slot"));
    assert!(cs.opens(&img, None, &k3, None));
    // ... and done with it, as cryptsetup -q does.
    ok(&qimg_key("remove-key", &img, &k3, Some(&k3), &["-q"]));
    assert!(cs.keyslots(&img).is_empty());
}

#[test]
fn cryptsetup_adds_keys_to_qimg_luks2() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = write_tmp(d, "k0", b"qimg key");
    let k1 = write_tmp(d, "k1", b"qimg added");
    let k2 = write_tmp(d, "k2", b"cryptsetup added");
    let img = d.join("q.luks");
    qimg_create_luks(
        &img,
        &k0,
        "luks-version=2,iter-time=10,pbkdf=argon2id,pbkdf-memory=8192,pbkdf-parallel=1,pbkdf-iterations=4",
        "1M",
    );
    // Argon2id with slot 0's memory and lanes.
    ok(&qimg_key(
        "add-key",
        &img,
        &k0,
        Some(&k1),
        &["--pbkdf-force-iterations", "4"],
    ));
    assert!(cs.opens(&img, None, &k1, Some(1)));
    cs.add_key(&img, None, &k1, &k2, PBKDF2_FAST);
    // qimg opens with cryptsetup's key (it is the existing key here).
    let k3 = write_tmp(d, "k3", b"qimg again");
    ok(&qimg_key(
        "add-key",
        &img,
        &k2,
        Some(&k3),
        &["-S", "9", "--pbkdf", "pbkdf2", "-i", "10"],
    ));
    assert_eq!(cs.keyslots(&img), [0, 1, 2, 9]);
    assert!(cs.opens(&img, None, &k3, Some(9)));
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
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = write_tmp(d, "k0", b"first key");
    let k1 = write_tmp(d, "k1", b"second key");
    let img = d.join("v.luks");
    cryptsetup_volume(&cs, &img, &k0);
    ok(&qimg_key("add-key", &img, &k0, Some(&k1), &["-i", "10"]));
    let ours = d.join("ours.bak");
    let b = cs.assert_same_backup(&img, &ours, &d.join("theirs.bak"));
    assert_eq!(b.len(), 16 << 20);
    // An existing backup file is not overwritten.
    run_fails(&mut qimg_header_backup(&img, &ours));
    // Restore round trip: the removed slot comes back.
    ok(&qimg_key("remove-key", &img, &k0, Some(&k1), &[]));
    assert!(!cs.opens(&img, None, &k1, None));
    let restore = |from: &Path, to: &Path| qimg_header_restore(to, from).output().unwrap();
    ok(&restore(&ours, &img));
    assert!(cs.opens(&img, None, &k1, Some(1)));
    assert_eq!(std::fs::read(&img).unwrap()[..16 << 20], b[..]);
    // Another volume's backup (other UUID) is refused, the volume kept.
    let other = d.join("w.luks");
    cryptsetup_volume(&cs, &other, &k1);
    let o = restore(&ours, &other);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("UUID"));
    assert!(cs.opens(&other, None, &k1, None));
    // So is a LUKS1 backup over a LUKS2 volume.
    let v1 = d.join("v1.luks");
    sparse_file(&v1, 4 << 20);
    cs.format(&v1, None, &k1, LUKS1_FAST);
    let b1 = d.join("v1.bak");
    run_ok(&mut qimg_header_backup(&v1, &b1));
    let o = restore(&b1, &other);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("LUKS2"));
    assert!(cs.opens(&other, None, &k1, None));
    // cryptsetup restores qimg's backup of a qimg-made volume.
    let q = d.join("q.luks");
    qimg_create_luks(
        &q,
        &k0,
        "luks-version=2,iter-time=10,pbkdf=pbkdf2,pbkdf-iterations=1000",
        "1M",
    );
    let qb = d.join("q.bak");
    cs.assert_same_backup(&q, &qb, &d.join("qc.bak"));
    run_ok(&mut cs.header_restore(&q, &qb));
    assert!(cs.opens(&q, None, &k0, None));
}

#[test]
fn truncated_luks2_is_too_small() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = write_tmp(d, "k0", b"first key");
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
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k0 = write_tmp(d, "k0", b"first key");
    let k1 = write_tmp(d, "k1", b"second key");
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
    assert!(cs.opens(&img, None, &k1, Some(20)));
    let o = amend("s0", "state=active,new-secret=s1,keyslot=20", false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Refusing to overwrite active keyslot 20"));
    let o = amend("s0", "state=active,new-secret=s1,keyslot=32", false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("between 0 and 31"));
    // Erase by old password: slot 0 goes.
    ok(&amend("s1", "state=inactive,old-secret=s0", false));
    assert_eq!(cs.keyslots(&img), [20]);
    assert!(!cs.opens(&img, None, &k0, None));
    // The only key slot left: refused without --force.
    let o = amend("s1", "state=inactive,keyslot=20", false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing operation"));
    assert!(cs.opens(&img, None, &k1, Some(20)));
}
