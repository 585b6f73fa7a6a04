//! `cargo xtask fuzz [--time S] [--target NAME]...`: runs every cargo-fuzz
//! target (nightly libFuzzer) for S seconds each, seeding missing corpora
//! with real images first, then minimises each corpus. A crash is copied to
//! `fuzz/regressions/TARGET/`, where the stable replay test
//! (`tests/tests/fuzz_replay.rs`) keeps failing until the bug is fixed.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{cargo, root, run};

/// The targets, as in `tests/src/fuzzing.rs`'s `TARGETS`.
pub(crate) const TARGETS: &[&str] = &[
    "qcow2_header",
    "qcow2_entries",
    "qcow2_image",
    "qcow2_compressed",
    "qcow2_check",
    "luks1_unlock",
    "luks2_unlock",
    "cli_options",
];

/// libFuzzer's limits: the stated memory bound of a crafted image (no single
/// allocation over `MALLOC_LIMIT_MB`) and the longest an input may take.
/// `RSS_LIMIT_MB` is libFuzzer's default for the whole fuzzing process:
/// under AddressSanitizer its resident size grows with the corpus and the
/// quarantine, not with one input (a 512 MiB limit stopped the
/// `qcow2_check` run after 9,000 inputs on an input that, alone, runs in
/// 2 ms), so the per-run bound of qimg itself is measured by
/// `tests/tests/hostile.rs` instead (under 100 MiB per command).
const MALLOC_LIMIT_MB: u32 = 128;
const RSS_LIMIT_MB: u32 = 2048;
/// Per input. Under AddressSanitizer on a loaded 2-core machine the
/// slowest legitimate input seen (a 1.6 KiB image naming 48,128 snapshots,
/// each walked by the checker: 2 s alone, 0.01 s without sanitizers) took
/// 11 s; a real hang still stands out.
const TIMEOUT_S: u32 = 30;

/// Runs the fuzz task.
pub(crate) fn fuzz(args: &[String]) -> Result<(), String> {
    let mut secs = 60u64;
    let mut only: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                secs = it
                    .next()
                    .ok_or("--time needs seconds")?
                    .parse()
                    .map_err(|e| format!("--time: {e}"))?
            }
            "--target" => only.push(it.next().ok_or("--target needs a name")?.clone()),
            other => return Err(format!("fuzz: unknown argument `{other}`")),
        }
    }
    for t in &only {
        if !TARGETS.contains(&t.as_str()) {
            return Err(format!(
                "fuzz: no target `{t}` (targets: {})",
                TARGETS.join(", ")
            ));
        }
    }
    ensure_cargo_fuzz()?;
    let fuzz = root().join("fuzz");
    seed_missing(&fuzz)?;
    let mut summary = Vec::new();
    for t in TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == *t))
    {
        let corpus = fuzz.join("corpus").join(t);
        let out = Command::new("cargo")
            .current_dir(root())
            .args(["+nightly", "fuzz", "run", "--release", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={TIMEOUT_S}"))
            .arg(format!("-max_len={}", max_len(t)))
            .arg("-print_final_stats=1")
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot start cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        std::fs::write(fuzz.join(format!("last-{t}.log")), &log).map_err(|e| e.to_string())?;
        let stats = final_stats(&log);
        if !out.status.success() {
            save_crashes(&fuzz, t)?;
            summary.push(format!("{t}: FAILED ({stats}); see fuzz/last-{t}.log"));
            continue;
        }
        run(
            &format!("minimise the {t} corpus"),
            Command::new("cargo")
                .current_dir(root())
                .args(["+nightly", "fuzz", "cmin", "--release", t])
                .arg(&corpus)
                .stdout(Stdio::null()),
        )?;
        summary.push(format!("{t}: ok, {stats}"));
    }
    println!("\nfuzz summary ({secs} s per target):");
    for s in &summary {
        println!("  {s}");
    }
    if summary.iter().any(|s| s.contains("FAILED")) {
        Err("a fuzz target found a crash, a leak over the bound or a hang".into())
    } else {
        Ok(())
    }
}

/// The longest input libFuzzer builds for `t`: the seed bounds of
/// `tests/src/bin/fuzz-seeds.rs` (a LUKS volume's header and first key
/// slot; the front of a small qcow2 image).
fn max_len(t: &str) -> usize {
    match t {
        "luks1_unlock" | "luks2_unlock" => 160 << 10,
        "qcow2_image" | "qcow2_check" => 64 << 10,
        _ => 16 << 10,
    }
}

fn ensure_cargo_fuzz() -> Result<(), String> {
    let have = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    run(
        "install cargo-fuzz",
        Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]),
    )
}

/// Writes the seed corpus of every target whose corpus folder is empty.
fn seed_missing(fuzz: &Path) -> Result<(), String> {
    let empty = |t: &&&str| {
        std::fs::read_dir(fuzz.join("corpus").join(t)).map_or(true, |mut d| d.next().is_none())
    };
    if !TARGETS.iter().any(|t| empty(&t)) {
        return Ok(());
    }
    let seeds = root().join("target").join("fuzz-seeds");
    let _ = std::fs::remove_dir_all(&seeds);
    run(
        "write seed corpora from real images",
        cargo()
            .args(["run", "-q", "-p", "qimg-tests", "--bin", "fuzz-seeds", "--"])
            .arg(&seeds),
    )?;
    for t in TARGETS.iter().filter(empty) {
        let dst = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&dst).map_err(|e| e.to_string())?;
        let src = seeds.join(t);
        for e in std::fs::read_dir(&src).map_err(|e| format!("{}: {e}", src.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            std::fs::copy(e.path(), dst.join(e.file_name())).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Copies libFuzzer's crash, timeout and out-of-memory inputs of `t` into
/// `fuzz/regressions/t/`.
fn save_crashes(fuzz: &Path, t: &str) -> Result<(), String> {
    let art = fuzz.join("artifacts").join(t);
    let dst = fuzz.join("regressions").join(t);
    let Ok(entries) = std::fs::read_dir(&art) else {
        return Ok(());
    };
    std::fs::create_dir_all(&dst).map_err(|e| e.to_string())?;
    for e in entries.flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).map_err(|e| e.to_string())?;
        eprintln!("xtask: saved {} for the replay test", e.path().display());
    }
    Ok(())
}

/// "N runs, cov C, ft F, corpus K" from libFuzzer's last status line and
/// final stats.
fn final_stats(log: &str) -> String {
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .map(str::trim)
        .unwrap_or("?");
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains("cov:"))
        .unwrap_or("");
    let pick = |key: &str| {
        last.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .unwrap_or("?")
            .to_string()
    };
    format!(
        "{runs} executions, coverage {} edges, {} features, corpus {}",
        pick("cov:"),
        pick("ft:"),
        pick("corp:")
    )
}
