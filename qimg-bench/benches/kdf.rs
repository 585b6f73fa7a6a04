//! PBKDF2 iterations per second (SHA-256 and SHA-1, the LUKS1 defaults of
//! cryptsetup and qemu), beside the hash's own limit in the same run: two
//! compression-function calls per iteration (the inner and outer HMAC
//! hashes with the pads precomputed), measured as hashing 64-byte blocks.

#![allow(clippy::unwrap_used)] // a benchmark harness: failing loudly is right

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use luks_core::HashAlg;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::hint::black_box;

const ITERATIONS: u32 = 10_000;

fn limit<D: Digest>(blocks: u32) -> Vec<u8> {
    // Two one-block messages per iteration: what PBKDF2-HMAC must hash.
    let block = [0x36u8; 64];
    let mut last = Vec::new();
    for _ in 0..blocks {
        last = D::digest(black_box(&block)).to_vec();
    }
    last
}

fn bench_pbkdf2(c: &mut Criterion) {
    let mut group = c.benchmark_group("pbkdf2");
    group.throughput(Throughput::Elements(u64::from(ITERATIONS)));
    let salt = qimg_bench::fixed_bytes(32, 3);
    for (name, alg) in [("sha256", HashAlg::Sha256), ("sha1", HashAlg::Sha1)] {
        group.bench_function(BenchmarkId::new("qimg", name), |b| {
            let mut out = [0u8; 32];
            b.iter(|| alg.pbkdf2(black_box(b"passphrase"), &salt, ITERATIONS, &mut out))
        });
    }
    // The limit: 2 x ITERATIONS single-block hashes (each one padding block
    // more than a raw compression, so a slight under-estimate of it).
    group.bench_function(BenchmarkId::new("limit_2_hashes_per_iter", "sha256"), |b| {
        b.iter(|| limit::<Sha256>(2 * ITERATIONS))
    });
    group.bench_function(BenchmarkId::new("limit_2_hashes_per_iter", "sha1"), |b| {
        b.iter(|| limit::<Sha1>(2 * ITERATIONS))
    });
    group.finish();
}

criterion_group!(benches, bench_pbkdf2);
criterion_main!(benches);
