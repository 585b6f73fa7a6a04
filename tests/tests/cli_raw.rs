//! The `qimg` binary on raw images, beside qemu-img.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly
#![allow(clippy::cast_possible_truncation)] // test patterns

use std::process::Command;

use qimg_tests::{assert_json_agrees, json_of, qimg, run_ok, tool};

#[test]
fn create_info_convert_raw_agree_with_qemu_img() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    run_ok(qimg().args(["create", "-q", "-f", "raw"]).arg(&a).arg("3M"));
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 3 << 20);
    // Data in the middle, holes around it.
    let mut data = std::fs::read(&a).unwrap();
    for (i, b) in data[1 << 20..(1 << 20) + 5000].iter_mut().enumerate() {
        *b = (i % 200) as u8 + 1;
    }
    std::fs::write(&a, &data).unwrap();

    let ours = json_of(qimg().args(["info", "--output", "json"]).arg(&a));
    let theirs = json_of(
        Command::new(&qemu_img)
            .args(["info", "--output=json"])
            .arg(&a),
    );
    assert!(assert_json_agrees(&ours, &theirs, "info") >= 8);
    assert_eq!(ours["format"], "raw");
    assert_eq!(ours["virtual-size"], 3 << 20);

    // qemu-img prints map JSON one entry a line; compare parsed.
    let ours = json_of(qimg().args(["map", "--output", "json"]).arg(&a));
    let theirs = json_of(
        Command::new(&qemu_img)
            .args(["map", "--output=json"])
            .arg(&a),
    );
    assert_eq!(ours, theirs);
    let ours = run_ok(qimg().arg("map").arg(&a));
    let theirs = run_ok(Command::new(&qemu_img).arg("map").arg(&a));
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs)
    );

    let b = dir.path().join("b.raw");
    run_ok(qimg().arg("convert").arg("-O").arg("raw").arg(&a).arg(&b));
    assert_eq!(std::fs::read(&b).unwrap(), data);
    // qemu-img compares them equal too.
    run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-q"])
            .arg(&a)
            .arg(&b),
    );
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let out = qimg()
        .args(["info", "/nonexistent/disk.img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = qimg()
        .args(["create", "-f", "raw", "x.img", "12Q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size '12Q'"));
}
