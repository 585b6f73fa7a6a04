//! A firmware Block I/O device (a whole disk or a partition) as a qimg
//! sector device, read-only.
//!
//! Safe code only, and the one source of this device: qimg-efi opens the
//! protocol shared (`ffi::open_shared`, GET_PROTOCOL, so the drivers bound
//! to it stay connected); the firmware reader test
//! (`tests/uefi-reader`) includes this file by `#[path]` and opens it
//! exclusively.

use alloc::string::String;
use core::fmt;

use luks_core::io::BlockIo;
use uefi::boot::ScopedProtocol;
use uefi::proto::media::block::BlockIO;

/// A firmware block device, read-only.
pub struct Disk {
    proto: ScopedProtocol<BlockIO>,
    block: u32,
    media_id: u32,
    io_align: u32,
    size: u64,
    name: String,
}

/// A Block I/O failure, naming the device and the request that failed.
#[derive(Debug)]
pub struct DiskError {
    device: String,
    what: &'static str,
    offset: u64,
    status: uefi::Status,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} at byte {} failed: {:?}",
            self.device, self.what, self.offset, self.status
        )
    }
}

impl Disk {
    /// Takes an opened Block I/O protocol; `name` names the device in
    /// messages. `None` if it has no media (or a block size of 0).
    pub fn new(proto: ScopedProtocol<BlockIO>, name: String) -> Option<Self> {
        let media = proto.media();
        if !media.is_media_present() || media.block_size() == 0 {
            return None;
        }
        let block = media.block_size();
        let media_id = media.media_id();
        let io_align = media.io_align();
        let size = media
            .last_block()
            .saturating_add(1)
            .saturating_mul(u64::from(block));
        Some(Self {
            proto,
            block,
            media_id,
            io_align,
            size,
            name,
        })
    }

    /// The buffer alignment the device asks for (0 or 1: none).
    pub fn io_align(&self) -> u32 {
        self.io_align
    }

    fn err(&self, what: &'static str, offset: u64, status: uefi::Status) -> DiskError {
        DiskError {
            device: self.name.clone(),
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
        if !offset.is_multiple_of(bs) || !(buf.len() as u64).is_multiple_of(bs) {
            return Err(self.err("unaligned read", offset, uefi::Status::INVALID_PARAMETER));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let media_id = self.media_id;
        match self.proto.read_blocks(media_id, offset / bs, buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.err("read", offset, e.status())),
        }
    }

    fn write_at(&mut self, offset: u64, _buf: &[u8]) -> Result<(), DiskError> {
        Err(self.err("write (read-only)", offset, uefi::Status::WRITE_PROTECTED))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}
