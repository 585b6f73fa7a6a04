//! A raw file as a [`Source`]: every byte is data at its own offset, except
//! the holes the filesystem reports (SEEK_DATA / SEEK_HOLE), which read as
//! zero, as qemu-img map shows them.

use std::fs::File;

use luks_core::io::{BlockIo, FileDevice};

use crate::dev::{BlockStatus, DevError, Source};

/// A raw image file.
pub(crate) struct RawFile {
    dev: FileDevice,
    /// Whether the filesystem answers SEEK_DATA/SEEK_HOLE.
    seek_holes: bool,
}

impl RawFile {
    /// Wraps an open file.
    pub(crate) fn new(file: File) -> Self {
        Self {
            dev: FileDevice::new(file),
            seek_holes: true,
        }
    }

    #[cfg(target_os = "linux")]
    fn hole_status(&mut self, offset: u64, max: u64) -> Option<(bool, u64)> {
        use nix::unistd::{lseek, Whence};
        let fd = self.dev.file();
        let off = i64::try_from(offset).ok()?;
        // Where the next data starts: if not here, we are in a hole.
        match lseek(fd, off, Whence::SeekData) {
            Ok(d) if d > off => Some((false, (u64::try_from(d).ok()? - offset).min(max))),
            Ok(_) => {
                let h = lseek(fd, off, Whence::SeekHole).ok()?;
                Some((
                    true,
                    (u64::try_from(h).ok()?.saturating_sub(offset)).clamp(1, max),
                ))
            }
            // ENXIO: no data after `offset`: a hole to the end.
            Err(nix::errno::Errno::ENXIO) => Some((false, max)),
            Err(_) => {
                self.seek_holes = false;
                None
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn hole_status(&mut self, _offset: u64, _max: u64) -> Option<(bool, u64)> {
        None
    }
}

impl BlockIo for RawFile {
    type Error = DevError;
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&mut self) -> Result<u64, DevError> {
        self.dev.size().map_err(|e| DevError(e.to_string()))
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.dev
            .read_at(offset, buf)
            .map_err(|e| DevError(e.to_string()))
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.dev
            .write_at(offset, buf)
            .map_err(|e| DevError(e.to_string()))
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.dev.flush().map_err(|e| DevError(e.to_string()))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DevError> {
        self.dev
            .write_zeroes(offset, len)
            .map_err(|e| DevError(e.to_string()))
    }
    fn set_size(&mut self, size: u64) -> Result<bool, DevError> {
        self.dev.set_size(size).map_err(|e| DevError(e.to_string()))
    }
}

impl Source for RawFile {
    fn block_status(&mut self, offset: u64, max: u64) -> Result<BlockStatus, DevError> {
        let (data, len) = if self.seek_holes {
            self.hole_status(offset, max).unwrap_or((true, max))
        } else {
            (true, max)
        };
        Ok(BlockStatus {
            len: len.max(1),
            depth: 0,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(offset),
        })
    }
}
