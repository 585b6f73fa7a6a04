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

use crate::cache::CacheMode;
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
    open_cached(path, format, writable, CacheMode::Writeback)
}

/// [`open`] with the file in cache mode `cache` (`amend -t`).
pub(crate) fn open_cached(
    path: &str,
    format: Option<Format>,
    writable: bool,
    cache: CacheMode,
) -> Result<Box<dyn KeySlots>, CliError> {
    match crate::format::resolve(path, format, None)? {
        Format::Luks if crate::format::luks_version(path)? == Some(2) => {
            Ok(Box::new(luks2::Luks2Slots::open(path, writable, cache)?))
        }
        Format::Luks => Ok(Box::new(luks1::Luks1Slots::open_raw(
            path, writable, cache,
        )?)),
        Format::Qcow2 => Ok(Box::new(luks1::Luks1Slots::open_qcow2(
            path, writable, cache,
        )?)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks_common::OsRng;
    use luks_core::io::{FileDevice, Window};
    use luks_core::{luks1 as l1, HashAlg};

    /// A PBKDF2 slot cheap to derive.
    const KDF: KdfParams = KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    };

    /// The same walk over any implementation: a header made with the
    /// passphrase `p0` in slot 0, `area` bytes of header area.
    fn walk(path: &str, area: u64, in_qcow2: bool, luks2: bool) {
        let mut t = open(path, None, true).unwrap();
        assert_eq!(t.in_qcow2(), in_qcow2);
        assert_eq!(t.slot_count(), if luks2 { 32 } else { 8 });
        let (vk, s0) = t.unlock(b"p0", None).unwrap();
        assert_eq!((s0, t.unlocking_slots()), (0, vec![0]));
        assert_eq!(t.unlock(b"nope", None).unwrap_err().code, 2);
        assert_eq!(t.add(&vk, b"p1", KDF, None).unwrap(), 1);
        assert!(t.is_active(1) && t.opens(b"p1", 1).unwrap());
        assert!(!t.opens(b"p0", 1).unwrap() && !t.opens(b"p1", 5).unwrap());
        t.replace(&vk, b"p2", KDF, 1).unwrap();
        assert!(t.opens(b"p2", 1).unwrap() && !t.opens(b"p1", 1).unwrap());
        t.erase(0).unwrap();
        assert_eq!((t.unlocking_slots(), t.free_slot()), (vec![1], Some(0)));
        // No free slot left: LUKS1 replaces in place, LUKS2 refuses.
        for s in (0..t.slot_count()).filter(|&s| s != 1) {
            t.add(&vk, b"pn", KDF, Some(s)).unwrap();
        }
        assert_eq!(t.free_slot(), None);
        assert_eq!(t.change_in_place(&vk, b"p3", KDF, 1).is_ok(), !luks2);
        let now = if luks2 { b"p2" } else { b"p3" };
        assert_eq!(
            usize::try_from(area).unwrap(),
            t.header_area().unwrap().len()
        );
        drop(t);
        // What was written is what a fresh open reads.
        let mut t = open(path, None, false).unwrap();
        assert_eq!(t.unlock(now, None).unwrap().1, 1);
        assert!(!t.opens(b"p0", 0).unwrap() && t.opens(b"pn", 0).unwrap());
    }

    fn luks1_params() -> l1::FormatParams<'static> {
        l1::FormatParams {
            key_bytes: 32,
            iterations: 1000,
            digest_iterations: 1000,
            ..l1::FormatParams::default()
        }
    }

    #[test]
    fn luks1_raw_volume() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.luks");
        let mut dev = FileDevice::create(&f).unwrap();
        let (hdr, _) = l1::format(&mut dev, &luks1_params(), None, b"p0", &mut OsRng).unwrap();
        drop(dev);
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(4 << 20).unwrap();
        walk(f.to_str().unwrap(), luks1::area_len(&hdr), false, false);
    }

    #[test]
    fn luks1_in_a_qcow2_crypto_region() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("i.qcow2");
        let o = qcow_core::CreateOptions {
            size: 1 << 20,
            luks_region_len: Some(2 << 20),
            ..qcow_core::CreateOptions::default()
        };
        let w = qcow_core::create(FileDevice::create(&f).unwrap(), &o).unwrap();
        let (off, len) = w.crypto_region().unwrap();
        drop(w);
        let file = FileDevice::open_rw(&f).unwrap();
        let mut win = Window::new(file, off, len);
        let (hdr, _) = l1::format(&mut win, &luks1_params(), None, b"p0", &mut OsRng).unwrap();
        drop(win);
        let before = std::fs::read(&f).unwrap();
        walk(f.to_str().unwrap(), luks1::area_len(&hdr), true, false);
        // Only the region changed.
        let after = std::fs::read(&f).unwrap();
        let r = usize::try_from(off).unwrap()..usize::try_from(off + len).unwrap();
        assert_eq!(before.len(), after.len());
        assert_eq!(before[..r.start], after[..r.start]);
        assert_eq!(before[r.end..], after[r.end..]);
    }

    #[test]
    fn luks2_raw_volume() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v2.luks");
        let mut dev = FileDevice::create(&f).unwrap();
        let p = luks_core::luks2::write::FormatParams {
            key_bytes: 32,
            kdf: KDF,
            digest_iterations: 1000,
            ..luks_core::luks2::write::FormatParams::default()
        };
        let (h, _, _) =
            luks_core::luks2::write::format(&mut dev, &p, None, b"p0", &mut OsRng).unwrap();
        drop(dev);
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(32 << 20).unwrap();
        walk(f.to_str().unwrap(), luks2::area_len(&h), false, true);
    }
}
