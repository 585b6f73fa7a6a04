//! The 128-bit block ciphers a LUKS volume can name, behind one enum so the
//! sector modes need no generics and no allocation.

use cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

use crate::error::{name_from, PureError, Unsupported};

/// One 16-byte block.
pub(crate) type Blk = [u8; 16];

/// A key-scheduled block cipher. The inner types zero their round keys on
/// drop (the `zeroize` features of `aes` and `serpent`; our own Twofish
/// zeroes its subkeys and key-dependent tables). Twofish's 4 KiB of tables
/// make it the large variant; it stays inline because the core has no
/// allocator on the read path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum BlockAlg {
    Aes128(aes::Aes128),
    Aes192(aes::Aes192),
    Aes256(aes::Aes256),
    Serpent(serpent::Serpent),
    Twofish(super::twofish::Twofish),
}

/// Which block cipher a name selects, before a key is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    Aes,
    Serpent,
    Twofish,
}

impl BlockKind {
    pub(crate) fn from_name(name: &str) -> Result<Self, PureError> {
        if name.eq_ignore_ascii_case("aes") {
            Ok(Self::Aes)
        } else if name.eq_ignore_ascii_case("serpent") {
            Ok(Self::Serpent)
        } else if name.eq_ignore_ascii_case("twofish") {
            Ok(Self::Twofish)
        } else {
            Err(PureError::Unsupported(Unsupported::Cipher(name_from(
                name.as_bytes(),
            ))))
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Aes => "aes",
            Self::Serpent => "serpent",
            Self::Twofish => "twofish",
        }
    }
}

impl BlockAlg {
    /// Schedules `key`; refuses key sizes the cipher does not take (the
    /// kernel accepts serpent keys of 16..=32 bytes; so do we).
    pub(crate) fn new(kind: BlockKind, key: &[u8]) -> Result<Self, PureError> {
        let bad = || {
            PureError::Unsupported(Unsupported::KeySize {
                cipher: name_from(kind.name().as_bytes()),
                bytes: u32::try_from(key.len()).unwrap_or(u32::MAX),
            })
        };
        Ok(match (kind, key.len()) {
            (BlockKind::Aes, 16) => {
                Self::Aes128(aes::Aes128::new_from_slice(key).map_err(|_| bad())?)
            }
            (BlockKind::Aes, 24) => {
                Self::Aes192(aes::Aes192::new_from_slice(key).map_err(|_| bad())?)
            }
            (BlockKind::Aes, 32) => {
                Self::Aes256(aes::Aes256::new_from_slice(key).map_err(|_| bad())?)
            }
            (BlockKind::Serpent, _) => {
                Self::Serpent(serpent::Serpent::new_from_slice(key).map_err(|_| bad())?)
            }
            (BlockKind::Twofish, _) => {
                Self::Twofish(super::twofish::Twofish::new(key).ok_or_else(bad)?)
            }
            _ => return Err(bad()),
        })
    }

    #[inline]
    pub(crate) fn encrypt(&self, b: &mut Blk) {
        match self {
            Self::Aes128(c) => c.encrypt_block(b.into()),
            Self::Aes192(c) => c.encrypt_block(b.into()),
            Self::Aes256(c) => c.encrypt_block(b.into()),
            Self::Serpent(c) => c.encrypt_block(b.into()),
            Self::Twofish(c) => c.encrypt(b),
        }
    }

    #[inline]
    pub(crate) fn decrypt(&self, b: &mut Blk) {
        match self {
            Self::Aes128(c) => c.decrypt_block(b.into()),
            Self::Aes192(c) => c.decrypt_block(b.into()),
            Self::Aes256(c) => c.decrypt_block(b.into()),
            Self::Serpent(c) => c.decrypt_block(b.into()),
            Self::Twofish(c) => c.decrypt(b),
        }
    }
}

/// `dst ^= src` for one block.
#[inline]
pub(crate) fn xor_into(dst: &mut Blk, src: &Blk) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Copies the block at `i*16` of `data` out (the caller guarantees bounds
/// through `chunks_exact_mut`).
#[inline]
pub(crate) fn as_blk(chunk: &[u8]) -> Blk {
    let mut b = [0u8; 16];
    b.copy_from_slice(chunk);
    b
}
