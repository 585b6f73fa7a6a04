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
//! `ceiling backend=.. gbps=..`, `pbkdf2 hash=.. iters_per_s=..`, after a
//! first line `clock=cpu` or `clock=wall`.
//!
//! Clock: by default every rate is per second of this thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), so the XTS rates and the round ceiling are
//! measured alike and their ratio holds on a machine busy with other work
//! (a preempted thread accrues no CPU time; `openssl speed`, which
//! `bench-compare` sets beside these figures, also counts CPU time by
//! default). `--wall` times with the monotonic wall clock instead.

use std::hint::black_box;
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};

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

/// Calls between two clock reads. Reading the thread CPU clock is a system
/// call (about a microsecond under KVM), a quarter of one 64 KiB XTS call
/// at 15 GB/s, so the clock is read once per group of calls.
const GROUP: u64 = 64;

/// What the rates are per second of.
#[derive(Clone, Copy)]
enum Clock {
    /// This thread's CPU time.
    Cpu,
    /// Monotonic wall-clock time.
    Wall,
}

impl Clock {
    /// Time elapsed since a fixed point of this clock.
    fn now(self, origin: Instant) -> Duration {
        match self {
            Clock::Cpu => clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
                .map_or(Duration::ZERO, Duration::from),
            Clock::Wall => origin.elapsed(),
        }
    }

    /// Runs `f` (which processes `bytes` bytes) repeatedly and returns the
    /// best rate over the rounds, in GB/s of this clock.
    fn best_gbps(self, bytes: usize, group: u64, mut f: impl FnMut()) -> f64 {
        let origin = Instant::now();
        let mut best = 0f64;
        for _ in 0..ROUNDS {
            let start = self.now(origin);
            let mut n = 0u64;
            let mut took = Duration::ZERO;
            while took < ROUND {
                for _ in 0..group {
                    f();
                }
                n += group;
                took = self.now(origin).saturating_sub(start);
            }
            let rate = (n as f64 * bytes as f64) / took.as_secs_f64() / 1e9;
            best = best.max(rate);
        }
        best
    }
}

fn main() {
    let clock = match std::env::args().nth(1).as_deref() {
        None | Some("--cpu") => Clock::Cpu,
        Some("--wall") => Clock::Wall,
        Some(other) => {
            eprintln!("xts-rate: unknown argument {other}; expected --cpu (default) or --wall");
            std::process::exit(2);
        }
    };
    println!(
        "clock={}",
        match clock {
            Clock::Cpu => "cpu",
            Clock::Wall => "wall",
        }
    );
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
    let bulk = clock.best_gbps(BATCH, GROUP, || aes.encrypt_blocks(black_box(&mut blocks)));
    println!("aes-bulk gbps={bulk:.3}");

    for backend in Backend::ALL {
        let Some(e) = XtsEngine::with_backend(&key, backend) else {
            println!("xts backend={} unavailable", backend.name());
            continue;
        };
        for sector in [4096usize, 512] {
            let rate = clock.best_gbps(BATCH, GROUP, || {
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
        // One call is milliseconds of rounds: a clock read per call.
        let rate = clock.best_gbps(1, 1, || {
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
        let origin = Instant::now();
        for _ in 0..3 {
            let start = clock.now(origin);
            hash.pbkdf2(b"passphrase", b"salt-salt-salt-salt", iters, &mut out);
            let took = clock.now(origin).saturating_sub(start);
            best = best.max(f64::from(iters) / took.as_secs_f64());
        }
        black_box(out);
        println!("pbkdf2 hash={name} iters_per_s={best:.0}");
    }
}
