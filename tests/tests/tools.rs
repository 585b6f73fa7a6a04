//! The machine has every external tool the interop tests use. Under
//! `CI=true` a missing one fails here, proving `.ci/run` installs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use qimg_tests::{required_file, tool};
use std::process::Command;

#[test]
fn qemu_img_is_recent_enough() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let out = qimg_tests::run_ok(Command::new(qemu_img).arg("--version"));
    let text = String::from_utf8_lossy(&out);
    let major: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(major >= 8, "qemu-img 8 or newer is needed, found: {text}");
}

#[test]
fn cryptsetup_is_installed() {
    let Some(cs) = tool("cryptsetup") else { return };
    qimg_tests::run_ok(Command::new(cs).arg("--version"));
}

#[test]
fn firmware_test_tools_are_installed() {
    tool("qemu-system-x86_64");
    required_file("/usr/share/OVMF/OVMF_CODE_4M.fd");
}

#[test]
fn shared_test_data_is_present() {
    qimg_tests::testdata("qemu/EXPECTED.md");
    qimg_tests::testdata("cryptsetup/EXPECTED.md");
}
