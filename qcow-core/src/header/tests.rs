#![allow(clippy::cast_possible_truncation)] // test data generators
use super::*;

fn v3() -> HeaderRepr {
    HeaderRepr {
        version: 3,
        backing_file_offset: 0x200,
        backing_file_size: 9,
        cluster_bits: 16,
        size: 64 << 20,
        crypt_method: CryptMethod::None,
        l1_size: 1,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots: 2,
        snapshots_offset: 0x50000,
        incompatible_features: incompat::COMPRESSION | incompat::DIRTY,
        compatible_features: compat::LAZY_REFCOUNTS,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: COMPRESSION_ZSTD,
    }
}

fn v2() -> HeaderRepr {
    HeaderRepr {
        version: 2,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 72,
        compression_type: 0,
        ..v3()
    }
}

#[test]
fn parse_emit_round_trips() {
    for r in [v3(), v2()] {
        let mut buf = [0xa5u8; 512];
        let n = r.buffer_len();
        r.emit(&mut Header::new_unchecked(&mut buf[..n]));
        let back = HeaderRepr::parse_bytes::<()>(&buf[..n]).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.buffer_len(), n);
    }
    // Every refcount order and cluster size.
    for order in 0..=6 {
        for bits in 9..=21 {
            let r = HeaderRepr {
                refcount_order: order,
                cluster_bits: bits,
                backing_file_offset: 0,
                backing_file_size: 0,
                l1_table_offset: 1 << bits,
                refcount_table_offset: 2 << bits,
                snapshots_offset: 3 << bits,
                ..v3()
            };
            let mut buf = [0u8; 112];
            r.emit(&mut Header::new_unchecked(&mut buf[..]));
            assert_eq!(HeaderRepr::parse_bytes::<()>(&buf).unwrap(), r);
        }
    }
}

#[test]
fn parse_rejects_bad_fields() {
    let mut good = [0u8; 112];
    v3().emit(&mut Header::new_unchecked(&mut good[..]));
    let cases: &[(core::ops::Range<usize>, &[u8])] = &[
        (0..4, b"QFI\xfa"),
        (4..8, &4u32.to_be_bytes()),
        (20..24, &8u32.to_be_bytes()),
        (20..24, &22u32.to_be_bytes()),
        (96..100, &7u32.to_be_bytes()),
        (100..104, &100u32.to_be_bytes()),
        (100..104, &113u32.to_be_bytes()),
        (32..36, &3u32.to_be_bytes()),
        (40..48, &0x30001u64.to_be_bytes()),
        (16..20, &1024u32.to_be_bytes()),
        (8..16, &0xfffcu64.to_be_bytes()),
    ];
    for (r, v) in cases {
        let mut b = good;
        b[r.clone()].copy_from_slice(v);
        assert!(
            HeaderRepr::parse_bytes::<()>(&b).is_err(),
            "accepted bad {r:?} = {v:?}"
        );
    }
    // zstd without the compression feature bit.
    let mut b = good;
    b[72..80].copy_from_slice(&0u64.to_be_bytes());
    assert!(matches!(
        HeaderRepr::parse_bytes::<()>(&b),
        Err(Error::Corrupt {
            problem: Problem::CompressionTypeWithoutFeature(1),
            ..
        })
    ));
}

#[test]
fn parse_never_panics_on_truncated_or_garbled_input() {
    let mut good = [0u8; 112];
    v3().emit(&mut Header::new_unchecked(&mut good[..]));
    for n in 0..good.len() {
        let _ = HeaderRepr::parse_bytes::<()>(&good[..n]);
    }
    assert!(HeaderRepr::parse_bytes::<()>(&good[..103]).is_err());
    // Deterministic mutation loop: flip bytes and bits all over.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = good;
        for k in 0..(x % 4 + 1) {
            let i = ((x >> (8 * k)) as usize) % b.len();
            b[i] ^= (x >> (32 + k)) as u8 | 1;
        }
        let len = if x.is_multiple_of(7) {
            (x >> 40) as usize % 113
        } else {
            112
        };
        if let Ok(r) = HeaderRepr::parse_bytes::<()>(&b[..len]) {
            let mut out = [0u8; 112];
            let n = r.buffer_len().min(112);
            r.emit(&mut Header::new_unchecked(&mut out[..n]));
            assert_eq!(HeaderRepr::parse_bytes::<()>(&out[..n]).unwrap(), r);
        }
    }
}

#[test]
fn extension_payloads_round_trip() {
    let c = CryptoExt {
        offset: 0x30000,
        length: 0x1f9000,
    };
    let mut b = [0u8; 16];
    c.emit(&mut b);
    assert_eq!(CryptoExt::parse(&b), Some(c));
    assert_eq!(CryptoExt::parse(&b[..15]), None);
    let bm = BitmapsExt {
        nb_bitmaps: 2,
        directory_size: 80,
        directory_offset: 0x70000,
    };
    let mut b = [0u8; 24];
    bm.emit(&mut b);
    assert_eq!(BitmapsExt::parse(&b), Some(bm));
    let mut f = FeatureName {
        kind: 0,
        bit: 4,
        name: heapless::String::new(),
    };
    f.name.push_str("extended L2 entries").unwrap();
    let mut b = [0u8; 48];
    f.emit(&mut b);
    assert_eq!(FeatureName::parse(&b), Some(f));
    assert_eq!(
        extension_header(&[0xE2, 0x79, 0x2A, 0xCA, 0, 0, 0, 5]),
        (ext::BACKING_FORMAT, 5)
    );
    assert_eq!(extension_span(5), 16);
    assert_eq!(extension_span(0), 8);
}

#[test]
fn extensions_emit_and_parse_back() {
    let mut buf = [0xffu8; 32];
    let n = emit_extension(&mut buf, ext::BACKING_FORMAT, b"qcow2").unwrap();
    assert_eq!(n, 16);
    let mut h = [0u8; 8];
    h.copy_from_slice(&buf[..8]);
    assert_eq!(extension_header(&h), (ext::BACKING_FORMAT, 5));
    assert_eq!(&buf[8..13], b"qcow2");
    assert!(buf[13..16].iter().all(|&b| b == 0));
    assert_eq!(
        emit_extension(&mut buf[..15], ext::BACKING_FORMAT, b"qcow2"),
        None
    );
}
