//! The `qimg` binary on LUKS volumes and encrypted qcow2 images, beside
//! qemu-img and cryptsetup.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;

use qimg_tests::cryptsetup::{Cryptsetup, LUKS1_FAST};
use qimg_tests::qemu::{encrypted_image_opts, pattern, write_tmp, Qemu};
use qimg_tests::{assert_json_agrees, json_of, qimg, qimg_create_luks, run_ok, sha256_file};

const PW: &str = "correct horse battery";

fn secret() -> String {
    format!("secret,id=s0,data={PW}")
}

/// qimg and qemu-img agree on info (all shared keys), map and content.
fn agree_encrypted(q: &Qemu, img: &Path, driver: &str, dir: &Path) {
    let name = img.display().to_string();
    let ours = json_of(qimg().args(["info", "--output", "json"]).arg(img));
    let theirs = q.info(img);
    assert!(assert_json_agrees(&ours, &theirs, &name) >= 12, "{name}");
    assert_eq!(ours["format-specific"], theirs["format-specific"], "{name}");

    let ours = json_of(
        qimg()
            .args(["map", "--output", "json", "--object", &secret()])
            .arg(img),
    );
    let theirs = json_of(&mut q.encrypted(
        &["map", "--output=json"],
        &secret(),
        &encrypted_image_opts(driver, img),
    ));
    assert_eq!(ours, theirs, "{name}: map");

    let a = dir.join("qimg.raw");
    let b = dir.join("qemu.raw");
    run_ok(
        qimg()
            .args(["convert", "-O", "raw", "--object", &secret()])
            .arg(img)
            .arg(&a),
    );
    q.decrypt_to_raw(&secret(), driver, img, "", &b);
    assert_eq!(sha256_file(&a), sha256_file(&b), "{name}: content");
}

#[test]
fn luks_volumes_qemu_img_makes_read_identically() {
    let Some(q) = Qemu::find() else { return };
    let cases = [
        "",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
        "cipher-alg=serpent-256,hash-alg=sha512",
        "cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    ];
    for (i, extra) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let src = write_tmp(dir.path(), "src.raw", &pattern(3 << 20, 70 + i as u64, 4));
        let img = dir.path().join("v.luks");
        let mut opts = "key-secret=s0,iter-time=10".to_string();
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        q.convert(
            &["-O", "luks", "--object", &secret(), "-o", &opts],
            &src,
            &img,
        );
        agree_encrypted(&q, &img, "luks", dir.path());
    }
}

#[test]
fn luks_volumes_qimg_makes_work_in_cryptsetup_and_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let Some(cs) = Cryptsetup::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = write_tmp(d, "key", PW.as_bytes());

    // create -f luks, then the same volume from convert -O luks.
    let made = d.join("made.luks");
    qimg_create_luks(&made, &key, "iter-time=10", "4M");
    cs.assert_opens(&made, None, &key);
    cs.assert_same_dump(&made);
    assert_eq!(q.info(&made)["virtual-size"], 4 << 20);

    let data = pattern(3 << 20, 81, 3);
    let src = write_tmp(d, "src.raw", &data);
    for opts in [
        "key-secret=s0,iter-time=10",
        "key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
    ] {
        let conv = d.join("conv.luks");
        let _ = std::fs::remove_file(&conv);
        run_ok(
            qimg()
                .args(["convert", "-O", "luks", "--object", &secret(), "-o", opts])
                .arg(&src)
                .arg(&conv),
        );
        cs.assert_opens(&conv, None, &key);
        let back = d.join("back.raw");
        q.decrypt_to_raw(&secret(), "luks", &conv, "", &back);
        assert!(std::fs::read(&back).unwrap() == data, "{opts}");
        agree_encrypted(&q, &conv, "luks", d);
    }
}

#[test]
fn cryptsetup_volumes_with_detached_headers_open() {
    let Some(q) = Qemu::find() else { return };
    let Some(cs) = Cryptsetup::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = write_tmp(d, "key", PW.as_bytes());
    let data = d.join("data.img");
    let hdr = d.join("hdr.img");
    std::fs::write(&data, pattern(2 << 20, 90, 0)).unwrap();
    // cryptsetup wants the detached header file to exist and be large enough.
    std::fs::write(&hdr, vec![0u8; 2 << 20]).unwrap();
    cs.format(&data, Some(&hdr), &key, LUKS1_FAST);
    let ours = d.join("ours.raw");
    run_ok(
        qimg()
            .args(["convert", "-O", "raw", "--key-file"])
            .arg(&key)
            .arg("--header")
            .arg(&hdr)
            .arg(&data)
            .arg(&ours),
    );
    let theirs = d.join("theirs.raw");
    q.decrypt_to_raw(
        &secret(),
        "luks",
        &data,
        &format!("header.filename={}", hdr.display()),
        &theirs,
    );
    assert_eq!(sha256_file(&ours), sha256_file(&theirs));
    let info = json_of(
        qimg()
            .args(["info", "--output", "json", "--header"])
            .arg(&hdr)
            .arg(&data),
    );
    assert_eq!(info["format-specific"]["data"]["detached-header"], true);
    assert_eq!(info["virtual-size"], 2 << 20);
}

#[test]
fn encrypted_qcow2_from_qemu_img_reads_identically() {
    let Some(q) = Qemu::find() else { return };
    let cases = [
        ("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "64k", "1.1"),
        ("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "512", "1.1"),
        (
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            "64k",
            "1.1",
        ),
        ("encrypt.format=aes,encrypt.key-secret=s0", "64k", "1.1"),
        ("encrypt.format=aes,encrypt.key-secret=s0", "4k", "0.10"),
    ];
    for (opts, cs, compat) in cases {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e.qcow2");
        let o = format!("{opts},cluster_size={cs},compat={compat}");
        q.create_encrypted(&img, &secret(), &o, &[], "4M");
        let data = write_tmp(dir.path(), "d.bin", &pattern(700 << 10, 5, 3));
        q.io_encrypted(
            &secret(),
            "qcow2",
            &img,
            &[
                &format!("write -s {} 100k {}", data.display(), 700 << 10),
                "write -z 2m 64k",
                "write -P 0x7e 3m 5k",
            ],
        );
        agree_encrypted(&q, &img, "qcow2", dir.path());
    }
}

#[test]
fn encrypted_overlay_over_a_plain_backing_file() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    q.create(&base, "qcow2", "", "4M");
    q.io(&base, "qcow2", &["write -P 0x11 0 2M"]);
    let top = d.join("top.qcow2");
    q.create_encrypted(
        &top,
        &secret(),
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        &["-b", "base.qcow2", "-F", "qcow2"],
        "",
    );
    q.io_encrypted(&secret(), "qcow2", &top, &["write -P 0x22 1m 100k"]);
    agree_encrypted(&q, &top, "qcow2", d);
}

#[test]
fn cryptsetup_test_images_decrypt_through_the_cli() {
    let Some(src) = qimg_tests::testdata("cryptsetup/compatimage.img.xz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = qimg_tests::unxz(&src, dir.path());
    let key = write_tmp(dir.path(), "key", b"compatkey");
    let out = dir.path().join("payload.raw");
    run_ok(
        qimg()
            .args(["convert", "-O", "raw", "--key-file"])
            .arg(&key)
            .arg(&img)
            .arg(&out),
    );
    assert_eq!(
        sha256_file(&out),
        "7428e8f2436882a07eb32765086f5c899474c08b5576f556b573d2aabdf923e8"
    );
    // A wrong passphrase is one clear line and exit 1.
    let bad = write_tmp(dir.path(), "bad", b"nope");
    let o = qimg()
        .args(["convert", "-O", "raw", "--key-file"])
        .arg(&bad)
        .arg(&img)
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("passphrase"), "{err}");
}
