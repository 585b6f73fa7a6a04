//! LUKS1: header, key slots, unlock, format and key slot management.
//!
//! Nothing here allocates: key material streams through a fixed 4 KiB
//! buffer, keys live in fixed arrays that are wiped on drop.
//!
//! This file holds the volume key, byte-granular header I/O, reading and
//! writing the header and checking a volume key; `slots.rs` unlocks, writes
//! and removes key slots (and streams their key material), `format.rs`
//! creates volumes, `iterations.rs` bounds and calibrates PBKDF2
//! iterations. Everything public is re-exported here.

pub(crate) mod af;
pub(crate) mod format;
pub mod header;
pub(crate) mod iterations;
pub(crate) mod slots;

use core::fmt;

use rand_core::TryCryptoRng;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

pub use format::{format, key_slot_layout, FormatParams};
pub use header::{Dump, Header, HeaderRepr, KeySlotRepr, HEADER_LEN, KEY_SLOTS, STRIPES};
pub use iterations::{
    calibrate_iterations, Pbkdf2Reader, Pbkdf2Speed, DIGEST_MS, MAX_PBKDF2_ITERATIONS,
    MIN_PBKDF2_ITERATIONS, MIN_SAMPLE_MS,
};
pub use slots::{add_key, change_key, remove_key, replace_key, unlock};

use crate::cipher::{CipherSpec, SectorCipher, MAX_KEY_BYTES};
use crate::error::{slot_u8, Error, PureError, Structure};
use crate::hash::HashAlg;
use crate::io::{self, BlockIo, BytesError};

/// Bytes of key material processed per device request.
const CHUNK: usize = 4096;
/// Bounce buffer for byte-granular header I/O; devices with sectors larger
/// than this are refused.
const BOUNCE: usize = 4096;
/// Sectors reserved at the start of the header area before the first key
/// slot (4 KiB, cryptsetup and QEMU both put key slot 0 at sector 8).
pub const FIRST_KEY_SLOT_SECTOR: u32 = 8;
/// Key slots start on 4 KiB boundaries (8 sectors).
pub const KEY_SLOT_ALIGN_SECTORS: u32 = 8;
/// cryptsetup's default data alignment: 1 MiB... in LUKS1 it rounds the
/// payload up to 4096 sectors (2 MiB) for a 512-bit key.
pub const PAYLOAD_ALIGN_SECTORS: u32 = 4096;

/// A volume key: at most [`MAX_KEY_BYTES`], wiped on drop, never `Clone`,
/// and `Debug` prints `VolumeKey { .. }`.
pub struct VolumeKey {
    bytes: [u8; MAX_KEY_BYTES],
    len: usize,
}

impl VolumeKey {
    /// Copies a key; `None` if longer than [`MAX_KEY_BYTES`].
    pub fn from_bytes(key: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; MAX_KEY_BYTES];
        bytes.get_mut(..key.len())?.copy_from_slice(key);
        Some(Self {
            bytes,
            len: key.len(),
        })
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for VolumeKey {}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey { .. }")
    }
}

fn bytes_err<E>(e: BytesError<E>, structure: Structure, offset: u64) -> Error<E> {
    match e {
        BytesError::Device(source) => Error::Io {
            source,
            structure,
            offset,
        },
        BytesError::BounceTooSmall { sector_size, .. } | BytesError::BadSectorSize(sector_size) => {
            Error::Unsupported(crate::error::Unsupported::SectorSize(sector_size))
        }
        BytesError::RangeOverflow { .. } => {
            Error::corrupt(structure, offset, crate::error::Problem::Overflow)
        }
    }
}

pub(crate) fn read<D: BlockIo + ?Sized>(
    dev: &mut D,
    structure: Structure,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Error<D::Error>> {
    let mut bounce = [0u8; BOUNCE];
    io::read_bytes(dev, offset, buf, &mut bounce).map_err(|e| bytes_err(e, structure, offset))
}

pub(crate) fn write<D: BlockIo + ?Sized>(
    dev: &mut D,
    structure: Structure,
    offset: u64,
    buf: &[u8],
) -> Result<(), Error<D::Error>> {
    let mut bounce = [0u8; BOUNCE];
    let r =
        io::write_bytes(dev, offset, buf, &mut bounce).map_err(|e| bytes_err(e, structure, offset));
    bounce.zeroize();
    r
}

pub(crate) fn dev_size<D: BlockIo + ?Sized>(dev: &mut D) -> Result<u64, Error<D::Error>> {
    dev.size().map_err(|source| Error::Io {
        source,
        structure: Structure::Device,
        offset: 0,
    })
}

/// Whether the first bytes of a device look like a LUKS1 header (magic
/// and version 1), without validating anything else.
pub fn probe(first_bytes: &[u8]) -> bool {
    first_bytes.get(..6) == Some(&header::MAGIC[..]) && first_bytes.get(6..8) == Some(&[0, 1][..])
}

/// Reads and validates the LUKS1 header of `dev`, including the checks
/// against the device size and that the cipher spec is supported.
pub fn read_header<D: BlockIo + ?Sized>(dev: &mut D) -> Result<HeaderRepr, Error<D::Error>> {
    let mut buf = [0u8; HEADER_LEN];
    read(dev, Structure::Luks1Header, 0, &mut buf)?;
    let hdr = HeaderRepr::parse(&Header::new_unchecked(&buf[..])).map_err(PureError::widen)?;
    let size = dev_size(dev)?;
    hdr.check_device_size(size).map_err(PureError::widen)?;
    let spec = CipherSpec::parse(&hdr.cipher_name, &hdr.cipher_mode).map_err(PureError::widen)?;
    spec.check_key_len(hdr.key_bytes as usize)
        .map_err(PureError::widen)?;
    HashAlg::from_name(&hdr.hash_spec).map_err(PureError::widen)?;
    Ok(hdr)
}

/// Writes `hdr` into the first 592 bytes of `dev`, leaving the rest of the
/// first sectors as they are.
pub fn write_header<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &HeaderRepr,
) -> Result<(), Error<D::Error>> {
    let mut buf = [0u8; HEADER_LEN];
    hdr.emit(&mut Header::new_unchecked(&mut buf[..]))
        .map_err(PureError::widen)?;
    write(dev, Structure::Luks1Header, 0, &buf)
}

fn hash_of<E>(hdr: &HeaderRepr) -> Result<HashAlg, Error<E>> {
    HashAlg::from_name(&hdr.hash_spec).map_err(PureError::widen)
}

/// Builds the volume's data cipher for `key` with 512-byte sectors.
pub fn data_cipher<E>(hdr: &HeaderRepr, key: &VolumeKey) -> Result<SectorCipher, Error<E>> {
    SectorCipher::new(&hdr.cipher_name, &hdr.cipher_mode, key.as_bytes(), 512)
        .map_err(PureError::widen)
}

/// Whether `key` is this volume's key (PBKDF2 digest compared in constant
/// time).
pub fn verify_volume_key(hdr: &HeaderRepr, key: &[u8]) -> bool {
    let Ok(hash) = HashAlg::from_name(&hdr.hash_spec) else {
        return false;
    };
    if key.len() != hdr.key_bytes as usize {
        return false;
    }
    let mut d = [0u8; header::DIGEST_LEN];
    hash.pbkdf2(key, &hdr.mk_digest_salt, hdr.mk_digest_iter, &mut d);
    bool::from(d.ct_eq(&hdr.mk_digest))
}

pub(crate) fn rng_fill<R: TryCryptoRng + ?Sized, E>(
    rng: &mut R,
    buf: &mut [u8],
) -> Result<(), Error<E>> {
    rng.try_fill_bytes(buf).map_err(|_| Error::Rng)
}

pub(crate) fn flush_dev<D: BlockIo + ?Sized>(dev: &mut D) -> Result<(), Error<D::Error>> {
    dev.flush().map_err(|source| Error::Io {
        source,
        structure: Structure::Device,
        offset: 0,
    })
}

impl HeaderRepr {
    /// The key slots that are active.
    pub fn active_slots(&self) -> impl Iterator<Item = u8> + '_ {
        self.key_slots
            .iter()
            .enumerate()
            .filter(|(_, k)| k.active)
            .map(|(i, _)| slot_u8(i))
    }
}

#[cfg(test)]
mod tests;
