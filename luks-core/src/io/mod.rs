//! Sector I/O: the one trait every layer reads and writes through.
//!
//! A [`BlockIo`] is a device of `size()` bytes addressed by `u64` byte
//! offsets, read and written in whole sectors of `sector_size()` bytes into
//! buffers the caller owns. Nothing here allocates.
//!
//! Layers compose as decorators: a LUKS volume over a `BlockIo` is a
//! `BlockIo`; a qcow2 image over a `BlockIo` is a `BlockIo`.
//!
//! Contract for implementors:
//! - `sector_size()` is a power of two between 1 and [`MAX_SECTOR_SIZE`] and
//!   never changes for the life of the value.
//! - `read_at`/`write_at` may require `offset` and `buf.len()` to be
//!   multiples of `sector_size()`; they return an error (never panic) when
//!   they are not, or when the range lies outside the device.
//! - `write_zeroes` and `discard` have correct default implementations:
//!   `write_zeroes` writes zero sectors; `discard` is advisory and does
//!   nothing (after a discard the content of the range is unspecified, so a
//!   caller that needs zeroes calls `write_zeroes`).
//!
//! Callers that need byte granularity use [`read_bytes`] and [`write_bytes`],
//! which go through a caller-provided bounce buffer for the partial sectors
//! at either end.

use core::fmt;

mod mem;
pub use mem::{MemDevice, MemError};

mod window;
pub use window::{Window, WindowError};

#[cfg(feature = "alloc")]
mod boxed;
#[cfg(feature = "alloc")]
mod vec;
#[cfg(feature = "alloc")]
pub use vec::VecDevice;

#[cfg(feature = "alloc")]
mod faulty;
#[cfg(feature = "alloc")]
pub use faulty::{FaultyDevice, FaultyError, WriteKind, WriteRecord};

#[cfg(feature = "std")]
mod file;
#[cfg(feature = "std")]
pub use file::{FileDevice, FileError, FileOp, SyncPolicy};

/// The largest sector size any device may report (64 KiB).
///
/// Bounds the static zero buffer used by the default `write_zeroes`, and is
/// far above the 4096-byte sectors real disks and LUKS2 use.
pub const MAX_SECTOR_SIZE: u32 = 64 * 1024;

/// Zeroes for the default [`BlockIo::write_zeroes`]; one maximal sector.
static ZEROES: [u8; MAX_SECTOR_SIZE as usize] = [0; MAX_SECTOR_SIZE as usize];

/// A device read and written in sectors through caller-owned buffers.
///
/// See the [module documentation](self) for the contract.
pub trait BlockIo {
    /// What went wrong in the device itself.
    type Error: fmt::Debug + fmt::Display;

    /// Bytes per sector: a power of two in `1..=MAX_SECTOR_SIZE`.
    fn sector_size(&self) -> u32;

    /// The device size in bytes.
    fn size(&mut self) -> Result<u64, Self::Error>;

    /// Fills `buf` from the bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;

    /// Writes `buf` at `offset`. Writing past the end may grow a device that
    /// can grow (a file); others return an error.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error>;

    /// Writes `buf` at `offset` as [`Self::write_at`] does, but may leave
    /// any bytes in `buf` afterwards: a caller that no longer needs its
    /// buffer lets an encrypting layer encrypt in place instead of into a
    /// copy. The default calls [`Self::write_at`] and leaves `buf` as it
    /// was.
    fn write_at_consuming(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.write_at(offset, buf)
    }

    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), Self::Error>;

    /// Makes `len` bytes at `offset` read as zero.
    ///
    /// The default writes zero sectors; devices with a cheaper way (a sparse
    /// file's hole punch, a qcow2 zero flag) override it.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let mut done = 0u64;
        while done < len {
            // `done < len` and `step <= len - done`: nothing saturates.
            let step = chunk_len(len.saturating_sub(done), ZEROES.len());
            self.write_at(offset.saturating_add(done), &ZEROES[..step])?;
            done = done.saturating_add(step as u64);
        }
        Ok(())
    }

    /// Tells the device that `len` bytes at `offset` are no longer needed.
    ///
    /// Advisory: the default does nothing, and afterwards the range's
    /// content is unspecified (it may still hold the old data).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let _ = (offset, len);
        Ok(())
    }

    /// Changes the device size, when the device can. Returns `Ok(false)` for
    /// devices of fixed size (the default).
    fn set_size(&mut self, size: u64) -> Result<bool, Self::Error> {
        let _ = size;
        Ok(false)
    }
}

/// Implements `BlockIo` for a pointer type by forwarding every method,
/// defaults included, to the device it points at.
macro_rules! forward_block_io {
    ($($ptr:tt)*) => {
        impl<T: BlockIo + ?Sized> BlockIo for $($ptr)* {
            type Error = T::Error;
            fn sector_size(&self) -> u32 {
                (**self).sector_size()
            }
            fn size(&mut self) -> Result<u64, Self::Error> {
                (**self).size()
            }
            fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
                (**self).read_at(offset, buf)
            }
            fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
                (**self).write_at(offset, buf)
            }
            fn write_at_consuming(
                &mut self,
                offset: u64,
                buf: &mut [u8],
            ) -> Result<(), Self::Error> {
                (**self).write_at_consuming(offset, buf)
            }
            fn flush(&mut self) -> Result<(), Self::Error> {
                (**self).flush()
            }
            fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
                (**self).write_zeroes(offset, len)
            }
            fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
                (**self).discard(offset, len)
            }
            fn set_size(&mut self, size: u64) -> Result<bool, Self::Error> {
                (**self).set_size(size)
            }
        }
    };
}
#[cfg(feature = "alloc")]
pub(crate) use forward_block_io;

forward_block_io!(&mut T);

/// `min(remaining, cap)` as a `usize`, without a lossy cast.
pub(crate) fn chunk_len(remaining: u64, cap: usize) -> usize {
    usize::try_from(remaining).map_or(cap, |r| r.min(cap))
}

/// Why a byte-granular request through [`read_bytes`]/[`write_bytes`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum BytesError<E> {
    /// The device failed.
    Device(E),
    /// The bounce buffer is smaller than one sector of the device.
    BounceTooSmall {
        /// The device's sector size.
        sector_size: u32,
        /// The bounce buffer's length.
        bounce_len: usize,
    },
    /// The device reported a sector size that is not a power of two in
    /// `1..=MAX_SECTOR_SIZE`.
    BadSectorSize(u32),
    /// `offset + len` does not fit in a `u64`.
    RangeOverflow {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: usize,
    },
}

impl<E: fmt::Display> fmt::Display for BytesError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(e) => e.fmt(f),
            Self::BounceTooSmall {
                sector_size,
                bounce_len,
            } => write!(
                f,
                "bounce buffer of {bounce_len} bytes is smaller than the {sector_size}-byte sector"
            ),
            Self::BadSectorSize(s) => write!(f, "device reports an invalid sector size of {s}"),
            Self::RangeOverflow { offset, len } => {
                write!(f, "request of {len} bytes at offset {offset} overflows u64")
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for BytesError<E> {}

/// Checks the sector size and the bounce buffer, and returns the sector size.
fn bounce_geometry<E>(sector_size: u32, bounce: &[u8]) -> Result<usize, BytesError<E>> {
    if !sector_size.is_power_of_two() || sector_size > MAX_SECTOR_SIZE {
        return Err(BytesError::BadSectorSize(sector_size));
    }
    let ss = sector_size as usize;
    if bounce.len() < ss {
        return Err(BytesError::BounceTooSmall {
            sector_size,
            bounce_len: bounce.len(),
        });
    }
    Ok(ss)
}

/// A request split into a partial head sector, an aligned middle and a
/// partial tail sector, with every offset precomputed (and checked) so the
/// readers and writers below only index.
struct Split {
    /// Sector-aligned offset of the head sector.
    head_sector: u64,
    /// Where the request starts inside the head sector.
    head_skip: usize,
    /// Where the request's bytes in the head sector end
    /// (`head_skip + head_len`, at most one sector).
    head_end: usize,
    /// Bytes of the request that fall in the head sector (0 if aligned).
    head_len: usize,
    /// Device offset of the aligned middle (`offset + head_len`).
    mid_off: u64,
    /// End of the middle in the caller's buffer (`head_len + mid_len`).
    mid_end: usize,
    /// Bytes of the aligned middle (a multiple of the sector size).
    mid_len: usize,
    /// Device offset of the tail sector (`mid_off + mid_len`).
    tail_off: u64,
    /// Bytes in the tail sector (0 if the end is aligned).
    tail_len: usize,
}

fn split<E>(offset: u64, len: usize, ss: usize) -> Result<Split, BytesError<E>> {
    // `offset + len` fits in u64 (checked first), `ss` is a non-zero power
    // of two and `head_len <= len`, so none of the checks below can fail
    // once the first passed; they keep the proof in the types.
    let overflow = || BytesError::RangeOverflow { offset, len };
    let len64 = len as u64;
    offset.checked_add(len64).ok_or_else(overflow)?;
    let ss64 = ss as u64;
    let skip64 = offset.checked_rem(ss64).ok_or_else(overflow)?;
    // `skip64 < ss <= MAX_SECTOR_SIZE`, so the conversion is exact.
    let head_skip = usize::try_from(skip64).unwrap_or(0);
    let head_sector = offset.checked_sub(skip64).ok_or_else(overflow)?;
    let head_len = if head_skip == 0 {
        0
    } else {
        ss.checked_sub(head_skip).ok_or_else(overflow)?.min(len)
    };
    let head_end = head_skip.checked_add(head_len).ok_or_else(overflow)?;
    let rest = len.checked_sub(head_len).ok_or_else(overflow)?;
    let tail_len = rest.checked_rem(ss).ok_or_else(overflow)?;
    let mid_len = rest.checked_sub(tail_len).ok_or_else(overflow)?;
    let mid_end = head_len.checked_add(mid_len).ok_or_else(overflow)?;
    let mid_off = offset.checked_add(head_len as u64).ok_or_else(overflow)?;
    let tail_off = mid_off.checked_add(mid_len as u64).ok_or_else(overflow)?;
    Ok(Split {
        head_sector,
        head_skip,
        head_end,
        head_len,
        mid_off,
        mid_end,
        mid_len,
        tail_off,
        tail_len,
    })
}

/// Reads `buf.len()` bytes at any byte `offset`, through `bounce` for the
/// partial sectors at either end. `bounce` must hold at least one sector.
///
/// The aligned middle of the request is read straight into `buf`.
pub fn read_bytes<D: BlockIo + ?Sized>(
    dev: &mut D,
    offset: u64,
    buf: &mut [u8],
    bounce: &mut [u8],
) -> Result<(), BytesError<D::Error>> {
    let ss = bounce_geometry(dev.sector_size(), bounce)?;
    if buf.is_empty() {
        return Ok(());
    }
    let s = split(offset, buf.len(), ss)?;
    let sector = &mut bounce[..ss];
    if s.head_len > 0 {
        dev.read_at(s.head_sector, sector)
            .map_err(BytesError::Device)?;
        buf[..s.head_len].copy_from_slice(&sector[s.head_skip..s.head_end]);
    }
    if s.mid_len > 0 {
        dev.read_at(s.mid_off, &mut buf[s.head_len..s.mid_end])
            .map_err(BytesError::Device)?;
    }
    if s.tail_len > 0 {
        dev.read_at(s.tail_off, sector)
            .map_err(BytesError::Device)?;
        buf[s.mid_end..].copy_from_slice(&sector[..s.tail_len]);
    }
    Ok(())
}

/// Writes `buf` at any byte `offset`, reading and rewriting the partial
/// sectors at either end through `bounce` (at least one sector).
pub fn write_bytes<D: BlockIo + ?Sized>(
    dev: &mut D,
    offset: u64,
    buf: &[u8],
    bounce: &mut [u8],
) -> Result<(), BytesError<D::Error>> {
    let ss = bounce_geometry(dev.sector_size(), bounce)?;
    if buf.is_empty() {
        return Ok(());
    }
    let s = split(offset, buf.len(), ss)?;
    let sector = &mut bounce[..ss];
    if s.head_len > 0 {
        read_for_update(dev, s.head_sector, sector)?;
        sector[s.head_skip..s.head_end].copy_from_slice(&buf[..s.head_len]);
        dev.write_at(s.head_sector, sector)
            .map_err(BytesError::Device)?;
    }
    if s.mid_len > 0 {
        dev.write_at(s.mid_off, &buf[s.head_len..s.mid_end])
            .map_err(BytesError::Device)?;
    }
    if s.tail_len > 0 {
        read_for_update(dev, s.tail_off, sector)?;
        sector[..s.tail_len].copy_from_slice(&buf[s.mid_end..]);
        dev.write_at(s.tail_off, sector)
            .map_err(BytesError::Device)?;
    }
    Ok(())
}

/// Reads a sector about to be partly overwritten. A sector wholly past the
/// end of a growable device reads as zeroes instead of failing.
fn read_for_update<D: BlockIo + ?Sized>(
    dev: &mut D,
    at: u64,
    sector: &mut [u8],
) -> Result<(), BytesError<D::Error>> {
    let size = dev.size().map_err(BytesError::Device)?;
    if at >= size {
        sector.fill(0);
        Ok(())
    } else {
        dev.read_at(at, sector).map_err(BytesError::Device)
    }
}

/// Checks that a request lies inside a device of `size` bytes and is aligned
/// to `sector_size`; shared by the adapters.
pub(crate) fn check_request(
    offset: u64,
    len: usize,
    sector_size: u32,
    size: u64,
) -> Result<(), RequestError> {
    let ss = u64::from(sector_size);
    let len64 = len as u64;
    if !offset.is_multiple_of(ss) || !len64.is_multiple_of(ss) {
        return Err(RequestError::Unaligned);
    }
    match offset.checked_add(len64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(RequestError::OutOfRange),
    }
}

/// What [`check_request`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestError {
    Unaligned,
    OutOfRange,
}

#[cfg(test)]
mod tests;
