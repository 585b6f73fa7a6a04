//! The portable backend: tweaks in plain Rust, AES through the `aes`
//! crate's bulk block API (which has its own runtime dispatch).
//!
//! No `unsafe` here, no allocation: tweaks go to a fixed on-stack buffer
//! and each sector is processed in chunks of [`CHUNK`] blocks.

#![forbid(unsafe_code)]

use aes::{Aes128, Aes256, Block};
use cipher::array::Array;
use cipher::consts::U16;
use cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use zeroize::Zeroize;

use super::KeySize;

/// Blocks per bulk call (1 KiB of data, 1 KiB of tweaks on the stack).
const CHUNK: usize = 64;

/// Key1 (data, both directions) and key2 (tweak, encrypt only). The `aes`
/// types wipe their key schedules on drop (`zeroize` feature).
// Both variants live inline: no allocator in `no_std` builds, and an
// engine is built once per volume, so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum PortableXts {
    Aes128 { k1: Aes128, k2: Aes128 },
    Aes256 { k1: Aes256, k2: Aes256 },
}

/// Multiplies a tweak by `x` in GF(2^128), XTS byte order (the tweak is a
/// little-endian 128-bit integer; reduction polynomial x^128+x^7+x^2+x+1).
#[inline(always)]
pub(super) fn mul_x(t: u128) -> u128 {
    // All ones when bit 127 is set, else zero (no branch).
    let mask = 0u128.wrapping_sub(t >> 127);
    (t << 1) ^ (mask & 0x87)
}

impl PortableXts {
    pub(super) fn new(k1: &[u8], k2: &[u8], size: KeySize) -> Option<Self> {
        Some(match size {
            KeySize::Aes128 => Self::Aes128 {
                k1: Aes128::new_from_slice(k1).ok()?,
                k2: Aes128::new_from_slice(k2).ok()?,
            },
            KeySize::Aes256 => Self::Aes256 {
                k1: Aes256::new_from_slice(k1).ok()?,
                k2: Aes256::new_from_slice(k2).ok()?,
            },
        })
    }

    pub(super) fn run(
        &self,
        encrypt: bool,
        data: &mut [u8],
        sector_size: usize,
        iv: u64,
        step: u64,
    ) {
        match self {
            Self::Aes128 { k1, k2 } => run_with(k1, k2, encrypt, data, sector_size, iv, step),
            Self::Aes256 { k1, k2 } => run_with(k1, k2, encrypt, data, sector_size, iv, step),
        }
    }
}

fn run_with<C>(
    k1: &C,
    k2: &C,
    encrypt: bool,
    data: &mut [u8],
    sector_size: usize,
    mut iv: u64,
    step: u64,
) where
    C: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt,
{
    let mut tweaks = [0u128; CHUNK];
    for sector in data.chunks_exact_mut(sector_size) {
        let mut t0 = Block::from(u128::from(iv).to_le_bytes());
        k2.encrypt_block(&mut t0);
        let mut t = u128::from_le_bytes(t0.0);
        let (blocks, _rest) = Array::<u8, U16>::slice_as_chunks_mut(sector);
        for chunk in blocks.chunks_mut(CHUNK) {
            let tw = &mut tweaks[..chunk.len()];
            for (b, slot) in chunk.iter_mut().zip(tw.iter_mut()) {
                *slot = t;
                xor_block(b, t);
                t = mul_x(t);
            }
            if encrypt {
                k1.encrypt_blocks(chunk);
            } else {
                k1.decrypt_blocks(chunk);
            }
            for (b, &tweak) in chunk.iter_mut().zip(tw.iter()) {
                xor_block(b, tweak);
            }
        }
        iv = iv.wrapping_add(step);
    }
    // Only the slots written hold tweaks; keep the wipe proportional.
    let used = (sector_size / 16).min(CHUNK);
    tweaks[..used].zeroize();
}

#[inline(always)]
fn xor_block(b: &mut Block, t: u128) {
    let v = u128::from_le_bytes(b.0) ^ t;
    b.0 = v.to_le_bytes();
}
