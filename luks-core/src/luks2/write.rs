//! Creating LUKS2 volumes and adding or removing key slots (feature
//! `alloc`): the JSON text and the header copies are built in memory.
//!
//! Every update writes both header copies with the `seqid` one higher, key
//! material before the header that refers to it, and wipes a removed key
//! slot's area only after the header without it is written; a flush
//! separates each step (material, primary copy, secondary copy, wipe), so
//! after a power cut at any point one valid copy describes key material
//! that is all on the medium. Tokens and
//! config flags of an existing header are kept as they were (their JSON is
//! copied verbatim).
//!
//! This file holds the parameters, the header copies, key slot areas and
//! the updates ([`format`], [`add_key`], [`remove_key`]); `write/emit.rs`
//! writes the JSON text (keeping tokens and config flags verbatim) and
//! `write/kdf.rs` derives new key slot keys and calibrates Argon2. The
//! calibration functions are re-exported here.

extern crate alloc;

mod emit;
mod kdf;

use alloc::string::String;
use alloc::vec;

use rand_core::TryCryptoRng;
use zeroize::Zeroizing;

use super::header::{self, HeaderRepr, BINARY_LEN, HDR_SIZES};
use super::meta::{Blob, Digest, Kdf, Keyslot, Metadata, Segment, Spec, MAX_KEYSLOTS};
use super::{split_spec, Luks2Header};
use crate::cipher::{SectorCipher, MAX_KEY_BYTES};
use crate::error::{
    name_from, BadParameter, Error, Luks2Problem, Problem, PureError, Structure, Unsupported,
};
use crate::hash::HashAlg;
use crate::io::{self, BlockIo};
use crate::luks1::af::AfState;
use crate::luks1::format::uuid_v4;
use crate::luks1::slots::{slot_cipher, write_material};
use crate::luks1::{dev_size, flush_dev as flush, rng_fill, write, VolumeKey};
use emit::{emit_json, kept, Kept};
use kdf::derive_new;
pub use kdf::{calibrate_argon2, calibrate_argon2_params, CRYPTSETUP_ARGON2_TIME_PERCENT};

/// Bytes of key material written per device request.
const CHUNK: usize = 4096;
/// cryptsetup's default data offset for LUKS2 (16 MiB).
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
/// The largest key slots area cryptsetup creates (128 MiB).
pub const MAX_KEYSLOTS_SIZE: u64 = 128 << 20;
/// Key slot areas are 4 KiB aligned.
const AREA_ALIGN: u64 = 4096;
/// AF stripes (the only count cryptsetup writes).
pub const STRIPES: u32 = 4000;
/// Salt bytes of KDFs and digests.
const SALT_LEN: usize = 32;

/// The key derivation of a new key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfParams {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The hash.
        hash: HashAlg,
        /// Iterations.
        iterations: u32,
    },
    /// Argon2i (`id == false`) or Argon2id.
    Argon2 {
        /// Argon2id rather than Argon2i.
        id: bool,
        /// Passes.
        time: u32,
        /// Memory in KiB.
        memory_kib: u32,
        /// Lanes.
        cpus: u32,
    },
}

/// What [`format`] creates.
#[derive(Debug, Clone)]
pub struct FormatParams<'a> {
    /// Cipher spec of data and key slots (`aes-xts-plain64`).
    pub cipher: &'a str,
    /// Volume key bytes (64 for AES-256-XTS).
    pub key_bytes: u32,
    /// Data sector size, a power of two in 512..=4096.
    pub sector_size: u32,
    /// Key derivation of key slot 0.
    pub kdf: KdfParams,
    /// Hash of the AF splitter and the volume key digest.
    pub hash: HashAlg,
    /// PBKDF2 iterations of the volume key digest.
    pub digest_iterations: u32,
    /// Size of each header copy, one of [`HDR_SIZES`].
    pub hdr_size: u64,
    /// Data offset in bytes: `None` for [`DEFAULT_DATA_OFFSET`], `Some(0)`
    /// for a detached header (the data lives on another device).
    pub data_offset: Option<u64>,
    /// Key slots area size; `None` fills the space up to the data offset
    /// (at most [`MAX_KEYSLOTS_SIZE`]; 16 MiB minus both headers when
    /// detached).
    pub keyslots_size: Option<u64>,
    /// Label.
    pub label: &'a str,
}

impl Default for FormatParams<'_> {
    fn default() -> Self {
        Self {
            cipher: "aes-xts-plain64",
            key_bytes: 64,
            sector_size: 512,
            kdf: KdfParams::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 1000,
            },
            hash: HashAlg::Sha256,
            digest_iterations: 1000,
            hdr_size: 0x4000,
            data_offset: None,
            keyslots_size: None,
            label: "",
        }
    }
}

fn corrupt<E>(p: Luks2Problem) -> Error<E> {
    Error::corrupt(Structure::Luks2Json, 0, Problem::Luks2(p))
}

/// Writes both header copies of `hdr_size` bytes with `json` and `seqid`;
/// returns the primary's binary header.
fn write_headers<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    template: &HeaderRepr,
    seqid: u64,
    json: &str,
    rng: &mut R,
) -> Result<HeaderRepr, Error<D::Error>> {
    use digest::Digest as _;
    let hdr_size = template.hdr_size;
    let len = usize::try_from(hdr_size).map_err(|_| corrupt(Luks2Problem::HeaderSize(hdr_size)))?;
    let area = len.saturating_sub(BINARY_LEN);
    if json.len() >= area {
        return Err(Error::BufferTooSmall {
            structure: Structure::Luks2Json,
            needed: json.len().saturating_add(1),
            given: area,
        });
    }
    let mut buf = vec![0u8; len];
    let mut primary = None;
    for secondary in [false, true] {
        let mut r = template.clone();
        r.secondary = secondary;
        r.seqid = seqid;
        r.hdr_offset = if secondary { hdr_size } else { 0 };
        r.checksum_alg = name_from(b"sha256");
        r.csum = [0; 64];
        rng_fill(rng, &mut r.salt)?;
        buf.fill(0);
        r.emit(&mut header::Header::new_unchecked(&mut buf[..BINARY_LEN]))
            .map_err(PureError::widen)?;
        buf[BINARY_LEN..BINARY_LEN.saturating_add(json.len())].copy_from_slice(json.as_bytes());
        let sum = sha2::Sha256::digest(&buf);
        r.csum[..sum.len()].copy_from_slice(&sum);
        header::Header::new_unchecked(&mut buf[..BINARY_LEN]).set_csum(&r.csum);
        write(dev, Structure::Luks2Header, r.hdr_offset, &buf)?;
        // One copy at a time: a power cut leaves at least one valid copy
        // (the old one, or the new one with the higher seqid).
        flush(dev)?;
        if !secondary {
            primary = Some(r);
        }
    }
    primary.ok_or(corrupt(Luks2Problem::NoValidCopy))
}

/// Material bytes of a key slot, rounded to the 4 KiB area alignment.
fn area_len(key_bytes: u32) -> u64 {
    u64::from(key_bytes)
        .saturating_mul(u64::from(STRIPES))
        .div_ceil(AREA_ALIGN)
        .saturating_mul(AREA_ALIGN)
}

/// The lowest free, aligned area of `len` bytes in the key slots area.
fn free_area(meta: &Metadata, hdr_size: u64, len: u64) -> Option<u64> {
    let lo = hdr_size.checked_mul(2)?;
    let hi = lo.checked_add(meta.keyslots_size)?;
    let mut at = lo;
    loop {
        let end = at.checked_add(len)?;
        if end > hi {
            return None;
        }
        match meta
            .keyslots
            .iter()
            .find(|k| k.area_offset < end && at < k.area_offset.saturating_add(k.area_size))
        {
            None => return Some(at),
            Some(k) => {
                at = k
                    .area_offset
                    .checked_add(k.area_size)?
                    .checked_next_multiple_of(AREA_ALIGN)?;
            }
        }
    }
}

/// Writes a new key slot `id` for `vk` at a free area and adds it to
/// `meta` (bound to digest `digest_idx`).
#[allow(clippy::too_many_arguments)]
fn write_slot<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    meta: &mut Metadata,
    hdr_size: u64,
    id: u8,
    digest_idx: usize,
    vk: &VolumeKey,
    passphrase: &[u8],
    kdf: KdfParams,
    af_hash: HashAlg,
    encryption: &Spec,
    rng: &mut R,
) -> Result<(), Error<D::Error>> {
    let kb = vk.as_bytes().len();
    let key_size =
        u32::try_from(kb).map_err(|_| Error::Unsupported(Unsupported::KeyTooLarge(u32::MAX)))?;
    let len = area_len(key_size);
    let offset = free_area(meta, hdr_size, len).ok_or(Error::NoFreeKeySlot)?;
    let (cn, cm) = split_spec(encryption);
    let (cipher, kdf_rec) = slot_cipher(cn, cm, kb, |sk| derive_new(kdf, passphrase, sk, rng))?;
    let mut af = AfState::new(af_hash, kb, STRIPES);
    let st = Structure::KeyMaterial(id);
    write_material(dev, st, offset, &cipher, &mut af, vk, rng)?;
    // The key material is on the medium before a header names it.
    flush(dev)?;
    let ks = Keyslot {
        id,
        kind: name_from(b"luks2"),
        key_size,
        priority: 1,
        stripes: STRIPES,
        af_hash: Some(af_hash),
        area_offset: offset,
        area_size: len,
        area_encryption: encryption.clone(),
        area_key_size: key_size,
        kdf: Some(kdf_rec),
        json_offset: 0,
    };
    meta.keyslots.push(ks).map_err(|_| Error::NoFreeKeySlot)?;
    if let Some(d) = meta.digests.get_mut(digest_idx) {
        d.keyslots |= 1u32 << id;
    }
    Ok(())
}

/// Formats `dev` as a LUKS2 volume with a random volume key (or
/// `volume_key`) and `passphrase` in key slot 0. Zero-fills the header
/// area (both copies and the key slots area) first. Returns the header,
/// its JSON text and the volume key.
pub fn format<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    p: &FormatParams<'_>,
    volume_key: Option<&[u8]>,
    passphrase: &[u8],
    rng: &mut R,
) -> Result<(Luks2Header, String, VolumeKey), Error<D::Error>> {
    if !HDR_SIZES.contains(&p.hdr_size) {
        return Err(corrupt(Luks2Problem::HeaderSize(p.hdr_size)));
    }
    if p.digest_iterations == 0 {
        return Err(Error::BadParameter(BadParameter::ZeroIterations));
    }
    let kb = p.key_bytes as usize;
    // Check the cipher, key size and sector size before writing anything.
    let probe_key = [0u8; MAX_KEY_BYTES];
    let (cn, cm) = split_spec(p.cipher);
    SectorCipher::new(
        cn,
        cm,
        probe_key
            .get(..kb)
            .ok_or(Error::Unsupported(Unsupported::KeyTooLarge(p.key_bytes)))?,
        p.sector_size,
    )
    .map_err(PureError::widen)?;
    let mut spec = Spec::new();
    spec.push_str(p.cipher)
        .map_err(|_| Error::Unsupported(Unsupported::Cipher(name_from(p.cipher.as_bytes()))))?;
    let meta_end = p.hdr_size.saturating_mul(2);
    let data_offset = p.data_offset.unwrap_or(DEFAULT_DATA_OFFSET);
    let keyslots_size = match p.keyslots_size {
        Some(k) => k,
        None if data_offset == 0 => DEFAULT_DATA_OFFSET.saturating_sub(meta_end),
        None => data_offset.saturating_sub(meta_end).min(MAX_KEYSLOTS_SIZE),
    };
    let keyslots_size = (keyslots_size / AREA_ALIGN).saturating_mul(AREA_ALIGN);
    let area_end = meta_end.saturating_add(keyslots_size);
    let min_offset = meta_end.saturating_add(area_len(p.key_bytes));
    if keyslots_size < area_len(p.key_bytes)
        || (data_offset != 0 && data_offset < area_end)
        || !data_offset.is_multiple_of(u64::from(p.sector_size).max(4096))
    {
        return Err(Error::BadParameter(BadParameter::PayloadOffsetTooSmall {
            minimum: min_offset.div_ceil(512),
        }));
    }
    let vk = match volume_key {
        Some(k) if k.len() == kb => VolumeKey::from_bytes(k)
            .ok_or(Error::Unsupported(Unsupported::KeyTooLarge(p.key_bytes)))?,
        Some(k) => {
            return Err(Error::Unsupported(Unsupported::KeySize {
                cipher: name_from(p.cipher.as_bytes()),
                bytes: u32::try_from(k.len()).unwrap_or(u32::MAX),
            }))
        }
        None => {
            let mut b = Zeroizing::new([0u8; MAX_KEY_BYTES]);
            rng_fill(rng, &mut b[..kb])?;
            VolumeKey::from_bytes(&b[..kb]).ok_or(Error::Rng)?
        }
    };
    let mut salt = [0u8; SALT_LEN];
    rng_fill(rng, &mut salt)?;
    let mut digest = [0u8; 64];
    let dl = p.hash.digest_len().min(64);
    p.hash
        .pbkdf2(vk.as_bytes(), &salt, p.digest_iterations, &mut digest[..dl]);
    let mut meta = Metadata {
        keyslots: heapless::Vec::new(),
        segments: heapless::Vec::new(),
        digests: heapless::Vec::new(),
        tokens: 0,
        json_size: p.hdr_size.saturating_sub(BINARY_LEN as u64),
        keyslots_size,
        requirements: heapless::Vec::new(),
    };
    let seg = Segment {
        id: 0,
        kind: name_from(b"crypt"),
        offset: data_offset,
        size: None,
        iv_tweak: 0,
        encryption: spec.clone(),
        sector_size: p.sector_size,
        integrity: false,
        json_offset: 0,
    };
    let _ = meta.segments.push(seg);
    let dg = Digest {
        id: 0,
        keyslots: 0,
        segments: 1,
        hash: p.hash,
        iterations: p.digest_iterations,
        salt: Blob::from_bytes(&salt).ok_or(Error::Rng)?,
        digest: Blob::from_bytes(&digest[..dl]).ok_or(Error::Rng)?,
    };
    let _ = meta.digests.push(dg);
    // Zero the header area, growing a file that is too small.
    let need = area_end.max(data_offset);
    let size = dev_size(dev)?;
    if size < need {
        let grown = dev.set_size(need).map_err(|source| Error::Io {
            source,
            structure: Structure::Device,
            offset: 0,
        })?;
        if !grown && dev_size(dev)? < need {
            return Err(Error::TooSmall {
                structure: Structure::Luks2Header,
                needed: need,
                size,
            });
        }
    }
    dev.write_zeroes(0, area_end).map_err(|source| Error::Io {
        source,
        structure: Structure::Luks2Header,
        offset: 0,
    })?;
    write_slot(
        dev, &mut meta, p.hdr_size, 0, 0, &vk, passphrase, p.kdf, p.hash, &spec, rng,
    )?;
    let mut u = [0u8; 16];
    rng_fill(rng, &mut u)?;
    let mut label = header::Label::new();
    for c in p.label.chars().take(47) {
        let _ = label.push(c);
    }
    let template = HeaderRepr {
        secondary: false,
        hdr_size: p.hdr_size,
        seqid: 1,
        label,
        checksum_alg: name_from(b"sha256"),
        salt: [0; 64],
        uuid: uuid_v4(u),
        subsystem: header::Label::new(),
        hdr_offset: 0,
        csum: [0; 64],
    };
    let text = emit_json(
        &meta,
        &Kept {
            tokens: String::from("{}"),
            config_extra: String::new(),
        },
    );
    let meta = reparse(&text, p.hdr_size)?;
    let hdr = write_headers(dev, &template, 1, &text, rng)?;
    let json_len = text.len();
    Ok((
        Luks2Header {
            hdr,
            meta,
            json_len,
            primary_ok: true,
            secondary: Some(p.hdr_size),
        },
        text,
        vk,
    ))
}

/// The metadata as a reader will see it: the emitted text parsed and
/// checked like any header's (a writer bug is an error before anything is
/// written, and offsets in later errors point into the new text).
fn reparse<E>(text: &str, hdr_size: u64) -> Result<Metadata, Error<E>> {
    Metadata::parse(text.as_bytes(), hdr_size, BINARY_LEN as u64).map_err(PureError::widen)
}

/// Refuses to rewrite metadata this writer would not reproduce exactly.
fn check_modifiable<E>(h: &Luks2Header) -> Result<(), Error<E>> {
    super::check_requirements(&h.meta)?;
    for k in &h.meta.keyslots {
        if k.kind != "luks2" || !matches!(k.kdf, Some(Kdf::Pbkdf2 { .. } | Kdf::Argon2 { .. })) {
            return Err(Error::Unsupported(Unsupported::Luks2Type(k.kind.clone())));
        }
    }
    for s in &h.meta.segments {
        if s.kind != "crypt" || s.integrity {
            return Err(Error::Unsupported(Unsupported::Luks2Type(s.kind.clone())));
        }
    }
    Ok(())
}

/// Re-reads nothing: rebuilds `h` after a metadata update.
fn updated(h: &mut Luks2Header, hdr: HeaderRepr, meta: Metadata, text: &str) {
    h.hdr = hdr;
    h.meta = meta;
    h.json_len = text.len();
    h.primary_ok = true;
    h.secondary = Some(h.hdr.hdr_size);
}

/// Adds `passphrase` in a free key slot (the lowest id, or `slot`) for
/// volume key `vk`, which must be the data segment's key. `json` is the
/// header's current JSON text (tokens and config flags are kept from it).
/// Returns the new JSON text and the key slot id.
#[allow(clippy::too_many_arguments)]
pub fn add_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    h: &mut Luks2Header,
    json: &[u8],
    vk: &VolumeKey,
    passphrase: &[u8],
    kdf: KdfParams,
    slot: Option<u8>,
    rng: &mut R,
) -> Result<(String, u8), Error<D::Error>> {
    check_modifiable(h)?;
    let seg = h
        .meta
        .data_segment()
        .ok_or(corrupt(Luks2Problem::Missing("segments")))?;
    let seg_bit = 1u32 << (seg.id & 31);
    let encryption = seg.encryption.clone();
    let didx = h
        .meta
        .digests
        .iter()
        .position(|d| d.segments & seg_bit != 0 && super::digest_matches(d, vk.as_bytes()))
        .ok_or(Error::WrongPassphrase)?;
    let used = |i: u8| h.meta.keyslots.iter().any(|k| k.id == i);
    let id = match slot {
        Some(s) if usize::from(s) >= MAX_KEYSLOTS => {
            return Err(Error::BadParameter(BadParameter::KeySlotIndex(s)))
        }
        Some(s) if used(s) => return Err(Error::NoFreeKeySlot),
        Some(s) => s,
        None => (0..32u8).find(|&i| !used(i)).ok_or(Error::NoFreeKeySlot)?,
    };
    let af_hash = h
        .meta
        .keyslots
        .iter()
        .find_map(|k| k.af_hash)
        .unwrap_or(HashAlg::Sha256);
    let mut meta = h.meta.clone();
    write_slot(
        dev,
        &mut meta,
        h.hdr.hdr_size,
        id,
        didx,
        vk,
        passphrase,
        kdf,
        af_hash,
        &encryption,
        rng,
    )?;
    let text = emit_json(&meta, &kept(json, None));
    let seqid = h.hdr.seqid.saturating_add(1);
    let meta = reparse(&text, h.hdr.hdr_size)?;
    let hdr = write_headers(dev, &h.hdr, seqid, &text, rng)?;
    updated(h, hdr, meta, &text);
    Ok((text, id))
}

/// Removes key slot `slot`: writes the header without it (both copies,
/// `seqid` + 1), then overwrites its area with zeroes. Refuses to remove
/// the last key slot bound to the data segment unless `force`. Returns
/// the new JSON text.
pub fn remove_key<D: BlockIo + ?Sized, R: TryCryptoRng + ?Sized>(
    dev: &mut D,
    h: &mut Luks2Header,
    json: &[u8],
    slot: u8,
    force: bool,
    rng: &mut R,
) -> Result<String, Error<D::Error>> {
    check_modifiable(h)?;
    let idx = h
        .meta
        .keyslots
        .iter()
        .position(|k| k.id == slot)
        .ok_or(Error::KeySlotNotActive(slot))?;
    let bound = h
        .meta
        .keyslots
        .iter()
        .filter(|k| super::is_bound(&h.meta, k.id))
        .count();
    if super::is_bound(&h.meta, slot) && bound <= 1 && !force {
        return Err(Error::LastKeySlot(slot));
    }
    let mut meta = h.meta.clone();
    let ks = meta.keyslots.remove(idx);
    for d in meta.digests.iter_mut() {
        d.keyslots &= !(1u32 << (slot & 31));
    }
    let text = emit_json(&meta, &kept(json, Some(slot)));
    let seqid = h.hdr.seqid.saturating_add(1);
    let meta = reparse(&text, h.hdr.hdr_size)?;
    let hdr = write_headers(dev, &h.hdr, seqid, &text, rng)?;
    updated(h, hdr, meta, &text);
    // Explicit zero writes: a hole could leave the old bytes on the medium.
    let zero = [0u8; CHUNK];
    let mut at = ks.area_offset;
    let stop = ks.area_offset.saturating_add(ks.area_size);
    while at < stop {
        let n = io::chunk_len(stop.saturating_sub(at), CHUNK);
        write(dev, Structure::KeyMaterial(slot), at, &zero[..n])?;
        at = at.saturating_add(n as u64);
    }
    dev.flush().map_err(|source| Error::Io {
        source,
        structure: Structure::Device,
        offset: 0,
    })?;
    Ok(text)
}
