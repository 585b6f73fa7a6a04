//! Shared fixtures for the criterion benchmarks in `benches/`.
//!
//! Every benchmark group measures qimg beside a baseline in the same run
//! (a plain copy, the raw AES bulk rate, ...) so results read as ratios.

/// Deterministic pseudo-random bytes (xorshift64*), so every run measures
/// the same input.
pub fn fixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        for b in v.to_le_bytes() {
            if out.len() < len {
                out.push(b);
            }
        }
    }
    out
}

/// The words of [`word_text`].
const WORDS: &[&str] = &[
    "the",
    "image",
    "cluster",
    "qcow2",
    "refcount",
    "table",
    "backing",
    "file",
    "guest",
    "offset",
    "header",
    "snapshot",
    "encrypted",
    "volume",
    "sector",
    "block",
    "data",
    "zero",
    "write",
    "read",
    "and",
    "of",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "on",
    "with",
];

/// Text like the text stripes `cargo xtask bench-compare` writes:
/// deterministic pseudo-random words from a small list, lines of about 72
/// columns, `len` bytes.
pub fn word_text(len: usize) -> Vec<u8> {
    let seeds = fixed_bytes(len, 0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 16);
    let mut col = 0;
    let mut k = 0;
    while out.len() < len {
        let w = WORDS[usize::from(seeds[k % seeds.len()]) % WORDS.len()];
        k += 1;
        out.extend_from_slice(w.as_bytes());
        col += w.len() + 1;
        if col > 72 {
            out.push(b'\n');
            col = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): rates per second
/// of it hold on a machine busy with other work.
pub fn thread_cpu_time() -> std::time::Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(std::time::Duration::ZERO, Into::into)
}

/// The best rate, in MiB per second of this thread's CPU time, over
/// `rounds` rounds of at least `round` each; `pass` does one pass of the
/// work and returns the bytes it processed.
pub fn best_mib_s(
    rounds: usize,
    round: std::time::Duration,
    mut pass: impl FnMut() -> usize,
) -> f64 {
    let mut best = 0f64;
    for _ in 0..rounds {
        let start = thread_cpu_time();
        let mut bytes = 0usize;
        while thread_cpu_time() - start < round {
            bytes += pass();
        }
        let took = (thread_cpu_time() - start).as_secs_f64();
        best = best.max(bytes as f64 / (1 << 20) as f64 / took);
    }
    best
}

/// Deflates `data` into `out` as QEMU's qcow2 driver does (zlib's default
/// level, raw deflate with a 4 KiB window), through zlib-rs: the stream's
/// length, or `None` when it does not fit in `out`.
pub fn qemu_deflate(data: &[u8], out: &mut [u8]) -> Option<usize> {
    let config = zlib_rs::DeflateConfig {
        // Z_DEFAULT_COMPRESSION, as QEMU asks for.
        level: -1,
        method: zlib_rs::Method::Deflated,
        window_bits: -12,
        mem_level: 9,
        strategy: zlib_rs::Strategy::Default,
    };
    let (s, rc) = zlib_rs::compress_slice(out, data, config);
    (rc == zlib_rs::ReturnCode::Ok).then_some(s.len())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fixed_bytes_is_deterministic_and_sized() {
        assert_eq!(super::fixed_bytes(13, 7), super::fixed_bytes(13, 7));
        assert_ne!(super::fixed_bytes(64, 7), super::fixed_bytes(64, 8));
        assert_eq!(super::fixed_bytes(13, 7).len(), 13);
    }

    #[test]
    fn word_text_is_deterministic_sized_lines_of_words() {
        let t = super::word_text(4096);
        assert_eq!(t, super::word_text(4096));
        assert_eq!(t.len(), 4096);
        assert!(t.split(|&b| b == b'\n').all(|l| l.len() <= 90));
        assert!(t
            .split(|&b| b == b' ' || b == b'\n')
            .all(|w| w.is_empty() || super::WORDS.iter().any(|x| x.as_bytes().starts_with(w))));
    }
}
