//! The error model: no allocation, and every variant says what went wrong,
//! where (structure and byte offset), and so what a user can do about it.

use core::fmt;

/// A short name read from a header (cipher, mode or hash), kept without
/// allocation. Names longer than the LUKS1 field (32 bytes) are cut.
pub type Name = heapless::String<32>;

/// Makes a [`Name`] from bytes, replacing what is not UTF-8 and cutting at
/// 32 bytes.
#[cfg_attr(not(feature = "luks1"), allow(dead_code))]
pub(crate) fn name_from(s: &[u8]) -> Name {
    let mut n = Name::new();
    for &b in s.iter().take(32) {
        let c = if b.is_ascii_graphic() { b as char } else { '?' };
        if n.push(c).is_err() {
            break;
        }
    }
    n
}

/// The on-disk structure an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Structure {
    /// The LUKS1 partition header (`phdr`).
    Luks1Header,
    /// LUKS1 key slot `n` (0..8) in the header.
    Luks1KeySlot(u8),
    /// The anti-forensic key material of key slot `n`.
    KeyMaterial(u8),
    /// The LUKS2 binary header (primary or secondary copy).
    Luks2Header,
    /// The LUKS2 JSON metadata area.
    Luks2Json,
    /// The encrypted payload (data sectors).
    Payload,
    /// The whole device (its size).
    Device,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Luks1Header => f.write_str("LUKS1 header"),
            Self::Luks1KeySlot(n) => write!(f, "LUKS1 key slot {n}"),
            Self::KeyMaterial(n) => write!(f, "key material of key slot {n}"),
            Self::Luks2Header => f.write_str("LUKS2 binary header"),
            Self::Luks2Json => f.write_str("LUKS2 JSON metadata"),
            Self::Payload => f.write_str("encrypted payload"),
            Self::Device => f.write_str("device"),
        }
    }
}

/// What is wrong with a corrupt structure.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The magic bytes are not `LUKS\xba\xbe`.
    BadMagic,
    /// The version field is not the one this parser reads.
    BadVersion(u16),
    /// A text field (cipher, mode, hash, uuid) is not NUL-terminated ASCII.
    BadString,
    /// The key size is zero or larger than any supported cipher uses.
    BadKeyBytes(u32),
    /// A PBKDF2 iteration count of zero.
    ZeroIterations,
    /// A key-derivation cost above qimg's ceiling (`what` names the field).
    KdfCost {
        /// The field: `iterations`, `digest iterations`, `argon2 time x memory`.
        what: &'static str,
        /// The value found.
        value: u64,
        /// The ceiling it exceeds.
        ceiling: u64,
    },
    /// A key slot's active flag is neither enabled nor disabled.
    BadActiveFlag(u32),
    /// The stripe count is not the 4000 every LUKS1 implementation writes.
    BadStripes(u32),
    /// This key slot's key material overlaps that of key slot `other`.
    KeySlotsOverlap {
        /// The other key slot.
        other: u8,
    },
    /// The key material overlaps the first sector (the `phdr` itself).
    KeySlotOverlapsHeader,
    /// The key material runs into the encrypted payload.
    KeySlotOverlapsPayload,
    /// The key material lies (partly) past the end of the device.
    KeySlotPastEnd,
    /// A size or offset computed from the header overflows.
    Overflow,
    /// LUKS2 metadata is invalid.
    Luks2(Luks2Problem),
}

/// What is wrong with LUKS2 metadata (binary header or JSON). Field names
/// are the JSON member names (`keyslots`, `area.offset`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Luks2Problem {
    /// The header size is not one of 16 KiB .. 4 MiB.
    HeaderSize(u64),
    /// The copy's `hdr_offset` is not where it was found.
    HeaderOffset(u64),
    /// The checksum does not match the header and JSON area.
    Checksum,
    /// Neither header copy is valid.
    NoValidCopy,
    /// The JSON text is not valid JSON.
    JsonSyntax,
    /// The JSON nests deeper than the parser allows.
    JsonTooDeep,
    /// The JSON text is not NUL-terminated inside its area.
    JsonUnterminated,
    /// A required member is missing.
    Missing(&'static str),
    /// A member has the wrong JSON type.
    WrongType(&'static str),
    /// A member's value is out of range or malformed.
    BadValue(&'static str),
    /// More entries than this implementation holds.
    TooMany(&'static str),
    /// A reference to a key slot, segment or digest that does not exist.
    DanglingReference(&'static str),
    /// A key slot area lies outside the key slots area or overlaps another.
    AreaOutOfBounds,
}

impl fmt::Display for Luks2Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeaderSize(n) => write!(f, "header size {n} is not one of 16 KiB .. 4 MiB"),
            Self::HeaderOffset(n) => write!(f, "header copy says it lives at offset {n}"),
            Self::Checksum => f.write_str("checksum mismatch"),
            Self::NoValidCopy => f.write_str("neither header copy is valid"),
            Self::JsonSyntax => f.write_str("JSON syntax error"),
            Self::JsonTooDeep => f.write_str("JSON nests too deep"),
            Self::JsonUnterminated => f.write_str("JSON text is not NUL-terminated in its area"),
            Self::Missing(m) => write!(f, "member `{m}` is missing"),
            Self::WrongType(m) => write!(f, "member `{m}` has the wrong type"),
            Self::BadValue(m) => write!(f, "member `{m}` has an invalid value"),
            Self::TooMany(m) => write!(f, "too many `{m}` entries"),
            Self::DanglingReference(m) => write!(f, "`{m}` refers to an entry that does not exist"),
            Self::AreaOutOfBounds => f.write_str("key slot area lies outside the key slots area"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("bad magic (not a LUKS header)"),
            Self::BadVersion(v) => write!(f, "version {v} where 1 was expected"),
            Self::BadString => f.write_str("text field is not NUL-terminated ASCII"),
            Self::BadKeyBytes(n) => write!(f, "key size of {n} bytes is invalid"),
            Self::ZeroIterations => f.write_str("PBKDF2 iteration count is 0"),
            Self::KdfCost {
                what,
                value,
                ceiling,
            } => write!(
                f,
                "{what} {value} is above the ceiling of {ceiling} (no tool writes such a cost; deriving it would run for hours)"
            ),
            Self::BadActiveFlag(v) => write!(f, "active flag {v:#010x} is invalid"),
            Self::BadStripes(n) => write!(f, "corrupted: stripes {n} != 4000"),
            Self::KeySlotsOverlap { other } => {
                write!(f, "overlaps the key material of key slot {other}")
            }
            Self::KeySlotOverlapsHeader => f.write_str("key material overlaps the header"),
            Self::KeySlotOverlapsPayload => f.write_str("overlaps the encrypted payload"),
            Self::KeySlotPastEnd => f.write_str("key material lies past the end of the device"),
            Self::Overflow => f.write_str("offset or size overflows"),
            Self::Luks2(p) => write!(f, "{p}"),
        }
    }
}

/// Something valid that this implementation does not support.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// Unknown block cipher name.
    Cipher(Name),
    /// Unknown cipher mode or IV generator.
    CipherMode(Name),
    /// Unknown hash name.
    Hash(Name),
    /// The cipher and mode do not take a key of this size.
    KeySize {
        /// The cipher spec (`aes`, `serpent`, ...).
        cipher: Name,
        /// The key size in bytes.
        bytes: u32,
    },
    /// A data sector size outside 512..=4096 or not a power of two.
    SectorSize(u32),
    /// A key larger than [`crate::MAX_KEY_BYTES`].
    KeyTooLarge(u32),
    /// A LUKS2 volume with a mandatory requirement this implementation
    /// does not know (for example an interrupted re-encryption).
    Requirement(Name),
    /// A LUKS2 key slot, KDF, AF, area, digest or segment type this
    /// implementation does not know.
    Luks2Type(Name),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cipher(n) => write!(f, "cipher `{n}` is not supported"),
            Self::CipherMode(n) => write!(f, "cipher mode `{n}` is not supported"),
            Self::Hash(n) => write!(f, "hash `{n}` is not supported"),
            Self::KeySize { cipher, bytes } => {
                write!(f, "cipher `{cipher}` does not take a {bytes}-byte key")
            }
            Self::SectorSize(s) => write!(f, "sector size {s} is not supported"),
            Self::KeyTooLarge(n) => write!(f, "key of {n} bytes is larger than supported"),
            Self::Requirement(n) => write!(
                f,
                "the LUKS2 header has the mandatory requirement `{n}`, which is not supported (finish it with cryptsetup first)"
            ),
            Self::Luks2Type(n) => write!(f, "LUKS2 type `{n}` is not supported"),
        }
    }
}

/// A caller-supplied parameter that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BadParameter {
    /// PBKDF2 iterations of zero.
    ZeroIterations,
    /// A payload offset that would overlap the key material.
    PayloadOffsetTooSmall {
        /// The smallest payload offset (512-byte sectors) that works.
        minimum: u64,
    },
    /// A key slot number outside 0..8.
    KeySlotIndex(u8),
    /// A passphrase longer than [`crate::MAX_PASSPHRASE_LEN`].
    PassphraseTooLong,
    /// An I/O request not aligned to the 512-byte sector.
    Unaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
    },
    /// An I/O request past the end of the volume.
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The volume size.
        size: u64,
    },
}

impl fmt::Display for BadParameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroIterations => f.write_str("PBKDF2 iterations must be at least 1"),
            Self::PayloadOffsetTooSmall { minimum } => write!(
                f,
                "payload offset overlaps the key material; use at least {minimum} sectors"
            ),
            Self::KeySlotIndex(n) => write!(f, "key slot {n} does not exist (use 0..7)"),
            Self::PassphraseTooLong => f.write_str("passphrase is too long"),
            Self::Unaligned { offset, len } => write!(
                f,
                "request of {len} bytes at offset {offset} is not aligned to the sector size"
            ),
            Self::OutOfRange { offset, len, size } => write!(
                f,
                "request of {len} bytes at offset {offset} runs past the end of the {size}-byte volume"
            ),
        }
    }
}

/// Everything that can go wrong in `luks-core`, generic over the device's
/// own error `E`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The device failed while reading or writing `structure` at `offset`.
    Io {
        /// The device's error.
        source: E,
        /// What was being read or written.
        structure: Structure,
        /// Byte offset on the device.
        offset: u64,
    },
    /// The buffer handed in is smaller than the structure needs.
    BufferTooSmall {
        /// What the buffer was for.
        structure: Structure,
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        given: usize,
    },
    /// An on-disk structure is damaged or was written by a broken tool.
    Corrupt {
        /// The structure at fault.
        structure: Structure,
        /// Byte offset of the offending field on the device.
        offset: u64,
        /// What is wrong.
        problem: Problem,
    },
    /// The volume uses something this implementation does not support.
    Unsupported(Unsupported),
    /// No key slot opened with the passphrase given.
    WrongPassphrase,
    /// The header has no active key slot, so nothing can unlock it.
    NoActiveKeySlot,
    /// The key slot asked for is not active.
    KeySlotNotActive(u8),
    /// Every key slot is in use.
    NoFreeKeySlot,
    /// Removing this key slot would leave no way to unlock the volume.
    LastKeySlot(u8),
    /// The device is smaller than the header says it must be.
    TooSmall {
        /// What needs the space.
        structure: Structure,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        size: u64,
    },
    /// The random number generator failed.
    Rng,
    /// A parameter given by the caller cannot work.
    BadParameter(BadParameter),
    /// An Argon2 key slot needs more memory than the caller provided.
    KdfMemory {
        /// The key slot.
        slot: u8,
        /// KiB the slot asks for.
        needed_kib: u64,
        /// KiB provided.
        given_kib: u64,
    },
    /// The key slot opened, but its key is not the data segment's key
    /// (an unbound LUKS2 key slot); it never unlocks data.
    KeySlotUnbound(u8),
}

impl<E> Error<E> {
    #[cfg_attr(not(feature = "luks1"), allow(dead_code))]
    pub(crate) fn corrupt(structure: Structure, offset: u64, problem: Problem) -> Self {
        Self::Corrupt {
            structure,
            offset,
            problem,
        }
    }

    /// Maps the device error type.
    pub fn map_io<F>(self, f: impl FnOnce(E) -> F) -> Error<F> {
        match self {
            Self::Io {
                source,
                structure,
                offset,
            } => Error::Io {
                source: f(source),
                structure,
                offset,
            },
            Self::BufferTooSmall {
                structure,
                needed,
                given,
            } => Error::BufferTooSmall {
                structure,
                needed,
                given,
            },
            Self::Corrupt {
                structure,
                offset,
                problem,
            } => Error::Corrupt {
                structure,
                offset,
                problem,
            },
            Self::Unsupported(u) => Error::Unsupported(u),
            Self::WrongPassphrase => Error::WrongPassphrase,
            Self::NoActiveKeySlot => Error::NoActiveKeySlot,
            Self::KeySlotNotActive(n) => Error::KeySlotNotActive(n),
            Self::NoFreeKeySlot => Error::NoFreeKeySlot,
            Self::LastKeySlot(n) => Error::LastKeySlot(n),
            Self::TooSmall {
                structure,
                needed,
                size,
            } => Error::TooSmall {
                structure,
                needed,
                size,
            },
            Self::Rng => Error::Rng,
            Self::BadParameter(p) => Error::BadParameter(p),
            Self::KdfMemory {
                slot,
                needed_kib,
                given_kib,
            } => Error::KdfMemory {
                slot,
                needed_kib,
                given_kib,
            },
            Self::KeySlotUnbound(n) => Error::KeySlotUnbound(n),
        }
    }
}

/// Errors that involve no device at all (parsing a buffer, building a
/// cipher).
pub type PureError = Error<core::convert::Infallible>;

impl PureError {
    /// Turns an error with no device into one for any device type.
    pub fn widen<E>(self) -> Error<E> {
        self.map_io(|never| match never {})
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                source,
                structure,
                offset,
            } => write!(
                f,
                "I/O error on the {structure} at offset {offset}: {source}"
            ),
            Self::BufferTooSmall {
                structure,
                needed,
                given,
            } => write!(
                f,
                "buffer for the {structure} holds {given} bytes, {needed} are needed"
            ),
            Self::Corrupt {
                structure,
                offset,
                problem,
            } => match (structure, problem) {
                (Structure::Luks1KeySlot(a), Problem::KeySlotsOverlap { other }) => write!(
                    f,
                    "key slots {a} and {other} overlap (header byte {offset}); the header is damaged, restore a header backup"
                ),
                (Structure::Luks1KeySlot(a), Problem::BadStripes(_)) => write!(
                    f,
                    "key slot {a} is {problem} (header byte {offset}); the header is damaged, restore a header backup"
                ),
                (Structure::Luks1KeySlot(a), Problem::KeySlotOverlapsPayload) => write!(
                    f,
                    "key slot {a} overlaps the encrypted payload (header byte {offset}); the header is damaged, restore a header backup"
                ),
                _ => write!(
                    f,
                    "{structure} is corrupt at byte {offset}: {problem}; restore a header backup or check this is the right device"
                ),
            },
            Self::Unsupported(u) => write!(f, "{u}; this volume cannot be opened by qimg"),
            Self::WrongPassphrase => f.write_str(
                "no key slot opened with this passphrase; check the passphrase or key file",
            ),
            Self::NoActiveKeySlot => f.write_str(
                "the header has no active key slot, so no passphrase can unlock it; restore a header backup",
            ),
            Self::KeySlotNotActive(n) => {
                write!(f, "key slot {n} is not active; choose an active key slot")
            }
            Self::NoFreeKeySlot => f.write_str(
                "all key slots (or the key slots area) are in use; remove one first",
            ),
            Self::LastKeySlot(n) => write!(
                f,
                "key slot {n} is the last usable key slot; removing it would lock the data away (force it to proceed)"
            ),
            Self::TooSmall {
                structure: Structure::Device,
                needed,
                size,
            } => write!(
                f,
                "device too small: its header requires at least {needed} bytes, the device has {size}; the device was truncated or this is the wrong device"
            ),
            Self::TooSmall {
                structure,
                needed,
                size,
            } => write!(
                f,
                "device too small: the {structure} needs at least {needed} bytes, the device has {size}"
            ),
            Self::Rng => f.write_str("the random number generator failed; try again"),
            Self::BadParameter(p) => write!(f, "invalid parameter: {p}"),
            Self::KdfMemory {
                slot,
                needed_kib,
                given_kib,
            } => write!(
                f,
                "key slot {slot} needs {needed_kib} KiB of Argon2 memory, only {given_kib} KiB are available; use another key slot or give more memory"
            ),
            Self::KeySlotUnbound(n) => write!(
                f,
                "key slot {n} is unbound (its key is not the data segment's key) and cannot unlock data"
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}

/// A key slot index as `u8` (indices are below 8; larger values saturate).
#[cfg_attr(not(feature = "luks1"), allow(dead_code))]
pub(crate) fn slot_u8(i: usize) -> u8 {
    u8::try_from(i).unwrap_or(u8::MAX)
}
