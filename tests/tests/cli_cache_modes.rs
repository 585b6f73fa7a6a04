//! Cache modes (`-t`, `-T`) beside qemu-img 10.0.2: the names it takes and
//! its errors for the others; copies in every mode on a filesystem with
//! `O_DIRECT` (checked and compared by qemu-img); the same failure, at
//! open, on one without (a ramfs: tmpfs has `O_DIRECT` since Linux 6.6);
//! and, under strace, the same `O_DIRECT` opens and `fdatasync` pattern.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::qemu::{pattern, write_tmp, Qemu};
use qimg_tests::{find_on_path, in_ci, qimg, run_ok, tool};

const MODES: [&str; 6] = [
    "none",
    "off",
    "directsync",
    "writethrough",
    "writeback",
    "unsafe",
];

/// Exit status and standard error without the program's name prefix.
fn outcome(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("warning: secret"))
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("qimg: "))
                .unwrap_or(l)
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    (out.status.code().unwrap_or(-1), err)
}

/// Source images in `d`: a raw file with data, zeroes and a hole, its
/// qcow2 copy, and a qcow2 overlay over the copy.
fn sources(q: &Qemu, d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let raw = write_tmp(d, "src.raw", &pattern(3 << 20, 5, 7));
    let qcow = d.join("src.qcow2");
    q.convert(&["-O", "qcow2"], &raw, &qcow);
    let top = d.join("top.qcow2");
    q.create(
        &top,
        "qcow2",
        "backing_file=src.qcow2,backing_fmt=qcow2",
        "3M",
    );
    q.io(&top, "qcow2", &["write -P 0x5a 64k 200k"]);
    (raw, qcow, top)
}

#[test]
fn bad_modes_fail_as_qemu_img_does() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, qcow, top) = sources(&q, d);
    let out = d.join("out.raw");
    let (raw, qcow, top, out) = (
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
        top.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let lines: Vec<Vec<&str>> = vec![
        vec!["convert", "-t", "bogus", "-O", "raw", raw, out],
        vec!["convert", "-t", "NONE", "-O", "raw", raw, out],
        vec!["convert", "-T", "bogus", "-O", "raw", raw, out],
        vec!["convert", "--source-cache", "bogus", "-O", "raw", raw, out],
        vec!["commit", "-t", "bogus", top],
        vec!["commit", "--cache", "x", top],
        vec![
            "rebase",
            "-t",
            "bogus",
            "-u",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            top,
        ],
        vec![
            "rebase",
            "-T",
            "bogus",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            top,
        ],
        vec![
            "rebase",
            "--backing-cache",
            "x",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            top,
        ],
        vec!["check", "-T", "bogus", qcow],
        vec!["check", "--cache", "write-back", qcow],
        vec!["compare", "-T", "bogus", qcow, raw],
        vec!["compare", "--cache", "", qcow, raw],
    ];
    let before = std::fs::read(top).unwrap();
    for args in &lines {
        let want = outcome(Command::new(&q.img).args(args));
        // qemu-img convert creates and sizes the output before it reads
        // -t; qimg refuses first.
        let _ = std::fs::remove_file(out);
        let got = outcome(qimg().args(args));
        assert_eq!(got, want, "{args:?}");
        assert_ne!(want.0, 0, "{args:?}");
        assert!(
            !Path::new(out).exists(),
            "{args:?}: qimg created the output"
        );
    }
    assert!(
        std::fs::read(top).unwrap() == before,
        "a refused verb changed the image"
    );
    // Every name qemu-img takes, on each verb (on ext4 or any filesystem
    // with O_DIRECT): accepted by both.
    for m in MODES {
        for args in [
            vec!["check", "-q", "-T", m, qcow],
            vec!["compare", "-q", "-T", m, qcow, raw],
        ] {
            let want = outcome(Command::new(&q.img).args(&args));
            assert_eq!(outcome(qimg().args(&args)), want, "{args:?}");
        }
    }
}

/// A copy in every mode, each way (`-t` and `-T`), to raw, qcow2 (plain,
/// compressed, with an external data file) and LUKS on a filesystem that
/// has `O_DIRECT` (the default temporary folder: ext4 here): the result
/// passes `qemu-img check` and compares equal to the source.
#[test]
fn convert_in_every_mode_gives_the_same_image() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, _qcow, top) = sources(&q, d);
    let secret = "secret,id=s0,data=pass";
    let data_file = format!("data_file={}", d.join("data.bin").display());
    for m in MODES {
        for (i, (src, extra)) in [
            (&raw, vec!["-O", "raw"]),
            (&top, vec!["-O", "qcow2"]),
            (&top, vec!["-O", "qcow2", "-c"]),
            (&raw, vec!["-O", "qcow2", "-o", &data_file]),
            (
                &top,
                vec![
                    "-O",
                    "luks",
                    "--object",
                    secret,
                    "-o",
                    "key-secret=s0,iter-time=10",
                ],
            ),
        ]
        .into_iter()
        .enumerate()
        {
            for flag in ["-t", "-T"] {
                let out = d.join(format!("out-{m}-{i}{flag}"));
                let _ = std::fs::remove_file(&out);
                run_ok(
                    qimg()
                        .arg("convert")
                        .args([flag, m])
                        .args(&extra)
                        .arg(src)
                        .arg(&out),
                );
                let what = format!("convert {flag} {m} {extra:?}");
                if extra.contains(&"luks") {
                    let opts = format!("driver=luks,key-secret=s0,file.filename={}", out.display());
                    let first = format!("driver=qcow2,file.filename={}", src.display());
                    run_ok(Command::new(&q.img).args([
                        "compare",
                        "-q",
                        "--object",
                        secret,
                        "--image-opts",
                        &first,
                        &opts,
                    ]));
                } else {
                    if extra.contains(&"qcow2") {
                        q.assert_clean(&out, &what);
                    }
                    run_ok(
                        Command::new(&q.img)
                            .args(["compare", "-q"])
                            .arg(src)
                            .arg(&out),
                    );
                }
                let _ = std::fs::remove_file(&out);
            }
        }
        // -n into an existing raw file, and both flags at once.
        let out = d.join("existing.raw");
        std::fs::write(&out, vec![0xeeu8; 3 << 20]).unwrap();
        run_ok(
            qimg()
                .args(["convert", "-n", "-t", m, "-T", m, "-O", "raw"])
                .arg(&raw)
                .arg(&out),
        );
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap(),
            "-n -t {m}"
        );
    }
}

/// A folder on a filesystem without `O_DIRECT`: /dev/shm where it refuses
/// it (tmpfs before Linux 6.6), else a ramfs mounted for the test (needs
/// root). Unmounted on drop.
struct NoDirect {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl NoDirect {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn find() -> Option<Self> {
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            if !has_o_direct(dir.path()) {
                return Some(Self {
                    dir,
                    mounted: false,
                });
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = find_on_path("mount").is_some_and(|m| {
            Command::new(m)
                .args(["-t", "ramfs", "ramfs"])
                .arg(dir.path())
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if ok && !has_o_direct(dir.path()) {
            return Some(Self { dir, mounted: true });
        }
        let what = "a filesystem without O_DIRECT (/dev/shm has it on Linux 6.6 and later, \
                    and mounting a ramfs needs root)";
        if in_ci() {
            panic!("{what} is missing, and CI=true makes that a failure");
        }
        eprintln!("SKIPPED: {what} is missing");
        None
    }
}

impl Drop for NoDirect {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }
}

fn has_o_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = dir.join("probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// Every verb asked for `none` or `directsync` on a file there fails as
/// qemu-img does: same message and status, at open (qimg leaves existing
/// files byte-identical and creates nothing: qemu-img creates or empties
/// the output before its open fails); the other modes work there.
#[test]
fn no_o_direct_fails_as_qemu_img_does() {
    let Some(q) = Qemu::find() else { return };
    let Some(nd) = NoDirect::find() else { return };
    let r = nd.path();
    let dir = tempfile::tempdir().unwrap();
    let (raw, qcow, _) = sources(&q, dir.path());
    let data = std::fs::read(&raw).unwrap();
    // Run each command line on fresh copies, once per program, and compare.
    let setup = || {
        std::fs::write(r.join("in.raw"), &data).unwrap();
        std::fs::copy(&qcow, r.join("in.qcow2")).unwrap();
        std::fs::write(r.join("old.raw"), b"old contents").unwrap();
        let _ = std::fs::remove_file(r.join("new.raw"));
        let _ = std::fs::remove_file(r.join("new.qcow2"));
        let _ = std::fs::remove_file(r.join("top.qcow2"));
        run_ok(
            Command::new(&q.img)
                .args([
                    "create", "-q", "-f", "qcow2", "-b", "in.qcow2", "-F", "qcow2",
                ])
                .arg(r.join("top.qcow2")),
        );
    };
    let p = |n: &str| r.join(n).to_str().unwrap().to_string();
    let local = raw.to_str().unwrap().to_string();
    let out = dir.path().join("out.raw").to_str().unwrap().to_string();
    for m in ["none", "off", "directsync"] {
        let lines: Vec<Vec<String>> = [
            vec!["convert", "-t", m, "-O", "raw", &local, &p("new.raw")],
            vec!["convert", "-t", m, "-O", "qcow2", &local, &p("new.qcow2")],
            vec!["convert", "-t", m, "-O", "raw", &local, &p("old.raw")],
            vec!["convert", "-n", "-t", m, "-O", "raw", &local, &p("old.raw")],
            vec!["convert", "-T", m, "-O", "raw", &p("in.raw"), &out],
            vec!["convert", "-T", m, "-O", "raw", &p("top.qcow2"), &out],
            vec!["check", "-T", m, &p("in.qcow2")],
            vec!["compare", "-T", m, &p("in.qcow2"), &local],
            vec!["commit", "-t", m, &p("top.qcow2")],
            vec![
                "rebase",
                "-t",
                m,
                "-u",
                "-b",
                "in.qcow2",
                "-F",
                "qcow2",
                &p("top.qcow2"),
            ],
        ]
        .iter()
        .map(|l| l.iter().map(|s| s.to_string()).collect())
        .collect();
        for args in &lines {
            setup();
            let want = outcome(Command::new(&q.img).args(args));
            setup();
            let _ = std::fs::remove_file(&out);
            let files: BTreeMap<String, Vec<u8>> = ["in.raw", "in.qcow2", "old.raw", "top.qcow2"]
                .iter()
                .map(|n| (n.to_string(), std::fs::read(r.join(n)).unwrap()))
                .collect();
            let got = outcome(qimg().args(args));
            assert_eq!(got, want, "{args:?}");
            assert_ne!(got.0, 0, "{args:?}");
            assert!(
                got.1.ends_with("filesystem does not support O_DIRECT"),
                "{args:?}: {}",
                got.1
            );
            for (n, before) in &files {
                assert!(
                    std::fs::read(r.join(n)).unwrap() == *before,
                    "{args:?} changed {n}"
                );
            }
            let left: Vec<_> = std::fs::read_dir(r)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !files.contains_key(n))
                .collect();
            assert!(left.is_empty(), "{args:?} left {left:?}");
            assert!(!Path::new(&out).exists(), "{args:?} wrote {out}");
        }
    }
    // The page-cache modes work there.
    for m in ["writethrough", "writeback", "unsafe"] {
        setup();
        run_ok(
            qimg()
                .args(["convert", "-t", m, "-T", m, "-O", "qcow2"])
                .arg(p("in.raw"))
                .arg(p("new.qcow2")),
        );
        q.assert_clean(&r.join("new.qcow2"), m);
        run_ok(
            Command::new(&q.img)
                .args(["compare", "-q"])
                .arg(&raw)
                .arg(p("new.qcow2")),
        );
        run_ok(qimg().args(["commit", "-q", "-t", m]).arg(p("top.qcow2")));
    }
}

/// What strace shows of one convert: whether the source and the
/// destination were opened (or switched) with `O_DIRECT`, whether the
/// destination was synced at all, and whether it was synced while the
/// copy was still writing (between its first and its last write: qemu-img
/// has several writes in flight, so not strictly after each one).
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    src_direct: bool,
    dst_direct: bool,
    synced: bool,
    synced_between_writes: bool,
}

fn trace(strace: &Path, program: &Path, args: &[&str], src: &str, dst: &str) -> Trace {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("t");
    run_ok(
        Command::new(strace)
            .args(["-ff", "-ttt", "-qq", "-e"])
            .arg("trace=openat,open,fcntl,fsync,fdatasync,pwrite64,pwritev,pwritev2,write")
            .arg("-o")
            .arg(&prefix)
            .arg(program)
            .args(args),
    );
    // One file per thread, merged by time stamp.
    let mut lines: Vec<(f64, String)> = Vec::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for l in text.lines() {
            if let Some((t, rest)) = l.split_once(' ') {
                if let Ok(t) = t.parse::<f64>() {
                    lines.push((t, rest.to_string()));
                }
            }
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut fds: BTreeMap<String, String> = BTreeMap::new();
    let mut t = Trace {
        src_direct: false,
        dst_direct: false,
        synced: false,
        synced_between_writes: false,
    };
    // Writes so far, and how many there were at the last sync.
    let mut writes = 0usize;
    let mut at_last_sync = 0usize;
    for (_, l) in &lines {
        let Some((call, args)) = l.split_once('(') else {
            continue;
        };
        let ret = l
            .rsplit_once("= ")
            .map(|(_, r)| r.split(' ').next().unwrap_or(""));
        let fd = args.split([',', ')']).next().unwrap_or("").to_string();
        match call {
            "openat" | "open" => {
                let path = args.split('"').nth(1).unwrap_or("");
                let Some(ret) = ret.filter(|r| !r.starts_with('-')) else {
                    continue;
                };
                fds.insert(ret.to_string(), path.to_string());
                let direct = args.contains("O_DIRECT");
                if path == src && direct {
                    t.src_direct = true;
                }
                if path == dst && direct {
                    t.dst_direct = true;
                }
            }
            "fcntl"
                if args.contains("F_SETFL")
                    && args.contains("O_DIRECT")
                    && fds.get(&fd).is_some_and(|p| p == dst) =>
            {
                t.dst_direct = true;
            }
            "fsync" | "fdatasync" if fds.get(&fd).is_some_and(|p| p == dst) => {
                t.synced = true;
                at_last_sync = writes;
            }
            "pwrite64" | "pwritev" | "pwritev2" | "write"
                if fds.get(&fd).is_some_and(|p| p == dst) =>
            {
                if at_last_sync > 0 {
                    t.synced_between_writes = true;
                }
                writes += 1;
            }
            _ => {}
        }
    }
    assert!(
        writes > 1,
        "{program:?}: {writes} writes to {dst} in the trace"
    );
    t
}

/// `convert` in every mode (and with none given) under strace: qimg opens
/// with `O_DIRECT` and syncs exactly where qemu-img does.
#[test]
fn strace_shows_the_same_opens_and_syncs() {
    let Some(q) = Qemu::find() else { return };
    let Some(strace) = tool("strace") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Data with gaps, so that there are several writes.
    let mut data = vec![0u8; 8 << 20];
    for (i, chunk) in (1u8..).zip(data.chunks_mut(1 << 20)) {
        if i % 3 != 2 {
            chunk.fill(i);
        }
    }
    let src = write_tmp(d, "src.raw", &data);
    let src = src.to_str().unwrap();
    let dst = d.join("dst.raw");
    let dst = dst.to_str().unwrap();
    let mut modes: Vec<Option<&str>> = MODES.iter().copied().map(Some).collect();
    modes.push(None);
    for m in modes {
        let mut args = vec!["convert", "-O", "raw"];
        if let Some(m) = m {
            args.extend(["-t", m, "-T", m]);
        }
        args.extend([src, dst]);
        let _ = std::fs::remove_file(dst);
        let want = trace(&strace, &q.img, &args, src, dst);
        // What qemu-img 10.0.2 does (so that a trace read wrong cannot
        // pass): O_DIRECT for none and directsync, a sync after each
        // write for directsync and writethrough, none at all for unsafe
        // (convert's default -t).
        let direct = matches!(m, Some("none" | "off" | "directsync"));
        let each = matches!(m, Some("directsync" | "writethrough"));
        let expected = Trace {
            src_direct: direct,
            dst_direct: direct,
            synced: !matches!(m, None | Some("unsafe")),
            synced_between_writes: each,
        };
        assert_eq!(want, expected, "qemu-img, {m:?}");
        let _ = std::fs::remove_file(dst);
        let got = trace(&strace, &qimg_tests::qimg_bin(), &args, src, dst);
        assert_eq!(got, want, "{m:?}");
        assert!(std::fs::read(dst).unwrap() == data, "{m:?}");
    }
}
