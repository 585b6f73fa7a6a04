//! A `std::fs::File` device using positional I/O (needs `std`).

extern crate std;

use core::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::vec;
use std::vec::Vec;

use super::{BlockIo, MAX_SECTOR_SIZE};

/// What a [`FileDevice`] was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileOp {
    /// Reading.
    Read,
    /// Writing.
    Write,
    /// Flushing to stable storage.
    Flush,
    /// Asking or changing the length.
    Length,
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::Length => "size query or change",
        })
    }
}

/// An I/O error from a [`FileDevice`], with the operation and range.
#[derive(Debug)]
pub struct FileError {
    /// The operation.
    pub op: FileOp,
    /// Byte offset of the request.
    pub offset: u64,
    /// Length of the request.
    pub len: u64,
    /// The operating system's error.
    pub source: io::Error,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            FileOp::Flush => write!(f, "flush failed: {}", self.source),
            FileOp::Length => write!(f, "{} failed: {}", self.op, self.source),
            _ => write!(
                f,
                "{} of {} bytes at offset {} failed: {}",
                self.op, self.len, self.offset, self.source
            ),
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// When a [`FileDevice`] makes its writes durable (`fdatasync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// On [`BlockIo::flush`]: the page cache holds writes until then.
    #[default]
    OnFlush,
    /// After every write, and on `flush`: a write is on stable storage when
    /// it returns (QEMU's `writethrough` and `directsync`).
    EachWrite,
    /// Never: `flush` does nothing (QEMU's `unsafe`).
    Never,
}

/// The largest aligned transfer a [`FileDevice`] in direct mode makes for
/// one unaligned request; longer requests go through in pieces.
const DIRECT_BOUNCE: usize = 1 << 20;

/// The aligned buffer of a file opened with `O_DIRECT`: `O_DIRECT` wants
/// the offset, the length and the memory address of every transfer to be
/// multiples of the alignment. A `Vec` over-allocated by one alignment
/// unit, used from its first aligned byte (no `unsafe`).
struct Bounce {
    buf: Vec<u8>,
    start: usize,
    align: usize,
}

impl Bounce {
    // `align` is a power of two of at most a few KiB (the device's logical
    // block size), so neither the sum nor the modulo can overflow or divide
    // by zero.
    #[allow(clippy::arithmetic_side_effects)]
    fn new(align: usize) -> Self {
        let buf = vec![0u8; DIRECT_BOUNCE + align];
        let start = (align - buf.as_ptr().addr() % align) % align;
        Self { buf, start, align }
    }

    fn aligned(&self, offset: u64, buf: &[u8]) -> bool {
        let a = self.align;
        offset.is_multiple_of(a as u64)
            && buf.len().is_multiple_of(a)
            && buf.as_ptr().addr().is_multiple_of(a)
    }
}

impl fmt::Debug for Bounce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bounce")
            .field("align", &self.align)
            .finish_non_exhaustive()
    }
}

/// A device over a regular file (or a block device node).
///
/// Reports a 512-byte sector by default but serves any byte range, as a
/// file does. Reads past the end of the file return zeroes (like a sparse
/// file's holes); writes past the end grow it.
///
/// A file opened with `O_DIRECT` is declared with [`FileDevice::set_direct`]
/// (or switched with [`FileDevice::enable_direct`]): requests that are not
/// aligned then go through an aligned buffer, partial blocks written by
/// reading, modifying and writing back the whole block, so callers still
/// read and write any byte range. [`SyncPolicy`] says when writes are made
/// durable.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    sector_size: u32,
    sync: SyncPolicy,
    direct: Option<Bounce>,
}

impl FileDevice {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        Self {
            file,
            sector_size: 512,
            sync: SyncPolicy::OnFlush,
            direct: None,
        }
    }

    /// Makes writes durable as `sync` says (the default is
    /// [`SyncPolicy::OnFlush`]).
    pub fn set_sync(&mut self, sync: SyncPolicy) {
        self.sync = sync;
    }

    /// The policy set by [`FileDevice::set_sync`].
    pub fn sync_policy(&self) -> SyncPolicy {
        self.sync
    }

    /// Declares that the file was opened with `O_DIRECT` and needs every
    /// transfer aligned to `align` bytes (offset, length and memory); `None`
    /// unless `align` is a power of two between 512 and [`MAX_SECTOR_SIZE`].
    /// Unaligned requests are then bounced through an aligned buffer.
    pub fn set_direct(&mut self, align: u32) -> Option<()> {
        if !align.is_power_of_two() || !(512..=MAX_SECTOR_SIZE).contains(&align) {
            return None;
        }
        self.direct = Some(Bounce::new(align as usize));
        Some(())
    }

    /// Whether transfers bypass the page cache ([`FileDevice::set_direct`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Turns on `O_DIRECT` for the already open file (`fcntl(F_SETFL)`) and
    /// declares it with [`FileDevice::set_direct`]. Fails with the system's
    /// error (`EINVAL` where the filesystem does not support `O_DIRECT`),
    /// leaving the device as it was.
    #[cfg(target_os = "linux")]
    pub fn enable_direct(&mut self, align: u32) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        if !align.is_power_of_two() || !(512..=MAX_SECTOR_SIZE).contains(&align) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let errno = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
        let flags = fcntl(&self.file, FcntlArg::F_GETFL).map_err(errno)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_DIRECT;
        fcntl(&self.file, FcntlArg::F_SETFL(flags)).map_err(errno)?;
        self.set_direct(align);
        Ok(())
    }

    /// Opens `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        File::open(path).map(Self::new)
    }

    /// Opens `path` for reading and writing.
    pub fn open_rw(path: &Path) -> io::Result<Self> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(Self::new)
    }

    /// Creates (or truncates) `path` for reading and writing.
    pub fn create(path: &Path) -> io::Result<Self> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map(Self::new)
    }

    /// Reports `sector_size` instead of 512; `None` unless it is a power of
    /// two no larger than [`MAX_SECTOR_SIZE`].
    pub fn with_sector_size(mut self, sector_size: u32) -> Option<Self> {
        if !sector_size.is_power_of_two() || sector_size > MAX_SECTOR_SIZE {
            return None;
        }
        self.sector_size = sector_size;
        Some(self)
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives back the file.
    pub fn into_file(self) -> File {
        self.file
    }

    fn err(op: FileOp, offset: u64, len: usize, source: io::Error) -> FileError {
        FileError {
            op,
            offset,
            len: len as u64,
            source,
        }
    }
}

#[cfg(unix)]
fn pread(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, off)
}
#[cfg(unix)]
fn pwrite(f: &File, buf: &[u8], off: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::write_at(f, buf, off)
}
#[cfg(windows)]
fn pread(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(f, buf, off)
}
#[cfg(windows)]
fn pwrite(f: &File, buf: &[u8], off: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_write(f, buf, off)
}

impl BlockIo for FileDevice {
    type Error = FileError;

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&mut self) -> Result<u64, FileError> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Self::err(FileOp::Length, 0, 0, e))?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block devices report length 0 in metadata; ask by seeking.
        use std::io::Seek;
        (&self.file)
            .seek(io::SeekFrom::End(0))
            .map_err(|e| Self::err(FileOp::Length, 0, 0, e))
    }

    // In the direct branch every `usize` sum is bounded by `buf.len()` or by
    // the bounce buffer's length (`skip < a`, `want <= DIRECT_BOUNCE - skip`,
    // `span <= DIRECT_BOUNCE`); `pos - skip` cannot underflow (`skip` is
    // `pos % a`).
    #[allow(clippy::arithmetic_side_effects)]
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), FileError> {
        let Some(bounce) = self.direct.as_mut() else {
            return read_all(&self.file, offset, buf, 1);
        };
        if bounce.aligned(offset, buf) {
            return read_all(&self.file, offset, buf, bounce.align);
        }
        let a = bounce.align;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.saturating_add(done as u64);
            // Below `a`, a usize.
            let skip = usize::try_from(pos % a as u64).unwrap_or(0);
            let start = pos - skip as u64;
            let want = (buf.len() - done).min(DIRECT_BOUNCE - skip);
            let span = (skip + want).next_multiple_of(a);
            let b = &mut bounce.buf[bounce.start..bounce.start + span];
            read_all(&self.file, start, b, a)
                .map_err(|e| Self::err(FileOp::Read, offset, buf.len(), e.source))?;
            buf[done..done + want].copy_from_slice(&b[skip..skip + want]);
            done += want;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), FileError> {
        self.write_nosync(offset, buf)?;
        self.sync_if_each_write()
    }

    fn flush(&mut self) -> Result<(), FileError> {
        if self.sync == SyncPolicy::Never {
            return Ok(());
        }
        self.sync_now()
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), FileError> {
        let size = self.size()?;
        let end = offset.saturating_add(len);
        // Zeroes at or past the end: growing the file leaves a hole that
        // reads as zero, without writing anything.
        let (offset, len) = if end > size {
            if offset >= size {
                self.set_size(end)?;
                return Ok(());
            }
            self.set_size(end)?;
            // `offset < size` here.
            (offset, size.saturating_sub(offset))
        } else {
            (offset, len)
        };
        let mut done = 0u64;
        while done < len {
            let step = super::chunk_len(len.saturating_sub(done), super::ZEROES.len());
            self.write_nosync(offset.saturating_add(done), &super::ZEROES[..step])?;
            // `done + step <= len`.
            done = done.saturating_add(step as u64);
        }
        self.sync_if_each_write()
    }

    /// Punches a hole (the range then reads as zeros, and its disk space
    /// is given back) where the filesystem can; elsewhere does nothing, as
    /// discard is advisory.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), FileError> {
        #[cfg(target_os = "linux")]
        {
            use nix::fcntl::{fallocate, FallocateFlags};
            let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
                return Ok(());
            };
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(&self.file, mode, off, n) {
                Ok(()) => {}
                // Not supported here (filesystem, device): advisory, skip.
                Err(
                    nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::ENOSYS
                    | nix::errno::Errno::ENODEV,
                ) => {}
                Err(e) => {
                    return Err(Self::err(
                        FileOp::Write,
                        offset,
                        usize::try_from(len).unwrap_or(usize::MAX),
                        io::Error::from_raw_os_error(e as i32),
                    ))
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
        Ok(())
    }

    fn set_size(&mut self, size: u64) -> Result<bool, FileError> {
        self.file
            .set_len(size)
            .map_err(|e| Self::err(FileOp::Length, size, 0, e))?;
        Ok(true)
    }
}

/// Reads `buf.len()` bytes at `offset`, zeroes past the end of the file.
/// With `O_DIRECT` (`align` > 1) a read that stops short of an aligned end
/// has met the end of the file: another read would start unaligned.
fn read_all(f: &File, offset: u64, buf: &mut [u8], align: usize) -> Result<(), FileError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset.saturating_add(done as u64);
        match pread(f, &mut buf[done..], at) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => {
                // `n <= buf.len() - done`: the sum stays within the buffer.
                done = done.saturating_add(n);
                if align > 1 && !done.is_multiple_of(align) {
                    buf[done..].fill(0);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileDevice::err(FileOp::Read, offset, buf.len(), e)),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
fn write_all(f: &File, offset: u64, buf: &[u8]) -> Result<(), FileError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset.saturating_add(done as u64);
        match pwrite(f, &buf[done..], at) {
            Ok(0) => {
                return Err(FileDevice::err(
                    FileOp::Write,
                    offset,
                    buf.len(),
                    io::Error::from(io::ErrorKind::WriteZero),
                ))
            }
            // `n <= buf.len() - done`: the sum stays within the buffer.
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileDevice::err(FileOp::Write, offset, buf.len(), e)),
        }
    }
    Ok(())
}

impl FileDevice {
    /// `fdatasync`, except on devices that cannot be synced.
    fn sync_now(&mut self) -> Result<(), FileError> {
        match self.file.sync_data() {
            // Character devices such as /dev/null cannot be synced; there
            // is nothing to make durable.
            Err(e)
                if e.kind() == io::ErrorKind::InvalidInput
                    && self.file.metadata().is_ok_and(|m| !m.is_file()) =>
            {
                Ok(())
            }
            r => r.map_err(|e| Self::err(FileOp::Flush, 0, 0, e)),
        }
    }

    fn sync_if_each_write(&mut self) -> Result<(), FileError> {
        if self.sync == SyncPolicy::EachWrite {
            self.sync_now()?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` without the [`SyncPolicy::EachWrite`] sync.
    /// In direct mode an unaligned request becomes aligned writes of whole
    /// blocks, the partial ones read first; a last block that reaches past
    /// the end of the file is cut back, so the file ends where a plain write
    /// would have left it.
    // Every `usize` sum is bounded by `buf.len()` or the bounce buffer's
    // length, as in `read_at`; the `u64` file positions saturate.
    #[allow(clippy::arithmetic_side_effects)]
    fn write_nosync(&mut self, offset: u64, buf: &[u8]) -> Result<(), FileError> {
        let Some(bounce) = self.direct.as_mut() else {
            return write_all(&self.file, offset, buf);
        };
        if bounce.aligned(offset, buf) {
            return write_all(&self.file, offset, buf);
        }
        let a = bounce.align;
        let fail = |op, e: FileError| Self::err(op, offset, buf.len(), e.source);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.saturating_add(done as u64);
            // Below `a`, a usize.
            let skip = usize::try_from(pos % a as u64).unwrap_or(0);
            let start = pos - skip as u64;
            let want = (buf.len() - done).min(DIRECT_BOUNCE - skip);
            let span = (skip + want).next_multiple_of(a);
            let tail = !(skip + want).is_multiple_of(a);
            let b = &mut bounce.buf[bounce.start..bounce.start + span];
            if skip != 0 {
                read_all(&self.file, start, &mut b[..a], a).map_err(|e| fail(FileOp::Read, e))?;
            }
            if tail && (span > a || skip == 0) {
                read_all(&self.file, start + (span - a) as u64, &mut b[span - a..], a)
                    .map_err(|e| fail(FileOp::Read, e))?;
            }
            b[skip..skip + want].copy_from_slice(&buf[done..done + want]);
            let before = if tail {
                Some(
                    self.file
                        .metadata()
                        .map_err(|e| Self::err(FileOp::Length, 0, 0, e))?
                        .len(),
                )
            } else {
                None
            };
            write_all(&self.file, start, b).map_err(|e| fail(FileOp::Write, e))?;
            let end = pos.saturating_add(want as u64);
            if let Some(size) = before {
                if self.file.metadata().is_ok_and(|m| m.is_file())
                    && size < start.saturating_add(span as u64)
                {
                    self.file
                        .set_len(size.max(end))
                        .map_err(|e| Self::err(FileOp::Length, end, 0, e))?;
                }
            }
            done += want;
        }
        Ok(())
    }
}
