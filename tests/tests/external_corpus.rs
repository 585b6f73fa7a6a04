//! The third-party corpus of `shared/testdata/external/` (issue #22) through
//! qimg and qemu-img 10.0.2, verb by verb, on the same file.
//!
//! - `qemu_samples/*.bz2` (QEMU's iotests sample images: VPC, VMDK, VHDX,
//!   bochs, parallels, dmg, cloop, raw) are decompressed with `bzip2` into a
//!   temporary folder and opened with `-f raw` by both tools, as that
//!   folder's README says (qimg reads none of those formats).
//! - `hobby.tar.xz` (qcow2 files committed to public repositories) is
//!   unpacked and opened as qcow2.
//!
//! For every image and verb (`info`, `info --output json`, `check`,
//! `map --output json`, `convert -O raw`, `compare` of the image with
//! itself, `snapshot -l`): equal exit codes; equal `virtual-size` in the
//! info JSON; equal map extents (start, length, data, zero, offset); equal
//! SHA-256 of the converted raw bytes. A disagreement qimg may keep must be
//! listed in `STRICTER_REFUSALS` (documented) or `KNOWN_DIFFERENCES` (not
//! yet fixed), each with its symptom; both tables are empty today, and an
//! entry that stops disagreeing fails the test so the table stays true.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qimg_tests::{qimg, sha256_file, testdata, tool, untar_xz};

/// (image file name, verb, reason): documented stricter refusals by qimg.
const STRICTER_REFUSALS: &[(&str, &str, &str)] = &[];

/// (image file name, verb, symptom): disagreements with qemu-img that are
/// not (yet) justified; the verb is skipped for that image.
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[];

/// The verbs compared, by the name used in the two tables.
const VERBS: &[&str] = &[
    "info",
    "info-json",
    "check",
    "map-json",
    "convert",
    "compare",
    "snapshot-l",
];

/// Runs a command, returning its output (panics only when it cannot start).
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The exit code, with a signal turned into a failure message.
fn code(cmd: &Command, out: &Output) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!(
            "{cmd:?} was killed by a signal ({})\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Whether `(name, verb)` is in a table.
fn listed(table: &[(&str, &str, &str)], name: &str, verb: &str) -> bool {
    table.iter().any(|(n, v, _)| *n == name && *v == verb)
}

/// The map extents, keyed to the fields both tools print.
fn extents(v: &serde_json::Value, what: &str) -> Vec<(u64, u64, bool, bool, Option<u64>)> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: map JSON is not an array: {v}"))
        .iter()
        .map(|e| {
            (
                e["start"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{what}: no start in {e}")),
                e["length"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{what}: no length in {e}")),
                e["data"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("{what}: no data in {e}")),
                e["zero"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("{what}: no zero in {e}")),
                e.get("offset").and_then(serde_json::Value::as_u64),
            )
        })
        .collect()
}

/// Compares one image across every verb; returns the verbs that disagreed
/// (each must be in a table), after asserting everything that agreed.
fn compare_image(qemu: &Path, img: &Path, fmt: &str, scratch: &Path) -> Vec<&'static str> {
    let name = img.file_name().unwrap().to_string_lossy().into_owned();
    let mut differ = Vec::new();
    for &verb in VERBS {
        let what = format!("{name} ({fmt}) {verb}");
        let ours_raw = scratch.join("ours.raw");
        let theirs_raw = scratch.join("theirs.raw");
        let _ = std::fs::remove_file(&ours_raw);
        let _ = std::fs::remove_file(&theirs_raw);
        let args: Vec<std::ffi::OsString> = match verb {
            "info" => vec!["info".into(), "-f".into(), fmt.into(), img.into()],
            "info-json" => vec![
                "info".into(),
                "-f".into(),
                fmt.into(),
                "--output".into(),
                "json".into(),
                img.into(),
            ],
            "check" => vec!["check".into(), "-f".into(), fmt.into(), img.into()],
            "map-json" => vec![
                "map".into(),
                "-f".into(),
                fmt.into(),
                "--output".into(),
                "json".into(),
                img.into(),
            ],
            "compare" => vec![
                "compare".into(),
                "-f".into(),
                fmt.into(),
                "-F".into(),
                fmt.into(),
                img.into(),
                img.into(),
            ],
            "snapshot-l" => vec![
                "snapshot".into(),
                "-f".into(),
                fmt.into(),
                "-l".into(),
                img.into(),
            ],
            "convert" => vec![
                "convert".into(),
                "-f".into(),
                fmt.into(),
                "-O".into(),
                "raw".into(),
                img.into(),
            ],
            _ => unreachable!(),
        };
        let mut ours = qimg();
        ours.args(&args);
        let mut theirs = Command::new(qemu);
        theirs.args(&args);
        if verb == "convert" {
            ours.arg(&ours_raw);
            theirs.arg(&theirs_raw);
        }
        let (o, t) = (output(&mut ours), output(&mut theirs));
        let (oc, tc) = (code(&ours, &o), code(&theirs, &t));
        let mut agree = oc == tc;
        let mut symptom = format!(
            "exit qimg {oc} vs qemu-img {tc}; qimg stderr: {}; qemu-img stderr: {}",
            String::from_utf8_lossy(&o.stderr).trim(),
            String::from_utf8_lossy(&t.stderr).trim()
        );
        if agree && oc == 0 {
            match verb {
                "info-json" => {
                    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    let b: serde_json::Value = serde_json::from_slice(&t.stdout).unwrap();
                    let (va, vb) = (a["virtual-size"].as_u64(), b["virtual-size"].as_u64());
                    assert!(vb.is_some(), "{what}: qemu-img printed no virtual-size");
                    agree = va == vb;
                    symptom = format!("virtual-size qimg {va:?} vs qemu-img {vb:?}");
                }
                "map-json" => {
                    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    let b: serde_json::Value = serde_json::from_slice(&t.stdout).unwrap();
                    let (ea, eb) = (extents(&a, &what), extents(&b, &what));
                    assert!(!eb.is_empty(), "{what}: qemu-img printed no extents");
                    agree = ea == eb;
                    symptom = format!("extents qimg {ea:?} vs qemu-img {eb:?}");
                }
                "convert" => {
                    let (ha, hb) = (sha256_file(&ours_raw), sha256_file(&theirs_raw));
                    agree = ha == hb;
                    symptom = format!("raw sha256 qimg {ha} vs qemu-img {hb}");
                }
                _ => {}
            }
        }
        let excused =
            listed(STRICTER_REFUSALS, &name, verb) || listed(KNOWN_DIFFERENCES, &name, verb);
        if agree {
            assert!(
                !excused,
                "{what}: listed as a difference, but qimg now agrees with qemu-img; remove the entry"
            );
        } else {
            assert!(excused, "{what}: qimg disagrees with qemu-img: {symptom}");
            eprintln!("{what}: listed difference: {symptom}");
            differ.push(verb);
        }
    }
    differ
}

/// Decompresses every `qemu_samples/*.bz2` into `dir`; returns the images.
fn qemu_samples(dir: &Path) -> Option<Vec<PathBuf>> {
    let src = testdata("external/qemu_samples")?;
    let bzip2 = tool("bzip2")?;
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bz2"))
        .collect();
    entries.sort();
    for p in entries {
        let img = dir.join(p.file_stem().unwrap());
        let data = output(Command::new(&bzip2).arg("-dc").arg(&p));
        assert!(data.status.success(), "bzip2 -dc {} failed", p.display());
        std::fs::write(&img, &data.stdout).unwrap();
        out.push(img);
    }
    Some(out)
}

#[test]
fn qemu_samples_as_raw_agree_with_qemu_img() {
    let Some(qemu) = tool("qemu-img") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(images) = qemu_samples(dir.path()) else {
        return;
    };
    assert_eq!(images.len(), 14, "the README lists 14 sample images");
    let scratch = tempfile::tempdir().unwrap();
    for img in &images {
        let before = sha256_file(img);
        compare_image(&qemu, img, "raw", scratch.path());
        assert_eq!(
            sha256_file(img),
            before,
            "{}: the source changed",
            img.display()
        );
    }
}

#[test]
fn hobby_qcow2_images_agree_with_qemu_img() {
    let Some(qemu) = tool("qemu-img") else { return };
    let Some(tarball) = testdata("external/hobby.tar.xz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    untar_xz(&tarball, dir.path());
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir.path().join("hobby"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    images.sort();
    assert_eq!(images.len(), 9, "hobby.tar.xz holds 9 images");
    let scratch = tempfile::tempdir().unwrap();
    for img in &images {
        let before = sha256_file(img);
        compare_image(&qemu, img, "qcow2", scratch.path());
        assert_eq!(
            sha256_file(img),
            before,
            "{}: the source changed",
            img.display()
        );
    }
}
