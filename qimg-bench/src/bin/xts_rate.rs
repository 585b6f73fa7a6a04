//! `xts-rate`: machine-readable throughput figures for `cargo xtask
//! bench-compare`, all measured in this one process: the raw `aes` bulk
//! ECB rate (the AES core's limit), every available XTS engine backend at
//! 4 KiB and 512-byte sectors in 64 KiB batches, and PBKDF2 iterations per
//! second. Each figure is the best of several timed rounds, the rounds
//! interleaved across the figures (see [`best_interleaved`]).
//!
//! It also times [`Backend::round_probe`] for each hardware backend: the
//! most AES rounds per second the core retires at that register width,
//! turned into the AES-256 rate no code using those registers can pass.
//!
//! And it times [`Backend::datapath_probe`]: each streaming kernel's loads,
//! whitening, rounds and stores without its tweak arithmetic, so the gap
//! to the engine's rate is what the tweaks cost.
//!
//! Output lines: `aes-bulk gbps=..`, `xts backend=.. sector=.. gbps=..`,
//! `ceiling backend=.. gbps=..`, `datapath backend=.. gbps=..`,
//! `pbkdf2 hash=.. iters_per_s=..`, after a first line `clock=cpu` or
//! `clock=wall` and a second `best backend=..` (the backend the engine
//! picks on this CPU, [`Backend::best`]).
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

    /// One timed round of `f` (which processes `bytes` bytes per call,
    /// `group` calls between clock reads): its rate in GB/s of this clock.
    fn round_gbps(self, origin: Instant, bytes: f64, group: u64, f: &mut dyn FnMut()) -> f64 {
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
        (n as f64 * bytes) / took.as_secs_f64() / 1e9
    }
}

/// One figure: a label, the bytes one call processes, calls per clock
/// read, and the call.
struct Figure<'a> {
    /// The output line's text before ` gbps=`.
    label: String,
    /// Bytes one call processes (for the ceiling, the AES-256 bytes its
    /// block-rounds are worth).
    bytes: f64,
    /// Calls between two clock reads.
    group: u64,
    /// The work timed.
    call: Box<dyn FnMut() + 'a>,
}

/// The best rate of each figure over [`ROUNDS`] rounds, the rounds
/// interleaved across the figures (round 1 of every figure, then round 2,
/// ...): a slow spell of the host (a neighbour on the same core, a clock
/// ramp at start) then costs one round of several figures instead of
/// every round of one, and the best round still shows each figure's rate.
fn best_interleaved(clock: Clock, figures: &mut [Figure<'_>]) -> Vec<f64> {
    let origin = Instant::now();
    let mut best = vec![0f64; figures.len()];
    for _ in 0..ROUNDS {
        for (f, b) in figures.iter_mut().zip(best.iter_mut()) {
            *b = b.max(clock.round_gbps(origin, f.bytes, f.group, &mut f.call));
        }
    }
    best
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
    println!("best backend={}", Backend::best().name());
    let key = qimg_bench::fixed_bytes(64, 42);
    let buf = qimg_bench::fixed_bytes(BATCH, 7);

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
    let mut figures = vec![Figure {
        label: "aes-bulk".into(),
        bytes: BATCH as f64,
        group: GROUP,
        call: Box::new(|| aes.encrypt_blocks(black_box(&mut blocks))),
    }];
    let mut unavailable = Vec::new();
    for backend in Backend::ALL {
        if !backend.is_available() {
            unavailable.push(backend);
            continue;
        }
        for sector in [4096usize, 512] {
            // Each figure has its own engine and buffer.
            let Some(e) = XtsEngine::with_backend(&key, backend) else {
                continue;
            };
            let mut buf = qimg_bench::fixed_bytes(BATCH, 7);
            figures.push(Figure {
                label: format!("xts backend={} sector={sector}", backend.name()),
                bytes: BATCH as f64,
                group: GROUP,
                call: Box::new(move || {
                    if e.encrypt_sectors(black_box(&mut buf), sector, 1000)
                        .is_err()
                    {
                        std::process::exit(1);
                    }
                }),
            });
        }
    }
    // AES-256 is 14 rounds a block (the first key addition is a plain
    // XOR, which other ports take). One probe call is milliseconds of
    // rounds: a clock read per call, and `bytes` is the AES-256 bytes
    // one call's block-rounds are worth.
    let iters = 1 << 20;
    for backend in Backend::ALL {
        let Some(p) = backend.round_probe(1) else {
            continue;
        };
        let block_rounds = p.block_rounds.saturating_mul(iters);
        let bytes = block_rounds as f64 * 16.0 / 14.0;
        figures.push(Figure {
            label: format!("ceiling backend={}", backend.name()),
            bytes,
            group: 1,
            call: Box::new(move || {
                if let Some(p) = backend.round_probe(black_box(iters)) {
                    black_box(p.fold);
                }
            }),
        });
    }
    // The kernels' data path alone (`Backend::datapath_probe`): loads,
    // whitening, rounds and stores in the kernels' shapes, no tweak
    // arithmetic.
    for backend in Backend::ALL {
        let mut buf = qimg_bench::fixed_bytes(BATCH, 7);
        if !backend.datapath_probe(&mut buf) {
            continue;
        }
        figures.push(Figure {
            label: format!("datapath backend={}", backend.name()),
            bytes: BATCH as f64,
            group: GROUP,
            call: Box::new(move || {
                black_box(backend.datapath_probe(black_box(&mut buf)));
            }),
        });
    }
    let best = best_interleaved(clock, &mut figures);
    for (f, gbps) in figures.iter().zip(&best) {
        println!("{} gbps={gbps:.3}", f.label);
    }
    for backend in unavailable {
        println!("xts backend={} unavailable", backend.name());
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
