//! `cargo xtask bench-compare`: qimg beside OpenSSL and qemu-img in one
//! run, printed as a table of ratios.
//!
//! - The XTS engine (every backend) against `openssl speed -evp
//!   aes-256-xts` at 4 KiB, and against the raw `aes` bulk rate.
//! - PBKDF2-SHA256 iterations per second against `openssl kdf`.
//! - Then every verb that moves data against qemu-img, with peak RSS and
//!   the copy floor (`crate::benchverbs`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::{cargo, root, run};

/// Runs `cmd`; its standard output, or an error with its standard error.
pub(crate) fn stdout_of(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `key=value` from a whitespace-separated line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// OpenSSL's aes-256-xts rate at 4 KiB, in GB/s.
fn openssl_xts() -> Result<f64, String> {
    let out = stdout_of(Command::new("openssl").args([
        "speed",
        "-evp",
        "aes-256-xts",
        "-bytes",
        "4096",
        "-seconds",
        "3",
    ]))?;
    // Last line: "AES-256-XTS   4412345.67k" (thousands of bytes per second).
    let last = out
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains("xts"))
        .ok_or("openssl speed printed no XTS line")?;
    let k = last
        .split_whitespace()
        .last()
        .and_then(|v| v.strip_suffix('k'))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("cannot read openssl speed's line: {last}"))?;
    Ok(k * 1000.0 / 1e9)
}

/// OpenSSL's PBKDF2-HMAC-SHA256 iterations per second.
fn openssl_pbkdf2() -> Result<f64, String> {
    let iters = 2_000_000u32;
    let start = Instant::now();
    stdout_of(Command::new("openssl").args([
        "kdf",
        "-keylen",
        "32",
        "-kdfopt",
        "digest:SHA256",
        "-kdfopt",
        "pass:passphrase",
        "-kdfopt",
        "salt:salt-salt-salt-salt",
        "-kdfopt",
        &format!("iter:{iters}"),
        "PBKDF2",
    ]))?;
    Ok(f64::from(iters) / start.elapsed().as_secs_f64())
}

/// Runs the comparison: the XTS and PBKDF2 rates (not with `--smoke`),
/// then the verb rows.
pub(crate) fn compare(o: &crate::benchverbs::Opts) -> Result<(), String> {
    if o.smoke {
        // CI's run: the verb rows at a tiny size, no XTS/PBKDF2 table.
        return crate::benchverbs::run_verbs(o, &[]);
    }
    run(
        "build qimg and xts-rate (release)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "qimg-cli",
            "--bin",
            "qimg",
            "-p",
            "qimg-bench",
            "--bin",
            "xts-rate",
        ]),
    )?;
    let bin = root().join("target").join("release");
    let rates = stdout_of(&mut Command::new(bin.join("xts-rate")))?;
    let bulk = rates
        .lines()
        .find_map(|l| l.strip_prefix("aes-bulk ").and_then(|l| field(l, "gbps")))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("xts-rate printed no aes-bulk line")?;
    let ossl = openssl_xts()?;
    let ours_pbkdf2 = rates
        .lines()
        .filter(|l| l.starts_with("pbkdf2 ") && field(l, "hash") == Some("sha256"))
        .find_map(|l| field(l, "iters_per_s"))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("xts-rate printed no pbkdf2 line")?;
    let ossl_pbkdf2 = openssl_pbkdf2()?;

    // The rate of xts-rate's `{kind} backend=.. gbps=..` line.
    let rate = |kind: &str, backend: &str| {
        rates
            .lines()
            .filter(|l| {
                l.strip_prefix(kind).is_some_and(|r| r.starts_with(' '))
                    && field(l, "backend") == Some(backend)
            })
            .find_map(|l| field(l, "gbps"))
            .and_then(|v| v.parse::<f64>().ok())
    };
    // The core's ceiling per register width (AES rounds only).
    let ceiling = |backend: &str| rate("ceiling", backend);
    // The kernels' data path without tweak arithmetic, per backend.
    let datapath = |backend: &str| rate("datapath", backend);
    // xts-rate prints `clock=cpu` (rates per second of its thread's CPU
    // time, as `openssl speed` counts by default) unless run with --wall.
    let clock = rates
        .lines()
        .find_map(|l| field(l, "clock"))
        .unwrap_or("wall");
    println!("\nAES-256-XTS, 64 KiB batches (same run, {clock} time)");
    println!(
        "{:<10} {:>6} {:>9} {:>10} {:>10} {:>10} {:>12}",
        "backend", "sector", "GB/s", "x aes bulk", "x openssl", "of ceiling", "of data path"
    );
    println!(
        "{:<10} {:>6} {:>9.2} {:>10} {:>10} {:>10} {:>12}",
        "aes bulk", "-", bulk, "1.00", "-", "-", "-"
    );
    println!(
        "{:<10} {:>6} {:>9.2} {:>10} {:>10} {:>10} {:>12}",
        "openssl", "4096", ossl, "-", "1.00", "-", "-"
    );
    // Each XTS line's backend, sector size and rate, for the verdict below.
    let mut xts_rows: Vec<(&str, &str, f64)> = Vec::new();
    for l in rates
        .lines()
        .filter(|l| l.starts_with("xts ") && !l.contains("unavailable"))
    {
        let (Some(b), Some(s), Some(g)) =
            (field(l, "backend"), field(l, "sector"), field(l, "gbps"))
        else {
            continue;
        };
        let g: f64 = g.parse().map_err(|_| format!("bad line: {l}"))?;
        xts_rows.push((b, s, g));
        let of = ceiling(b).map_or("-".to_string(), |c| format!("{:.0}%", 100.0 * g / c));
        let ofd = datapath(b).map_or("-".to_string(), |d| format!("{:.0}%", 100.0 * g / d));
        println!(
            "{b:<10} {s:>6} {g:>9.2} {:>10.2} {:>10.2} {of:>10} {ofd:>12}",
            g / bulk,
            g / ossl
        );
    }
    // What the register widths allow at all: AES-256 rounds with nothing
    // else, timed on this core (`Backend::round_probe`).
    for b in ["vaes512", "vaes256", "aesni"] {
        if let Some(c) = ceiling(b) {
            println!(
                "ceiling {b:<8} {c:>9.2} GB/s (AES-256 rounds alone) = {:.2}x openssl",
                c / ossl
            );
        }
    }
    // The kernels' shapes without their tweak arithmetic: loads,
    // whitening, rounds and stores (`Backend::datapath_probe`); the gap to
    // the XTS rows is what the tweaks cost.
    for b in ["vaes512", "vaes256", "aesni"] {
        if let (Some(d), Some(c)) = (datapath(b), ceiling(b)) {
            println!(
                "data path {b:<8} {d:>7.2} GB/s (the kernel without its tweak arithmetic) = {:.0}% of ceiling",
                100.0 * d / c
            );
        }
    }
    println!(
        "\nPBKDF2-SHA256: qimg {:.0} it/s, openssl {:.0} it/s: {:.2}x",
        ours_pbkdf2,
        ossl_pbkdf2,
        ours_pbkdf2 / ossl_pbkdf2
    );

    let best = rates
        .lines()
        .find_map(|l| l.strip_prefix("best ").and_then(|l| field(l, "backend")));
    let xts_rate = |b: &str, s: u32| {
        let s = s.to_string();
        xts_rows
            .iter()
            .find(|&&(rb, rs, _)| rb == b && rs == s)
            .map(|&(_, _, g)| g)
    };
    let xts = xts_targets(best, xts_rate, ceiling);
    crate::benchverbs::run_verbs(o, &xts)
}

/// The XTS target, one line per hardware backend this CPU has: at
/// least 90% of the round ceiling at 4 KiB sectors and 85% at 512 B.
/// `rate(backend, sector)` and `ceiling(backend)` are xts-rate's figures;
/// `best` is the backend the engine picks here.
///
/// Judged: AES-NI, and the VAES backend the engine uses on this CPU (the
/// issue's "VAES", whose baseline it measured as VAES-512 on this
/// machine). The other VAES width, which this CPU has but never runs
/// (VAES-256 beside VAES-512), is printed as `[info]`: its figure here
/// says little about the CPUs that do run it.
fn xts_targets(
    best: Option<&str>,
    rate: impl Fn(&str, u32) -> Option<f64>,
    ceiling: impl Fn(&str) -> Option<f64>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for b in ["vaes512", "vaes256", "aesni"] {
        let (Some(big), Some(small), Some(c)) = (rate(b, 4096), rate(b, 512), ceiling(b)) else {
            continue;
        };
        let (big, small) = (100.0 * big / c, 100.0 * small / c);
        let verdict = if big >= 90.0 && small >= 85.0 {
            "met"
        } else {
            "NOT MET"
        };
        let (mark, which) = if best == Some(b) {
            (verdict, " (the backend used on this CPU)")
        } else if b == "aesni" {
            (verdict, "")
        } else {
            ("info", " (not used on this CPU, not judged)")
        };
        lines.push(format!(
            "  [{mark}] XTS {b}{which} >= 90% / 85% of the round ceiling at 4 KiB / 512 B: {big:.1}% / {small:.1}%"
        ));
    }
    lines
}

/// `cargo xtask check-mem`: the peak resident memory of the qcow2 check on
/// a 4 TiB sparse image (a few clusters written far apart) and on a 1 GiB
/// image with every cluster written, each checked in its own process
/// (`check-mem` reads its own `VmHWM`). Reports the figures against the
/// 64 MiB budget; not a timed test.
pub(crate) fn check_mem() -> Result<(), String> {
    run(
        "build check-mem (release)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "qimg-bench",
            "--bin",
            "check-mem",
        ]),
    )?;
    let bin = root().join("target").join("release").join("check-mem");
    let dir = root().join("target").join("tmp").join("check-mem");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sparse = dir.join("sparse-4t.qcow2");
    let full = dir.join("full-1g.qcow2");
    let path = |p: &Path| p.display().to_string();
    run(
        "qemu-img create 4 TiB",
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", &path(&sparse), "4T"]),
    )?;
    run(
        "qemu-io: clusters across the 4 TiB",
        Command::new("qemu-io").args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 1T 1M",
            "-c",
            "write -P 3 3T 1M",
            "-c",
            "write -P 4 4095G 1M",
            &path(&sparse),
        ]),
    )?;
    run(
        "qemu-img create 1 GiB",
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", &path(&full), "1G"]),
    )?;
    run(
        "qemu-io: write all of 1 GiB",
        Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xa5 0 1G", &path(&full)]),
    )?;
    let mut worst = 0u64;
    for img in [&sparse, &full] {
        let line = stdout_of(Command::new(&bin).arg(img))?;
        print!("{line}");
        let kib = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peak_rss_kib="))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("check-mem printed no peak_rss_kib")?;
        worst = worst.max(kib);
    }
    for p in [&sparse, &full] {
        let _ = std::fs::remove_file(p);
    }
    println!(
        "check-mem: worst peak RSS {:.1} MiB (budget 64 MiB)",
        worst as f64 / 1024.0
    );
    if worst > 64 * 1024 {
        return Err(format!("peak RSS {worst} KiB exceeds 64 MiB"));
    }
    Ok(())
}

/// `cargo xtask bench-commit`: `qemu-img commit` against `qimg commit` of
/// identical overlays (a 1 GiB raw base, a qcow2 overlay holding `mib`
/// MiB written by qemu-io, plus a zeroed MiB and a partial cluster),
/// `runs` rounds, alternating which tool goes first; prints each run's
/// seconds and the overlays' disk usage (st_blocks * 512) afterwards,
/// then the median times and their ratio. Every round checks that qimg's
/// committed base is byte-identical to qemu-img's, that both overlays
/// read the same, and that qemu-img finds qimg's overlay clean: a fast
/// but wrong commit fails the bench. So does an overlay left more than
/// 1 MiB larger than qemu-img's.
pub(crate) fn commit(mib: u64, runs: usize) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if mib == 0 || mib > 1020 {
        return Err(format!("--mib {mib}: the base is 1 GiB; give 1..=1020"));
    }
    run(
        "build qimg (release)",
        cargo().args(["build", "--release", "-p", "qimg-cli", "--bin", "qimg"]),
    )?;
    let qimg = root().join("target").join("release").join("qimg");
    let work = std::env::temp_dir().join("qimg-bench-commit");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let path = |p: &Path| p.display().to_string();
    let du = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.blocks() * 512)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let script = commit_script(mib);
    let make = |tool: &str| -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
        let base = work.join(format!("{tool}-base.raw"));
        let top = work.join(format!("{tool}-top.qcow2"));
        let _ = std::fs::remove_file(&base);
        let _ = std::fs::remove_file(&top);
        stdout_of(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "raw",
            &path(&base),
            "1G",
        ]))?;
        stdout_of(Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &path(&base),
            &path(&top),
        ]))?;
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for c in &script {
            io.args(["-c", c]);
        }
        stdout_of(io.arg(&top))?;
        Ok((base, top))
    };
    println!("\ncommit of a {mib} MiB overlay into a 1 GiB raw base, {runs} rounds");
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    let mut worst_du = 0i64;
    for round in 0..runs {
        let mut order = ["qemu-img", "qimg"];
        if round % 2 == 1 {
            order.reverse();
        }
        let mut after = [0u64; 2];
        for tool in order {
            let (_, top) = make(tool)?;
            let before = du(&top)?;
            let mut cmd = if tool == "qimg" {
                Command::new(&qimg)
            } else {
                Command::new("qemu-img")
            };
            cmd.args(["commit", "-q", &path(&top)]);
            let start = Instant::now();
            stdout_of(&mut cmd)?;
            let secs = start.elapsed().as_secs_f64();
            let a = du(&top)?;
            println!(
                "round {} {tool:<9} {secs:>6.2}s   overlay du -B1 {before:>11} before, {a:>9} after",
                round + 1
            );
            let i = usize::from(tool == "qimg");
            after[i] = a;
            [&mut theirs, &mut ours][i].push(secs);
        }
        // The results must agree before the times mean anything.
        let file = |t: &str, f: &str| work.join(format!("{t}-{f}"));
        let (qb, mb) = (file("qemu-img", "base.raw"), file("qimg", "base.raw"));
        let (qt, mt) = (file("qemu-img", "top.qcow2"), file("qimg", "top.qcow2"));
        commit_results_agree(&qb, &mb, &qt, &mt)
            .map_err(|e| format!("round {}: {e}", round + 1))?;
        let diff = i64::try_from(after[1]).unwrap_or(i64::MAX)
            - i64::try_from(after[0]).unwrap_or(i64::MAX);
        if diff.abs() > worst_du.abs() {
            worst_du = diff;
        }
    }
    for tool in ["qemu-img", "qimg"] {
        for f in ["base.raw", "top.qcow2"] {
            let _ = std::fs::remove_file(work.join(format!("{tool}-{f}")));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (t, o) = (median(&mut theirs), median(&mut ours));
    println!("median: qemu-img {t:.2}s, qimg {o:.2}s");
    println!("qimg / qemu-img median time ratio: {:.2}", o / t.max(1e-9));
    println!(
        "content: qimg's base byte-identical to qemu-img's, overlays compare equal, check clean"
    );
    println!("overlay du after, qimg minus qemu-img (worst round): {worst_du} bytes (limit 1 MiB)");
    if worst_du.abs() > 1 << 20 {
        return Err(format!(
            "qimg's overlay is {worst_du} bytes larger than qemu-img's after commit"
        ));
    }
    Ok(())
}

/// The qemu-io commands that fill a commit overlay with `mib` MiB:
/// random-ish data (qemu-io's pattern changes every 64 MiB), then a zeroed
/// MiB and 4 KiB in the middle of a cluster. The overlay must be at least
/// `mib + 3` MiB large.
pub(crate) fn commit_script(mib: u64) -> Vec<String> {
    let mut script = Vec::new();
    let mut at = 0u64;
    while at < mib {
        let n = (mib - at).min(64);
        script.push(format!("write -P {} {at}M {n}M", 1 + at / 64 % 250));
        at += n;
    }
    script.push(format!("write -z {mib}M 1M"));
    script.push(format!("write -P 251 {} 4k", ((mib + 2) << 20) + 20480));
    script
}

/// After qemu-img committed overlay `qt` into base `qb` and qimg committed
/// the identical overlay `mt` into `mb`: the bases must be byte-identical,
/// the overlays must read the same, and qemu-img must find qimg's overlay
/// clean.
pub(crate) fn commit_results_agree(
    qb: &Path,
    mb: &Path,
    qt: &Path,
    mt: &Path,
) -> Result<(), String> {
    let same = std::fs::read(qb).map_err(|e| format!("{}: {e}", qb.display()))?
        == std::fs::read(mb).map_err(|e| format!("{}: {e}", mb.display()))?;
    if !same {
        return Err(format!(
            "qimg's committed base {} differs from qemu-img's {}",
            mb.display(),
            qb.display()
        ));
    }
    stdout_of(
        Command::new("qemu-img")
            .arg("compare")
            .arg("-q")
            .arg(qt)
            .arg(mt),
    )
    .map_err(|e| format!("overlays read differently: {e}"))?;
    stdout_of(Command::new("qemu-img").arg("check").arg("-q").arg(mt))
        .map_err(|e| format!("qemu-img check of qimg's overlay: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::xts_targets;

    #[test]
    fn xts_targets_judge_both_sector_sizes_and_name_the_backend_in_use() {
        let rate = |b: &str, s: u32| match (b, s) {
            ("vaes512", 4096) => Some(15.2),
            ("vaes512", 512) => Some(14.3),
            ("vaes256", 4096) => Some(15.2),
            ("vaes256", 512) => Some(14.27),
            ("aesni", 4096) => Some(7.6),
            ("aesni", 512) => Some(7.1),
            _ => None,
        };
        let ceiling = |b: &str| Some(if b == "aesni" { 8.4 } else { 16.8 });
        let lines = xts_targets(Some("vaes512"), rate, ceiling);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].starts_with("  [met] XTS vaes512 (the backend used on this CPU)")
                && lines[0].ends_with("90.5% / 85.1%"),
            "{}",
            lines[0]
        );
        // 4 KiB met, 512 B at 84.94%: not printed as 85%; the width this
        // CPU does not use is not judged.
        assert!(
            lines[1].starts_with("  [info] XTS vaes256 (not used on this CPU, not judged) >=")
                && lines[1].ends_with("90.5% / 84.9%"),
            "{}",
            lines[1]
        );
        // AES-NI is judged whichever backend is used: 512 B at 84.5%.
        assert!(
            lines[2].starts_with("  [NOT MET] XTS aesni >=") && lines[2].ends_with("90.5% / 84.5%"),
            "{}",
            lines[2]
        );
        // On a CPU whose engine uses VAES-256, that width is the judged one.
        let lines = xts_targets(Some("vaes256"), rate, ceiling);
        assert!(
            lines[0].starts_with("  [info] XTS vaes512")
                && lines[1].starts_with("  [NOT MET] XTS vaes256 (the backend used"),
            "{lines:?}"
        );
    }
}
