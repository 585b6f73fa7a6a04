//! The LUKS2 binary header (4096 bytes, two copies) as a view over bytes
//! plus a validated representation.
//!
//! Contract: once [`Header::new_checked`] passed, no accessor panics;
//! [`HeaderRepr::emit`] never panics on a buffer of
//! [`HeaderRepr::buffer_len`] bytes.

use crate::error::{name_from, Luks2Problem, Problem, PureError, Structure};

/// Offsets of the binary header fields (big-endian integers).
pub mod field {
    use core::ops::Range;
    /// `LUKS\xba\xbe` (primary) or `SKUL\xba\xbe` (secondary).
    pub const MAGIC: Range<usize> = 0..6;
    /// Version, 2.
    pub const VERSION: Range<usize> = 6..8;
    /// Size of this header copy: binary header plus JSON area.
    pub const HDR_SIZE: Range<usize> = 8..16;
    /// Sequence number, increased on every metadata update.
    pub const SEQID: Range<usize> = 16..24;
    /// Label, NUL padded.
    pub const LABEL: Range<usize> = 24..72;
    /// Checksum algorithm name (`sha256`).
    pub const CHECKSUM_ALG: Range<usize> = 72..104;
    /// Salt, different in each copy.
    pub const SALT: Range<usize> = 104..168;
    /// UUID, ASCII, NUL padded.
    pub const UUID: Range<usize> = 168..208;
    /// Subsystem label, NUL padded.
    pub const SUBSYSTEM: Range<usize> = 208..256;
    /// Byte offset of this copy on the device.
    pub const HDR_OFFSET: Range<usize> = 256..264;
    /// Checksum over the copy with this field zeroed.
    pub const CSUM: Range<usize> = 448..512;
}

/// The primary header's magic.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// The secondary header's magic.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// Bytes of the binary header (the JSON area follows).
pub const BINARY_LEN: usize = 4096;
/// The header copy sizes cryptsetup allows (binary header plus JSON area,
/// 16 KiB to 4 MiB); they are also where a scanner looks for the
/// secondary copy when the primary is damaged.
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];

/// A label or subsystem field (48 bytes).
pub type Label = heapless::String<48>;

header_view! {
    /// A view of a LUKS2 binary header over bytes.
    len: BINARY_LEN,
    structure: Structure::Luks2Header,
    magic: field::MAGIC,
    version: field::VERSION,
    what: "binary header",
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(..8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// A NUL-padded text field as a string: the bytes before the first NUL;
/// `None` if they are not printable ASCII.
fn text<const N: usize>(b: &[u8]) -> Option<heapless::String<N>> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let mut s = heapless::String::new();
    for &c in b.get(..end)? {
        if !(c.is_ascii_graphic() || c == b' ') {
            return None;
        }
        s.push(c as char).ok()?;
    }
    Some(s)
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Header copy size.
    pub fn hdr_size(&self) -> u64 {
        be64(&self.b()[field::HDR_SIZE])
    }
    /// Sequence id.
    pub fn seqid(&self) -> u64 {
        be64(&self.b()[field::SEQID])
    }
    /// Raw label field.
    pub fn label(&self) -> &[u8] {
        &self.b()[field::LABEL]
    }
    /// Raw checksum algorithm field.
    pub fn checksum_alg(&self) -> &[u8] {
        &self.b()[field::CHECKSUM_ALG]
    }
    /// Salt.
    pub fn salt(&self) -> &[u8] {
        &self.b()[field::SALT]
    }
    /// Raw UUID field.
    pub fn uuid(&self) -> &[u8] {
        &self.b()[field::UUID]
    }
    /// Raw subsystem field.
    pub fn subsystem(&self) -> &[u8] {
        &self.b()[field::SUBSYSTEM]
    }
    /// Byte offset of this copy.
    pub fn hdr_offset(&self) -> u64 {
        be64(&self.b()[field::HDR_OFFSET])
    }
    /// Checksum bytes.
    pub fn csum(&self) -> &[u8] {
        &self.b()[field::CSUM]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Sets the checksum bytes (the first `min(64, len)` of `c`, rest zero).
    pub fn set_csum(&mut self, c: &[u8]) {
        let f = &mut self.m()[field::CSUM];
        f.fill(0);
        let n = c.len().min(f.len());
        f[..n].copy_from_slice(&c[..n]);
    }
}

/// A validated binary header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Whether this is the secondary copy (magic `SKUL\xba\xbe`).
    pub secondary: bool,
    /// Header copy size (binary header plus JSON area), one of
    /// [`HDR_SIZES`].
    pub hdr_size: u64,
    /// Sequence id.
    pub seqid: u64,
    /// Label.
    pub label: Label,
    /// Checksum algorithm name.
    pub checksum_alg: crate::error::Name,
    /// Salt (random, unique per copy).
    pub salt: [u8; 64],
    /// UUID text.
    pub uuid: heapless::String<40>,
    /// Subsystem.
    pub subsystem: Label,
    /// Byte offset of this copy on the device.
    pub hdr_offset: u64,
    /// Stored checksum.
    pub csum: [u8; 64],
}

impl HeaderRepr {
    /// Parses a binary header (magic, version 2, a standard size, text
    /// fields). `at` is the copy's device offset, for error messages.
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>, at: u64) -> Result<Self, PureError> {
        h.check_len()?;
        let bad = |off: usize, p: Problem| {
            PureError::corrupt(Structure::Luks2Header, at.saturating_add(off as u64), p)
        };
        let secondary = if h.magic() == MAGIC_PRIMARY {
            false
        } else if h.magic() == MAGIC_SECONDARY {
            true
        } else {
            return Err(bad(field::MAGIC.start, Problem::BadMagic));
        };
        if h.version() != 2 {
            return Err(bad(field::VERSION.start, Problem::BadVersion(h.version())));
        }
        let hdr_size = h.hdr_size();
        if !HDR_SIZES.contains(&hdr_size) {
            return Err(bad(
                field::HDR_SIZE.start,
                Problem::Luks2(Luks2Problem::HeaderSize(hdr_size)),
            ));
        }
        let label = text(h.label()).ok_or(bad(field::LABEL.start, Problem::BadString))?;
        let checksum_alg = text::<32>(h.checksum_alg())
            .ok_or(bad(field::CHECKSUM_ALG.start, Problem::BadString))?;
        let uuid = text(h.uuid()).ok_or(bad(field::UUID.start, Problem::BadString))?;
        let subsystem =
            text(h.subsystem()).ok_or(bad(field::SUBSYSTEM.start, Problem::BadString))?;
        let mut salt = [0u8; 64];
        salt.copy_from_slice(h.salt());
        let mut csum = [0u8; 64];
        csum.copy_from_slice(h.csum());
        Ok(Self {
            secondary,
            hdr_size,
            seqid: h.seqid(),
            label,
            checksum_alg: name_from(checksum_alg.as_bytes()),
            salt,
            uuid,
            subsystem,
            hdr_offset: h.hdr_offset(),
            csum,
        })
    }

    /// Bytes `emit` writes.
    pub fn buffer_len(&self) -> usize {
        BINARY_LEN
    }

    /// Writes the binary header, the checksum field as stored in `csum`
    /// and everything else in the 4096 bytes zero.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Header<T>) -> Result<(), PureError> {
        h.check_len()?;
        let b = &mut h.m()[..BINARY_LEN];
        b.fill(0);
        b[field::MAGIC].copy_from_slice(if self.secondary {
            &MAGIC_SECONDARY
        } else {
            &MAGIC_PRIMARY
        });
        b[field::VERSION].copy_from_slice(&2u16.to_be_bytes());
        b[field::HDR_SIZE].copy_from_slice(&self.hdr_size.to_be_bytes());
        b[field::SEQID].copy_from_slice(&self.seqid.to_be_bytes());
        put_text(&mut b[field::LABEL], self.label.as_bytes());
        put_text(&mut b[field::CHECKSUM_ALG], self.checksum_alg.as_bytes());
        b[field::SALT].copy_from_slice(&self.salt);
        put_text(&mut b[field::UUID], self.uuid.as_bytes());
        put_text(&mut b[field::SUBSYSTEM], self.subsystem.as_bytes());
        b[field::HDR_OFFSET].copy_from_slice(&self.hdr_offset.to_be_bytes());
        b[field::CSUM].copy_from_slice(&self.csum);
        Ok(())
    }
}

/// Copies `s` into a NUL-padded field, keeping at least one NUL.
fn put_text(f: &mut [u8], s: &[u8]) {
    let n = s.len().min(f.len().saturating_sub(1));
    f[..n].copy_from_slice(&s[..n]);
}
