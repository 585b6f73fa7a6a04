//! Leftovers of issue 19, each beside qemu-img 10.0.2: `-p` progress
//! lines of `commit`, `rebase` and `amend` on a pipe, `amend -t CACHE`,
//! and the verbs where qemu-img has no `-p` (`check`, `resize`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qimg_tests::qemu::Qemu;
use qimg_tests::{qimg_bin, run_ok};

fn out(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks `-p` output on a pipe as qemu-img prints it: pieces
/// `    (NN.NN/100%)` each ended by `\r`, the first `0.00`, never going
/// back, the last `100.00`, then `\n` and `trailer`.
fn assert_progress(what: &str, stdout: &[u8], trailer: &str) {
    let s = text(stdout);
    let body = s
        .strip_suffix(trailer)
        .unwrap_or_else(|| panic!("{what}: does not end with {trailer:?}: {s:?}"));
    let body = body
        .strip_suffix("\r\n")
        .unwrap_or_else(|| panic!("{what}: progress not ended by \\r\\n: {s:?}"));
    let mut pcts = Vec::new();
    for piece in body.split('\r') {
        let inner = piece
            .strip_prefix("    (")
            .and_then(|p| p.strip_suffix("/100%)"))
            .unwrap_or_else(|| panic!("{what}: bad piece {piece:?} in {s:?}"));
        let (int, frac) = inner
            .split_once('.')
            .unwrap_or_else(|| panic!("{what}: {piece:?}"));
        assert_eq!(frac.len(), 2, "{what}: {piece:?}");
        assert!(
            !int.is_empty() && int.chars().all(|c| c.is_ascii_digit()),
            "{what}: {piece:?}"
        );
        let p: f64 = inner.parse().unwrap();
        if let Some(&last) = pcts.last() {
            assert!(p >= last, "{what}: progress went back in {s:?}");
        }
        pcts.push(p);
    }
    assert_eq!(pcts.first(), Some(&0.0), "{what}: {s:?}");
    assert_eq!(pcts.last(), Some(&100.0), "{what}: {s:?}");
    assert!(pcts.len() >= 2, "{what}: {s:?}");
}

/// A 64 MiB base with data and a qcow2 overlay over it that holds 20 MiB
/// of its own, in `dir` under `name`; returns (base, overlay).
fn chain(q: &Qemu, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("{name}-base.qcow2"));
    let top = dir.join(format!("{name}-top.qcow2"));
    q.create(&base, "qcow2", "", "64M");
    q.io(&base, "qcow2", &["write -P 7 0 64M"]);
    let opts = format!("backing_file={},backing_fmt=qcow2", base.display());
    q.create(&top, "qcow2", &opts, "64M");
    q.io(&top, "qcow2", &["write -P 1 0 12M", "write -P 2 30M 8M"]);
    (base, top)
}

fn tools(q: &Qemu) -> [(&'static str, PathBuf); 2] {
    [("qemu-img", q.img.clone()), ("qimg", qimg_bin())]
}

#[test]
fn commit_p_prints_qemu_img_progress_lines() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut bases = Vec::new();
    for (name, bin) in tools(&q) {
        let (base, top) = chain(&q, dir.path(), name);
        let o = out(Command::new(&bin).args(["commit", "-p"]).arg(&top));
        assert!(o.status.success(), "{name}: {o:?}");
        assert!(o.stderr.is_empty(), "{name}: {}", text(&o.stderr));
        assert_progress(
            &format!("{name} commit -p"),
            &o.stdout,
            "Image committed.\n",
        );
        q.assert_clean(&base, name);
        q.assert_clean(&top, name);
        // Nothing left to commit: still 0% to 100%.
        let o = out(Command::new(&bin).args(["commit", "-p"]).arg(&top));
        assert!(o.status.success(), "{name}: {o:?}");
        assert_progress(
            &format!("{name} commit -p (empty)"),
            &o.stdout,
            "Image committed.\n",
        );
        // -q wins over -p.
        let o = out(Command::new(&bin).args(["commit", "-q", "-p"]).arg(&top));
        assert!(o.status.success() && o.stdout.is_empty(), "{name}: {o:?}");
        bases.push(base);
    }
    let cmp = out(Command::new(&q.img).arg("compare").args(&bases));
    assert_eq!(cmp.status.code(), Some(0), "{}", text(&cmp.stdout));
}

#[test]
fn rebase_p_prints_qemu_img_progress_lines() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new.qcow2");
    q.create(&new, "qcow2", "", "64M");
    q.io(&new, "qcow2", &["write -P 9 16M 4M"]);
    let mut tops = Vec::new();
    for (name, bin) in tools(&q) {
        let (base, top) = chain(&q, dir.path(), name);
        let o = out(Command::new(&bin)
            .args(["rebase", "-p", "-F", "qcow2", "-b"])
            .arg(&new)
            .arg(&top));
        assert!(o.status.success(), "{name}: {o:?}");
        assert!(o.stderr.is_empty(), "{name}: {}", text(&o.stderr));
        assert_progress(&format!("{name} rebase -p"), &o.stdout, "");
        q.assert_clean(&top, name);
        // -u: 0% and 100% only.
        let o = out(Command::new(&bin)
            .args(["rebase", "-p", "-u", "-F", "qcow2", "-b"])
            .arg(&new)
            .arg(&top));
        assert!(o.status.success(), "{name}: {o:?}");
        assert_eq!(
            text(&o.stdout),
            "    (0.00/100%)\r    (100.00/100%)\r\n",
            "{name} rebase -p -u"
        );
        // Back to standalone, quietly.
        let o = out(Command::new(&bin)
            .args(["rebase", "-q", "-p", "-b", ""])
            .arg(&top));
        assert!(o.status.success() && o.stdout.is_empty(), "{name}: {o:?}");
        drop(base);
        tops.push(top);
    }
    let cmp = out(Command::new(&q.img).arg("compare").args(&tops));
    assert_eq!(cmp.status.code(), Some(0), "{}", text(&cmp.stdout));
}

#[test]
fn amend_p_prints_qemu_img_progress_lines() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, bin) in tools(&q) {
        let img = dir.path().join(format!("{name}.qcow2"));
        q.create(&img, "qcow2", "", "16M");
        q.io(&img, "qcow2", &["write -P 1 0 1M"]);
        for opts in ["lazy_refcounts=on", "compat=0.10", "compat=1.1"] {
            let o = out(Command::new(&bin)
                .args(["amend", "-p", "-o", opts])
                .arg(&img));
            assert!(o.status.success(), "{name} {opts}: {o:?}");
            assert_progress(&format!("{name} amend -p -o {opts}"), &o.stdout, "");
            q.assert_clean(&img, name);
        }
        let o = out(Command::new(&bin)
            .args(["amend", "-q", "-p", "-o", "lazy_refcounts=off"])
            .arg(&img));
        assert!(o.status.success() && o.stdout.is_empty(), "{name}: {o:?}");
    }
}

const MODES: [&str; 6] = [
    "none",
    "off",
    "directsync",
    "writethrough",
    "writeback",
    "unsafe",
];

/// `amend -t MODE` of qcow2 options on twin images in /tmp: qemu-img and
/// qimg succeed or fail alike in every mode, and the results are
/// check-clean and equal.
#[test]
fn amend_t_cache_modes_on_qcow2_options() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let imgs: Vec<PathBuf> = tools(&q)
        .iter()
        .map(|(name, _)| {
            let img = dir.path().join(format!("{name}.qcow2"));
            q.create(&img, "qcow2", "", "64M");
            q.io(
                &img,
                "qcow2",
                &["write -P 1 0 3M", "write -c -P 3 8M 64k", "write -z 20M 1M"],
            );
            img
        })
        .collect();
    let steps = [
        "lazy_refcounts=on",
        "compat=0.10",
        "compat=1.1",
        "refcount_bits=64",
        "size=96M",
        "refcount_bits=16,lazy_refcounts=off",
    ];
    for (i, opts) in steps.iter().enumerate() {
        let mode = MODES[i % MODES.len()];
        let codes: Vec<Option<i32>> = tools(&q)
            .iter()
            .zip(&imgs)
            .map(|((name, bin), img)| {
                let o = out(Command::new(bin)
                    .args(["amend", "-t", mode, "-o", opts])
                    .arg(img));
                assert!(o.stdout.is_empty(), "{name}: {o:?}");
                if o.status.success() {
                    assert!(o.stderr.is_empty(), "{name}: {o:?}");
                    q.assert_clean(img, &format!("{name} amend -t {mode} -o {opts}"));
                }
                o.status.code()
            })
            .collect();
        assert_eq!(codes[0], codes[1], "amend -t {mode} -o {opts}");
        // /tmp is a disk filesystem: O_DIRECT works there.
        assert_eq!(codes[0], Some(0), "amend -t {mode} -o {opts}");
    }
    let cmp = out(Command::new(&q.img).arg("compare").args(&imgs));
    assert_eq!(cmp.status.code(), Some(0), "{}", text(&cmp.stdout));
    let infos: Vec<serde_json::Value> = imgs
        .iter()
        .map(|p| q.info(p)["format-specific"].clone())
        .collect();
    assert_eq!(infos[0], infos[1]);
}

/// `amend -t BOGUS`: qemu-img's message and exit code 1, and the file
/// stays byte-identical (qcow2 options and key slots alike).
#[test]
fn amend_t_unknown_mode_is_refused_as_qemu_img_refuses_it() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    q.create(&img, "qcow2", "", "16M");
    q.io(&img, "qcow2", &["write -P 1 0 1M"]);
    let before = std::fs::read(&img).unwrap();
    for (name, bin) in tools(&q) {
        for (mode, opts) in [
            ("bogus", "compat=0.10"),
            ("NONE", "lazy_refcounts=on"),
            ("", "compat=0.10"),
            ("writeback", "encrypt.state=active,encrypt.new-secret=s1"),
        ] {
            let o = out(Command::new(&bin)
                .args(["amend", "-t", mode, "-o", opts])
                .arg(&img));
            assert_eq!(o.status.code(), Some(1), "{name} -t {mode:?}: {o:?}");
            let err = text(&o.stderr);
            if mode != "writeback" {
                let want = format!("Invalid cache option: {mode}\n");
                assert!(
                    err.lines().count() == 1 && err.ends_with(&want),
                    "{name} -t {mode:?}: {err:?}"
                );
            }
            assert_eq!(std::fs::read(&img).unwrap(), before, "{name} -t {mode:?}");
        }
    }
}

/// `amend -t MODE` of key slots: a new passphrase added by qimg to a
/// raw LUKS1 volume and to an encrypted qcow2 image opens them (judged
/// by cryptsetup and qemu-img), the same as qemu-img's own amend.
#[test]
fn amend_t_cache_modes_on_key_slots() {
    let Some(q) = Qemu::find() else { return };
    let Some(cs) = qimg_tests::cryptsetup::Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let s0 = "secret,id=s0,data=abc";
    let s1 = "secret,id=s1,data=def";
    let key1 = dir.path().join("key1");
    std::fs::write(&key1, b"def").unwrap();
    for ((name, bin), mode) in tools(&q)
        .into_iter()
        .flat_map(|t| [(t.clone(), "none"), (t, "directsync")])
    {
        // Raw LUKS1 (qemu-img's own format).
        let vol = dir.path().join(format!("{name}-{mode}.luks"));
        run_ok(
            Command::new(&q.img)
                .args(["create", "-q", "-f", "luks", "--object", s0])
                .args(["-o", "key-secret=s0,iter-time=10"])
                .arg(&vol)
                .arg("16M"),
        );
        let o = out(Command::new(&bin)
            .args(["amend", "-t", mode, "--object", s0, "--object", s1])
            .args(["-o", "state=active,new-secret=s1,iter-time=10"])
            .arg("--image-opts")
            .arg(format!(
                "driver=luks,file.filename={},key-secret=s0",
                vol.display()
            )));
        assert!(o.status.success(), "{name} -t {mode}: {o:?}");
        assert!(
            cs.opens(&vol, None, &key1, Some(1)),
            "{name} -t {mode}: the new key does not open slot 1"
        );
        // LUKS in qcow2.
        let img = dir.path().join(format!("{name}-{mode}.qcow2"));
        q.create_encrypted(
            &img,
            s0,
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &[],
            "16M",
        );
        q.io_encrypted(s0, "qcow2", &img, &["write -P 5 0 1M"]);
        let o = out(Command::new(&bin)
            .args(["amend", "-t", mode, "--object", s0, "--object", s1])
            .args([
                "-o",
                "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
            ])
            .arg("--image-opts")
            .arg(format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=s0",
                img.display()
            )));
        assert!(o.status.success(), "{name} -t {mode}: {o:?}");
        q.assert_check_clean(
            &["--object", s1, "--image-opts"],
            format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=s1",
                img.display()
            ),
            &format!("{name} amend -t {mode}"),
        );
    }
}

/// qemu-img 10.0.2 has no `-p` on `check` and `resize`: both refuse it
/// with exit code 1 and leave the image as it was.
#[test]
fn check_and_resize_have_no_p() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    q.create(&img, "qcow2", "", "16M");
    let before = std::fs::read(&img).unwrap();
    for (name, bin) in tools(&q) {
        for args in [&["check", "-p"][..], &["resize", "-p"][..]] {
            let mut c = Command::new(&bin);
            c.args(args).arg(&img);
            if args[0] == "resize" {
                c.arg("+1M");
            }
            let o = out(&mut c);
            assert_eq!(o.status.code(), Some(1), "{name} {args:?}: {o:?}");
            assert!(o.stdout.is_empty(), "{name} {args:?}: {o:?}");
            assert!(
                text(&o.stderr).contains("-p") || text(&o.stderr).contains("'p'"),
                "{name} {args:?}: {}",
                text(&o.stderr)
            );
            assert_eq!(std::fs::read(&img).unwrap(), before, "{name} {args:?}");
        }
    }
}
