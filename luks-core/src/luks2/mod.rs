//! LUKS2: the two binary header copies, the JSON metadata, and unlocking
//! key slots (PBKDF2, Argon2i, Argon2id).
//!
//! Nothing on the read and unlock path allocates: the JSON text goes into
//! a buffer the caller provides, the metadata into fixed-capacity values
//! ([`Metadata`]), Argon2 works in memory blocks the caller provides (so
//! firmware can hand over pages), and key material streams through a
//! 4 KiB buffer.
//!
//! Header selection: each copy is valid when its magic, version, size,
//! offset and checksum are; the primary is at 0, the secondary at the
//! primary's size or, when the primary is damaged, found by probing
//! [`HDR_SIZES`]. Of two valid copies the one with the higher `seqid`
//! wins; if its JSON does not parse, the other is used.

pub mod header;
pub(crate) mod json;
pub mod meta;
#[cfg(feature = "alloc")]
pub mod write;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

pub use header::{Header, HeaderRepr, BINARY_LEN, HDR_SIZES};
pub use meta::{Digest, Kdf, Keyslot, Metadata, Segment};

use crate::cipher::SectorCipher;
use crate::error::{
    name_from, BadParameter, Error, Luks2Problem, Problem, PureError, Structure, Unsupported,
};
use crate::hash::{HashAlg, MAX_DIGEST_LEN};
use crate::io::{self, BlockIo};
use crate::luks1::af::AfState;
use crate::luks1::VolumeKey;

/// An Argon2 memory block (1 KiB); callers provide `memory_kib` of them.
pub use argon2::Block as Argon2Block;

/// Bytes read per device request while hashing and reading key material.
const CHUNK: usize = 4096;
/// The longest JSON text any header holds: the JSON area of the largest
/// header copy (4 MiB) less the binary header. A `json` buffer this long
/// reads every valid header; smaller ones read the headers whose text
/// fits (cryptsetup's default 16 KiB copy needs at most 12 KiB).
pub const MAX_JSON_LEN: usize = 0x40_0000 - BINARY_LEN;

/// A parsed, checksum-verified LUKS2 header: the copy in use, its metadata,
/// and whether each copy was valid.
#[derive(Debug, Clone)]
pub struct Luks2Header {
    /// The binary header of the copy in use.
    pub hdr: HeaderRepr,
    /// Its metadata.
    pub meta: Metadata,
    /// Length of its JSON text in the caller's buffer.
    pub json_len: usize,
    /// Whether the primary copy was valid.
    pub primary_ok: bool,
    /// Whether the secondary copy was valid (and where it was).
    pub secondary: Option<u64>,
}

/// Whether the first bytes of a device carry a LUKS2 primary header
/// (magic and version 2), without validating anything else.
pub fn probe(first_bytes: &[u8]) -> bool {
    first_bytes.get(..6) == Some(&header::MAGIC_PRIMARY[..])
        && first_bytes.get(6..8) == Some(&[0, 2][..])
}

/// The LUKS version in the first bytes of a device (1 or 2), if any.
pub fn version(first_bytes: &[u8]) -> Option<u16> {
    if first_bytes.get(..6) != Some(&header::MAGIC_PRIMARY[..]) {
        return None;
    }
    let v = u16::from_be_bytes([*first_bytes.get(6)?, *first_bytes.get(7)?]);
    matches!(v, 1 | 2).then_some(v)
}

fn read<D: BlockIo + ?Sized>(
    dev: &mut D,
    structure: Structure,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Error<D::Error>> {
    crate::luks1::read(dev, structure, offset, buf)
}

/// A streaming checksum by the header's algorithm name.
enum Csum {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Csum {
    fn new(name: &str) -> Option<Self> {
        use digest::Digest as _;
        Some(match HashAlg::from_name(name).ok()? {
            HashAlg::Sha1 => Self::Sha1(sha1::Sha1::new()),
            HashAlg::Sha256 => Self::Sha256(sha2::Sha256::new()),
            HashAlg::Sha512 => Self::Sha512(sha2::Sha512::new()),
            _ => return None,
        })
    }
    fn update(&mut self, b: &[u8]) {
        use digest::Digest as _;
        match self {
            Self::Sha1(h) => h.update(b),
            Self::Sha256(h) => h.update(b),
            Self::Sha512(h) => h.update(b),
        }
    }
    /// Writes the digest into the first bytes of a zeroed 64-byte array.
    fn finish(self) -> [u8; 64] {
        use digest::Digest as _;
        let mut out = [0u8; 64];
        let mut put = |d: &[u8]| out[..d.len()].copy_from_slice(d);
        match self {
            Self::Sha1(h) => put(&h.finalize()),
            Self::Sha256(h) => put(&h.finalize()),
            Self::Sha512(h) => put(&h.finalize()),
        }
        out
    }
}

/// The checksum of a header copy at `at`: binary header (checksum field
/// zeroed) then the JSON area. `bin` holds the binary header.
fn checksum<D: BlockIo + ?Sized>(
    dev: &mut D,
    repr: &HeaderRepr,
    bin: &[u8; BINARY_LEN],
    at: u64,
) -> Result<Option<[u8; 64]>, Error<D::Error>> {
    let Some(mut h) = Csum::new(&repr.checksum_alg) else {
        return Ok(None);
    };
    let mut first = *bin;
    first[header::field::CSUM].fill(0);
    h.update(&first);
    let mut buf = [0u8; CHUNK];
    let mut done = BINARY_LEN as u64;
    while done < repr.hdr_size {
        let n = io::chunk_len(repr.hdr_size.saturating_sub(done), CHUNK);
        read(
            dev,
            Structure::Luks2Json,
            at.saturating_add(done),
            &mut buf[..n],
        )?;
        h.update(&buf[..n]);
        done = done.saturating_add(n as u64);
    }
    Ok(Some(h.finish()))
}

/// Reads and verifies the header copy at `at`: `Ok(Err(problem))` when it
/// is not a valid copy.
fn read_copy<D: BlockIo + ?Sized>(
    dev: &mut D,
    at: u64,
    dev_size: u64,
    secondary: bool,
) -> Result<Result<HeaderRepr, PureError>, Error<D::Error>> {
    if at.saturating_add(BINARY_LEN as u64) > dev_size {
        return Ok(Err(PureError::TooSmall {
            structure: Structure::Luks2Header,
            needed: at.saturating_add(BINARY_LEN as u64),
            size: dev_size,
        }));
    }
    let mut bin = [0u8; BINARY_LEN];
    read(dev, Structure::Luks2Header, at, &mut bin)?;
    let repr = match HeaderRepr::parse(&Header::new_unchecked(&bin[..]), at) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let bad = |off: usize, p| {
        Ok(Err(PureError::corrupt(
            Structure::Luks2Header,
            at.saturating_add(off as u64),
            Problem::Luks2(p),
        )))
    };
    if repr.secondary != secondary {
        return Ok(Err(PureError::corrupt(
            Structure::Luks2Header,
            at,
            Problem::BadMagic,
        )));
    }
    if repr.hdr_offset != at {
        return bad(
            header::field::HDR_OFFSET.start,
            Luks2Problem::HeaderOffset(repr.hdr_offset),
        );
    }
    if at.saturating_add(repr.hdr_size) > dev_size {
        return Ok(Err(PureError::TooSmall {
            structure: Structure::Luks2Json,
            needed: at.saturating_add(repr.hdr_size),
            size: dev_size,
        }));
    }
    match checksum(dev, &repr, &bin, at)? {
        None => Ok(Err(PureError::Unsupported(Unsupported::Hash(
            repr.checksum_alg.clone(),
        )))),
        Some(c) if bool::from(c.ct_eq(&repr.csum)) => Ok(Ok(repr)),
        Some(_) => bad(header::field::CSUM.start, Luks2Problem::Checksum),
    }
}

/// Reads the JSON text of a verified copy into `json` and parses it.
fn read_meta<D: BlockIo + ?Sized>(
    dev: &mut D,
    repr: &HeaderRepr,
    json: &mut [u8],
) -> Result<(Metadata, usize), Error<D::Error>> {
    let base = repr.hdr_offset.saturating_add(BINARY_LEN as u64);
    let area = repr.hdr_size.saturating_sub(BINARY_LEN as u64);
    let mut buf = [0u8; CHUNK];
    let mut done = 0u64;
    let mut len: Option<usize> = None;
    // As cryptsetup, everything after the text's NUL is NUL too: the whole
    // area is read (bounded by the header size).
    let stray = |at: u64, chunk: &[u8]| {
        chunk.iter().position(|&c| c != 0).map(|p| {
            Error::corrupt(
                Structure::Luks2Json,
                base.saturating_add(at).saturating_add(p as u64),
                Problem::Luks2(Luks2Problem::BadValue("non-NUL bytes after the JSON text")),
            )
        })
    };
    while done < area {
        let n = io::chunk_len(area.saturating_sub(done), CHUNK);
        read(
            dev,
            Structure::Luks2Json,
            base.saturating_add(done),
            &mut buf[..n],
        )?;
        if len.is_some() {
            if let Some(e) = stray(done, &buf[..n]) {
                return Err(e);
            }
            done = done.saturating_add(n as u64);
            continue;
        }
        let nul = buf[..n].iter().position(|&c| c == 0);
        if let Some(p) = nul {
            if let Some(e) = stray(done.saturating_add(p as u64), &buf[p..n]) {
                return Err(e);
            }
        }
        let take = nul.unwrap_or(n);
        let at = usize::try_from(done).unwrap_or(usize::MAX);
        let given = json.len();
        let dst = json
            .get_mut(at..at.saturating_add(take))
            .ok_or(Error::BufferTooSmall {
                structure: Structure::Luks2Json,
                needed: usize::try_from(area).unwrap_or(usize::MAX),
                given,
            })?;
        dst.copy_from_slice(&buf[..take]);
        if nul.is_some() {
            len = Some(at.saturating_add(take));
        }
        done = done.saturating_add(n as u64);
    }
    let len = len.ok_or(Error::corrupt(
        Structure::Luks2Json,
        base,
        Problem::Luks2(Luks2Problem::JsonUnterminated),
    ))?;
    let meta = Metadata::parse(&json[..len], repr.hdr_size, base).map_err(PureError::widen)?;
    Ok((meta, len))
}

/// Reads both header copies of `dev`, verifies their checksums, picks the
/// newer valid one and parses its JSON metadata into `json` (which must
/// hold the JSON text; 16 KiB covers cryptsetup's default metadata size,
/// the copy's size covers every case).
pub fn read_header<D: BlockIo + ?Sized>(
    dev: &mut D,
    json: &mut [u8],
) -> Result<Luks2Header, Error<D::Error>> {
    let size = crate::luks1::dev_size(dev)?;
    let primary = read_copy(dev, 0, size, false)?;
    let mut secondary: Option<(u64, HeaderRepr)> = None;
    let mut sec_err: Option<PureError> = None;
    match &primary {
        Ok(p) => match read_copy(dev, p.hdr_size, size, true)? {
            Ok(s) => secondary = Some((p.hdr_size, s)),
            Err(e) => sec_err = Some(e),
        },
        Err(_) => {
            for at in HDR_SIZES {
                match read_copy(dev, at, size, true)? {
                    Ok(s) if s.hdr_size == at => {
                        secondary = Some((at, s));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if sec_err.is_none() {
                            sec_err = Some(e);
                        }
                    }
                }
            }
        }
    }
    let primary_ok = primary.is_ok();
    let sec_at = secondary.as_ref().map(|(at, _)| *at);
    // Candidates in order of preference.
    let (first, second) = match (primary, secondary) {
        (Ok(p), Some((_, s))) => {
            if s.seqid > p.seqid {
                (s, Some(p))
            } else {
                (p, Some(s))
            }
        }
        (Ok(p), None) => (p, None),
        (Err(_), Some((_, s))) => (s, None),
        (Err(e), None) => {
            // Report the primary's own problem: it says most.
            let _ = sec_err;
            return Err(e.widen());
        }
    };
    match read_meta(dev, &first, json) {
        Ok((meta, json_len)) => Ok(Luks2Header {
            hdr: first,
            meta,
            json_len,
            primary_ok,
            secondary: sec_at,
        }),
        Err(e) => match second {
            Some(other) => {
                let (meta, json_len) = read_meta(dev, &other, json)?;
                Ok(Luks2Header {
                    hdr: other,
                    meta,
                    json_len,
                    primary_ok,
                    secondary: sec_at,
                })
            }
            None => Err(e),
        },
    }
}

/// Splits `aes-xts-plain64` into (`aes`, `xts-plain64`).
pub fn split_spec(spec: &str) -> (&str, &str) {
    spec.split_once('-').unwrap_or((spec, ""))
}

/// Argon2 memory blocks key slot `ks` needs (`None` for PBKDF2 slots or
/// invalid parameters).
pub fn argon2_blocks(ks: &Keyslot) -> Option<usize> {
    match &ks.kdf {
        Some(Kdf::Argon2 {
            time,
            memory_kib,
            cpus,
            ..
        }) => argon2::Params::new(*memory_kib, *time, *cpus, None)
            .ok()
            .map(|p| p.block_count()),
        _ => None,
    }
}

/// The most Argon2 work (time cost x memory in KiB) qimg runs for a key
/// slot: 2^28, 256 passes over 1 GiB. cryptsetup here picks about 4 passes
/// over 150-180 MiB for a 2-second `iter-time`, so 2^28 is roughly 90 times
/// what it picks at 10 seconds (about a quarter of an hour); a time cost of
/// 2^32-1 is far above it and is refused.
pub const MAX_ARGON2_WORK: u64 = 1 << 28;

/// Derives the key slot key into `out` (area key size bytes).
fn derive<E>(
    ks: &Keyslot,
    passphrase: &[u8],
    out: &mut [u8],
    mem: &mut [Argon2Block],
) -> Result<(), Error<E>> {
    let bad = |m: &'static str| {
        Error::corrupt(
            Structure::Luks2Json,
            ks.json_offset,
            Problem::Luks2(Luks2Problem::BadValue(m)),
        )
    };
    match &ks.kdf {
        Some(Kdf::Pbkdf2 {
            hash,
            iterations,
            salt,
        }) => {
            if *iterations == 0 {
                return Err(bad("iterations"));
            }
            crate::luks1::iterations::check_iterations(
                Structure::Luks2Json,
                ks.json_offset,
                "iterations",
                *iterations,
            )?;
            hash.pbkdf2(passphrase, salt.as_bytes(), *iterations, out);
            Ok(())
        }
        Some(Kdf::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
            salt,
        }) => {
            let work = u64::from(*time).saturating_mul(u64::from(*memory_kib));
            if work > MAX_ARGON2_WORK {
                return Err(Error::corrupt(
                    Structure::Luks2Json,
                    ks.json_offset,
                    Problem::KdfCost {
                        what: "argon2 time x memory (KiB)",
                        value: work,
                        ceiling: MAX_ARGON2_WORK,
                    },
                ));
            }
            let params = argon2::Params::new(*memory_kib, *time, *cpus, Some(out.len()))
                .map_err(|_| bad("kdf"))?;
            let blocks = params.block_count();
            let Some(m) = mem.get_mut(..blocks) else {
                return Err(Error::KdfMemory {
                    slot: ks.id,
                    needed_kib: blocks as u64,
                    given_kib: mem.len() as u64,
                });
            };
            let alg = if *id {
                argon2::Algorithm::Argon2id
            } else {
                argon2::Algorithm::Argon2i
            };
            let r = argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password_into_with_memory(passphrase, salt.as_bytes(), out, &mut *m);
            for b in m.iter_mut() {
                b.zeroize();
            }
            r.map_err(|_| bad("kdf"))
        }
        Some(Kdf::Other(name)) => Err(Error::Unsupported(Unsupported::Luks2Type(name.clone()))),
        None => Err(Error::Unsupported(Unsupported::Luks2Type(ks.kind.clone()))),
    }
}

/// Whether `key` matches digest `d` (PBKDF2, constant-time compare).
pub fn digest_matches(d: &Digest, key: &[u8]) -> bool {
    let want = d.digest.as_bytes();
    let mut got = Zeroizing::new([0u8; MAX_DIGEST_LEN]);
    let Some(g) = got.get_mut(..want.len()) else {
        return false;
    };
    d.hash.pbkdf2(key, d.salt.as_bytes(), d.iterations, g);
    bool::from(g.ct_eq(want))
}

/// Opens key slot `id` with `passphrase`: `Ok(None)` when the passphrase
/// does not open it. The key is checked against the slot's digest; it may
/// be an unbound key (see [`is_bound`]).
pub fn open_keyslot<D: BlockIo + ?Sized>(
    dev: &mut D,
    h: &Luks2Header,
    id: u8,
    passphrase: &[u8],
    mem: &mut [Argon2Block],
) -> Result<Option<VolumeKey>, Error<D::Error>> {
    if passphrase.len() > crate::MAX_PASSPHRASE_LEN {
        return Err(Error::BadParameter(BadParameter::PassphraseTooLong));
    }
    let ks = h
        .meta
        .keyslot(id)
        .ok_or(Error::BadParameter(BadParameter::KeySlotIndex(id)))?;
    if ks.kind != "luks2" {
        return Err(Error::Unsupported(Unsupported::Luks2Type(ks.kind.clone())));
    }
    let Some(d) = h.meta.digest_for_keyslot(id) else {
        // A key slot no digest covers cannot be verified.
        return Err(Error::corrupt(
            Structure::Luks2Json,
            ks.json_offset,
            Problem::Luks2(Luks2Problem::DanglingReference("keyslots")),
        ));
    };
    let af_hash = ks
        .af_hash
        .ok_or(Error::Unsupported(Unsupported::Luks2Type(ks.kind.clone())))?;
    let kb = ks.key_size as usize;
    let akb = ks.area_key_size as usize;
    let (cn, cm) = split_spec(&ks.area_encryption);
    let (cipher, ()) =
        crate::luks1::slots::slot_cipher(cn, cm, akb, |sk| derive(ks, passphrase, sk, mem))?;
    let mut af = AfState::new(af_hash, kb, ks.stripes);
    let st = Structure::KeyMaterial(id);
    crate::luks1::slots::read_material(dev, st, ks.area_offset, &cipher, &mut af)?;
    let Some(candidate) = af.merged() else {
        return Ok(None);
    };
    if digest_matches(d, candidate) {
        Ok(VolumeKey::from_bytes(candidate))
    } else {
        Ok(None)
    }
}

/// Whether key slot `id`'s digest is the data segment's (only such key
/// slots unlock data).
pub fn is_bound(meta: &Metadata, id: u8) -> bool {
    match (meta.digest_for_keyslot(id), meta.data_segment()) {
        (Some(d), Some(s)) => s.id < 32 && d.segments & (1u32 << s.id) != 0,
        _ => false,
    }
}

/// Refuses volumes with mandatory requirements (all of them are unknown
/// to this implementation).
pub fn check_requirements<E>(meta: &Metadata) -> Result<(), Error<E>> {
    match meta.requirements.first() {
        Some(r) => Err(Error::Unsupported(Unsupported::Requirement(r.clone()))),
        None => Ok(()),
    }
}

/// Unlocks the data segment with `passphrase`: tries `slot` only, or every
/// bound `luks2` key slot by priority (2, then 1; priority 0 only when
/// asked for by number). A passphrase that opens only an unbound key slot
/// gives [`Error::KeySlotUnbound`]. Argon2 slots work in `mem`.
pub fn unlock<D: BlockIo + ?Sized>(
    dev: &mut D,
    h: &Luks2Header,
    passphrase: &[u8],
    slot: Option<u8>,
    mem: &mut [Argon2Block],
) -> Result<(VolumeKey, u8), Error<D::Error>> {
    check_requirements(&h.meta)?;
    if let Some(s) = slot {
        let ks = h.meta.keyslot(s).ok_or(Error::KeySlotNotActive(s))?;
        if ks.kind != "luks2" {
            return Err(Error::KeySlotNotActive(s));
        }
        return match open_keyslot(dev, h, s, passphrase, mem)? {
            Some(_) if !is_bound(&h.meta, s) => Err(Error::KeySlotUnbound(s)),
            Some(k) => Ok((k, s)),
            None => Err(Error::WrongPassphrase),
        };
    }
    let usable = |k: &&Keyslot| k.kind == "luks2" && k.priority > 0;
    if !h.meta.keyslots.iter().any(|k| usable(&k)) {
        return Err(Error::NoActiveKeySlot);
    }
    let mut skipped = None;
    for bound in [true, false] {
        for prio in [2u8, 1] {
            // In id order, whatever the order of the JSON members.
            for ks in (0..32u8).filter_map(|id| h.meta.keyslot(id)).filter(usable) {
                if ks.priority != prio || is_bound(&h.meta, ks.id) != bound {
                    continue;
                }
                match open_keyslot(dev, h, ks.id, passphrase, mem) {
                    Ok(Some(k)) if bound => return Ok((k, ks.id)),
                    Ok(Some(_)) => return Err(Error::KeySlotUnbound(ks.id)),
                    Ok(None) => {}
                    // A slot needing more memory than given, or using an unknown
                    // KDF, is skipped: another may open.
                    Err(e @ (Error::KdfMemory { .. } | Error::Unsupported(_))) => {
                        skipped = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Err(skipped.unwrap_or(Error::WrongPassphrase))
}

/// The data cipher of the data segment for `key`.
pub fn data_cipher<E>(meta: &Metadata, key: &VolumeKey) -> Result<SectorCipher, Error<E>> {
    let seg = meta.data_segment().ok_or(Error::corrupt(
        Structure::Luks2Json,
        0,
        Problem::Luks2(Luks2Problem::Missing("segments")),
    ))?;
    if seg.integrity {
        return Err(Error::Unsupported(Unsupported::Luks2Type(name_from(
            b"integrity",
        ))));
    }
    let (cn, cm) = split_spec(&seg.encryption);
    if cm.is_empty() {
        return Err(Error::Unsupported(Unsupported::CipherMode(name_from(
            seg.encryption.as_bytes(),
        ))));
    }
    SectorCipher::new(cn, cm, key.as_bytes(), seg.sector_size).map_err(PureError::widen)
}

#[cfg(test)]
mod tests;
