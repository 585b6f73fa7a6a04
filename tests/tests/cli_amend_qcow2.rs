//! `qimg amend -f qcow2 -o ...` beside `qemu-img amend`: the same option
//! lists on twin images (data, zero and compressed clusters, backing
//! files, snapshots, lazy refcounts, dirty images, external data files)
//! must succeed or fail alike; a success is judged by `qemu-img check`
//! (clean), `qemu-img compare` (equal to qemu-img's result) and
//! `qemu-img info` (same format-specific fields), a failure by its
//! message. A refused amend leaves the file byte-identical. The refcount
//! width change is cut at every device write and must leave a consistent
//! image with the same guest content each time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::path::Path;
use std::process::Command;

use qcow_core::io::VecDevice;
use qcow_core::writer::amend::{AmendError, AmendOptions};
use qimg_tests::powercut::{qemu_check, read_guest, run_cut};
use qimg_tests::qemu::Qemu;
use qimg_tests::qimg;

/// How a test image is made (`NAME` stands for the image's own stem, so
/// that twins get their own data files).
type Setup = fn(&Qemu, &Path, &str);

fn data(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "", "64M");
    q.io(
        &p,
        "qcow2",
        &[
            "write -P 1 0 1M",
            "write -z 2M 1M",
            "write -c -P 3 4M 64k",
            "write -P 4 60M 100k",
        ],
    );
}

fn v2(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "compat=0.10", "64M");
    q.io(&p, "qcow2", &["write -P 1 0 1M", "write -c -P 3 4M 64k"]);
    Command::new(&q.img)
        .args(["snapshot", "-c", "old"])
        .arg(&p)
        .status()
        .unwrap();
    q.io(&p, "qcow2", &["write -P 6 0 64k"]);
}

fn backed(q: &Qemu, d: &Path, n: &str) {
    let base = d.join("base.qcow2");
    if !base.exists() {
        q.create(&base, "qcow2", "", "64M");
        q.io(&base, "qcow2", &["write -P 7 0 4M"]);
    }
    let p = d.join(format!("{n}.qcow2"));
    q.create(
        &p,
        "qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "64M",
    );
    q.io(
        &p,
        "qcow2",
        &["write -P 1 0 1M", "write -z 1M 1M", "write -z 2M 100k"],
    );
}

fn snapshot(q: &Qemu, d: &Path, n: &str) {
    data(q, d, n);
    let p = d.join(format!("{n}.qcow2"));
    Command::new(&q.img)
        .args(["snapshot", "-c", "s1"])
        .arg(&p)
        .status()
        .unwrap();
    q.io(&p, "qcow2", &["write -P 5 0 64k", "write -P 8 4M 64k"]);
}

/// An overlay whose snapshot holds zero clusters (plain, over the
/// backing file's data, and preallocated).
fn backed_snapshot(q: &Qemu, d: &Path, n: &str) {
    backed(q, d, n);
    let p = d.join(format!("{n}.qcow2"));
    q.io(&p, "qcow2", &["write -P 9 8M 128k", "write -z 8M 64k"]);
    Command::new(&q.img)
        .args(["snapshot", "-c", "s1"])
        .arg(&p)
        .status()
        .unwrap();
    q.io(&p, "qcow2", &["write -P 5 0 64k", "write -P 6 1M 64k"]);
}

fn lazy(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "lazy_refcounts=on", "64M");
    q.io(&p, "qcow2", &["write -P 1 0 1M"]);
}

/// Lazy refcounts and the dirty bit left set (qemu-io aborted).
fn dirty(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "lazy_refcounts=on", "64M");
    let _ = Command::new(&q.io)
        .args(["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "abort"])
        .arg(&p)
        .output()
        .unwrap();
    let info = q.info(&p);
    assert_eq!(
        info["dirty-flag"], true,
        "the setup must leave a dirty image"
    );
}

fn data_file(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    let raw = d.join(format!("{n}.raw"));
    q.create(&p, "qcow2", &format!("data_file={}", raw.display()), "64M");
    q.io(&p, "qcow2", &["write -P 1 0 1M"]);
}

fn data_file_raw(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    let raw = d.join(format!("{n}.raw"));
    q.create(
        &p,
        "qcow2",
        &format!("data_file={},data_file_raw=on", raw.display()),
        "64M",
    );
    q.io(&p, "qcow2", &["write -P 1 0 1M"]);
}

fn zstd(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "compression_type=zstd", "64M");
    q.io(&p, "qcow2", &["write -c -P 1 0 64k"]);
}

fn zstd_uncompressed(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "compression_type=zstd", "64M");
    q.io(&p, "qcow2", &["write -P 1 0 64k"]);
}

fn extended_l2(q: &Qemu, d: &Path, n: &str) {
    let p = d.join(format!("{n}.qcow2"));
    q.create(&p, "qcow2", "extended_l2=on", "64M");
    q.io(&p, "qcow2", &["write -P 1 0 64k"]);
}

/// The fields of `qemu-img info` an amend decides.
fn fields(q: &Qemu, p: &Path) -> serde_json::Value {
    let mut v = q.info(p);
    let mut spec = v["format-specific"]["data"].take();
    // Key slots: which are active (UUIDs and iteration counts differ).
    let slots: Vec<serde_json::Value> = spec["encrypt"]["slots"]
        .as_array()
        .map(|a| a.iter().map(|s| s["active"].clone()).collect())
        .unwrap_or_default();
    if let Some(o) = spec.as_object_mut() {
        o.remove("data-file");
        o.remove("encrypt");
    }
    serde_json::json!({
        "virtual-size": v["virtual-size"],
        "cluster-size": v["cluster-size"],
        "dirty-flag": v["dirty-flag"],
        "backing-filename": v["backing-filename"],
        "format-specific": spec,
        "snapshots": v["snapshots"].as_array().map_or(0, Vec::len),
        "key-slots-active": slots,
    })
}

/// The message without the tool's and the file's prefix.
fn message(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    let s = s
        .trim_end()
        .trim_start_matches("qemu-img: ")
        .trim_start_matches("qimg: ");
    match s.split_once(".qcow2: ") {
        Some((_, rest)) if !s.starts_with("Cannot amend") => rest.to_string(),
        _ => s.to_string(),
    }
}

/// Runs `opts` on twins made by `setup`, with qimg and with qemu-img, and
/// judges qimg's result by qemu-img's. `NAME` in `opts` is the image's
/// path without `.qcow2`.
fn agree(q: &Qemu, setup: Setup, what: &str, opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(q, d, "ours");
    setup(q, d, "theirs");
    let (ours, theirs) = (d.join("ours.qcow2"), d.join("theirs.qcow2"));
    let before = std::fs::read(&ours).unwrap();
    // qemu-img opens a relative data file name from its working directory.
    let stem = |n: &str| d.join(n).display().to_string();
    let a = qimg()
        .args([
            "amend",
            "-f",
            "qcow2",
            "-o",
            &opts.replace("NAME", &stem("ours")),
        ])
        .arg(&ours)
        .output()
        .unwrap();
    let b = Command::new(&q.img)
        .args([
            "amend",
            "-f",
            "qcow2",
            "-o",
            &opts.replace("NAME", &stem("theirs")),
        ])
        .arg(&theirs)
        .output()
        .unwrap();
    let what = format!("{what} -o {opts}");
    assert_eq!(
        a.status.code(),
        b.status.code(),
        "{what}: qimg {} / qemu-img {}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    if !a.status.success() {
        assert_eq!(message(&a.stderr), message(&b.stderr), "{what}");
        assert!(
            std::fs::read(&ours).unwrap() == before,
            "{what}: a refused amend changed the image"
        );
        return;
    }
    assert!(
        a.stderr.is_empty(),
        "{what}: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    q.assert_clean(&ours, &what);
    let cmp = Command::new(&q.img)
        .args(["compare", "-q"])
        .arg(&ours)
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(
        cmp.success(),
        "{what}: guest content differs from qemu-img's (in {})",
        d.display()
    );
    // Every snapshot reads as qemu-img's does.
    for sn in q.info(&theirs)["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = sn["name"].as_str().unwrap();
        let raw = |img: &Path| {
            let out = d.join("snap.raw");
            q.img(&[
                "convert",
                "-l",
                &format!("snapshot.name={name}"),
                "-O",
                "raw",
                img.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            std::fs::read(&out).unwrap()
        };
        assert!(
            raw(&ours) == raw(&theirs),
            "{what}: snapshot {name} differs"
        );
    }
    assert_eq!(fields(q, &ours), fields(q, &theirs), "{what}");
}

#[test]
fn compat_and_lazy_refcounts_agree_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let cases: &[(Setup, &str, &[&str])] = &[
        (
            data,
            "data",
            &[
                "compat=0.10",
                "compat=v2",
                "compat=1.1",
                "lazy_refcounts=on",
                "lazy_refcounts=off",
                "compat=0.10,lazy_refcounts=on",
                "compat=0.10,size=128M",
                "size=32M",
                "size=2M",
                "size=3000k,compat=0.10",
            ],
        ),
        (
            v2,
            "v2 with a snapshot",
            &[
                "compat=1.1",
                "compat=v3,lazy_refcounts=on",
                "lazy_refcounts=on",
            ],
        ),
        (
            backed,
            "overlay",
            &[
                "compat=0.10",
                "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2",
            ],
        ),
        (
            snapshot,
            "snapshot",
            &["lazy_refcounts=on", "compat=1.1", "size=1M", "compat=0.10"],
        ),
        (backed_snapshot, "overlay with a snapshot", &["compat=0.10"]),
        (lazy, "lazy", &["lazy_refcounts=off", "compat=0.10"]),
        (dirty, "dirty", &["lazy_refcounts=off", "compat=0.10"]),
        (zstd, "zstd", &["compat=0.10"]),
        (
            zstd_uncompressed,
            "zstd, nothing compressed",
            &["compat=0.10"],
        ),
        (extended_l2, "extended L2", &["compat=0.10"]),
        (
            data_file,
            "data file",
            &["compat=0.10", "lazy_refcounts=on"],
        ),
    ];
    for (setup, what, lists) in cases {
        for opts in *lists {
            agree(&q, *setup, what, opts);
        }
    }
}

#[test]
fn refcount_bits_agree_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    for opts in ["refcount_bits=1", "refcount_bits=8", "refcount_bits=64"] {
        agree(&q, data, "data", opts);
        agree(&q, backed, "overlay", opts);
        agree(&q, data_file, "data file", opts);
    }
    // A snapshot shares clusters: 1 bit cannot count them, 4 can.
    for opts in [
        "refcount_bits=1",
        "refcount_bits=4",
        "refcount_bits=32,lazy_refcounts=on",
    ] {
        agree(&q, snapshot, "snapshot", opts);
    }
    for opts in [
        "refcount_bits=8",
        "refcount_bits=3",
        "refcount_bits=128",
        "refcount_bits=x",
    ] {
        agree(&q, v2, "v2", opts);
    }
    agree(&q, data, "data", "compat=0.10,refcount_bits=8");
    agree(&q, dirty, "dirty", "refcount_bits=8");
}

#[test]
fn data_file_options_agree_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    for opts in [
        "data_file=NAME.raw",
        "data_file_raw=off",
        "data_file_raw=on",
    ] {
        agree(&q, data_file, "data file", opts);
        agree(&q, data_file_raw, "raw data file", opts);
        agree(&q, data, "no data file", opts);
    }
}

#[test]
fn refusals_agree_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    for opts in [
        "cluster_size=4096",
        "preallocation=full",
        "encryption=on",
        "bogus=1",
        "compat=0.9",
        "lazy_refcounts=maybe",
        "backing_file=other.qcow2",
        "compat=1.1,backing_file=other.qcow2",
        "encrypt.state=active,size=128M",
    ] {
        agree(&q, v2, "v2", opts);
    }
    agree(&q, data, "data", "size=1000");
}

/// A power cut at any device write of a refcount width change leaves a
/// consistent image (qcow-core's and qemu-img's checks) with the same
/// guest content and snapshot, at the old width or the new one.
#[test]
fn refcount_width_change_survives_a_power_cut_anywhere() {
    let q = Qemu::find();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img.qcow2");
    // 512-byte clusters, so the change writes many blocks; a snapshot and
    // compressed data, so refcounts above 1 exist.
    let Some(qq) = &q else { return };
    qq.create(&p, "qcow2", "cluster_size=512", "4M");
    qq.io(
        &p,
        "qcow2",
        &["write -P 1 0 1M", "write -c -P 2 2M 4k", "write -z 3M 64k"],
    );
    Command::new(&qq.img)
        .args(["snapshot", "-c", "s"])
        .arg(&p)
        .status()
        .unwrap();
    qq.io(&p, "qcow2", &["write -P 3 0 8k"]);
    let base = std::fs::read(&p).unwrap();
    let size = 4u64 << 20;
    let guest = read_guest(&base, size, None).unwrap();
    let snap = read_guest(&base, size, Some("s")).unwrap();
    for order in [3u32, 6] {
        let step = |w: &mut qcow_core::Qcow2Writer<_>, o: u32| {
            w.amend(&AmendOptions {
                refcount_order: Some(o),
                ..AmendOptions::default()
            })
            .map_err(|e| match e {
                AmendError::Qcow2(e) => e,
                e => panic!("refused: {e}"),
            })
        };
        let full = run_cut(&base, &[order], None, false, step);
        assert_eq!(full.done, 1);
        assert_eq!(full.image[96..100], (order).to_be_bytes());
        let n = full.mutations;
        assert!(n >= 5, "the change should write several blocks ({n})");
        eprintln!("refcount order 4 -> {order}: {n} device mutations, each cut twice");
        for k in 0..n {
            for drop_unflushed in [false, true] {
                let what = format!("order {order}, cut at {k}/{n}, drop {drop_unflushed}");
                let cut = run_cut(&base, &[order], Some(k), drop_unflushed, step);
                assert_eq!(cut.done, 0, "{what}");
                let got_order = u32::from_be_bytes(cut.image[96..100].try_into().unwrap());
                assert!(
                    got_order == 4 || got_order == order,
                    "{what}: order {got_order}"
                );
                let mut dev = VecDevice::from_vec(cut.image.clone());
                let r = qcow_core::check::check(&mut dev, qcow_core::check::Repair::None).unwrap();
                assert_eq!(r.result().corruptions, 0, "{what}");
                assert!(
                    read_guest(&cut.image, size, None).unwrap() == guest,
                    "{what}"
                );
                assert!(
                    read_guest(&cut.image, size, Some("s")).unwrap() == snap,
                    "{what}"
                );
                if k % 7 == 0 || k + 2 >= n {
                    let c = dir.path().join("cut.qcow2");
                    std::fs::write(&c, &cut.image).unwrap();
                    assert_eq!(qemu_check(qq, &c, false, &what), 0);
                }
            }
        }
    }
}

/// Key slot and qcow2 options in one list on a LUKS-encrypted image
/// opened with `--image-opts`: both tools add the slot and change the
/// options; the new passphrase then opens the same content.
#[test]
fn key_slots_and_qcow2_options_in_one_list_agree_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("k0"), "pass0").unwrap();
    std::fs::write(d.join("k1"), "pass1").unwrap();
    let o0 = format!("secret,id=s0,file={}", d.join("k0").display());
    let o1 = format!("secret,id=s1,file={}", d.join("k1").display());
    let opts = "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10,\
                lazy_refcounts=on,refcount_bits=8";
    let mut infos = Vec::new();
    for (n, ours) in [("ours.qcow2", true), ("theirs.qcow2", false)] {
        let p = d.join(n);
        q.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &o0,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            p.to_str().unwrap(),
            "16M",
        ]);
        let io = |secret: &str, cmd: &str| {
            qimg_tests::run_ok(
                Command::new(&q.io)
                    .args(["--object", &o0, "--object", &o1, "--image-opts", "-c", cmd])
                    .arg(format!(
                        "driver=qcow2,file.filename={},encrypt.key-secret={secret}",
                        p.display()
                    )),
            )
        };
        io("s0", "write -P 4 0 1M");
        let mut cmd = if ours { qimg() } else { Command::new(&q.img) };
        cmd.args(["amend", "--object", &o0, "--object", &o1, "-o", opts])
            .arg("--image-opts")
            .arg(format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=s0",
                p.display()
            ));
        qimg_tests::run_ok(&mut cmd);
        // The new passphrase reads what the old one wrote.
        let out = io("s1", "read -P 4 0 1M");
        assert!(
            String::from_utf8_lossy(&out).contains("read 1048576/1048576"),
            "{n}: {}",
            String::from_utf8_lossy(&out)
        );
        infos.push(fields(&q, &p));
    }
    assert_eq!(infos[0], infos[1]);
    assert_eq!(infos[0]["format-specific"]["refcount-bits"], 8);
    assert_eq!(infos[0]["format-specific"]["lazy-refcounts"], true);
}
