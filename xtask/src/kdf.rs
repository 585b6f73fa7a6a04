//! `cargo xtask kdf-compare`: the KDF costs qimg chooses for a new LUKS
//! volume beside those cryptsetup (and qemu-img, for LUKS in qcow2) choose
//! on the same machine at the same `iter-time`, with the time
//! `cryptsetup open --test-passphrase` takes on each volume.
//!
//! Every volume uses aes-xts-plain64, a 512-bit key and sha256. Both
//! volumes of a pair are read back with `cryptsetup luksDump`, so one
//! parser reads both. Pass `--bin PATH` to compare a given qimg instead
//! of a release build.
//!
//! Each row ends in a verdict: qimg's slot and digest counts within
//! 0.7-1.4x of the reference's (issue #17). Each LUKS row also times qimg
//! unlocking the cryptsetup-made volume (same costs for both tools;
//! `qimg convert` of its payload), so the
//! speed ratio of cryptsetup's KDF to qimg's is measured here, beside the
//! one `luks_core::luks1::Pbkdf2Reader::speed_ratio_percent` models for
//! PBKDF2 (a drift from it shows as a count outside the range).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::bench::stdout_of;
use crate::{cargo, root, run};

const PASSPHRASE: &str = "kdf-compare";

/// The KDF cost of key slot 0 and the digest, as luksDump prints them.
#[derive(Default, Debug)]
struct Cost {
    /// PBKDF2 iterations of the slot (0 for Argon2).
    iterations: u64,
    /// Argon2 (time, memory KiB, threads).
    argon2: Option<(u64, u64, u64)>,
    /// Volume-key digest iterations.
    digest: u64,
}

/// The first number after `key` on a line of `text`.
fn first_num(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix(key)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

fn dump(vol: &Path) -> Result<Cost, String> {
    let text = stdout_of(Command::new("cryptsetup").arg("luksDump").arg(vol))?;
    let mut c = Cost::default();
    if let Some(d) = first_num(&text, "MK iterations:") {
        // LUKS1: the slot's line is "Iterations:" too.
        c.digest = d;
        c.iterations = first_num(&text, "Iterations:").unwrap_or(0);
        return Ok(c);
    }
    // LUKS2: key slot 0 comes before the digest in the dump.
    if let Some(t) = first_num(&text, "Time cost:") {
        c.argon2 = Some((
            t,
            first_num(&text, "Memory:").unwrap_or(0),
            first_num(&text, "Threads:").unwrap_or(0),
        ));
        c.digest = first_num(&text, "Iterations:").unwrap_or(0);
    } else {
        let mut it = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Iterations:"))
            .filter_map(|v| v.trim().parse().ok());
        c.iterations = it.next().unwrap_or(0);
        c.digest = it.next().unwrap_or(0);
    }
    Ok(c)
}

/// Seconds `cryptsetup open --test-passphrase` takes on `vol`.
fn open_secs(vol: &Path, key: &Path) -> Result<f64, String> {
    let t = Instant::now();
    stdout_of(
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(key)
            .arg(vol),
    )?;
    Ok(t.elapsed().as_secs_f64())
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.2}", a as f64 / b as f64)
    }
}

fn show(c: &Cost) -> String {
    match c.argon2 {
        Some((t, m, p)) => format!("t={t} m={m} p={p}"),
        None => format!("{}", c.iterations),
    }
}

/// The number after `"key":` in `text` (`qemu-img info --output json`).
fn json_num(text: &str, key: &str, img: &Path) -> Result<u64, String> {
    let at = text
        .find(&format!("\"{key}\""))
        .ok_or_else(|| format!("{}: no \"{key}\" in qemu-img info", img.display()))?;
    text[at..]
        .split(':')
        .nth(1)
        .and_then(|v| {
            v.trim()
                .trim_end_matches(',')
                .split(&[',', '\n'][..])
                .next()
        })
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{}: unreadable {key}", img.display()))
}

/// The `iters` of the first key slot and the `master-key-iters` in
/// `qemu-img info --output json`.
fn qcow_iters(img: &Path) -> Result<(u64, u64), String> {
    let text = stdout_of(
        Command::new("qemu-img")
            .args(["info", "--output", "json"])
            .arg(img),
    )?;
    Ok((
        json_num(&text, "iters", img)?,
        json_num(&text, "master-key-iters", img)?,
    ))
}

/// Seconds qimg takes to unlock `vol` (and copy its payload, a few MiB,
/// to a scratch file next to `key`).
fn qimg_open_secs(bin: &Path, vol: &Path, key: &Path) -> Result<f64, String> {
    let out = key.with_extension("payload.raw");
    let _ = std::fs::remove_file(&out);
    let t = Instant::now();
    stdout_of(
        Command::new(bin)
            .args(["convert", "-f", "luks", "-O", "raw", "--key-file"])
            .arg(key)
            .arg(vol)
            .arg(&out),
    )?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    Ok(secs)
}

/// `within` when every ratio `a/b` lies in 0.7..=1.4, else `OUTSIDE`.
fn verdict(pairs: &[(u64, u64)]) -> &'static str {
    let ok = pairs.iter().all(|&(a, b)| {
        b != 0 && {
            let r = a as f64 / b as f64;
            (0.7..=1.4).contains(&r)
        }
    });
    if ok {
        "within 0.7-1.4"
    } else {
        "OUTSIDE 0.7-1.4"
    }
}

/// Runs the comparison; `args` may hold `--bin PATH`.
pub(crate) fn compare(args: &[String]) -> Result<(), String> {
    let bin = match args.iter().position(|a| a == "--bin") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--bin needs a path")?),
        None => {
            run(
                "build qimg (release)",
                cargo().args(["build", "--release", "-p", "qimg-cli", "--bin", "qimg"]),
            )?;
            root().join("target").join("release").join("qimg")
        }
    };
    let dir = std::env::temp_dir().join(format!("qimg-kdf-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = dir.join("key");
    std::fs::write(&key, PASSPHRASE).map_err(|e| format!("{}: {e}", key.display()))?;
    let result = table(&bin, &dir, &key);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn table(bin: &Path, dir: &Path, key: &Path) -> Result<(), String> {
    println!(
        "{:<6} {:>6}  {:<28} {:<28} {:>6}  {:>9} {:>9} {:>6}  {:>8} {:>8}  {:>10}  verdict",
        "format",
        "ms",
        "qimg slot",
        "cryptsetup slot",
        "ratio",
        "qimg mk",
        "cs mk",
        "ratio",
        "qimg s",
        "cs s",
        "speed cs/q"
    );
    let mut verdicts = Vec::new();
    for (ver, ms) in [(1, 1000u32), (1, 2000), (2, 1000), (2, 2000)] {
        let ours = dir.join(format!("q{ver}-{ms}.luks"));
        let theirs = dir.join(format!("c{ver}-{ms}.luks"));
        let _ = std::fs::remove_file(&ours);
        stdout_of(
            Command::new(bin)
                .args(["create", "-q", "-f", "luks", "--key-file"])
                .arg(key)
                .arg("-o")
                .arg(format!(
                    "luks-version={ver},iter-time={ms},cipher-alg=aes-256,cipher-mode=xts,hash-alg=sha256"
                ))
                .arg(&ours)
                .arg("16M"),
        )?;
        std::fs::write(&theirs, vec![0u8; 16 << 20])
            .map_err(|e| format!("{}: {e}", theirs.display()))?;
        stdout_of(
            Command::new("cryptsetup")
                .args(["luksFormat", "-q", "--type", &format!("luks{ver}")])
                .args([
                    "--cipher",
                    "aes-xts-plain64",
                    "--key-size",
                    "512",
                    "--hash",
                    "sha256",
                ])
                .args(["--iter-time", &ms.to_string(), "--key-file"])
                .arg(key)
                .arg(&theirs),
        )?;
        let (a, b) = (dump(&ours)?, dump(&theirs)?);
        let slot = match (a.argon2, b.argon2) {
            (Some((ta, ma, _)), Some((tb, mb, _))) => (ta * ma, tb * mb),
            _ => (a.iterations, b.iterations),
        };
        let mut pairs = vec![slot, (a.digest, b.digest)];
        if let (Some((_, ma, _)), Some((_, mb, _))) = (a.argon2, b.argon2) {
            // Memory on its own too: cryptsetup's 1 GiB cap must be ours.
            pairs.push((ma, mb));
        }
        let cs_theirs = open_secs(&theirs, key)?;
        // Both tools unlocking the same (cryptsetup-made) volume: the speed
        // ratio of their KDFs, start-up included.
        let q_theirs = qimg_open_secs(bin, &theirs, key)?;
        let row = format!("LUKS{ver} {ms}");
        println!(
            "{:<6} {:>6}  {:<28} {:<28} {:>6}  {:>9} {:>9} {:>6}  {:>8.2} {:>8.2}  {:>10.2}  {}",
            format!("LUKS{ver}"),
            ms,
            show(&a),
            show(&b),
            ratio(slot.0, slot.1),
            a.digest,
            b.digest,
            ratio(a.digest, b.digest),
            open_secs(&ours, key)?,
            cs_theirs,
            cs_theirs / q_theirs.max(1e-3),
            verdict(&pairs),
        );
        verdicts.push((row, verdict(&pairs)));
    }
    for ms in [1000u32, 2000] {
        let ours = dir.join(format!("q-{ms}.qcow2"));
        let theirs = dir.join(format!("c-{ms}.qcow2"));
        let opts = format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time={ms}");
        let secret = format!("secret,id=s0,data={PASSPHRASE}");
        for (tool, img) in [(bin, &ours), (Path::new("qemu-img"), &theirs)] {
            let _ = std::fs::remove_file(img);
            stdout_of(
                Command::new(tool)
                    .args([
                        "create", "-q", "-f", "qcow2", "--object", &secret, "-o", &opts,
                    ])
                    .arg(img)
                    .arg("16M"),
            )?;
        }
        let (a, b) = (qcow_iters(&ours)?, qcow_iters(&theirs)?);
        let pairs = [(a.0, b.0), (a.1, b.1)];
        println!(
            "{:<6} {:>6}  {:<28} {:<28} {:>6}  {:>9} {:>9} {:>6}  {:>8} {:>8}  {:>10}  {}",
            "qcow2",
            ms,
            a.0,
            format!("{} (qemu-img)", b.0),
            ratio(a.0, b.0),
            a.1,
            b.1,
            ratio(a.1, b.1),
            "-",
            "-",
            "-",
            verdict(&pairs),
        );
        verdicts.push((format!("qcow2 {ms}"), verdict(&pairs)));
    }
    println!();
    for (row, v) in &verdicts {
        println!("verdict {row}: {v}");
    }
    Ok(())
}
