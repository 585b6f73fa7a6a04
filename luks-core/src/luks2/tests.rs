//! LUKS2 unit tests: format, read back, unlock, key slot management and
//! header selection over memory.

#![allow(clippy::cast_possible_truncation, clippy::arithmetic_side_effects)]

extern crate std;

use std::vec;

use super::write::{self, FormatParams, KdfParams};
use super::*;
use crate::io::VecDevice;
use crate::test_rng::TestRng;

const ARGON: KdfParams = KdfParams::Argon2 {
    id: true,
    time: 1,
    memory_kib: 64,
    cpus: 1,
};

/// PBKDF2-SHA256 at 1000 iterations: quick.
const PBKDF2: KdfParams = KdfParams::Pbkdf2 {
    hash: HashAlg::Sha256,
    iterations: 1000,
};

fn small(kdf: KdfParams, sector_size: u32) -> FormatParams<'static> {
    FormatParams {
        kdf,
        sector_size,
        data_offset: Some(1 << 20),
        ..FormatParams::default()
    }
}

#[test]
fn format_unlock_add_remove() {
    let mut dev = VecDevice::new();
    let mut rng = TestRng(7);
    let (mut h, text, vk) =
        write::format(&mut dev, &small(ARGON, 4096), None, b"pw0", &mut rng).unwrap();
    let mut json = vec![0u8; 1 << 16];
    let r = read_header(&mut dev, &mut json).unwrap();
    assert_eq!(&json[..r.json_len], text.as_bytes());
    assert_eq!(r.meta, h.meta);
    assert_eq!(r.hdr.seqid, 1);
    assert_eq!(r.meta.data_segment().unwrap().sector_size, 4096);
    let mut mem = vec![Argon2Block::new(); 64];
    let (k, s) = unlock(&mut dev, &r, b"pw0", None, &mut mem).unwrap();
    assert_eq!((k.as_bytes(), s), (vk.as_bytes(), 0));
    assert!(matches!(
        unlock(&mut dev, &r, b"pw1", None, &mut mem),
        Err(Error::WrongPassphrase)
    ));
    // Too little memory: a clear error naming both sizes.
    let e = unlock(&mut dev, &r, b"pw0", Some(0), &mut mem[..16]).unwrap_err();
    assert!(matches!(
        e,
        Error::KdfMemory {
            slot: 0,
            needed_kib: 64,
            given_kib: 16
        }
    ));

    let pb = PBKDF2;
    let (text, id) = write::add_key(
        &mut dev,
        &mut h,
        text.as_bytes(),
        &vk,
        b"pw1",
        pb,
        None,
        &mut rng,
    )
    .unwrap();
    assert_eq!(id, 1);
    let r = read_header(&mut dev, &mut json).unwrap();
    assert_eq!(r.hdr.seqid, 2);
    assert_eq!(r.meta.keyslots.len(), 2);
    assert_eq!(unlock(&mut dev, &r, b"pw1", None, &mut mem).unwrap().1, 1);
    // A wrong volume key is refused.
    let bad = VolumeKey::from_bytes(&[1u8; 64]).unwrap();
    assert!(matches!(
        write::add_key(
            &mut dev,
            &mut h,
            text.as_bytes(),
            &bad,
            b"x",
            pb,
            None,
            &mut rng
        ),
        Err(Error::WrongPassphrase)
    ));
    let text = write::remove_key(&mut dev, &mut h, text.as_bytes(), 0, false, &mut rng).unwrap();
    let r = read_header(&mut dev, &mut json).unwrap();
    assert_eq!(r.hdr.seqid, 3);
    assert!(matches!(
        unlock(&mut dev, &r, b"pw0", None, &mut mem),
        Err(Error::WrongPassphrase)
    ));
    assert!(matches!(
        write::remove_key(&mut dev, &mut h, text.as_bytes(), 1, false, &mut rng),
        Err(Error::LastKeySlot(1))
    ));
    // Data written through the volume reads back; sectors are 4 KiB.
    dev.set_size((1 << 20) + 65536).unwrap();
    let mut vol = crate::LuksVolume::open_luks2(&mut dev, &r, &vk).unwrap();
    assert_eq!(vol.sector_size(), 4096);
    let data: std::vec::Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    vol.write_at(4096, &data).unwrap();
    let mut back = vec![0u8; 8192];
    vol.read_at(4096, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(vol.read_at(512, &mut back[..512]).is_err());
}

#[test]
fn newer_copy_wins_and_damaged_copy_is_skipped() {
    let mut dev = VecDevice::new();
    let mut rng = TestRng(9);
    let pb = PBKDF2;
    let (mut h, text, vk) = write::format(&mut dev, &small(pb, 512), None, b"a", &mut rng).unwrap();
    let old = dev.as_slice()[..0x4000].to_vec();
    write::add_key(
        &mut dev,
        &mut h,
        text.as_bytes(),
        &vk,
        b"b",
        pb,
        None,
        &mut rng,
    )
    .unwrap();
    // An interrupted update: old primary, new secondary; the newer wins.
    dev.write_at(0, &old).unwrap();
    let mut json = vec![0u8; 1 << 16];
    let r = read_header(&mut dev, &mut json).unwrap();
    assert_eq!((r.hdr.seqid, r.hdr.secondary), (2, true));
    assert_eq!(r.meta.keyslots.len(), 2);
    // A flipped byte in the secondary's JSON: the (older) primary is used.
    let mut b = [0u8; 512];
    dev.read_at(0x4000 + 4096, &mut b).unwrap();
    b[3] ^= 1;
    dev.write_at(0x4000 + 4096, &b).unwrap();
    let r = read_header(&mut dev, &mut json).unwrap();
    assert_eq!(
        (r.hdr.seqid, r.hdr.secondary, r.primary_ok),
        (1, false, true)
    );
    assert_eq!(r.secondary, None);
}

#[test]
fn parse_never_panics_on_mutations() {
    let mut dev = VecDevice::new();
    let mut rng = TestRng(11);
    let pb = PBKDF2;
    let (_, text, _) = write::format(&mut dev, &small(pb, 512), None, b"a", &mut rng).unwrap();
    let t = text.as_bytes();
    let mut x = 12345u32;
    for i in 0..2000usize {
        let mut m = t.to_vec();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let at = x as usize % m.len();
        m[at] = b"{}[]\",:0a\\-9 "[i % 13];
        if i % 3 == 0 {
            m.truncate(at);
        }
        let _ = Metadata::parse(&m, 0x4000, 0);
    }
    assert!(Metadata::parse(t, 0x4000, 0).is_ok());
    // json_size must match the header size.
    assert!(Metadata::parse(t, 0x8000, 0).is_err());
}

/// A power cut at every mutation of `add_key` and `remove_key` (unflushed
/// writes lost or kept) leaves a header that reads, the old passphrase
/// opening, and the new one opening exactly when the header has its slot.
#[test]
fn power_cut_during_key_slot_updates() {
    use crate::io::FaultyDevice;
    let pb = PBKDF2;
    let mut rng = TestRng(21);
    let mut dev = VecDevice::new();
    let (h0, text0, vk) = write::format(&mut dev, &small(pb, 512), None, b"a", &mut rng).unwrap();
    let base = dev.into_vec();
    let mut json = vec![0u8; 1 << 16];
    let opens =
        |dev: &mut VecDevice, r: &Luks2Header, pw: &[u8]| unlock(dev, r, pw, None, &mut []).is_ok();
    // Mutations of a clean add_key.
    let mut probe = FaultyDevice::new(VecDevice::from_vec(base.clone()));
    let mut h = h0.clone();
    write::add_key(
        &mut probe,
        &mut h,
        text0.as_bytes(),
        &vk,
        b"b",
        pb,
        None,
        &mut rng,
    )
    .unwrap();
    let n = probe.mutations();
    assert!(n > 3);
    let added = probe.into_inner().into_vec();
    for cut in 0..n {
        for drop in [false, true] {
            let mut f = FaultyDevice::new(VecDevice::from_vec(base.clone()))
                .cut_power_at(cut)
                .drop_unflushed(drop);
            let mut h = h0.clone();
            assert!(write::add_key(
                &mut f,
                &mut h,
                text0.as_bytes(),
                &vk,
                b"b",
                pb,
                None,
                &mut rng
            )
            .is_err());
            let mut d = f.into_inner();
            let r = read_header(&mut d, &mut json).unwrap();
            assert!(opens(&mut d, &r, b"a"), "cut {cut}");
            assert_eq!(
                opens(&mut d, &r, b"b"),
                r.meta.keyslots.len() == 2,
                "cut {cut}"
            );
        }
    }
    // Removing key slot 0 from the volume with both.
    let mut d = VecDevice::from_vec(added.clone());
    let h1 = read_header(&mut d, &mut json).unwrap();
    let text1 = std::string::String::from_utf8(json[..h1.json_len].to_vec()).unwrap();
    let mut probe = FaultyDevice::new(VecDevice::from_vec(added.clone()));
    let mut h = h1.clone();
    write::remove_key(&mut probe, &mut h, text1.as_bytes(), 0, false, &mut rng).unwrap();
    for cut in 0..probe.mutations() {
        let mut f = FaultyDevice::new(VecDevice::from_vec(added.clone()))
            .cut_power_at(cut)
            .drop_unflushed(true);
        let mut h = h1.clone();
        assert!(write::remove_key(&mut f, &mut h, text1.as_bytes(), 0, false, &mut rng).is_err());
        let mut d = f.into_inner();
        let r = read_header(&mut d, &mut json).unwrap();
        assert!(opens(&mut d, &r, b"b"), "cut {cut}");
        assert_eq!(
            opens(&mut d, &r, b"a"),
            r.meta.keyslot(0).is_some(),
            "cut {cut}"
        );
    }
}

/// Rewrites the JSON text of both copies (checksums recomputed).
fn forge(dev: &mut VecDevice, f: impl Fn(&str) -> std::string::String) {
    use digest::Digest as _;
    let mut b = dev.as_slice().to_vec();
    let hs = 0x4000usize;
    for at in [0, hs] {
        let area = &mut b[at + 4096..at + hs];
        let end = area.iter().position(|&c| c == 0).unwrap();
        let text = f(core::str::from_utf8(&area[..end]).unwrap());
        area.fill(0);
        let n = text.len().min(area.len() - 1);
        area[..n].copy_from_slice(&text.as_bytes()[..n]);
        b[at + 448..at + 512].fill(0);
        let sum = sha2::Sha256::digest(&b[at..at + hs]);
        b[at + 448..at + 480].copy_from_slice(&sum);
    }
    *dev = VecDevice::from_vec(b);
}

/// Checksum-valid but hostile metadata: refused or failing cleanly, never
/// a panic, at parse or at unlock.
#[test]
fn hostile_metadata_fails_cleanly() {
    let pb = PBKDF2;
    let mut rng = TestRng(33);
    let mut dev = VecDevice::new();
    write::format(&mut dev, &small(ARGON, 512), None, b"a", &mut rng).unwrap();
    let argon = dev.into_vec();
    let mut dev = VecDevice::new();
    write::format(&mut dev, &small(pb, 512), None, b"a", &mut rng).unwrap();
    let pbkdf = dev.into_vec();
    let cases: &[(&[u8], &str, &str)] = &[
        (&pbkdf, "\"stripes\":4000", "\"stripes\":4294967295"),
        (&pbkdf, "\"stripes\":4000", "\"stripes\":0"),
        (&pbkdf, "\"key_size\":64,\"af\"", "\"key_size\":65,\"af\""),
        (&pbkdf, "\"key_size\":64,\"af\"", "\"key_size\":0,\"af\""),
        (
            &pbkdf,
            "\"offset\":\"32768\"",
            "\"offset\":\"18446744073709551615\"",
        ),
        (
            &pbkdf,
            "\"offset\":\"32768\"",
            "\"offset\":\"99999999999999999999\"",
        ),
        (
            &pbkdf,
            "\"iterations\":1000,\"salt\"",
            "\"iterations\":0,\"salt\"",
        ),
        (&pbkdf, "\"sector_size\":512", "\"sector_size\":3000"),
        // The data segment would start inside key slot 0's area.
        (&pbkdf, "\"offset\":\"1048576\"", "\"offset\":\"65536\""),
        (&pbkdf, "\"keyslots\":[\"0\"]", "\"keyslots\":[\"7\"]"),
        (&pbkdf, "\"segments\":[\"0\"]", "\"segments\":[]"),
        (
            &pbkdf,
            "\"encryption\":\"aes-xts-plain64\",\"key_size\"",
            "\"encryption\":\"aes\",\"key_size\"",
        ),
        (&pbkdf, "\"hash\":\"sha256\"", "\"hash\":\"md5\""),
        (&pbkdf, "{\"keyslots\"", "[{\"keyslots\""),
        (&argon, "\"time\":1", "\"time\":0"),
        (&argon, "\"cpus\":1", "\"cpus\":0"),
        (&argon, "\"memory\":64", "\"memory\":1"),
        (&argon, "\"type\":\"argon2id\"", "\"type\":\"scrypt\""),
    ];
    let mut json = vec![0u8; 1 << 16];
    let mut mem = vec![Argon2Block::new(); 64];
    // Authenticated encryption (dm-integrity): the key opens, the data
    // segment is refused rather than read wrongly.
    let mut dev = VecDevice::from_vec(pbkdf.clone());
    forge(&mut dev, |t| {
        t.replacen(
            "\"sector_size\":512",
            "\"sector_size\":512,\"integrity\":{\"type\":\"hmac(sha256)\",\"journal_encryption\":\"none\",\"journal_integrity\":\"none\"}",
            1,
        )
    });
    let h = read_header(&mut dev, &mut json).unwrap();
    let (vk, _) = unlock(&mut dev, &h, b"a", None, &mut mem).unwrap();
    assert!(matches!(
        crate::LuksVolume::open_luks2(&mut dev, &h, &vk),
        Err(Error::Unsupported(_))
    ));
    for (base, from, to) in cases {
        let mut dev = VecDevice::from_vec(base.to_vec());
        forge(&mut dev, |t| {
            assert!(t.contains(from), "{from}");
            t.replacen(from, to, 1)
        });
        if let Ok(h) = read_header(&mut dev, &mut json) {
            let r = unlock(&mut dev, &h, b"a", None, &mut mem);
            // Every forgery errs (a digest bound to no segment gives
            // KeySlotUnbound).
            assert!(r.is_err(), "{to}: opened");
        }
    }
}

/// `LuksVolume::unlock` detects the version: the same call opens LUKS1
/// and LUKS2 volumes.
#[test]
fn volume_unlock_detects_the_version() {
    let mut rng = TestRng(44);
    let pb = PBKDF2;
    let mut v2 = VecDevice::new();
    write::format(&mut v2, &small(pb, 4096), None, b"two", &mut rng).unwrap();
    v2.set_size((1 << 20) + 8192).unwrap();
    let mut v1 = VecDevice::new();
    crate::luks1::format(
        &mut v1,
        &crate::luks1::FormatParams::default(),
        None,
        b"one",
        &mut rng,
    )
    .unwrap();
    v1.set_size(4 << 20).unwrap();
    let mut json = vec![0u8; 1 << 14];
    let vol = crate::LuksVolume::unlock(&mut v2, b"two", &mut json, &mut []).unwrap();
    assert_eq!(vol.sector_size(), 4096);
    let vol = crate::LuksVolume::unlock(&mut v1, b"one", &mut json, &mut []).unwrap();
    assert_eq!(vol.sector_size(), 512);
    assert!(matches!(
        crate::LuksVolume::unlock(&mut v1, b"two", &mut json, &mut []),
        Err(Error::WrongPassphrase)
    ));
}

/// Random damage to the binary headers and the first JSON bytes of both
/// copies never panics: the header reads (from the surviving copy) or
/// fails with an error.
#[test]
fn damaged_binary_headers_never_panic() {
    let pb = PBKDF2;
    let mut rng = TestRng(55);
    let mut dev = VecDevice::new();
    write::format(&mut dev, &small(pb, 512), None, b"a", &mut rng).unwrap();
    let base = dev.into_vec();
    let mut json = vec![0u8; 1 << 16];
    let mut x = 0x9e37_79b9u32;
    let mut one_copy = 0;
    for i in 0..400usize {
        let mut b = base.clone();
        let mut hit = [false; 2];
        for _ in 0..1 + i % 4 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let c = (x >> 20) as usize & 1;
            hit[c] = true;
            let at = c * 0x4000 + (x as usize) % 4200;
            b[at] ^= (x >> 8) as u8 | 1;
        }
        let mut d = VecDevice::from_vec(b);
        let r = read_header(&mut d, &mut json);
        if let Ok(h) = &r {
            assert!(unlock(&mut d, h, b"a", None, &mut []).is_ok(), "case {i}");
        }
        // Damage to one copy leaves the other.
        if !(hit[0] && hit[1]) {
            one_copy += 1;
            assert!(r.is_ok(), "case {i}");
        }
    }
    assert!(one_copy > 100, "{one_copy}");
}

/// The digest's PBKDF2 runs on every unlock: iterations above the key
/// slots' ceiling are refused at parse, naming the digest, the value and
/// the offset of the field; the ceiling itself still parses.
#[test]
fn digest_iterations_above_the_ceiling_are_refused() {
    let mut rng = TestRng(34);
    let mut dev = VecDevice::new();
    write::format(&mut dev, &small(PBKDF2, 512), None, b"a", &mut rng).unwrap();
    let base = dev.into_vec();
    let mut json = vec![0u8; 1 << 16];
    // The digests come after the key slots: the last "iterations" is the
    // digest's.
    let poke = |n: u64| {
        let mut dev = VecDevice::from_vec(base.clone());
        forge(&mut dev, |t| {
            let at = t.rfind("\"iterations\":").unwrap() + "\"iterations\":".len();
            let end = at + t[at..].find(',').unwrap();
            std::format!("{}{n}{}", &t[..at], &t[end..])
        });
        dev
    };
    for n in [
        u64::from(u32::MAX),
        u64::from(crate::luks1::MAX_PBKDF2_ITERATIONS) + 1,
    ] {
        let mut dev = poke(n);
        let text_at = {
            let b = dev.as_slice();
            let area = &b[4096..0x4000];
            let end = area.iter().position(|&c| c == 0).unwrap();
            let t = core::str::from_utf8(&area[..end]).unwrap();
            (t.rfind("\"iterations\":").unwrap() + "\"iterations\":".len()) as u64
        };
        match read_header(&mut dev, &mut json) {
            Err(Error::Corrupt {
                structure: Structure::Luks2Json,
                offset,
                problem:
                    Problem::KdfCost {
                        what,
                        value,
                        ceiling,
                    },
            }) => {
                assert_eq!(what, "digests.0.iterations");
                assert_eq!(value, n);
                assert_eq!(ceiling, u64::from(crate::luks1::MAX_PBKDF2_ITERATIONS));
                // The value's offset in either copy (both are poked).
                assert!(
                    [4096 + text_at, 0x4000 + 4096 + text_at].contains(&offset),
                    "offset {offset} is not the value's ({text_at} into the JSON)"
                );
            }
            other => panic!("{n}: {other:?}"),
        }
    }
    let mut dev = poke(u64::from(crate::luks1::MAX_PBKDF2_ITERATIONS));
    let h = read_header(&mut dev, &mut json).unwrap();
    assert_eq!(
        h.meta.digests[0].iterations,
        crate::luks1::MAX_PBKDF2_ITERATIONS
    );
}

/// Calibration counts cryptsetup's time: a pass that took qimg 100 ms is
/// taken as 118 ms of libargon2.
#[test]
fn argon2_calibration_scales_to_cryptsetups_time() {
    let readings = [0u64, 100];
    let mut i = 0;
    let t = write::calibrate_argon2::<core::convert::Infallible>(true, 64, 1, 1180, || {
        let r = readings[i.min(1)];
        i += 1;
        r
    })
    .unwrap();
    assert_eq!(i, 2, "one timed pass");
    let per_pass = 100 * write::CRYPTSETUP_ARGON2_TIME_PERCENT / 100;
    assert!(per_pass > 100, "libargon2 is the slower one here");
    assert_eq!(u64::from(t), 1180 / per_pass);
}
