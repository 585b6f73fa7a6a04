//! Key derivation of new LUKS2 key slots (PBKDF2, Argon2i, Argon2id with
//! a fresh salt) and the calibration of Argon2 costs against cryptsetup's
//! time.

extern crate alloc;

use alloc::vec;

use rand_core::TryCryptoRng;

use super::super::meta::{Blob, Kdf};
use super::super::Argon2Block;
use super::{corrupt, KdfParams, SALT_LEN};
use crate::error::{BadParameter, Error, Luks2Problem};
use crate::luks1::rng_fill;

/// Derives a key slot key with `kdf` (fresh salt) and returns the slot's
/// KDF record.
pub(super) fn derive_new<E, R: TryCryptoRng + ?Sized>(
    kdf: KdfParams,
    passphrase: &[u8],
    out: &mut [u8],
    rng: &mut R,
) -> Result<Kdf, Error<E>> {
    let mut salt = [0u8; SALT_LEN];
    rng_fill(rng, &mut salt)?;
    let blob = Blob::from_bytes(&salt).ok_or(Error::Rng)?;
    match kdf {
        KdfParams::Pbkdf2 { hash, iterations } => {
            if iterations == 0 {
                return Err(Error::BadParameter(BadParameter::ZeroIterations));
            }
            hash.pbkdf2(passphrase, &salt, iterations, out);
            Ok(Kdf::Pbkdf2 {
                hash,
                iterations,
                salt: blob,
            })
        }
        KdfParams::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
        } => {
            let params = argon2::Params::new(memory_kib, time, cpus, Some(out.len()))
                .map_err(|_| corrupt(Luks2Problem::BadValue("kdf")))?;
            let mut mem = vec![Argon2Block::new(); params.block_count()];
            let alg = if id {
                argon2::Algorithm::Argon2id
            } else {
                argon2::Algorithm::Argon2i
            };
            let r = argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password_into_with_memory(passphrase, &salt, out, &mut mem[..]);
            for b in &mut mem {
                zeroize::Zeroize::zeroize(b);
            }
            r.map_err(|_| corrupt(Luks2Problem::BadValue("kdf")))?;
            Ok(Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                salt: blob,
            })
        }
    }
}

/// How much longer cryptsetup's Argon2 (libargon2) takes than qimg's for
/// the same cost, in percent: calibration counts cryptsetup's time, the
/// time `iter-time` is meant for (the volume is opened by cryptsetup), so
/// each run qimg times is scaled by this.
///
/// Measured on the 2-core development machine (x86-64, AVX-512; argon2
/// 0.6 with its AVX2 compression and lanes on threads; Debian's
/// libargon2 1 under cryptsetup 2.6.1), December 2026: unlocking one
/// cryptsetup-made volume (argon2id, t=4, m=512 MiB, p=2), CPU time
/// (user + sys) qimg 2.15 s / 2.02 s, `cryptsetup open --test-passphrase`
/// 2.54 s / 2.39 s: 1.18x. `cargo xtask kdf-compare` prints the ratio
/// measured on the machine it runs on (`speed cs/q`).
pub const CRYPTSETUP_ARGON2_TIME_PERCENT: u64 = 118;

/// Milliseconds cryptsetup would take for what took qimg `ms`.
fn as_cryptsetup_ms(ms: u64) -> u64 {
    ms.saturating_mul(CRYPTSETUP_ARGON2_TIME_PERCENT) / 100
}

/// Argon2 passes that take cryptsetup about `target_ms` with `memory_kib`
/// and `cpus` (at least 4, cryptsetup's minimum): times one pass with
/// `elapsed_ms`, a clock the caller provides (milliseconds since any fixed
/// point), scaled by [`CRYPTSETUP_ARGON2_TIME_PERCENT`].
pub fn calibrate_argon2<E>(
    id: bool,
    memory_kib: u32,
    cpus: u32,
    target_ms: u32,
    mut elapsed_ms: impl FnMut() -> u64,
) -> Result<u32, Error<E>> {
    /// cryptsetup's minimum Argon2 time cost.
    const MIN: u32 = 4;
    let mut out = [0u8; 32];
    let t0 = elapsed_ms();
    derive_new::<E, _>(
        KdfParams::Argon2 {
            id,
            time: 1,
            memory_kib,
            cpus,
        },
        b"calibration",
        &mut out,
        &mut FixedRng,
    )?;
    let per_pass = as_cryptsetup_ms(elapsed_ms().saturating_sub(t0)).max(1);
    Ok(
        u32::try_from(u64::from(target_ms).checked_div(per_pass).unwrap_or(0))
            .unwrap_or(u32::MAX)
            .max(MIN),
    )
}

/// Argon2 cost `(time, memory_kib)` that takes about `target_ms` with
/// `cpus` lanes and at most `max_memory_kib`, chosen the way cryptsetup
/// 2.6.1 chooses it (`crypt_argon2_check`): start at time 4 and 32 KiB,
/// grow memory (then time) until the fastest of up to three runs takes at least
/// 250 ms, then scale toward the target, memory first when growing and
/// time first when shrinking, never below time 4 (memory is reduced
/// instead), re-measuring until a run lands within 95-110 % of the target
/// (at most 8 rounds). Times are cryptsetup's: each run's is scaled by
/// [`CRYPTSETUP_ARGON2_TIME_PERCENT`]. `elapsed_ms` is a clock the caller provides;
/// cryptsetup reads wall time (`CLOCK_MONOTONIC_RAW`) here, since the
/// lanes run on threads.
///
/// With the `std` feature the lanes run in parallel (argon2's `parallel`
/// feature), as libargon2 runs them for cryptsetup; single-threaded, two
/// lanes took twice cryptsetup's time per pass on the development machine
/// (2 cores) and calibration chose half its memory.
pub fn calibrate_argon2_params<E>(
    id: bool,
    max_memory_kib: u32,
    cpus: u32,
    target_ms: u32,
    mut elapsed_ms: impl FnMut() -> u64,
) -> Result<(u32, u32), Error<E>> {
    /// cryptsetup's minimum Argon2 time cost.
    const MIN_T: u32 = 4;
    /// First-phase goal: a run long enough to scale from.
    const BENCH_MIN_MS: u64 = 250;
    /// Rounds of the second phase before settling for the last estimate.
    const ROUNDS: u32 = 8;
    let cpus = cpus.max(1);
    let min_m = 32u32.max(cpus.saturating_mul(8));
    let max_m = max_memory_kib.max(min_m);
    let target = u64::from(target_ms.max(1));
    let mut measure = |t: u32, m: u32| -> Result<u64, Error<E>> {
        let mut out = [0u8; 32];
        let t0 = elapsed_ms();
        derive_new::<E, _>(
            KdfParams::Argon2 {
                id,
                time: t,
                memory_kib: m,
                cpus,
            },
            b"calibration",
            &mut out,
            &mut FixedRng,
        )?;
        Ok(as_cryptsetup_ms(elapsed_ms().saturating_sub(t0)))
    };
    /// cryptsetup's runs per first-phase measurement (the fastest counts).
    const FAST_SAMPLES: u32 = 3;
    let (mut t, mut m) = (MIN_T, min_m);
    let mut ms;
    loop {
        ms = measure(t, m)?;
        for _ in 1..FAST_SAMPLES {
            if ms >= BENCH_MIN_MS {
                break; // long enough already: cryptsetup stops sampling too
            }
            ms = ms.min(measure(t, m)?);
        }
        if ms >= BENCH_MIN_MS {
            break;
        }
        let f = u32::try_from(BENCH_MIN_MS.div_ceil(ms.max(1)).min(256)).unwrap_or(256);
        if m == max_m {
            if t >= 1 << 20 {
                break; // a clock that never moves: stop growing
            }
            t = t.saturating_mul(f);
        } else {
            m = m.saturating_mul(f).min(max_m);
        }
    }
    // Scaled costs in u128: (u32 * u32 * u32) / u64 cannot overflow it.
    let scale = |a: u32, b: u32, num: u64, den: u64| -> u32 {
        let v = u128::from(a)
            .saturating_mul(u128::from(b))
            .saturating_mul(u128::from(num))
            .checked_div(u128::from(den.max(1)))
            .unwrap_or(0);
        u32::try_from(v).unwrap_or(u32::MAX)
    };
    for _ in 0..ROUNDS {
        let ms1 = ms.max(1);
        let pinned;
        if ms1 > target {
            let nt = scale(t, 1, target, ms1);
            if nt < MIN_T {
                m = scale(t, m, target, u64::from(MIN_T).saturating_mul(ms1)).max(min_m);
                t = MIN_T;
                pinned = m == min_m;
            } else {
                t = nt;
                pinned = false;
            }
        } else {
            let nm = scale(m, 1, target, ms1);
            if nm > max_m {
                t = scale(t, m, target, u64::from(max_m).saturating_mul(ms1)).max(MIN_T);
                m = max_m;
                pinned = t == MIN_T;
            } else {
                m = nm.max(min_m);
                pinned = m == min_m;
            }
        }
        if pinned {
            break;
        }
        ms = measure(t, m)?;
        let pct = u128::from(ms)
            .saturating_mul(100)
            .checked_div(u128::from(target))
            .unwrap_or(0);
        if (95..=110).contains(&pct) {
            break;
        }
    }
    Ok((t, m))
}

/// A constant salt source for calibration only (the result is discarded).
struct FixedRng;

impl rand_core::TryRng for FixedRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(0x5a5a_5a5a)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(0x5a5a_5a5a_5a5a_5a5a)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.fill(0x5a);
        Ok(())
    }
}

impl TryCryptoRng for FixedRng {}
