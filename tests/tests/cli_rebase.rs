//! `qimg rebase` beside `qemu-img rebase`: safe mode keeps the guest
//! content (judged by `qemu-img convert`) with a clean `qemu-img check`;
//! both modes record the same backing name and format as qemu-img.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;

use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg, run_ok};

fn backing_keys(q: &Qemu, img: &Path) -> Vec<serde_json::Value> {
    let v = q.info(img);
    ["backing-filename", "backing-filename-format"]
        .iter()
        .map(|k| v.get(*k).cloned().unwrap_or_default())
        .collect()
}

#[test]
fn rebase_agrees_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    q.create(&base, "qcow2", "", "1M");
    q.io(
        &base,
        "qcow2",
        &["write -P 1 0 256k", "write -P 5 512k 64k"],
    );
    let new = d.join("new.raw");
    q.create(&new, "raw", "", "768k");
    q.io(&new, "raw", &["write -P 1 0 64k", "write -P 9 700k 16k"]);
    // Two identical overlays (one for each tool), with snapshots-free
    // writes of their own; the second option set uses small clusters and
    // a v2 header.
    for opts in ["", "compat=0.10,cluster_size=4k"] {
        let mk = |name: &str| {
            let p = d.join(name);
            let o = format!(
                "backing_file={},backing_fmt=qcow2{}{opts}",
                base.display(),
                if opts.is_empty() { "" } else { "," }
            );
            q.create(&p, "qcow2", &o, "1M");
            q.io(&p, "qcow2", &["write -P 2 128k 64k", "write -P 3 900k 4k"]);
            p
        };
        let (ours, theirs) = (mk("ours.qcow2"), mk("theirs.qcow2"));
        let before = q.read_raw(&ours);
        let b = new.to_str().unwrap();
        run_ok(qimg().args(["rebase", "-b", b, "-F", "raw"]).arg(&ours));
        run_ok(
            Command::new(&q.img)
                .args(["rebase", "-b", b, "-F", "raw"])
                .arg(&theirs),
        );
        q.assert_clean(&ours, "rebase");
        assert!(
            q.read_raw(&ours) == before,
            "{opts}: safe rebase kept content"
        );
        assert_eq!(backing_keys(&q, &ours), backing_keys(&q, &theirs), "{opts}");
        // No backing at all: standalone, same content.
        run_ok(qimg().args(["rebase", "-b", ""]).arg(&ours));
        run_ok(Command::new(&q.img).args(["rebase", "-b", ""]).arg(&theirs));
        q.assert_clean(&ours, "rebase");
        assert!(q.read_raw(&ours) == before, "{opts}: standalone");
        assert_eq!(backing_keys(&q, &ours), backing_keys(&q, &theirs), "{opts}");
        // Unsafe: the name only; the content now comes from the new file.
        let bb = base.to_str().unwrap();
        run_ok(
            qimg()
                .args(["rebase", "-u", "-b", bb, "-F", "qcow2"])
                .arg(&ours),
        );
        run_ok(
            Command::new(&q.img)
                .args(["rebase", "-u", "-b", bb, "-F", "qcow2"])
                .arg(&theirs),
        );
        q.assert_clean(&ours, "rebase");
        assert_eq!(backing_keys(&q, &ours), backing_keys(&q, &theirs), "{opts}");
        assert!(q.read_raw(&ours) == q.read_raw(&theirs), "{opts}: -u");
        for f in [&ours, &theirs] {
            std::fs::remove_file(f).unwrap();
        }
    }
    // A backing file needs its format, as in qemu-img.
    let top = d.join("top.qcow2");
    q.create(&top, "qcow2", "", "1M");
    let out = qimg()
        .args(["rebase", "-u", "-b", "x.qcow2"])
        .arg(&top)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backing format must be specified"));
}

/// Safe rebase over runs longer than the steps it reads in (4 MiB of the
/// old chain, 512 KiB of the new backing at a time): differing clusters
/// across step boundaries, runs broken by clusters the image owns or that
/// read the same on both sides, holes in the old chain where the new
/// backing has data, a new backing that ends inside a sector, and a disk
/// whose last cluster is partial. The content is kept, the image is clean,
/// and it holds no more clusters than qemu-img's.
#[test]
fn safe_rebase_over_long_runs_keeps_content() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (12 << 20) + 1536;
    // Old backing: data in [0, 9 MiB) but a hole at [3 MiB, 4 MiB).
    let old: Vec<u8> = (0..size as usize)
        .map(|i| {
            let hole = (3 << 20..4 << 20).contains(&i) || i >= 9 << 20;
            if hole {
                0
            } else {
                (i as u64).wrapping_mul(2_654_435_761).to_be_bytes()[5] | 1
            }
        })
        .collect();
    let base = d.join("base.raw");
    std::fs::write(&base, &old).unwrap();
    // New backing: 5 MiB + 1000 bytes, equal to the old one on
    // [1 MiB, 1 MiB + 192 KiB), data where the old one has its hole.
    let mut new = vec![0u8; (5 << 20) + 1000];
    new[1 << 20..(1 << 20) + (192 << 10)].copy_from_slice(&old[1 << 20..(1 << 20) + (192 << 10)]);
    new[3 << 20..(3 << 20) + 4096].fill(0x77);
    new[(5 << 20) + 10..].fill(0x42);
    let newp = d.join("new.raw");
    std::fs::write(&newp, &new).unwrap();
    let mk = |name: &str| {
        let p = d.join(name);
        let o = format!("backing_file={},backing_fmt=raw", base.display());
        q.create(&p, "qcow2", &o, &size.to_string());
        // Own clusters inside the runs, one partial, one across the
        // 4 MiB step boundary.
        q.io(
            &p,
            "qcow2",
            &[
                "write -P 2 2M 64k",
                "write -P 3 4032k 128k",
                "write -P 4 6M 1k",
                "write -P 5 12M 512",
            ],
        );
        p
    };
    let (ours, theirs) = (mk("ours.qcow2"), mk("theirs.qcow2"));
    let before = q.read_raw(&ours);
    let b = newp.to_str().unwrap();
    run_ok(qimg().args(["rebase", "-b", b, "-F", "raw"]).arg(&ours));
    run_ok(
        Command::new(&q.img)
            .args(["rebase", "-b", b, "-F", "raw"])
            .arg(&theirs),
    );
    q.assert_clean(&ours, "rebase over long runs");
    assert!(q.read_raw(&ours) == before, "safe rebase kept content");
    assert!(q.read_raw(&theirs) == before, "qemu-img kept content");
    assert_eq!(backing_keys(&q, &ours), backing_keys(&q, &theirs));
    let clusters = |p: &Path| {
        let out = Command::new(&q.img)
            .args(["check", "--output=json"])
            .arg(p)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["allocated-clusters"].as_u64().unwrap_or(u64::MAX)
    };
    assert!(
        clusters(&ours) <= clusters(&theirs),
        "qimg's image holds {} clusters, qemu-img's {}",
        clusters(&ours),
        clusters(&theirs)
    );
}
