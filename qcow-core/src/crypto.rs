//! Encrypted qcow2 images: unlocking the LUKS header stored inside the
//! image (crypt_method 2) or deriving the legacy AES key (crypt_method 1),
//! and the [`Decryptor`] the reader applies to every data cluster.
//!
//! IVs differ by method: LUKS data sectors use `plain64(host offset / 512)`
//! (so internal snapshots never reuse an IV for different data), legacy AES
//! uses `plain64(guest offset / 512)`.
//!
//! No allocation: the header is read through a window over the image
//! device, and the cipher lives in the returned value.

use core::fmt;

use luks_core::io::{BlockIo, Window};
use luks_core::{luks1, LegacyQcowAes, SectorCipher};

use crate::error::{Error, Structure};
use crate::header::CryptMethod;
use crate::image::{Decryptor, ImageInfo};
use crate::units::{GuestOffset, HostOffset};

/// The key that decrypts an encrypted image's data.
pub enum ImageKey {
    /// crypt_method 2: the volume key's cipher from the LUKS header in the
    /// image, IVs from host offsets.
    Luks(SectorCipher),
    /// crypt_method 1: AES-128-CBC keyed by the passphrase, IVs from guest
    /// offsets. Insecure; kept to read old images.
    LegacyAes(LegacyQcowAes),
}

impl fmt::Debug for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Luks(_) => "ImageKey::Luks { .. }",
            Self::LegacyAes(_) => "ImageKey::LegacyAes { .. }",
        })
    }
}

/// Where the LUKS header of a crypt_method 2 image lies.
fn luks_region<E>(info: &ImageInfo) -> Result<(u64, u64), Error<E>> {
    let c = info.crypto.ok_or(Error::Corrupt {
        structure: Structure::Header,
        offset: 0,
        problem: crate::error::Problem::MissingCryptoExtension,
    })?;
    Ok((c.offset, c.length))
}

impl ImageKey {
    /// Unlocks an encrypted image on `dev` with `passphrase`: for LUKS,
    /// tries every active key slot of the header the image carries.
    /// Returns `Ok(None)` for an unencrypted image.
    pub fn unlock<D: BlockIo>(
        dev: &mut D,
        info: &ImageInfo,
        passphrase: &[u8],
    ) -> Result<Option<Self>, Error<D::Error>> {
        match info.header.crypt_method {
            CryptMethod::None => Ok(None),
            CryptMethod::Aes => LegacyQcowAes::new(passphrase)
                .map(|k| Some(Self::LegacyAes(k)))
                .map_err(|e| Error::Luks(e.widen())),
            CryptMethod::Luks => {
                let (offset, len) = luks_region(info)?;
                // Offsets inside the region are relative to it.
                let mut region = Window::new(&mut *dev, offset, len);
                let hdr = luks1::read_header(&mut region).map_err(Error::Luks)?;
                let (key, _slot) =
                    luks1::unlock(&mut region, &hdr, passphrase, None).map_err(Error::Luks)?;
                let cipher = luks1::data_cipher(&hdr, &key).map_err(Error::Luks)?;
                Ok(Some(Self::Luks(cipher)))
            }
        }
    }

    /// Encrypts whole 512-byte sectors about to be written at `host_offset`,
    /// holding guest bytes from `guest_offset`.
    pub fn encrypt(
        &self,
        host_offset: HostOffset,
        guest_offset: GuestOffset,
        buf: &mut [u8],
    ) -> bool {
        match self {
            Self::Luks(c) => c.encrypt_sectors(host_offset.get() / 512, buf).is_ok(),
            Self::LegacyAes(k) => k.encrypt_sectors(guest_offset.get() / 512, buf).is_ok(),
        }
    }
}

/// Encrypts the data of one large write, possibly in pieces on several
/// threads (this crate cannot start them itself; the writer's default is
/// [`ImageKey::encrypt`] in line). An implementation must produce exactly
/// the bytes [`ImageKey::encrypt`] gives for the whole buffer: pieces cut
/// at 512-byte boundaries, each encrypted with its own host and guest
/// offset (the sector IVs depend on nothing else).
pub trait SectorCrypt {
    /// Encrypts `buf`, whole sectors about to be written at `host_offset`
    /// holding guest bytes from `guest_offset`, with `key`; `false` when
    /// the cipher refused.
    fn encrypt(
        &self,
        key: &ImageKey,
        host_offset: HostOffset,
        guest_offset: GuestOffset,
        buf: &mut [u8],
    ) -> bool;
}

impl Decryptor for ImageKey {
    fn decrypt(
        &mut self,
        host_offset: HostOffset,
        guest_offset: GuestOffset,
        buf: &mut [u8],
    ) -> bool {
        match self {
            Self::Luks(c) => c.decrypt_sectors(host_offset.get() / 512, buf).is_ok(),
            Self::LegacyAes(k) => k.decrypt_sectors(guest_offset.get() / 512, buf).is_ok(),
        }
    }
}
