//! The real qcow2 images from the QEMU tree read back, through qcow-core
//! over a `FileDevice`, to the sha256 recorded in EXPECTED.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers fail loudly

use qcow_core::io::FileDevice;
use qcow_core::{BlockIo, MapKind, Qcow2};
use qimg_tests::{sha256_hex, testdata};

const IMAGES: [(&str, &str); 4] = [
    (
        "bios-tables-test.aarch64.iso.qcow2",
        "c70140378e53cf54d2d7994b62b0e805ec09eb7633e7426a6da09c6f99ff5e69",
    ),
    (
        "bios-tables-test.arm.iso.qcow2",
        "31ef43ed839ff40d93664e269d943153d95d1d7ea59eb0c723b94c1d9a89f9fa",
    ),
    (
        "bios-tables-test.i386.iso.qcow2",
        "2ff87057643e41ae1b8775495c0d333a390018db39efc05f084ec72712f48c16",
    ),
    (
        "bios-tables-test.x86_64.iso.qcow2",
        "274cc137b85be86273c4dd027f8ee15e9e7f4a62c97ed9d60d0f56fd2c6c3015",
    ),
];

#[test]
fn qemu_tree_images_read_back_to_expected_sha256() {
    for (name, want) in IMAGES {
        let Some(path) = testdata(&format!("qemu/{name}")) else {
            return;
        };
        let dev = FileDevice::open(&path).unwrap();
        // A deliberately tiny cache: one 512-byte slice.
        let mut cache = [0u8; 512];
        let mut cin = [0u8; 1024];
        let mut cout = [0u8; 512];
        let mut img = Qcow2::open(dev, &mut cache[..])
            .unwrap()
            .with_compression_buffers(&mut cin[..], &mut cout[..]);
        let info = img.info().clone();
        assert_eq!(info.virtual_size(), 425_984, "{name}");
        assert_eq!(info.cluster_size(), 512);
        assert_eq!(info.compat(), "1.1");
        assert_eq!(info.refcount_bits(), 16);
        assert_eq!(info.compression_type(), "zlib");
        assert!(!info.dirty() && !info.corrupt());
        let size = img.size().unwrap();
        let mut data = vec![0u8; usize::try_from(size).unwrap()];
        // Odd-sized reads exercise run splitting.
        let mut pos = 0usize;
        let step = 512 * 7;
        while pos < data.len() {
            let n = step.min(data.len() - pos);
            img.read_at(pos as u64, &mut data[pos..pos + n]).unwrap();
            pos += n;
        }
        assert_eq!(sha256_hex(&data), want, "{name}");
        // Every allocated cluster is compressed (EXPECTED.md).
        let mut g = 0;
        let mut compressed = 0;
        while g < size {
            let m = img.map(g, size - g).unwrap();
            assert!(
                matches!(m.kind, MapKind::Compressed(_) | MapKind::Unallocated),
                "{name}: {m:?}"
            );
            if matches!(m.kind, MapKind::Compressed(_)) {
                compressed += 1;
            }
            g += m.len;
        }
        assert!(compressed > 0, "{name}");
        // Every compressed cluster's host cluster is referenced.
        assert!(
            img.refcount(0).unwrap() >= 1,
            "{name}: header cluster refcount"
        );
    }
}

#[test]
fn writes_are_refused_read_only() {
    let Some(path) = testdata(&format!("qemu/{}", IMAGES[0].0)) else {
        return;
    };
    let mut cache = [0u8; 4096];
    let mut img = Qcow2::open(FileDevice::open(&path).unwrap(), &mut cache).unwrap();
    assert!(matches!(
        img.write_at(0, &[0u8; 512]),
        Err(qcow_core::Error::ReadOnly)
    ));
    // Without compression buffers, reading a compressed cluster is a
    // clear error rather than a panic.
    let mut buf = vec![0u8; 425_984];
    let e = img.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(e, qcow_core::Error::BufferTooSmall { .. }), "{e}");
}
