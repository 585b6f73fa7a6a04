//! The `qimg` binary on LUKS2 volumes beside cryptsetup: volumes qimg
//! creates pass cryptsetup's checks and dump identically, cryptsetup's
//! added keys open them in qimg, and cryptsetup's volumes (attached and
//! detached headers) convert to the payload EXPECTED.md lists.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use qimg_tests::cryptsetup::{Cryptsetup, PBKDF2_FAST};
use qimg_tests::qemu::{pattern, write_tmp};
use qimg_tests::{
    json_of, qimg, qimg_luks_to_raw, run_fails, run_ok, sha256_file, sparse_file, testdata, unxz,
};

const PW: &str = "luks2 cli pass";

fn secret() -> String {
    format!("secret,id=s0,data={PW}")
}

/// Fast LUKS2 options for tests.
const FAST_ARGON: &str =
    "luks-version=2,key-secret=s0,iter-time=10,pbkdf=argon2id,pbkdf-memory=8192,pbkdf-parallel=1,pbkdf-iterations=4";

#[test]
fn qimg_created_luks2_passes_cryptsetup() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", PW.as_bytes());
    let img = dir.path().join("v.luks");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--object", &secret(), "-o"])
            .arg(format!(
                "{FAST_ARGON},sector-size=4096,metadata-size=64k,label=qimgtest"
            ))
            .arg(&img)
            .arg("2M"),
    );
    cs.assert_opens(&img, None, &key);
    // Same text as cryptsetup's luksDump.
    let ours = cs.assert_same_dump(&img);
    assert!(ours.contains("Label:         \tqimgtest"), "{ours}");
    // The JSON metadata itself.
    let j = json_of(qimg().args(["luks", "dump", "--output", "json"]).arg(&img));
    assert_eq!(j["keyslots"]["0"]["kdf"]["type"], "argon2id");
    assert_eq!(j["segments"]["0"]["sector_size"], 4096);
    assert_eq!(j["config"]["json_size"], "61440");
    let info = json_of(qimg().args(["info", "--output", "json"]).arg(&img));
    assert_eq!(info["virtual-size"], 2 << 20);
    assert_eq!(info["format-specific"]["data"]["version"], 2);
}

#[test]
fn qimg_detached_header_opens_in_cryptsetup() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", PW.as_bytes());
    let hdr = dir.path().join("h.img");
    run_ok(
        qimg()
            .args(["create", "-q", "-f", "luks", "--object", &secret(), "-o"])
            .arg(format!("{FAST_ARGON},detached-header=on"))
            .arg(&hdr)
            .arg("1M"),
    );
    let data = dir.path().join("d.img");
    sparse_file(&data, 1 << 20);
    cs.assert_opens(&data, Some(&hdr), &key);
    let ours = cs.assert_same_dump(&hdr);
    assert!(ours.contains("offset: 0 [bytes]"), "{ours}");
    let info = json_of(
        qimg()
            .args(["info", "--output", "json", "--header"])
            .arg(&hdr)
            .arg(&data),
    );
    assert_eq!(info["virtual-size"], 1 << 20);
    // convert cannot make a detached header (it writes the payload).
    let o = qimg()
        .args(["convert", "-O", "luks", "--object", &secret(), "-o"])
        .arg(format!("{FAST_ARGON},detached-header=on"))
        .arg(&data)
        .arg(dir.path().join("x.luks"))
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn convert_through_luks2_and_cryptsetup_added_key() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = write_tmp(dir.path(), "key", PW.as_bytes());
    let key2 = write_tmp(dir.path(), "key2", b"second key");
    // An odd size: the 4096-byte-sector volume holds it zero-padded.
    let data = pattern((3 << 20) + 512, 5, 7);
    let raw = write_tmp(dir.path(), "in.raw", &data);
    let ar = format!("{FAST_ARGON},sector-size=4096");
    for (name, extra) in [
        (
            "pb",
            "luks-version=2,key-secret=s0,iter-time=10,pbkdf=pbkdf2,pbkdf-iterations=1000",
        ),
        ("ar", ar.as_str()),
    ] {
        let img = dir.path().join(format!("{name}.luks"));
        run_ok(
            qimg()
                .args(["convert", "-O", "luks", "--object", &secret(), "-o", extra])
                .arg(&raw)
                .arg(&img),
        );
        cs.add_key(&img, None, &key, &key2, PBKDF2_FAST);
        let out = dir.path().join(format!("{name}.raw"));
        run_ok(&mut qimg_luks_to_raw(&img, None, &key2, &out));
        let back = std::fs::read(&out).unwrap();
        let want = if name == "ar" {
            (3 << 20) + 4096
        } else {
            data.len()
        };
        assert_eq!(back.len(), want, "{name}");
        assert_eq!(&back[..data.len()], &data[..], "{name}");
        assert!(back[data.len()..].iter().all(|&b| b == 0), "{name}");
    }
}

#[test]
fn cryptsetup_luks2_volumes_convert() {
    let dir = tempfile::tempdir().unwrap();
    if let Some(src) = testdata("cryptsetup/compatimage2.img.xz") {
        let img = unxz(&src, dir.path());
        let key = write_tmp(dir.path(), "k", b"0123456789abcdef");
        let out = dir.path().join("c2.raw");
        run_ok(&mut qimg_luks_to_raw(&img, None, &key, &out));
        assert_eq!(
            sha256_file(&out),
            "38ef2d1b8c387efb50680e1d3f234f170d2b7b6c6d9eb856b4f426543a6c4ef2"
        );
        // Unknown requirements: refused with the requirement named.
        let Some(src) = testdata("cryptsetup/luks2_header_requirements.tar.xz") else {
            return;
        };
        qimg_tests::untar_xz(&src, dir.path());
        let key = write_tmp(dir.path(), "k2", b"blablabl");
        let err = run_fails(&mut qimg_luks_to_raw(
            &dir.path().join("luks2_header_requirements"),
            None,
            &key,
            &dir.path().join("req.raw"),
        ));
        assert!(err.contains("req0"), "{err}");
    }
    // A detached header cryptsetup made.
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let key = write_tmp(dir.path(), "kd", PW.as_bytes());
    let file = dir.path().join("data.img");
    sparse_file(&file, 1 << 20);
    let hdr = dir.path().join("data.hdr");
    cs.format(
        &file,
        Some(&hdr),
        &key,
        &[
            "--type",
            "luks2",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
        ],
    );
    let info = json_of(
        qimg()
            .args(["info", "--output", "json", "--header"])
            .arg(&hdr)
            .arg(&file),
    );
    assert_eq!(info["virtual-size"], 1 << 20);
    assert_eq!(info["format-specific"]["data"]["detached-header"], true);
    let out = dir.path().join("d.raw");
    run_ok(&mut qimg_luks_to_raw(&file, Some(&hdr), &key, &out));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1 << 20);
}

/// `qimg luks dump` prints what `cryptsetup luksDump` prints, tokens,
/// unbound key slots, unknown KDFs and requirements included.
#[test]
fn dump_matches_cryptsetup_on_testdata() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for name in [
        "compatimage2.img.xz",
        "luks2_keyslot_unassigned.img.xz",
        "luks2_valid_hdr.img.xz",
    ] {
        let Some(src) = testdata(&format!("cryptsetup/{name}")) else {
            return;
        };
        images.push(unxz(&src, dir.path()));
    }
    let Some(src) = testdata("cryptsetup/luks2_header_requirements.tar.xz") else {
        return;
    };
    qimg_tests::untar_xz(&src, dir.path());
    images.push(dir.path().join("luks2_header_requirements"));
    images.push(dir.path().join("luks2_header_requirements_free"));
    for img in &images {
        cs.assert_same_dump(img);
    }
}

/// Rewrites the JSON text of both header copies of `path` with `f` and
/// recomputes their SHA-256 checksums (a forged but well-formed header).
fn forge_json(path: &Path, f: impl Fn(&str) -> String) {
    use sha2::{Digest, Sha256};
    let mut b = std::fs::read(path).unwrap();
    let hdr_size = usize::try_from(u64::from_be_bytes(b[8..16].try_into().unwrap())).unwrap();
    for at in [0, hdr_size] {
        let area = &mut b[at + 4096..at + hdr_size];
        let end = area.iter().position(|&c| c == 0).unwrap();
        let text = f(std::str::from_utf8(&area[..end]).unwrap());
        area.fill(0);
        area[..text.len()].copy_from_slice(text.as_bytes());
        b[at + 448..at + 512].fill(0);
        let sum = Sha256::digest(&b[at..at + hdr_size]);
        b[at + 448..at + 448 + 32].copy_from_slice(&sum);
    }
    std::fs::write(path, b).unwrap();
}

/// A forged key slot asking for 4 TiB of Argon2 memory gets a clear error
/// (no allocation of that size, no abort).
#[test]
fn forged_argon2_memory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.luks");
    run_ok(
        qimg()
            .args([
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                &secret(),
                "-o",
                FAST_ARGON,
            ])
            .arg(&img)
            .arg("1M"),
    );
    forge_json(&img, |t| {
        t.replace("\"memory\":8192", "\"memory\":4294967295")
    });
    let o = qimg()
        .args(["convert", "-O", "raw", "--object", &secret()])
        .arg(&img)
        .arg(dir.path().join("o.raw"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    // The KDF-cost ceiling (time x memory) refuses it before any memory
    // is asked for, naming the structure and the value.
    assert!(
        err.contains("argon2 time x memory (KiB) 17179869180 is above the ceiling"),
        "{err}"
    );
}
