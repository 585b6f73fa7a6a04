//! `qimg compare` beside `qemu-img compare`: same exit codes and the same
//! messages (offsets included) over images that differ in content, size,
//! allocation, compression, backing files and format.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;

use qimg_tests::qemu::{write_tmp, Qemu};
use qimg_tests::qimg;

/// Exit code and standard output of a compare run.
fn outcome(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn compare_agrees_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n);
    let qcow = |n: &str, size: &str, cmds: &[&str]| {
        q.create(&p(n), "qcow2", "", size);
        if !cmds.is_empty() {
            q.io(&p(n), "qcow2", cmds);
        }
    };
    qcow("a.qcow2", "1M", &["write -P 1 0 8k"]);
    qcow("b.qcow2", "1M", &["write -P 1 0 8k", "write -P 2 4100 1"]);
    qcow("big.qcow2", "2M", &["write -P 1 0 8k"]);
    qcow(
        "bigdiff.qcow2",
        "2M",
        &["write -P 1 0 8k", "write -P 7 1500000 1"],
    );
    qcow("empty.qcow2", "1M", &[]);
    qcow("zeroed.qcow2", "1M", &["write -z 0 64k"]);
    q.create(
        &p("over.qcow2"),
        "qcow2",
        &format!("backing_file={},backing_fmt=qcow2", p("a.qcow2").display()),
        "1M",
    );
    // Compressible data, stored plain and compressed; a raw copy with holes.
    let mut raw = vec![0u8; 3 << 20];
    for (i, b) in raw[1 << 20..2 << 20].iter_mut().enumerate() {
        *b = b"hello\n"[i % 6];
    }
    let r = write_tmp(d, "r.raw", &raw);
    let run_q = |args: &[&str]| {
        let mut c = Command::new(&q.img);
        c.arg("convert").args(args);
        qimg_tests::run_ok(&mut c);
    };
    run_q(&[
        "-O",
        "qcow2",
        r.to_str().unwrap(),
        p("q.qcow2").to_str().unwrap(),
    ]);
    run_q(&[
        "-c",
        "-O",
        "qcow2",
        r.to_str().unwrap(),
        p("qc.qcow2").to_str().unwrap(),
    ]);
    // Odd-sized raw files: compared as whole sectors.
    let odd: Vec<u8> = (0..1001u32).map(|i| (i % 253) as u8 + 1).collect();
    write_tmp(d, "odd.raw", &odd);
    let mut odd2 = odd.clone();
    odd2.extend_from_slice(b"x\n");
    write_tmp(d, "odd2.raw", &odd2);
    // The same bytes padded to whole sectors, and as qcow2.
    let mut pad = odd.clone();
    pad.resize(1024, 0);
    write_tmp(d, "oddpad.raw", &pad);
    run_q(&[
        "-O",
        "qcow2",
        d.join("odd.raw").to_str().unwrap(),
        p("odd.qcow2").to_str().unwrap(),
    ]);

    let cases: &[&[&str]] = &[
        &["a.qcow2", "b.qcow2"],
        &["a.qcow2", "over.qcow2"],
        &["-s", "a.qcow2", "over.qcow2"],
        &["a.qcow2", "big.qcow2"],
        &["-s", "a.qcow2", "big.qcow2"],
        &["bigdiff.qcow2", "a.qcow2"],
        &["-q", "a.qcow2", "bigdiff.qcow2"],
        &["empty.qcow2", "big.qcow2"],
        &["empty.qcow2", "zeroed.qcow2"],
        &["-s", "empty.qcow2", "zeroed.qcow2"],
        &["q.qcow2", "qc.qcow2"],
        &["-s", "q.qcow2", "qc.qcow2"],
        &["r.raw", "q.qcow2"],
        &["-s", "r.raw", "q.qcow2"],
        &["-f", "raw", "a.qcow2", "b.qcow2"],
        &["-f", "raw", "-F", "raw", "a.qcow2", "b.qcow2"],
        &["odd.raw", "odd2.raw"],
        &["-s", "odd.raw", "odd2.raw"],
        &["odd.raw", "odd.qcow2"],
        &["-s", "odd.raw", "odd.qcow2"],
        &["-s", "odd.raw", "oddpad.raw"],
        &["-s", "odd.raw", "odd.raw"],
        &["a.qcow2", "missing.qcow2"],
    ];
    let mut seen = [0usize; 3];
    for case in cases {
        let args: Vec<String> = case
            .iter()
            .map(|a| {
                if a.starts_with('-') || *a == "raw" {
                    (*a).to_string()
                } else {
                    p(a).display().to_string()
                }
            })
            .collect();
        let theirs = outcome(Command::new(&q.img).arg("compare").args(&args));
        let ours = outcome(qimg().arg("compare").args(&args));
        assert_eq!(ours, theirs, "compare {case:?}");
        seen[usize::try_from(theirs.0).unwrap()] += 1;
    }
    // Every exit status was exercised.
    assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
}

#[test]
fn compare_reads_encrypted_images() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d: &Path = dir.path();
    let enc = d.join("enc.qcow2");
    let secret = "secret,id=s0,data=hunter2";
    qimg_tests::run_ok(
        qimg()
            .args(["create", "-q", "-f", "qcow2", "--object", secret])
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            ])
            .arg(&enc)
            .arg("1M"),
    );
    let plain = d.join("plain.qcow2");
    q.create(&plain, "qcow2", "", "1M");
    let same = qimg()
        .args(["compare", "--object", secret])
        .arg(&enc)
        .arg(&plain)
        .output()
        .unwrap();
    assert_eq!(same.status.code(), Some(0), "{same:?}");
    q.io(&plain, "qcow2", &["write -P 9 65536 512"]);
    let (code, out) = outcome(
        qimg()
            .args(["compare", "--object", secret])
            .arg(&enc)
            .arg(&plain),
    );
    assert_eq!(
        (code, out.as_str()),
        (1, "Content mismatch at offset 65536!\n")
    );
}

/// A raw file of `len` bytes holding `runs` (offset, bytes) and holes
/// everywhere else.
fn sparse_raw(path: &Path, len: u64, runs: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    qimg_tests::sparse_file(path, len);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (off, bytes) in runs {
        f.write_all_at(bytes, *off).unwrap();
    }
}

/// Differences at the first and last byte, at the end of a 1 MiB read
/// piece, inside a hole of one image only, and past the end of the shorter
/// image, over images of several 1 MiB pieces: qimg reports what
/// qemu-img reports (the differing 512-byte sector), with either image
/// first (the first is read on its own thread).
#[test]
fn compare_finds_differences_where_qemu_img_does() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const MIB: u64 = 1 << 20;
    // Data at [0, 3 MiB) and [4 MiB, 5 MiB), a hole between.
    let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    let tail: Vec<u8> = (0..MIB).map(|i| (i % 241) as u8 + 1).collect();
    let base = [(0, &data[..]), (4 * MIB, &tail[..])];
    let raw = |name: &str, len: u64, extra: &[(u64, &[u8])]| {
        let mut runs = base.to_vec();
        runs.extend_from_slice(extra);
        sparse_raw(&d.join(name), len, &runs);
    };
    raw("base.raw", 5 * MIB, &[]);
    raw("first.raw", 5 * MIB, &[(0, &[0xee])]);
    raw("last.raw", 5 * MIB, &[(5 * MIB - 1, &[0xee])]);
    raw("piece.raw", 5 * MIB, &[(2 * MIB - 1, &[0xee])]);
    raw("hole.raw", 5 * MIB, &[(3 * MIB + 1000, &[7])]);
    raw("longer.raw", 6 * MIB, &[]);
    raw("longer-dirty.raw", 6 * MIB, &[(5 * MIB + 4096 + 7, &[1])]);
    let convert = |from: &str, to: &str| {
        let (from, to) = (d.join(from), d.join(to));
        let (from, to) = (from.to_str().unwrap(), to.to_str().unwrap());
        q.img(&["convert", "-f", "raw", "-O", "qcow2", from, to]);
    };
    convert("base.raw", "base.qcow2");
    convert("hole.raw", "hole.qcow2");
    // (arguments, qemu-img's exit status and output, worked out from the
    // bytes above).
    let mismatch = |at: u64| (1, format!("Content mismatch at offset {at}!\n"));
    let same = (0, "Images are identical.\n".to_string());
    let warned =
        |rest: (i32, String)| (rest.0, format!("Warning: Image size mismatch!\n{}", rest.1));
    let cases: Vec<(&[&str], (i32, String))> = vec![
        (&["base.qcow2", "base.raw"], same.clone()),
        (&["base.qcow2", "first.raw"], mismatch(0)),
        (&["base.qcow2", "last.raw"], mismatch(5 * MIB - 512)),
        (&["base.qcow2", "piece.raw"], mismatch(2 * MIB - 512)),
        (&["base.qcow2", "hole.raw"], mismatch(3 * MIB + 512)),
        (&["base.qcow2", "hole.qcow2"], mismatch(3 * MIB + 512)),
        (&["base.raw", "hole.qcow2"], mismatch(3 * MIB + 512)),
        (&["base.qcow2", "longer.raw"], warned(same.clone())),
        (
            &["base.qcow2", "longer-dirty.raw"],
            warned(mismatch(5 * MIB + 4096)),
        ),
        (
            &["-s", "base.qcow2", "longer.raw"],
            (1, "Strict mode: Image size mismatch!\n".to_string()),
        ),
    ];
    for (args, want) in &cases {
        // Each pair in both orders: the message does not depend on it.
        let n = args.len();
        let mut swapped = args.to_vec();
        swapped.swap(n - 2, n - 1);
        for case in [args.to_vec(), swapped] {
            let args: Vec<String> = case
                .iter()
                .map(|a| {
                    if a.starts_with('-') {
                        (*a).to_string()
                    } else {
                        d.join(a).display().to_string()
                    }
                })
                .collect();
            let theirs = outcome(Command::new(&q.img).arg("compare").args(&args));
            let ours = outcome(qimg().arg("compare").args(&args));
            assert_eq!(ours, theirs, "compare {case:?}");
            assert_eq!(&ours, want, "compare {case:?}");
        }
    }
}
