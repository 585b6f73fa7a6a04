//! `qimg commit` judged by qemu-img: the backing file ends up with the
//! guest content the image showed, both pass `qemu-img check`, and the
//! image is emptied (reads through) unless `-d`. Backing files: raw, and
//! qcow2 with a different cluster size and a backing file of its own (so
//! a partial cluster must never be copied from the wrong layer).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;

use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg, run_ok};

fn own_extents(q: &Qemu, img: &Path) -> usize {
    q.map(img)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .count()
}

#[test]
fn commit_writes_the_backing_file() {
    let Some(q) = Qemu::find() else { return };
    for (base_fmt, keep) in [("qcow2", false), ("raw", false), ("qcow2", true)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = d.join(format!("base.{base_fmt}"));
        if base_fmt == "qcow2" {
            let bottom = d.join("bottom.qcow2");
            q.create(&bottom, "qcow2", "", "1M");
            q.io(&bottom, "qcow2", &["write -P 7 0 1M"]);
            let o = format!(
                "cluster_size=128k,backing_file={},backing_fmt=qcow2",
                bottom.display()
            );
            q.create(&base, "qcow2", &o, "1M");
        } else {
            q.create(&base, "raw", "", "1M");
        }
        q.io(&base, base_fmt, &["write -P 1 0 256k"]);
        let top = d.join("top.qcow2");
        let o = format!(
            "cluster_size=4k,backing_file={},backing_fmt={base_fmt}",
            base.display()
        );
        q.create(&top, "qcow2", &o, "1M");
        q.io(
            &top,
            "qcow2",
            &[
                "write -P 2 130k 6k",
                "write -z 300k 64k",
                "write -P 3 1000k 24k",
            ],
        );
        let before = q.read_raw(&top);
        let mut cmd = qimg();
        cmd.arg("commit");
        if keep {
            cmd.arg("-d");
        }
        // -q on the raw case: nothing printed.
        let quiet = base_fmt == "raw";
        if quiet {
            cmd.arg("-q");
        }
        let out = run_ok(cmd.arg(&top));
        let want = if quiet { "" } else { "Image committed.\n" };
        assert_eq!(String::from_utf8_lossy(&out), want);
        let what = format!("{base_fmt}, -d {keep}");
        for img in [&top, &base] {
            if img.extension().is_some_and(|e| e == "qcow2") {
                q.assert_clean(img, &what);
            }
        }
        assert!(q.read_raw(&base) == before, "{what}: backing file content");
        assert!(q.read_raw(&top) == before, "{what}: image content");
        let own = own_extents(&q, &top);
        assert_eq!(own == 0, !keep, "{what}: {own} extents left in the image");
    }
    // A qcow2 file named as a raw backing file is not written as raw.
    let dir2 = tempfile::tempdir().unwrap();
    let real = dir2.path().join("real.qcow2");
    q.create(&real, "qcow2", "", "1M");
    let over = dir2.path().join("over.qcow2");
    let o = format!("backing_file={},backing_fmt=raw", real.display());
    q.create(&over, "qcow2", &o, "1M");
    q.io(&over, "qcow2", &["write -P 4 0 4k"]);
    let before = std::fs::read(&real).unwrap();
    let out = qimg().arg("commit").arg(&over).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("looks like qcow2"));
    assert!(std::fs::read(&real).unwrap() == before);
    // No backing file: nothing to commit into.
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("lone.qcow2");
    q.create(&lone, "qcow2", "", "1M");
    let out = qimg().arg("commit").arg(&lone).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not have a backing file"));
}

/// Disk usage of a file (st_blocks * 512).
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Builds a raw base and a qcow2 overlay (64 KiB clusters) with about
/// 27 MiB of its own data and zero clusters, in several runs.
fn overlay_pair(q: &Qemu, d: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = d.join(format!("{name}-base.raw"));
    q.create(&base, "raw", "", "64M");
    q.io(&base, "raw", &["write -P 9 0 1M"]);
    let top = d.join(format!("{name}-top.qcow2"));
    let o = format!("backing_file={},backing_fmt=raw", base.display());
    q.create(&top, "qcow2", &o, "64M");
    q.io(
        &top,
        "qcow2",
        &[
            "write -P 5 512k 8M",
            "write -z 10M 1M",
            "write -P 6 20M 15M",
            "write -P 7 60M 4M",
        ],
    );
    (base, top)
}

#[test]
fn commit_empties_the_overlay_as_qemu_img_does() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (their_base, their_top) = overlay_pair(&q, d, "theirs");
    let (base, top) = overlay_pair(&q, d, "ours");
    let view = q.read_raw(&top);
    let full = du(&top);
    q.img(&["commit", "-q", &their_top.display().to_string()]);
    run_ok(qimg().args(["commit", "-q"]).arg(&top));
    q.assert_clean(&top, "emptied overlay");
    // The backing file holds what qemu-img's commit put there.
    assert!(q.read_raw(&base) == view, "backing file content");
    assert!(
        q.read_raw(&base) == q.read_raw(&their_base),
        "same as qemu-img's"
    );
    // The overlay reads through to the backing file, owning nothing.
    assert!(q.read_raw(&top) == view, "overlay view");
    assert_eq!(own_extents(&q, &top), 0, "extents left in the overlay");
    // Its disk space is given back, as qemu-img gives it back.
    let (ours, theirs) = (du(&top), du(&their_top));
    assert!(
        ours <= theirs + (1 << 20),
        "overlay uses {ours} bytes after commit, qemu-img's {theirs} (before: {full})"
    );
    assert!(full > 20 << 20, "overlay held {full} bytes before");
}

#[test]
fn commit_keep_leaves_the_overlay_data() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = overlay_pair(&q, dir.path(), "keep");
    let view = q.read_raw(&top);
    let map = q.map(&top);
    let full = du(&top);
    run_ok(qimg().args(["commit", "-q", "-d"]).arg(&top));
    q.assert_clean(&top, "kept overlay");
    assert!(q.read_raw(&base) == view, "backing file content");
    assert!(q.read_raw(&top) == view, "overlay view");
    assert_eq!(q.map(&top), map, "overlay mapping");
    assert_eq!(du(&top), full, "overlay disk usage");
}
