//! Known-answer tests (IEEE 1619) and cross-checks against `xts-mode` for
//! every backend this CPU supports.

// Test data generators truncate on purpose; the reference enum is test-only;
// sizes and counters are small constants of the test loops.
#![allow(
    clippy::cast_possible_truncation,
    clippy::large_enum_variant,
    clippy::arithmetic_side_effects
)]

use super::{Backend, XtsEngine, XtsError};
use aes::{Aes128, Aes256};
use cipher::{BlockCipherDecrypt, BlockCipherEncrypt, BlockSizeUser, KeyInit};
use std::vec::Vec;
use xts_mode::{get_tweak_default, Xts128};

extern crate std;
use std::println;

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    assert_eq!(s.len() % 2, 0);
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Backends the CPU supports; prints the ones it does not.
fn backends() -> Vec<Backend> {
    let mut v = Vec::new();
    for b in Backend::ALL {
        if b.is_available() {
            v.push(b);
        } else {
            println!("NOT RUN: backend {b} (CPU lacks its features); testing the others");
        }
    }
    v
}

/// Engines on every available backend.
fn engines(key: &[u8]) -> Vec<XtsEngine> {
    backends()
        .into_iter()
        .map(|b| XtsEngine::with_backend(key, b).unwrap())
        .collect()
}

/// Deterministic xorshift bytes.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn kat(key: &str, dusn: u64, pt: &[u8], ct: &str) {
    let key = hex(key);
    let ct = hex(ct);
    assert_eq!(pt.len(), ct.len());
    for b in backends() {
        let e = XtsEngine::with_backend(&key, b).unwrap();
        assert_eq!(e.backend(), b);
        let mut buf = pt.to_vec();
        e.encrypt_sectors(&mut buf, pt.len(), dusn).unwrap();
        assert_eq!(buf, ct, "{b} encrypt");
        e.decrypt_sectors(&mut buf, pt.len(), dusn).unwrap();
        assert_eq!(buf, pt, "{b} decrypt");
    }
}

fn pt512() -> Vec<u8> {
    (0..512).map(|i| (i % 256) as u8).collect()
}

#[test]
fn ieee1619_vector_1() {
    kat(
        "00000000000000000000000000000000 00000000000000000000000000000000",
        0,
        &[0; 32],
        "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e",
    );
}

#[test]
fn ieee1619_vector_2() {
    // Data unit sequence number 0x3333333333, tweak bytes 3333333333000000..:
    // the number is little-endian 128-bit.
    kat(
        "11111111111111111111111111111111 22222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    );
}

#[test]
fn ieee1619_vector_3() {
    kat(
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0 22222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    );
}

const V4_CT: &str = "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c
c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412
328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce
93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265
5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8
a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434
1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c
5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e
94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc
1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3
e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344
b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd
74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752
afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e
bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d
eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568";

#[test]
fn ieee1619_vector_4() {
    kat(
        "27182818284590452353602874713526 31415926535897932384626433832795",
        0,
        &pt512(),
        V4_CT,
    );
}

const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

#[test]
fn ieee1619_vector_10() {
    kat(
        "27182818284590452353602874713526624977572470936999595749669676 27
         31415926535897932384626433832795028841971693993751058209749445 92",
        0xff,
        &pt512(),
        V10_CT,
    );
}

/// Reference: `xts-mode`, one sector at a time, IV wrapping mod 2^64 like
/// dm-crypt's plain64.
fn reference<C>(xts: &Xts128<C>, data: &mut [u8], ss: usize, iv: u64, step: u64, enc: bool)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = cipher::consts::U16>,
{
    let mut v = iv;
    for s in data.chunks_exact_mut(ss) {
        let t = get_tweak_default(u128::from(v));
        if enc {
            xts.encrypt_sector(s, t);
        } else {
            xts.decrypt_sector(s, t);
        }
        v = v.wrapping_add(step);
    }
}

fn ref_xts(key: &[u8]) -> RefXts {
    let (a, b) = key.split_at(key.len() / 2);
    if key.len() == 32 {
        RefXts::A128(Xts128::new(
            Aes128::new_from_slice(a).unwrap(),
            Aes128::new_from_slice(b).unwrap(),
        ))
    } else {
        RefXts::A256(Xts128::new(
            Aes256::new_from_slice(a).unwrap(),
            Aes256::new_from_slice(b).unwrap(),
        ))
    }
}

enum RefXts {
    A128(Xts128<Aes128>),
    A256(Xts128<Aes256>),
}

impl RefXts {
    fn run(&self, data: &mut [u8], ss: usize, iv: u64, step: u64, enc: bool) {
        match self {
            RefXts::A128(x) => reference(x, data, ss, iv, step, enc),
            RefXts::A256(x) => reference(x, data, ss, iv, step, enc),
        }
    }
}

const STARTS: [u64; 5] = [0, 1, 0x1234_5677, u64::MAX - 16, u64::MAX];

fn cross_check(sizes: &[usize], batches: core::ops::RangeInclusive<usize>, step: u64) -> usize {
    let mut checked = 0;
    for key_len in [32usize, 64] {
        let key = bytes(key_len, key_len as u64);
        let r = ref_xts(&key);
        let engines = engines(&key);
        for &ss in sizes {
            for n in batches.clone() {
                for &start in &STARTS {
                    let pt = bytes(ss * n, (ss * n) as u64 ^ start);
                    let mut want = pt.clone();
                    r.run(&mut want, ss, start, step, true);
                    for e in &engines {
                        let mut buf = pt.clone();
                        e.encrypt_sectors_with_step(&mut buf, ss, start, step)
                            .unwrap();
                        assert!(
                            buf == want,
                            "{} encrypt key {key_len} ss {ss} n {n} start {start:#x}",
                            e.backend()
                        );
                        e.decrypt_sectors_with_step(&mut buf, ss, start, step)
                            .unwrap();
                        assert!(
                            buf == pt,
                            "{} decrypt key {key_len} ss {ss} n {n} start {start:#x}",
                            e.backend()
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    checked
}

#[test]
fn matches_xts_mode_luks_sector_sizes() {
    let n = cross_check(&[512, 1024, 4096], 1..=33, 1);
    println!("{n} cross-checks against xts-mode");
}

#[test]
fn multi_batch_calls_match_xts_mode() {
    // The hardware kernels compute first tweaks in batches of 64 sectors
    // (the VAES-512 one 32 at a time in one interleaved pass, the others 8
    // or 16 at a time) and then run the sectors back to back: cover counts
    // just below, at and above one, two and three batches and the 32-sector
    // passes, odd counts, both LUKS sector sizes, both directions (inside
    // `cross_check`) and starting IVs that are not batch aligned or wrap.
    let mut n = 0;
    for batches in [
        7..=9,
        15..=17,
        31..=33,
        63..=65,
        95..=97,
        127..=129,
        191..=193,
    ] {
        n += cross_check(&[512], batches.clone(), 1);
    }
    for batches in [31..=33, 63..=65, 127..=129] {
        n += cross_check(&[4096], batches.clone(), 1);
        n += cross_check(&[4096], batches, 8);
    }
    println!("{n} cross-checks against xts-mode");
}

#[test]
fn streamed_group_counts_match_xts_mode() {
    // Sectors of whole groups (256 bytes for AES-NI, 512 for VAES) run as
    // one stream of groups with the next group loaded, and its tweaks
    // stepped or derived from the next sector's T0, during the current
    // group's rounds (AES-NI: its tweaks written two groups ahead by an
    // integer chain that restarts at each sector): cover 1, 2, 3, 4, 8,
    // 16 and 32 groups per sector, single sectors, partial and odd batches
    // and more than one batch, both directions (inside `cross_check`), IV
    // steps 1 and 8.
    let mut n = 0;
    for batches in [1..=3, 31..=33, 63..=65] {
        n += cross_check(&[256, 512, 768, 1024, 1536, 2048], batches.clone(), 1);
        n += cross_check(&[1536, 4096], batches, 8);
    }
    n += cross_check(&[8192], 1..=3, 1);
    n += cross_check(&[8192], 33..=33, 16);
    println!("{n} cross-checks against xts-mode");
}

#[test]
fn split_calls_equal_one_call() {
    // A buffer encrypted in one call equals the same buffer encrypted in
    // pieces at the matching sector numbers, whatever the piece sizes
    // (so batch boundaries never show in the output).
    let key = bytes(64, 21);
    for b in backends() {
        let e = XtsEngine::with_backend(&key, b).unwrap();
        for (ss, count) in [(512usize, 101usize), (4096, 67)] {
            let pt = bytes(ss * count, ss as u64);
            for start in [0u64, 3, 0x1234_5677, u64::MAX - 40] {
                let mut whole = pt.clone();
                e.encrypt_sectors(&mut whole, ss, start).unwrap();
                let mut pieces = pt.clone();
                let mut at = 0;
                for (i, len) in [1usize, 31, 33, 2, 17, 5, 12].iter().cycle().enumerate() {
                    if at == count {
                        break;
                    }
                    let len = (*len).min(count - at);
                    let piece = &mut pieces[at * ss..(at + len) * ss];
                    let iv = start.wrapping_add(at as u64);
                    e.encrypt_sectors(piece, ss, iv).unwrap();
                    at += len;
                    assert!(i < 64, "pieces never covered the buffer");
                }
                assert!(pieces == whole, "{b} ss {ss} start {start:#x}");
                // And decryption in pieces of different sizes undoes it.
                at = 0;
                for len in [40usize, 3, 29].iter().cycle() {
                    if at == count {
                        break;
                    }
                    let len = (*len).min(count - at);
                    let piece = &mut pieces[at * ss..(at + len) * ss];
                    e.decrypt_sectors(piece, ss, start.wrapping_add(at as u64))
                        .unwrap();
                    at += len;
                }
                assert!(pieces == pt, "{b} decrypt ss {ss} start {start:#x}");
            }
        }
    }
}

#[test]
fn matches_xts_mode_odd_sector_sizes() {
    // Exercise every kernel's tail handling (not a whole register count).
    let n = cross_check(&[16, 32, 48, 64, 80, 112, 528, 1040, 4112], 1..=5, 1);
    println!("{n} cross-checks against xts-mode");
}

#[test]
fn iv_step_for_4096_byte_sectors() {
    let n = cross_check(&[4096], 1..=9, 8);
    println!("{n} cross-checks against xts-mode");
    // With step 8, a 4096-byte sector at IV 8k encrypts like the first
    // 512-byte unit of IV 8k (same tweak, same block positions).
    let key = bytes(64, 9);
    let e = XtsEngine::new(&key).unwrap();
    let pt = bytes(4096 * 3, 3);
    let mut a = pt.clone();
    e.encrypt_sectors_with_step(&mut a, 4096, 80, 8).unwrap();
    for i in 0..3 {
        let mut b = pt[i * 4096..(i + 1) * 4096].to_vec();
        e.encrypt_sectors(&mut b, 4096, 80 + 8 * i as u64).unwrap();
        assert_eq!(b, &a[i * 4096..(i + 1) * 4096]);
    }
}

#[test]
fn all_backends_identical_on_large_batch() {
    let key = bytes(64, 77);
    let pt = bytes(64 * 1024, 5);
    let mut outs = Vec::new();
    for b in backends() {
        let e = XtsEngine::with_backend(&key, b).unwrap();
        let mut buf = pt.clone();
        e.encrypt_sectors(&mut buf, 512, u64::MAX - 60).unwrap();
        outs.push((b, buf));
    }
    for (b, o) in &outs[1..] {
        assert!(*o == outs[0].1, "{b} differs from {}", outs[0].0);
    }
}

#[test]
fn rejects_bad_lengths() {
    let e = XtsEngine::new(&[7; 32]).unwrap();
    let mut buf = [0u8; 1024];
    assert_eq!(
        e.encrypt_sectors(&mut buf, 0, 0),
        Err(XtsError::SectorSize(0))
    );
    assert_eq!(
        e.encrypt_sectors(&mut buf, 24, 0),
        Err(XtsError::SectorSize(24))
    );
    assert_eq!(
        e.decrypt_sectors(&mut buf[..1000], 512, 0),
        Err(XtsError::DataLength {
            len: 1000,
            sector_size: 512
        })
    );
    assert_eq!(e.encrypt_sectors(&mut buf[..0], 512, 0), Ok(()));
    assert_eq!(
        XtsEngine::new(&[0; 48]).err(),
        Some(XtsError::KeyLength(48))
    );
    assert_eq!(
        XtsEngine::new(&[0; 16]).err(),
        Some(XtsError::KeyLength(16))
    );
    assert!(XtsEngine::with_backend(&[0; 33], Backend::Portable).is_none());
}

#[test]
fn backend_selection_and_debug() {
    let best = Backend::best();
    assert!(best.is_available());
    assert!(Backend::Portable.is_available());
    let e = XtsEngine::new(&[1; 64]).unwrap();
    assert_eq!(e.backend(), best);
    assert_eq!(std::format!("{e:?}"), "XtsEngine { .. }");
    for b in Backend::ALL {
        let got = XtsEngine::with_backend(&[1; 64], b);
        assert_eq!(got.is_some(), b.is_available(), "{b}");
        println!("backend {b}: available = {}", b.is_available());
    }
}

/// The round probe computes real AES rounds: each hardware width gives the
/// fold `aes`'s software round gives on the same chains, and counts the
/// block-rounds it did.
#[test]
fn round_probe_matches_software_rounds() {
    const CHAINS: u64 = 12;
    let iters = 5u64;
    let key = 0x5a5a_1234u32.to_le_bytes().repeat(4);
    let key = aes::Block::try_from(&key[..]).unwrap();
    let mut want = 0u64;
    for i in 0..CHAINS {
        let start = (i as u32).to_le_bytes().repeat(4);
        let mut b = aes::Block::try_from(&start[..]).unwrap();
        for _ in 0..iters {
            aes::hazmat::cipher_round(&mut b, &key);
        }
        want ^= u64::from_le_bytes(b[..8].try_into().unwrap());
    }
    assert!(Backend::Portable.round_probe(iters).is_none());
    for b in backends() {
        if b == Backend::Portable {
            continue;
        }
        let p = b.round_probe(iters).unwrap();
        assert_eq!(p.fold, want, "{b}");
        assert_eq!(p.block_rounds, iters * CHAINS * b.lanes(), "{b}");
    }
}

/// A small deterministic generator for the property test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn batched_equals_per_sector_equals_portable() {
    // Property: for random AES-128/256 XTS keys, sector counts 1..=40,
    // sector sizes (the LUKS ones, multiples of 512 up to 4096 and odd
    // multiples of 16), IVs near the
    // u64 wrap and elsewhere, IV steps 1 and 8, and both directions, every
    // backend's one-call (batched) result equals the same backend called
    // sector by sector, and equals the portable backend's.
    let mut rng = Rng(0x005e_ed0f_0bad_c0de);
    let mut checked = 0;
    for trial in 0..160 {
        let key_len = if trial % 2 == 0 { 32 } else { 64 };
        let key = bytes(key_len, rng.next());
        let portable = XtsEngine::with_backend(&key, Backend::Portable).unwrap();
        let engines = engines(&key);
        let n = 1 + rng.below(40) as usize;
        let ss = match rng.below(5) {
            0 => 512,
            1 => 4096,
            2 => 1024,
            3 => 512 * (1 + rng.below(8) as usize),
            _ => 16 * (1 + rng.below(70) as usize),
        };
        let start = match rng.below(3) {
            0 => u64::MAX - rng.below(48),
            1 => rng.below(64),
            _ => rng.next(),
        };
        let step = if rng.below(2) == 0 { 1 } else { 8 };
        let data = bytes(ss * n, rng.next());
        for enc in [true, false] {
            let run = |e: &XtsEngine, buf: &mut [u8], iv: u64| {
                if enc {
                    e.encrypt_sectors_with_step(buf, ss, iv, step).unwrap();
                } else {
                    e.decrypt_sectors_with_step(buf, ss, iv, step).unwrap();
                }
            };
            let mut want = data.clone();
            run(&portable, &mut want, start);
            for e in &engines {
                let b = e.backend();
                let mut batched = data.clone();
                run(e, &mut batched, start);
                let mut single = data.clone();
                for (i, sector) in single.chunks_exact_mut(ss).enumerate() {
                    run(e, sector, start.wrapping_add(step.wrapping_mul(i as u64)));
                }
                let what = std::format!(
                    "{b} enc {enc} key {key_len} ss {ss} n {n} start {start:#x} step {step}"
                );
                assert!(batched == single, "batched != per-sector: {what}");
                assert!(batched == want, "batched != portable: {what}");
                checked += 1;
            }
        }
    }
    println!("{checked} batched/per-sector/portable comparisons");
}

/// The data-path probe computes what its documentation says, checked
/// against `aes`'s software round on a buffer of several groups.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[test]
fn datapath_probe_matches_software_rounds() {
    use super::x86::{PROBE_KEYS, PROBE_TWEAKS, PROBE_TWEAK_VALUES};
    let len = 4 * 512;
    let input: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let mut want = input.clone();
    for (i, block) in want.chunks_exact_mut(16).enumerate() {
        let t = PROBE_TWEAK_VALUES[i % PROBE_TWEAKS];
        let mut b = aes::Block::default();
        for j in 0..16 {
            b[j] = block[j] ^ t[j] ^ PROBE_KEYS[0][j];
        }
        for (r, key) in PROBE_KEYS.iter().enumerate().skip(1) {
            let mut k = *key;
            if r == 14 {
                for j in 0..16 {
                    k[j] ^= t[j];
                }
            }
            aes::hazmat::cipher_round(&mut b, &aes::Block::from(k));
        }
        block.copy_from_slice(&b);
    }
    let mut odd = input[..len - 16].to_vec();
    for b in Backend::ALL {
        let mut got = input.clone();
        if !b.datapath_probe(&mut got) {
            println!("backend {b}: no data-path probe here");
            assert_eq!(got, input, "{b}");
            continue;
        }
        assert_eq!(got, want, "{b}");
        assert!(!b.datapath_probe(&mut odd), "{b}");
        assert!(!b.datapath_probe(&mut []), "{b}");
    }
    assert!(!Backend::Portable.datapath_probe(&mut odd));
}
