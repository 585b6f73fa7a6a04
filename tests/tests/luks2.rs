//! Every LUKS2 image of the cryptsetup test suite: volume keys and payload
//! hashes from EXPECTED.md, unbound key slots and unknown requirements
//! refused, the secondary header used when the primary is damaged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use luks_core::error::{Error, Unsupported};
use luks_core::io::FileDevice;
use luks_core::luks2::{self, Argon2Block};
use luks_core::{BlockIo, LuksVolume};
use qimg_tests::luks2::{header, memory};
use qimg_tests::{hex, sha256_hex, testdata, untar_xz, unxz};

fn image(dir: &Path, name: &str) -> Option<PathBuf> {
    let src = testdata(&format!("cryptsetup/{name}"))?;
    Some(unxz(&src, dir))
}

/// Unlocks `path` (slot `slot`), checks the volume key and returns the
/// payload's sha256.
fn unlock_and_hash(path: &Path, pass: &[u8], slot: Option<u8>, key_hex: &str) -> String {
    let mut dev = FileDevice::open(path).unwrap();
    let h = header(&mut dev);
    let mut mem = memory(&h);
    let (vk, _) = luks2::unlock(&mut dev, &h, pass, slot, &mut mem).unwrap();
    assert!(
        hex(vk.as_bytes()).starts_with(key_hex),
        "{}: volume key {}",
        path.display(),
        hex(vk.as_bytes())
    );
    let mut vol = LuksVolume::open_luks2(dev, &h, &vk).unwrap();
    let size = vol.size().unwrap();
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    vol.read_at(0, &mut data).unwrap();
    sha256_hex(&data)
}

#[test]
fn compatimage2_both_slots() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = image(dir.path(), "compatimage2.img.xz") else {
        return;
    };
    let payload = "38ef2d1b8c387efb50680e1d3f234f170d2b7b6c6d9eb856b4f426543a6c4ef2";
    let key = "d47ee2cdc40f39be9a3e8d72a149cc4d";
    assert_eq!(unlock_and_hash(&p, b"compatkey", Some(0), key), payload);
    assert_eq!(
        unlock_and_hash(&p, b"0123456789abcdef", Some(1), key),
        payload
    );
    assert_eq!(unlock_and_hash(&p, b"0123456789abcdef", None, key), payload);
    let mut dev = FileDevice::open(&p).unwrap();
    let h = header(&mut dev);
    let mut mem = memory(&h);
    assert!(matches!(
        luks2::unlock(&mut dev, &h, b"compatkez", None, &mut mem),
        Err(Error::WrongPassphrase)
    ));
    // Too little Argon2 memory for slot 1 is a clear error.
    let mut small = vec![Argon2Block::new(); 8];
    let e = luks2::unlock(&mut dev, &h, b"0123456789abcdef", Some(1), &mut small).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KdfMemory {
                slot: 1,
                given_kib: 8,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn mda_images_every_metadata_size() {
    let dir = tempfile::tempdir().unwrap();
    let Some(src) = testdata("cryptsetup/luks2_mda_images.tar.xz") else {
        return;
    };
    untar_xz(&src, dir.path());
    for kib in [16u64, 32, 64, 128, 256, 512, 1024, 2048, 4096] {
        let p = dir.path().join(format!("test_image_{kib}"));
        let mut dev = FileDevice::open(&p).unwrap();
        let h = header(&mut dev);
        assert_eq!(h.hdr.hdr_size, kib * 1024);
        assert!(h.primary_ok);
        assert_eq!(h.secondary, Some(kib * 1024));
        drop(dev);
        // The first 4 MiB of the payload are encrypted zeroes.
        let mut dev = FileDevice::open(&p).unwrap();
        let (vk, _) = luks2::unlock(&mut dev, &h, b"Qx3qn46vq0v", None, &mut []).unwrap();
        assert_eq!(
            hex(vk.as_bytes()),
            "b67647946b62ded9d65983a92cd2c0f4c08923473deb44741da5ba675e8bde82"
        );
        let mut vol = LuksVolume::open_luks2(dev, &h, &vk).unwrap();
        let mut data = vec![0u8; 4 << 20];
        vol.read_at(0, &mut data).unwrap();
        assert_eq!(
            sha256_hex(&data),
            "e187fdce3c4309544505fe845b34166151b52be209572f4936ec590e67ab22f8",
            "metadata size {kib} KiB"
        );
    }
    // Damaged primary: the secondary is found by scanning and used.
    let p = dir.path().join("test_image_64");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0x1000..0x1010].fill(0x55);
    std::fs::write(&p, &bytes).unwrap();
    let mut dev = FileDevice::open(&p).unwrap();
    let h = header(&mut dev);
    assert!(!h.primary_ok);
    assert_eq!(h.secondary, Some(64 * 1024));
    assert!(h.hdr.secondary);
    luks2::unlock(&mut dev, &h, b"Qx3qn46vq0v", None, &mut []).unwrap();
    // Both damaged: refused with the checksum named.
    bytes[0x10000 + 0x1000..0x10000 + 0x1010].fill(0x55);
    std::fs::write(&p, &bytes).unwrap();
    let mut dev = FileDevice::open(&p).unwrap();
    let mut json = vec![0u8; 1 << 16];
    let e = luks2::read_header(&mut dev, &mut json).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[test]
fn keyslot_unassigned_refused_for_data() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = image(dir.path(), "luks2_keyslot_unassigned.img.xz") else {
        return;
    };
    let mut dev = FileDevice::open(&p).unwrap();
    let h = header(&mut dev);
    let mut mem = memory(&h);
    let (vk, slot) = luks2::unlock(&mut dev, &h, b"compatkey", None, &mut mem).unwrap();
    assert_eq!(slot, 0);
    assert_eq!(
        hex(vk.as_bytes()),
        "7b24adb65c60f5029f10aafc7dcf72153076a955fef73e62c44b88e41aae6c63"
    );
    assert!(!luks2::is_bound(&h.meta, 1));
    for slot in [None, Some(1)] {
        let e = luks2::unlock(&mut dev, &h, b"93R4P4pIqAH8", slot, &mut mem).unwrap_err();
        assert!(matches!(e, Error::KeySlotUnbound(1)), "{e}");
    }
    // The unbound slot's own key is a different one.
    let k1 = luks2::open_keyslot(&mut dev, &h, 1, b"93R4P4pIqAH8", &mut mem)
        .unwrap()
        .unwrap();
    assert_ne!(k1.as_bytes(), vk.as_bytes());
}

#[test]
fn header_requirements_refused_free_variant_opens() {
    let dir = tempfile::tempdir().unwrap();
    let Some(src) = testdata("cryptsetup/luks2_header_requirements.tar.xz") else {
        return;
    };
    untar_xz(&src, dir.path());
    let key = "07459b84";
    let mut dev = FileDevice::open(&dir.path().join("luks2_header_requirements")).unwrap();
    let h = header(&mut dev);
    let mut mem = memory(&h);
    let e = luks2::unlock(&mut dev, &h, b"blablabl", None, &mut mem).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(Unsupported::Requirement(r)) if r == "req0"),
        "{e}"
    );
    assert!(e.to_string().contains("req0"), "{e}");
    let mut dev = FileDevice::open(&dir.path().join("luks2_header_requirements_free")).unwrap();
    let h = header(&mut dev);
    let mut mem = memory(&h);
    let (vk, _) = luks2::unlock(&mut dev, &h, b"blablabl", None, &mut mem).unwrap();
    assert!(hex(vk.as_bytes()).starts_with(key));
    assert!(hex(vk.as_bytes()).ends_with("fc936bd"));
    // The payload is empty: the data offset is the end of the file.
    let mut vol = LuksVolume::open_luks2(dev, &h, &vk).unwrap();
    assert_eq!(vol.size().unwrap(), 0);
}

#[test]
fn valid_hdr_and_invalid_cipher() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = image(dir.path(), "luks2_valid_hdr.img.xz") else {
        return;
    };
    let mut dev = FileDevice::open(&p).unwrap();
    let h = header(&mut dev);
    // Eight key slots with the pre-release KDF name `argon2`: the header is
    // valid, those key slots cannot be opened.
    assert_eq!(h.meta.keyslots.len(), 8);
    assert!(h
        .meta
        .keyslots
        .iter()
        .all(|k| matches!(&k.kdf, Some(luks2::Kdf::Other(n)) if n == "argon2")));
    let Some(p) = image(dir.path(), "luks2_invalid_cipher.img.xz") else {
        return;
    };
    let mut dev = FileDevice::open(&p).unwrap();
    let h = header(&mut dev);
    let mut mem = memory(&h);
    let (vk, _) = luks2::unlock(&mut dev, &h, b"93R4P4pIqAH8", None, &mut mem).unwrap();
    assert!(hex(vk.as_bytes()).starts_with("edaa4070"));
    let e = LuksVolume::open_luks2(dev, &h, &vk).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}
