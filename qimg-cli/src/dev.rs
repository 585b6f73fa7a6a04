//! Type-erased devices, so that layers of different kinds (a raw file, a
//! LUKS volume, a qcow2 image) stack under one error type.

use std::fmt;

use luks_core::io::BlockIo;

/// A device error from any layer, already rendered for a user.
#[derive(Debug)]
pub(crate) struct DevError(pub String);

impl fmt::Display for DevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DevError {}

/// Any device, with its errors rendered as [`DevError`].
pub(crate) type AnyDev = Box<dyn BlockIo<Error = DevError> + Send>;

/// Wraps a device so its errors become [`DevError`]s.
pub(crate) struct Erased<D>(pub D);

impl<D: BlockIo> BlockIo for Erased<D> {
    type Error = DevError;
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn size(&mut self) -> Result<u64, DevError> {
        self.0.size().map_err(erase)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.0.read_at(offset, buf).map_err(erase)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.0.write_at(offset, buf).map_err(erase)
    }
    fn write_at_consuming(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.0.write_at_consuming(offset, buf).map_err(erase)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.0.flush().map_err(erase)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DevError> {
        self.0.write_zeroes(offset, len).map_err(erase)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DevError> {
        self.0.discard(offset, len).map_err(erase)
    }
    fn set_size(&mut self, size: u64) -> Result<bool, DevError> {
        self.0.set_size(size).map_err(erase)
    }
}

fn erase<E: fmt::Display>(e: E) -> DevError {
    DevError(e.to_string())
}

/// Boxes `dev` as an [`AnyDev`].
pub(crate) fn erased<D: BlockIo + Send + 'static>(dev: D) -> AnyDev {
    Box::new(Erased(dev))
}

/// What an image says about a guest range without reading its data: the
/// fields of one `qemu-img map --output json` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockStatus {
    /// Bytes from the asked offset that share this status (at least 1).
    pub(crate) len: u64,
    /// Depth in the backing chain where the data lives (0 = this image).
    pub(crate) depth: u32,
    /// Allocated somewhere in the chain.
    pub(crate) present: bool,
    /// Reads as zero.
    pub(crate) zero: bool,
    /// Holds data to be read.
    pub(crate) data: bool,
    /// Stored compressed.
    pub(crate) compressed: bool,
    /// Host offset in the file at `depth`, when the data has one.
    pub(crate) offset: Option<u64>,
}

/// An opened image: a device of its virtual size, plus block status.
pub(crate) trait Source: BlockIo<Error = DevError> + Send {
    /// Status of the bytes from `offset`, for at most `max` bytes.
    fn block_status(&mut self, offset: u64, max: u64) -> Result<BlockStatus, DevError>;
}

/// A device whose every byte is data: at its own offset (`Flat::at_offsets`)
/// or with no host offset to show, as for a decrypted LUKS payload
/// (`Flat::hidden`).
pub(crate) struct Flat<D> {
    dev: D,
    offsets: bool,
}

impl<D> Flat<D> {
    /// Data at the same offset in the device.
    #[cfg(test)]
    pub(crate) fn at_offsets(dev: D) -> Self {
        Self { dev, offsets: true }
    }

    /// Data whose host location qemu-img does not report.
    pub(crate) fn hidden(dev: D) -> Self {
        Self {
            dev,
            offsets: false,
        }
    }
}

impl<D: BlockIo<Error = DevError>> BlockIo for Flat<D> {
    type Error = DevError;
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&mut self) -> Result<u64, DevError> {
        self.dev.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DevError> {
        self.dev.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DevError> {
        self.dev.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.dev.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DevError> {
        self.dev.write_zeroes(offset, len)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DevError> {
        self.dev.discard(offset, len)
    }
    fn set_size(&mut self, size: u64) -> Result<bool, DevError> {
        self.dev.set_size(size)
    }
}

impl<D: BlockIo<Error = DevError> + Send> Source for Flat<D> {
    fn block_status(&mut self, offset: u64, max: u64) -> Result<BlockStatus, DevError> {
        Ok(BlockStatus {
            len: max.max(1),
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: self.offsets.then_some(offset),
        })
    }
}
