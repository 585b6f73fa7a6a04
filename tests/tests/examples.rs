//! The bundled examples the README uses decode to their known content.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use qimg_tests::{qimg, run_ok, sha256_file, workspace_root};

/// sha256 of the 1 MiB raw disk both examples were made from.
const DEMO_SHA256: &str = "f6fddb5cbf28e89e1d403b826a8a151fcf6caa09bc8db4f02abf12d27fa0a8de";

#[test]
fn bundled_examples_decode() {
    let ex = workspace_root().join("examples");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.raw");
    run_ok(
        qimg()
            .args(["convert", "-O", "raw"])
            .arg(ex.join("demo.qcow2"))
            .arg(&out),
    );
    assert_eq!(sha256_file(&out), DEMO_SHA256);
    std::fs::remove_file(&out).unwrap();
    run_ok(
        qimg()
            .args(["convert", "-O", "raw", "--key-file"])
            .arg(ex.join("demo.passphrase"))
            .arg(ex.join("demo-luks.qcow2"))
            .arg(&out),
    );
    assert_eq!(sha256_file(&out), DEMO_SHA256);
    let text = std::fs::read(&out).unwrap();
    assert!(text.starts_with(b"qimg demo disk, line 0000"));
}
