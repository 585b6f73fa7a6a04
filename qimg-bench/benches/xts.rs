//! AES-XTS sector throughput: every available `XtsEngine` backend against
//! `xts-mode` (block at a time) and the raw `aes` bulk ECB rate (the AES
//! core's own limit), all AES-256 and measured in the same run; and the
//! three LUKS block ciphers (aes, serpent, twofish) side by side through
//! `SectorCipher`'s xts-plain64, 256-bit halves (group `xts_cipher`).

#![allow(clippy::unwrap_used)] // a benchmark harness: failing loudly is right

use aes::Aes256;
use cipher::{Array, BlockCipherEncrypt, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use luks_core::simd::{Backend, XtsEngine};
use luks_core::SectorCipher;
use std::hint::black_box;
use xts_mode::{get_tweak_default, Xts128};

const BATCH: usize = 64 * 1024;

fn key() -> Vec<u8> {
    qimg_bench::fixed_bytes(64, 42)
}

/// (label, sector size, total bytes per call)
const SHAPES: [(&str, usize, usize); 4] = [
    ("512B_single", 512, 512),
    ("4K_single", 4096, 4096),
    ("512B_batch64K", 512, BATCH),
    ("4K_batch64K", 4096, BATCH),
];

fn bench_dir(c: &mut Criterion, encrypt: bool) {
    let key = key();
    let name = if encrypt {
        "xts_encrypt"
    } else {
        "xts_decrypt"
    };
    let mut group = c.benchmark_group(name);
    let xts = {
        let (a, b) = key.split_at(32);
        Xts128::new(
            Aes256::new_from_slice(a).unwrap(),
            Aes256::new_from_slice(b).unwrap(),
        )
    };
    for (label, ss, len) in SHAPES {
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = qimg_bench::fixed_bytes(len, 7);
        for backend in Backend::ALL {
            let Some(e) = XtsEngine::with_backend(&key, backend) else {
                println!("{name}/{backend}: not available on this CPU, skipped");
                continue;
            };
            group.bench_function(BenchmarkId::new(backend.name(), label), |b| {
                b.iter(|| {
                    if encrypt {
                        e.encrypt_sectors(black_box(&mut buf), ss, 1000).unwrap()
                    } else {
                        e.decrypt_sectors(black_box(&mut buf), ss, 1000).unwrap()
                    }
                })
            });
        }
        group.bench_function(BenchmarkId::new("xts-mode", label), |b| {
            b.iter(|| {
                for (i, s) in black_box(&mut buf).chunks_exact_mut(ss).enumerate() {
                    let t = get_tweak_default(1000 + i as u128);
                    if encrypt {
                        xts.encrypt_sector(s, t)
                    } else {
                        xts.decrypt_sector(s, t)
                    }
                }
            })
        });
    }
    group.finish();
}

fn bench_encrypt(c: &mut Criterion) {
    bench_dir(c, true);
}

fn bench_decrypt(c: &mut Criterion) {
    bench_dir(c, false);
}

/// The limit: `aes` bulk ECB over 64 KiB, no XTS work at all.
fn bench_aes_bulk(c: &mut Criterion) {
    let k = key();
    let aes = Aes256::new_from_slice(&k[..32]).unwrap();
    let mut blocks = vec![Array([0u8; 16]); BATCH / 16];
    let mut group = c.benchmark_group("aes_bulk");
    group.throughput(Throughput::Bytes(BATCH as u64));
    group.bench_function("aes256_encrypt_blocks_64K", |b| {
        b.iter(|| aes.encrypt_blocks(black_box(&mut blocks)))
    });
    group.finish();
}

/// aes, serpent and twofish XTS (512-bit keys, plain64 IVs) through the
/// public `SectorCipher`, 64 KiB of 512-byte sectors per call, so the
/// twofish/serpent ratio comes from one run.
fn bench_ciphers(c: &mut Criterion) {
    let key = key();
    let mut group = c.benchmark_group("xts_cipher");
    group.throughput(Throughput::Bytes(BATCH as u64));
    let mut buf = qimg_bench::fixed_bytes(BATCH, 9);
    for name in ["aes", "serpent", "twofish"] {
        let sc = SectorCipher::new(name, "xts-plain64", &key, 512).unwrap();
        group.bench_function(BenchmarkId::new("encrypt", name), |b| {
            b.iter(|| sc.encrypt_sectors(1000, black_box(&mut buf)).unwrap())
        });
        group.bench_function(BenchmarkId::new("decrypt", name), |b| {
            b.iter(|| sc.decrypt_sectors(1000, black_box(&mut buf)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_aes_bulk,
    bench_encrypt,
    bench_decrypt,
    bench_ciphers
);
criterion_main!(benches);
