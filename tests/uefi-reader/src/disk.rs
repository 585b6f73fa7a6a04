//! The firmware's Block I/O protocol as a qimg sector device.

use core::fmt;

use luks_core::io::BlockIo;
use uefi::boot::ScopedProtocol;
use uefi::proto::media::block::BlockIO;

/// A whole disk, read-only.
pub struct Disk {
    proto: ScopedProtocol<BlockIO>,
    block: u32,
    media_id: u32,
    size: u64,
}

/// A Block I/O failure, with the request that failed.
#[derive(Debug)]
pub struct DiskError {
    what: &'static str,
    offset: u64,
    status: uefi::Status,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at byte {} failed: {:?}",
            self.what, self.offset, self.status
        )
    }
}

impl Disk {
    /// Wraps an opened Block I/O protocol.
    pub fn new(proto: ScopedProtocol<BlockIO>) -> Self {
        let media = proto.media();
        let block = media.block_size();
        let media_id = media.media_id();
        let size = media
            .last_block()
            .saturating_add(1)
            .saturating_mul(u64::from(block));
        Self {
            proto,
            block,
            media_id,
            size,
        }
    }

    fn err(what: &'static str, offset: u64, status: uefi::Status) -> DiskError {
        DiskError {
            what,
            offset,
            status,
        }
    }
}

impl BlockIo for Disk {
    type Error = DiskError;

    fn sector_size(&self) -> u32 {
        self.block
    }

    fn size(&mut self) -> Result<u64, DiskError> {
        Ok(self.size)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let bs = u64::from(self.block);
        if offset % bs != 0 || buf.len() as u64 % bs != 0 {
            return Err(Self::err(
                "unaligned read",
                offset,
                uefi::Status::INVALID_PARAMETER,
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.proto
            .read_blocks(self.media_id, offset / bs, buf)
            .map_err(|e| Self::err("read", offset, e.status()))
    }

    fn write_at(&mut self, offset: u64, _buf: &[u8]) -> Result<(), DiskError> {
        Err(Self::err(
            "write (the reader is read-only)",
            offset,
            uefi::Status::WRITE_PROTECTED,
        ))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}
