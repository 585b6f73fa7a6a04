#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly
//! `qimg create -f qcow2 -o encrypt.format=luks` and `convert -O qcow2 -o
//! encrypt...`: images qemu-img checks clean and reads back, and data
//! encrypted with host-offset IVs.

use std::path::Path;

use luks_core::io::{BlockIo, FileDevice};
use qcow_core::crypto::ImageKey;
use qcow_core::{Decryptor, GuestOffset, MapKind, Qcow2, Qcow2Writer};
use qimg_tests::qemu::{encrypted_image_opts, pattern, write_tmp, Qemu};
use qimg_tests::{json_of, qimg, run_ok, sha256_file};

const PW: &str = "correct horse battery staple";

fn secret() -> String {
    format!("secret,id=s0,data={PW}")
}

fn image_opts(img: &Path) -> String {
    encrypted_image_opts("qcow2", img)
}

/// qemu-img checks the image clean and sees a LUKS-encrypted image.
fn check_clean(q: &Qemu, img: &Path) {
    q.assert_encrypted_clean(&secret(), "qcow2", img);
    let v = json_of(&mut q.encrypted(&["info", "--output=json"], &secret(), &image_opts(img)));
    assert_eq!(v["encrypted"], true, "{v}");
    assert_eq!(v["format-specific"]["data"]["encrypt"]["format"], "luks");
}

/// qemu-img's view of the guest content, as raw.
fn qemu_raw(q: &Qemu, img: &Path, out: &Path) {
    q.decrypt_to_raw(&secret(), "qcow2", img, "", out);
}

/// qimg's view of the guest content, as raw.
fn qimg_raw(img: &Path, out: &Path) {
    run_ok(
        qimg()
            .args(["convert", "-O", "raw", "--object", &secret()])
            .arg(img)
            .arg(out),
    );
}

fn enc_opts(extra: &str) -> String {
    let mut s = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".to_string();
    if !extra.is_empty() {
        s.push(',');
        s.push_str(extra);
    }
    s
}

/// `qimg create -f qcow2` of an encrypted image ([`enc_opts`] with
/// `extra`) of `size`.
fn qimg_create(img: &Path, extra: &str, size: &str) {
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "qcow2", "--object", &secret(), "-o"])
            .arg(enc_opts(extra))
            .arg(img)
            .arg(size),
    );
}

const CASES: [&str; 4] = [
    "",
    "cluster_size=512",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
     encrypt.hash-alg=sha1,cluster_size=512",
];

#[test]
fn create_then_qemu_checks_and_reads_zeros() {
    let Some(q) = Qemu::find() else { return };
    for extra in CASES {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e.qcow2");
        qimg_create(&img, extra, "3M");
        check_clean(&q, &img);
        let raw = dir.path().join("out.raw");
        qemu_raw(&q, &img, &raw);
        assert_eq!(std::fs::read(&raw).unwrap(), vec![0u8; 3 << 20], "{extra}");
        // No key: the writer refuses the image.
        assert!(Qcow2Writer::open(FileDevice::open_rw(&img).unwrap()).is_err());
    }
}

#[test]
fn convert_random_data_round_trips_through_qemu() {
    let Some(q) = Qemu::find() else { return };
    for (i, extra) in CASES.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3 * 1024 * 1024 + 4096, i as u64 + 7, 5);
        let src = write_tmp(dir.path(), "src.raw", &data);
        let img = dir.path().join("e.qcow2");
        run_ok(
            qimg()
                .args([
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "--object",
                    &secret(),
                    "-o",
                ])
                .arg(enc_opts(extra))
                .arg(&src)
                .arg(&img),
        );
        check_clean(&q, &img);
        let theirs = dir.path().join("theirs.raw");
        qemu_raw(&q, &img, &theirs);
        assert_eq!(sha256_file(&theirs), sha256_file(&src), "{extra}");
        let ours = dir.path().join("ours.raw");
        qimg_raw(&img, &ours);
        assert_eq!(sha256_file(&ours), sha256_file(&src), "{extra}");
        // The ciphertext is not the plaintext.
        let file = std::fs::read(&img).unwrap();
        assert!(!file
            .windows(4096)
            .any(|w| w == &data[..4096] && w != [0u8; 4096]));
    }
}

fn unlock(img: &Path) -> ImageKey {
    let mut cache = vec![0u8; 1 << 20];
    let info = Qcow2::open(FileDevice::open(img).unwrap(), &mut cache)
        .unwrap()
        .info()
        .clone();
    let mut dev = FileDevice::open(img).unwrap();
    ImageKey::unlock(&mut dev, &info, PW.as_bytes())
        .unwrap()
        .unwrap()
}

#[test]
fn writer_with_key_encrypts_partial_writes() {
    let Some(q) = Qemu::find() else { return };
    for extra in ["", "cluster_size=512"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e.qcow2");
        qimg_create(&img, extra, "1M");
        let key = unlock(&img);
        let mut w = Qcow2Writer::open_with_key(FileDevice::open_rw(&img).unwrap(), key).unwrap();
        let a = pattern(3000, 1, 0);
        let b = pattern(70_000, 2, 0);
        w.write(100, &a).unwrap();
        w.write(200_001, &b).unwrap();
        w.write(200_100, &a[..10]).unwrap();
        w.close().unwrap();
        let mut expect = vec![0u8; 1 << 20];
        expect[100..3100].copy_from_slice(&a);
        expect[200_001..270_001].copy_from_slice(&b);
        expect[200_100..200_110].copy_from_slice(&a[..10]);
        check_clean(&q, &img);
        let theirs = dir.path().join("theirs.raw");
        qemu_raw(&q, &img, &theirs);
        assert!(std::fs::read(&theirs).unwrap() == expect, "{extra}");
    }
}

#[test]
fn snapshot_copies_use_different_ivs() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    qimg_create(&img, "", "1M");
    let qemu_io = |cmd: &str| q.io_encrypted(&secret(), "qcow2", &img, &[cmd]);
    qemu_io("write -P 0x55 0 64k");
    run_ok(&mut q.encrypted(&["snapshot", "-c", "s1"], &secret(), &image_opts(&img)));
    qemu_io("write -P 0x55 0 64k");
    check_clean(&q, &img);

    // qimg map shows the current cluster as data (like qemu-img, without
    // a host offset for an encrypted image).
    let out = run_ok(
        qimg()
            .args(["map", "--output", "json", "--object", &secret()])
            .arg(&img),
    );
    let map: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let first = map.as_array().unwrap().first().unwrap().clone();
    assert_eq!(first["start"], 0, "{map}");
    assert_eq!(first["data"], true, "{map}");

    // The current and the snapshot's cluster, from their L1/L2 tables.
    let mut cache = vec![0u8; 1 << 20];
    let mut r = Qcow2::open(FileDevice::open(&img).unwrap(), &mut cache).unwrap();
    let m = r.map(0, 65536).unwrap();
    let MapKind::Data { host: current } = m.kind else {
        panic!("current cluster not data: {m:?}")
    };
    let s = r.find_snapshot("s1").unwrap();
    r.select_snapshot(&s).unwrap();
    let m = r.map(0, 65536).unwrap();
    let MapKind::Data { host: old } = m.kind else {
        panic!("snapshot cluster not data: {m:?}")
    };
    assert_ne!(old, current);

    let mut dev = FileDevice::open(&img).unwrap();
    let mut c_old = vec![0u8; 65536];
    let mut c_new = vec![0u8; 65536];
    dev.read_at(old.get(), &mut c_old).unwrap();
    dev.read_at(current.get(), &mut c_new).unwrap();
    assert_ne!(c_old, c_new, "same ciphertext: an IV was reused");
    let mut key = unlock(&img);
    assert!(key.decrypt(old, GuestOffset::ZERO, &mut c_old));
    assert!(key.decrypt(current, GuestOffset::ZERO, &mut c_new));
    assert_eq!(c_old, vec![0x55u8; 65536]);
    assert_eq!(c_new, vec![0x55u8; 65536]);
}

#[test]
fn legacy_aes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    for o in ["encrypt.format=aes,encrypt.key-secret=s0", "encryption=on"] {
        let out = qimg()
            .args(["create", "-f", "qcow2", "--object", &secret(), "-o", o])
            .arg(&img)
            .arg("1M")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("insecure"), "{err}");
        assert!(!img.exists());
    }
}

/// Partial-cluster writes copy the rest of the cluster from the backing
/// layer, decrypted when the backing image is encrypted, and encrypted with
/// the new host offset when the overlay is: both directions, judged by
/// qemu-img.
#[test]
fn partial_writes_copy_on_write_across_encrypted_and_plain_layers() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut want = vec![0u8; 4 << 20];
    want[..].copy_from_slice(&pattern(4 << 20, 77, 0));
    let src = write_tmp(d, "src.raw", &want);
    let patch = vec![0x5au8; 1024];
    let at = (1 << 20) + 512;
    want[at..at + patch.len()].copy_from_slice(&patch);

    // (a) An encrypted overlay (made by qimg) over a plain base.
    let base = d.join("base.qcow2");
    q.convert(&["-q", "-O", "qcow2"], &src, &base);
    let top = d.join("top.qcow2");
    run_ok(
        qimg()
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "--object", &secret()])
            .args(["-b", "base.qcow2", "-F", "qcow2", "-o", &enc_opts("")])
            .arg(&top),
    );
    {
        let mut cache = vec![0u8; 1 << 20];
        let backing = Qcow2::open(FileDevice::open(&base).unwrap(), &mut cache).unwrap();
        let mut w = Qcow2Writer::open_with_key(FileDevice::open_rw(&top).unwrap(), unlock(&top))
            .unwrap()
            .with_backing(backing)
            .unwrap();
        w.write_at(at as u64, &patch).unwrap();
        w.close().unwrap();
    }
    check_clean(&q, &top);
    let out = d.join("a.raw");
    qemu_raw(&q, &top, &out);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "encrypted overlay over plain base"
    );

    // (b) A plain overlay over an encrypted base (made by qimg).
    let ebase = d.join("ebase.qcow2");
    run_ok(
        qimg()
            .args([
                "convert",
                "-q",
                "--object",
                &secret(),
                "-O",
                "qcow2",
                "-o",
                &enc_opts(""),
            ])
            .arg(&src)
            .arg(&ebase),
    );
    let top2 = d.join("top2.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "ebase.qcow2",
        "-F",
        "qcow2",
        top2.to_str().unwrap(),
        "4M",
    ]);
    {
        let mut key = unlock(&ebase);
        let mut cache = vec![0u8; 1 << 20];
        let backing = Qcow2::open(FileDevice::open(&ebase).unwrap(), &mut cache)
            .unwrap()
            .with_decryptor(&mut key);
        let mut w = Qcow2Writer::open(FileDevice::open_rw(&top2).unwrap())
            .unwrap()
            .with_backing(backing)
            .unwrap();
        w.write_at(at as u64, &patch).unwrap();
        w.close().unwrap();
    }
    // qemu-img opens the backing file to check, so it needs its key.
    let backing_opts = format!(
        "driver=qcow2,file.filename={},backing.encrypt.key-secret=s0",
        top2.display()
    );
    let out = q
        .encrypted(&["check"], &secret(), &backing_opts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "plain overlay: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = d.join("b.raw");
    run_ok(
        q.encrypted(&["convert", "-O", "raw"], &secret(), &backing_opts)
            .arg(&out),
    );
    assert!(
        std::fs::read(&out).unwrap() == want,
        "plain overlay over encrypted base"
    );
    // qimg reads both the same way.
    let ours = d.join("c.raw");
    qimg_raw(&top2, &ours);
    assert!(std::fs::read(&ours).unwrap() == want);
}

/// `convert -n` into an existing encrypted qcow2 image (made by qemu-img):
/// the destination's passphrase comes from `-o encrypt.key-secret`, and
/// qemu-img reads back what was written.
#[test]
fn convert_into_an_existing_encrypted_image() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("dst.qcow2");
    q.create_encrypted(&img, &secret(), &enc_opts(""), &[], "4M");
    let data = pattern(3 << 20, 19, 5);
    let src = write_tmp(d, "src.raw", &data);
    run_ok(
        qimg()
            .args(["convert", "-n", "-O", "qcow2", "--object", &secret()])
            .args(["-o", "encrypt.key-secret=s0"])
            .arg(&src)
            .arg(&img),
    );
    check_clean(&q, &img);
    let out = d.join("back.raw");
    qemu_raw(&q, &img, &out);
    let back = std::fs::read(&out).unwrap();
    assert!(
        back[..data.len()] == data[..],
        "qemu-img reads back something else"
    );
    assert!(back[data.len()..].iter().all(|&b| b == 0));
}
