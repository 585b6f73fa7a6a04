//! Creating a LUKS1 volume: [`FormatParams`], the key slot layout and
//! [`format`].

use rand_core::TryCryptoRng;
use zeroize::Zeroize;

use super::slots::write_slot;
use super::{
    dev_size, header, rng_fill, write_header, HeaderRepr, KeySlotRepr, VolumeKey,
    FIRST_KEY_SLOT_SECTOR, KEY_SLOTS, KEY_SLOT_ALIGN_SECTORS, PAYLOAD_ALIGN_SECTORS, STRIPES,
};
use crate::cipher::{CipherSpec, MAX_KEY_BYTES};
use crate::error::{BadParameter, Error, Name, PureError, Structure};
use crate::hash::HashAlg;
use crate::io::BlockIo;

/// What [`format`] creates.
#[derive(Debug, Clone)]
pub struct FormatParams<'a> {
    /// Cipher name (`aes`).
    pub cipher_name: &'a str,
    /// Cipher mode (`xts-plain64`).
    pub cipher_mode: &'a str,
    /// Volume key length in bytes (64 for AES-256-XTS).
    pub key_bytes: u32,
    /// Hash for PBKDF2 and the AF diffuse function.
    pub hash: HashAlg,
    /// PBKDF2 iterations of the first key slot.
    pub iterations: u32,
    /// PBKDF2 iterations of the volume key digest (cryptsetup uses at
    /// least 1000).
    pub digest_iterations: u32,
    /// Payload offset in sectors: `None` rounds the end of the key
    /// material up to [`PAYLOAD_ALIGN_SECTORS`]; `Some(0)` makes a detached
    /// header.
    pub payload_offset: Option<u32>,
}

impl Default for FormatParams<'_> {
    fn default() -> Self {
        Self {
            cipher_name: "aes",
            cipher_mode: "xts-plain64",
            key_bytes: 64,
            hash: HashAlg::Sha256,
            iterations: 1000,
            digest_iterations: 1000,
            payload_offset: None,
        }
    }
}

/// Key slot layout: the key material offset of each slot, and the end of
/// the key material (sectors).
pub fn key_slot_layout(key_bytes: u32) -> Option<([u32; KEY_SLOTS], u32)> {
    let km = header::key_material_sectors(key_bytes, STRIPES)?;
    let step = km.checked_next_multiple_of(KEY_SLOT_ALIGN_SECTORS)?;
    let mut offs = [0u32; KEY_SLOTS];
    let mut at = FIRST_KEY_SLOT_SECTOR;
    for o in offs.iter_mut() {
        *o = at;
        at = at.checked_add(step)?;
    }
    let end = offs[KEY_SLOTS - 1].checked_add(km)?;
    Some((offs, end))
}

/// Formats `dev` as a LUKS1 volume with a random volume key (or `volume_key`
/// when given) and `passphrase` in key slot 0.
///
/// Zero-fills the whole header area (up to the payload, or up to the end
/// of the key material for a detached header) before writing. Returns the
/// header and the volume key.
pub fn format<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    params: &FormatParams<'_>,
    volume_key: Option<&[u8]>,
    passphrase: &[u8],
    rng: &mut R,
) -> Result<(HeaderRepr, VolumeKey), Error<D::Error>> {
    if params.iterations == 0 || params.digest_iterations == 0 {
        return Err(Error::BadParameter(BadParameter::ZeroIterations));
    }
    let spec =
        CipherSpec::parse(params.cipher_name, params.cipher_mode).map_err(PureError::widen)?;
    spec.check_key_len(params.key_bytes as usize)
        .map_err(PureError::widen)?;
    let (offs, end) = key_slot_layout(params.key_bytes).ok_or(Error::Unsupported(
        crate::error::Unsupported::KeyTooLarge(params.key_bytes),
    ))?;
    let payload_offset = match params.payload_offset {
        None => end
            .checked_next_multiple_of(PAYLOAD_ALIGN_SECTORS)
            .ok_or(Error::BadParameter(BadParameter::PayloadOffsetTooSmall {
                minimum: u64::from(end),
            }))?,
        Some(0) => 0,
        Some(p) if p >= end => p,
        Some(_) => {
            return Err(Error::BadParameter(BadParameter::PayloadOffsetTooSmall {
                minimum: u64::from(end),
            }))
        }
    };
    let vk = match volume_key {
        Some(k) => {
            if k.len() != params.key_bytes as usize {
                return Err(Error::Unsupported(crate::error::Unsupported::KeySize {
                    cipher: crate::error::name_from(params.cipher_name.as_bytes()),
                    bytes: u32::try_from(k.len()).unwrap_or(u32::MAX),
                }));
            }
            VolumeKey::from_bytes(k).ok_or(Error::Unsupported(
                crate::error::Unsupported::KeyTooLarge(params.key_bytes),
            ))?
        }
        None => {
            let mut b = [0u8; MAX_KEY_BYTES];
            let n = params.key_bytes as usize;
            let r = rng_fill(rng, &mut b[..n.min(MAX_KEY_BYTES)]);
            let k = VolumeKey::from_bytes(&b[..n.min(MAX_KEY_BYTES)]);
            b.zeroize();
            r?;
            k.ok_or(Error::Rng)?
        }
    };
    let mut mk_digest_salt = [0u8; header::SALT_LEN];
    rng_fill(rng, &mut mk_digest_salt)?;
    let mut mk_digest = [0u8; header::DIGEST_LEN];
    params.hash.pbkdf2(
        vk.as_bytes(),
        &mk_digest_salt,
        params.digest_iterations,
        &mut mk_digest,
    );
    let mut u = [0u8; 16];
    rng_fill(rng, &mut u)?;
    let uuid = uuid_v4(u);
    let slot = |o: u32| KeySlotRepr {
        active: false,
        iterations: 0,
        salt: [0; header::SALT_LEN],
        key_material_offset: o,
        stripes: STRIPES,
    };
    let mut hdr = HeaderRepr {
        cipher_name: name(params.cipher_name),
        cipher_mode: name(params.cipher_mode),
        hash_spec: name(params.hash.name()),
        payload_offset,
        key_bytes: params.key_bytes,
        mk_digest,
        mk_digest_salt,
        mk_digest_iter: params.digest_iterations,
        uuid,
        uuid_raw: None,
        key_slots: offs.map(slot),
    };
    // Zero the header area.
    let area_end = if payload_offset == 0 {
        end
    } else {
        payload_offset
    };
    let area = u64::from(area_end).saturating_mul(512);
    let size = dev_size(dev)?;
    if size < area {
        // A growable device (a file) grows; others fail here.
        if !dev.set_size(area).map_err(|source| Error::Io {
            source,
            structure: Structure::Device,
            offset: 0,
        })? && dev_size(dev)? < area
        {
            return Err(Error::TooSmall {
                structure: Structure::Luks1Header,
                needed: area,
                size,
            });
        }
    }
    dev.write_zeroes(0, area).map_err(|source| Error::Io {
        source,
        structure: Structure::Luks1Header,
        offset: 0,
    })?;
    write_slot(dev, &mut hdr, 0, &vk, passphrase, params.iterations, rng)?;
    write_header(dev, &hdr)?;
    dev.flush().map_err(|source| Error::Io {
        source,
        structure: Structure::Device,
        offset: 0,
    })?;
    Ok((hdr, vk))
}

fn name(s: &str) -> Name {
    crate::error::name_from(s.as_bytes())
}

pub(crate) fn uuid_v4(mut u: [u8; 16]) -> heapless::String<40> {
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let mut s = heapless::String::new();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            let _ = s.push('-');
        }
        let _ = s.push(HEX[usize::from(b >> 4)] as char);
        let _ = s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}
