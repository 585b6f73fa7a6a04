//! The byte-granular helpers against a plain `copy_from_slice` baseline.

#![allow(clippy::unwrap_used)] // a benchmark harness: failing loudly is right

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use luks_core::io::{read_bytes, MemDevice};
use std::hint::black_box;

fn bench_read_bytes(c: &mut Criterion) {
    let data = qimg_bench::fixed_bytes(1 << 20, 1);
    let mut group = c.benchmark_group("read_bytes");
    for &len in &[4096usize, 65536] {
        group.throughput(Throughput::Bytes(len as u64));
        let mut out = vec![0u8; len];
        group.bench_with_input(BenchmarkId::new("baseline_copy", len), &len, |b, &len| {
            b.iter(|| out.copy_from_slice(black_box(&data[100..100 + len])))
        });
        let mut bounce = [0u8; 512];
        group.bench_with_input(BenchmarkId::new("unaligned_512", len), &len, |b, _| {
            let mut dev = MemDevice::read_only(&data).with_sector_size(512).unwrap();
            b.iter(|| read_bytes(&mut dev, black_box(100), &mut out, &mut bounce).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_read_bytes);
criterion_main!(benches);
