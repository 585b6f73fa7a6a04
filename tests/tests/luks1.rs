//! Every LUKS1 image of the cryptsetup test suite: unlocks, volume keys and
//! payload hashes from EXPECTED.md, and the broken headers are refused.
//!
//! All 12 images of luks1-images.tar.xz are covered (LRW and
//! xts-essiv:wp256 included).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use luks_core::error::{Error, Problem, Structure};
use luks_core::io::FileDevice;
use luks_core::luks1;
use luks_core::{BlockIo, LuksVolume};
use qimg_tests::{hex, sha256_hex, testdata, untar_xz, unxz};

fn image(dir: &Path, name: &str) -> Option<PathBuf> {
    let src = testdata(&format!("cryptsetup/{name}"))?;
    Some(unxz(&src, dir))
}

/// Unlocks `path` with `pass`, checks the volume key prefix and returns the
/// payload's sha256.
fn unlock_and_hash(path: &Path, pass: &[u8], key_hex: &str) -> String {
    let mut dev = FileDevice::open(path).unwrap();
    let hdr = luks1::read_header(&mut dev).unwrap();
    let (vk, slot) = luks1::unlock(&mut dev, &hdr, pass, None).unwrap();
    assert_eq!(slot, 0);
    assert!(
        hex(vk.as_bytes()).starts_with(key_hex),
        "{}: volume key {}",
        path.display(),
        hex(vk.as_bytes())
    );
    let mut vol = LuksVolume::open_luks1(dev, &hdr, &vk).unwrap();
    let size = vol.size().unwrap();
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    vol.read_at(0, &mut data).unwrap();
    sha256_hex(&data)
}

#[test]
fn compatimage_decrypts() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = image(dir.path(), "compatimage.img.xz") else {
        return;
    };
    assert_eq!(
        unlock_and_hash(&p, b"compatkey", "e1a851c034ed7993b276608a45842b7b"),
        "7428e8f2436882a07eb32765086f5c899474c08b5576f556b573d2aabdf923e8"
    );
    // A wrong passphrase is refused.
    let mut dev = FileDevice::open(&p).unwrap();
    let hdr = luks1::read_header(&mut dev).unwrap();
    assert!(matches!(
        luks1::unlock(&mut dev, &hdr, b"compatkez", None),
        Err(Error::WrongPassphrase)
    ));
    assert!(matches!(
        luks1::unlock(&mut dev, &hdr, b"compatkey", Some(1)),
        Err(Error::KeySlotNotActive(1))
    ));
}

#[test]
fn compatv10image_decrypts() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = image(dir.path(), "compatv10image.img.xz") else {
        return;
    };
    assert_eq!(
        unlock_and_hash(&p, b"compatkey", "8351939072ee8fdf0d1b4537850f812b"),
        "653c841dcef99d47a93752cdf7bf01145b061902c4a457a61198405fdfe9971c"
    );
}

const LUKS1_IMAGES: [(&str, &str, &str); 12] = [
    (
        "luks1_aes-cbc-essiv-sha256-sha1.img",
        "15898285e6c9ad576729cc01e5a557ebddfe562ea855bae0a2aba4fb8439eb1a",
        "582a935a5bc5418a481a08644784206398846696680b8edfa55826b969bb4438",
    ),
    (
        "luks1_aes-lrw-plain64-sha1.img",
        "59abf46dac455770218a3ac317ae0d4377e3fe3d653989e10b9373c6a495213a",
        "84c7af00bb660d9de851c3c2ff4251b71ed47889cb69bfb49975dbefdb7b1f96",
    ),
    (
        "luks1_aes-xts-essiv-wp256-whirlpool.img",
        "4fd665da64c65a653ab4f63b11f3c304035a0b47d60c146ae220c390767cdc7d",
        "42b4118a0dfd301f0ad7567257a14149e9e593606b62b857e4bcae379b5ae665",
    ),
    (
        "luks1_aes-xts-plain64-sha1.img",
        "f1c9268181840ccff69d719b9c592fc1e97c59d707e14cc12cc7288dca37e751",
        "8a30e57f29d9d0165e2964e68e12ca17e3b6703b48faee3acc9922388b5b019a",
    ),
    (
        "luks1_aes-xts-plain64-sha256.img",
        "b42c93fc807d8c40cc05c932ae5c27fc56af96a0a3d5f53d215f63e4c59e7577",
        "b1c4a7c0f69cbfd1ef32ec65ada15a0aa41fa940ade5289911a64d31bcd07b30",
    ),
    (
        "luks1_aes-xts-plain64-whirlpool.img",
        "7184f40554996bfc78cf81ec870b29debc3fff0554fc136fb41b0c431c9cf953",
        "cf3bf5067c4e756f2635d71bd5c04a7e6f80ca695af189f7ffcb9201a438e3bc",
    ),
    (
        "luks1_serpent-xts-plain64-sha1.img",
        "113a7ec676133cf08f62680d0c6227fce14c985b0938e648c81a842c8813d3f0",
        "9c9c2671",
    ),
    (
        "luks1_serpent-xts-plain64-sha256.img",
        "8a40103a5e4bb75c855c7c80697b9188a4bb3af77342ed56f70257b92774566f",
        "9edef888",
    ),
    (
        "luks1_serpent-xts-plain64-whirlpool.img",
        "c18f680558ccbe75571c0bc399d136e9dcdd9ce3470535399e322836f7278e6c",
        "98dd9450",
    ),
    (
        "luks1_twofish-xts-plain64-sha1.img",
        "4949cb8a45c88345c7aeee528f12ec98f87a333c019ee25e9a51f8810ffcdc28",
        "000b9c55",
    ),
    (
        "luks1_twofish-xts-plain64-sha256.img",
        "2157393bbb35ece27b86543ec134c7608f23b5438cb381458d7e3f18fbf0d9c6",
        "d43c5544",
    ),
    (
        "luks1_twofish-xts-plain64-whirlpool.img",
        "f3dfa6fe948758a682693ba87f6dd7ca5fa7916f8eaf4890b5fa0bf6e545b751",
        "ad37997e",
    ),
];

#[test]
fn luks1_images_decrypt_with_keyfile() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = testdata("cryptsetup/luks1-images.tar.xz") else {
        return;
    };
    untar_xz(&tar, dir.path());
    let base = dir.path().join("luks1-images");
    let key = std::fs::read(base.join("keyfile1")).unwrap();
    assert_eq!(key.len(), 25000);
    let mut failures = Vec::new();
    for (name, payload, vk) in LUKS1_IMAGES {
        let got = unlock_and_hash(&base.join(name), &key, vk);
        if got != payload {
            failures.push(format!("{name}: {got}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn header_error(name: &str) -> Option<Error<luks_core::io::FileError>> {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), name)?;
    let mut dev = FileDevice::open(&p).unwrap();
    Some(luks1::read_header(&mut dev).expect_err(name))
}

#[test]
fn evil_headers_are_refused() {
    let Some(e) = header_error("evil_hdr-keyslot_overlap.xz") else {
        return;
    };
    assert!(
        matches!(
            e,
            Error::Corrupt {
                structure: Structure::Luks1KeySlot(1),
                problem: Problem::KeySlotsOverlap { other: 2 },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("key slots 1 and 2 overlap"), "{e}");

    let e = header_error("evil_hdr-luks_hdr_damage.xz").unwrap();
    assert!(
        matches!(
            e,
            Error::Corrupt {
                structure: Structure::Luks1KeySlot(0),
                problem: Problem::KeySlotsOverlap { other: 2 },
                ..
            }
        ),
        "{e}"
    );

    let e = header_error("evil_hdr-payload_overwrite.xz").unwrap();
    assert!(
        matches!(
            e,
            Error::Corrupt {
                structure: Structure::Luks1KeySlot(3),
                problem: Problem::KeySlotOverlapsPayload,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("key slot 3 overlaps the encrypted payload"),
        "{e}"
    );

    let e = header_error("evil_hdr-stripes_payload_dmg.xz").unwrap();
    assert!(
        matches!(
            e,
            Error::Corrupt {
                structure: Structure::Luks1KeySlot(5),
                problem: Problem::BadStripes(44944),
                offset,
            } if offset == 208 + 5 * 48 + 44
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("key slot 5 is corrupted: stripes 44944 != 4000"),
        "{e}"
    );

    let e = header_error("evil_hdr-small_luks_device.xz").unwrap();
    assert!(
        matches!(
            e,
            Error::TooSmall {
                needed: 1_049_600,
                size: 1_049_088,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("device too small"), "{e}");
}

#[test]
fn valid_header_file_parses_but_nothing_unlocks() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = image(dir.path(), "valid_header_file.xz") else {
        return;
    };
    let mut dev = FileDevice::open(&p).unwrap();
    let hdr = luks1::read_header(&mut dev).unwrap();
    assert_eq!(&*hdr.cipher_name, "aes");
    assert_eq!(&*hdr.cipher_mode, "cbc-essiv:sha256");
    assert_eq!(&*hdr.hash_spec, "sha512");
    assert_eq!(hdr.key_bytes, 32);
    assert_eq!(hdr.payload_offset, 4096);
    assert_eq!(hdr.active_slots().count(), 0);
    assert!(matches!(
        luks1::unlock(&mut dev, &hdr, b"anything", None),
        Err(Error::NoActiveKeySlot)
    ));
}

#[test]
fn non_luks_images_are_refused() {
    let Some(e) = header_error("img_fs_ext4.img.xz") else {
        return;
    };
    assert!(
        matches!(
            e,
            Error::Corrupt {
                problem: Problem::BadMagic,
                offset: 0,
                ..
            }
        ),
        "{e}"
    );
}
