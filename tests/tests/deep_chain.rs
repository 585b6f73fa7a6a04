//! Backing chains deeper than the old limit of 32 (issue #22): a 33-deep
//! and a 1000-deep qcow2 chain, with data written at several layers, read
//! by `info --backing-chain`, `map`, `convert -O raw` and `compare` as
//! qemu-img 10.0.2 reads them; a chain past qimg's ceiling (4096 images)
//! is refused with a clear error.
//!
//! The chains are built fast: one layer made by `qemu-img create -u` is the
//! template, and every other layer is a copy with the backing file name
//! (`lNNNN.qcow2`, all the same length) patched in its header, so 4,000
//! layers take seconds where 1,000 `qemu-img create` calls take 42 s. The
//! layers with data are written with qemu-io with their backing file
//! detached (`"backing": null`), so qemu-io does not open the chain below.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg, run_ok};

/// The virtual size of every layer.
const SIZE: usize = 64 << 20;
const K: usize = 1024;
const M: usize = K * K;

/// What a layer gets written: qemu-io commands and their effect on the
/// guest view, (offset, length, byte) in order (a later write wins).
struct Write {
    layer: usize,
    cmd: &'static str,
    effect: (usize, usize, u8),
}

/// The file name of layer `i` (0 is the base).
fn name(i: usize) -> String {
    format!("l{i:04}.qcow2")
}

/// Builds a chain of `n` qcow2 images in `dir` (layer 0 the base, layer
/// n-1 the top), the layers without data in clusters of `cluster`, and
/// returns the top's path.
fn build_chain(q: &Qemu, dir: &Path, n: usize, cluster: &str, writes: &[Write]) -> PathBuf {
    let opts = format!("cluster_size={cluster}");
    q.create(&dir.join(name(0)), "qcow2", &opts, "64M");
    let tmpl = dir.join("template.qcow2");
    run_ok(Command::new(&q.img).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-o",
        &opts,
        "-b",
        &name(0),
        "-F",
        "qcow2",
        tmpl.to_str().unwrap(),
        "64M",
    ]));
    let bytes = std::fs::read(&tmpl).unwrap();
    let off = usize::try_from(u64::from_be_bytes(bytes[8..16].try_into().unwrap())).unwrap();
    let len = usize::try_from(u32::from_be_bytes(bytes[16..20].try_into().unwrap())).unwrap();
    assert_eq!(
        &bytes[off..off + len],
        name(0).as_bytes(),
        "template header"
    );
    for i in 1..n {
        let mut b = bytes.clone();
        b[off..off + len].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(dir.join(name(i)), b).unwrap();
    }
    for w in writes {
        let path = dir.join(name(w.layer));
        let spec = format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
            path.display()
        );
        run_ok(Command::new(&q.io).args(["-c", w.cmd, &spec]));
    }
    dir.join(name(n - 1))
}

/// The guest view the writes leave, applied from the base up.
fn expected(writes: &[Write]) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    let mut ws: Vec<&Write> = writes.iter().collect();
    ws.sort_by_key(|w| w.layer);
    for w in ws {
        let (at, len, byte) = w.effect;
        v[at..at + len].fill(byte);
    }
    v
}

/// `--output json` of `info --backing-chain`, as (filename, backing
/// filename) per image.
fn chain_of(cmd: &mut Command) -> Vec<(String, Option<String>)> {
    let out = run_ok(cmd);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .expect("an array")
        .iter()
        .map(|i| {
            (
                i["filename"].as_str().unwrap().to_string(),
                i.get("backing-filename")
                    .and_then(|b| b.as_str())
                    .map(str::to_string),
            )
        })
        .collect()
}

/// The hard limit on open files of processes started from here.
fn hard_nofile() -> u64 {
    let out = run_ok(Command::new("sh").args(["-c", "ulimit -Hn"]));
    let s = String::from_utf8_lossy(&out);
    s.trim().parse().unwrap_or(u64::MAX)
}

/// Checks the chain topped by `top` (of `n` images) against qemu-img and
/// against `want`; `qemu_convert`: whether qemu-img convert is asked too.
fn check_chain(q: &Qemu, dir: &Path, top: &Path, n: usize, want: &[u8], qemu_convert: bool) {
    // qemu-img map takes 24 s over 1000 layers: the JSON form (with each
    // run's depth) is enough there.
    let formats: &[&str] = if qemu_convert {
        &["json", "human"]
    } else {
        &["json"]
    };
    let t = top.to_str().unwrap();
    let ours = chain_of(qimg().args(["info", "--backing-chain", "--output", "json", t]));
    let theirs =
        chain_of(Command::new(&q.img).args(["info", "--backing-chain", "--output", "json", t]));
    assert_eq!(ours.len(), n, "qimg info --backing-chain count");
    assert_eq!(ours, theirs, "info --backing-chain names");

    for &fmt in formats {
        let ours = run_ok(qimg().args(["map", "--output", fmt, t]));
        let theirs = run_ok(Command::new(&q.img).args(["map", "--output", fmt, t]));
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "map --output {fmt}"
        );
    }

    for m in ["1", "2"] {
        let out = dir.join(format!("ours-m{m}.raw"));
        run_ok(qimg().args(["convert", "-m", m, "-O", "raw", t, out.to_str().unwrap()]));
        let got = std::fs::read(&out).unwrap();
        assert!(got == want, "qimg convert -m {m} of the {n}-deep chain");
    }
    let want_raw = dir.join("want.raw");
    std::fs::write(&want_raw, want).unwrap();
    run_ok(qimg().args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        t,
        want_raw.to_str().unwrap(),
    ]));
    if qemu_convert {
        let theirs = dir.join("theirs.raw");
        q.convert(&["-O", "raw"], top, &theirs);
        assert!(std::fs::read(&theirs).unwrap() == want, "qemu-img convert");
    }
}

/// Writes at the base, the next layer, the middle, just under the top and
/// the top, overlapping so that each upper write must win.
fn writes(n: usize) -> Vec<Write> {
    vec![
        Write {
            layer: 0,
            cmd: "write -P 1 0 2M",
            effect: (0, 2 * M, 1),
        },
        Write {
            layer: 1,
            cmd: "write -P 2 1M 1M",
            effect: (M, M, 2),
        },
        Write {
            layer: n / 2,
            cmd: "write -P 3 4M 64k",
            effect: (4 * M, 64 * K, 3),
        },
        Write {
            layer: n - 2,
            cmd: "write -z 0 512k",
            effect: (0, 512 * K, 0),
        },
        Write {
            layer: n - 1,
            cmd: "write -P 5 60M 4M",
            effect: (60 * M, 4 * M, 5),
        },
    ]
}

#[test]
fn chain_of_33_reads_as_qemu_img_reads_it() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let w = writes(33);
    let top = build_chain(&q, dir.path(), 33, "64k", &w);
    check_chain(&q, dir.path(), &top, 33, &expected(&w), true);
}

/// qemu-img 10.0.2 opens this chain (info, map), but its convert and
/// compare crash with SIGSEGV at this depth (800 layers still convert), so
/// qimg's convert is judged against the content the writes leave.
#[test]
fn chain_of_1000_reads_as_qemu_img_reads_it() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let w = writes(1000);
    let top = build_chain(&q, dir.path(), 1000, "4k", &w);
    check_chain(&q, dir.path(), &top, 1000, &expected(&w), false);

    // Under a soft limit of 1024 open files qimg raises it (as qemu-img
    // does) when the hard limit allows; otherwise it says which layer ran
    // out. Under a hard limit of 300 it must refuse clearly.
    let t = top.to_str().unwrap();
    let bin = qimg_tests::qimg_bin();
    let bin = bin.to_str().unwrap();
    let soft = Command::new("sh")
        .args(["-c", "ulimit -Sn 1024 && exec \"$0\" map \"$1\"", bin, t])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&soft.stderr);
    if hard_nofile() >= 2100 {
        assert!(soft.status.success(), "soft limit 1024: {err}");
    } else {
        assert_eq!(soft.status.code(), Some(1), "{err}");
        assert!(err.contains("of the backing chain needs about"), "{err}");
    }
    let hard = Command::new("sh")
        .args(["-c", "ulimit -n 300 && exec \"$0\" map \"$1\"", bin, t])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&hard.stderr);
    assert_eq!(hard.status.code(), Some(1), "hard limit 300: {err}");
    assert!(
        err.contains("of the backing chain needs about") && err.contains("ulimit -n 300"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// One image more than the ceiling: every verb refuses it with the limit
/// in the message and qemu-img's exit codes for an image that does not
/// open (1; compare 2), and never panics.
#[test]
fn chain_past_the_ceiling_is_refused() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let n = 4097;
    let top = build_chain(&q, dir.path(), n, "512", &[]);
    let t = top.to_str().unwrap();
    // 4096 layers need about 8,224 descriptors; below that hard limit the
    // refusal names the layer that ran out instead.
    let deep_enough = hard_nofile() >= 8300;
    let out = dir.path().join("out.raw");
    let o = out.to_str().unwrap();
    let cases: [(&[&str], i32); 4] = [
        (&["info", "--backing-chain", t], 1),
        (&["map", t], 1),
        (&["convert", "-O", "raw", t, o], 1),
        (&["compare", t, t], 2),
    ];
    for (args, code) in cases {
        let r = qimg().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if deep_enough {
            assert!(
                err.contains("deeper than 4096 images") && err.contains(&name(0)),
                "{args:?}: {err}"
            );
        } else {
            assert!(
                err.contains("of the backing chain needs about"),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!out.exists(), "a refused convert creates no output");
}
