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

/// How many blocks a direct-mode [`FileDevice`] with
/// [`FileDevice::set_block_cache`] holds in memory before it writes them
/// all out: a qcow2 writer's refcount and L2 updates of one pass touch a
/// handful of blocks (one 4 KiB block holds 512 L2 entries), so a few
/// dozen absorb a whole copy.
const CACHED_BLOCKS: usize = 32;

/// Blocks of an `O_DIRECT` file that writes smaller than a block changed,
/// kept in aligned memory until they are written out: on
/// [`BlockIo::flush`], when all slots are taken, before a request that the
/// bounce path handles overlaps one, and when the device is dropped. Reads
/// see them. This is what the page cache does for a file without
/// `O_DIRECT`, and what QEMU's qcow2 metadata caches do under
/// `cache=none`.
struct BlockCache {
    /// The same open file (a duplicated descriptor), so that the blocks
    /// still held when the device is dropped or gives back its file are
    /// written out.
    file: File,
    mem: Vec<u8>,
    start: usize,
    align: usize,
    /// The file offset of the block each slot holds, if any.
    slots: [Option<u64>; CACHED_BLOCKS],
}

// `align` is a power of two of at most a few KiB and `i < CACHED_BLOCKS`,
// so every index into `mem` is below its length and no sum overflows; file
// offsets are block starts of requests that succeeded, far below `u64::MAX`.
#[allow(clippy::arithmetic_side_effects)]
impl BlockCache {
    fn new(file: File, align: usize) -> Self {
        let mem = vec![0u8; CACHED_BLOCKS * align + align];
        let start = (align - mem.as_ptr().addr() % align) % align;
        Self {
            file,
            mem,
            start,
            align,
            slots: [None; CACHED_BLOCKS],
        }
    }

    fn slot(&self, i: usize) -> &[u8] {
        let at = self.start + i * self.align;
        &self.mem[at..at + self.align]
    }

    fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let at = self.start + i * self.align;
        &mut self.mem[at..at + self.align]
    }

    /// Whether a held block overlaps `[offset, offset + len)`.
    fn overlaps(&self, offset: u64, len: usize) -> bool {
        let end = offset.saturating_add(len as u64);
        let a = self.align as u64;
        self.slots
            .iter()
            .flatten()
            .any(|&b| b < end && b + a > offset)
    }

    /// Copies the held blocks' bytes over the part of `buf` (read from the
    /// file at `offset`) they cover.
    fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset.saturating_add(buf.len() as u64);
        let a = self.align as u64;
        for (i, b) in self.slots.iter().enumerate() {
            let Some(b) = *b else { continue };
            if b >= end || b + a <= offset {
                continue;
            }
            let from = b.max(offset);
            let to = (b + a).min(end);
            // Both below `buf.len()` and `align`: `from >= offset`, `from >= b`.
            let small = |v: u64| usize::try_from(v).unwrap_or(0);
            let (d, s, n) = (small(from - offset), small(from - b), small(to - from));
            buf[d..d + n].copy_from_slice(&self.slot(i)[s..s + n]);
        }
    }

    /// Forgets the held blocks inside `[offset, offset + len)`, which an
    /// aligned write is replacing whole.
    fn forget(&mut self, offset: u64, len: usize) {
        let end = offset.saturating_add(len as u64);
        let a = self.align as u64;
        for b in &mut self.slots {
            if b.is_some_and(|b| b >= offset && b + a <= end) {
                *b = None;
            }
        }
    }

    /// Merges `buf`, a write inside one block that lies wholly inside the
    /// file, into the held copy of that block (read from the file first);
    /// `false` when the write is not of that kind and must go to the file.
    fn absorb(&mut self, offset: u64, buf: &[u8]) -> Result<bool, FileError> {
        let a = self.align as u64;
        let block = offset - offset % a;
        // Below `a`.
        let skip = usize::try_from(offset - block).unwrap_or(0);
        if skip + buf.len() > self.align {
            return Ok(false);
        }
        let i = match self.slots.iter().position(|&b| b == Some(block)) {
            Some(i) => i,
            None => {
                // A block the file does not wholly hold yet: the write
                // must set the file's length, so it goes through now.
                let size = self
                    .file
                    .metadata()
                    .map_err(|e| FileDevice::err(FileOp::Length, 0, 0, e))?
                    .len();
                if block.saturating_add(a) > size {
                    return Ok(false);
                }
                let i = match self.slots.iter().position(Option::is_none) {
                    Some(i) => i,
                    None => {
                        self.write_back()?;
                        0
                    }
                };
                let (align, at) = (self.align, self.start + i * self.align);
                read_all(&self.file, block, &mut self.mem[at..at + align], align)
                    .map_err(|e| FileDevice::err(FileOp::Read, offset, buf.len(), e.source))?;
                self.slots[i] = Some(block);
                i
            }
        };
        self.slot_mut(i)[skip..skip + buf.len()].copy_from_slice(buf);
        Ok(true)
    }

    /// Writes every held block to the file, in file order; a block whose
    /// write fails stays held, and the error is returned.
    fn write_back(&mut self) -> Result<(), FileError> {
        loop {
            let next = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.map(|b| (b, i)))
                .min();
            let Some((b, i)) = next else { return Ok(()) };
            write_all(&self.file, b, self.slot(i))?;
            self.slots[i] = None;
        }
    }
}

impl Drop for BlockCache {
    /// Blocks still held reach the file, as the page cache's would; an
    /// error here has no one to go to (a caller that needs to know flushes
    /// first).
    fn drop(&mut self) {
        let _ = self.write_back();
    }
}

impl fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockCache")
            .field("held", &self.slots.iter().flatten().count())
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
    /// Boxed: most devices have none, and it is a few hundred bytes.
    cache: Option<std::boxed::Box<BlockCache>>,
}

impl FileDevice {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        Self {
            file,
            sector_size: 512,
            sync: SyncPolicy::OnFlush,
            direct: None,
            cache: None,
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

    /// In direct mode, holds the blocks that writes smaller than a block
    /// change in memory (up to 32 of them), so that the many
    /// small writes a qcow2 writer makes to one refcount or L2 block cost
    /// one read and one write of the block instead of one each. Held blocks
    /// are written out on [`BlockIo::flush`] (whatever the
    /// [`SyncPolicy`]), before any request the device sends to the file
    /// would read them, and when the device is dropped; reads see them.
    /// Writes stay synchronous under [`SyncPolicy::EachWrite`] (no block is
    /// held then), and a block not yet wholly inside the file is written at
    /// once. Does nothing without direct mode; `false` writes the held
    /// blocks out and stops holding any. Fails if the file's descriptor
    /// cannot be duplicated, or when writing out fails.
    pub fn set_block_cache(&mut self, on: bool) -> Result<(), FileError> {
        match (on, self.direct.as_ref(), self.cache.as_mut()) {
            (true, Some(b), None) => {
                let file = self
                    .file
                    .try_clone()
                    .map_err(|e| Self::err(FileOp::Write, 0, 0, e))?;
                self.cache = Some(std::boxed::Box::new(BlockCache::new(file, b.align)));
            }
            (false, _, Some(c)) => {
                c.write_back()?;
                self.cache = None;
            }
            _ => {}
        }
        Ok(())
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

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), FileError> {
        self.read_file(offset, buf)?;
        if let Some(c) = &self.cache {
            c.overlay(offset, buf);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), FileError> {
        self.write_nosync(offset, buf)?;
        self.sync_if_each_write()
    }

    fn flush(&mut self) -> Result<(), FileError> {
        if self.sync == SyncPolicy::Never {
            return self.write_back();
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
        // A held block written out after the hole was punched would fill
        // it again.
        self.write_back()?;
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
        // A held block written out after a cut would grow the file again.
        self.write_back()?;
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
    // In the direct branch every `usize` sum is bounded by `buf.len()` or by
    // the bounce buffer's length (`skip < a`, `want <= DIRECT_BOUNCE - skip`,
    // `span <= DIRECT_BOUNCE`); `pos - skip` cannot underflow (`skip` is
    // `pos % a`).
    /// Reads from the file itself, without the held blocks.
    #[allow(clippy::arithmetic_side_effects)]
    fn read_file(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), FileError> {
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

    /// `fdatasync`, except on devices that cannot be synced.
    fn sync_now(&mut self) -> Result<(), FileError> {
        self.write_back()?;
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

    /// Writes the blocks [`FileDevice::set_block_cache`] holds to the file.
    fn write_back(&mut self) -> Result<(), FileError> {
        match self.cache.as_mut() {
            Some(c) => c.write_back(),
            None => Ok(()),
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
            if let Some(c) = self.cache.as_mut() {
                c.forget(offset, buf.len());
            }
            return write_all(&self.file, offset, buf);
        }
        if let Some(c) = self.cache.as_mut() {
            if self.sync != SyncPolicy::EachWrite && c.absorb(offset, buf)? {
                return Ok(());
            }
            // The partial blocks below are read from the file: it must
            // hold what was written to them.
            if c.overlaps(offset, buf.len()) {
                c.write_back()?;
            }
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
