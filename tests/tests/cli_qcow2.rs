//! `qimg info`, `map` and `convert -O raw` on a matrix of qcow2 images that
//! the installed qemu-img builds at test time, each compared with qemu-img
//! on the same file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{assert_json_agrees, json_of, qimg, run_ok, sha256_file};

/// Compares qimg with qemu-img on one image: info JSON on every shared key,
/// map JSON exactly, and the raw conversion byte for byte.
fn agree(q: &Qemu, img: &Path, dir: &Path, extra_convert: &[&str]) {
    let name = img.display().to_string();
    let ours = json_of(qimg().args(["info", "--output", "json"]).arg(img));
    let theirs = q.info(img);
    let n = assert_json_agrees(&ours, &theirs, &name);
    assert!(n >= 10, "{name}: only {n} shared info values");
    for key in ["virtual-size", "cluster-size", "format", "format-specific"] {
        assert_eq!(ours.get(key), theirs.get(key), "{name}: {key}");
    }
    for key in ["backing-filename", "backing-filename-format", "snapshots"] {
        assert_eq!(
            ours.get(key).is_some(),
            theirs.get(key).is_some(),
            "{name}: {key}"
        );
    }

    let ours = json_of(qimg().args(["map", "--output", "json"]).arg(img));
    let theirs = q.map(img);
    if ours != theirs {
        let (a, b) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x, y, "{name}: map entry {i} differs");
        }
        assert_eq!(a.len(), b.len(), "{name}: map length");
    }

    let a = dir.join("qimg.raw");
    let b = dir.join("qemu.raw");
    run_ok(
        qimg()
            .args(["convert", "-O", "raw"])
            .args(extra_convert)
            .arg(img)
            .arg(&a),
    );
    q.to_raw(img, &b, extra_convert);
    assert_eq!(sha256_file(&a), sha256_file(&b), "{name}: content");
    assert_eq!(
        std::fs::metadata(&a).unwrap().len(),
        std::fs::metadata(&b).unwrap().len(),
        "{name}: raw length"
    );
}

/// A 4 MiB image with data, zero writes and a discard, written by qemu-io.
fn populate(q: &Qemu, img: &Path, dir: &Path, seed: u64) {
    let data = write_tmp(dir, "data.bin", &pattern(1 << 20, seed, 5));
    q.write_file(img, "qcow2", 0, &data);
    q.write_file(img, "qcow2", 3 * (1 << 20) + 12288, &data);
    q.io(
        img,
        "qcow2",
        &[
            "write -P 0x5a 1536k 100k",
            "write -z 256k 64k",
            "discard 1920k 128k",
        ],
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn cluster_sizes_refcount_widths_and_versions() {
    let Some(q) = Qemu::find() else { return };
    let cases = [
        "compat=1.1,cluster_size=65536",
        "compat=0.10,cluster_size=4096",
        "compat=1.1,cluster_size=512,refcount_bits=1",
        "compat=1.1,cluster_size=2M,refcount_bits=64",
        "compat=1.1,cluster_size=4096,refcount_bits=8,lazy_refcounts=on",
        "compat=1.1,cluster_size=65536,extended_l2=on",
        "compat=1.1,cluster_size=16384,extended_l2=on",
    ];
    for (i, opts) in cases.iter().enumerate() {
        let dir = tmp();
        let img = dir.path().join("t.qcow2");
        q.create(&img, "qcow2", opts, "5M");
        populate(&q, &img, dir.path(), i as u64 + 1);
        agree(&q, &img, dir.path(), &[]);
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let Some(q) = Qemu::find() else { return };
    for ct in ["zlib", "zstd"] {
        let dir = tmp();
        let src = write_tmp(dir.path(), "src.raw", &pattern(3 << 20, 9, 3));
        // Compressible data too: a repeated short pattern.
        let mut text = b"qimg compresses this line well. ".repeat(40_000);
        text.truncate(1 << 20);
        let mut all = std::fs::read(&src).unwrap();
        all.extend_from_slice(&text);
        std::fs::write(&src, &all).unwrap();
        let img = dir.path().join("c.qcow2");
        q.convert(
            &["-c", "-O", "qcow2", "-o", &format!("compression_type={ct}")],
            &src,
            &img,
        );
        agree(&q, &img, dir.path(), &[]);
    }
}

#[test]
fn backing_chain_three_deep_over_a_short_raw_base() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmp();
    let d = dir.path();
    // The raw base is shorter than the overlays: reads past it are zero.
    write_tmp(d, "base.raw", &pattern(3 << 20, 21, 4));
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    run_ok(
        Command::new(&q.img)
            .args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"])
            .arg(&mid)
            .arg("6M"),
    );
    q.io(
        &mid,
        "qcow2",
        &[
            "write -P 0x11 1m 300k",
            "write -z 2m 64k",
            "write -P 0x12 4m 64k",
        ],
    );
    run_ok(
        Command::new(&q.img)
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
            ])
            .arg(&top)
            .arg("8M"),
    );
    q.io(
        &top,
        "qcow2",
        &[
            "write -P 0x21 1100k 10k",
            "write -P 0x22 7m 4k",
            "discard 0 64k",
        ],
    );
    agree(&q, &top, d, &[]);
    // The chain as qemu-img reports it.
    let ours = json_of(
        qimg()
            .args(["info", "--output", "json", "--backing-chain"])
            .arg(&top),
    );
    let theirs = json_of(
        Command::new(&q.img)
            .args(["info", "--output=json", "--backing-chain"])
            .arg(&top),
    );
    assert!(assert_json_agrees(&ours, &theirs, "chain") >= 30);
}

#[test]
fn internal_snapshots_listed_and_readable() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmp();
    let img = dir.path().join("s.qcow2");
    q.create(&img, "qcow2", "cluster_size=4096", "2M");
    q.io(&img, "qcow2", &["write -P 0x31 0 256k"]);
    q.img(&["snapshot", "-c", "first", img.to_str().unwrap()]);
    q.io(&img, "qcow2", &["write -P 0x32 128k 256k"]);
    q.img(&["snapshot", "-c", "second", img.to_str().unwrap()]);
    q.io(&img, "qcow2", &["write -z 0 64k", "write -P 0x33 1m 4k"]);
    agree(&q, &img, dir.path(), &[]);
    agree(&q, &img, dir.path(), &["-l", "first"]);
    agree(&q, &img, dir.path(), &["-l", "snapshot.name=second"]);
    agree(&q, &img, dir.path(), &["-l", "snapshot.id=1"]);
}

#[test]
fn external_data_files_raw_and_not_raw() {
    let Some(q) = Qemu::find() else { return };
    for raw in ["on", "off"] {
        let dir = tmp();
        let img = dir.path().join("e.qcow2");
        let data = dir.path().join("e.data");
        q.create(
            &img,
            "qcow2",
            &format!("data_file={},data_file_raw={raw}", data.display()),
            "3M",
        );
        q.io(
            &img,
            "qcow2",
            &["write -P 0x41 64k 200k", "write -P 0x42 2m 4k"],
        );
        agree(&q, &img, dir.path(), &[]);
    }
}

#[test]
fn preallocation_and_a_huge_sparse_image() {
    let Some(q) = Qemu::find() else { return };
    for p in ["metadata", "full"] {
        let dir = tmp();
        let img = dir.path().join("p.qcow2");
        q.create(&img, "qcow2", &format!("preallocation={p}"), "3M");
        q.io(&img, "qcow2", &["write -P 0x51 1m 64k"]);
        agree(&q, &img, dir.path(), &[]);
    }
    // 4 TiB: info and map only; content is compared at two places.
    let dir = tmp();
    let img: PathBuf = dir.path().join("huge.qcow2");
    q.create(&img, "qcow2", "", "4T");
    q.io(
        &img,
        "qcow2",
        &["write -P 0x61 0 64k", "write -P 0x62 3T 128k"],
    );
    let ours = json_of(qimg().args(["info", "--output", "json"]).arg(&img));
    assert!(assert_json_agrees(&ours, &q.info(&img), "huge") >= 10);
    let ours = json_of(qimg().args(["map", "--output", "json"]).arg(&img));
    assert_eq!(ours, q.map(&img));
}

#[test]
fn backing_loops_are_refused_not_followed() {
    let Some(q) = Qemu::find() else { return };
    let dir = tmp();
    let d = dir.path();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    q.create(&a, "qcow2", "", "1M");
    run_ok(
        Command::new(&q.img)
            .args([
                "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
            ])
            .arg(&b),
    );
    // Point a back at b: a loop qemu-img's unsafe rebase allows.
    q.img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    for args in [
        vec!["convert", "-O", "raw"],
        vec!["info", "--backing-chain"],
        vec!["map"],
    ] {
        let mut cmd = qimg();
        cmd.args(&args).arg(&b);
        if args[0] == "convert" {
            cmd.arg(d.join("out.raw"));
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("loops back"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Without following the chain, info still works.
    run_ok(qimg().arg("info").arg(&b));
}
