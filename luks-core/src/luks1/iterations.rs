//! PBKDF2 iteration counts: the ceiling qimg runs for a key slot or
//! digest, and calibration of an `iter-time` against the PBKDF2 of the
//! program expected to unlock the volume.

use crate::error::{Error, Structure};
use crate::hash::HashAlg;

/// The most PBKDF2 iterations qimg runs for a key slot or digest: 2^30,
/// about 4 minutes of SHA-256 here, and over 20 times what cryptsetup picks
/// at a 10-second `iter-time` with a 32-byte SHA-1 derivation (its fastest
/// case). Headers asking for more (2^32-1 takes hours) are refused.
pub const MAX_PBKDF2_ITERATIONS: u32 = 1 << 30;

/// Refuses PBKDF2 `iterations` above [`MAX_PBKDF2_ITERATIONS`], naming
/// `structure` and the field's `offset`.
pub(crate) fn check_iterations<E>(
    structure: Structure,
    offset: u64,
    what: &'static str,
    iterations: u32,
) -> Result<(), Error<E>> {
    if iterations > MAX_PBKDF2_ITERATIONS {
        return Err(Error::corrupt(
            structure,
            offset,
            crate::error::Problem::KdfCost {
                what,
                value: u64::from(iterations),
                ceiling: u64::from(MAX_PBKDF2_ITERATIONS),
            },
        ));
    }
    Ok(())
}

/// Milliseconds of PBKDF2 that cryptsetup (LUKS1 and LUKS2) and QEMU give
/// the volume-key digest, whatever the key slots' `iter-time`: both scale
/// their iterations-per-second benchmark by 1/8 of a second.
pub const DIGEST_MS: u32 = 125;

/// Whose PBKDF2 an `iter-time` is measured on: the program expected to
/// unlock the volume. qimg's own PBKDF2 (RustCrypto) is faster than both,
/// so counting iterations by its own speed would make the volume slower to
/// open than asked wherever it is opened for real (an initramfs's
/// cryptsetup, a QEMU guest's disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pbkdf2Reader {
    /// cryptsetup 2.6 (raw LUKS1 and LUKS2 volumes), whose PBKDF2 is
    /// OpenSSL 3's `PKCS5_PBKDF2_HMAC`.
    Cryptsetup,
    /// QEMU (the LUKS header inside an encrypted qcow2 image), whose
    /// PBKDF2 is nettle's.
    Qemu,
}

impl Pbkdf2Reader {
    /// How many times faster qimg's PBKDF2 runs than the reader's with
    /// `hash`, in percent (qimg iterations per reader iteration, times 100).
    ///
    /// Measured, not derived: thread CPU time of a derivation of one full
    /// set of blocks at a 64-byte output, against `cryptsetup benchmark
    /// --pbkdf pbkdf2 --hash H --key-size 512` (cryptsetup 2.6.1, OpenSSL
    /// 3 libcrypto, which times with `getrusage`) and against the
    /// iterations `qemu-img create -o encrypt.iter-time=1000,encrypt.hash-alg=H`
    /// (10.0.2, nettle) wrote, on the 2-core development machine (x86-64
    /// with SHA-NI, AVX-512 and VAES), December 2026. Iterations per CPU
    /// second at a 64-byte output, qimg / cryptsetup / qemu-img:
    ///
    /// | hash      | qimg      | cryptsetup        | qemu-img          |
    /// |-----------|-----------|-------------------|-------------------|
    /// | sha1      | 2,424,453 | 912,598-1,114,320 | 2,266,802         |
    /// | sha224    | 2,922,860 | 1,161,213         | 2,901,620         |
    /// | sha256    | 5,242,880 | 1,859,177-2,016,492 | 3,896,313-4,334,391 |
    /// | sha384    | 1,023,001 | 859,488           | 975,481           |
    /// | sha512    | 2,184,533 | 1,688,528-1,771,243 | 1,662,683       |
    /// | ripemd160 |   606,113 | 416,763           | 517,661           |
    /// | whirlpool |   537,731 | 650,481           | (no whirlpool)    |
    ///
    /// The hashes of one family share a factor (SHA-224 and SHA-256 run
    /// the same compression function, as do SHA-384 and SHA-512). OpenSSL's
    /// cost is not a fixed number of extra compressions: its per-HMAC
    /// overhead (a provider context duplicated for the inner and the outer
    /// hash of every iteration, dispatch through EVP) weighs 1.6x a
    /// SHA-NI SHA-256 HMAC but only a quarter of a SHA-512 one, and its
    /// Whirlpool is faster than RustCrypto's. A machine without SHA-NI
    /// will differ; `cargo xtask kdf-compare` prints the measured ratio
    /// beside these so a drift shows.
    pub fn speed_ratio_percent(self, hash: HashAlg) -> u32 {
        match (self, hash) {
            (Self::Cryptsetup, HashAlg::Sha1) => 230,
            (Self::Cryptsetup, HashAlg::Sha224 | HashAlg::Sha256) => 260,
            (Self::Cryptsetup, HashAlg::Sha384 | HashAlg::Sha512) => 122,
            (Self::Cryptsetup, HashAlg::Ripemd160) => 145,
            (Self::Cryptsetup, HashAlg::Whirlpool | HashAlg::Wp384 | HashAlg::Wp256) => 83,
            (Self::Qemu, HashAlg::Sha1) => 107,
            (Self::Qemu, HashAlg::Sha224 | HashAlg::Sha256) => 125,
            (Self::Qemu, HashAlg::Sha384 | HashAlg::Sha512) => 118,
            (Self::Qemu, HashAlg::Ripemd160) => 117,
            // QEMU's nettle backend has no Whirlpool; nothing to model.
            (Self::Qemu, HashAlg::Whirlpool | HashAlg::Wp384 | HashAlg::Wp256) => 100,
        }
    }
}

/// A PBKDF2 speed: how many one-block derivations (an output no longer
/// than the hash's digest) the reader runs per CPU second with `hash`.
/// Each further output block costs a full run of the iterations, so a
/// 64-byte slot key with SHA-256 costs twice what a 32-byte one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pbkdf2Speed {
    /// The hash measured.
    pub hash: HashAlg,
    /// One-block iterations per second, in the reader's PBKDF2.
    pub per_second: u64,
}

/// cryptsetup's floor for PBKDF2 iterations (slots and digests).
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;

/// cryptsetup's and QEMU's PBKDF2 benchmark sample, in milliseconds of CPU:
/// [`Pbkdf2Speed::measure`] grows its sample until it takes longer.
const SAMPLE_MS: u64 = 500;

/// The shortest sample [`Pbkdf2Speed::measure_for`] takes, in milliseconds
/// of CPU: long enough that a 1 ms clock step moves the speed by 5%, half
/// a millisecond of a 10 ms derivation.
pub const MIN_SAMPLE_MS: u64 = 20;

impl Pbkdf2Speed {
    /// Benchmarks qimg's PBKDF2 with `hash` as cryptsetup does (8-byte
    /// password, 32-byte salt, a sample starting at 2^15 iterations and
    /// grown until it takes over 500 ms; at most 10 steps), then scales the
    /// speed to `reader`'s ([`Pbkdf2Reader::speed_ratio_percent`]).
    /// [`Pbkdf2Speed::measure_for`] sizes the sample to the derivations it
    /// is for instead.
    ///
    /// `elapsed_ms` is a clock the caller provides (milliseconds since any
    /// fixed point). cryptsetup and QEMU both read the CPU time used
    /// (`getrusage`), so a loaded machine does not shrink the count; a CPU
    /// time clock here does the same. A clock that never advances stops
    /// the sample growing at 2^24 iterations.
    pub fn measure(hash: HashAlg, reader: Pbkdf2Reader, elapsed_ms: impl FnMut() -> u64) -> Self {
        Self::sample(hash, reader, SAMPLE_MS, elapsed_ms)
    }

    /// [`Pbkdf2Speed::measure`] with a sample sized for derivations of at
    /// most `longest_ms`: a quarter of it, at least [`MIN_SAMPLE_MS`] and at
    /// most cryptsetup's 500 ms.
    ///
    /// cryptsetup and QEMU sample for 500 ms (about a second of CPU with
    /// the growth steps) whatever the `iter-time`, so a volume asked to
    /// open in 10 ms costs a second to create. The sample only has to make
    /// the clock's 1 ms step small beside it: a sample a quarter as long as
    /// the derivation is within 1 ms in 4 ms, and at [`MIN_SAMPLE_MS`] the
    /// speed is within 5%, half a millisecond of a 10 ms derivation. From
    /// an `iter-time` of 2000 ms (both programs' default) up, the sample
    /// is cryptsetup's.
    ///
    /// ```
    /// use luks_core::hash::HashAlg;
    /// use luks_core::luks1::{Pbkdf2Reader, Pbkdf2Speed};
    /// // A clock that says every sample took 60 ms: one sample is enough
    /// // for a 10 ms iter-time.
    /// let mut t = 0;
    /// let mut calls = 0;
    /// let speed = Pbkdf2Speed::measure_for(HashAlg::Sha256, Pbkdf2Reader::Qemu, 10, || {
    ///     calls += 1;
    ///     t += 60;
    ///     t
    /// });
    /// assert_eq!(calls, 2, "one sample: a reading before and after");
    /// assert!(speed.per_second > 0);
    /// ```
    pub fn measure_for(
        hash: HashAlg,
        reader: Pbkdf2Reader,
        longest_ms: u32,
        elapsed_ms: impl FnMut() -> u64,
    ) -> Self {
        let ms = u64::from(longest_ms / 4).clamp(MIN_SAMPLE_MS, SAMPLE_MS);
        Self::sample(hash, reader, ms, elapsed_ms)
    }

    /// Grows a PBKDF2 sample from 2^15 iterations until it takes over
    /// `sample_ms` on `elapsed_ms`, then scales its speed to `reader`'s.
    fn sample(
        hash: HashAlg,
        reader: Pbkdf2Reader,
        sample_ms: u64,
        mut elapsed_ms: impl FnMut() -> u64,
    ) -> Self {
        /// cryptsetup's limit on how often the sample grows.
        const MAX_STEPS: u32 = 10;
        /// Stop growing the sample here even if the clock says it took no
        /// time (a broken clock must not make calibration run for hours);
        /// 2^24 SHA-256 iterations are over 1.5 s here.
        const MAX_SAMPLE_ITERS: u32 = 1 << 24;
        let mut buf = [0u8; crate::hash::MAX_DIGEST_LEN];
        let out = &mut buf[..hash.digest_len()];
        let mut iters: u32 = 1 << 15;
        let mut steps: u32 = 0;
        let (iters, ms) = loop {
            let t0 = elapsed_ms();
            hash.pbkdf2(b"foobarfo", b"0123456789abcdef0123456789abcdef", iters, out);
            let ms = elapsed_ms().saturating_sub(t0);
            steps = steps.saturating_add(1);
            if ms > sample_ms || steps >= MAX_STEPS || iters >= MAX_SAMPLE_ITERS {
                break (iters, ms);
            }
            iters = iters
                .saturating_mul(growth(sample_ms, ms))
                .min(MAX_SAMPLE_ITERS);
        };
        let sample = u64::from(iters).saturating_mul(1000);
        let ours = sample.checked_div(ms).unwrap_or(sample);
        let pct = u64::from(reader.speed_ratio_percent(hash));
        Self {
            hash,
            per_second: ours.saturating_mul(100).checked_div(pct).unwrap_or(ours),
        }
    }

    /// Iterations that take the reader about `ms` when deriving `out_len`
    /// bytes; at least [`MIN_PBKDF2_ITERATIONS`], at most
    /// [`MAX_PBKDF2_ITERATIONS`]. Output lengths above 256 bytes count as
    /// 256.
    pub fn iterations(&self, out_len: usize, ms: u32) -> u32 {
        let len = out_len.clamp(1, 256);
        let blocks = u64::try_from(len.div_ceil(self.hash.digest_len())).unwrap_or(256);
        let n = self
            .per_second
            .saturating_mul(u64::from(ms))
            .checked_div(blocks.saturating_mul(1000))
            .unwrap_or(0);
        u32::try_from(n)
            .unwrap_or(u32::MAX)
            .clamp(MIN_PBKDF2_ITERATIONS, MAX_PBKDF2_ITERATIONS)
    }
}

/// How many times longer the next PBKDF2 sample runs after one that took
/// `ms` fell short of `sample_ms`: aiming half past the sample length, so
/// that a reading a clock step long (the clock ticks in whole
/// milliseconds) or a core running faster the second time still makes the
/// next sample the last; 2x at least, 16x at most (a sample that took no
/// measurable time). Aiming a quarter past, the second sample of a 10 ms
/// iter-time (then a 50 ms sample) landed under 50 ms often enough that calibration took 80-98
/// ms of CPU on some runs and 177-199 ms on others.
pub(crate) fn growth(sample_ms: u64, ms: u64) -> u32 {
    let aim = sample_ms.saturating_add(sample_ms / 2);
    let grow = aim.div_ceil(ms.max(1)).clamp(2, 16);
    u32::try_from(grow).unwrap_or(16)
}

/// PBKDF2 iterations that take `reader` about `target_ms` with `hash`
/// when deriving `out_len` bytes: [`Pbkdf2Speed::measure_for`] then
/// [`Pbkdf2Speed::iterations`].
pub fn calibrate_iterations(
    hash: HashAlg,
    out_len: usize,
    target_ms: u32,
    reader: Pbkdf2Reader,
    elapsed_ms: impl FnMut() -> u64,
) -> u32 {
    Pbkdf2Speed::measure_for(hash, reader, target_ms, elapsed_ms).iterations(out_len, target_ms)
}
