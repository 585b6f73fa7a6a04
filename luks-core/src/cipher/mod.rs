//! Sector ciphers: a block cipher, a chaining mode and an IV generator,
//! named the way LUKS names them (`aes` + `xts-plain64`,
//! `cbc-essiv:sha256`, `lrw-plain64`, `ecb`).
//!
//! IVs are counted in 512-byte units whatever the sector size: sector `k`
//! of a call with `first_iv_sector = s` uses IV `s + k * (sector_size/512)`.

mod block;
mod twofish;
mod xts;

use core::fmt;

use zeroize::Zeroize;

use crate::error::{name_from, BadParameter, PureError, Unsupported};
use crate::hash::{HashAlg, MAX_DIGEST_LEN};
use block::{as_blk, xor_into, Blk, BlockAlg, BlockKind};
use xts::Xts;

/// The largest volume key any supported cipher spec takes (XTS with two
/// 256-bit keys); also bounds every key buffer in the crate.
pub const MAX_KEY_BYTES: usize = 64;

/// How the per-sector IV is formed from the sector number.
// Key schedules live inline: no allocator to box them.
#[allow(clippy::large_enum_variant)]
enum IvGen {
    /// Low 32 bits of the sector number, little-endian (`plain`).
    Plain,
    /// 64-bit sector number, little-endian (`plain64`).
    Plain64,
    /// 64-bit sector number, big-endian (`plain64be`).
    Plain64Be,
    /// ESSIV: the plain64 IV encrypted under a hash of the volume key.
    Essiv(BlockAlg),
    /// All-zero IV (`null`).
    Null,
}

impl IvGen {
    fn iv(&self, sector: u64) -> Blk {
        let mut b = [0u8; 16];
        match self {
            Self::Plain => b[..4].copy_from_slice(&sector.to_le_bytes()[..4]),
            Self::Plain64 => b[..8].copy_from_slice(&sector.to_le_bytes()),
            Self::Plain64Be => b[8..].copy_from_slice(&sector.to_be_bytes()),
            Self::Essiv(c) => {
                b[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt(&mut b);
            }
            Self::Null => {}
        }
        b
    }
}

#[allow(clippy::large_enum_variant)]
enum Mode {
    /// AES-XTS with plain64 IVs: the runtime-dispatched SIMD engine.
    XtsAes(crate::simd::XtsEngine),
    Xts(Xts, IvGen),
    Cbc(BlockAlg, IvGen),
    Ecb(BlockAlg),
    Lrw(BlockAlg, TweakKey, IvGen),
}

/// The error for a buffer that is not whole sectors.
fn unaligned(first_iv_sector: u64, len: usize) -> PureError {
    PureError::BadParameter(BadParameter::Unaligned {
        offset: first_iv_sector.saturating_mul(512),
        len: len as u64,
    })
}

/// The LRW multiplier key, wiped on drop.
struct TweakKey(u128);

impl Drop for TweakKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A keyed sector cipher.
///
/// Holds key schedules only; they are wiped on drop. Never `Clone`, and
/// `Debug` prints `SectorCipher { .. }`.
pub struct SectorCipher {
    mode: Mode,
    sector_size: u32,
    key_len: usize,
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SectorCipher { .. }")
    }
}

/// The chaining mode of a parsed spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    Xts,
    Cbc,
    Ecb,
    Lrw,
}

/// The IV part of a parsed spec, before a key is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IvKind {
    Plain,
    Plain64,
    Plain64Be,
    Essiv(HashAlg),
    Null,
}

/// A cipher spec checked for support, before a key is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    kind: BlockKind,
    chain: Chain,
    iv: IvKind,
}

impl CipherSpec {
    /// Parses a cipher name (`aes`) and a mode (`xts-plain64`,
    /// `cbc-essiv:sha256`, `ecb`).
    pub fn parse(cipher_name: &str, cipher_mode: &str) -> Result<Self, PureError> {
        let kind = BlockKind::from_name(cipher_name)?;
        let bad_mode =
            || PureError::Unsupported(Unsupported::CipherMode(name_from(cipher_mode.as_bytes())));
        let (chain, ivspec) = match cipher_mode.split_once('-') {
            Some((c, iv)) => (c, Some(iv)),
            None => (cipher_mode, None),
        };
        let chain = match chain {
            "xts" => Chain::Xts,
            "cbc" => Chain::Cbc,
            "ecb" => Chain::Ecb,
            "lrw" => Chain::Lrw,
            _ => return Err(bad_mode()),
        };
        let iv = match ivspec {
            None if chain == Chain::Ecb => IvKind::Null,
            None => return Err(bad_mode()),
            Some("plain") => IvKind::Plain,
            Some("plain64") => IvKind::Plain64,
            Some("plain64be") => IvKind::Plain64Be,
            Some("null") => IvKind::Null,
            Some(s) => match s.split_once(':') {
                Some(("essiv", h)) => IvKind::Essiv(HashAlg::from_name(h).map_err(|_| bad_mode())?),
                _ => return Err(bad_mode()),
            },
        };
        if chain == Chain::Ecb && iv != IvKind::Null {
            return Err(bad_mode());
        }
        Ok(Self { kind, chain, iv })
    }

    /// Whether a volume key of `key_len` bytes fits this spec.
    pub fn check_key_len(&self, key_len: usize) -> Result<(), PureError> {
        let zero = [0u8; MAX_KEY_BYTES];
        match zero.get(..key_len) {
            Some(k) => SectorCipher::from_spec(*self, k, 512).map(|_| ()),
            None => Err(PureError::Unsupported(Unsupported::KeyTooLarge(
                u32::try_from(key_len).unwrap_or(u32::MAX),
            ))),
        }
    }
}

impl SectorCipher {
    /// Builds a cipher from a LUKS cipher name, mode and key, for
    /// `sector_size`-byte sectors (a power of two in 512..=4096).
    pub fn new(
        cipher_name: &str,
        cipher_mode: &str,
        key: &[u8],
        sector_size: u32,
    ) -> Result<Self, PureError> {
        Self::from_spec(
            CipherSpec::parse(cipher_name, cipher_mode)?,
            key,
            sector_size,
        )
    }

    /// Builds a cipher from a parsed spec.
    pub fn from_spec(spec: CipherSpec, key: &[u8], sector_size: u32) -> Result<Self, PureError> {
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(PureError::Unsupported(Unsupported::SectorSize(sector_size)));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(PureError::Unsupported(Unsupported::KeyTooLarge(
                u32::try_from(key.len()).unwrap_or(u32::MAX),
            )));
        }
        let iv = match spec.iv {
            IvKind::Plain => IvGen::Plain,
            IvKind::Plain64 => IvGen::Plain64,
            IvKind::Plain64Be => IvGen::Plain64Be,
            IvKind::Null => IvGen::Null,
            IvKind::Essiv(h) => {
                let mut salt = [0u8; MAX_DIGEST_LEN];
                let n = h.digest_into(&[key], &mut salt);
                let c = BlockAlg::new(spec.kind, &salt[..n]);
                salt.zeroize();
                IvGen::Essiv(c?)
            }
        };
        let half = key.len() / 2;
        let mode = match spec.chain {
            Chain::Xts => {
                if !key.len().is_multiple_of(2) {
                    return Err(key_size_error(spec.kind, key.len()));
                }
                let (a, b) = key.split_at(half);
                let engine = match (spec.kind, &iv) {
                    (BlockKind::Aes, IvGen::Plain64) => crate::simd::XtsEngine::new(key).ok(),
                    _ => None,
                };
                if let Some(e) = engine {
                    Mode::XtsAes(e)
                } else {
                    Mode::Xts(
                        Xts {
                            k1: BlockAlg::new(spec.kind, a)?,
                            k2: BlockAlg::new(spec.kind, b)?,
                        },
                        iv,
                    )
                }
            }
            Chain::Cbc => Mode::Cbc(BlockAlg::new(spec.kind, key)?, iv),
            Chain::Ecb => Mode::Ecb(BlockAlg::new(spec.kind, key)?),
            Chain::Lrw => {
                let split = key
                    .len()
                    .checked_sub(16)
                    .ok_or_else(|| key_size_error(spec.kind, key.len()))?;
                let (a, b) = key.split_at(split);
                let mut tk = as_blk(b);
                let t = TweakKey(u128::from_be_bytes(tk));
                tk.zeroize();
                Mode::Lrw(BlockAlg::new(spec.kind, a)?, t, iv)
            }
        };
        Ok(Self {
            mode,
            sector_size,
            key_len: key.len(),
        })
    }

    /// The sector size this cipher was made for.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The volume key length in bytes.
    pub fn key_len(&self) -> usize {
        self.key_len
    }

    fn check(&self, first_iv_sector: u64, data: &[u8]) -> Result<(usize, u64), PureError> {
        let ss = self.sector_size as usize;
        let len = data.len() as u64;
        if data.len().checked_rem(ss) != Some(0) {
            return Err(PureError::BadParameter(BadParameter::Unaligned {
                offset: first_iv_sector.saturating_mul(512),
                len,
            }));
        }
        Ok((ss, u64::from(self.sector_size / 512)))
    }

    /// Encrypts whole sectors in place; the first sector's IV is
    /// `first_iv_sector` (in 512-byte units). `data.len()` must be a
    /// multiple of the sector size.
    pub fn encrypt_sectors(&self, first_iv_sector: u64, data: &mut [u8]) -> Result<(), PureError> {
        self.crypt_sectors(Dir::Encrypt, first_iv_sector, data)
    }

    /// Decrypts whole sectors in place; see [`SectorCipher::encrypt_sectors`].
    pub fn decrypt_sectors(&self, first_iv_sector: u64, data: &mut [u8]) -> Result<(), PureError> {
        self.crypt_sectors(Dir::Decrypt, first_iv_sector, data)
    }

    /// Encrypts or decrypts whole sectors in place, as `dir` says.
    fn crypt_sectors(
        &self,
        dir: Dir,
        first_iv_sector: u64,
        data: &mut [u8],
    ) -> Result<(), PureError> {
        let (ss, step) = self.check(first_iv_sector, data)?;
        let iv_no = |k: usize| first_iv_sector.wrapping_add((k as u64).wrapping_mul(step));
        let block = |c: &BlockAlg, b: &mut Blk| match dir {
            Dir::Encrypt => c.encrypt(b),
            Dir::Decrypt => c.decrypt(b),
        };
        match &self.mode {
            Mode::XtsAes(e) => match dir {
                Dir::Encrypt => e.encrypt_sectors_with_step(data, ss, first_iv_sector, step),
                Dir::Decrypt => e.decrypt_sectors_with_step(data, ss, first_iv_sector, step),
            }
            .map_err(|_| unaligned(first_iv_sector, data.len()))?,
            Mode::Xts(x, iv) => match dir {
                Dir::Encrypt => x.encrypt_sectors(ss, data, |k| iv.iv(iv_no(k))),
                Dir::Decrypt => x.decrypt_sectors(ss, data, |k| iv.iv(iv_no(k))),
            },
            Mode::Cbc(c, iv) => {
                for (k, sector) in data.chunks_exact_mut(ss).enumerate() {
                    // The previous ciphertext block, the IV for the first.
                    let mut prev = iv.iv(iv_no(k));
                    for chunk in sector.chunks_exact_mut(16) {
                        let mut b = as_blk(chunk);
                        match dir {
                            Dir::Encrypt => {
                                xor_into(&mut b, &prev);
                                c.encrypt(&mut b);
                                prev = b;
                            }
                            Dir::Decrypt => {
                                let ct = b;
                                c.decrypt(&mut b);
                                xor_into(&mut b, &prev);
                                prev = ct;
                            }
                        }
                        chunk.copy_from_slice(&b);
                    }
                }
            }
            Mode::Ecb(c) => {
                for chunk in data.chunks_exact_mut(16) {
                    let mut b = as_blk(chunk);
                    block(c, &mut b);
                    chunk.copy_from_slice(&b);
                }
            }
            Mode::Lrw(c, tk, iv) => {
                for (k, sector) in data.chunks_exact_mut(ss).enumerate() {
                    let index = u128::from_be_bytes(iv.iv(iv_no(k)));
                    for (j, chunk) in sector.chunks_exact_mut(16).enumerate() {
                        let t = gf128_mul_bbe(tk.0, index.wrapping_add(j as u128)).to_be_bytes();
                        let mut b = as_blk(chunk);
                        xor_into(&mut b, &t);
                        block(c, &mut b);
                        xor_into(&mut b, &t);
                        chunk.copy_from_slice(&b);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Which way a [`SectorCipher`] call runs.
#[derive(Clone, Copy)]
enum Dir {
    Encrypt,
    Decrypt,
}

fn key_size_error(kind: BlockKind, len: usize) -> PureError {
    PureError::Unsupported(Unsupported::KeySize {
        cipher: name_from(kind.name().as_bytes()),
        bytes: u32::try_from(len).unwrap_or(u32::MAX),
    })
}

/// Multiplication in GF(2^128) with x^128 + x^7 + x^2 + x + 1, in the
/// "big-endian bits" convention LRW uses: the coefficient of x^i is bit i
/// of the big-endian integer. Branches only on `b` (the public block
/// index), never on the key `a`.
fn gf128_mul_bbe(a: u128, b: u128) -> u128 {
    let mut r = 0u128;
    for i in (0..128u32).rev() {
        let carry = (r >> 127) as u8;
        r = (r << 1) ^ u128::from(0x87u8 & carry.wrapping_neg());
        let bit = ((b >> i) & 1) as u8;
        r ^= a & u128::from(bit).wrapping_neg();
    }
    r
}

/// The legacy qcow/qcow2 "AES" encryption (`encrypt.format=aes`).
///
/// INSECURE: AES-128-CBC with a predictable IV (the guest sector number)
/// and a key that is the passphrase itself, zero-padded or cut to 16
/// bytes. Supported only to read and convert old images.
pub struct LegacyQcowAes(SectorCipher);

impl fmt::Debug for LegacyQcowAes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LegacyQcowAes { .. }")
    }
}

impl LegacyQcowAes {
    /// Derives the key from `passphrase` the way QEMU does.
    pub fn new(passphrase: &[u8]) -> Result<Self, PureError> {
        let mut key = [0u8; 16];
        let n = passphrase.len().min(16);
        key[..n].copy_from_slice(&passphrase[..n]);
        let c = BlockAlg::new(BlockKind::Aes, &key);
        key.zeroize();
        Ok(Self(SectorCipher {
            mode: Mode::Cbc(c?, IvGen::Plain64),
            sector_size: 512,
            key_len: 16,
        }))
    }

    /// Encrypts whole 512-byte sectors; `first_guest_sector` is the guest
    /// sector number of the first one.
    pub fn encrypt_sectors(
        &self,
        first_guest_sector: u64,
        data: &mut [u8],
    ) -> Result<(), PureError> {
        self.0.encrypt_sectors(first_guest_sector, data)
    }

    /// Decrypts whole 512-byte sectors.
    pub fn decrypt_sectors(
        &self,
        first_guest_sector: u64,
        data: &mut [u8],
    ) -> Result<(), PureError> {
        self.0.decrypt_sectors(first_guest_sector, data)
    }
}

#[cfg(test)]
mod tests;
