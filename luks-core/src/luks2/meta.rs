//! The LUKS2 JSON metadata as fixed-capacity values: key slots, segments,
//! digests and config, parsed from the JSON area and checked the way
//! cryptsetup checks them (types, cross-references, areas inside the key
//! slots area).

use super::json::{self, Elements, Kind, Members, Val};
use crate::error::{name_from, Luks2Problem, Name, Problem, PureError, Structure};
use crate::hash::HashAlg;

/// Key slots held (cryptsetup's own maximum).
pub const MAX_KEYSLOTS: usize = 32;
/// Segments held (a plain volume has one; re-encryption uses up to three).
pub const MAX_SEGMENTS: usize = 8;
/// Digests held (cryptsetup's own maximum).
pub const MAX_DIGESTS: usize = 8;
/// Tokens accepted (cryptsetup's maximum); they are checked, not kept.
pub const MAX_TOKENS: usize = 32;
/// Mandatory requirements kept.
pub const MAX_REQUIREMENTS: usize = 8;
/// Bytes of a salt or digest kept (SHA-512 / Argon2 salts fit).
pub const MAX_BLOB: usize = 64;

/// A cipher spec as LUKS2 writes it (`aes-xts-plain64`).
pub type Spec = heapless::String<64>;

/// A salt or digest.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    bytes: [u8; MAX_BLOB],
    len: usize,
}

impl Blob {
    /// Copies `b`; `None` if longer than [`MAX_BLOB`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; MAX_BLOB];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self {
            bytes,
            len: b.len(),
        })
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl core::fmt::Debug for Blob {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A key slot's key derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The hash.
        hash: HashAlg,
        /// Iterations.
        iterations: u32,
        /// Salt.
        salt: Blob,
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
        /// Salt.
        salt: Blob,
    },
    /// A KDF this implementation does not know; the key slot cannot be
    /// opened, the rest of the volume can.
    Other(Name),
}

/// A `luks2` key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    /// Its id (the JSON member name).
    pub id: u8,
    /// Key slot type: `luks2` keyslots unlock, others (`reencrypt`) are
    /// kept only for listing.
    pub kind: Name,
    /// Size of the key it stores.
    pub key_size: u32,
    /// 0 ignore (unless asked for by number), 1 normal, 2 preferred.
    pub priority: u8,
    /// AF stripes.
    pub stripes: u32,
    /// AF hash.
    pub af_hash: Option<HashAlg>,
    /// Byte offset of the key material on the header device.
    pub area_offset: u64,
    /// Bytes reserved for the key material.
    pub area_size: u64,
    /// Cipher of the key material.
    pub area_encryption: Spec,
    /// Key size of that cipher.
    pub area_key_size: u32,
    /// Key derivation (`None` for non-`luks2` key slots).
    pub kdf: Option<Kdf>,
    /// Device offset of this key slot's JSON object (for errors found
    /// when it is used); 0 for key slots not yet written.
    pub json_offset: u64,
}

/// A segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Its id.
    pub id: u8,
    /// Segment type (`crypt`).
    pub kind: Name,
    /// Byte offset of the data on the data device.
    pub offset: u64,
    /// Size in bytes, `None` for `dynamic` (to the end of the device).
    pub size: Option<u64>,
    /// Added to every IV sector number.
    pub iv_tweak: u64,
    /// Cipher spec (`aes-xts-plain64`).
    pub encryption: Spec,
    /// Data sector size, 512..=4096.
    pub sector_size: u32,
    /// Whether the segment has an `integrity` member (authenticated
    /// encryption over dm-integrity, which this implementation cannot
    /// read).
    pub integrity: bool,
    /// Device offset of this segment's JSON object (for errors found when
    /// it is used); 0 for segments not yet written.
    pub json_offset: u64,
}

/// A `pbkdf2` digest of a volume key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Its id.
    pub id: u8,
    /// Key slots whose key it checks (bit `n` = key slot `n`).
    pub keyslots: u32,
    /// Segments whose key it is (bit `n` = segment `n`).
    pub segments: u32,
    /// PBKDF2 hash.
    pub hash: HashAlg,
    /// Iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Blob,
    /// The digest.
    pub digest: Blob,
}

/// The parsed metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Key slots, by id.
    pub keyslots: heapless::Vec<Keyslot, MAX_KEYSLOTS>,
    /// Segments, by id.
    pub segments: heapless::Vec<Segment, MAX_SEGMENTS>,
    /// Digests, by id.
    pub digests: heapless::Vec<Digest, MAX_DIGESTS>,
    /// Number of tokens.
    pub tokens: usize,
    /// `config.json_size`.
    pub json_size: u64,
    /// `config.keyslots_size`.
    pub keyslots_size: u64,
    /// `config.requirements.mandatory`.
    pub requirements: heapless::Vec<Name, MAX_REQUIREMENTS>,
}

/// Parsing context: the text and the device offset of its first byte.
struct Ctx<'t> {
    t: &'t [u8],
    base: u64,
}

impl Ctx<'_> {
    fn bad(&self, at: usize, p: Luks2Problem) -> PureError {
        PureError::corrupt(
            Structure::Luks2Json,
            self.base.saturating_add(at as u64),
            Problem::Luks2(p),
        )
    }
    fn member(&self, obj: Val, key: &'static str) -> Result<Val, PureError> {
        json::get(self.t, obj, key).ok_or(self.bad(obj.start, Luks2Problem::Missing(key)))
    }
    fn typed(&self, obj: Val, key: &'static str, kind: Kind) -> Result<Val, PureError> {
        let v = self.member(obj, key)?;
        if v.kind != kind {
            return Err(self.bad(v.start, Luks2Problem::WrongType(key)));
        }
        Ok(v)
    }
    fn str(&self, obj: Val, key: &'static str) -> Result<json::Text, PureError> {
        let v = self.member(obj, key)?;
        json::str_of(self.t, v).ok_or(self.bad(v.start, Luks2Problem::WrongType(key)))
    }
    fn u64s(&self, obj: Val, key: &'static str) -> Result<u64, PureError> {
        let v = self.member(obj, key)?;
        json::u64_str_of(self.t, v).ok_or(self.bad(v.start, Luks2Problem::BadValue(key)))
    }
    fn u32n(&self, obj: Val, key: &'static str) -> Result<u32, PureError> {
        let v = self.member(obj, key)?;
        json::uint_of(self.t, v)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(self.bad(v.start, Luks2Problem::BadValue(key)))
    }
    fn hash(&self, obj: Val, key: &'static str) -> Result<HashAlg, PureError> {
        HashAlg::from_name(&self.str(obj, key)?)
    }
    fn blob(&self, obj: Val, key: &'static str) -> Result<Blob, PureError> {
        let v = self.member(obj, key)?;
        let s = json::str_of(self.t, v).ok_or(self.bad(v.start, Luks2Problem::WrongType(key)))?;
        let mut b = [0u8; MAX_BLOB];
        let n = json::base64(&s, &mut b).ok_or(self.bad(v.start, Luks2Problem::BadValue(key)))?;
        Blob::from_bytes(&b[..n]).ok_or(self.bad(v.start, Luks2Problem::BadValue(key)))
    }
    fn spec(&self, obj: Val, key: &'static str) -> Result<Spec, PureError> {
        let v = self.member(obj, key)?;
        let s = json::str_of(self.t, v).ok_or(self.bad(v.start, Luks2Problem::WrongType(key)))?;
        let mut out = Spec::new();
        out.push_str(&s)
            .map_err(|_| self.bad(v.start, Luks2Problem::BadValue(key)))?;
        Ok(out)
    }
    /// A member name that is an id below 32.
    fn id(&self, key: &[u8], at: usize, what: &'static str) -> Result<u8, PureError> {
        json::parse_u64(key)
            .filter(|&n| n < 32)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or(self.bad(at, Luks2Problem::BadValue(what)))
    }
    /// An array of id strings as a bit mask.
    fn id_set(&self, obj: Val, key: &'static str) -> Result<u32, PureError> {
        let arr = self.typed(obj, key, Kind::Array)?;
        let mut mask = 0u32;
        for e in Elements::new(self.t, arr) {
            let n = json::u64_str_of(self.t, e)
                .filter(|&n| n < 32)
                .ok_or(self.bad(e.start, Luks2Problem::BadValue(key)))?;
            mask |= 1u32 << n;
        }
        Ok(mask)
    }
}

fn name_of(s: &str) -> Name {
    name_from(s.as_bytes())
}

fn parse_keyslot(c: &Ctx<'_>, id: u8, v: Val) -> Result<Keyslot, PureError> {
    if v.kind != Kind::Object {
        return Err(c.bad(v.start, Luks2Problem::WrongType("keyslots")));
    }
    let kind = c.str(v, "type")?;
    let kind = kind.as_str();
    let key_size = c.u32n(v, "key_size")?;
    let priority = match json::get(c.t, v, "priority") {
        None => 1,
        Some(p) => json::uint_of(c.t, p)
            .filter(|&n| n <= 2)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or(c.bad(p.start, Luks2Problem::BadValue("priority")))?,
    };
    let area = c.typed(v, "area", Kind::Object)?;
    let area_type = c.str(area, "type")?;
    let area_type = area_type.as_str();
    let mut ks = Keyslot {
        id,
        kind: name_of(kind),
        key_size,
        priority,
        stripes: 0,
        af_hash: None,
        area_offset: c.u64s(area, "offset")?,
        area_size: c.u64s(area, "size")?,
        area_encryption: Spec::new(),
        area_key_size: 0,
        kdf: None,
        json_offset: c.base.saturating_add(v.start as u64),
    };
    if kind != "luks2" {
        return Ok(ks);
    }
    if area_type != "raw" {
        return Err(PureError::Unsupported(
            crate::error::Unsupported::Luks2Type(name_of(area_type)),
        ));
    }
    ks.area_encryption = c.spec(area, "encryption")?;
    ks.area_key_size = c.u32n(area, "key_size")?;
    let af = c.typed(v, "af", Kind::Object)?;
    let af_type = c.str(af, "type")?;
    let af_type = af_type.as_str();
    if af_type != "luks1" {
        return Err(PureError::Unsupported(
            crate::error::Unsupported::Luks2Type(name_of(af_type)),
        ));
    }
    ks.stripes = c.u32n(af, "stripes")?;
    if ks.stripes == 0 {
        return Err(c.bad(af.start, Luks2Problem::BadValue("stripes")));
    }
    ks.af_hash = Some(c.hash(af, "hash")?);
    if key_size == 0 || key_size as usize > crate::MAX_KEY_BYTES {
        return Err(c.bad(v.start, Luks2Problem::BadValue("key_size")));
    }
    // The key material must fit its area.
    let material = u64::from(key_size)
        .saturating_mul(u64::from(ks.stripes))
        .div_ceil(512)
        .saturating_mul(512);
    if material > ks.area_size {
        return Err(c.bad(area.start, Luks2Problem::BadValue("area.size")));
    }
    let kdf = c.typed(v, "kdf", Kind::Object)?;
    let kdf_type = c.str(kdf, "type")?;
    ks.kdf = Some(match kdf_type.as_str() {
        "pbkdf2" => Kdf::Pbkdf2 {
            hash: c.hash(kdf, "hash")?,
            iterations: c.u32n(kdf, "iterations")?,
            salt: c.blob(kdf, "salt")?,
        },
        "argon2i" | "argon2id" => Kdf::Argon2 {
            id: kdf_type == "argon2id",
            time: c.u32n(kdf, "time")?,
            memory_kib: c.u32n(kdf, "memory")?,
            cpus: c.u32n(kdf, "cpus")?,
            salt: c.blob(kdf, "salt")?,
        },
        other => Kdf::Other(name_of(other)),
    });
    Ok(ks)
}

fn parse_segment(c: &Ctx<'_>, id: u8, v: Val) -> Result<Segment, PureError> {
    if v.kind != Kind::Object {
        return Err(c.bad(v.start, Luks2Problem::WrongType("segments")));
    }
    let kind = c.str(v, "type")?;
    let kind = kind.as_str();
    let offset = c.u64s(v, "offset")?;
    let sz = c.member(v, "size")?;
    let size = match json::str_of(c.t, sz).as_deref() {
        Some("dynamic") => None,
        _ => {
            Some(json::u64_str_of(c.t, sz).ok_or(c.bad(sz.start, Luks2Problem::BadValue("size")))?)
        }
    };
    let mut seg = Segment {
        id,
        kind: name_of(kind),
        offset,
        size,
        iv_tweak: 0,
        encryption: Spec::new(),
        sector_size: 512,
        integrity: json::get(c.t, v, "integrity").is_some(),
        json_offset: c.base.saturating_add(v.start as u64),
    };
    if !offset.is_multiple_of(512) {
        return Err(c.bad(v.start, Luks2Problem::BadValue("offset")));
    }
    // As cryptsetup: optional flags are an array of strings.
    if let Some(flags) = json::get(c.t, v, "flags") {
        if flags.kind != Kind::Array {
            return Err(c.bad(flags.start, Luks2Problem::WrongType("flags")));
        }
        for e in Elements::new(c.t, flags) {
            if e.kind != Kind::String {
                return Err(c.bad(e.start, Luks2Problem::WrongType("flags")));
            }
        }
    }
    if kind == "crypt" {
        seg.iv_tweak = c.u64s(v, "iv_tweak")?;
        seg.encryption = c.spec(v, "encryption")?;
        if seg.encryption.is_empty() {
            return Err(c.bad(v.start, Luks2Problem::BadValue("encryption")));
        }
        seg.sector_size = c.u32n(v, "sector_size")?;
        if !(512..=4096).contains(&seg.sector_size) || !seg.sector_size.is_power_of_two() {
            return Err(c.bad(v.start, Luks2Problem::BadValue("sector_size")));
        }
        if size.is_some_and(|s| !s.is_multiple_of(u64::from(seg.sector_size))) {
            return Err(c.bad(sz.start, Luks2Problem::BadValue("size")));
        }
    }
    Ok(seg)
}

/// The field a digest's iteration count is named by in errors, by digest id
/// (ids are below 32).
const DIGEST_ITERATIONS: [&str; 32] = [
    "digests.0.iterations",
    "digests.1.iterations",
    "digests.2.iterations",
    "digests.3.iterations",
    "digests.4.iterations",
    "digests.5.iterations",
    "digests.6.iterations",
    "digests.7.iterations",
    "digests.8.iterations",
    "digests.9.iterations",
    "digests.10.iterations",
    "digests.11.iterations",
    "digests.12.iterations",
    "digests.13.iterations",
    "digests.14.iterations",
    "digests.15.iterations",
    "digests.16.iterations",
    "digests.17.iterations",
    "digests.18.iterations",
    "digests.19.iterations",
    "digests.20.iterations",
    "digests.21.iterations",
    "digests.22.iterations",
    "digests.23.iterations",
    "digests.24.iterations",
    "digests.25.iterations",
    "digests.26.iterations",
    "digests.27.iterations",
    "digests.28.iterations",
    "digests.29.iterations",
    "digests.30.iterations",
    "digests.31.iterations",
];

fn parse_digest(c: &Ctx<'_>, id: u8, v: Val) -> Result<Digest, PureError> {
    if v.kind != Kind::Object {
        return Err(c.bad(v.start, Luks2Problem::WrongType("digests")));
    }
    let kind = c.str(v, "type")?;
    if kind != "pbkdf2" {
        return Err(PureError::Unsupported(
            crate::error::Unsupported::Luks2Type(name_of(&kind)),
        ));
    }
    let iterations = c.u32n(v, "iterations")?;
    if iterations == 0 {
        return Err(c.bad(v.start, Luks2Problem::BadValue("iterations")));
    }
    // Every unlock runs the digest's PBKDF2: the key slots' ceiling holds
    // here too (issue #22), refused at parse with the field's offset.
    if iterations > crate::luks1::MAX_PBKDF2_ITERATIONS {
        let at = c.member(v, "iterations")?.start;
        return Err(PureError::corrupt(
            Structure::Luks2Json,
            c.base.saturating_add(at as u64),
            Problem::KdfCost {
                what: DIGEST_ITERATIONS
                    .get(usize::from(id))
                    .copied()
                    .unwrap_or("digest iterations"),
                value: u64::from(iterations),
                ceiling: u64::from(crate::luks1::MAX_PBKDF2_ITERATIONS),
            },
        ));
    }
    Ok(Digest {
        id,
        keyslots: c.id_set(v, "keyslots")?,
        segments: c.id_set(v, "segments")?,
        hash: c.hash(v, "hash")?,
        iterations,
        salt: c.blob(v, "salt")?,
        digest: c.blob(v, "digest")?,
    })
}

/// Pushes into a bounded list, naming the section when it is full.
fn push<T, const N: usize>(
    c: &Ctx<'_>,
    list: &mut heapless::Vec<T, N>,
    item: T,
    at: usize,
    what: &'static str,
) -> Result<(), PureError> {
    list.push(item)
        .map_err(|_| c.bad(at, Luks2Problem::TooMany(what)))
}

impl Metadata {
    /// Parses and checks the JSON text `t` (without the NUL padding) of a
    /// header copy of `hdr_size` bytes; `base` is the device offset of the
    /// text, for error messages.
    pub fn parse(t: &[u8], hdr_size: u64, base: u64) -> Result<Self, PureError> {
        let c = Ctx { t, base };
        // As cryptsetup: the text starts with the opening brace itself.
        if t.first() != Some(&b'{') {
            return Err(c.bad(0, Luks2Problem::JsonSyntax));
        }
        let root = json::document(t).map_err(|e| c.bad(e.at, e.problem))?;
        if root.kind != Kind::Object {
            return Err(c.bad(root.start, Luks2Problem::WrongType("(root)")));
        }
        let mut m = Self {
            keyslots: heapless::Vec::new(),
            segments: heapless::Vec::new(),
            digests: heapless::Vec::new(),
            tokens: 0,
            json_size: 0,
            keyslots_size: 0,
            requirements: heapless::Vec::new(),
        };
        // Every section's ids are unique: a repeated member name is refused.
        let mut seen = 0u32;
        for (k, v) in Members::new(t, c.typed(root, "keyslots", Kind::Object)?) {
            let id = c.id(k, v.start, "keyslots")?;
            if seen & (1 << id) != 0 {
                return Err(c.bad(v.start, Luks2Problem::BadValue("keyslots")));
            }
            seen |= 1 << id;
            let ks = parse_keyslot(&c, id, v)?;
            push(&c, &mut m.keyslots, ks, v.start, "keyslots")?;
        }
        let mut seen_seg = 0u32;
        for (k, v) in Members::new(t, c.typed(root, "segments", Kind::Object)?) {
            let id = c.id(k, v.start, "segments")?;
            if seen_seg & (1 << id) != 0 {
                return Err(c.bad(v.start, Luks2Problem::BadValue("segments")));
            }
            seen_seg |= 1 << id;
            let s = parse_segment(&c, id, v)?;
            push(&c, &mut m.segments, s, v.start, "segments")?;
        }
        let mut seen_dig = 0u32;
        for (k, v) in Members::new(t, c.typed(root, "digests", Kind::Object)?) {
            let id = c.id(k, v.start, "digests")?;
            if seen_dig & (1 << id) != 0 {
                return Err(c.bad(v.start, Luks2Problem::BadValue("digests")));
            }
            seen_dig |= 1 << id;
            let d = parse_digest(&c, id, v)?;
            if d.keyslots & !seen != 0 {
                return Err(c.bad(v.start, Luks2Problem::DanglingReference("digests.keyslots")));
            }
            if d.segments & !seen_seg != 0 {
                return Err(c.bad(v.start, Luks2Problem::DanglingReference("digests.segments")));
            }
            push(&c, &mut m.digests, d, v.start, "digests")?;
        }
        // As cryptsetup: every key slot belongs to exactly one digest.
        for ks in &m.keyslots {
            let bit = 1u32 << ks.id;
            let n = m.digests.iter().filter(|d| d.keyslots & bit != 0).count();
            if n != 1 {
                return Err(c.bad(
                    root.start,
                    Luks2Problem::BadValue("keyslots (each must be in exactly one digest)"),
                ));
            }
        }
        // Tokens: objects with a type and key slot references that exist.
        for (k, v) in Members::new(t, c.typed(root, "tokens", Kind::Object)?) {
            c.id(k, v.start, "tokens")?;
            if v.kind != Kind::Object {
                return Err(c.bad(v.start, Luks2Problem::WrongType("tokens")));
            }
            c.str(v, "type")?;
            if c.id_set(v, "keyslots")? & !seen != 0 {
                return Err(c.bad(v.start, Luks2Problem::DanglingReference("tokens.keyslots")));
            }
            m.tokens = m.tokens.saturating_add(1);
            if m.tokens > MAX_TOKENS {
                return Err(c.bad(v.start, Luks2Problem::TooMany("tokens")));
            }
        }
        let config = c.typed(root, "config", Kind::Object)?;
        m.json_size = c.u64s(config, "json_size")?;
        m.keyslots_size = c.u64s(config, "keyslots_size")?;
        if Some(m.json_size) != hdr_size.checked_sub(super::header::BINARY_LEN as u64) {
            return Err(c.bad(config.start, Luks2Problem::BadValue("json_size")));
        }
        if !m.keyslots_size.is_multiple_of(4096) {
            return Err(c.bad(config.start, Luks2Problem::BadValue("keyslots_size")));
        }
        if let Some(req) = json::get(t, config, "requirements") {
            if req.kind != Kind::Object {
                return Err(c.bad(req.start, Luks2Problem::WrongType("requirements")));
            }
            if let Some(mand) = json::get(t, req, "mandatory") {
                if mand.kind != Kind::Array {
                    return Err(c.bad(mand.start, Luks2Problem::WrongType("mandatory")));
                }
                for e in Elements::new(t, mand) {
                    let s = json::str_of(t, e)
                        .ok_or(c.bad(e.start, Luks2Problem::WrongType("mandatory")))?;
                    push(&c, &mut m.requirements, name_of(&s), e.start, "mandatory")?;
                }
            }
        }
        m.check_areas(&c, hdr_size, config.start)?;
        Ok(m)
    }

    /// Key slot areas lie in the key slots area (after both header
    /// copies, `keyslots_size` bytes), end before the first data segment
    /// that does not start at 0 (a detached header's data starts at 0 of
    /// another device), and do not overlap.
    fn check_areas(&self, c: &Ctx<'_>, hdr_size: u64, at: usize) -> Result<(), PureError> {
        let lo = hdr_size.saturating_mul(2);
        let data = self
            .segments
            .iter()
            .map(|s| s.offset)
            .filter(|&o| o > 0)
            .min()
            .unwrap_or(u64::MAX);
        // As cryptsetup: the key slots area itself ends by the data.
        if lo.saturating_add(self.keyslots_size) > data {
            return Err(c.bad(at, Luks2Problem::BadValue("keyslots_size")));
        }
        let hi = lo.saturating_add(self.keyslots_size).min(data);
        for (i, a) in self.keyslots.iter().enumerate() {
            let end = a.area_offset.checked_add(a.area_size);
            if a.area_offset < lo
                || end.is_none_or(|e| e > hi)
                || !a.area_offset.is_multiple_of(512)
            {
                return Err(c.bad(at, Luks2Problem::AreaOutOfBounds));
            }
            for b in self.keyslots.iter().skip(i.saturating_add(1)) {
                let b_end = b.area_offset.saturating_add(b.area_size);
                if a.area_size > 0
                    && b.area_size > 0
                    && a.area_offset < b_end
                    && b.area_offset < end.unwrap_or(u64::MAX)
                {
                    return Err(c.bad(at, Luks2Problem::AreaOutOfBounds));
                }
            }
        }
        Ok(())
    }

    /// The key slot with id `id`.
    pub fn keyslot(&self, id: u8) -> Option<&Keyslot> {
        self.keyslots.iter().find(|k| k.id == id)
    }

    /// The data segment: the `crypt` segment with the lowest id.
    pub fn data_segment(&self) -> Option<&Segment> {
        self.segments
            .iter()
            .filter(|s| s.kind == "crypt")
            .min_by_key(|s| s.id)
    }

    /// The digest that checks key slot `id`.
    pub fn digest_for_keyslot(&self, id: u8) -> Option<&Digest> {
        self.digests
            .iter()
            .find(|d| id < 32 && d.keyslots & (1u32 << id) != 0)
    }

    /// End of the header area on the device: both copies plus the key
    /// slots area.
    pub fn header_area_len(&self, hdr_size: u64) -> u64 {
        hdr_size
            .saturating_mul(2)
            .saturating_add(self.keyslots_size)
    }
}
