//! The cores' feature levels: what each one links (`feature_checks`, part
//! of `cargo xtask nostd` and so of `ci`) and how big the no-alloc smoke
//! binary is at each (`cargo xtask core-sizes`).

use crate::{cargo, run, BARE_METAL};

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
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo tree -p {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
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
