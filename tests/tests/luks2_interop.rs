//! LUKS2 interop with cryptsetup: volumes cryptsetup formats (PBKDF2,
//! Argon2i, Argon2id; 512- and 4096-byte sectors; detached headers) open
//! in luks-core with the volume key cryptsetup dumps, and volumes
//! luks-core formats pass cryptsetup's passphrase test and dump, and
//! open in luks-core with a key cryptsetup added.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use luks_core::io::FileDevice;
use luks_core::luks2;
use luks_core::luks2::write::{self, FormatParams, KdfParams};
use luks_core::{BlockIo, HashAlg, LuksVolume};
use qimg_tests::cryptsetup::{Cryptsetup, PBKDF2_FAST};
use qimg_tests::luks2::{header, memory};
use qimg_tests::{hex, run_ok, sparse_file, tool, OsRng};

const PW: &str = "luks2-interop";

#[test]
fn cryptsetup_formats_open_in_luks_core() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PW).unwrap();
    let cases: [(&str, &[&str], bool); 4] = [
        (
            "pbkdf2-512",
            &[
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--sector-size",
                "512",
            ],
            false,
        ),
        (
            "argon2i-4096",
            &[
                "--pbkdf",
                "argon2i",
                "--pbkdf-memory",
                "32768",
                "--pbkdf-force-iterations",
                "4",
                "--sector-size",
                "4096",
            ],
            false,
        ),
        (
            "argon2id-4096",
            &[
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "32768",
                "--pbkdf-force-iterations",
                "4",
                "--pbkdf-parallel",
                "2",
                "--sector-size",
                "4096",
            ],
            false,
        ),
        ("detached-pbkdf2", PBKDF2_FAST, true),
    ];
    for (name, extra, detached) in cases {
        let file = dir.path().join(name);
        sparse_file(&file, 20 << 20);
        let hdr = dir.path().join(format!("{name}.hdr"));
        let hdr_arg = detached.then_some(hdr.as_path());
        cs.format(
            &file,
            hdr_arg,
            &key,
            &[&["--type", "luks2"], extra].concat(),
        );
        let want = cs.volume_key(&file, hdr_arg, &key);
        assert!(want.len() >= 32, "{name}: {want}");
        let hpath = if detached { &hdr } else { &file };
        let mut hdev = FileDevice::open(hpath).unwrap();
        let h = header(&mut hdev);
        let mut mem = memory(&h);
        let (vk, _) = luks2::unlock(&mut hdev, &h, PW.as_bytes(), None, &mut mem).unwrap();
        assert_eq!(hex(vk.as_bytes()), want, "{name}");
        // Payload through the volume (data device = the file).
        let data = FileDevice::open_rw(&file).unwrap();
        let mut vol = LuksVolume::open_luks2(data, &h, &vk).unwrap();
        // cryptsetup picks 4096-byte sectors for files when not told.
        let ss = if name.ends_with("512") { 512 } else { 4096 };
        assert_eq!(vol.sector_size(), ss, "{name}");
        let expect_off = if detached { 0 } else { 16 << 20 };
        assert_eq!(h.meta.data_segment().unwrap().offset, expect_off, "{name}");
        let buf: Vec<u8> = (0..8192u32)
            .map(|i| u8::try_from(i * 7 % 256).unwrap())
            .collect();
        vol.write_at(0, &buf).unwrap();
        let mut back = vec![0u8; 8192];
        vol.read_at(0, &mut back).unwrap();
        assert_eq!(back, buf);
    }
}

#[test]
fn luks_core_formats_pass_cryptsetup() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PW).unwrap();
    let key2 = dir.path().join("key2");
    std::fs::write(&key2, "added by cryptsetup").unwrap();
    let argon = KdfParams::Argon2 {
        id: true,
        time: 2,
        memory_kib: 1024,
        cpus: 1,
    };
    let pb = KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    };
    let cases = [
        ("pb-512-16k", pb, 512u32, 0x4000u64, false),
        ("argon-4096-64k", argon, 4096, 0x1_0000, false),
        ("pb-4m-detached", pb, 512, 0x40_0000, true),
    ];
    for (name, kdf, sector_size, hdr_size, detached) in cases {
        let file = dir.path().join(name);
        let hdr = dir.path().join(format!("{name}.hdr"));
        let hpath = if detached { &hdr } else { &file };
        let params = FormatParams {
            kdf,
            sector_size,
            hdr_size,
            data_offset: if detached { Some(0) } else { None },
            ..FormatParams::default()
        };
        let mut dev = FileDevice::create(hpath).unwrap();
        let (_, _, vk) =
            write::format(&mut dev, &params, None, PW.as_bytes(), &mut OsRng::new()).unwrap();
        drop(dev);
        if detached {
            sparse_file(&file, 1 << 20);
        } else {
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.set_len((17 << 20) + 65536).unwrap();
        }
        let hdr_arg = detached.then_some(hdr.as_path());
        cs.assert_opens(&file, hdr_arg, &key);
        let dump = cs.dump(hpath);
        assert!(dump.contains("Version:       \t2"), "{name}: {dump}");
        assert!(
            dump.contains(&format!("sector: {sector_size} [bytes]")),
            "{dump}"
        );
        assert_eq!(
            cs.volume_key(&file, hdr_arg, &key),
            hex(vk.as_bytes()),
            "{name}"
        );
        // cryptsetup adds a key; luks-core opens with it.
        cs.add_key(&file, hdr_arg, &key, &key2, PBKDF2_FAST);
        let mut hdev = FileDevice::open(hpath).unwrap();
        let h = header(&mut hdev);
        assert_eq!(h.hdr.seqid, 2, "{name}");
        let mut mem = memory(&h);
        let (k2, slot) =
            luks2::unlock(&mut hdev, &h, b"added by cryptsetup", None, &mut mem).unwrap();
        assert_eq!(slot, 1);
        assert_eq!(k2.as_bytes(), vk.as_bytes());
    }
}

/// IVs count 512-byte units even with 4096-byte sectors: a sector qimg
/// writes into a cryptsetup volume (aes-cbc-plain64, 4096-byte sectors)
/// decrypts with openssl's own AES-CBC under IV = 8 * sector number.
#[test]
fn large_sector_ivs_are_in_512_byte_units() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PW).unwrap();
    let file = dir.path().join("cbc4k");
    sparse_file(&file, 17 << 20);
    cs.format(
        &file,
        None,
        &key,
        &[
            "--type",
            "luks2",
            "--cipher",
            "aes-cbc-plain64",
            "--key-size",
            "256",
            "--sector-size",
            "4096",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ],
    );
    let vk_hex = cs.volume_key(&file, None, &key);
    let mut dev = FileDevice::open_rw(&file).unwrap();
    let h = header(&mut dev);
    let (vk, _) = luks2::unlock(&mut dev, &h, PW.as_bytes(), None, &mut []).unwrap();
    assert_eq!(hex(vk.as_bytes()), vk_hex);
    let plain: Vec<u8> = (0..4096u32)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    let mut vol = LuksVolume::open_luks2(dev, &h, &vk).unwrap();
    // Volume sector 3 (bytes 12288..16384): IV 24 in 512-byte units.
    vol.write_at(3 * 4096, &plain).unwrap();
    drop(vol);
    let raw = std::fs::read(&file).unwrap();
    let at = usize::try_from(h.meta.data_segment().unwrap().offset).unwrap() + 3 * 4096;
    let ct = dir.path().join("ct");
    std::fs::write(&ct, &raw[at..at + 4096]).unwrap();
    let pt = dir.path().join("pt");
    run_ok(
        Command::new(&openssl)
            .args(["enc", "-d", "-aes-256-cbc", "-nopad", "-K", &vk_hex, "-iv"])
            .arg(format!("{:032x}", 24u128.swap_bytes()))
            .arg("-in")
            .arg(&ct)
            .arg("-out")
            .arg(&pt),
    );
    assert_eq!(std::fs::read(&pt).unwrap(), plain);
}

/// Every metadata size luks-core writes (16 KiB .. 4 MiB) is one cryptsetup
/// reads and opens.
#[test]
fn every_metadata_size_passes_cryptsetup() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PW).unwrap();
    for hdr_size in luks2::HDR_SIZES {
        let file = dir.path().join(format!("m{hdr_size}"));
        let params = FormatParams {
            hdr_size,
            key_bytes: 32,
            ..FormatParams::default()
        };
        let mut dev = FileDevice::create(&file).unwrap();
        write::format(&mut dev, &params, None, PW.as_bytes(), &mut OsRng::new()).unwrap();
        drop(dev);
        cs.assert_opens(&file, None, &key);
        let dump = cs.dump(&file);
        assert!(
            dump.contains(&format!("Metadata area: \t{hdr_size} [bytes]")),
            "{dump}"
        );
    }
}

/// luks-core adds and removes key slots on volumes cryptsetup made (one
/// with tokens): cryptsetup still validates the header, keeps seeing the
/// tokens, and opens with exactly the passphrases that should open.
#[test]
fn luks_core_key_slots_on_cryptsetup_volumes() {
    let Some(cs) = Cryptsetup::find() else {
        return;
    };
    let Some(src) = qimg_tests::testdata("cryptsetup/luks2_header_requirements.tar.xz") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    qimg_tests::untar_xz(&src, dir.path());
    let img = dir.path().join("luks2_header_requirements_free");
    let old = dir.path().join("old");
    std::fs::write(&old, "blablabl").unwrap();
    let new = dir.path().join("new");
    std::fs::write(&new, "a new passphrase").unwrap();
    let opens = |k: &Path| cs.opens(&img, None, k, None);
    let tokens_before: Vec<String> = cs
        .dump(&img)
        .lines()
        .skip_while(|l| *l != "Tokens:")
        .take_while(|l| *l != "Digests:")
        .map(str::to_string)
        .collect();
    assert!(tokens_before.len() > 2, "{tokens_before:?}");

    let mut dev = FileDevice::open_rw(&img).unwrap();
    let mut json = vec![0u8; luks2::MAX_JSON_LEN];
    let mut h = luks2::read_header(&mut dev, &mut json).unwrap();
    let text = json[..h.json_len].to_vec();
    let seqid = h.hdr.seqid;
    let mut mem = memory(&h);
    let (vk, old_slot) = luks2::unlock(&mut dev, &h, b"blablabl", None, &mut mem).unwrap();
    let pb = KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    };
    let (text, new_slot) = write::add_key(
        &mut dev,
        &mut h,
        &text,
        &vk,
        b"a new passphrase",
        pb,
        None,
        &mut OsRng::new(),
    )
    .unwrap();
    assert_eq!(h.hdr.seqid, seqid + 1);
    assert!(opens(&old) && opens(&new));
    write::remove_key(
        &mut dev,
        &mut h,
        text.as_bytes(),
        old_slot,
        false,
        &mut OsRng::new(),
    )
    .unwrap();
    drop(dev);
    assert!(!opens(&old) && opens(&new));
    let dump = cs.dump(&img);
    assert!(
        dump.contains(&format!("Epoch:         \t{}", seqid + 2)),
        "{dump}"
    );
    assert!(dump.contains(&format!("  {new_slot}: luks2")), "{dump}");
    // The tokens cryptsetup wrote survive (minus references to the
    // removed key slot, which cryptsetup would drop too).
    let tokens_after: Vec<&str> = dump
        .lines()
        .skip_while(|l| *l != "Tokens:")
        .take_while(|l| *l != "Digests:")
        .collect();
    assert_eq!(tokens_after.first(), Some(&"Tokens:"));
    assert!(
        tokens_after.iter().any(|l| l.contains("luks2-keyring")),
        "{dump}"
    );
}
