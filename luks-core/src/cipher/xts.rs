//! XTS (IEEE 1619) over 512..4096-byte sectors, whole blocks only (sector
//! sizes are multiples of 16, so no ciphertext stealing is needed).
//!
//! This portable path serves serpent, twofish, and IV generators other than
//! plain64 (plain, essiv, ...). AES-XTS with plain64 IVs, what LUKS and
//! qcow2 use by default, goes through the SIMD engine in `crate::simd`
//! instead (with its own portable fallback); callers only ever see
//! `SectorCipher`'s multi-sector API.

use super::block::{as_blk, xor_into, Blk, BlockAlg};

/// The two XTS keys: `k1` for the data, `k2` for the tweak.
pub(crate) struct Xts {
    pub(crate) k1: BlockAlg,
    pub(crate) k2: BlockAlg,
}

/// Multiplies the tweak by α in GF(2^128), little-endian convention.
#[inline]
fn mul_alpha(t: &mut Blk) {
    let v = u128::from_le_bytes(*t);
    let carry = (v >> 127) as u8;
    let r = (v << 1) ^ u128::from(0x87u8 & carry.wrapping_neg());
    *t = r.to_le_bytes();
}

impl Xts {
    /// Runs XTS over whole sectors in place, `block` being `k1`'s encrypt or
    /// decrypt; the tweak is always encrypted with `k2`.
    fn sectors(
        &self,
        sector_size: usize,
        data: &mut [u8],
        mut iv: impl FnMut(usize) -> Blk,
        block: impl Fn(&BlockAlg, &mut Blk),
    ) {
        for (k, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let mut t = iv(k);
            self.k2.encrypt(&mut t);
            for chunk in sector.chunks_exact_mut(16) {
                let mut b = as_blk(chunk);
                xor_into(&mut b, &t);
                block(&self.k1, &mut b);
                xor_into(&mut b, &t);
                chunk.copy_from_slice(&b);
                mul_alpha(&mut t);
            }
        }
    }

    /// Encrypts `data` (whole sectors of `sector_size` bytes) in place; the
    /// tweak input of sector `k` is `iv(k)`.
    pub(crate) fn encrypt_sectors(
        &self,
        sector_size: usize,
        data: &mut [u8],
        iv: impl FnMut(usize) -> Blk,
    ) {
        self.sectors(sector_size, data, iv, |k, b| k.encrypt(b));
    }

    /// Decrypts `data` in place; see [`Xts::encrypt_sectors`].
    pub(crate) fn decrypt_sectors(
        &self,
        sector_size: usize,
        data: &mut [u8],
        iv: impl FnMut(usize) -> Blk,
    ) {
        self.sectors(sector_size, data, iv, |k, b| k.decrypt(b));
    }
}
