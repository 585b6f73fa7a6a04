//! `qimg dd` beside `qemu-img dd`: the same output (content and virtual
//! size, read back by qemu-img) and exit status for block sizes, counts
//! and skips, raw and qcow2 on both sides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;

use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::qimg;

/// Exit status and what qemu-img reads from the output (raw bytes).
fn result(q: &Qemu, cmd: &mut Command, out: &Path, dir: &Path) -> (i32, Option<Vec<u8>>) {
    let status = cmd.status().unwrap().code().unwrap_or(-1);
    let raw = dir.join("readback.raw");
    let _ = std::fs::remove_file(&raw);
    let data = out.exists().then(|| {
        q.to_raw(out, &raw, &[]);
        std::fs::read(&raw).unwrap()
    });
    (status, data)
}

#[test]
fn dd_agrees_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An odd-sized raw input (read as whole sectors) and a qcow2 copy.
    let raw = write_tmp(d, "in.raw", &pattern(1_000_000, 3, 4));
    let qcow = d.join("in.qcow2");
    q.convert(&["-O", "qcow2"], &raw, &qcow);
    let cases: &[&[&str]] = &[
        &[],
        &["bs=4k", "count=10", "skip=3"],
        &["bs=4k", "count=1000", "skip=3"],
        &["-O", "qcow2", "bs=64k", "skip=1"],
        &["bs=3", "skip=5", "count=1001"],
        &["bs=1M", "skip=0"],
        &["-O", "qcow2", "bs=1", "count=7", "skip=1"],
        &["bs=1000000", "skip=1"],
        // count × bs below skip × bs: empty output, a message, exit 0.
        &["bs=4k", "count=2", "skip=3"],
        &["bs=4k", "skip=1000"],
        &["bs=0"],
        &["bs=4k", "count=1k"],
    ];
    let mut sizes = std::collections::BTreeSet::new();
    for input in [&raw, &qcow] {
        for case in cases {
            let theirs_out = d.join("theirs.img");
            let ours_out = d.join("ours.img");
            let _ = std::fs::remove_file(&theirs_out);
            let _ = std::fs::remove_file(&ours_out);
            let args = |out: &Path| {
                let mut v: Vec<String> = case.iter().map(|s| (*s).to_string()).collect();
                v.push(format!("if={}", input.display()));
                v.push(format!("of={}", out.display()));
                v
            };
            let theirs = result(
                &q,
                Command::new(&q.img).arg("dd").args(args(&theirs_out)),
                &theirs_out,
                d,
            );
            let ours = result(&q, qimg().arg("dd").args(args(&ours_out)), &ours_out, d);
            assert_eq!(ours.0, theirs.0, "dd {case:?} from {}", input.display());
            assert!(ours.1 == theirs.1, "dd {case:?} from {}", input.display());
            if let Some(data) = &ours.1 {
                sizes.insert(data.len());
            }
            if case.contains(&"qcow2") {
                q.assert_clean(&ours_out, &format!("dd {case:?}"));
            }
        }
    }
    // The cases produced outputs of many different sizes.
    assert!(sizes.len() >= 6, "{sizes:?}");
}

#[test]
fn dd_reads_luks_volumes_like_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = write_tmp(d, "d.raw", &pattern(300 << 10, 9, 0));
    let vol = d.join("v.luks");
    let secret = "secret,id=s0,data=hunter2";
    qimg_tests::run_ok(
        qimg()
            .args(["convert", "-O", "luks", "--object", secret])
            .args(["-o", "key-secret=s0,iter-time=10"])
            .arg(&src)
            .arg(&vol),
    );
    let (ours, theirs) = (d.join("ours.raw"), d.join("theirs.raw"));
    let ops = ["bs=4k", "count=10", "skip=2"];
    qimg_tests::run_ok(
        qimg()
            .args(["dd", "--object", secret])
            .args(ops)
            .arg(format!("if={}", vol.display()))
            .arg(format!("of={}", ours.display())),
    );
    let opts = qimg_tests::qemu::encrypted_image_opts("luks", &vol);
    qimg_tests::run_ok(
        Command::new(&q.img)
            .args(["dd", "--object", secret, "--image-opts"])
            .args(ops)
            .arg(format!("if={opts}"))
            .arg(format!("of={}", theirs.display())),
    );
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert_eq!(a.len(), 8 * 4096);
    assert!(a == b);
}
