//! `xts-rate`: machine-readable throughput figures for `cargo xtask
//! bench-compare`, all measured in this one process: the raw `aes` bulk
//! ECB rate (the AES core's limit), every available XTS engine backend at
//! 4 KiB and 512-byte sectors in 64 KiB batches, and PBKDF2 iterations per
//! second. Each figure is the best of several timed rounds.
//!
//! It also times [`Backend::round_probe`] for each hardware backend: the
//! most AES rounds per second the core retires at that register width,
//! turned into the AES-256 rate no code using those registers can pass.
//!
//! Output lines: `aes-bulk gbps=..`, `xts backend=.. sector=.. gbps=..`,
//! `ceiling backend=.. gbps=..`, `pbkdf2 hash=.. iters_per_s=..`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::Aes256;
use cipher::{Array, BlockCipherEncrypt, KeyInit};
use luks_core::simd::{Backend, XtsEngine};
use luks_core::HashAlg;

/// Bytes per call: a 64 KiB batch, as the sector paths use.
const BATCH: usize = 64 * 1024;
/// Length of one timed round.
const ROUND: Duration = Duration::from_millis(300);
/// Rounds per figure; the best is reported.
const ROUNDS: usize = 5;

/// Runs `f` (which processes `bytes` bytes) repeatedly and returns the best
/// rate over the rounds, in GB/s.
fn best_gbps(bytes: usize, mut f: impl FnMut()) -> f64 {
    let mut best = 0f64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < ROUND {
            f();
            n += 1;
        }
        let rate = (n as f64 * bytes as f64) / start.elapsed().as_secs_f64() / 1e9;
        best = best.max(rate);
    }
    best
}

fn main() {
    let key = qimg_bench::fixed_bytes(64, 42);
    let mut buf = qimg_bench::fixed_bytes(BATCH, 7);

    let aes = match Aes256::new_from_slice(&key[..32]) {
        Ok(a) => a,
        Err(_) => {
            eprintln!("xts-rate: cannot key AES-256");
            std::process::exit(1);
        }
    };
    let mut blocks: Vec<Array<u8, _>> = buf
        .chunks_exact(16)
        .map(|c| Array::try_from(c).unwrap_or_default())
        .collect();
    let bulk = best_gbps(BATCH, || aes.encrypt_blocks(black_box(&mut blocks)));
    println!("aes-bulk gbps={bulk:.3}");

    for backend in Backend::ALL {
        let Some(e) = XtsEngine::with_backend(&key, backend) else {
            println!("xts backend={} unavailable", backend.name());
            continue;
        };
        for sector in [4096usize, 512] {
            let rate = best_gbps(BATCH, || {
                if e.encrypt_sectors(black_box(&mut buf), sector, 1000)
                    .is_err()
                {
                    std::process::exit(1);
                }
            });
            println!(
                "xts backend={} sector={sector} gbps={rate:.3}",
                backend.name()
            );
        }
    }

    for backend in Backend::ALL {
        if backend.round_probe(1).is_none() {
            continue;
        }
        // AES-256 is 14 rounds a block (the first key addition is a plain
        // XOR, which other ports take).
        let iters = 1 << 20;
        let mut rounds = 0u64;
        let rate = best_gbps(1, || {
            if let Some(p) = backend.round_probe(black_box(iters)) {
                rounds = p.block_rounds;
                black_box(p.fold);
            }
        });
        // `best_gbps` counted calls (bytes = 1): calls/s x block-rounds per
        // call x 16 bytes / 14 rounds.
        let gbps = rate * rounds as f64 * 16.0 / 14.0;
        println!("ceiling backend={} gbps={gbps:.3}", backend.name());
    }

    for (hash, name) in [(HashAlg::Sha256, "sha256"), (HashAlg::Sha1, "sha1")] {
        let iters = 100_000u32;
        let mut out = [0u8; 32];
        let mut best = 0f64;
        for _ in 0..3 {
            let start = Instant::now();
            hash.pbkdf2(b"passphrase", b"salt-salt-salt-salt", iters, &mut out);
            best = best.max(f64::from(iters) / start.elapsed().as_secs_f64());
        }
        black_box(out);
        println!("pbkdf2 hash={name} iters_per_s={best:.0}");
    }
}
