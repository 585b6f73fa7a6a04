//! The cores' feature levels: what each one links (`feature_checks`, part
//! of `cargo xtask nostd` and so of `ci`) and how big the no-alloc smoke
//! binary is at each (`cargo xtask core-sizes`).

use std::path::PathBuf;
use std::process::Command;

use crate::{cargo, root, run, BARE_METAL};

/// Crates a plaintext qcow2 reader must not link: ciphers and modes,
/// hashes, MACs and KDFs. A name ending in `*` is a prefix.
const NO_CRYPTO: &[&str] = &[
    "aes",
    "xts-mode",
    "serpent",
    "twofish",
    "cbc",
    "ecb",
    "cipher",
    "pbkdf2",
    "hmac",
    "digest",
    "sha*",
    "whirlpool",
    "ripemd",
    "argon2",
    "blake2",
    "md-5",
];

/// Crates a LUKS1-only build must not link.
const NO_ARGON2: &[&str] = &["argon2", "blake2"];

/// The normal (non-dev, non-build) dependency crates of `package` built
/// with `features` (`cargo tree -e normal`), one name each.
fn dependency_names(package: &str, features: &[&str]) -> Result<Vec<String>, String> {
    let mut cmd = cargo();
    cmd.args([
        "tree",
        "-p",
        package,
        "--no-default-features",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let mut names: Vec<String> = crate::bench::stdout_of(&mut cmd)?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn forbidden_in(names: &[String], forbidden: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            forbidden.iter().any(|f| match f.strip_suffix('*') {
                Some(prefix) => n.starts_with(prefix),
                None => n.as_str() == *f,
            })
        })
        .cloned()
        .collect()
}

/// Fails when a feature level links a crate it must not: plaintext qcow-core
/// (no default features) no cipher, hash or KDF; LUKS1-only luks-core no
/// Argon2. Then builds those levels for the bare-metal target.
pub(crate) fn feature_checks() -> Result<(), String> {
    eprintln!("xtask: == feature levels link only what they need (cargo tree)");
    let levels: [(&str, &[&str], &[&str], &str); 3] = [
        ("qcow-core", &[], NO_CRYPTO, "plaintext qcow-core"),
        ("luks-core", &[], NO_CRYPTO, "luks-core without features"),
        ("luks-core", &["luks1"], NO_ARGON2, "LUKS1-only luks-core"),
    ];
    for (package, features, forbidden, what) in levels {
        let names = dependency_names(package, features)?;
        let bad = forbidden_in(&names, forbidden);
        if !bad.is_empty() {
            return Err(format!("{what} links {}", bad.join(", ")));
        }
        eprintln!("xtask:    {what}: {}", names.join(" "));
    }
    for (package, features) in [
        ("qcow-core", ""),
        ("qcow-core", "encryption"),
        ("luks-core", "luks1"),
    ] {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "-p",
            package,
            "--target",
            BARE_METAL,
            "--no-default-features",
        ]);
        if !features.is_empty() {
            cmd.args(["--features", features]);
        }
        run(
            &format!("bare-metal build, {package} features [{features}]"),
            &mut cmd,
        )?;
    }
    Ok(())
}

/// The no-alloc smoke binary's three builds: (name, features).
const SMOKE_BUILDS: [(&str, &str); 3] = [
    ("plaintext qcow2", ""),
    ("+ LUKS1 (qcow2 LUKS, raw LUKS1)", "luks1"),
    ("everything (+ LUKS2, Argon2)", "luks2"),
];

/// Builds tests/nostd-smoke (no global allocator, release) once per
/// feature level and keeps each binary: (name, path).
pub(crate) fn smoke_builds() -> Result<Vec<(&'static str, PathBuf)>, String> {
    let smoke = root().join("tests").join("nostd-smoke");
    let target = smoke.join("target");
    let kept = target.join("sizes");
    std::fs::create_dir_all(&kept).map_err(|e| format!("{}: {e}", kept.display()))?;
    let mut built = Vec::new();
    for (name, features) in SMOKE_BUILDS {
        // Release: the debug build of the hash crates hits an LLVM
        // limitation on this soft-float target.
        let mut cmd = cargo();
        cmd.current_dir(&smoke)
            .args(["build", "--release", "--target", BARE_METAL])
            .env("CARGO_TARGET_DIR", &target);
        if !features.is_empty() {
            cmd.args(["--features", features]);
        }
        run(
            &format!("bare-metal binary without an allocator (tests/nostd-smoke), {name}"),
            &mut cmd,
        )?;
        let bin = target.join(BARE_METAL).join("release").join("nostd-smoke");
        let copy = kept.join(if features.is_empty() {
            "plaintext"
        } else {
            features
        });
        std::fs::copy(&bin, &copy)
            .map_err(|e| format!("{} -> {}: {e}", bin.display(), copy.display()))?;
        built.push((name, copy));
    }
    Ok(built)
}

/// The text section's size from `size` (Berkeley format), if the tool runs.
fn text_size(bin: &std::path::Path) -> Option<u64> {
    let out = Command::new("size").arg(bin).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().next()?.parse().ok()
}

/// `cargo xtask core-sizes`: the no-alloc smoke binary's size (bytes of the
/// file, and its text section when `size` is installed) at each feature
/// level.
pub(crate) fn core_sizes() -> Result<(), String> {
    let built = smoke_builds()?;
    println!("nostd-smoke ({BARE_METAL}, release, no allocator):");
    println!("{:<34} {:>10} {:>10}", "build", "file bytes", "text bytes");
    for (name, bin) in built {
        let bytes = std::fs::metadata(&bin)
            .map_err(|e| format!("{}: {e}", bin.display()))?
            .len();
        let text = text_size(&bin).map_or_else(|| "-".to_owned(), |t| t.to_string());
        println!("{name:<34} {bytes:>10} {text:>10}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_names_and_prefixes() {
        let names: Vec<String> = [
            "heapless",
            "sha2",
            "sha1",
            "argon2",
            "miniz_oxide",
            "aes-gcm",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(forbidden_in(&names, NO_CRYPTO), ["sha2", "sha1", "argon2"]);
        assert_eq!(forbidden_in(&names, NO_ARGON2), ["argon2"]);
        assert!(forbidden_in(&names[..1], NO_CRYPTO).is_empty());
    }
}
