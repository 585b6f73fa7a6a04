//! How qimg ends when things go wrong outside the image: never a Rust panic
//! message on the terminal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::Stdio;

use qimg_tests::qimg;

#[test]
fn a_closed_stdout_ends_qimg_quietly() {
    // `qimg completions bash | head -c 3`: the reader goes away early.
    let mut child = qimg()
        .args(["completions", "bash"])
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
