//! `qimg create -f qcow2`, `convert -O qcow2 [-c]` and `resize`, judged by
//! qemu-img: clean checks, identical content, the same image options.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::process::Command;

use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{qimg, run_ok};

#[test]
fn create_matches_qemu_img_options() {
    let Some(q) = Qemu::find() else { return };
    let cases = [
        "",
        "compat=0.10",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "lazy_refcounts=on,compression_type=zstd",
        "extended_l2=on,cluster_size=128k",
        "preallocation=metadata",
        "preallocation=full,cluster_size=4k",
    ];
    for opts in cases {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let mut cmd = qimg();
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        run_ok(cmd.arg(&ours).arg("5M"));
        q.create(&theirs, "qcow2", opts, "5M");
        q.assert_clean(&ours, opts);
        let (a, b) = (q.info(&ours), q.info(&theirs));
        for key in ["virtual-size", "cluster-size", "format-specific"] {
            assert_eq!(a[key], b[key], "{opts}: {key}");
        }
        // Empty images read as zeroes in both.
        run_ok(
            Command::new(&q.img)
                .args(["compare", "-q"])
                .arg(&ours)
                .arg(&theirs),
        );
    }
}

#[test]
fn create_refuses_what_qemu_img_refuses() {
    for (opts, msg) in [
        ("cluster_size=1000", "Cluster size must be a power of two"),
        ("compat=0.10,refcount_bits=8", "compatibility level 1.1"),
        ("compat=0.10,lazy_refcounts=on", "Lazy refcounts"),
        ("cluster_size=4k,extended_l2=on", "at least 16384"),
        ("bogus=1", "invalid parameter 'bogus'"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = qimg()
            .args(["create", "-f", "qcow2", "-o", opts])
            .arg(dir.path().join("x.qcow2"))
            .arg("1M")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{opts}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{opts}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn convert_to_qcow2_plain_and_compressed() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut data = pattern(3 << 20, 11, 3);
    data.extend(b"compressible text line. ".repeat(60_000));
    let src = write_tmp(d, "src.raw", &data);
    for (i, extra) in [
        vec![],
        vec!["-c"],
        vec!["-c", "-o", "compression_type=zstd"],
        vec!["-o", "cluster_size=4k,refcount_bits=8"],
        vec!["-o", "compat=0.10"],
    ]
    .iter()
    .enumerate()
    {
        let img = d.join(format!("c{i}.qcow2"));
        run_ok(
            qimg()
                .args(["convert", "-O", "qcow2"])
                .args(extra)
                .arg(&src)
                .arg(&img),
        );
        q.assert_clean(&img, &format!("{extra:?}"));
        let back = d.join("back.raw");
        q.to_raw(&img, &back, &[]);
        let got = std::fs::read(&back).unwrap();
        assert!(got[..data.len()] == data[..], "{extra:?}");
        assert!(got[data.len()..].iter().all(|&b| b == 0));
        if extra.first() == Some(&"-c") {
            let raw_len = std::fs::metadata(d.join("c0.qcow2")).unwrap().len();
            let c_len = std::fs::metadata(&img).unwrap().len();
            assert!(c_len < raw_len, "{extra:?}: {c_len} >= {raw_len}");
        }
    }
    // qcow2 to qcow2 through qimg, and qimg reads back its own output.
    let again = d.join("again.qcow2");
    run_ok(
        qimg()
            .args(["convert", "-O", "qcow2"])
            .arg(d.join("c1.qcow2"))
            .arg(&again),
    );
    q.assert_clean(&again, "qcow2 to qcow2");
    run_ok(
        Command::new(&q.img)
            .args(["compare", "-q"])
            .arg(&src)
            .arg(&again),
    );
}

#[test]
fn overlays_and_resize() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    q.create(&base, "qcow2", "", "4M");
    q.io(&base, "qcow2", &["write -P 0x42 0 1M"]);
    let top = d.join("top.qcow2");
    run_ok(
        qimg()
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
            ])
            .arg(&top),
    );
    q.assert_clean(&top, "overlay");
    assert_eq!(q.info(&top)["virtual-size"], 4 << 20);
    assert_eq!(q.info(&top)["backing-filename"], "base.qcow2");
    q.io(&top, "qcow2", &["write -P 0x43 512k 4k"]);

    run_ok(qimg().args(["resize", "-q"]).arg(&top).arg("+2M"));
    q.assert_clean(&top, "overlay");
    assert_eq!(q.info(&top)["virtual-size"], 6 << 20);
    let out = qimg().arg("resize").arg(&top).arg("1M").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shrink"));

    let raw = write_tmp(d, "r.raw", &[1u8; 4096]);
    run_ok(
        qimg()
            .args(["resize", "-q", "--shrink"])
            .arg(&raw)
            .arg("-1k"),
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 3072);
}
