//! Writes the fuzz seed corpora (`cargo xtask fuzz` runs this when a
//! target's corpus folder is missing): real images made by qemu-img and
//! cryptsetup, the third-party images of `../shared/testdata`, and
//! compressed clusters from qcow-core's own compressor.
//!
//! Usage: `fuzz-seeds OUT_DIR` (creates `OUT_DIR/TARGET/` folders).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use qimg_tests::qemu::{pattern, Qemu};
use qimg_tests::{run_ok, testdata, tool, unxz};

/// Image seeds are cut to this (the structures of a small image live at its
/// front, and a lean corpus is cheap to keep in git and replay in CI); the
/// same bound is `cargo xtask fuzz`'s `-max_len` for the image targets.
pub const MAX_IMAGE_SEED: usize = 64 << 10;
/// LUKS seeds keep the header and the first key slot's material of a
/// 256-bit-key volume.
pub const MAX_LUKS_SEED: usize = 160 << 10;
/// Everything else.
const MAX_SEED: usize = 64 << 10;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: fuzz-seeds OUT_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut images = Vec::new();

    let qemu = Qemu::find().expect("qemu-img and qemu-io are needed for the seeds");
    let data = qimg_tests::qemu::write_tmp(t, "data.bin", &pattern(96 * 1024, 7, 3));
    let variants: &[(&str, &str)] = &[
        ("v2-512", "compat=0.10,cluster_size=512"),
        ("v3-512", "compat=1.1,cluster_size=512"),
        ("v3-4k-rc1", "cluster_size=4096,refcount_bits=1"),
        ("v3-4k-rc64", "cluster_size=4096,refcount_bits=64"),
        ("v3-xl2", "cluster_size=16384,extended_l2=on"),
        ("v3-lazy", "cluster_size=4096,lazy_refcounts=on"),
        (
            "v3-backing",
            "cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2",
        ),
        ("v3-datafile", "cluster_size=4096,data_file=ext.raw"),
        ("v3-meta", "cluster_size=4096,preallocation=metadata"),
    ];
    for (name, opts) in variants {
        let p = t.join(format!("{name}.qcow2"));
        // qemu-io resolves a relative data file name against its working
        // directory, so the seed names it absolutely.
        let opts = opts.replace(
            "data_file=ext.raw",
            &format!("data_file={}", t.join("ext.raw").display()),
        );
        let mut cmd = Command::new("qemu-img");
        cmd.current_dir(t)
            .args(["create", "-q", "-f", "qcow2", "-u", "-o", &opts]);
        run_ok(cmd.arg(&p).arg("128k"));
        if !opts.contains("preallocation") && !opts.contains("backing") {
            qemu.write_file(&p, "qcow2", 4096, &data);
            qemu.io(&p, "qcow2", &["write -z 8k 4k", "discard 16k 4k"]);
        }
        images.push(p);
    }
    // Compressed clusters (zlib and zstd), snapshots and a bitmap.
    let raw = t.join("src.raw");
    std::fs::write(&raw, pattern(128 * 1024, 11, 4)).unwrap();
    for ty in ["zlib", "zstd"] {
        let p = t.join(format!("comp-{ty}.qcow2"));
        let o = format!("cluster_size=4096,compression_type={ty}");
        qemu.convert(&["-q", "-c", "-O", "qcow2", "-o", &o], &raw, &p);
        images.push(p);
    }
    let snap = t.join("snap.qcow2");
    qemu.create(&snap, "qcow2", "cluster_size=4096", "128k");
    qemu.write_file(&snap, "qcow2", 0, &data);
    qemu.img(&["snapshot", "-c", "one", snap.to_str().unwrap()]);
    qemu.io(&snap, "qcow2", &["write -P 0x5a 0 8k"]);
    qemu.img(&["snapshot", "-c", "two", snap.to_str().unwrap()]);
    qemu.img(&["bitmap", "--add", snap.to_str().unwrap(), "b0"]);
    images.push(snap);
    for f in [
        "bios-tables-test.x86_64.iso.qcow2",
        "bios-tables-test.arm.iso.qcow2",
    ] {
        if let Some(p) = testdata(&format!("qemu/{f}")) {
            images.push(p);
        }
    }

    let qcow_dir = dir(&out, "qcow2_image");
    let check_dir = dir(&out, "qcow2_check");
    let hdr_dir = dir(&out, "qcow2_header");
    let ent_dir = dir(&out, "qcow2_entries");
    for (i, p) in images.iter().enumerate() {
        let bytes = std::fs::read(p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        seed_max(&qcow_dir, &name, &bytes, MAX_IMAGE_SEED);
        seed_max(&check_dir, &name, &bytes, MAX_IMAGE_SEED);
        seed(&hdr_dir, &name, &bytes[..bytes.len().min(4096)]);
        // Entries: a selector byte, then a few KiB of the image (its L1,
        // L2 and refcount tables live near the front of a small image).
        let mut e = vec![u8::try_from(i % 256).unwrap()];
        e.extend_from_slice(&bytes[..bytes.len().min(8192)]);
        seed(&ent_dir, &name, &e);
    }

    // Compressed clusters from qcow-core's compressor, for each type and
    // cluster size the harness selects with its first byte.
    let comp_dir = dir(&out, "qcow2_compressed");
    for shift in [0u8, 3, 7] {
        let cluster = 512usize << shift;
        let plain = pattern(cluster, u64::from(shift) + 1, 2);
        for ty in [0u8, 1] {
            if let Some(c) = qcow_core::compress::compress(ty, &plain) {
                let mut s = vec![shift << 1 | ty];
                s.extend_from_slice(&c);
                seed(&comp_dir, &format!("t{ty}-c{cluster}"), &s);
            }
        }
    }

    // LUKS1: volumes cryptsetup formats with the harness's passphrase, and
    // the third-party headers.
    let luks_dir = dir(&out, "luks1_unlock");
    if let Some(cs) = tool("cryptsetup") {
        let pass = qimg_tests::qemu::write_tmp(t, "pass", qimg_tests::fuzzing::FUZZ_PASSPHRASE);
        for (name, cipher, bits, hash) in [
            ("xts", "aes-xts-plain64", "256", "sha256"),
            ("cbc-plain", "aes-cbc-plain", "128", "sha512"),
            ("cbc-essiv", "aes-cbc-essiv:sha256", "128", "sha1"),
        ] {
            let p = t.join(format!("luks-{name}.img"));
            std::fs::write(&p, vec![0u8; 2 << 20]).unwrap();
            run_ok(
                Command::new(&cs)
                    .args(["luksFormat", "-q", "--type", "luks1", "--cipher", cipher])
                    .args(["--key-size", bits, "--hash", hash])
                    .args(["--pbkdf-force-iterations", "1000", "--key-file"])
                    .arg(&pass)
                    .arg(&p),
            );
            seed_max(
                &luks_dir,
                &format!("cryptsetup-{name}"),
                &std::fs::read(&p).unwrap(),
                MAX_LUKS_SEED,
            );
        }
    }
    for f in [
        "evil_hdr-keyslot_overlap.xz",
        "evil_hdr-luks_hdr_damage.xz",
        "evil_hdr-payload_overwrite.xz",
        "evil_hdr-small_luks_device.xz",
        "evil_hdr-stripes_payload_dmg.xz",
        "valid_header_file.xz",
    ] {
        if let Some(src) = testdata(&format!("cryptsetup/{f}")) {
            let p = unxz(&src, t);
            seed_max(
                &luks_dir,
                f.trim_end_matches(".xz"),
                &std::fs::read(p).unwrap(),
                MAX_LUKS_SEED,
            );
        }
    }

    // LUKS2: volumes cryptsetup formats (PBKDF2, and Argon2id within the
    // harness's memory), and the third-party LUKS2 images.
    let luks2_dir = dir(&out, "luks2_unlock");
    if let Some(cs) = tool("cryptsetup") {
        let pass = qimg_tests::qemu::write_tmp(t, "pass2", qimg_tests::fuzzing::FUZZ_PASSPHRASE);
        for (name, pbkdf) in [
            (
                "pbkdf2",
                &["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"][..],
            ),
            (
                "argon2id",
                &[
                    "--pbkdf",
                    "argon2id",
                    "--pbkdf-memory",
                    "64",
                    "--pbkdf-force-iterations",
                    "4",
                ][..],
            ),
        ] {
            let p = t.join(format!("luks2-{name}.img"));
            std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
            run_ok(
                Command::new(&cs)
                    .args(["luksFormat", "-q", "--type", "luks2"])
                    .args(["--cipher", "aes-cbc-essiv:sha256", "--key-size", "128"])
                    .args(pbkdf)
                    .arg("--key-file")
                    .arg(&pass)
                    .arg(&p),
            );
            seed_max(
                &luks2_dir,
                &format!("cryptsetup-{name}"),
                &std::fs::read(&p).unwrap(),
                MAX_LUKS_SEED,
            );
        }
    }
    for f in [
        "luks2_valid_hdr.img.xz",
        "luks2_invalid_cipher.img.xz",
        "compatimage2.img.xz",
    ] {
        if let Some(src) = testdata(&format!("cryptsetup/{f}")) {
            let p = unxz(&src, t);
            seed_max(
                &luks2_dir,
                f.trim_end_matches(".img.xz"),
                &std::fs::read(p).unwrap(),
                MAX_LUKS_SEED,
            );
        }
    }

    let cli_dir = dir(&out, "cli_options");
    for (i, s) in [
        "cluster_size=64k,refcount_bits=16,compat=1.1",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "secret,id=sec0,data=hunter2",
        "secret,id=s1,file=/tmp/k,format=base64",
        "qom-type=secret,id=a,,b,data=x,,y",
        "1.5G",
        "512",
        "backing_file=a,,b.qcow2,backing_fmt=qcow2,lazy_refcounts",
    ]
    .iter()
    .enumerate()
    {
        seed(&cli_dir, &format!("s{i}"), s.as_bytes());
    }
    println!("seeds written under {}", out.display());
}

fn dir(out: &Path, target: &str) -> PathBuf {
    let d = out.join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn seed(dir: &Path, name: &str, bytes: &[u8]) {
    seed_max(dir, name, bytes, MAX_SEED);
}

fn seed_max(dir: &Path, name: &str, bytes: &[u8], max: usize) {
    std::fs::write(
        dir.join(format!("seed-{name}")),
        &bytes[..bytes.len().min(max)],
    )
    .unwrap();
}
