//! A growable in-memory device (needs `alloc`).

extern crate alloc;

use alloc::vec::Vec;
use core::convert::Infallible;

use super::{BlockIo, MAX_SECTOR_SIZE};

/// A device backed by a `Vec<u8>`, byte-addressable by default.
///
/// Behaves like a sparse file: reads past the end return zeroes, writes past
/// the end grow it. Infallible except that it refuses nothing; sizes beyond
/// memory abort as any `Vec` does, so use it for tests and small images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VecDevice {
    data: Vec<u8>,
    sector_size: u32,
    flushes: u64,
}

impl VecDevice {
    /// An empty device.
    pub fn new() -> Self {
        Self::from_vec(Vec::new())
    }

    /// A device holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self {
            data,
            sector_size: 1,
            flushes: 0,
        }
    }

    /// The same device reporting `sector_size` (a power of two no larger
    /// than [`MAX_SECTOR_SIZE`]); `None` otherwise. Alignment is not
    /// enforced: this device serves any byte range.
    pub fn with_sector_size(mut self, sector_size: u32) -> Option<Self> {
        if !sector_size.is_power_of_two() || sector_size > MAX_SECTOR_SIZE {
            return None;
        }
        self.sector_size = sector_size;
        Some(self)
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// Gives back the bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }

    /// How many times `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes
    }

    fn range(offset: u64, len: usize) -> (usize, usize) {
        // A Vec cannot hold more than isize::MAX bytes, so any offset that
        // does not fit in usize is past the end; saturate and let the
        // callers treat it as such.
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        (start, start.saturating_add(len))
    }
}

impl BlockIo for VecDevice {
    type Error = Infallible;

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&mut self) -> Result<u64, Infallible> {
        Ok(self.data.len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Infallible> {
        let (start, end) = Self::range(offset, buf.len());
        buf.fill(0);
        // `end >= start`; `get` is `None` when `start` is past the end.
        if let Some(src) = self.data.get(start..end.min(self.data.len())) {
            buf[..src.len()].copy_from_slice(src);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Infallible> {
        let (start, end) = Self::range(offset, buf.len());
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        // A u64 count of flushes cannot reach its maximum.
        self.flushes = self.flushes.saturating_add(1);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Infallible> {
        let (start, end) = Self::range(offset, super::chunk_len(len, usize::MAX));
        if start < self.data.len() {
            let stop = end.min(self.data.len());
            self.data[start..stop].fill(0);
        }
        // Zeroes past the end still make the device that long, as writing
        // them would.
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        Ok(())
    }

    fn set_size(&mut self, size: u64) -> Result<bool, Infallible> {
        match usize::try_from(size) {
            Ok(n) => {
                self.data.resize(n, 0);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }
}
