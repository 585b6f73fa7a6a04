//! No verb destroys its own input: `convert`, `dd`, `rebase -b` and
//! `create -b` refuse a destination (or a new backing chain) that is the
//! input file itself, under the same name, `./name`, a hard link or a
//! symlink; the refused command exits 1 and leaves every file unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;

use qimg_tests::{qimg, run_ok, sha256_file};

/// base.qcow2 (with some data) <- top.qcow2, plus a hard link and a
/// symlink to base.qcow2, in `d`.
fn chain(d: &Path) {
    run_ok(
        qimg()
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]),
    );
    run_ok(qimg().current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]));
    // Some guest data, so a truncation or rewrite would show in the hash.
    std::fs::write(d.join("data.raw"), vec![0x5au8; 65536]).unwrap();
    run_ok(qimg().current_dir(d).args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "data.raw",
        "base.qcow2",
    ]));
    std::fs::hard_link(d.join("base.qcow2"), d.join("hard.qcow2")).unwrap();
    std::os::unix::fs::symlink("base.qcow2", d.join("sym.qcow2")).unwrap();
}

/// Runs `args` in `d`, which must fail with exit status 1 and a message
/// naming the refusal, with base.qcow2 and top.qcow2 unchanged.
fn refused(d: &Path, args: &[&str], needle: &str) {
    let before = (
        sha256_file(&d.join("base.qcow2")),
        sha256_file(&d.join("top.qcow2")),
    );
    let mut cmd: Command = qimg();
    cmd.current_dir(d).args(args);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should be refused\n{err}"
    );
    assert!(err.contains(needle), "{args:?}: unexpected message\n{err}");
    let after = (
        sha256_file(&d.join("base.qcow2")),
        sha256_file(&d.join("top.qcow2")),
    );
    assert_eq!(before, after, "{args:?} changed an input");
}

const NAMES: [&str; 4] = ["base.qcow2", "./base.qcow2", "hard.qcow2", "sym.qcow2"];

#[test]
fn convert_onto_its_source_or_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    for name in NAMES {
        for fmt in ["qcow2", "raw"] {
            refused(d, &["convert", "-O", fmt, "base.qcow2", name], "same file");
            // The destination is in the source's backing chain.
            refused(d, &["convert", "-O", fmt, "top.qcow2", name], "same file");
            refused(
                d,
                &["convert", "-n", "-O", fmt, "top.qcow2", name],
                "same file",
            );
        }
    }
    // Another destination still works.
    run_ok(
        qimg()
            .current_dir(d)
            .args(["convert", "-O", "raw", "top.qcow2", "out.raw"]),
    );
    assert_eq!(std::fs::read(d.join("out.raw")).unwrap().len(), 1 << 20);
}

#[test]
fn convert_with_the_destination_as_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    for name in NAMES {
        // The new image's backing file would be the image itself (qemu-img
        // truncates the destination before failing on its own lock).
        refused(
            d,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-B",
                name,
                "data.raw",
                "base.qcow2",
            ],
            "would contain this image",
        );
        refused(
            d,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-B",
                "top.qcow2",
                "data.raw",
                name,
            ],
            "would contain this image",
        );
    }
}

/// `-B` naming the source is no self-destruction: qemu-img accepts it
/// (an overlay of the source), and so does qimg, the source unchanged.
#[test]
fn convert_with_the_source_as_backing_keeps_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    for name in NAMES {
        let before = (
            sha256_file(&d.join("base.qcow2")),
            sha256_file(&d.join("top.qcow2")),
        );
        let _ = std::fs::remove_file(d.join("new.qcow2"));
        run_ok(qimg().current_dir(d).args([
            "convert",
            "-O",
            "qcow2",
            "-B",
            name,
            "-F",
            "qcow2",
            "base.qcow2",
            "new.qcow2",
        ]));
        let after = (
            sha256_file(&d.join("base.qcow2")),
            sha256_file(&d.join("top.qcow2")),
        );
        assert_eq!(before, after, "convert -B {name} changed an input");
        run_ok(
            qimg()
                .current_dir(d)
                .args(["compare", "base.qcow2", "new.qcow2"]),
        );
    }
}

#[test]
fn dd_onto_its_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    for name in NAMES {
        let of = format!("of={name}");
        refused(d, &["dd", "-O", "raw", "if=base.qcow2", &of], "same file");
        refused(d, &["dd", "-O", "qcow2", "if=top.qcow2", &of], "same file");
    }
}

#[test]
fn rebase_onto_a_chain_holding_the_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    for name in NAMES {
        for unsafe_ in [false, true] {
            let mut args = vec!["rebase"];
            if unsafe_ {
                args.push("-u");
            }
            // Onto itself, and onto top.qcow2 whose chain holds base.qcow2.
            for b in [name, "top.qcow2"] {
                let mut a = args.clone();
                a.extend(["-b", b, "-F", "qcow2", "base.qcow2"]);
                refused(d, &a, "would contain this image");
            }
            let mut a = args.clone();
            a.extend(["-b", "base.qcow2", "-F", "qcow2", name]);
            refused(d, &a, "would contain this image");
        }
    }
}

#[test]
fn create_over_its_own_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    chain(d);
    for name in NAMES {
        refused(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                name,
                "-F",
                "qcow2",
                "base.qcow2",
            ],
            "would contain this image",
        );
        refused(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "top.qcow2",
                "-F",
                "qcow2",
                name,
                "1M",
            ],
            "would contain this image",
        );
    }
}
