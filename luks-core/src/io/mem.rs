//! A device over a caller-owned byte slice: no allocation, for firmware,
//! tests and fuzzing.

use core::fmt;

use super::{check_request, BlockIo, RequestError, MAX_SECTOR_SIZE};

/// Why a [`MemDevice`] request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemError {
    /// The request runs past the end of the slice.
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The device size.
        size: u64,
    },
    /// Offset or length is not a multiple of the sector size.
    Unaligned {
        /// Start of the request.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The device's sector size.
        sector_size: u32,
    },
    /// A write to a device made over a shared (read-only) slice.
    ReadOnly {
        /// Start of the refused write.
        offset: u64,
    },
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::OutOfRange { offset, len, size } => write!(
                f,
                "request of {len} bytes at offset {offset} runs past the end of the {size}-byte device"
            ),
            Self::Unaligned {
                offset,
                len,
                sector_size,
            } => write!(
                f,
                "request of {len} bytes at offset {offset} is not aligned to the {sector_size}-byte sector"
            ),
            Self::ReadOnly { offset } => {
                write!(f, "write at offset {offset} to a read-only memory device")
            }
        }
    }
}

impl core::error::Error for MemError {}

enum Backing<'a> {
    Shared(&'a [u8]),
    Exclusive(&'a mut [u8]),
}

/// A device over `&mut [u8]` (read-write) or `&[u8]` (read-only) of fixed
/// size.
pub struct MemDevice<'a> {
    data: Backing<'a>,
    sector_size: u32,
}

impl fmt::Debug for MemDevice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemDevice")
            .field("len", &self.bytes().len())
            .field("sector_size", &self.sector_size)
            .finish()
    }
}

impl<'a> MemDevice<'a> {
    /// A read-write device over `data`, byte-addressable (sector size 1).
    pub fn new(data: &'a mut [u8]) -> Self {
        Self {
            data: Backing::Exclusive(data),
            sector_size: 1,
        }
    }

    /// A read-only device over `data`, byte-addressable (sector size 1).
    pub fn read_only(data: &'a [u8]) -> Self {
        Self {
            data: Backing::Shared(data),
            sector_size: 1,
        }
    }

    /// The same device, demanding requests aligned to `sector_size`.
    /// Returns `None` unless `sector_size` is a power of two no larger than
    /// [`MAX_SECTOR_SIZE`].
    pub fn with_sector_size(mut self, sector_size: u32) -> Option<Self> {
        if !sector_size.is_power_of_two() || sector_size > MAX_SECTOR_SIZE {
            return None;
        }
        self.sector_size = sector_size;
        Some(self)
    }

    /// The bytes behind the device.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Backing::Shared(d) => d,
            Backing::Exclusive(d) => d,
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<core::ops::Range<usize>, MemError> {
        let size = self.bytes().len() as u64;
        check_request(offset, len, self.sector_size, size).map_err(|e| match e {
            RequestError::Unaligned => MemError::Unaligned {
                offset,
                len: len as u64,
                sector_size: self.sector_size,
            },
            RequestError::OutOfRange => MemError::OutOfRange {
                offset,
                len: len as u64,
                size,
            },
        })?;
        // In range of a slice (`check_request` saw `offset + len <= size`),
        // so the offset and the end fit in usize.
        let out_of_range = MemError::OutOfRange {
            offset,
            len: len as u64,
            size,
        };
        let start = usize::try_from(offset).map_err(|_| out_of_range)?;
        let end = start.checked_add(len).ok_or(out_of_range)?;
        Ok(start..end)
    }
}

impl BlockIo for MemDevice<'_> {
    type Error = MemError;

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&mut self) -> Result<u64, MemError> {
        Ok(self.bytes().len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes()[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
        let r = self.check(offset, buf.len())?;
        match &mut self.data {
            Backing::Shared(_) => Err(MemError::ReadOnly { offset }),
            Backing::Exclusive(d) => {
                d[r].copy_from_slice(buf);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> Result<(), MemError> {
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), MemError> {
        let n = usize::try_from(len).map_err(|_| MemError::OutOfRange {
            offset,
            len,
            size: self.bytes().len() as u64,
        })?;
        let r = self.check(offset, n)?;
        match &mut self.data {
            Backing::Shared(_) => Err(MemError::ReadOnly { offset }),
            Backing::Exclusive(d) => {
                d[r].fill(0);
                Ok(())
            }
        }
    }
}
