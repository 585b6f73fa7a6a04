//! LUKS1: header, key slots, unlock, format and key slot management.
//!
//! Nothing here allocates: key material streams through a fixed 4 KiB
//! buffer, keys live in fixed arrays that are wiped on drop.

#![warn(clippy::arithmetic_side_effects)]

pub(crate) mod af;
pub mod header;

use core::fmt;

use rand_core::TryCryptoRng;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

pub use header::{Dump, Header, HeaderRepr, KeySlotRepr, HEADER_LEN, KEY_SLOTS, STRIPES};

use crate::cipher::{CipherSpec, SectorCipher, MAX_KEY_BYTES};
use crate::error::{slot_u8, BadParameter, Error, Name, PureError, Structure};
use crate::hash::HashAlg;
use crate::io::{self, BlockIo, BytesError};
use af::AfState;

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

/// Unlocks key slot `slot` with `passphrase`: `Ok(None)` when the
/// passphrase does not open it.
fn try_slot<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &HeaderRepr,
    slot: usize,
    passphrase: &[u8],
) -> Result<Option<VolumeKey>, Error<D::Error>> {
    let ks = hdr
        .key_slots
        .get(slot)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(slot_u8(
            slot,
        ))))?;
    let hash = hash_of(hdr)?;
    // Field offsets in the phdr: mkDigestIterations at 164; key slot n at
    // 208 + 48 n, its iterations 4 bytes in.
    check_iterations(
        Structure::Luks1Header,
        164,
        "digest iterations",
        hdr.mk_digest_iter,
    )?;
    let slot_off = 208u64.saturating_add(48u64.saturating_mul(slot as u64));
    check_iterations(
        Structure::Luks1KeySlot(slot_u8(slot)),
        slot_off.saturating_add(4),
        "iterations",
        ks.iterations,
    )?;
    let kb = hdr.key_bytes as usize;
    let (cipher, ()) = slot_cipher(&hdr.cipher_name, &hdr.cipher_mode, kb, |sk| {
        hash.pbkdf2(passphrase, &ks.salt, ks.iterations, sk);
        Ok(())
    })?;
    let mut af = AfState::new(hash, kb, ks.stripes);
    let base = u64::from(ks.key_material_offset).saturating_mul(512);
    let st = Structure::KeyMaterial(slot_u8(slot));
    read_material(dev, st, base, &cipher, &mut af)?;
    let Some(candidate) = af.merged() else {
        return Ok(None);
    };
    if verify_volume_key(hdr, candidate) {
        Ok(VolumeKey::from_bytes(candidate))
    } else {
        Ok(None)
    }
}

/// Unlocks the volume with `passphrase` (a key file is just its bytes).
///
/// Tries `slot` only, or every active slot in order. Returns the volume
/// key and the slot that opened.
pub fn unlock<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &HeaderRepr,
    passphrase: &[u8],
    slot: Option<u8>,
) -> Result<(VolumeKey, u8), Error<D::Error>> {
    if let Some(s) = slot {
        let ks = hdr
            .key_slots
            .get(usize::from(s))
            .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(s)))?;
        if !ks.active {
            return Err(Error::KeySlotNotActive(s));
        }
        return match try_slot(dev, hdr, usize::from(s), passphrase)? {
            Some(k) => Ok((k, s)),
            None => Err(Error::WrongPassphrase),
        };
    }
    if !hdr.key_slots.iter().any(|k| k.active) {
        return Err(Error::NoActiveKeySlot);
    }
    for i in 0..KEY_SLOTS {
        if hdr.key_slots[i].active {
            if let Some(k) = try_slot(dev, hdr, i, passphrase)? {
                return Ok((k, slot_u8(i)));
            }
        }
    }
    Err(Error::WrongPassphrase)
}

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

pub(crate) fn rng_fill<R: TryCryptoRng + ?Sized, E>(
    rng: &mut R,
    buf: &mut [u8],
) -> Result<(), Error<E>> {
    rng.try_fill_bytes(buf).map_err(|_| Error::Rng)
}

/// Derives a `len`-byte key slot key with `derive` (into a buffer wiped
/// before this returns) and makes the key material's cipher from it
/// (`cipher_name`/`cipher_mode`, 512-byte sectors); also returns what
/// `derive` returned.
pub(crate) fn slot_cipher<E, T>(
    cipher_name: &str,
    cipher_mode: &str,
    len: usize,
    derive: impl FnOnce(&mut [u8]) -> Result<T, Error<E>>,
) -> Result<(SectorCipher, T), Error<E>> {
    let mut slot_key = Zeroizing::new([0u8; MAX_KEY_BYTES]);
    let sk = slot_key.get_mut(..len).ok_or(Error::Unsupported(
        crate::error::Unsupported::KeyTooLarge(u32::try_from(len).unwrap_or(u32::MAX)),
    ))?;
    let derived = derive(sk)?;
    let cipher = SectorCipher::new(cipher_name, cipher_mode, sk, 512);
    drop(slot_key);
    Ok((cipher.map_err(PureError::widen)?, derived))
}

/// Reads the key material `af` merges (its length rounded up to 512-byte
/// sectors) from `base`, decrypts it with `cipher` (IVs counting from 0)
/// and feeds it to `af`; errors name `st`.
pub(crate) fn read_material<D: BlockIo + ?Sized>(
    dev: &mut D,
    st: Structure,
    base: u64,
    cipher: &SectorCipher,
    af: &mut AfState,
) -> Result<(), Error<D::Error>> {
    let total = af.material_len().div_ceil(512).saturating_mul(512);
    // Decrypted key material: wiped on every exit path.
    let mut buf = Zeroizing::new([0u8; CHUNK]);
    let mut done = 0u64;
    while done < total {
        let n = io::chunk_len(total.saturating_sub(done), CHUNK);
        let chunk = &mut buf[..n];
        read(dev, st, base.saturating_add(done), chunk)?;
        cipher
            .decrypt_sectors(done / 512, chunk)
            .map_err(PureError::widen)?;
        af.feed(chunk);
        done = done.saturating_add(n as u64);
    }
    Ok(())
}

/// Splits `vk` with `af` (random stripes from `rng`), pads the material
/// with zeroes to whole 512-byte sectors, encrypts it with `cipher` (IVs
/// counting from 0) and writes it at `base`; errors name `st`. The caller
/// flushes.
pub(crate) fn write_material<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    st: Structure,
    base: u64,
    cipher: &SectorCipher,
    af: &mut AfState,
    vk: &VolumeKey,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    let kb = af.key_len();
    let total = af.material_len().div_ceil(512).saturating_mul(512);
    // Key material in the clear: wiped on every exit path.
    let mut buf = Zeroizing::new([0u8; CHUNK]);
    let mut stripe = Zeroizing::new([0u8; MAX_KEY_BYTES]);
    let mut fill = 0usize;
    let mut pending = 0usize; // bytes of `stripe` not yet copied into buf
    let mut done = 0u64;
    let mut rng_ok = true;
    while done < total {
        let n = io::chunk_len(total.saturating_sub(done), CHUNK);
        // Fill buf[..n] with stripes (zero padding after the last one).
        while fill < n {
            if pending == 0 {
                if af.all_stripes() {
                    buf[fill..n].fill(0);
                    break;
                }
                rng_ok &= af.next_stripe(vk.as_bytes(), &mut stripe[..kb], |b| {
                    rng.try_fill_bytes(b).is_ok()
                });
                pending = kb;
            }
            let from = kb.saturating_sub(pending);
            let take = pending.min(n.saturating_sub(fill));
            buf[fill..fill.saturating_add(take)]
                .copy_from_slice(&stripe[from..from.saturating_add(take)]);
            fill = fill.saturating_add(take);
            pending = pending.saturating_sub(take);
        }
        if !rng_ok {
            return Err(Error::Rng);
        }
        cipher
            .encrypt_sectors(done / 512, &mut buf[..n])
            .map_err(PureError::widen)?;
        write(dev, st, base.saturating_add(done), &buf[..n])?;
        done = done.saturating_add(n as u64);
        fill = 0;
    }
    Ok(())
}

/// Writes key slot `slot`: derives the slot key from `passphrase`, splits
/// `vk` and writes the encrypted key material, then marks the slot active
/// in `hdr` (the caller writes the header).
fn write_slot<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    slot: usize,
    vk: &VolumeKey,
    passphrase: &[u8],
    iterations: u32,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    if iterations == 0 {
        return Err(Error::BadParameter(BadParameter::ZeroIterations));
    }
    let hash = hash_of(hdr)?;
    let kb = hdr.key_bytes as usize;
    let mut salt = [0u8; header::SALT_LEN];
    rng_fill(rng, &mut salt)?;
    let ks = hdr
        .key_slots
        .get_mut(slot)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(slot_u8(
            slot,
        ))))?;
    let (cipher, ()) = slot_cipher(&hdr.cipher_name, &hdr.cipher_mode, kb, |sk| {
        hash.pbkdf2(passphrase, &salt, iterations, sk);
        Ok(())
    })?;
    let mut af = AfState::new(hash, kb, ks.stripes);
    let base = u64::from(ks.key_material_offset).saturating_mul(512);
    let st = Structure::KeyMaterial(slot_u8(slot));
    write_material(dev, st, base, &cipher, &mut af, vk, rng)?;
    ks.active = true;
    ks.iterations = iterations;
    ks.salt = salt;
    Ok(())
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

/// Adds `new_passphrase` in a free key slot (the lowest, or `slot`),
/// given the volume key. Writes key material and header; returns the slot.
///
/// Write order: the key material, a flush, then the header (a crash
/// before the header write leaves the slot inactive, never half-written).
pub fn add_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    vk: &VolumeKey,
    new_passphrase: &[u8],
    iterations: u32,
    slot: Option<u8>,
    rng: &mut R,
) -> Result<u8, Error<D::Error>> {
    if !verify_volume_key(hdr, vk.as_bytes()) {
        return Err(Error::WrongPassphrase);
    }
    let s = match slot {
        Some(s) => {
            let ks = hdr
                .key_slots
                .get(usize::from(s))
                .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(s)))?;
            if ks.active {
                return Err(Error::NoFreeKeySlot);
            }
            s
        }
        None => hdr
            .key_slots
            .iter()
            .position(|k| !k.active)
            .map(slot_u8)
            .ok_or(Error::NoFreeKeySlot)?,
    };
    put_key(dev, hdr, vk, new_passphrase, iterations, s, rng)?;
    Ok(s)
}

/// Writes `new_passphrase` into key slot `slot` whether or not it is
/// active (qemu-img's `amend --force` onto an active slot): the slot's old
/// key material is overwritten in place by the new one, then the header
/// is written. A crash between the two leaves the slot unusable (old
/// header, new material), so callers should prefer [`add_key`].
pub fn replace_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    vk: &VolumeKey,
    new_passphrase: &[u8],
    iterations: u32,
    slot: u8,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    if !verify_volume_key(hdr, vk.as_bytes()) {
        return Err(Error::WrongPassphrase);
    }
    if hdr.key_slots.get(usize::from(slot)).is_none() {
        return Err(Error::BadParameter(BadParameter::KeySlotIndex(slot)));
    }
    put_key(dev, hdr, vk, new_passphrase, iterations, slot, rng)
}

pub(crate) fn flush_dev<D: BlockIo + ?Sized>(dev: &mut D) -> Result<(), Error<D::Error>> {
    dev.flush().map_err(|source| Error::Io {
        source,
        structure: Structure::Device,
        offset: 0,
    })
}

/// Key material, flush, header, flush.
fn put_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    vk: &VolumeKey,
    new_passphrase: &[u8],
    iterations: u32,
    slot: u8,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    let mut new = hdr.clone();
    write_slot(
        dev,
        &mut new,
        usize::from(slot),
        vk,
        new_passphrase,
        iterations,
        rng,
    )?;
    flush_dev(dev)?;
    write_header(dev, &new)?;
    flush_dev(dev)?;
    *hdr = new;
    Ok(())
}

/// Disables key slot `slot` and overwrites its key material with zeroes.
/// Refuses to remove the last active slot unless `force`.
pub fn remove_key<D: BlockIo + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    slot: u8,
    force: bool,
) -> Result<(), Error<D::Error>> {
    let i = usize::from(slot);
    let ks = hdr
        .key_slots
        .get(i)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(slot)))?;
    if !ks.active {
        return Err(Error::KeySlotNotActive(slot));
    }
    let active = hdr.key_slots.iter().filter(|k| k.active).count();
    if active <= 1 && !force {
        return Err(Error::LastKeySlot(slot));
    }
    let (start, end) = hdr.key_material_range(i).ok_or(Error::corrupt(
        Structure::Luks1KeySlot(slot),
        0,
        crate::error::Problem::Overflow,
    ))?;
    let mut new = hdr.clone();
    new.key_slots[i].active = false;
    new.key_slots[i].iterations = 0;
    new.key_slots[i].salt = [0; header::SALT_LEN];
    // The material goes first (with explicit zero writes: write_zeroes
    // could only punch a hole that leaves the old bytes on the medium), so
    // a crash never leaves a disabled slot whose material still opens the
    // volume key.
    let zero = [0u8; CHUNK];
    let mut at = u64::from(start).saturating_mul(512);
    let stop = u64::from(end).saturating_mul(512);
    while at < stop {
        let n = io::chunk_len(stop.saturating_sub(at), CHUNK);
        write(dev, Structure::KeyMaterial(slot), at, &zero[..n])?;
        at = at.saturating_add(n as u64);
    }
    flush_dev(dev)?;
    write_header(dev, &new)?;
    flush_dev(dev)?;
    *hdr = new;
    Ok(())
}

/// Changes a passphrase: the slot `old_passphrase` opens gets
/// `new_passphrase` (written to a free slot first when there is one, then
/// the old slot is removed). Returns the new slot.
pub fn change_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    hdr: &mut HeaderRepr,
    old_passphrase: &[u8],
    new_passphrase: &[u8],
    iterations: u32,
    rng: &mut R,
) -> Result<u8, Error<D::Error>> {
    let (vk, old) = unlock(dev, hdr, old_passphrase, None)?;
    if hdr.key_slots.iter().any(|k| !k.active) {
        let new = add_key(dev, hdr, &vk, new_passphrase, iterations, None, rng)?;
        remove_key(dev, hdr, old, true)?;
        Ok(new)
    } else {
        put_key(dev, hdr, &vk, new_passphrase, iterations, old, rng)?;
        Ok(old)
    }
}

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

impl Pbkdf2Speed {
    /// Benchmarks qimg's PBKDF2 with `hash` as cryptsetup does (8-byte
    /// password, 32-byte salt, a sample starting at 2^15 iterations and
    /// grown 16x/8x/4x/2x while it takes at most 62/125/250/500 ms, until
    /// it takes over 500 ms; at most 10 steps), then scales the speed to
    /// `reader`'s ([`Pbkdf2Reader::speed_ratio_percent`]).
    ///
    /// `elapsed_ms` is a clock the caller provides (milliseconds since any
    /// fixed point). cryptsetup and QEMU both read the CPU time used
    /// (`getrusage`), so a loaded machine does not shrink the count; a CPU
    /// time clock here does the same. A clock that never advances stops
    /// the sample growing at 2^24 iterations.
    pub fn measure(
        hash: HashAlg,
        reader: Pbkdf2Reader,
        mut elapsed_ms: impl FnMut() -> u64,
    ) -> Self {
        /// cryptsetup's sample: long enough to scale from.
        const SAMPLE_MS: u64 = 500;
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
            if ms > SAMPLE_MS || steps >= MAX_STEPS || iters >= MAX_SAMPLE_ITERS {
                break (iters, ms);
            }
            let grow = match ms {
                0..=62 => 16,
                63..=125 => 8,
                126..=250 => 4,
                _ => 2,
            };
            iters = iters.saturating_mul(grow).min(MAX_SAMPLE_ITERS);
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

/// PBKDF2 iterations that take `reader` about `target_ms` with `hash`
/// when deriving `out_len` bytes: [`Pbkdf2Speed::measure`] then
/// [`Pbkdf2Speed::iterations`].
pub fn calibrate_iterations(
    hash: HashAlg,
    out_len: usize,
    target_ms: u32,
    reader: Pbkdf2Reader,
    elapsed_ms: impl FnMut() -> u64,
) -> u32 {
    Pbkdf2Speed::measure(hash, reader, elapsed_ms).iterations(out_len, target_ms)
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
