//! Reading a qcow2 image of random data through the allocation-free reader
//! over `FileDevice`, against a plain read loop of the raw equivalent, in
//! the same run. Size: `QIMG_BENCH_MIB` (default 256).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark harness: failing loudly is right

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcow_core::io::FileDevice;
use qcow_core::{BlockIo, Qcow2};
use std::hint::black_box;
use std::io::Read;
use std::process::Command;

const CHUNK: usize = 1 << 20;

fn find_qemu_img() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-img"))
        .find(|p| p.is_file())
}

fn bench_qcow2_read(c: &mut Criterion) {
    let Some(qemu_img) = find_qemu_img() else {
        eprintln!("SKIPPED qcow2_read: qemu-img is not installed");
        return;
    };
    let mib: usize = std::env::var("QIMG_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib * CHUNK;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let img = dir.path().join("src.qcow2");
    std::fs::write(&raw, qimg_bench::fixed_bytes(size, 42)).unwrap();
    let st = Command::new(qemu_img)
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert failed");

    let mut group = c.benchmark_group("qcow2_read");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(size as u64));
    let mut buf = vec![0u8; CHUNK];
    group.bench_function(format!("baseline_raw_file_{mib}MiB"), |b| {
        b.iter(|| {
            let mut f = std::fs::File::open(&raw).unwrap();
            let mut total = 0usize;
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            black_box(total)
        })
    });
    let mut cache = vec![0u8; 64 * 1024];
    group.bench_function(format!("qcow2_noalloc_{mib}MiB"), |b| {
        b.iter(|| {
            let mut q = Qcow2::open(FileDevice::open(&img).unwrap(), &mut cache).unwrap();
            let mut pos = 0u64;
            while pos < size as u64 {
                q.read_at(pos, &mut buf).unwrap();
                pos += CHUNK as u64;
            }
            black_box(&buf);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_qcow2_read);
criterion_main!(benches);
