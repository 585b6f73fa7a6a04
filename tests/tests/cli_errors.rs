//! How qimg ends when things go wrong outside the image: never a Rust panic
//! message on the terminal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::Stdio;

use luks_core::io::{BlockIo, FileDevice};
use qcow_core::{create, CreateOptions};
use qimg_tests::qimg;

#[test]
fn a_closed_stdout_ends_qimg_quietly() {
    // An image whose map is far longer than a pipe's buffer: every other
    // 512-byte cluster written, so every cluster is its own extent.
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("striped.qcow2");
    let opts = CreateOptions {
        size: 4 << 20,
        cluster_size: 512,
        ..CreateOptions::default()
    };
    let mut w = create(FileDevice::create(&img).unwrap(), &opts).unwrap();
    w.set_write_barriers(false);
    for c in (0..(4u64 << 20) / 512).step_by(2) {
        w.write_at(c * 512, &[0x5a; 512]).unwrap();
    }
    w.close().unwrap();
    // `qimg map --output json IMAGE | head -c 3`: the reader goes away early.
    let mut child = qimg()
        .args(["map", "--output", "json"])
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(err, "", "qimg complained about a closed pipe");
    assert_eq!(
        status.code(),
        Some(141),
        "128 + SIGPIPE, as a shell reports a killed qemu-img"
    );
}

#[test]
fn a_formatted_file_written_as_raw_gets_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("looks.qcow2");
    let opts = CreateOptions {
        size: 1 << 20,
        ..CreateOptions::default()
    };
    create(FileDevice::create(&img).unwrap(), &opts)
        .unwrap()
        .close()
        .unwrap();
    // Detected, it is qcow2: no warning.
    let out = qimg()
        .args(["resize"])
        .arg(&img)
        .arg("2M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Forced to raw, the write goes ahead (the user asked) with a warning.
    let out = qimg()
        .args(["resize", "-f", "raw"])
        .arg(&img)
        .arg("4M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("qcow2 header") && err.contains("looks.qcow2"),
        "{err}"
    );
}
