//! Leftovers of issue 19, each beside qemu-img 10.0.2: `-p` progress
//! lines of `commit`, `rebase` and `amend` on a pipe, `amend -t CACHE`,
//! and the verbs where qemu-img has no `-p` (`check`, `resize`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qimg_tests::qemu::Qemu;
use qimg_tests::qimg_bin;

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
