//! The reader over an in-memory sector device (no file, no allocation),
//! on a hand-built image, plus a byte-flip loop that must never panic.

#![allow(clippy::arithmetic_side_effects, clippy::cast_possible_truncation)] // test fixtures

use super::*;
use crate::entry::{COPIED, ZERO};
use crate::io::MemDevice;

const SIZE: u64 = 32 * 1024;

/// v3, 512-byte clusters: header, L1 @0x200, L2 @0x400, data @0x600,
/// @0x800 and @0xa00, refcount table @0xc00, refcount block @0xe00.
fn image() -> [u8; 0x1000] {
    let mut b = [0u8; 0x1000];
    let r = HeaderRepr {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 9,
        size: SIZE,
        crypt_method: CryptMethod::None,
        l1_size: 1,
        l1_table_offset: 0x200,
        refcount_table_offset: 0xc00,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
    };
    r.emit(&mut Header::new_unchecked(&mut b[..112]));
    b[0x200..0x208].copy_from_slice(&(COPIED | 0x400).to_be_bytes());
    let l2 = [COPIED | 0x600, ZERO, COPIED | 0x800, COPIED | 0xa00];
    for (i, e) in l2.iter().enumerate() {
        b[0x400 + 8 * i..0x408 + 8 * i].copy_from_slice(&e.to_be_bytes());
    }
    b[0x600..0x800].fill(0x11);
    b[0x800..0xa00].fill(0x22);
    b[0xa00..0xc00].fill(0x33);
    b[0xc00..0xc08].copy_from_slice(&0xe00u64.to_be_bytes());
    for c in 0..8 {
        b[0xe00 + 2 * c + 1] = 1;
    }
    b
}

#[test]
fn reads_maps_and_counts_over_a_memory_device() {
    let img = image();
    let dev = MemDevice::read_only(&img);
    let mut cache = [0u8; 512];
    let mut q = Qcow2::open(dev, &mut cache).unwrap();
    assert_eq!(q.virtual_size(), SIZE);
    let mut buf = [0u8; SIZE as usize];
    q.read(0, &mut buf).unwrap();
    assert!(buf[..512].iter().all(|&x| x == 0x11));
    assert!(buf[512..1024].iter().all(|&x| x == 0));
    assert!(buf[1024..1536].iter().all(|&x| x == 0x22));
    assert!(buf[1536..2048].iter().all(|&x| x == 0x33));
    assert!(buf[2048..].iter().all(|&x| x == 0));
    let runs = [
        (
            0,
            512,
            MapKind::Data {
                host: HostOffset::new(0x600),
            },
        ),
        (512, 512, MapKind::Zero { host: None }),
        (
            1024,
            1024,
            MapKind::Data {
                host: HostOffset::new(0x800),
            },
        ),
        (2048, SIZE - 2048, MapKind::Unallocated),
    ];
    for (start, len, kind) in runs {
        let m = q.map(start, SIZE - start).unwrap();
        assert_eq!((m.guest_offset, m.len, m.kind), (start, len, kind));
    }
    // Host-contiguous runs stop at the requested length.
    assert_eq!(q.map(1024, 512).unwrap().len, 512);
    assert_eq!(q.refcount(3).unwrap(), 1);
    assert_eq!(q.refcount(9).unwrap(), 0);
    assert!(matches!(
        q.read(100, &mut buf[..512]),
        Err(Error::BadRequest { .. })
    ));
    assert!(matches!(
        q.read(SIZE, &mut buf[..512]),
        Err(Error::BadRequest { .. })
    ));
    assert!(matches!(q.write_at(0, &buf[..512]), Err(Error::ReadOnly)));
}

#[test]
fn cache_smaller_than_a_sector_is_refused() {
    let img = image();
    let mut cache = [0u8; 100];
    assert!(matches!(
        Qcow2::open(MemDevice::read_only(&img), &mut cache),
        Err(Error::BufferTooSmall {
            what: Buffer::Cache,
            ..
        })
    ));
}

#[test]
fn l2_table_past_the_device_end_is_reported_with_its_location() {
    let mut img = image();
    img[0x200..0x208].copy_from_slice(&(COPIED | 0x10000).to_be_bytes());
    let mut cache = [0u8; 512];
    let mut q = Qcow2::open(MemDevice::read_only(&img), &mut cache).unwrap();
    let mut buf = [0u8; 512];
    let e = q.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Io {
                structure: Structure::L2Table,
                offset: 0x10000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn byte_flips_never_panic() {
    let good = image();
    let mut x: u64 = 0x0123_4567_89ab_cdef;
    for _ in 0..20_000 {
        let mut img = good;
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = usize::try_from(x % 0x1000).unwrap();
            img[i] ^= x.to_le_bytes()[5] | 1;
        }
        let mut cache = [0u8; 1024];
        let mut cin = [0u8; 1024];
        let mut cout = [0u8; 512];
        let Ok(q) = Qcow2::open(MemDevice::read_only(&img), &mut cache[..]) else {
            continue;
        };
        let mut q = q
            .ignore_backing()
            .with_compression_buffers(&mut cin[..], &mut cout[..]);
        let size = q.virtual_size().min(64 * 1024);
        let mut buf = [0u8; 4096];
        let mut g = 0;
        while g + 4096 <= size {
            let _ = q.read(g, &mut buf);
            let _ = q.map(g, 4096);
            g += 4096;
        }
        let _ = q.refcount(x % 64);
        let _ = q.for_each_snapshot(|_| false);
        let _ = q.for_each_bitmap(|_| false);
    }
}

/// Compressed clusters read the same whole (decoded straight into the
/// caller's buffer), in parts (through the cluster buffer, which keeps the
/// last cluster), straddling two clusters, and after a part of another.
#[cfg(feature = "alloc")]
#[test]
fn compressed_clusters_read_whole_and_in_parts() {
    extern crate std;
    use std::vec::Vec;
    let cs = 4096usize;
    let clusters = 6usize;
    let size = (clusters * cs) as u64 + 1536; // a partial last cluster
    let opts = crate::create::CreateOptions {
        size,
        cluster_size: cs as u64,
        ..crate::create::CreateOptions::default()
    };
    let mut w = crate::create::create(luks_core::io::VecDevice::new(), &opts).unwrap();
    let want: Vec<u8> = (0..size as usize)
        .map(|i| ((i / 7) % 251) as u8 ^ ((i / cs) as u8).wrapping_mul(37))
        .collect();
    for c in 0..=clusters {
        let end = ((c + 1) * cs).min(want.len());
        let mut data = want[c * cs..end].to_vec();
        data.resize(cs, 0);
        w.write_compressed(c as u64, &data).unwrap();
    }
    let img = w.close().unwrap();
    let bytes = img.as_slice().to_vec();
    let mut cache = [0u8; 4096];
    let mut cin = [0u8; 8192];
    let mut cout = [0u8; 4096];
    let mut q = Qcow2::open(MemDevice::read_only(&bytes), &mut cache[..])
        .unwrap()
        .with_compression_buffers(&mut cin[..], &mut cout[..]);
    assert!(matches!(
        q.map(0, 4096).unwrap().kind,
        MapKind::Compressed(_)
    ));
    let mut all = std::vec![0u8; size as usize];
    q.read(0, &mut all).unwrap();
    assert!(all == want, "one read of everything");
    // (offset, length) in order: parts, whole clusters after a part of
    // another, straddles, the partial last cluster.
    let reads = [
        (512u64, 1024usize),
        (0, 4096),
        (1536, 512),
        (4096, 4096),
        (3584, 1024),
        (8192, 512),
        (8192, 4096),
        (12288, 8192),
        (20480, 4096 + 1536),
        (24576, 512),
        // A whole cluster between parts of two others must not leave the
        // cluster buffer claiming it.
        (0, 512),
        (16384, 4096),
        (16384 + 1024, 512),
    ];
    for (off, len) in reads {
        let mut b = std::vec![0u8; len];
        q.read(off, &mut b).unwrap();
        let o = off as usize;
        assert!(b[..] == want[o..o + len], "read of {len} at {off}");
    }
}

/// A LUKS-encrypted 1 MiB image whose first sector holds 0xcd bytes.
#[cfg(feature = "alloc")]
fn encrypted_image(passphrase: &[u8]) -> luks_core::io::VecDevice {
    let opts = crate::create::CreateOptions {
        size: 1 << 20,
        luks_region_len: Some(2 << 20),
        ..crate::create::CreateOptions::default()
    };
    let w = crate::create::create(luks_core::io::VecDevice::new(), &opts).unwrap();
    let mut w = crate::test_luks::with_luks1(w, passphrase);
    w.write(0, &[0xcd; 512]).unwrap();
    w.close().unwrap()
}

/// The reader owns `Vec` buffers and its key; a wrong passphrase leaves
/// the opened image usable, and the right one unlocks it in place.
#[cfg(feature = "alloc")]
#[test]
fn owned_buffers_and_unlock_in_place() {
    extern crate std;
    let dev = encrypted_image(b"right");
    let mut img = Qcow2::open(dev, std::vec![0u8; 4096])
        .unwrap()
        .with_compression_buffers(std::vec![0u8; 65536 + 512], std::vec![0u8; 65536]);
    let mut sector = [0u8; 512];
    // No key yet: encrypted data is refused, not returned as ciphertext.
    assert!(matches!(
        img.read(0, &mut sector),
        Err(Error::Unsupported(Unsupported::Encrypted {
            method: CryptMethod::Luks
        }))
    ));
    assert!(img.unlock_key(b"wrong").is_err());
    let key = img.unlock_key(b"right").unwrap();
    assert!(key.is_some());
    let mut img = img.with_decryptor_opt(key);
    img.read(0, &mut sector).unwrap();
    assert_eq!(sector, [0xcd; 512]);
    // The consuming form, on a second image.
    let mut img = Qcow2::open(encrypted_image(b"pw"), std::vec![0u8; 4096])
        .unwrap()
        .unlock(b"pw")
        .unwrap();
    img.read(0, &mut sector).unwrap();
    assert_eq!(sector, [0xcd; 512]);
}

/// Absent backing, data file and key named by type with `None` inside:
/// a plaintext image reads as before, and an image that needs a data file
/// reports it missing rather than reading a placeholder.
#[test]
fn optional_devices_hold_none() {
    let img = image();
    let mut cache = [0u8; 512];
    let q = Qcow2::open(MemDevice::read_only(&img), &mut cache[..])
        .unwrap()
        .with_backing_opt(None::<MemDevice<'_>>)
        .unwrap()
        .with_data_file_opt(None::<MemDevice<'_>>)
        .with_decryptor_opt(None::<NoDecryptor>);
    // Unlocking a plaintext image is a no-op (needs the cipher feature).
    #[cfg(feature = "encryption")]
    let q = q.unlock(b"unused").unwrap();
    let mut q = q;
    let mut buf = [0u8; 512];
    q.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 512]);
    assert!(q.backing().is_none());

    // The same image, flagged as keeping its data in an external file.
    let mut ext = image();
    let mut v = [0u8; 8];
    v.copy_from_slice(&ext[header::field::INCOMPATIBLE_FEATURES]);
    let flags = u64::from_be_bytes(v) | incompat::DATA_FILE;
    ext[header::field::INCOMPATIBLE_FEATURES].copy_from_slice(&flags.to_be_bytes());
    let mut q = Qcow2::open(MemDevice::read_only(&ext), &mut cache[..])
        .unwrap()
        .with_data_file_opt(None::<MemDevice<'_>>);
    assert!(matches!(q.read(0, &mut buf), Err(Error::DataFileMissing)));
    let mut q = Qcow2::open(MemDevice::read_only(&ext), &mut cache[..])
        .unwrap()
        .with_data_file_opt(Some(MemDevice::read_only(&img)));
    q.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 512]);
}
