//! Image locking interoperable with QEMU: while qemu-nbd or a (TCG,
//! machine-less) qemu-system-x86_64 holds an image, every qimg verb that
//! writes refuses with qemu-img's message and exit status, and the file
//! stays byte-identical; reading verbs fail like qemu-img without `-U` and
//! go ahead with it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;

use qimg_tests::hold::Holder;
use qimg_tests::{qimg, run_ok, sha256_file, tool};

/// base.qcow2 <- held.qcow2 (1 MiB) in `d`.
fn images(d: &Path) {
    run_ok(
        qimg()
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]),
    );
    run_ok(
        qimg()
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "held.qcow2", "1M"]),
    );
    run_ok(
        qimg()
            .current_dir(d)
            .args(["create", "-q", "-f", "qcow2", "other.qcow2", "1M"]),
    );
}

/// The lines of a tool's stderr that say why it failed, without the
/// program name ("qimg: ", "qemu-img: ") and without warnings.
fn reason(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.contains("warning:") && !l.starts_with("Formatting '"))
        .map(|l| {
            l.strip_prefix("qimg: ")
                .or_else(|| l.strip_prefix("qemu-img: "))
                .unwrap_or(l)
                .to_string()
        })
        .collect()
}

/// Runs qimg `args` in `d`: refused, held.qcow2 unchanged, and the same
/// exit status and error lines as qemu-img's for the same command in the
/// same state (run first; it is refused too, so it changes nothing).
/// Without qemu-img (outside CI), the lines must name the lock `lock`.
fn refused(d: &Path, args: &[&str], lock: &str) {
    let before = sha256_file(&d.join("held.qcow2"));
    let out = qimg().current_dir(d).args(args).output().unwrap();
    let err = reason(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{args:?} should be refused\n{err:?}"
    );
    assert_eq!(
        before,
        sha256_file(&d.join("held.qcow2")),
        "{args:?} changed the image"
    );
    match tool("qemu-img") {
        Some(q) => {
            let theirs = Command::new(q).current_dir(d).args(args).output().unwrap();
            assert_eq!(
                before,
                sha256_file(&d.join("held.qcow2")),
                "qemu-img {args:?} changed the image (the holder does not lock?)"
            );
            assert_eq!(
                (out.status.code(), &err),
                (theirs.status.code(), &reason(&theirs.stderr)),
                "{args:?}: qimg's exit status and message differ from qemu-img's"
            );
        }
        None => {
            let code = if args[0] == "compare" { 2 } else { 1 };
            assert_eq!(out.status.code(), Some(code), "{args:?}\n{err:?}");
            assert!(
                err.iter()
                    .any(|l| l.ends_with(&format!("Failed to get {lock} lock")))
                    && err.contains(&"Is another process using the image [held.qcow2]?".into()),
                "{args:?}: unexpected message\n{err:?}"
            );
        }
    }
}

/// Every writing verb on the held image.
const WRITERS: &[&[&str]] = &[
    &["resize", "held.qcow2", "2M"],
    &["snapshot", "-c", "s1", "held.qcow2"],
    &["snapshot", "-d", "s1", "held.qcow2"],
    &["snapshot", "-a", "s1", "held.qcow2"],
    &["check", "-r", "all", "held.qcow2"],
    &["commit", "held.qcow2"],
    &[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "held.qcow2",
    ],
    &["rebase", "-b", "base.qcow2", "-F", "qcow2", "held.qcow2"],
    &["amend", "-o", "lazy_refcounts=on", "held.qcow2"],
    &["convert", "-O", "qcow2", "other.qcow2", "held.qcow2"],
    &["convert", "-n", "-O", "raw", "other.qcow2", "held.qcow2"],
    &["convert", "-O", "raw", "other.qcow2", "held.qcow2"],
    &["convert", "-n", "-O", "qcow2", "other.qcow2", "held.qcow2"],
    &["dd", "-O", "raw", "if=other.qcow2", "of=held.qcow2"],
    &["dd", "-O", "qcow2", "if=other.qcow2", "of=held.qcow2"],
    &["create", "-f", "qcow2", "held.qcow2", "1M"],
    &["create", "-f", "raw", "held.qcow2", "1M"],
];

/// Reading verbs that qemu-img runs with `-U`.
const READERS: &[&[&str]] = &[
    &["info", "held.qcow2"],
    &["map", "held.qcow2"],
    &["convert", "-O", "raw", "held.qcow2", "out.raw"],
    &["check", "held.qcow2"],
    &["snapshot", "-l", "held.qcow2"],
    &["compare", "held.qcow2", "other.qcow2"],
    &["measure", "-O", "qcow2", "held.qcow2"],
];

/// Writing verbs that read the held image as a new backing file.
const BACKING_READERS: &[&[&str]] =
    &[&["rebase", "-b", "held.qcow2", "-F", "qcow2", "other.qcow2"]];

fn with_u(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.insert(1, "-U".into());
    v
}

fn exercise(d: &Path) {
    for args in WRITERS {
        // Every writer asks for the write lock first, as qemu-img does.
        refused(d, args, "\"write\"");
    }
    for args in READERS {
        refused(d, args, "shared \"write\"");
        let u = with_u(args);
        run_ok(qimg().current_dir(d).args(&u));
    }
    for args in BACKING_READERS {
        refused(d, args, "shared \"write\"");
    }
    // `create -b` reads the backing file with force-share, as qemu-img
    // does: a running VM's image can be the base of a new overlay.
    run_ok(qimg().current_dir(d).args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "held.qcow2",
        "-F",
        "qcow2",
        "overlay.qcow2",
    ]));
}

#[test]
fn qemu_nbd_holding_an_image_locks_qimg_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let Some(_nbd) = Holder::nbd(&d.join("held.qcow2"), "qcow2", d) else {
        return;
    };
    exercise(d);
}

#[test]
fn a_vm_holding_an_image_locks_qimg_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let Some(_vm) = Holder::vm(&d.join("held.qcow2"), d) else {
        return;
    };
    exercise(d);
    // qemu-img agrees about `info`.
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let out = Command::new(qemu_img)
        .current_dir(d)
        .args(["info", "held.qcow2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"));
}

#[test]
fn locks_are_released_when_the_holder_goes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    {
        let Some(_nbd) = Holder::nbd(&d.join("held.qcow2"), "qcow2", d) else {
            return;
        };
        refused(d, &["resize", "held.qcow2", "2M"], "\"write\"");
    }
    // The daemon is gone (Holder waits for that); its descriptors may
    // take a moment more to close: wait until /proc/locks shows no lock on
    // the image.
    let id = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(d.join("held.qcow2")).unwrap();
        format!(" {}:{} ", dev_name(m.dev()), m.ino())
    };
    for _ in 0..400 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        if !locks.lines().any(|l| format!("{l} ").contains(&id)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    run_ok(qimg().current_dir(d).args(["resize", "held.qcow2", "2M"]));
}

#[test]
fn qemu_is_refused_while_qimg_writes() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    // qimg takes the write lock, then the test hook holds it.
    let mut child = qimg()
        .current_dir(d)
        .env("QIMG_TEST_PAUSE_AFTER_LOCK", "20")
        .args(["resize", "held.qcow2", "2M"])
        .spawn()
        .unwrap();
    // Wait (without a time bound on the result) until the lock shows.
    let mut seen = false;
    for _ in 0..400 {
        let out = Command::new(&qemu_img)
            .current_dir(d)
            .args(["info", "held.qcow2"])
            .output()
            .unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(seen, "qemu-img info never saw qimg's write lock");
    let out = Command::new(&qemu_io)
        .current_dir(d)
        .args(["-f", "qcow2", "-c", "write 0 512", "held.qcow2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-io wrote while qimg held the image"
    );
    assert!(err.contains("lock"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The lock bytes qemu-img 10.0.2 holds on each file at the peak of a
/// verb, from `strace -f -e trace=openat,fcntl,close qemu-img ARGS` in the
/// state [`chain`] makes (each `F_OFD_SETLK` replayed per file; every lock
/// is a read-type OFD lock): 100 + n held permissions, 200 + n unshared
/// ones (n: 0 consistent read, 1 write, 3 resize). `info` opens without
/// I/O (no byte 100); `create -b` and `rebase -u` read the backing file
/// with force-share (no lock at all); the verbs that write only the top
/// image still read-lock its backing file.
const QEMU_IMG_LOCKS: &[(&[&str], FileLocks)] = &[
    (&["info", "top.qcow2"], &[("top.qcow2", &[201, 203])]),
    (
        &["check", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", R)],
    ),
    (
        &["check", "-r", "all", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &["map", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", R)],
    ),
    (
        &["compare", "top.qcow2", "other.qcow2"],
        &[("base.qcow2", R), ("other.qcow2", R), ("top.qcow2", R)],
    ),
    (
        &["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"],
        &[("base.qcow2", R), ("out.qcow2", W), ("top.qcow2", R)],
    ),
    (
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "other.qcow2"],
        &[("base.qcow2", R), ("other.qcow2", W), ("top.qcow2", R)],
    ),
    (
        &["measure", "-O", "qcow2", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", R)],
    ),
    (
        &["snapshot", "-l", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", R)],
    ),
    (
        &["snapshot", "-c", "s2", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &["snapshot", "-d", "s1", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &["snapshot", "-a", "s1", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &["commit", "top.qcow2"],
        &[("base.qcow2", W), ("top.qcow2", W)],
    ),
    (
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
        &[("base.qcow2", R), ("other.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &[
            "rebase",
            "-u",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[("top.qcow2", W)],
    ),
    (
        &["amend", "-o", "lazy_refcounts=on", "top.qcow2"],
        &[("base.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &["resize", "top.qcow2", "2M"],
        &[("base.qcow2", R), ("top.qcow2", W)],
    ),
    (
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
        &[("new.qcow2", W)],
    ),
    (
        &["dd", "-O", "qcow2", "if=top.qcow2", "of=out.qcow2"],
        &[("base.qcow2", R), ("out.qcow2", W), ("top.qcow2", R)],
    ),
];
/// The lock bytes held, by file name.
type FileLocks = &'static [(&'static str, &'static [i64])];
/// A reader's bytes: consistent read held, write and resize not shared.
const R: &[i64] = &[100, 201, 203];
/// A writer's bytes: consistent read, write and resize held, write and
/// resize not shared.
const W: &[i64] = &[100, 101, 103, 201, 203];

/// base.qcow2 <- top.qcow2 (snapshot s1), other.qcow2, all 1 MiB.
fn chain(d: &Path) {
    for args in [
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"][..],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["create", "-q", "-f", "qcow2", "other.qcow2", "1M"],
        &["snapshot", "-c", "s1", "top.qcow2"],
    ] {
        run_ok(qimg().current_dir(d).args(args));
    }
}

/// `/proc/locks`' name of a device: major and minor in hex.
fn dev_name(dev: u64) -> String {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    format!("{major:02x}:{minor:02x}")
}

/// The OFD lock bytes held on each file of `d`, read live from
/// `/proc/locks` while qimg `args` pauses before exiting (its test hook
/// `QIMG_TEST_PAUSE_BEFORE_EXIT`, every lock still held).
fn qimg_locks(d: &Path, args: &[&str]) -> Vec<(String, Vec<i64>)> {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    let mut child = qimg()
        .current_dir(d)
        .env("QIMG_TEST_PAUSE_BEFORE_EXIT", "120")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let st = child.wait().unwrap();
            panic!("qimg {args:?} ended ({st}) before its pause:\n{said}");
        }
        if line.contains("qimg: test pause: locks held") {
            break;
        }
        said.push_str(&line);
    }
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let m = std::fs::metadata(d.join(&name)).unwrap();
        let id = format!("{}:{}", dev_name(m.dev()), m.ino());
        let mut bytes = Vec::new();
        for l in locks.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) == Some(&"OFDLCK") && f.get(5) == Some(&id.as_str()) {
                let start: i64 = f[6].parse().unwrap();
                let end: i64 = f[7].parse().unwrap();
                bytes.extend(start..=end);
            }
        }
        if !bytes.is_empty() {
            bytes.sort_unstable();
            out.push((name, bytes));
        }
    }
    out
}

#[test]
fn each_verb_holds_the_lock_bytes_qemu_img_holds() {
    let mut wrong = Vec::new();
    for (args, theirs) in QEMU_IMG_LOCKS {
        let dir = tempfile::tempdir().unwrap();
        chain(dir.path());
        let ours = qimg_locks(dir.path(), args);
        let theirs: Vec<(String, Vec<i64>)> = theirs
            .iter()
            .map(|(f, b)| (f.to_string(), b.to_vec()))
            .collect();
        if ours != theirs {
            wrong.push(format!(
                "{args:?}:\n  qimg     {ours:?}\n  qemu-img {theirs:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "lock bytes differ:\n{}", wrong.join("\n"));
}

/// A raw output file: qemu-img holds bytes 101, 103 and 203 while it
/// creates the file, then 100 and 101 (sharing everything) while it copies
/// (strace, as above). qimg holds a writer's bytes from creation to exit,
/// a superset of both: nobody else may write or resize a file it fills.
#[test]
fn a_raw_output_is_locked_at_least_as_qemu_img_locks_it() {
    for args in [
        &["convert", "-O", "raw", "top.qcow2", "out.raw"][..],
        &["dd", "-O", "raw", "if=top.qcow2", "of=out.raw"],
        &["create", "-f", "raw", "out.raw", "1M"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        chain(dir.path());
        let ours = qimg_locks(dir.path(), args);
        let out = ours
            .iter()
            .find(|(f, _)| f == "out.raw")
            .map(|(_, b)| b.clone())
            .unwrap_or_default();
        for phase in [&[101, 103, 203][..], &[100, 101]] {
            assert!(
                phase.iter().all(|b| out.contains(b)),
                "{args:?}: qimg holds {out:?} on out.raw, qemu-img {phase:?}"
            );
        }
    }
}

/// A raw LUKS1 volume, a LUKS2 volume and a LUKS2 detached header (for
/// data.img) in `d`, made by cryptsetup with cheap key slots (passphrase
/// in k1; k2 holds another), with header backups bk-NAME; `None` without
/// cryptsetup (a failure under CI).
fn luks_volumes(d: &Path) -> Option<()> {
    let cs = tool("cryptsetup")?;
    std::fs::write(d.join("k1"), b"pass1").unwrap();
    std::fs::write(d.join("k2"), b"pass2").unwrap();
    for (name, size) in [
        ("luks1.img", 8u64 << 20),
        ("luks2.img", 20 << 20),
        ("data.img", 4 << 20),
    ] {
        std::fs::File::create(d.join(name))
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    let cheap = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    for args in [
        &["--type", "luks1", "luks1.img"][..],
        &["--type", "luks2", "luks2.img"],
        &["--type", "luks2", "--header", "hdr.img", "data.img"],
    ] {
        run_ok(
            Command::new(&cs)
                .current_dir(d)
                .args(["luksFormat", "-q", "--key-file", "k1"])
                .args(cheap)
                .args(args),
        );
    }
    for name in ["luks1.img", "luks2.img", "hdr.img"] {
        let bk = format!("bk-{name}");
        run_ok(qimg().current_dir(d).args([
            "luks",
            "header-backup",
            "--header-backup-file",
            &bk,
            name,
        ]));
    }
    Some(())
}

/// While qemu-nbd holds a raw LUKS volume or a detached header, every qimg
/// verb that changes key slots or the header refuses with the lock message
/// and leaves the file byte-identical; reading verbs (dump, header-backup)
/// fail for the shared lock; `amend` fails exactly as qemu-img amend does.
#[test]
fn luks_verbs_are_refused_on_a_held_volume_or_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    if luks_volumes(d).is_none() {
        return;
    }
    for (held, vol) in [
        ("luks1.img", &["luks1.img"][..]),
        ("luks2.img", &["luks2.img"]),
        ("hdr.img", &["--header", "hdr.img", "data.img"]),
    ] {
        let Some(_nbd) = Holder::nbd(&d.join(held), "raw", d) else {
            return;
        };
        let bk = format!("bk-{held}");
        let cheap = ["--pbkdf-force-iterations", "1000", "--key-file", "k1"];
        let mut cmds: Vec<Vec<&str>> = Vec::new();
        for verb in ["add-key", "change-key"] {
            let mut c = vec!["luks", verb];
            c.extend(cheap);
            c.extend(vol);
            c.push("k2");
            cmds.push(c);
        }
        let mut c = vec!["luks", "remove-key", "-q", "--key-file", "k1"];
        c.extend(vol);
        c.push("k1");
        cmds.push(c);
        cmds.push(vec![
            "luks",
            "header-restore",
            "-q",
            "--header-backup-file",
            &bk,
            held,
        ]);
        let opts = format!("driver=luks,key-secret=s0,file.filename={held}");
        if held != "hdr.img" {
            cmds.push(vec![
                "amend",
                "--object",
                "secret,id=s0,file=k1",
                "--object",
                "secret,id=s1,file=k2",
                "-o",
                "state=active,new-secret=s1,iter-time=10",
                "--image-opts",
                &opts,
            ]);
        }
        let hint = format!("Is another process using the image [{held}]?");
        for args in &cmds {
            let before = sha256_file(&d.join(held));
            let out = qimg().current_dir(d).args(args).output().unwrap();
            let err = reason(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{args:?} should be refused\n{err:?}"
            );
            assert!(
                err.iter().any(|l| l.contains("Failed to get")) && err.contains(&hint),
                "{args:?}: unexpected message\n{err:?}"
            );
            assert_eq!(
                before,
                sha256_file(&d.join(held)),
                "{args:?} changed {held}"
            );
        }
        // qemu-img amend (LUKS1 only: qemu-img does not amend LUKS2).
        if held == "luks1.img" {
            if let Some(q) = tool("qemu-img") {
                let args = cmds.last().unwrap();
                let theirs = Command::new(q).current_dir(d).args(args).output().unwrap();
                let ours = qimg().current_dir(d).args(args).output().unwrap();
                assert_eq!(
                    (ours.status.code(), reason(&ours.stderr)),
                    (theirs.status.code(), reason(&theirs.stderr)),
                    "amend on a held LUKS1 volume: qimg and qemu-img differ"
                );
            }
        }
        for args in [
            vec!["luks", "dump", held],
            vec![
                "luks",
                "header-backup",
                "--header-backup-file",
                "new-bk",
                held,
            ],
        ] {
            let out = qimg().current_dir(d).args(&args).output().unwrap();
            let err = reason(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?} should fail\n{err:?}");
            assert!(
                err.iter()
                    .any(|l| l.ends_with("Failed to get shared \"write\" lock"))
                    && err.contains(&hint),
                "{args:?}: unexpected message\n{err:?}"
            );
            assert!(!d.join("new-bk").exists(), "{args:?} wrote a backup");
        }
    }
}
