//! A sub-range of a device as a device of its own.

use core::fmt;

use super::BlockIo;

/// Why a [`Window`] request failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum WindowError<E> {
    /// The device underneath failed.
    Device(E),
    /// The request runs past the end of the window.
    OutOfRange {
        /// Start of the request, relative to the window.
        offset: u64,
        /// Its length.
        len: u64,
        /// The window length.
        size: u64,
    },
}

impl<E: fmt::Display> fmt::Display for WindowError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(e) => e.fmt(f),
            Self::OutOfRange { offset, len, size } => write!(
                f,
                "request of {len} bytes at offset {offset} runs past the end of the {size}-byte window"
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for WindowError<E> {}

/// `len` bytes of `dev` starting at `offset`, addressed from 0. Writes stay
/// inside the window; the window never grows.
#[derive(Debug)]
pub struct Window<D> {
    dev: D,
    offset: u64,
    len: u64,
}

impl<D: BlockIo> Window<D> {
    /// A window of `len` bytes at `offset` of `dev`. `offset` should be a
    /// multiple of the device's sector size for aligned requests to stay
    /// aligned.
    pub fn new(dev: D, offset: u64, len: u64) -> Self {
        Self { dev, offset, len }
    }

    /// The device underneath.
    pub fn into_inner(self) -> D {
        self.dev
    }

    fn map(&self, offset: u64, len: usize) -> Result<u64, WindowError<D::Error>> {
        let len64 = len as u64;
        let bad = WindowError::OutOfRange {
            offset,
            len: len64,
            size: self.len,
        };
        match offset.checked_add(len64) {
            Some(end) if end <= self.len => self.offset.checked_add(offset).ok_or(bad),
            _ => Err(bad),
        }
    }
}

impl<D: BlockIo> BlockIo for Window<D> {
    type Error = WindowError<D::Error>;

    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }

    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.len)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let at = self.map(offset, buf.len())?;
        self.dev.read_at(at, buf).map_err(WindowError::Device)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        let at = self.map(offset, buf.len())?;
        self.dev.write_at(at, buf).map_err(WindowError::Device)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.dev.flush().map_err(WindowError::Device)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let at = self.map(offset, 0)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(WindowError::OutOfRange {
                    offset,
                    len,
                    size: self.len,
                })
            }
        }
        self.dev.write_zeroes(at, len).map_err(WindowError::Device)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        let at = self.map(offset, 0)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.len => self.dev.discard(at, len).map_err(WindowError::Device),
            _ => Ok(()),
        }
    }
}
