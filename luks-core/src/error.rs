//! The error model: no allocation, and every variant says what went wrong,
//! where (structure and byte offset), and so what a user can do about it.

use core::fmt;

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
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}
