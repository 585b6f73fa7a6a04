//! End to end: the built `qimg` driven through every verb, compared with
//! qemu-img where both tools have the verb. The verb suites (`cli_*.rs`)
//! go deep into one verb each; this file is the one place where a reader
//! sees every verb exercised, and it covers what those suites do not: the
//! help texts, completions and man page, the convert options `-S`, `-B`,
//! `-n --target-is-zero`, secrets given in base64 and on standard input,
//! a passphrase asked twice by `create`, and how every verb fails on a
//! missing file, a directory, a truncated image and a wrong passphrase.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qimg_tests::qemu::{encrypted_image_opts, pattern, write_tmp, Qemu};
use qimg_tests::{
    assert_json_agrees, json_of, qimg, qimg_bin, qimg_create_luks, qimg_header_backup,
    qimg_header_restore, qimg_luks, qimg_luks_dump, qimg_on_pty, run_ok, tool,
};

/// Top-level verbs every user reaches for (the tests below take the list
/// from `qimg --help` and insist it holds at least these).
const VERBS: &[&str] = &[
    "check",
    "completions",
    "info",
    "map",
    "convert",
    "amend",
    "luks",
    "resize",
    "compare",
    "measure",
    "dd",
    "snapshot",
    "rebase",
    "commit",
    "create",
];

/// `qimg luks` subcommands, with cryptsetup's meaning.
const LUKS_VERBS: &[&str] = &[
    "dump",
    "add-key",
    "remove-key",
    "change-key",
    "header-backup",
    "header-restore",
];

/// The passphrase of the secret tests; it must never be printed.
const SECRET: &str = "e2e-Secret-Passphrase-31337";

fn out_of(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The verbs `qimg --help` lists under "Commands:" (not `help`).
fn listed_verbs(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A long summary wraps onto deeper-indented lines.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|v| v != "help")
        .collect()
}

/// Every top-level verb qimg has, from its own help (so a verb added
/// later, such as `check`, is tested too).
fn all_verbs() -> Vec<String> {
    let out = out_of(qimg().arg("--help"));
    assert!(out.status.success());
    let verbs = listed_verbs(&text(&out.stdout));
    for v in VERBS {
        assert!(verbs.iter().any(|l| l == v), "`qimg --help` lacks {v}");
    }
    verbs
}

#[test]
fn every_verb_has_help_and_shows_up_in_completions_and_the_man_page() {
    let top = text(&out_of(qimg().arg("--help")).stdout);
    let verbs = all_verbs();
    // Each listed verb has a one-line description beside it.
    for line in top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
    {
        assert!(line.split_whitespace().count() > 1, "no summary: {line}");
    }
    let luks = text(&out_of(qimg().args(["luks", "--help"])).stdout);
    let luks_verbs = listed_verbs(&luks);
    assert_eq!(luks_verbs, LUKS_VERBS, "{luks}");
    let mut invocations: Vec<Vec<String>> = verbs.iter().map(|v| vec![v.clone()]).collect();
    invocations.extend(LUKS_VERBS.iter().map(|v| vec!["luks".into(), (*v).into()]));
    for words in &invocations {
        let out = out_of(qimg().args(words).arg("--help"));
        let help = text(&out.stdout);
        assert!(out.status.success(), "{words:?}: {}", text(&out.stderr));
        let usage = format!("Usage: qimg {}", words.join(" "));
        assert!(help.contains(&usage), "{words:?}:\n{help}");
        // The first line says what the verb does, the way qimg --help does.
        let first = help.lines().next().unwrap_or_default();
        assert!(first.len() > 10 && !first.starts_with("Usage"), "{help}");
        // Every argument and option comes with its explanation: an entry
        // line is followed by an indented description or carries one.
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let entry = l.starts_with("  ")
                && !l.starts_with("   ")
                && matches!(l.trim_start().chars().next(), Some('-' | '<' | '['));
            if !entry || words.first().is_some_and(|w| w == "luks") && l.contains("<COMMAND>") {
                continue;
            }
            let inline = l.trim().contains("  ");
            let below = lines
                .get(i + 1)
                .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
            assert!(inline || below, "{words:?}: no help for `{}`", l.trim());
        }
    }
    // Completions for the usual shells name every verb and subverb.
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = out_of(qimg().args(["completions", shell]));
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        for v in verbs
            .iter()
            .map(String::as_str)
            .chain(LUKS_VERBS.iter().copied())
        {
            assert!(script.contains(v), "{shell} completion lacks {v}");
        }
    }
    // The man page `cargo xtask man` writes is `qimg man`'s output.
    let out = out_of(qimg().arg("man"));
    assert!(out.status.success());
    let man = text(&out.stdout);
    assert!(man.starts_with(".ie") || man.contains(".TH qimg"), "{man}");
    for v in &verbs {
        assert!(
            man.contains(&format!("qimg\\-{v}")) || man.contains(v.as_str()),
            "man page lacks {v}"
        );
    }
    // `qimg man DIR` (what `cargo xtask man` runs) adds a page per verb,
    // each with the verb's options.
    let dir = tempfile::tempdir().unwrap();
    let out = out_of(qimg().arg("man").arg(dir.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for words in &invocations {
        let page = dir.path().join(format!("qimg-{}.1", words.join("-")));
        let roff =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(roff.contains(".SH OPTIONS"), "{}", page.display());
    }
    let convert = std::fs::read_to_string(dir.path().join("qimg-convert.1")).unwrap();
    assert!(convert.contains("target\\-is\\-zero"), "{convert}");
    assert!(dir.path().join("qimg.1").is_file());
}

/// `qimg ARGS` and `qemu-img ARGS` with `--output json`, compared key by
/// key; returns how many values agreed.
fn json_agrees(q: &Qemu, args: &[&str], file: &Path) -> usize {
    let ours = json_of(qimg().args(args).args(["--output", "json"]).arg(file));
    let theirs = json_of(
        Command::new(&q.img)
            .args(args)
            .arg("--output=json")
            .arg(file),
    );
    let n = assert_json_agrees(&ours, &theirs, &format!("{args:?}"));
    assert!(n > 0, "{args:?}: nothing compared");
    n
}

/// Exit code of `qemu-img compare ARGS` (the judge of content equality).
fn qemu_compare(q: &Qemu, a: &Path, b: &Path) -> i32 {
    out_of(Command::new(&q.img).args(["compare", "-q"]).arg(a).arg(b))
        .status
        .code()
        .unwrap()
}

#[test]
fn every_verb_agrees_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n);
    // create + data written by qemu-io.
    let a = p("a.qcow2");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&a)
            .arg("4M"),
    );
    q.io(
        &a,
        "qcow2",
        &[
            "write -P 0x11 0 192k",
            "write -z 1M 64k",
            "write -P 0x22 3M 64k",
        ],
    );
    // info, map, measure: qemu-img's JSON, key for key.
    assert!(json_agrees(&q, &["info"], &a) >= 8);
    assert!(json_agrees(&q, &["info", "-U", "-f", "qcow2"], &a) >= 8);
    // -f overrides detection: a qcow2 file read as raw is its bytes.
    let as_raw = json_of(
        qimg()
            .args(["info", "--output", "json", "-f", "raw"])
            .arg(&a),
    );
    assert_eq!(as_raw["format"], "raw");
    assert!(json_agrees(&q, &["info", "-f", "raw"], &a) >= 4);
    assert!(json_agrees(&q, &["map", "-f", "raw"], &a) >= 4);
    let out = out_of(qimg().args(["info", "-f", "luks"]).arg(&a));
    assert_eq!(out.status.code(), Some(1), "a qcow2 file is no LUKS volume");
    assert!(text(&out.stderr).contains("a.qcow2"));
    assert!(json_agrees(&q, &["map"], &a) >= 20);
    assert!(json_agrees(&q, &["measure", "-O", "qcow2"], &a) >= 2);
    let ours = json_of(qimg().args(["measure", "--output", "json", "-O", "qcow2", "--size", "1G"]));
    let theirs = json_of(Command::new(&q.img).args([
        "measure",
        "--output=json",
        "-O",
        "qcow2",
        "--size",
        "1G",
    ]));
    assert_eq!(ours, theirs);
    // snapshot -c, -l (JSON as qemu-img info lists them), -a, -d.
    let a0 = p("a0.raw");
    q.to_raw(&a, &a0, &[]);
    run_ok(qimg().args(["snapshot", "-c", "first"]).arg(&a));
    q.io(&a, "qcow2", &["write -P 0x33 0 64k"]);
    let listed = json_of(qimg().args(["snapshot", "-l", "--output", "json"]).arg(&a));
    let info = q.info(&a);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert!(assert_json_agrees(&listed, &info["snapshots"], "snapshots") >= 5);
    assert_eq!(qemu_compare(&q, &a, &a0), 1);
    run_ok(qimg().args(["snapshot", "-a", "first"]).arg(&a));
    assert_eq!(qemu_compare(&q, &a, &a0), 0, "-a restores the snapshot");
    run_ok(qimg().args(["snapshot", "-d", "first"]).arg(&a));
    assert!(q.img(&["snapshot", "-l", a.to_str().unwrap()]).is_empty());
    q.assert_clean(&a, "a");
    // compare: 0 same, 1 different, 2 error; -s strict on sizes; the same
    // codes as qemu-img's on the same pairs.
    let grown = write_tmp(d, "grown.raw", &{
        let mut v = std::fs::read(&a0).unwrap();
        v.resize(v.len() + (1 << 20), 0);
        v
    });
    let other = write_tmp(d, "other.raw", &pattern(4 << 20, 7, 3));
    let missing = p("missing.qcow2");
    for (args, want) in [
        (vec![&a, &a0], 0),
        (vec![&a, &other], 1),
        (vec![&a, &grown], 0),
        (vec![&a, &missing], 2),
    ] {
        for strict in [false, true] {
            let mut ours = qimg();
            let mut theirs = Command::new(&q.img);
            for c in [&mut ours, &mut theirs] {
                c.args(["compare", "-q"]);
                if strict {
                    c.arg("-s");
                }
                c.args(&args);
            }
            let (o, t) = (out_of(&mut ours), out_of(&mut theirs));
            assert_eq!(o.status.code(), t.status.code(), "{args:?} strict={strict}");
            if !strict {
                assert_eq!(o.status.code(), Some(want), "{args:?}");
            } else if args[1] == &grown {
                assert_eq!(o.status.code(), Some(1), "-s: the sizes differ");
            }
        }
    }
    // resize: grow, shrink; qemu-img sees the sizes and a clean image.
    let r = p("r.qcow2");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&r)
            .arg("2M"),
    );
    run_ok(qimg().args(["resize", "-q"]).arg(&r).arg("+1M"));
    assert_eq!(q.info(&r)["virtual-size"], 3 << 20);
    run_ok(qimg().args(["resize", "-q", "--shrink"]).arg(&r).arg("1M"));
    assert_eq!(q.info(&r)["virtual-size"], 1 << 20);
    q.assert_clean(&r, "r");
    json_agrees(&q, &["info"], &r);
    // convert: -S 0 writes every byte, the default 4k leaves holes; -p -m
    // -W run too; -c compresses; -B names a backing file whose data must
    // not show through where the source reads as zero; -n
    // --target-is-zero fills an existing image.
    let full = p("full.raw");
    run_ok(
        qimg()
            .args(["convert", "-p", "-m", "2", "-W", "-S", "0", "-O", "raw"])
            .arg(&a)
            .arg(&full),
    );
    let sparse = p("sparse.raw");
    run_ok(qimg().args(["convert", "-O", "raw"]).arg(&a).arg(&sparse));
    for f in [&full, &sparse] {
        assert_eq!(qemu_compare(&q, &a, f), 0);
    }
    let used = |f: &Path| qimg_tests_alloc(f);
    assert!(used(&full) >= 4 << 20, "-S 0 leaves no hole");
    assert!(used(&sparse) < 1 << 20, "-S 4k keeps zeroes as holes");
    let z = p("z.qcow2");
    run_ok(
        qimg()
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(&a)
            .arg(&z),
    );
    assert_eq!(qemu_compare(&q, &a, &z), 0);
    let map = q.map(&z);
    assert!(map
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["compressed"] == true));
    let base = p("base.qcow2");
    q.convert(&["-O", "qcow2"], &a0, &base);
    q.io(&base, "qcow2", &["write -P 0x44 2M 64k"]);
    let top = p("top.qcow2");
    run_ok(
        qimg()
            .args(["convert", "-O", "qcow2", "-F", "qcow2", "-B"])
            .arg(&base)
            .arg(&a)
            .arg(&top),
    );
    assert_eq!(qemu_compare(&q, &a, &top), 0);
    let ztop = p("ztop.qcow2");
    run_ok(
        qimg()
            .args(["convert", "-c", "-O", "qcow2", "-F", "qcow2", "-B"])
            .arg(&base)
            .arg(&a)
            .arg(&ztop),
    );
    assert_eq!(qemu_compare(&q, &a, &ztop), 0, "-c -B");
    let ti = q.info(&top);
    assert_eq!(ti["backing-filename"], base.to_str().unwrap());
    let t = p("t.qcow2");
    q.create(&t, "qcow2", "", "4M");
    run_ok(
        qimg()
            .args(["convert", "-n", "--target-is-zero", "-O", "qcow2"])
            .arg(&a)
            .arg(&t),
    );
    assert_eq!(qemu_compare(&q, &a, &t), 0);
    // dd: the same bytes as qemu-img dd.
    let (ours, theirs) = (p("dd-ours.qcow2"), p("dd-theirs.raw"));
    for (bin, out, fmt) in [
        (qimg_bin(), &ours, "qcow2"),
        (q.img.clone(), &theirs, "raw"),
    ] {
        run_ok(Command::new(bin).args([
            "dd",
            "-O",
            fmt,
            "bs=64k",
            "count=40",
            "skip=2",
            &format!("if={}", a.display()),
            &format!("of={}", out.display()),
        ]));
    }
    assert_eq!(qemu_compare(&q, &ours, &theirs), 0);
    // rebase, safe (content kept) and -u (name only).
    let ov = p("ov.qcow2");
    q.create(
        &ov,
        "qcow2",
        &format!("backing_file={},backing_fmt=qcow2", a.display()),
        "4M",
    );
    q.io(&ov, "qcow2", &["write -P 0x55 64k 64k"]);
    let ov_raw = p("ov.raw");
    q.to_raw(&ov, &ov_raw, &[]);
    let empty = p("empty.raw");
    q.create(&empty, "raw", "", "4M");
    run_ok(
        qimg()
            .args(["rebase", "-F", "raw", "-b"])
            .arg(&empty)
            .arg(&ov),
    );
    assert_eq!(
        qemu_compare(&q, &ov, &ov_raw),
        0,
        "safe rebase keeps the content"
    );
    assert_eq!(q.info(&ov)["backing-filename"], empty.to_str().unwrap());
    run_ok(
        qimg()
            .args(["rebase", "-u", "-F", "qcow2", "-b"])
            .arg(&a)
            .arg(&ov),
    );
    assert_eq!(q.info(&ov)["backing-filename"], a.to_str().unwrap());
    // commit: the overlay's data lands in its backing file.
    run_ok(qimg().args(["commit", "-q"]).arg(&ov));
    assert_eq!(qemu_compare(&q, &a, &ov_raw), 0);
    q.assert_clean(&a, "a");
}

/// Bytes a file occupies on disk.
fn qimg_tests_alloc(f: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(f).unwrap().blocks() * 512
}

/// Standard base64 of `data`.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(A[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Runs qimg, asserting success and that nothing it printed holds `SECRET`.
fn run_secretly(cmd: &mut Command, stdin: Option<&Path>) -> Output {
    match stdin {
        Some(f) => cmd.stdin(std::fs::File::open(f).unwrap()),
        None => cmd.stdin(Stdio::null()),
    };
    let out = cmd.output().unwrap();
    assert_no_secret(&out);
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    out
}

fn assert_no_secret(out: &Output) {
    for s in [&out.stdout, &out.stderr] {
        assert!(!text(s).contains(SECRET), "the passphrase was printed");
    }
}

#[test]
fn secrets_from_base64_files_and_stdin_never_show() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kf = write_tmp(d, "key", SECRET.as_bytes());
    let kf2 = write_tmp(d, "key2", b"second key");
    let data = pattern(1 << 20, 3, 4);
    let src = write_tmp(d, "src.raw", &data);
    let enc = d.join("e.qcow2");
    let eopts = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";
    // --object ...,format=base64,data=: works; the warning that the secret
    // sits on the command line is for terminals only (cli_dropin.rs): a
    // succeeding verb leaves a piped stderr empty, as qemu-img does.
    let b64 = format!(
        "secret,id=s0,format=base64,data={}",
        base64(SECRET.as_bytes())
    );
    let out = run_secretly(
        qimg()
            .args(["convert", "-O", "qcow2", "--object", &b64, "-o", eopts])
            .arg(&src)
            .arg(&enc),
        None,
    );
    let err = text(&out.stderr);
    assert!(err.is_empty(), "{err}");
    // qemu-img reads it with the same passphrase from a file.
    let file_obj = format!("secret,id=s0,file={}", kf.display());
    let back = d.join("back.raw");
    q.decrypt_to_raw(&file_obj, "qcow2", &enc, "", &back);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // file= gives no warning.
    let out = run_secretly(
        qimg()
            .args(["map", "--output", "json", "--object", &file_obj])
            .arg(&enc),
        None,
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    // --key-file - reads standard input; the map agrees with qemu-img's.
    let ours: serde_json::Value = serde_json::from_slice(
        &run_secretly(
            qimg()
                .args(["map", "--output", "json", "--key-file", "-"])
                .arg(&enc),
            Some(&kf),
        )
        .stdout,
    )
    .unwrap();
    let theirs = json_of(&mut q.encrypted(
        &["map", "--output=json"],
        &file_obj,
        &encrypted_image_opts("qcow2", &enc),
    ));
    assert!(assert_json_agrees(&ours, &theirs, "map") > 0);
    // amend adds a key slot qemu-img then opens.
    let obj2 = format!("secret,id=s1,file={}", kf2.display());
    run_secretly(
        qimg()
            .args([
                "amend",
                "--object",
                &file_obj,
                "--object",
                &obj2,
                "--key-secret",
                "s0",
            ])
            .args([
                "-o",
                "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
            ])
            .arg(&enc),
        None,
    );
    let obj2_as_s0 = format!("secret,id=s0,file={}", kf2.display());
    q.decrypt_to_raw(&obj2_as_s0, "qcow2", &enc, "", &back);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // A raw LUKS volume and every `qimg luks` verb.
    let vol = d.join("v.luks");
    run_secretly(
        qimg()
            .args(["create", "-q", "-f", "luks", "--key-file"])
            .arg(&kf)
            .args(["-o", "iter-time=10"])
            .arg(&vol)
            .arg("1M"),
        None,
    );
    let dump = qimg_luks_dump(&vol);
    let info = q.info(&vol);
    assert!(assert_json_agrees(&dump, &info["format-specific"]["data"], "dump") >= 15);
    let luks = |verb: &str, extra: Option<&Path>| {
        let mut c = qimg_luks(verb, &["-q", "-i", "10"], Some(&kf), &vol, extra);
        run_secretly(&mut c, None);
    };
    luks("add-key", Some(&kf2));
    let active = |v: &Path| {
        qimg_luks_dump(v)["slots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["active"] == true)
            .count()
    };
    assert_eq!(active(&vol), 2);
    let hb = d.join("hdr.bin");
    run_secretly(&mut qimg_header_backup(&vol, &hb), None);
    luks("remove-key", Some(&kf2));
    assert_eq!(active(&vol), 1);
    run_secretly(&mut qimg_header_restore(&vol, &hb), None);
    assert_eq!(active(&vol), 2, "the backup had two key slots");
    let kf3 = write_tmp(d, "key3", b"third key");
    run_secretly(
        &mut qimg_luks(
            "change-key",
            &["-q", "-i", "10"],
            Some(&kf2),
            &vol,
            Some(&kf3),
        ),
        None,
    );
    q.decrypt_to_raw(
        &format!("secret,id=s0,file={}", kf3.display()),
        "luks",
        &vol,
        "",
        &back,
    );
    // A new LUKS payload is noise until written: both tools see the same.
    let ours = d.join("ours.raw");
    run_secretly(
        qimg()
            .args(["convert", "-O", "raw", "--key-file"])
            .arg(&kf3)
            .arg(&vol)
            .arg(&ours),
        None,
    );
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&ours).unwrap());
    // A wrong passphrase: one line naming the image, and no secret shown.
    let wrong = write_tmp(d, "wrong", b"not it");
    let out = out_of(
        qimg()
            .args(["convert", "--key-file"])
            .arg(&wrong)
            .arg(&enc)
            .arg(d.join("x.raw")),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("e.qcow2") && err.contains("passphrase"),
        "{err}"
    );
    assert_no_secret(&out);
}

#[test]
fn create_asks_for_a_new_passphrase_twice_on_a_terminal() {
    let Some(script) = tool("script") else { return };
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("typed.luks");
    let args = format!("create -f luks -o iter-time=10 {} 1M", vol.display());
    let under_pty = |input: &str| qimg_on_pty(&script, &args, input);
    let (ok, out) = under_pty("one typed\nother typed\n");
    assert!(
        !ok && out.contains("do not match") && out.contains("typed.luks"),
        "{out}"
    );
    assert!(!vol.exists(), "a failed prompt leaves no volume behind");
    let (ok, out) = under_pty("same typed\nsame typed\n");
    assert!(ok && out.contains("Verify passphrase"), "{out}");
    let typed = write_tmp(dir.path(), "typed", b"same typed");
    let out = out_of(qimg().args(["map", "--key-file"]).arg(&typed).arg(&vol));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Images every verb is run against, each broken its own way.
struct Broken {
    dir: tempfile::TempDir,
}

impl Broken {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("folder.qcow2")).unwrap();
        run_ok(
            qimg()
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
                .arg(d.join("good.qcow2"))
                .arg("1M"),
        );
        run_ok(
            qimg()
                .args(["convert", "-O", "qcow2"])
                .arg(write_tmp(d, "data.raw", &pattern(1 << 20, 5, 0)))
                .arg(d.join("full.qcow2")),
        );
        let full = std::fs::read(d.join("full.qcow2")).unwrap();
        write_tmp(d, "cut-header.qcow2", &full[..100]);
        let kf = write_tmp(d, "key", SECRET.as_bytes());
        write_tmp(d, "wrong", b"wrong passphrase");
        qimg_create_luks(&d.join("vol.luks"), &kf, "iter-time=10", "1M");
        qimg_create_luks(
            &d.join("vol2.luks"),
            &kf,
            "luks-version=2,pbkdf=pbkdf2,iter-time=10",
            "1M",
        );
        let vol = std::fs::read(d.join("vol.luks")).unwrap();
        write_tmp(d, "cut.luks", &vol[..1000]);
        run_ok(&mut qimg_header_backup(
            &d.join("vol.luks"),
            &d.join("backup.bin"),
        ));
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[test]
fn every_verb_fails_in_one_clean_line_naming_the_file() {
    let b = Broken::new();
    let s = |n: &str| b.path(n).to_string_lossy().into_owned();
    // Each verb with `@` for the broken file.
    let mut cases: Vec<(String, i32)> = [
        ("create -q -f qcow2 -F qcow2 -b @ OUT", 1),
        ("info @", 1),
        ("map @", 1),
        ("measure -O qcow2 @", 1),
        ("convert -O qcow2 @ OUT", 1),
        ("dd -O raw if=@ of=OUT", 1),
        ("compare @ GOOD", 2),
        ("compare GOOD @", 2),
        ("resize @ 2M", 1),
        ("snapshot -l @", 1),
        ("snapshot -c snap @", 1),
        ("rebase -u -F qcow2 -b GOOD @", 1),
        ("commit @", 1),
        (
            "amend --key-secret s0 -o encrypt.state=inactive,encrypt.keyslot=1 @",
            1,
        ),
        ("luks dump @", 1),
        ("luks add-key -q -i 10 @ KEY", 1),
        ("luks remove-key -q @ KEY", 1),
        ("luks change-key -q -i 10 @ KEY", 1),
        ("luks header-backup --header-backup-file HB @", 1),
        ("luks header-restore -q --header-backup-file BACKUP @", 1),
    ]
    .iter()
    .map(|(c, code)| (c.to_string(), *code))
    .collect();
    cases.push(("check @".into(), 1));
    // A verb added later must join the cases (completions reads no file).
    for v in all_verbs() {
        assert!(
            v == "completions" || cases.iter().any(|(c, _)| c.split(' ').next() == Some(&v)),
            "no error case for `qimg {v}`"
        );
    }
    let files = [
        "missing.qcow2",
        "folder.qcow2",
        "cut-header.qcow2",
        "cut.luks",
        "vol.luks",
        "vol2.luks",
    ];
    let mut failures = Vec::new();
    for file in files {
        for (case, code) in &cases {
            let hb = b.path("hb.bin");
            let _ = std::fs::remove_file(&hb);
            let args: Vec<String> = case
                .split(' ')
                .map(|w| {
                    w.replace('@', &s(file))
                        .replace("GOOD", &s("good.qcow2"))
                        .replace("OUT", &s("out.img"))
                        .replace("KEY", &s("key"))
                        .replace("HB", &s("hb.bin"))
                        .replace("BACKUP", &s("backup.bin"))
                })
                .collect();
            let mut cmd = qimg();
            cmd.args(&args).args(["--key-file", &s("wrong")]);
            // Not every verb takes a key; those get none.
            if [
                "resize",
                "snapshot",
                "dump",
                "header-backup",
                "header-restore",
            ]
            .iter()
            .any(|v| args.iter().any(|a| a == v))
            {
                cmd = qimg();
                cmd.args(&args);
            }
            let out = out_of(&mut cmd);
            let err = text(&out.stderr);
            // The intact LUKS volume fails only where a key is needed.
            if file.starts_with("vol") && out.status.success() {
                continue;
            }
            // The key verbs use cryptsetup's codes: 2 for a wrong passphrase.
            let code = if file.starts_with("vol") && case.contains("-key ") {
                2
            } else {
                *code
            };
            let why = if out.status.code() != Some(code) {
                Some(format!("exit {:?}, want {code}", out.status.code()))
            } else if err.lines().count() != 1
                // qemu-img's hint after create's backing file error.
                && !(err.lines().count() == 2
                    && err.trim_end().ends_with("\nCould not open backing image."))
            {
                Some("not one line".into())
            } else if !err.starts_with("qimg: ")
                // qemu-img's "Image is not in qcow2 format" names the new
                // image; its hint says the culprit is the backing image.
                || !(err.contains(file) || err.trim_end().ends_with("Could not open backing image."))
            {
                Some("does not name the file".into())
            } else if [
                "panicked",
                "RUST_BACKTRACE",
                "kind:",
                "Some(",
                "Os {",
                "Error {",
            ]
            .iter()
            .any(|m| err.contains(m))
            {
                Some("debug formatting or a panic".into())
            } else {
                None
            };
            if let Some(why) = why {
                failures.push(format!(
                    "qimg {}: {why}\n    {}",
                    args.join(" "),
                    err.trim_end()
                ));
            }
            assert_no_secret(&out);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A cut header is called what it is, not a bad field value.
    for verb in ["info", "map", "snapshot -l"] {
        let out = out_of(qimg().args(verb.split(' ')).arg(b.path("cut-header.qcow2")));
        assert!(
            text(&out.stderr).contains("truncated"),
            "{verb}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn writers_never_take_a_formatted_file_for_raw_silently() {
    let b = Broken::new();
    let s = |n: &str| b.path(n);
    for target in ["good.qcow2", "vol.luks"] {
        let before = std::fs::read(s(target)).unwrap();
        let out = out_of(
            qimg()
                .args(["convert", "-n", "-O", "raw"])
                .arg(s("data.raw"))
                .arg(s(target)),
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("warning") && err.contains(target),
            "{target}: {err}"
        );
        // qemu-img -n requires the target be large enough; whatever qimg
        // decided, it said so.
        if out.status.success() {
            assert_ne!(std::fs::read(s(target)).unwrap(), before);
        }
    }
}

#[test]
fn check_agrees_with_qemu_img() {
    let Some(q) = Qemu::find() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
            .arg(&img)
            .arg("1M"),
    );
    q.io(
        &img,
        "qcow2",
        &["write -P 0x5a 0 64k", "write -P 0x5b 512k 8k"],
    );
    let both = |img: &Path| {
        let ours = out_of(qimg().args(["check", "--output", "json"]).arg(img));
        let ours_v: serde_json::Value = serde_json::from_slice(&ours.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&ours.stdout)));
        let (code, theirs) = q.check(img);
        assert_eq!(ours.status.code(), Some(code), "{}", text(&ours.stderr));
        assert!(assert_json_agrees(&ours_v, &theirs, "check") >= 3);
        assert_eq!(ours_v, theirs, "check JSON");
        code
    };
    assert_eq!(both(&img), 0);
    // Zero the first L1 entry: its L2 table and data clusters leak.
    let mut bytes = std::fs::read(&img).unwrap();
    let l1 = usize::try_from(u64::from_be_bytes(bytes[40..48].try_into().unwrap())).unwrap();
    bytes[l1..l1 + 8].fill(0);
    std::fs::write(&img, &bytes).unwrap();
    assert_eq!(both(&img), 3, "leaked clusters: exit 3, as qemu-img");
    let out = out_of(qimg().args(["check", "-q", "-r", "leaks"]).arg(&img));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(both(&img), 0, "-r leaks repaired it");
}

#[test]
fn every_writer_told_raw_warns_or_refuses() {
    let b = Broken::new();
    let s = |n: &str| b.path(n).to_string_lossy().into_owned();
    // Each verb that writes into an existing file, with `-f raw` forced
    // on a file that is really qcow2 or LUKS.
    let cases = [
        "resize -f raw @ 4M",
        "amend -f raw -o state=inactive,keyslot=1 @",
        "snapshot -f raw -c snap @",
        "rebase -f raw -u -F raw -b OTHER @",
        "commit -f raw @",
        "check -f raw -r all @",
        "luks add-key -q -f raw -i 10 --key-file KEY @ KEY",
    ];
    for target in ["good.qcow2", "vol.luks"] {
        for case in cases {
            let work = b.path("work.img");
            std::fs::copy(b.path(target), &work).unwrap();
            let before = std::fs::read(&work).unwrap();
            let args: Vec<String> = case
                .split(' ')
                .map(|w| {
                    w.replace('@', &s("work.img"))
                        .replace("OTHER", &s("data.raw"))
                        .replace("KEY", &s("key"))
                })
                .collect();
            let out = out_of(qimg().args(&args));
            let err = text(&out.stderr);
            let changed = std::fs::read(&work).unwrap() != before;
            let warned = err.contains("warning") && err.contains("work.img");
            assert!(
                warned || (!out.status.success() && !changed),
                "qimg {case} on {target}: wrote without a word\n{err}"
            );
        }
    }
}
