//! qemu-img 10's backing-file rules and the check/map items of issue #19,
//! each run with the real qemu-img and with qimg on the same files and
//! judged by qemu-img: `create -b` needs `-F` (or `-o backing_fmt=`),
//! `create -u` over a missing backing file, `convert -B .. -F ..` writing
//! only what the source's top layer holds, `check` on a missing backing or
//! data file, and `map` through an external data file's holes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::{Command, Output};

use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg, run_ok, tool};

/// Standard error without the program's name at the start of a line
/// (`qemu-img: ` or `qimg: `).
fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("qimg: "))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What one run did: exit code, standard output, standard error (without
/// the program name) and the digest of the file it was to create, trailing
/// zero bytes left out (qemu-img ends a new qcow2 file at its L1 table's
/// last byte, qimg at a whole sector; what lies before is compared).
#[derive(Debug, PartialEq)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    file: Option<String>,
}

fn digest(mut bytes: Vec<u8>) -> String {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    qimg_tests::sha256_hex(&bytes)
}

fn outcome(cmd: &mut Command, file: &Path) -> Outcome {
    let out = cmd.output().unwrap();
    let o = Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: stderr_text(&out),
        file: std::fs::read(file).ok().map(digest),
    };
    let _ = std::fs::remove_file(file);
    o
}

/// Runs `verb args` with qemu-img, then with qimg, in `dir` (relative
/// names, so messages name files alike); `created` is the file the
/// command may create, removed after each run.
fn both(q: &Qemu, dir: &Path, args: &[&str], created: &str) -> (Outcome, Outcome) {
    let file = dir.join(created);
    let _ = std::fs::remove_file(&file);
    let theirs = outcome(Command::new(&q.img).current_dir(dir).args(args), &file);
    let ours = outcome(qimg().current_dir(dir).args(args), &file);
    (theirs, ours)
}

/// `create -b` without a format is refused (with qemu-img's hint naming the
/// detected format), `-o backing_fmt=` counts as `-F`, a missing backing
/// file fails unless `-u` (which then needs a size), and every refusal
/// leaves no file. Exit codes, messages and the created images' bytes
/// are qemu-img's.
#[test]
fn create_backing_rules_match_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    q.create(&d.join("base.qcow2"), "qcow2", "", "4M");
    q.create(&d.join("base.raw"), "raw", "", "1M");
    std::fs::create_dir(d.join("sub")).unwrap();
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "-b", "base.qcow2", "new.qcow2"],
        &["-f", "qcow2", "-b", "base.qcow2", "new.qcow2", "4M"],
        &["-f", "qcow2", "-b", "base.raw", "new.qcow2"],
        &["-f", "qcow2", "-o", "backing_file=base.qcow2", "new.qcow2"],
        &[
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-o",
            "backing_fmt=qcow2",
            "new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "raw", "new.qcow2"],
        &[
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "new.qcow2",
            "2M",
        ],
        &["-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "new.qcow2"],
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "luks", "new.qcow2"],
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "bogus",
            "new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
            "4M",
        ],
        &["-f", "qcow2", "-b", "missing.qcow2", "new.qcow2", "4M"],
        &[
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
            "4M",
        ],
        &[
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "new.qcow2",
            "4M",
        ],
        &[
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
            "8M",
        ],
        &["-f", "qcow2", "-u", "new.qcow2", "1M"],
        &["-f", "qcow2", "-b", "", "-F", "qcow2", "new.qcow2", "1M"],
        &["-f", "qcow2", "new.qcow2"],
        &[
            "-f",
            "raw",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
            "1M",
        ],
        // Relative to the new image's folder, as qemu-img resolves it.
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "sub/new.qcow2",
        ],
        &[
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "sub/new.qcow2",
        ],
    ];
    let mut refused = 0;
    for case in cases {
        let mut args = vec!["create"];
        args.extend_from_slice(case);
        let created = case.iter().find(|a| a.ends_with("new.qcow2")).unwrap();
        let (theirs, ours) = both(&q, d, &args, created);
        assert_eq!(ours, theirs, "create {case:?}");
        if theirs.code != Some(0) {
            refused += 1;
        }
    }
    // The cases are not all accepted or all refused.
    assert!(
        refused > 8 && refused < cases.len() - 5,
        "{refused} refused"
    );
}

/// One entry per run of equal allocation in `qemu-img map --output=json`
/// (host offsets left out: the two tools lay clusters out differently):
/// `(start, length, depth, present, zero, data)`.
fn allocation(q: &Qemu, img: &Path) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let mut out: Vec<(u64, u64, u64, bool, bool, bool)> = Vec::new();
    for e in q.map(img).as_array().unwrap() {
        let n = |k: &str| e[k].as_u64().unwrap();
        let b = |k: &str| e[k].as_bool().unwrap();
        let (start, len) = (n("start"), n("length"));
        let key = (n("depth"), b("present"), b("zero"), b("data"));
        if let Some(last) = out.last_mut() {
            if (last.2, last.3, last.4, last.5) == key && last.0 + last.1 == start {
                last.1 += len;
                continue;
            }
        }
        out.push((start, len, key.0, key.1, key.2, key.3));
    }
    out
}

/// `convert -B BASE -F FMT` records the backing file and its format and,
/// as qemu-img, writes only what the source's top layer holds: an overlay
/// of that same base converts to an image holding only the overlay's
/// clusters (the rest stays unallocated and reads from the base). Judged
/// by `qemu-img map` (the same allocation as qemu-img's output),
/// `qemu-img compare` (the same content) and `qemu-img check`.
#[test]
fn convert_b_writes_what_the_top_layer_holds() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    q.create(&base, "qcow2", "", "8M");
    q.io(
        &base,
        "qcow2",
        &["write -P 0x11 0 4M", "write -P 0x22 6M 1M"],
    );
    let ovl = d.join("ovl.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        ovl.to_str().unwrap(),
    ]);
    // New data, a zero write, and data equal to the base's.
    q.io(
        &ovl,
        "qcow2",
        &[
            "write -P 0x33 1M 1M",
            "write -z 2M 64k",
            "write -P 0x11 3M 64k",
        ],
    );
    let top = d.join("top.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "ovl.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    q.io(&top, "qcow2", &["write -P 0x44 5M 64k"]);
    // 4 KiB clusters under 64 KiB ones: partly held destination clusters.
    let small = d.join("small.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        small.to_str().unwrap(),
    ]);
    q.io(
        &small,
        "qcow2",
        &[
            "write -P 0x55 8k 4k",
            "write -z 1M 4k",
            "write -P 0x66 7M 12k",
        ],
    );
    // Sources with no backing file: every cluster is theirs.
    let flat = d.join("flat.qcow2");
    q.convert(&["-O", "qcow2"], &ovl, &flat);
    let raw = d.join("flat.raw");
    q.convert(&["-O", "raw"], &ovl, &raw);
    let b_args = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
    for (src, extra) in [
        ("ovl.qcow2", &[][..]),
        ("top.qcow2", &[]),
        ("small.qcow2", &[]),
        ("flat.qcow2", &[]),
        ("flat.raw", &[]),
        ("ovl.qcow2", &["-o", "cluster_size=512"]),
        ("ovl.qcow2", &["-S", "0"]),
        ("ovl.qcow2", &["-c"]),
        ("top.qcow2", &["-c"]),
        ("small.qcow2", &["-c"]),
        ("flat.qcow2", &["-c"]),
    ] {
        let run = |tool: &mut Command, out: &str| {
            run_ok(
                tool.current_dir(d)
                    .arg("convert")
                    .args(b_args)
                    .args(extra)
                    .args([src, out]),
            );
        };
        run(&mut Command::new(&q.img), "theirs.qcow2");
        run(&mut qimg(), "ours.qcow2");
        let (theirs, ours) = (d.join("theirs.qcow2"), d.join("ours.qcow2"));
        let what = format!("{src} {extra:?}");
        assert_eq!(allocation(&q, &ours), allocation(&q, &theirs), "{what}");
        q.img(&["compare", theirs.to_str().unwrap(), ours.to_str().unwrap()]);
        q.assert_clean(&ours, &what);
        let info = q.info(&ours);
        assert_eq!(info["backing-filename"], "base.qcow2", "{what}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{what}");
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        println!(
            "convert -B {what}: qemu-img {} bytes, qimg {} bytes",
            size(&theirs),
            size(&ours)
        );
    }
    // The overlay of the same base: only its own clusters are written.
    run_ok(
        qimg()
            .current_dir(d)
            .arg("convert")
            .args(b_args)
            .args(["ovl.qcow2", "ours.qcow2"]),
    );
    let ours = d.join("ours.qcow2");
    let own: u64 = allocation(&q, &ours)
        .iter()
        .filter(|e| e.2 == 0 && e.5)
        .map(|e| e.1)
        .sum();
    assert_eq!(own, (1 << 20) + (64 << 10), "data held by the new image");
    let out = Command::new(&q.img)
        .args(["compare", "-q"])
        .arg(&ovl)
        .arg(&ours)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "the overlay reads the same");
}

/// `convert -B` refusals: no backing format, a missing backing file, a
/// raw destination; exit code and first message line as qemu-img's.
#[test]
fn convert_b_refusals_match_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    q.create(&d.join("base.qcow2"), "qcow2", "", "4M");
    q.create(&d.join("src.qcow2"), "qcow2", "", "4M");
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "-B", "base.qcow2", "src.qcow2", "out.img"],
        &[
            "-O",
            "qcow2",
            "-B",
            "missing.qcow2",
            "-F",
            "qcow2",
            "src.qcow2",
            "out.img",
        ],
        &[
            "-O",
            "raw",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "src.qcow2",
            "out.img",
        ],
        &["-O", "qcow2", "-F", "qcow2", "src.qcow2", "out.img"],
    ];
    for case in cases {
        let mut args = vec!["convert"];
        args.extend_from_slice(case);
        let (theirs, ours) = both(&q, d, &args, "out.img");
        assert_eq!(ours.code, theirs.code, "convert {case:?}");
        assert_eq!(ours.code, Some(1), "convert {case:?}");
        let first = |o: &Outcome| o.stderr.lines().next().unwrap_or_default().to_string();
        assert_eq!(first(&ours), first(&theirs), "convert {case:?}");
    }
}

/// `check` on an image whose backing file or external data file cannot be
/// opened: qemu-img cannot open the image, exits 1 and says why; qimg
/// says the same, in human and JSON output and with `-r all`.
#[test]
fn check_missing_backing_or_data_file_matches_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    q.create(&d.join("base.raw"), "raw", "", "1M");
    std::fs::create_dir(d.join("adir")).unwrap();
    let mk = |name: &str, backing: &str, fmt: &str| {
        run_ok(Command::new(&q.img).current_dir(d).args([
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, name, "1M",
        ]));
    };
    mk("missing.qcow2", "gone.qcow2", "qcow2");
    mk("dir.qcow2", "adir", "raw");
    mk("notqcow2.qcow2", "base.raw", "qcow2");
    std::fs::create_dir(d.join("sub")).unwrap();
    mk("sub/missing.qcow2", "gone.qcow2", "qcow2");
    // The data file is named relative to the working directory here and
    // the image lies in it, so both tools look for the same file.
    run_ok(Command::new(&q.img).current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=data.raw",
        "df.qcow2",
        "1M",
    ]));
    std::fs::remove_file(d.join("data.raw")).unwrap();
    for img in [
        "missing.qcow2",
        "dir.qcow2",
        "notqcow2.qcow2",
        "sub/missing.qcow2",
        "df.qcow2",
    ] {
        let before = std::fs::read(d.join(img)).unwrap();
        for extra in [&[][..], &["--output=json"], &["-r", "all"]] {
            let mut args = vec!["check"];
            args.extend_from_slice(extra);
            args.push(img);
            let (theirs, ours) = both(&q, d, &args, "nothing");
            assert_eq!(theirs.code, Some(1), "qemu-img {args:?}");
            assert_eq!(ours, theirs, "{args:?}");
        }
        assert_eq!(std::fs::read(d.join(img)).unwrap(), before, "{img}");
    }
}

/// qemu-io on `img` in `dir`: qemu opens a relative data file name from
/// the working directory.
fn io_in(q: &Qemu, dir: &Path, img: &str, cmds: &[&str]) {
    let mut cmd = Command::new(&q.io);
    cmd.current_dir(dir).args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_ok(cmd.arg(img));
}

/// `map` of a qcow2 image with an external data file, `data_file_raw` on
/// and off, over a data file with holes: the same JSON and human output
/// as qemu-img, including the case where qemu-img takes the image for
/// metadata-preallocated and reports the data file's holes as zero.
#[test]
fn map_through_data_files_matches_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let Some(fallocate) = tool("fallocate") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let punch = |file: &str, off: u64, len: u64| {
        run_ok(Command::new(&fallocate).current_dir(d).args([
            "-p",
            "-o",
            &off.to_string(),
            "-l",
            &len.to_string(),
            file,
        ]));
    };
    let mut images = Vec::new();
    for raw in ["off", "on"] {
        for prealloc in ["off", "metadata"] {
            let img = format!("df-{raw}-{prealloc}.qcow2");
            let data = format!("df-{raw}-{prealloc}.raw");
            run_ok(Command::new(&q.img).current_dir(d).args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={data},data_file_raw={raw},preallocation={prealloc}"),
                &img,
                "4M",
            ]));
            io_in(
                &q,
                d,
                &img,
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 1M 128k",
                    "write -z 2M 64k",
                    "write -P 0 3M 64k",
                ],
            );
            punch(&data, (1 << 20) + (64 << 10), 64 << 10);
            punch(&data, 3 << 20, 64 << 10);
            images.push(img);
        }
    }
    // An image file with far more refcounted clusters than it has
    // allocated (a large L1 table of zeroes, dug out as holes): qemu-img
    // then asks the data file for holes.
    run_ok(Command::new(&q.img).current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,data_file=big.raw",
        "big.qcow2",
        "64G",
    ]));
    io_in(
        &q,
        d,
        "big.qcow2",
        &[
            "write -P 0x11 0 16k",
            "write -z 64k 4k",
            "write -P 0x22 1M 64k",
        ],
    );
    run_ok(
        Command::new(&fallocate)
            .current_dir(d)
            .args(["-d", "big.qcow2"]),
    );
    punch("big.raw", 4096, 8192);
    punch("big.raw", 1 << 20, 64 << 10);
    images.push("big.qcow2".into());
    for img in &images {
        for extra in [&[][..], &["--output=json"]] {
            let mut args = vec!["map"];
            args.extend_from_slice(extra);
            args.push(img);
            let (theirs, ours) = both(&q, d, &args, "nothing");
            assert_eq!(theirs.code, Some(0), "qemu-img {args:?}");
            assert_eq!(ours, theirs, "{args:?}");
        }
    }
    // The holes show: zero data in the big image's map.
    let v: serde_json::Value =
        serde_json::from_slice(&run_ok(Command::new(&q.img).current_dir(d).args([
            "map",
            "--output=json",
            "big.qcow2",
        ])))
        .unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["zero"] == true && e["data"] == true),
        "{v}"
    );
}
