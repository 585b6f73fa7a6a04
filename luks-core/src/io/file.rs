//! A `std::fs::File` device using positional I/O (needs `std`).

extern crate std;

use core::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

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

/// A device over a regular file (or a block device node).
///
/// Reports a 512-byte sector by default but serves any byte range, as a
/// file does. Reads past the end of the file return zeroes (like a sparse
/// file's holes); writes past the end grow it.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    sector_size: u32,
}

impl FileDevice {
    /// Wraps an open file.
    pub fn new(file: File) -> Self {
        Self {
            file,
            sector_size: 512,
        }
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
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset.saturating_add(done as u64);
            match pread(&self.file, &mut buf[done..], at) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                // `n <= buf.len() - done`: the sum stays within the buffer.
                Ok(n) => done = done.saturating_add(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::err(FileOp::Read, offset, buf.len(), e)),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), FileError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset.saturating_add(done as u64);
            match pwrite(&self.file, &buf[done..], at) {
                Ok(0) => {
                    return Err(Self::err(
                        FileOp::Write,
                        offset,
                        buf.len(),
                        io::Error::from(io::ErrorKind::WriteZero),
                    ))
                }
                // `n <= buf.len() - done`: the sum stays within the buffer.
                Ok(n) => done = done.saturating_add(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::err(FileOp::Write, offset, buf.len(), e)),
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), FileError> {
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
            // `done < len` and `step <= len - done`: nothing saturates.
            let step = super::chunk_len(len.saturating_sub(done), super::ZEROES.len());
            self.write_at(offset.saturating_add(done), &super::ZEROES[..step])?;
            done = done.saturating_add(step as u64);
        }
        Ok(())
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
