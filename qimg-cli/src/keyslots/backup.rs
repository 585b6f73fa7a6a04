//! `qimg luks header-backup | header-restore` (cryptsetup's
//! luksHeaderBackup and luksHeaderRestore) for LUKS1 and LUKS2 volumes, and
//! for the LUKS1 header inside an encrypted qcow2 image.

use std::io::{IsTerminal, Write};
use std::path::Path;

use luks_core::io::BlockIo;
use luks_core::luks2::Luks2Header;

use super::luks1::{self as v1, HeaderDev};
use super::luks2::area_len as area_len2;
use super::usize_of;
use crate::format::Format;
use crate::CliError;

/// `qimg luks header-backup`: the header area of `volume` (see
/// [`super::KeySlots::header_area`]) into the new file `backup`, readable
/// by its owner only.
pub(crate) fn header_backup(volume: &str, backup: &str) -> Result<u8, CliError> {
    if Path::new(backup).exists() {
        return Err(CliError::io(
            backup,
            "Requested header backup file already exists; remove it or choose another name".into(),
        ));
    }
    let mut slots = super::open(volume, None, false)?;
    let area = slots.header_area()?;
    write_backup(backup, &area)?;
    Ok(0)
}

/// `qimg luks header-restore`: writes the backup's header area over the
/// volume's (or over the LUKS region inside an encrypted qcow2 image),
/// after checking the two fit each other and asking (`batch`: `-q` does
/// not ask).
pub(crate) fn header_restore(volume: &str, backup: &str, batch: bool) -> Result<u8, CliError> {
    let v2 = |p: &str| -> Result<bool, CliError> {
        Ok(std::fs::metadata(p).is_ok() && crate::format::luks_version(p)? == Some(2))
    };
    if v2(backup)? {
        return restore2(volume, backup, batch);
    }
    if v2(volume)? {
        return Err(CliError::io(
            volume,
            "holds a LUKS2 header and the backup is not a LUKS2 one: restore failed (data offset \
             and layout differ)"
                .into(),
        ));
    }
    restore1(volume, backup, batch)
}

/// Restores a LUKS1 backup: the volume's header, if it has one, must have
/// the backup's payload offset and key size.
fn restore1(volume: &str, backup: &str, batch: bool) -> Result<u8, CliError> {
    let bytes = read_backup(backup)?;
    let bad = || incompatible_backup(backup);
    let new = v1::parse_raw_header(&bytes).ok_or_else(bad)?;
    let len = v1::area_len(&new);
    let area = bytes.get(..usize_of(len, backup)?).ok_or_else(bad)?;
    let mut dev: HeaderDev = match crate::format::detect(volume)? {
        Format::Qcow2 => v1::qcow2_window(volume, true)?,
        _ => v1::raw_window(volume, true)?,
    };
    let size = dev
        .size()
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    let mut head = [0u8; luks_core::luks1::HEADER_LEN];
    if size >= head.len() as u64 {
        dev.read_at(0, &mut head)
            .map_err(|e| CliError::io(volume, e.to_string()))?;
    }
    match v1::parse_raw_header(&head) {
        Some(old) => {
            if old.payload_offset != new.payload_offset || old.key_bytes != new.key_bytes {
                return Err(CliError::io(
                    volume,
                    "Data offset or key size differs on device and backup, restore failed.".into(),
                ));
            }
            confirm(
                batch,
                &format!(
                    "{volume} already contains a LUKS header: restoring replaces its key slots."
                ),
            )?;
        }
        None => confirm(batch, &no_header(volume))?,
    }
    write_area(&mut dev, volume, size, area)
}

/// Restores a LUKS2 backup: the volume's LUKS2 header, if it has one,
/// must have the backup's UUID, header area and data offset; a LUKS1
/// volume is refused.
fn restore2(volume: &str, backup: &str, batch: bool) -> Result<u8, CliError> {
    let bad = || incompatible_backup(backup);
    let (new, _) = crate::luks2::read_header(backup).map_err(|_| bad())?;
    let len = area_len2(&new);
    let bytes = read_backup(backup)?;
    let area = bytes.get(..usize_of(len, backup)?).ok_or_else(bad)?;
    let data_offset = |h: &Luks2Header| h.meta.data_segment().map(|s| s.offset);
    match crate::format::luks_version(volume)? {
        Some(2) => {
            let (old, _) = crate::luks2::read_header(volume)?;
            if old.hdr.uuid != new.hdr.uuid {
                return Err(CliError::io(
                    volume,
                    format!(
                        "the backup's UUID {} differs from the device's {}: restore failed \
                         (it is another volume's header)",
                        new.hdr.uuid, old.hdr.uuid
                    ),
                ));
            }
            if data_offset(&old) != data_offset(&new) || area_len2(&old) != len {
                return Err(CliError::io(
                    volume,
                    "Data offset or header area differs on device and backup, restore failed."
                        .into(),
                ));
            }
            confirm(
                batch,
                &format!(
                    "{volume} already contains a LUKS2 header: restoring replaces its key slots."
                ),
            )?;
        }
        Some(_) => {
            return Err(CliError::io(
                volume,
                "holds a LUKS1 header and the backup is LUKS2: restore failed (data offset \
                 and layout differ)"
                    .into(),
            ))
        }
        None => confirm(batch, &no_header(volume))?,
    }
    let mut dev = crate::file::open_file(volume, true)?;
    let size = dev
        .size()
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    write_area(&mut dev, volume, size, area)
}

/// The warning before a header is restored over a volume without one.
fn no_header(volume: &str) -> String {
    format!("{volume} does not contain a LUKS header: restoring one can destroy data on it.")
}

/// The whole backup file, zeroized when dropped.
fn read_backup(backup: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, CliError> {
    std::fs::read(backup)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| CliError::io(backup, format!("cannot read: {e}")))
}

/// Writes a header backup to the new file `backup` (never over an
/// existing one), readable by its owner only, and syncs it.
fn write_backup(backup: &str, buf: &[u8]) -> Result<(), CliError> {
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

/// Writes a backup's header `area` over the start of `dev` (the volume
/// `volume`, `size` bytes) and flushes; refuses a device smaller than the
/// area.
fn write_area<D: BlockIo>(
    dev: &mut D,
    volume: &str,
    size: u64,
    area: &[u8],
) -> Result<u8, CliError> {
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
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    Ok(0)
}

/// The error for a header backup that is not one this volume can take.
fn incompatible_backup(backup: &str) -> CliError {
    CliError::io(
        backup,
        "Header backup file does not contain compatible LUKS header.".into(),
    )
}

/// Asks for `YES` on the terminal before a destructive step; `batch`
/// (`-q`) skips the question. Without a terminal and without `-q` the
/// step is refused (cryptsetup would go ahead silently).
pub(crate) fn confirm(batch: bool, warning: &str) -> Result<(), CliError> {
    if batch {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(format!(
            "{warning} Refusing without confirmation: run on a terminal or pass -q \
             (--batch-mode)"
        )));
    }
    eprint!("WARNING! {warning}\nAre you sure? (Type 'yes' in capital letters): ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::usage(format!("cannot read the answer: {e}")))?;
    if line.trim_end_matches(['\n', '\r']) == "YES" {
        Ok(())
    } else {
        Err(CliError::usage("Operation aborted.".into()))
    }
}
