//! LUKS header helpers shared by the LUKS1 key verbs ([`crate::keys`]) and
//! the LUKS2 ones ([`crate::keys2`]): the unlock error in cryptsetup's
//! words, and writing or restoring a header backup.

use std::io::Write;

use luks_core::io::BlockIo;

use crate::CliError;

/// The error of a failed unlock of the header in `path`: cryptsetup's
/// words and exit code 2 when no key slot opens, else the error itself.
pub(crate) fn unlock_error<E: std::fmt::Display>(path: &str, e: luks_core::Error<E>) -> CliError {
    match e {
        luks_core::Error::WrongPassphrase | luks_core::Error::NoActiveKeySlot => CliError {
            code: 2,
            msg: format!(
                "{path}: No key available with this passphrase (invalid password, cannot \
                 unlock any keyslot)"
            ),
        },
        e => CliError::io(path, e.to_string()),
    }
}

/// Writes a header backup to the new file `backup` (never over an
/// existing one), readable by its owner only, and syncs it.
pub(crate) fn write_backup(backup: &str, buf: &[u8]) -> Result<(), CliError> {
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(backup)
            .map_err(|e| CliError::io(backup, format!("cannot create: {e}")))?
    };
    f.write_all(buf)
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::io(backup, format!("cannot write: {e}")))
}

/// A header area length as a buffer length; the error names `what`.
pub(crate) fn usize_of(len: u64, what: &str) -> Result<usize, CliError> {
    usize::try_from(len).map_err(|_| CliError::io(what, "the header area is too large".into()))
}

/// Writes a backup's header `area` over the start of `dev` (the volume
/// `volume`, `size` bytes) and flushes; refuses a device smaller than the
/// area.
pub(crate) fn write_area<D: BlockIo>(
    dev: &mut D,
    volume: &str,
    size: u64,
    area: &[u8],
) -> Result<(), CliError> {
    let len = area.len() as u64;
    if size < len {
        return Err(CliError::io(
            volume,
            format!(
                "the device ({size} bytes) is smaller than the backup's header area ({len} bytes)"
            ),
        ));
    }
    dev.write_at(0, area)
        .and_then(|()| dev.flush())
        .map_err(|e| CliError::io(volume, e.to_string()))
}

/// The error for a header backup that is not one this volume can take.
pub(crate) fn incompatible_backup(backup: &str) -> CliError {
    CliError::io(
        backup,
        "Header backup file does not contain compatible LUKS header.".into(),
    )
}
