//! The LUKS1 `phdr` and its 8 key slots as a view over bytes plus a
//! validated representation.
//!
//! Contract: once [`Header::new_checked`] passed, no accessor panics;
//! [`HeaderRepr::emit`] never panics on a buffer of
//! [`HeaderRepr::buffer_len`] bytes.

use crate::error::{name_from, slot_u8, Name, Problem, PureError, Structure};

/// Offsets of the header fields (big-endian integers).
pub mod field {
    use core::ops::Range;
    /// `LUKS\xba\xbe`.
    pub const MAGIC: Range<usize> = 0..6;
    /// Version, 1.
    pub const VERSION: Range<usize> = 6..8;
    /// Cipher name, NUL padded.
    pub const CIPHER_NAME: Range<usize> = 8..40;
    /// Cipher mode, NUL padded.
    pub const CIPHER_MODE: Range<usize> = 40..72;
    /// Hash spec, NUL padded.
    pub const HASH_SPEC: Range<usize> = 72..104;
    /// Payload offset in 512-byte sectors.
    pub const PAYLOAD_OFFSET: Range<usize> = 104..108;
    /// Volume key length in bytes.
    pub const KEY_BYTES: Range<usize> = 108..112;
    /// PBKDF2 digest of the volume key.
    pub const MK_DIGEST: Range<usize> = 112..132;
    /// Salt of that digest.
    pub const MK_DIGEST_SALT: Range<usize> = 132..164;
    /// Iterations of that digest.
    pub const MK_DIGEST_ITER: Range<usize> = 164..168;
    /// UUID, ASCII, NUL padded.
    pub const UUID: Range<usize> = 168..208;
    /// First key slot.
    pub const KEY_SLOTS: usize = 208;
    /// Bytes per key slot.
    pub const KEY_SLOT_LEN: usize = 48;

    /// Offsets inside one key slot.
    pub mod slot {
        use core::ops::Range;
        /// Active flag.
        pub const ACTIVE: Range<usize> = 0..4;
        /// PBKDF2 iterations.
        pub const ITERATIONS: Range<usize> = 4..8;
        /// PBKDF2 salt.
        pub const SALT: Range<usize> = 8..40;
        /// Key material offset, 512-byte sectors.
        pub const KEY_MATERIAL_OFFSET: Range<usize> = 40..44;
        /// AF stripes.
        pub const STRIPES: Range<usize> = 44..48;
    }
}

/// The LUKS magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of header fields (the `phdr`).
pub const HEADER_LEN: usize = 592;
/// Number of key slots.
pub const KEY_SLOTS: usize = 8;
/// Active flag of an enabled key slot.
pub const KEY_ENABLED: u32 = 0x00AC_71F3;
/// Active flag of a disabled key slot.
pub const KEY_DISABLED: u32 = 0x0000_DEAD;
/// The only stripe count cryptsetup and QEMU accept.
pub const STRIPES: u32 = 4000;
/// Salt length.
pub const SALT_LEN: usize = 32;
/// Digest length.
pub const DIGEST_LEN: usize = 20;
/// First sector key material may use: the 592-byte `phdr` fills sectors 0
/// and 1 (cryptsetup 1.0 put key slot 0 at sector 2).
pub const MIN_KEY_MATERIAL_SECTOR: u32 = 2;

header_view! {
    /// A view of a LUKS1 header over bytes.
    len: HEADER_LEN,
    structure: Structure::Luks1Header,
    magic: field::MAGIC,
    version: field::VERSION,
    what: "`phdr`",
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at.saturating_add(4)) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Raw cipher name field.
    pub fn cipher_name(&self) -> &[u8] {
        &self.b()[field::CIPHER_NAME]
    }
    /// Raw cipher mode field.
    pub fn cipher_mode(&self) -> &[u8] {
        &self.b()[field::CIPHER_MODE]
    }
    /// Raw hash spec field.
    pub fn hash_spec(&self) -> &[u8] {
        &self.b()[field::HASH_SPEC]
    }
    /// Payload offset, sectors.
    pub fn payload_offset(&self) -> u32 {
        be32(self.b(), field::PAYLOAD_OFFSET.start)
    }
    /// Key bytes.
    pub fn key_bytes(&self) -> u32 {
        be32(self.b(), field::KEY_BYTES.start)
    }
    /// Volume key digest.
    pub fn mk_digest(&self) -> &[u8] {
        &self.b()[field::MK_DIGEST]
    }
    /// Volume key digest salt.
    pub fn mk_digest_salt(&self) -> &[u8] {
        &self.b()[field::MK_DIGEST_SALT]
    }
    /// Volume key digest iterations.
    pub fn mk_digest_iter(&self) -> u32 {
        be32(self.b(), field::MK_DIGEST_ITER.start)
    }
    /// Raw UUID field.
    pub fn uuid(&self) -> &[u8] {
        &self.b()[field::UUID]
    }
    fn slot(&self, i: usize) -> &[u8] {
        let at = field::KEY_SLOTS.saturating_add(i.min(7).saturating_mul(field::KEY_SLOT_LEN));
        &self.b()[at..at.saturating_add(field::KEY_SLOT_LEN)]
    }
    /// Active flag of slot `i` (0..8; larger values read slot 7).
    pub fn slot_active(&self, i: usize) -> u32 {
        be32(self.slot(i), field::slot::ACTIVE.start)
    }
    /// Iterations of slot `i`.
    pub fn slot_iterations(&self, i: usize) -> u32 {
        be32(self.slot(i), field::slot::ITERATIONS.start)
    }
    /// Salt of slot `i`.
    pub fn slot_salt(&self, i: usize) -> &[u8] {
        &self.slot(i)[field::slot::SALT]
    }
    /// Key material offset of slot `i`, sectors.
    pub fn slot_key_material_offset(&self, i: usize) -> u32 {
        be32(self.slot(i), field::slot::KEY_MATERIAL_OFFSET.start)
    }
    /// Stripes of slot `i`.
    pub fn slot_stripes(&self, i: usize) -> u32 {
        be32(self.slot(i), field::slot::STRIPES.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    fn put32(&mut self, at: usize, v: u32) {
        if let Some(s) = self.m().get_mut(at..at.saturating_add(4)) {
            s.copy_from_slice(&v.to_be_bytes());
        }
    }
    fn put_str(&mut self, r: core::ops::Range<usize>, s: &str) {
        let f = &mut self.m()[r];
        f.fill(0);
        let n = s.len().min(f.len().saturating_sub(1));
        f[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
}

/// One key slot, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlotRepr {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Key material offset in 512-byte sectors.
    pub key_material_offset: u32,
    /// AF stripes (4000).
    pub stripes: u32,
}

/// A validated LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Cipher name (`aes`).
    pub cipher_name: Name,
    /// Cipher mode (`xts-plain64`).
    pub cipher_mode: Name,
    /// Hash spec (`sha256`).
    pub hash_spec: Name,
    /// Payload offset in 512-byte sectors (0 with a detached header).
    pub payload_offset: u32,
    /// Volume key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the volume key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Its iterations.
    pub mk_digest_iter: u32,
    /// UUID text. A field that is not NUL-terminated ASCII text (cryptsetup
    /// and QEMU open it anyway) reads as its first 39 bytes (up to a NUL),
    /// each byte outside printable ASCII shown as `?`.
    pub uuid: heapless::String<40>,
    /// The UUID field's exact bytes when they are not NUL-terminated ASCII
    /// text; [`HeaderRepr::emit`] then writes them back unchanged.
    pub uuid_raw: Option<[u8; 40]>,
    /// The key slots.
    pub key_slots: [KeySlotRepr; KEY_SLOTS],
}

fn corrupt(structure: Structure, at: usize, problem: Problem) -> PureError {
    PureError::corrupt(structure, at as u64, problem)
}

/// Reads a NUL-padded ASCII field.
fn text<const N: usize>(raw: &[u8], at: usize) -> Result<heapless::String<N>, PureError> {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let s = &raw[..len];
    let bad = || corrupt(Structure::Luks1Header, at, Problem::BadString);
    if len == raw.len() {
        return Err(bad());
    }
    let mut out = heapless::String::new();
    for &c in s {
        if !c.is_ascii() || c.is_ascii_control() {
            return Err(bad());
        }
        out.push(c as char).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A UUID field that is not text, shown as cryptsetup and QEMU do (its
/// first 39 bytes, up to a NUL) with bytes outside printable ASCII as `?`.
fn uuid_lossy(raw: &[u8; 40]) -> heapless::String<40> {
    let mut out = heapless::String::new();
    for &c in raw.iter().take(39).take_while(|&&c| c != 0) {
        let c = if c.is_ascii_graphic() || c == b' ' {
            c as char
        } else {
            '?'
        };
        // At most 39 one-byte characters: always fits.
        let _ = out.push(c);
    }
    out
}

/// Sectors of key material for `key_bytes` × `stripes`, rounded up.
pub fn key_material_sectors(key_bytes: u32, stripes: u32) -> Option<u32> {
    let bytes = u64::from(key_bytes).checked_mul(u64::from(stripes))?;
    u32::try_from(bytes.div_ceil(512)).ok()
}

impl HeaderRepr {
    /// Bytes [`HeaderRepr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Parses and validates a header: what cryptsetup refuses is refused
    /// with the structure and byte offset at fault. Checks that need the
    /// device size are in [`HeaderRepr::check_device_size`].
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Result<Self, PureError> {
        h.check_len()?;
        let hs = Structure::Luks1Header;
        if h.magic() != MAGIC {
            return Err(corrupt(hs, field::MAGIC.start, Problem::BadMagic));
        }
        if h.version() != 1 {
            return Err(corrupt(
                hs,
                field::VERSION.start,
                Problem::BadVersion(h.version()),
            ));
        }
        let cipher_name = text::<32>(h.cipher_name(), field::CIPHER_NAME.start)?;
        let cipher_mode = text::<32>(h.cipher_mode(), field::CIPHER_MODE.start)?;
        let hash_spec = text::<32>(h.hash_spec(), field::HASH_SPEC.start)?;
        let (uuid, uuid_raw) = match text::<40>(h.uuid(), field::UUID.start) {
            Ok(t) => (t, None),
            Err(_) => {
                let mut raw = [0u8; 40];
                raw.copy_from_slice(h.uuid());
                (uuid_lossy(&raw), Some(raw))
            }
        };
        let key_bytes = h.key_bytes();
        if key_bytes == 0 || key_bytes as usize > crate::cipher::MAX_KEY_BYTES {
            return Err(corrupt(
                hs,
                field::KEY_BYTES.start,
                Problem::BadKeyBytes(key_bytes),
            ));
        }
        if h.mk_digest_iter() == 0 {
            return Err(corrupt(
                hs,
                field::MK_DIGEST_ITER.start,
                Problem::ZeroIterations,
            ));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(h.mk_digest());
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(h.mk_digest_salt());
        let empty = KeySlotRepr {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: 0,
            stripes: 0,
        };
        let mut key_slots: [KeySlotRepr; KEY_SLOTS] = core::array::from_fn(|_| empty.clone());
        for (i, ks) in key_slots.iter_mut().enumerate() {
            let base = field::KEY_SLOTS.saturating_add(i.saturating_mul(field::KEY_SLOT_LEN));
            let st = Structure::Luks1KeySlot(slot_u8(i));
            let active = match h.slot_active(i) {
                KEY_ENABLED => true,
                KEY_DISABLED => false,
                v => {
                    return Err(corrupt(st, base, Problem::BadActiveFlag(v)));
                }
            };
            let stripes = h.slot_stripes(i);
            if stripes != STRIPES {
                return Err(corrupt(
                    st,
                    base.saturating_add(field::slot::STRIPES.start),
                    Problem::BadStripes(stripes),
                ));
            }
            if active && h.slot_iterations(i) == 0 {
                return Err(corrupt(
                    st,
                    base.saturating_add(field::slot::ITERATIONS.start),
                    Problem::ZeroIterations,
                ));
            }
            ks.active = active;
            ks.iterations = h.slot_iterations(i);
            ks.salt.copy_from_slice(h.slot_salt(i));
            ks.key_material_offset = h.slot_key_material_offset(i);
            ks.stripes = stripes;
        }
        let r = Self {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset: h.payload_offset(),
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter: h.mk_digest_iter(),
            uuid,
            uuid_raw,
            key_slots,
        };
        r.check_layout()?;
        Ok(r)
    }

    /// Byte offset in the header of key slot `i`'s field range `f`.
    fn slot_field(i: usize, f: core::ops::Range<usize>) -> u64 {
        field::KEY_SLOTS
            .saturating_add(i.saturating_mul(field::KEY_SLOT_LEN))
            .saturating_add(f.start) as u64
    }

    /// Sector range `[start, end)` of key slot `i`'s key material.
    pub fn key_material_range(&self, i: usize) -> Option<(u32, u32)> {
        let ks = self.key_slots.get(i)?;
        let n = key_material_sectors(self.key_bytes, ks.stripes)?;
        Some((
            ks.key_material_offset,
            ks.key_material_offset.checked_add(n)?,
        ))
    }

    /// Key slots must not overlap each other, the `phdr`, or the payload.
    fn check_layout(&self) -> Result<(), PureError> {
        let off = field::slot::KEY_MATERIAL_OFFSET;
        let range = |i: usize| {
            self.key_material_range(i).ok_or_else(|| {
                PureError::corrupt(
                    Structure::Luks1KeySlot(slot_u8(i)),
                    Self::slot_field(i, off.clone()),
                    Problem::Overflow,
                )
            })
        };
        for i in 0..KEY_SLOTS {
            let (a0, a1) = range(i)?;
            for j in i.saturating_add(1)..KEY_SLOTS {
                let (b0, b1) = range(j)?;
                if a0 < b1 && b0 < a1 {
                    return Err(PureError::corrupt(
                        Structure::Luks1KeySlot(slot_u8(i)),
                        Self::slot_field(i, off.clone()),
                        Problem::KeySlotsOverlap { other: slot_u8(j) },
                    ));
                }
            }
        }
        for i in 0..KEY_SLOTS {
            let (a0, a1) = range(i)?;
            let st = Structure::Luks1KeySlot(slot_u8(i));
            if a0 < MIN_KEY_MATERIAL_SECTOR {
                return Err(PureError::corrupt(
                    st,
                    Self::slot_field(i, off.clone()),
                    Problem::KeySlotOverlapsHeader,
                ));
            }
            if self.payload_offset != 0 && a1 > self.payload_offset {
                return Err(PureError::corrupt(
                    st,
                    Self::slot_field(i, off.clone()),
                    Problem::KeySlotOverlapsPayload,
                ));
            }
        }
        Ok(())
    }

    /// The first byte after the last key slot's key material.
    pub fn key_material_end(&self) -> u64 {
        (0..KEY_SLOTS)
            .filter_map(|i| self.key_material_range(i))
            .map(|(_, e)| u64::from(e).saturating_mul(512))
            .max()
            .unwrap_or(0)
    }

    /// Refuses a header device too small for the key material (what
    /// cryptsetup calls "device too small").
    pub fn check_device_size(&self, size: u64) -> Result<(), PureError> {
        let needed = self.key_material_end();
        if size < needed {
            return Err(PureError::TooSmall {
                structure: Structure::Device,
                needed,
                size,
            });
        }
        Ok(())
    }

    /// Writes the header into `h` (bytes past [`HEADER_LEN`] are left
    /// alone).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Header<T>) -> Result<(), PureError> {
        h.check_len()?;
        h.m()[field::MAGIC].copy_from_slice(&MAGIC);
        h.m()[field::VERSION].copy_from_slice(&1u16.to_be_bytes());
        h.put_str(field::CIPHER_NAME, &self.cipher_name);
        h.put_str(field::CIPHER_MODE, &self.cipher_mode);
        h.put_str(field::HASH_SPEC, &self.hash_spec);
        h.put32(field::PAYLOAD_OFFSET.start, self.payload_offset);
        h.put32(field::KEY_BYTES.start, self.key_bytes);
        h.m()[field::MK_DIGEST].copy_from_slice(&self.mk_digest);
        h.m()[field::MK_DIGEST_SALT].copy_from_slice(&self.mk_digest_salt);
        h.put32(field::MK_DIGEST_ITER.start, self.mk_digest_iter);
        match &self.uuid_raw {
            Some(raw) => h.m()[field::UUID].copy_from_slice(raw),
            None => h.put_str(field::UUID, &self.uuid),
        }
        for (i, ks) in self.key_slots.iter().enumerate() {
            let base = field::KEY_SLOTS.saturating_add(i.saturating_mul(field::KEY_SLOT_LEN));
            h.put32(base, if ks.active { KEY_ENABLED } else { KEY_DISABLED });
            h.put32(base.saturating_add(4), ks.iterations);
            if let Some(s) = h
                .m()
                .get_mut(base.saturating_add(8)..base.saturating_add(40))
            {
                s.copy_from_slice(&ks.salt);
            }
            h.put32(base.saturating_add(40), ks.key_material_offset);
            h.put32(base.saturating_add(44), ks.stripes);
        }
        Ok(())
    }

    /// Reads text fields back for display, in case a caller wants names.
    pub fn cipher_spec_name(&self) -> Name {
        name_from(self.cipher_name.as_bytes())
    }
}

/// A `cryptsetup luksDump`-style text rendering of a header (see
/// [`HeaderRepr::dump`]). Prints no secrets: the header holds none.
#[derive(Debug, Clone, Copy)]
pub struct Dump<'a>(&'a HeaderRepr);

impl HeaderRepr {
    /// Renders the header the way `cryptsetup luksDump` lays it out.
    pub fn dump(&self) -> Dump<'_> {
        Dump(self)
    }
}

/// Hex bytes as cryptsetup prints them: `xx ` each, `per_line` to a line,
/// continuation lines starting with `indent`.
fn hex_line(
    f: &mut core::fmt::Formatter<'_>,
    b: &[u8],
    per_line: usize,
    indent: &str,
) -> core::fmt::Result {
    for (i, x) in b.iter().enumerate() {
        if i > 0 && i.checked_rem(per_line) == Some(0) {
            write!(f, "\n{indent}")?;
        }
        write!(f, "{x:02x} ")?;
    }
    f.write_str("\n")
}

impl core::fmt::Display for Dump<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let h = self.0;
        writeln!(f, "LUKS header information")?;
        writeln!(f)?;
        writeln!(f, "Version:       \t1")?;
        writeln!(f, "Cipher name:   \t{}", h.cipher_name)?;
        writeln!(f, "Cipher mode:   \t{}", h.cipher_mode)?;
        writeln!(f, "Hash spec:     \t{}", h.hash_spec)?;
        writeln!(f, "Payload offset:\t{}", h.payload_offset)?;
        writeln!(
            f,
            "MK bits:       \t{}",
            u64::from(h.key_bytes).saturating_mul(8)
        )?;
        f.write_str("MK digest:     \t")?;
        hex_line(f, &h.mk_digest, DIGEST_LEN, "               \t")?;
        f.write_str("MK salt:       \t")?;
        hex_line(f, &h.mk_digest_salt, 16, "               \t")?;
        writeln!(f, "MK iterations: \t{}", h.mk_digest_iter)?;
        writeln!(f, "UUID:          \t{}", h.uuid)?;
        writeln!(f)?;
        for (i, ks) in h.key_slots.iter().enumerate() {
            if ks.active {
                writeln!(f, "Key Slot {i}: ENABLED")?;
                writeln!(f, "\tIterations:         \t{}", ks.iterations)?;
                f.write_str("\tSalt:               \t")?;
                hex_line(f, &ks.salt, 16, "\t                      \t")?;
                writeln!(f, "\tKey material offset:\t{}", ks.key_material_offset)?;
                writeln!(f, "\tAF stripes:            \t{}", ks.stripes)?;
            } else {
                writeln!(f, "Key Slot {i}: DISABLED")?;
            }
        }
        Ok(())
    }
}
