//! `cargo xtask`: qimg's task runner (the cargo-xtask pattern).
//!
//! `cargo xtask ci` is the README's test command and what `.ci/run` calls.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod benchverbs;
mod fuzz;
mod imports;
mod kdf;
mod sizes;
mod sparse;
mod uefi;
mod uefi_boot;

/// The one module allowed to contain `unsafe` (runtime-dispatched SIMD).
const VETTED_UNSAFE: &str = "luks-core/src/simd";
/// The UEFI boot program's firmware-FFI module (its crate root denies
/// `unsafe_code` everywhere else).
const VETTED_FFI: &str = "qimg-efi/src/ffi.rs";

/// Folders the `unsafe` audit reads.
const AUDITED: &[&str] = &[
    "luks-core",
    "qcow-core",
    "qimg-cli",
    "qimg-bench",
    "tests",
    "fuzz",
    "qimg-efi",
];

/// Bare-metal target the cores must build for.
const BARE_METAL: &str = "x86_64-unknown-none";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("fmt") => fmt_check(),
        Some("clippy") => clippy(),
        Some("test") => test(),
        Some("doc") => doc(),
        Some("nostd") => nostd(),
        Some("core-sizes") => sizes::core_sizes(),
        Some("unsafe-audit") => unsafe_audit(),
        Some("imports") => imports::check(),
        Some("man") => man(),
        Some("uefi") => uefi::build().map(|p| println!("{}", p.display())),
        Some("uefi-test") => uefi::test().and_then(|()| uefi_boot::test(&[])),
        Some("uefi-boot") => uefi_boot::test(&args[1..]),
        Some("efi") => uefi::build_boot().map(|p| println!("{}", p.display())),
        Some("bench-compare") => bench_compare_opts(&args).and_then(|o| bench::compare(&o)),
        Some("bench-commit") => {
            let mib = args
                .iter()
                .position(|a| a == "--mib")
                .and_then(|i| args.get(i + 1))
                .map_or(Ok(800), |v| v.parse::<u64>())
                .map_err(|e| format!("--mib: {e}"));
            let runs = args
                .iter()
                .position(|a| a == "--runs")
                .and_then(|i| args.get(i + 1))
                .map_or(Ok(3), |v| v.parse::<usize>())
                .map_err(|e| format!("--runs: {e}"));
            // --quick: a 64 MiB overlay, one round (a check that it works).
            let quick = args.iter().any(|a| a == "--quick");
            mib.and_then(|m| runs.map(|r| (m, r))).and_then(|(m, r)| {
                if quick {
                    bench::commit(64, 1)
                } else {
                    bench::commit(m, r.max(1))
                }
            })
        }
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("kdf-compare") => kdf::compare(&args[1..]),
        Some("check-mem") => bench::check_mem(),
        Some("bench-sparse") => sparse::bench_sparse(),
        Some("help") | Some("--help") | Some("-h") | None => {
            print_help();
            Ok(())
        }
        Some(other) => Err(format!("unknown task `{other}`; run `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_help() {
    println!(
        "cargo xtask TASK\n\n\
         Tasks:\n  \
         ci            everything CI runs: fmt, unsafe audit, import cycles, clippy, bare-metal builds, tests, docs, firmware test\n  \
         fmt           rustfmt check\n  \
         clippy        clippy -D warnings on all targets\n  \
         test          all tests (interop tests need qemu-img and cryptsetup)\n  \
         doc           rustdoc with -D warnings\n  \
         nostd         build both cores for {BARE_METAL} at each feature level; fail if plaintext qcow-core links a cipher, hash or KDF\n  \
         core-sizes    size of the no-alloc smoke binary: plaintext qcow2, + LUKS1, everything\n  \
         unsafe-audit  fail if `unsafe` appears outside {VETTED_UNSAFE} and {VETTED_FFI}\n  \
         imports       fail on an import cycle between qimg-cli's modules, printing it\n  \
         man           write qimg(1) and a page per verb to target/man/\n  \
         uefi          build the UEFI reader (tests/uefi-reader)\n  \
         efi           build the UEFI boot program (qimg-efi); prints the .efi path\n  \
         uefi-test     boot OVMF with test images and check what the reader reads, then the qimg-efi boot scenarios\n  \
         uefi-boot [SCENARIO..]  only the qimg-efi boot scenarios (docs/uefi-boot.md), or the ones named\n  \
         bench-compare [--mib N] [--runs R] [--dir D] [--quick|--smoke]  XTS and PBKDF2 vs OpenSSL; every data-moving verb vs qemu-img (median wall time, peak RSS, cp floor, outputs cross-checked; default 1024 MiB, 5 runs, /dev/shm; --quick 128 MiB 1 run; --smoke 8 MiB, debug qimg, no XTS, timings not judged)\n  \
         bench-commit [--mib N] [--runs R] [--quick]  qemu-img vs qimg commit of an N MiB overlay (default 800), R alternating rounds (default 3; --quick: 64 MiB, 1 round): median ratio, du, results compared\n  \
         kdf-compare [--bin PATH]  qimg's PBKDF2/Argon2 costs beside cryptsetup's and qemu-img's at iter-time 1000/2000\n  \
         fuzz [--time S] [--target NAME]  run every cargo-fuzz target (nightly) S seconds, seeding corpora from real images\n  \
         bench-sparse  qimg -m 1/-m 2 and qemu-img convert of 4 and 15 TiB sparse qcow2 images (seconds)\n  \
         check-mem     peak RSS of the qcow2 check on a 4 TiB sparse and a 1 GiB fully written image"
    );
}

/// `bench-compare [--mib N] [--runs R] [--dir D] [--quick] [--smoke]`.
fn bench_compare_opts(args: &[String]) -> Result<benchverbs::Opts, String> {
    let value = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(Ok(default), |v| v.parse::<u64>())
            .map_err(|e| format!("{name}: {e}"))
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let (quick, smoke) = (flag("--quick"), flag("--smoke"));
    let (mib, runs) = match (smoke, quick) {
        (true, _) => (8, 1),
        (false, true) => (128, 1),
        (false, false) => (value("--mib", 1024)?, value("--runs", 5)?.max(1)),
    };
    let dir = match args.iter().position(|a| a == "--dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--dir needs a folder")?),
        None => benchverbs::default_dir(),
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    Ok(benchverbs::Opts {
        mib,
        runs: usize::try_from(runs).map_err(|e| format!("--runs: {e}"))?,
        dir,
        smoke,
    })
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: == {what}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn ci() -> Result<(), String> {
    // .ci/run must stay under 30 minutes on 2 cores: print where time goes.
    let started = std::time::Instant::now();
    fmt_check()?;
    unsafe_audit()?;
    imports::check()?;
    clippy()?;
    nostd()?;
    test()?;
    doc()?;
    let t = std::time::Instant::now();
    uefi::test()?;
    let reader = t.elapsed().as_secs();
    uefi_boot::test(&[])?;
    let boots = t.elapsed().as_secs() - reader;
    eprintln!("xtask: uefi-test took {reader}s (reader) + {boots}s (boot scenarios)");
    // The benchmark harness must not rot: run it tiny, judge no timing.
    eprintln!("xtask: == bench-compare --smoke");
    bench::compare(&bench_compare_opts(&["--smoke".to_string()])?)?;
    eprintln!(
        "xtask: ci passed in {}s (budget: 1800s for all of .ci/run on 2 cores)",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// The UEFI programs: each its own cargo workspace, built for
/// `x86_64-unknown-uefi`, outside `--workspace`.
const UEFI_CRATES: [&str; 3] = ["qimg-efi", "tests/uefi-reader", "tests/uefi-marker"];

fn fmt_check() -> Result<(), String> {
    run(
        "rustfmt check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    for dir in UEFI_CRATES {
        run(
            &format!("rustfmt check ({dir})"),
            cargo()
                .current_dir(root().join(dir))
                .args(["fmt", "--all", "--", "--check"]),
        )?;
    }
    Ok(())
}

fn clippy() -> Result<(), String> {
    run(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    for dir in UEFI_CRATES {
        run(
            &format!("clippy ({dir})"),
            cargo().current_dir(root().join(dir)).args([
                "clippy",
                "--release",
                "--target",
                "x86_64-unknown-uefi",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    Ok(())
}

fn test() -> Result<(), String> {
    run("tests", cargo().args(["test", "--workspace"]))
}

fn doc() -> Result<(), String> {
    run(
        "docs",
        cargo()
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--workspace", "--no-deps"]),
    )
}

fn nostd() -> Result<(), String> {
    let base = [
        "build",
        "-p",
        "luks-core",
        "-p",
        "qcow-core",
        "--target",
        BARE_METAL,
        "--no-default-features",
    ];
    run("bare-metal build, no alloc", cargo().args(base))?;
    sizes::feature_checks()?;
    run(
        "bare-metal build, alloc",
        cargo()
            .args(base)
            .args(["--features", "luks-core/alloc,qcow-core/alloc"]),
    )?;
    // A binary with no global allocator that opens a qcow2 image and
    // unlocks LUKS1 and LUKS2 headers: it links only if the read path
    // needs no heap. Built at each feature level.
    sizes::smoke_builds().map(drop)
}

fn man() -> Result<(), String> {
    eprintln!("xtask: == man pages");
    let dir = root().join("target").join("man");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // qimg.1 and one page per verb (qimg-convert.1, qimg-luks-add-key.1, ...).
    let out = cargo()
        .args([
            "run", "--quiet", "-p", "qimg-cli", "--bin", "qimg", "--", "man",
        ])
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run qimg: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qimg man failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!("{}", dir.join("qimg.1").display());
    Ok(())
}

fn unsafe_audit() -> Result<(), String> {
    eprintln!("xtask: == unsafe audit");
    let root = root();
    let mut offenders = Vec::new();
    for dir in AUDITED {
        audit_dir(&root, &root.join(dir), &mut offenders)?;
    }
    if offenders.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`unsafe` outside {VETTED_UNSAFE} and {VETTED_FFI}:\n  {}",
            offenders.join("\n  ")
        ))
    }
}

fn audit_dir(root: &Path, dir: &Path, offenders: &mut Vec<String>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with(VETTED_UNSAFE)
            || rel == VETTED_FFI
            || rel.ends_with("/target")
            || rel.contains("/target/")
            || rel.starts_with("fuzz/corpus")
            || rel.starts_with("fuzz/artifacts")
        {
            continue;
        }
        if path.is_dir() {
            audit_dir(root, &path, offenders)?;
        } else if rel.ends_with(".rs") {
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{rel}: {e}"))?;
            for (n, line) in text.lines().enumerate() {
                let code = without_strings(line.split("//").next().unwrap_or(""));
                if has_unsafe_token(&code) {
                    offenders.push(format!("{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    Ok(())
}

/// `code` with the insides of its one-line string literals removed, so a
/// value such as qemu-img's cache mode `"unsafe"` is not taken for the
/// keyword (a backslash escapes the next character).
fn without_strings(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let (mut in_str, mut escaped) = (false, false);
    for c in code.chars() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                out.push(c);
            }
        } else {
            if c == '"' {
                in_str = true;
            }
            out.push(c);
        }
    }
    out
}

/// Whether `code` holds the keyword `unsafe` as a whole word (so `unsafe_code`
/// in a lint attribute does not count).
fn has_unsafe_token(code: &str) -> bool {
    code.match_indices("unsafe").any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + "unsafe".len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

#[cfg(test)]
mod tests {
    use super::{has_unsafe_token, without_strings};

    #[test]
    fn unsafe_token_is_a_whole_word() {
        assert!(has_unsafe_token("unsafe { x }"));
        assert!(has_unsafe_token("pub unsafe fn f()"));
        assert!(!has_unsafe_token("#![deny(unsafe_code)]"));
        assert!(!has_unsafe_token("let not_unsafe = 1;"));
    }

    #[test]
    fn string_literals_are_not_code() {
        assert!(!has_unsafe_token(&without_strings(
            r#""unsafe" => Self::Unsafe,"#
        )));
        assert!(!has_unsafe_token(&without_strings(r#"f("a\"unsafe")"#)));
        assert!(has_unsafe_token(&without_strings(
            r#"let s = "x"; unsafe { y }"#
        )));
    }
}
