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

#![warn(clippy::arithmetic_side_effects)]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use rand_core::TryCryptoRng;
use zeroize::Zeroizing;

use super::header::{self, HeaderRepr, BINARY_LEN, HDR_SIZES};
use super::json::{self, base64_encode};
use super::meta::{Blob, Digest, Kdf, Keyslot, Metadata, Segment, Spec, MAX_KEYSLOTS};
use super::{split_spec, Argon2Block, Luks2Header};
use crate::cipher::{SectorCipher, MAX_KEY_BYTES};
use crate::error::{
    name_from, BadParameter, Error, Luks2Problem, Problem, PureError, Structure, Unsupported,
};
use crate::hash::HashAlg;
use crate::io::{self, BlockIo};
use crate::luks1::af::AfState;
use crate::luks1::{
    dev_size, flush_dev as flush, rng_fill, slot_cipher, uuid_v4, write, write_material, VolumeKey,
};

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

fn b64(data: &[u8]) -> String {
    let mut out = vec![0u8; data.len().div_ceil(3).saturating_mul(4)];
    let n = base64_encode(data, &mut out).unwrap_or(0);
    out.truncate(n);
    String::from_utf8(out).unwrap_or_default()
}

fn ids(mask: u32) -> String {
    let mut s = String::from("[");
    let mut first = true;
    for i in 0..32u32 {
        if mask & (1u32 << i) != 0 {
            if !first {
                s.push(',');
            }
            first = false;
            let _ = write!(s, "\"{i}\"");
        }
    }
    s.push(']');
    s
}

/// Raw JSON kept from an existing header: the `tokens` object and config
/// members other than the sizes.
#[derive(Debug, Clone, Default)]
struct Kept {
    tokens: String,
    config_extra: String,
}

/// What to keep from `text`; `removed` is a key slot being removed, whose
/// id is taken out of every token's `keyslots` (as cryptsetup does).
fn kept(text: &[u8], removed: Option<u8>) -> Kept {
    let mut k = Kept {
        tokens: String::from("{}"),
        config_extra: String::new(),
    };
    let Ok(root) = json::document(text) else {
        return k;
    };
    let raw = |v: json::Val| {
        text.get(v.start..v.end)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    };
    if let Some(t) = json::get(text, root, "tokens") {
        k.tokens = match removed {
            None => String::from(raw(t)),
            Some(slot) => {
                // Each token as it was, but its key slot list without `slot`.
                let mut out = String::from("{");
                for (i, (id, tok)) in json::Members::new(text, t).enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let id = core::str::from_utf8(id).unwrap_or("");
                    let _ = write!(out, "\"{id}\":{{");
                    for (j, (name, v)) in json::Members::new(text, tok).enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        let name_s = core::str::from_utf8(name).unwrap_or("");
                        if name == b"keyslots" {
                            let mask = json::Elements::new(text, v)
                                .filter_map(|e| json::u64_str_of(text, e))
                                .filter(|&n| n < 32 && n != u64::from(slot))
                                .fold(0u32, |m, n| m | (1u32 << n));
                            let _ = write!(out, "\"keyslots\":{}", ids(mask));
                        } else {
                            let _ = write!(out, "\"{name_s}\":{}", raw(v));
                        }
                    }
                    out.push('}');
                }
                out.push('}');
                out
            }
        };
    }
    if let Some(c) = json::get(text, root, "config") {
        for (name, v) in json::Members::new(text, c) {
            if name == b"json_size" || name == b"keyslots_size" {
                continue;
            }
            let name = core::str::from_utf8(name).unwrap_or("");
            let _ = write!(k.config_extra, ",\"{name}\":{}", raw(v));
        }
    }
    k
}

/// The JSON text of `meta`.
fn emit_json(meta: &Metadata, kept: &Kept) -> String {
    let mut s = String::from("{\"keyslots\":{");
    let mut slots: Vec<&Keyslot> = meta.keyslots.iter().collect();
    slots.sort_by_key(|k| k.id);
    for (i, k) in slots.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let af_hash = k.af_hash.map_or("sha256", HashAlg::name);
        let _ = write!(
            s,
            "\"{}\":{{\"type\":\"luks2\",\"key_size\":{},\"af\":{{\"type\":\"luks1\",\"stripes\":{},\"hash\":\"{af_hash}\"}},\"area\":{{\"type\":\"raw\",\"offset\":\"{}\",\"size\":\"{}\",\"encryption\":\"{}\",\"key_size\":{}}},\"kdf\":",
            k.id, k.key_size, k.stripes, k.area_offset, k.area_size, k.area_encryption, k.area_key_size
        );
        match &k.kdf {
            Some(Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            }) => {
                let _ = write!(
                    s,
                    "{{\"type\":\"pbkdf2\",\"hash\":\"{}\",\"iterations\":{iterations},\"salt\":\"{}\"}}",
                    hash.name(),
                    b64(salt.as_bytes())
                );
            }
            Some(Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                salt,
            }) => {
                let t = if *id { "argon2id" } else { "argon2i" };
                let _ = write!(
                    s,
                    "{{\"type\":\"{t}\",\"time\":{time},\"memory\":{memory_kib},\"cpus\":{cpus},\"salt\":\"{}\"}}",
                    b64(salt.as_bytes())
                );
            }
            _ => s.push_str("{}"),
        }
        if k.priority != 1 {
            let _ = write!(s, ",\"priority\":{}", k.priority);
        }
        s.push('}');
    }
    let _ = write!(s, "}},\"tokens\":{},\"segments\":{{", kept.tokens);
    for (i, g) in meta.segments.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let size = g.size.map_or(String::from("dynamic"), |n| {
            let mut t = String::new();
            let _ = write!(t, "{n}");
            t
        });
        let _ = write!(
            s,
            "\"{}\":{{\"type\":\"crypt\",\"offset\":\"{}\",\"size\":\"{size}\",\"iv_tweak\":\"{}\",\"encryption\":\"{}\",\"sector_size\":{}}}",
            g.id, g.offset, g.iv_tweak, g.encryption, g.sector_size
        );
    }
    s.push_str("},\"digests\":{");
    for (i, d) in meta.digests.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "\"{}\":{{\"type\":\"pbkdf2\",\"keyslots\":{},\"segments\":{},\"hash\":\"{}\",\"iterations\":{},\"salt\":\"{}\",\"digest\":\"{}\"}}",
            d.id,
            ids(d.keyslots),
            ids(d.segments),
            d.hash.name(),
            d.iterations,
            b64(d.salt.as_bytes()),
            b64(d.digest.as_bytes())
        );
    }
    let _ = write!(
        s,
        "}},\"config\":{{\"json_size\":\"{}\",\"keyslots_size\":\"{}\"{}}}}}",
        meta.json_size, meta.keyslots_size, kept.config_extra
    );
    s
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

/// Derives a key slot key with `kdf` (fresh salt) and returns the slot's
/// KDF record.
fn derive_new<E, R: TryCryptoRng + ?Sized>(
    kdf: KdfParams,
    passphrase: &[u8],
    out: &mut [u8],
    rng: &mut R,
) -> Result<Kdf, Error<E>> {
    let mut salt = [0u8; SALT_LEN];
    rng_fill(rng, &mut salt)?;
    let blob = Blob::from_bytes(&salt).ok_or(Error::Rng)?;
    match kdf {
        KdfParams::Pbkdf2 { hash, iterations } => {
            if iterations == 0 {
                return Err(Error::BadParameter(BadParameter::ZeroIterations));
            }
            hash.pbkdf2(passphrase, &salt, iterations, out);
            Ok(Kdf::Pbkdf2 {
                hash,
                iterations,
                salt: blob,
            })
        }
        KdfParams::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
        } => {
            let params = argon2::Params::new(memory_kib, time, cpus, Some(out.len()))
                .map_err(|_| corrupt(Luks2Problem::BadValue("kdf")))?;
            let mut mem = vec![Argon2Block::new(); params.block_count()];
            let alg = if id {
                argon2::Algorithm::Argon2id
            } else {
                argon2::Algorithm::Argon2i
            };
            let r = argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password_into_with_memory(passphrase, &salt, out, &mut mem[..]);
            for b in &mut mem {
                zeroize::Zeroize::zeroize(b);
            }
            r.map_err(|_| corrupt(Luks2Problem::BadValue("kdf")))?;
            Ok(Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                salt: blob,
            })
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

/// How much longer cryptsetup's Argon2 (libargon2) takes than qimg's for
/// the same cost, in percent: calibration counts cryptsetup's time, the
/// time `iter-time` is meant for (the volume is opened by cryptsetup), so
/// each run qimg times is scaled by this.
///
/// Measured on the 2-core development machine (x86-64, AVX-512; argon2
/// 0.6 with its AVX2 compression and lanes on threads; Debian's
/// libargon2 1 under cryptsetup 2.6.1), December 2026: unlocking one
/// cryptsetup-made volume (argon2id, t=4, m=512 MiB, p=2), CPU time
/// (user + sys) qimg 2.15 s / 2.02 s, `cryptsetup open --test-passphrase`
/// 2.54 s / 2.39 s: 1.18x. `cargo xtask kdf-compare` prints the ratio
/// measured on the machine it runs on (`speed cs/q`).
pub const CRYPTSETUP_ARGON2_TIME_PERCENT: u64 = 118;

/// Milliseconds cryptsetup would take for what took qimg `ms`.
fn as_cryptsetup_ms(ms: u64) -> u64 {
    ms.saturating_mul(CRYPTSETUP_ARGON2_TIME_PERCENT) / 100
}

/// Argon2 passes that take cryptsetup about `target_ms` with `memory_kib`
/// and `cpus` (at least 4, cryptsetup's minimum): times one pass with
/// `elapsed_ms`, a clock the caller provides (milliseconds since any fixed
/// point), scaled by [`CRYPTSETUP_ARGON2_TIME_PERCENT`].
pub fn calibrate_argon2<E>(
    id: bool,
    memory_kib: u32,
    cpus: u32,
    target_ms: u32,
    mut elapsed_ms: impl FnMut() -> u64,
) -> Result<u32, Error<E>> {
    /// cryptsetup's minimum Argon2 time cost.
    const MIN: u32 = 4;
    let mut out = [0u8; 32];
    let t0 = elapsed_ms();
    derive_new::<E, _>(
        KdfParams::Argon2 {
            id,
            time: 1,
            memory_kib,
            cpus,
        },
        b"calibration",
        &mut out,
        &mut FixedRng,
    )?;
    let per_pass = as_cryptsetup_ms(elapsed_ms().saturating_sub(t0)).max(1);
    Ok(
        u32::try_from(u64::from(target_ms).checked_div(per_pass).unwrap_or(0))
            .unwrap_or(u32::MAX)
            .max(MIN),
    )
}

/// Argon2 cost `(time, memory_kib)` that takes about `target_ms` with
/// `cpus` lanes and at most `max_memory_kib`, chosen the way cryptsetup
/// 2.6.1 chooses it (`crypt_argon2_check`): start at time 4 and 32 KiB,
/// grow memory (then time) until the fastest of up to three runs takes at least
/// 250 ms, then scale toward the target, memory first when growing and
/// time first when shrinking, never below time 4 (memory is reduced
/// instead), re-measuring until a run lands within 95-110 % of the target
/// (at most 8 rounds). Times are cryptsetup's: each run's is scaled by
/// [`CRYPTSETUP_ARGON2_TIME_PERCENT`]. `elapsed_ms` is a clock the caller provides;
/// cryptsetup reads wall time (`CLOCK_MONOTONIC_RAW`) here, since the
/// lanes run on threads.
///
/// With the `std` feature the lanes run in parallel (argon2's `parallel`
/// feature), as libargon2 runs them for cryptsetup; single-threaded, two
/// lanes took twice cryptsetup's time per pass on the development machine
/// (2 cores) and calibration chose half its memory.
pub fn calibrate_argon2_params<E>(
    id: bool,
    max_memory_kib: u32,
    cpus: u32,
    target_ms: u32,
    mut elapsed_ms: impl FnMut() -> u64,
) -> Result<(u32, u32), Error<E>> {
    /// cryptsetup's minimum Argon2 time cost.
    const MIN_T: u32 = 4;
    /// First-phase goal: a run long enough to scale from.
    const BENCH_MIN_MS: u64 = 250;
    /// Rounds of the second phase before settling for the last estimate.
    const ROUNDS: u32 = 8;
    let cpus = cpus.max(1);
    let min_m = 32u32.max(cpus.saturating_mul(8));
    let max_m = max_memory_kib.max(min_m);
    let target = u64::from(target_ms.max(1));
    let mut measure = |t: u32, m: u32| -> Result<u64, Error<E>> {
        let mut out = [0u8; 32];
        let t0 = elapsed_ms();
        derive_new::<E, _>(
            KdfParams::Argon2 {
                id,
                time: t,
                memory_kib: m,
                cpus,
            },
            b"calibration",
            &mut out,
            &mut FixedRng,
        )?;
        Ok(as_cryptsetup_ms(elapsed_ms().saturating_sub(t0)))
    };
    /// cryptsetup's runs per first-phase measurement (the fastest counts).
    const FAST_SAMPLES: u32 = 3;
    let (mut t, mut m) = (MIN_T, min_m);
    let mut ms;
    loop {
        ms = measure(t, m)?;
        for _ in 1..FAST_SAMPLES {
            if ms >= BENCH_MIN_MS {
                break; // long enough already: cryptsetup stops sampling too
            }
            ms = ms.min(measure(t, m)?);
        }
        if ms >= BENCH_MIN_MS {
            break;
        }
        let f = u32::try_from(BENCH_MIN_MS.div_ceil(ms.max(1)).min(256)).unwrap_or(256);
        if m == max_m {
            if t >= 1 << 20 {
                break; // a clock that never moves: stop growing
            }
            t = t.saturating_mul(f);
        } else {
            m = m.saturating_mul(f).min(max_m);
        }
    }
    // Scaled costs in u128: (u32 * u32 * u32) / u64 cannot overflow it.
    let scale = |a: u32, b: u32, num: u64, den: u64| -> u32 {
        let v = u128::from(a)
            .saturating_mul(u128::from(b))
            .saturating_mul(u128::from(num))
            .checked_div(u128::from(den.max(1)))
            .unwrap_or(0);
        u32::try_from(v).unwrap_or(u32::MAX)
    };
    for _ in 0..ROUNDS {
        let ms1 = ms.max(1);
        let pinned;
        if ms1 > target {
            let nt = scale(t, 1, target, ms1);
            if nt < MIN_T {
                m = scale(t, m, target, u64::from(MIN_T).saturating_mul(ms1)).max(min_m);
                t = MIN_T;
                pinned = m == min_m;
            } else {
                t = nt;
                pinned = false;
            }
        } else {
            let nm = scale(m, 1, target, ms1);
            if nm > max_m {
                t = scale(t, m, target, u64::from(max_m).saturating_mul(ms1)).max(MIN_T);
                m = max_m;
                pinned = t == MIN_T;
            } else {
                m = nm.max(min_m);
                pinned = m == min_m;
            }
        }
        if pinned {
            break;
        }
        ms = measure(t, m)?;
        let pct = u128::from(ms)
            .saturating_mul(100)
            .checked_div(u128::from(target))
            .unwrap_or(0);
        if (95..=110).contains(&pct) {
            break;
        }
    }
    Ok((t, m))
}

/// A constant salt source for calibration only (the result is discarded).
struct FixedRng;

impl rand_core::TryRng for FixedRng {
    type Error = core::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(0x5a5a_5a5a)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(0x5a5a_5a5a_5a5a_5a5a)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.fill(0x5a);
        Ok(())
    }
}

impl TryCryptoRng for FixedRng {}
