//! qcow2 in memory: guest-to-host mapping over a fully allocated image
//! (one `map` per cluster) beside a plain walk of the same L2 entries, and
//! end-to-end reading of a LUKS-encrypted qcow2 image beside decrypting the
//! same number of bytes with the XTS engine alone (the cost floor), all in
//! the same run. No files: the images live in `VecDevice`s.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark harness: failing loudly is right

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use luks_core::io::{BlockIo, MemDevice, VecDevice, Window};
use luks_core::luks1::{self, FormatParams};
use luks_core::simd::XtsEngine;
use qcow_core::crypto::ImageKey;
use qcow_core::{create, CreateOptions, Qcow2};
use std::hint::black_box;

const SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 64 << 10;
const CHUNK: usize = 1 << 20;

/// A deterministic, non-cryptographic stand-in for the random source LUKS
/// formatting asks for (a benchmark fixture, never a real volume).
struct FixedRng(u64);

impl rand_core::TryRng for FixedRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok((self.try_next_u64()? >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Ok(self.0)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for c in dst.chunks_mut(8) {
            let v = self.try_next_u64()?.to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for FixedRng {}

/// A fully written plain image and an encrypted one, as bytes.
fn images() -> (Vec<u8>, Vec<u8>) {
    let data = qimg_bench::fixed_bytes(CHUNK, 9);
    let plain = {
        let o = CreateOptions {
            size: SIZE,
            cluster_size: CLUSTER,
            ..CreateOptions::default()
        };
        let mut w = create(VecDevice::new(), &o).unwrap();
        w.set_write_barriers(false);
        for off in (0..SIZE).step_by(CHUNK) {
            w.write_at(off, &data).unwrap();
        }
        w.close().unwrap().into_vec()
    };
    let enc = {
        let o = CreateOptions {
            size: SIZE,
            cluster_size: CLUSTER,
            luks_region_len: Some(2 << 20),
            ..CreateOptions::default()
        };
        let mut w = create(VecDevice::new(), &o).unwrap();
        let (off, len) = w.crypto_region().unwrap();
        let params = FormatParams {
            iterations: 1000,
            ..FormatParams::default()
        };
        let mut region = Window::new(w.device(), off, len);
        let (hdr, key) =
            luks1::format(&mut region, &params, None, b"bench", &mut FixedRng(7)).unwrap();
        let cipher = luks1::data_cipher::<()>(&hdr, &key).unwrap();
        let mut w = w.with_key(ImageKey::Luks(cipher)).unwrap();
        w.set_write_barriers(false);
        for off in (0..SIZE).step_by(CHUNK) {
            w.write_at(off, &data).unwrap();
        }
        w.close().unwrap().into_vec()
    };
    (plain, enc)
}

fn bench(c: &mut Criterion) {
    let (plain, enc) = images();

    let mut group = c.benchmark_group("qcow2_map");
    group.throughput(Throughput::Elements(SIZE / CLUSTER));
    let mut cache = vec![0u8; 64 * 1024];
    group.bench_function("map_every_cluster", |b| {
        let mut q = Qcow2::open(MemDevice::read_only(&plain), &mut cache).unwrap();
        b.iter(|| {
            let mut g = 0;
            while g < SIZE {
                black_box(q.map(g, CLUSTER).unwrap());
                g += CLUSTER;
            }
        })
    });
    // Baseline: decoding the same number of big-endian entries from memory.
    let entries = qimg_bench::fixed_bytes(usize::try_from(SIZE / CLUSTER).unwrap() * 8, 5);
    group.bench_function("baseline_decode_l2_entries", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for e in entries.chunks_exact(8) {
                let v = u64::from_be_bytes(e.try_into().unwrap());
                acc ^= qcow_core::entry::l1_l2_offset(v);
            }
            black_box(acc)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("qcow2_decrypt_e2e");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SIZE));
    let mut buf = vec![0u8; CHUNK];
    group.bench_function("encrypted_qcow2_read_64MiB", |b| {
        let info = Qcow2::open(MemDevice::read_only(&enc), &mut cache)
            .unwrap()
            .info()
            .clone();
        let mut dev = MemDevice::read_only(&enc);
        let mut key = ImageKey::unlock(&mut dev, &info, b"bench")
            .unwrap()
            .unwrap();
        let mut q = Qcow2::open(MemDevice::read_only(&enc), &mut cache)
            .unwrap()
            .with_decryptor(&mut key);
        b.iter(|| {
            let mut g = 0;
            while g < SIZE {
                q.read_at(g, &mut buf).unwrap();
                g += CHUNK as u64;
            }
            black_box(&buf);
        })
    });
    let engine = XtsEngine::new(&qimg_bench::fixed_bytes(64, 1)).unwrap();
    group.bench_function("baseline_xts_decrypt_64MiB", |b| {
        b.iter(|| {
            for _ in 0..SIZE / CHUNK as u64 {
                engine.decrypt_sectors(black_box(&mut buf), 512, 0).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
