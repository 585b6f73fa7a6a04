//! AES-XTS sector engine at AES-hardware speed.
//!
//! [`XtsEngine`] encrypts and decrypts whole batches of sectors in place
//! with XTS-AES (IEEE 1619 without ciphertext stealing: every LUKS sector is
//! a multiple of 16 bytes). Sector `i` of a call uses the tweak
//! `AES_k2(le128(iv))` with `iv = first_sector + i * iv_step` (mod 2^64):
//! the dm-crypt `plain64` IV convention, which is also how IEEE 1619 turns
//! a data unit sequence number into a tweak.
//!
//! Four backends exist, chosen once when the engine is built:
//!
//! * [`Backend::Portable`]: the `aes` crate's bulk block API (itself
//!   runtime-dispatched), with the tweaks computed in plain Rust. No
//!   `unsafe`; the only backend off x86-64.
//! * [`Backend::AesNi`]: AES-NI + PCLMULQDQ, 8 blocks in flight.
//! * [`Backend::Vaes256`]: AVX2 + VAES + VPCLMULQDQ, 2 blocks per `ymm`,
//!   16 blocks in flight.
//! * [`Backend::Vaes512`]: AVX-512F + VAES + VPCLMULQDQ, 4 blocks per
//!   `zmm`, 32 blocks in flight.
//!
//! The hardware backends are compiled only for x86-64 targets whose
//! baseline includes SSE2 (every hosted x86-64 target). Soft-float
//! bare-metal targets such as `x86_64-unknown-none` disable SSE in the
//! target spec (the kernel there may not save vector state), and LLVM
//! cannot lower the 128-bit vector types for them; those builds get
//! [`Backend::Portable`] only, and [`Backend::is_available`] says so.
//!
//! The hardware kernels are fused: tweaks are generated beside the rounds
//! (in vector registers a multiply by `x^k` in GF(2^128) is a byte or bit
//! shift plus the overflow times `0x87`, carry-less: one `pclmulqdq`, or
//! shifts and XORs where the wide multiply is slow; the AES-NI stream
//! steps them by `x` in general-purpose registers instead, leaving the
//! vector ports to `aesenc`), XORed in, and the tweak is folded into the
//! last round key.
//!
//! # Why this module may contain `unsafe`
//!
//! It is the one vetted place in the workspace allowed to (see
//! ARCHITECTURE.md and `cargo xtask unsafe-audit`): calling
//! `#[target_feature]` functions and unaligned SIMD loads and stores needs
//! `unsafe`. All of it lives in `x86.rs`; the portable path forbids it.

// The workspace denies `unsafe_code`; this module is the vetted exception
// because `core::arch` intrinsics and `#[target_feature]` calls need it.
// Every `unsafe` block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use core::fmt;

use zeroize::ZeroizeOnDrop;

mod portable;
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod x86;

#[cfg(test)]
mod tests;

/// Which implementation an [`XtsEngine`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The `aes` crate's bulk API plus portable tweak arithmetic; no
    /// `unsafe`, available everywhere.
    Portable,
    /// AES-NI and PCLMULQDQ on 128-bit registers (x86-64 only).
    AesNi,
    /// AVX2, VAES and VPCLMULQDQ on 256-bit registers (x86-64 only).
    Vaes256,
    /// AVX-512F, VAES and VPCLMULQDQ on 512-bit registers (x86-64 only).
    Vaes512,
}

impl Backend {
    /// Every backend, fastest first.
    pub const ALL: [Backend; 4] = [
        Backend::Vaes512,
        Backend::Vaes256,
        Backend::AesNi,
        Backend::Portable,
    ];

    /// Whether this CPU can run the backend (checked at run time).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
            other => x86::available(other),
            #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
            _ => false,
        }
    }

    /// The fastest backend this CPU supports.
    pub fn best() -> Backend {
        Self::ALL
            .into_iter()
            .find(|b| b.is_available())
            .unwrap_or(Backend::Portable)
    }

    /// AES blocks one register of this backend holds.
    pub fn lanes(self) -> u64 {
        match self {
            Backend::Portable | Backend::AesNi => 1,
            Backend::Vaes256 => 2,
            Backend::Vaes512 => 4,
        }
    }

    /// A benchmark aid: runs `iters` AES rounds on each of several
    /// independent register chains of this backend's width (no memory, no
    /// tweaks), so that timing it gives the core's ceiling for the width:
    /// the most block-rounds per second any AES code using these registers
    /// can retire. Returns the block-rounds done and a value that depends
    /// on every result (for `black_box`); `None` for [`Backend::Portable`]
    /// or a backend this CPU lacks.
    pub fn round_probe(self, iters: u64) -> Option<RoundProbe> {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
        {
            let fold = x86::round_probe(self, iters)?;
            Some(RoundProbe {
                block_rounds: iters
                    .saturating_mul(x86::PROBE_CHAINS as u64)
                    .saturating_mul(self.lanes()),
                fold,
            })
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
        {
            let _ = iters;
            None
        }
    }

    /// A benchmark aid: this backend's streaming kernel with the tweak
    /// arithmetic taken out. Block `i` of `buf` (whose length must be a
    /// non-zero multiple of 512) becomes 14 `aesenc` rounds of `block ^ tweak ^
    /// key 0` under fixed round keys `1..=14`, the last XORed with the
    /// tweak; the tweaks are 32 fixed values read from memory (block `i`
    /// takes tweak `i % 32`). The loads, whitening, rounds, last-round XOR,
    /// stores and group shape are the kernel's, so timing it beside the
    /// engine shows what the tweak arithmetic costs. A reference, not a
    /// hard bound: the compiler schedules the probe and the kernel apart
    /// (on AMD Zen 4 the AES-NI kernel outruns its probe). The output is
    /// not XTS (its reference is in this module's tests). Returns `false`,
    /// leaving `buf` as it was, for [`Backend::Portable`], a backend this
    /// CPU lacks, or a length that is not a non-zero multiple of 512.
    ///
    /// ```
    /// use luks_core::simd::Backend;
    ///
    /// let mut buf = vec![0u8; 1024];
    /// // The portable backend has no streaming kernel to time.
    /// assert!(!Backend::Portable.datapath_probe(&mut buf));
    /// assert!(buf.iter().all(|&b| b == 0));
    /// if Backend::Vaes512.datapath_probe(&mut buf) {
    ///     assert!(buf.iter().any(|&b| b != 0));
    /// }
    /// ```
    pub fn datapath_probe(self, buf: &mut [u8]) -> bool {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
        {
            x86::datapath_probe(self, buf)
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
        {
            let _ = buf;
            false
        }
    }

    /// A short lower-case name, e.g. for benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::AesNi => "aesni",
            Backend::Vaes256 => "vaes256",
            Backend::Vaes512 => "vaes512",
        }
    }
}

/// What [`Backend::round_probe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundProbe {
    /// AES block-rounds retired (rounds x blocks per register x chains).
    pub block_rounds: u64,
    /// A value depending on every result, so the work cannot be dropped.
    pub fold: u64,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`XtsEngine`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum XtsError {
    /// The XTS key is not 32 (AES-128) or 64 (AES-256) bytes.
    KeyLength(usize),
    /// The sector size is zero or not a multiple of 16 bytes.
    SectorSize(usize),
    /// The buffer is not a whole number of sectors.
    DataLength {
        /// Buffer length in bytes.
        len: usize,
        /// Sector size in bytes.
        sector_size: usize,
    },
}

impl fmt::Display for XtsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KeyLength(n) => write!(
                f,
                "XTS key is {n} bytes; expected 32 (AES-128) or 64 (AES-256)"
            ),
            Self::SectorSize(n) => write!(
                f,
                "XTS sector size {n} is not a non-zero multiple of 16 bytes"
            ),
            Self::DataLength { len, sector_size } => write!(
                f,
                "buffer of {len} bytes is not a whole number of {sector_size}-byte sectors"
            ),
        }
    }
}

impl core::error::Error for XtsError {}

/// AES key size of one XTS half key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeySize {
    Aes128,
    Aes256,
}

impl KeySize {
    fn from_xts_key_len(len: usize) -> Result<Self, XtsError> {
        match len {
            32 => Ok(KeySize::Aes128),
            64 => Ok(KeySize::Aes256),
            n => Err(XtsError::KeyLength(n)),
        }
    }
}

// Inline, not boxed: no allocator in `no_std` builds.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Portable(portable::PortableXts),
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    Hw(x86::HwXts),
}

/// An XTS-AES sector engine (AES-128 or AES-256).
///
/// The key schedule is wiped on drop. Not `Clone` (one copy of the key
/// schedule); `Debug` prints no key material.
pub struct XtsEngine {
    inner: Inner,
    backend: Backend,
}

// Both key holders zeroize themselves on drop.
impl ZeroizeOnDrop for XtsEngine {}

impl fmt::Debug for XtsEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsEngine { .. }")
    }
}

impl XtsEngine {
    /// Builds an engine from an XTS key (`key1 || key2`, 32 or 64 bytes)
    /// on the fastest backend this CPU supports ([`Backend::best`]).
    pub fn new(key: &[u8]) -> Result<Self, XtsError> {
        let size = KeySize::from_xts_key_len(key.len())?;
        Self::build(key, size, Backend::best()).ok_or(XtsError::KeyLength(key.len()))
    }

    /// Builds an engine on a chosen backend. `None` when the key is not 32
    /// or 64 bytes or the CPU lacks the backend's features.
    pub fn with_backend(key: &[u8], backend: Backend) -> Option<Self> {
        let size = KeySize::from_xts_key_len(key.len()).ok()?;
        Self::build(key, size, backend)
    }

    fn build(key: &[u8], size: KeySize, backend: Backend) -> Option<Self> {
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        let inner = match backend {
            Backend::Portable => Inner::Portable(portable::PortableXts::new(k1, k2, size)?),
            #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
            other => Inner::Hw(x86::HwXts::new(k1, k2, size, other)?),
            #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
            _ => return None,
        };
        Some(Self { inner, backend })
    }

    /// The backend this engine runs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Encrypts `data` in place: consecutive sectors of `sector_size` bytes,
    /// sector `i` with IV `first_sector + i` (dm-crypt `plain64`).
    pub fn encrypt_sectors(
        &self,
        data: &mut [u8],
        sector_size: usize,
        first_sector: u64,
    ) -> Result<(), XtsError> {
        self.encrypt_sectors_with_step(data, sector_size, first_sector, 1)
    }

    /// Decrypts `data` in place; the inverse of [`Self::encrypt_sectors`].
    pub fn decrypt_sectors(
        &self,
        data: &mut [u8],
        sector_size: usize,
        first_sector: u64,
    ) -> Result<(), XtsError> {
        self.decrypt_sectors_with_step(data, sector_size, first_sector, 1)
    }

    /// Encrypts `data` in place, sector `i` with IV
    /// `first_iv + i * iv_step` (wrapping mod 2^64).
    ///
    /// LUKS2 with 4096-byte sectors and without the `iv_large_sectors` flag
    /// counts IVs in 512-byte units: pass `first_iv = byte_offset / 512`
    /// and `iv_step = 8`. With `iv_large_sectors`, use `iv_step = 1`.
    pub fn encrypt_sectors_with_step(
        &self,
        data: &mut [u8],
        sector_size: usize,
        first_iv: u64,
        iv_step: u64,
    ) -> Result<(), XtsError> {
        check(data.len(), sector_size)?;
        self.run(true, data, sector_size, first_iv, iv_step);
        Ok(())
    }

    /// Decrypts `data` in place; the inverse of
    /// [`Self::encrypt_sectors_with_step`].
    pub fn decrypt_sectors_with_step(
        &self,
        data: &mut [u8],
        sector_size: usize,
        first_iv: u64,
        iv_step: u64,
    ) -> Result<(), XtsError> {
        check(data.len(), sector_size)?;
        self.run(false, data, sector_size, first_iv, iv_step);
        Ok(())
    }

    fn run(&self, encrypt: bool, data: &mut [u8], sector_size: usize, iv: u64, step: u64) {
        match &self.inner {
            Inner::Portable(p) => p.run(encrypt, data, sector_size, iv, step),
            #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
            Inner::Hw(h) => h.run(encrypt, data, sector_size, iv, step),
        }
    }
}

fn check(len: usize, sector_size: usize) -> Result<(), XtsError> {
    if sector_size == 0 || !sector_size.is_multiple_of(16) {
        return Err(XtsError::SectorSize(sector_size));
    }
    if !len.is_multiple_of(sector_size) {
        return Err(XtsError::DataLength { len, sector_size });
    }
    Ok(())
}
