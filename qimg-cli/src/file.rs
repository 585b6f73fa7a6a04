//! Opening plain files by name: the checks every image file gets before
//! it is opened, and opening an existing file with QEMU's locks. Verbs and
//! the format layer ([`crate::format`], [`crate::image`]) use these; this
//! module uses no verb.

use luks_core::io::FileDevice;

use crate::cache::CacheMode;
use crate::CliError;

/// Refuses a directory named where an image file belongs (opening one
/// succeeds on Unix, and reading it fails with a less helpful message), and
/// a FIFO, socket or character device: those cannot be sized, and opening a
/// FIFO blocks until a writer appears. The type is read with `stat`, which
/// never blocks, before anything opens the file.
pub(crate) fn refuse_dir(path: &str) -> Result<(), CliError> {
    let Ok(meta) = std::fs::metadata(path) else {
        // Opening reports a missing file with the system's reason.
        return Ok(());
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(CliError::io(
            path,
            "is a directory, not an image file; name the image file itself".into(),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = if ft.is_fifo() {
            Some("a FIFO (named pipe)")
        } else if ft.is_socket() {
            Some("a socket")
        } else if ft.is_char_device() {
            Some("a character device")
        } else {
            None
        };
        if let Some(kind) = kind {
            return Err(CliError::io(
                path,
                format!(
                    "is {kind}, not a regular file or block device: an image must have a \
                     size and be readable at any offset"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `path` is a character device such as `/dev/null`. QEMU opens
/// one with its `host_device` driver: a raw image as long as the device's
/// end (0 bytes for `/dev/null` and `/dev/zero`), which libvirt names as a
/// placeholder backing file. qimg accepts one only where qemu-img reads a
/// raw backing file (see [`refuse_dir_backing`]), never as an image it
/// writes, and never reads its bytes to detect a format (QEMU probes a
/// 0-byte image as raw without reading).
pub(crate) fn is_char_device(path: &str) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// [`refuse_dir`] for a backing file that is read only: a character device
/// passes (see [`is_char_device`]); a directory, FIFO or socket does not.
pub(crate) fn refuse_dir_backing(path: &str) -> Result<(), CliError> {
    if is_char_device(path) {
        return Ok(());
    }
    refuse_dir(path)
}

/// Opens the existing file `path`, for writing when `writable`; the error
/// names the file ("cannot open" or "cannot open for writing").
pub(crate) fn open_file(path: &str, writable: bool) -> Result<FileDevice, CliError> {
    open_file_cached(path, writable, CacheMode::Writeback)
}

/// [`open_file`] in cache mode `cache` (`-t`/`-T`): `O_DIRECT` and when
/// writes are synced.
pub(crate) fn open_file_cached(
    path: &str,
    writable: bool,
    cache: CacheMode,
) -> Result<FileDevice, CliError> {
    use crate::lock::{lock_dev, Access};
    let (access, failed) = if writable {
        (Access::Write, "cannot open for writing")
    } else {
        (Access::Read, "cannot open")
    };
    cache
        .open(path, writable, |e| {
            CliError::io(path, format!("{failed}: {e}"))
        })
        .and_then(|d| lock_dev(d, path, access))
}

/// Bytes a file occupies on disk (qemu-img's "disk size"/"actual-size").
pub(crate) fn allocated_bytes(path: &str) -> Result<u64, CliError> {
    let meta =
        std::fs::metadata(path).map_err(|e| CliError::io(path, format!("cannot stat: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(meta.blocks() * 512)
    }
    #[cfg(not(unix))]
    {
        Ok(meta.len())
    }
}

/// The length of a file in bytes.
pub(crate) fn file_length(path: &str) -> Result<u64, CliError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| CliError::io(path, format!("cannot stat: {e}")))
}

/// The length of a file as QEMU's file layer reports it: rounded up to whole
/// 512-byte sectors (a raw image of 1000 bytes is 1024 bytes big, the tail
/// reading as zero).
pub(crate) fn sector_length(path: &str) -> Result<u64, CliError> {
    Ok(file_length(path)?.next_multiple_of(512))
}
