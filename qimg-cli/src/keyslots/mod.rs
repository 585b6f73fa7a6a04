//! The key slots of a LUKS header, whatever holds it: [`KeySlots`] over a
//! raw LUKS1 volume or detached header, the LUKS1 header inside an
//! encrypted qcow2 image's crypto region ([`luks1`]), and a raw LUKS2
//! volume or detached header ([`luks2`]). `qimg amend` and the `qimg luks`
//! key verbs are written once on top of it; header backup and restore are
//! in [`backup`].
//!
//! luks-core orders every write (new key material is flushed before the
//! header names it; material is wiped and flushed before the header drops
//! a slot), so an implementation has nothing left to flush after a call.

pub(crate) mod backup;
mod luks1;
mod luks2;

use luks_core::luks1::VolumeKey;
use luks_core::luks2::write::KdfParams;

use crate::format::Format;
use crate::CliError;

/// How the new key slot's KDF is chosen: `--pbkdf`, `--pbkdf-memory`,
/// `--pbkdf-force-iterations`, `--iter-time` (amend: `iter-time` only);
/// what is not given comes from the key slot the existing passphrase
/// opened. LUKS1 slots are always PBKDF2 with the header's hash, timed by
/// `iter_time`.
#[derive(Debug, Clone, Default)]
pub(crate) struct KdfChoice {
    /// `--pbkdf`: pbkdf2, argon2i or argon2id (LUKS2).
    pub(crate) pbkdf: Option<String>,
    /// `--pbkdf-memory` in KiB (LUKS2 Argon2).
    pub(crate) memory_kib: Option<u32>,
    /// `--pbkdf-force-iterations`: fixed iterations or passes (LUKS2).
    pub(crate) iterations: Option<u32>,
    /// `--iter-time` in milliseconds (calibration target).
    pub(crate) iter_time: u32,
}

/// The key slots of one LUKS header, opened for reading (and writing, if
/// opened so). Errors name [`KeySlots::path`].
pub(crate) trait KeySlots {
    /// The file holding the header.
    fn path(&self) -> &str;

    /// Whether the header lies inside a qcow2 image (qemu-img's option
    /// names then start with `encrypt.`).
    fn in_qcow2(&self) -> bool;

    /// Number of key slot ids: 8 (LUKS1) or 32 (LUKS2).
    fn slot_count(&self) -> u8;

    /// Whether key slot `slot` is in use.
    fn is_active(&self, slot: u8) -> bool;

    /// The slots that open the data: the active ones (LUKS1), those bound
    /// to the data segment (LUKS2). Erasing all of them loses the data.
    fn unlocking_slots(&self) -> Vec<u8>;

    /// The volume key that `pass` opens (in `slot` only, if given) and
    /// the slot that opened; cryptsetup's words and exit code 2 when no
    /// slot opens.
    fn unlock(&mut self, pass: &[u8], slot: Option<u8>) -> Result<(VolumeKey, u8), CliError>;

    /// Whether `pass` opens key slot `slot` (an inactive slot opens
    /// nothing).
    fn opens(&mut self, pass: &[u8], slot: u8) -> Result<bool, CliError>;

    /// The KDF of a new key slot: `c` where given, else like slot `like`.
    fn kdf(&self, c: &KdfChoice, like: u8) -> Result<KdfParams, CliError>;

    /// Writes `pass` for `vk` into the free slot `slot` (or the lowest
    /// free one); returns the slot.
    fn add(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: Option<u8>,
    ) -> Result<u8, CliError>;

    /// Puts `pass` for `vk` into the active slot `slot` in place of its
    /// key (`amend --force`): LUKS1 overwrites the material in place,
    /// LUKS2 erases the slot and adds the new one under the same id.
    fn replace(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: u8,
    ) -> Result<(), CliError>;

    /// `change-key` when no slot is free for the new key: LUKS1 replaces
    /// slot `slot` in place as cryptsetup does; LUKS2 refuses (a crash
    /// must leave the old key or the new one).
    fn change_in_place(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: u8,
    ) -> Result<(), CliError>;

    /// Erases key slot `slot` (the caller has decided it may go).
    fn erase(&mut self, slot: u8) -> Result<(), CliError>;

    /// The header area cryptsetup's luksHeaderBackup copies, byte for
    /// byte.
    fn header_area(&mut self) -> Result<zeroize::Zeroizing<Vec<u8>>, CliError>;

    /// The lowest free slot id.
    fn free_slot(&self) -> Option<u8> {
        (0..self.slot_count()).find(|&s| !self.is_active(s))
    }

    /// An error about this header.
    fn err(&self, msg: &str) -> CliError {
        CliError::io(self.path(), msg.into())
    }
}

/// Opens the key slots of `path`: the format from `format`, else detected
/// (a LUKS file is told LUKS1 from LUKS2 by its version); for writing when
/// `writable`. A plain image has no key slots.
pub(crate) fn open(
    path: &str,
    format: Option<Format>,
    writable: bool,
) -> Result<Box<dyn KeySlots>, CliError> {
    match crate::format::resolve(path, format, None)? {
        Format::Luks if crate::format::luks_version(path)? == Some(2) => {
            Ok(Box::new(luks2::Luks2Slots::open(path, writable)?))
        }
        Format::Luks => Ok(Box::new(luks1::Luks1Slots::open_raw(path, writable)?)),
        Format::Qcow2 => Ok(Box::new(luks1::Luks1Slots::open_qcow2(path, writable)?)),
        Format::Raw => Err(not_encrypted(path)),
    }
}

/// The error for a file with no LUKS header.
fn not_encrypted(path: &str) -> CliError {
    CliError::io(
        path,
        "not encrypted: key slots exist only in LUKS volumes and LUKS-encrypted qcow2 images"
            .into(),
    )
}

/// The error of a failed unlock of the header in `path`: cryptsetup's
/// words and exit code 2 when no key slot opens, else the error itself.
fn unlock_error<E: std::fmt::Display>(path: &str, e: luks_core::Error<E>) -> CliError {
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

/// A header area length as a buffer length; the error names `what`.
fn usize_of(len: u64, what: &str) -> Result<usize, CliError> {
    usize::try_from(len).map_err(|_| CliError::io(what, "the header area is too large".into()))
}
