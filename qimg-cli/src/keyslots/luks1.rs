//! [`KeySlots`] over a LUKS1 header: a raw volume or detached header (the
//! whole file), or the LUKS region inside an encrypted qcow2 image.
//! Offsets in the region are region-relative, so the same luks-core calls
//! serve both.

use luks_core::io::{BlockIo, FileDevice, Window};
use luks_core::luks1::{self, HeaderRepr, VolumeKey, KEY_SLOTS};
use luks_core::luks2::write::KdfParams;

use super::{unlock_error, usize_of, KdfChoice, KeySlots};
use crate::cache::CacheMode;
use crate::luks_common::OsRng;
use crate::CliError;

/// The device a LUKS1 header is read and written through: the whole file
/// of a raw volume, or the crypto region of a qcow2 image.
pub(super) type HeaderDev = Window<FileDevice>;

/// A LUKS1 header, opened.
pub(super) struct Luks1Slots {
    /// The file holding the header.
    path: String,
    /// Whether it lies inside a qcow2 image.
    qcow2: bool,
    /// The header's device.
    dev: HeaderDev,
    /// The header as read.
    hdr: HeaderRepr,
}

impl Luks1Slots {
    /// The header of a raw LUKS1 volume or detached header file.
    /// `cache`: `amend -t`.
    pub(super) fn open_raw(path: &str, writable: bool, cache: CacheMode) -> Result<Self, CliError> {
        let dev = raw_window_cached(path, writable, cache)?;
        Self::read(path, dev, false)
    }

    /// The LUKS1 header in the crypto region of the qcow2 image `path`.
    /// `cache`: `amend -t`.
    pub(super) fn open_qcow2(
        path: &str,
        writable: bool,
        cache: CacheMode,
    ) -> Result<Self, CliError> {
        let dev = qcow2_window_cached(path, writable, cache)?;
        Self::read(path, dev, true)
    }

    fn read(path: &str, mut dev: HeaderDev, qcow2: bool) -> Result<Self, CliError> {
        let hdr = luks1::read_header(&mut dev).map_err(|e| {
            CliError::io(
                path,
                if qcow2 {
                    format!("LUKS header in the image: {e}")
                } else {
                    e.to_string()
                },
            )
        })?;
        Ok(Self {
            path: path.to_string(),
            qcow2,
            dev,
            hdr,
        })
    }

    fn fail(&self, e: impl std::fmt::Display) -> CliError {
        CliError::io(&self.path, e.to_string())
    }

    /// The PBKDF2 iterations in `kdf` (a LUKS1 slot has no other KDF).
    fn iterations(&self, kdf: KdfParams) -> Result<u32, CliError> {
        match kdf {
            KdfParams::Pbkdf2 { iterations, .. } => Ok(iterations),
            KdfParams::Argon2 { .. } => Err(self.err("LUKS1 key slots use PBKDF2 only")),
        }
    }
}

impl KeySlots for Luks1Slots {
    fn path(&self) -> &str {
        &self.path
    }

    fn in_qcow2(&self) -> bool {
        self.qcow2
    }

    fn slot_count(&self) -> u8 {
        u8::try_from(KEY_SLOTS).unwrap_or(u8::MAX)
    }

    fn is_active(&self, slot: u8) -> bool {
        self.hdr
            .key_slots
            .get(usize::from(slot))
            .is_some_and(|k| k.active)
    }

    fn unlocking_slots(&self) -> Vec<u8> {
        self.hdr.active_slots().collect()
    }

    fn unlock(&mut self, pass: &[u8], slot: Option<u8>) -> Result<(VolumeKey, u8), CliError> {
        luks1::unlock(&mut self.dev, &self.hdr, pass, slot).map_err(|e| unlock_error(&self.path, e))
    }

    fn opens(&mut self, pass: &[u8], slot: u8) -> Result<bool, CliError> {
        match luks1::unlock(&mut self.dev, &self.hdr, pass, Some(slot)) {
            Ok(_) => Ok(true),
            Err(luks_core::Error::WrongPassphrase | luks_core::Error::KeySlotNotActive(_)) => {
                Ok(false)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// PBKDF2 with the header's hash, iterations that take about
    /// `c.iter_time` ms for the program that opens the slot: QEMU for a
    /// qcow2 image, cryptsetup for a raw volume.
    fn kdf(&self, c: &KdfChoice, _like: u8) -> Result<KdfParams, CliError> {
        let hash =
            luks_core::hash::HashAlg::from_name(&self.hdr.hash_spec).map_err(|e| self.fail(e))?;
        let key_bytes = usize::try_from(self.hdr.key_bytes).unwrap_or(usize::MAX);
        let reader = if self.qcow2 {
            luks1::Pbkdf2Reader::Qemu
        } else {
            luks1::Pbkdf2Reader::Cryptsetup
        };
        let iterations = luks1::calibrate_iterations(
            hash,
            key_bytes,
            c.iter_time.max(1),
            reader,
            crate::luks_common::cpu_clock(),
        );
        Ok(KdfParams::Pbkdf2 { hash, iterations })
    }

    fn add(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: Option<u8>,
    ) -> Result<u8, CliError> {
        let iterations = self.iterations(kdf)?;
        luks1::add_key(
            &mut self.dev,
            &mut self.hdr,
            vk,
            pass,
            iterations,
            slot,
            &mut OsRng,
        )
        .map_err(|e| self.fail(e))
    }

    fn replace(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: u8,
    ) -> Result<(), CliError> {
        let iterations = self.iterations(kdf)?;
        luks1::replace_key(
            &mut self.dev,
            &mut self.hdr,
            vk,
            pass,
            iterations,
            slot,
            &mut OsRng,
        )
        .map_err(|e| self.fail(e))
    }

    fn change_in_place(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: u8,
    ) -> Result<(), CliError> {
        self.replace(vk, pass, kdf, slot)
    }

    fn erase(&mut self, slot: u8) -> Result<(), CliError> {
        luks1::remove_key(&mut self.dev, &mut self.hdr, slot, true).map_err(|e| self.fail(e))
    }

    /// Up to the end of the last key slot's material, rounded up to 4 KiB;
    /// a detached header file may end before that, and the rest reads as
    /// zeroes.
    fn header_area(&mut self) -> Result<zeroize::Zeroizing<Vec<u8>>, CliError> {
        let len = area_len(&self.hdr);
        let mut buf = zeroize::Zeroizing::new(vec![0u8; usize_of(len, &self.path)?]);
        let have = self.dev.size().map_err(|e| self.fail(e))?.min(len);
        let have = usize_of(have, &self.path)?;
        self.dev
            .read_at(0, &mut buf[..have])
            .map_err(|e| self.fail(e))?;
        Ok(buf)
    }
}

/// Bytes of the header and key material area, as cryptsetup's
/// luksHeaderBackup writes them: up to the end of the last key slot's
/// material, rounded up to 4 KiB.
pub(super) fn area_len(hdr: &HeaderRepr) -> u64 {
    hdr.key_material_end().next_multiple_of(4096)
}

/// Reads the LUKS1 header at the start of `bytes` (a backup or a
/// volume's first sectors), `None` when there is no valid one.
pub(super) fn parse_raw_header(bytes: &[u8]) -> Option<HeaderRepr> {
    let h = luks1::Header::new_checked(bytes.get(..luks1::HEADER_LEN)?).ok()?;
    HeaderRepr::parse(&h).ok()
}

/// The whole file `path` as a header device.
pub(super) fn raw_window(path: &str, writable: bool) -> Result<HeaderDev, CliError> {
    raw_window_cached(path, writable, CacheMode::Writeback)
}

/// [`raw_window`] with the file opened in cache mode `cache`.
fn raw_window_cached(path: &str, writable: bool, cache: CacheMode) -> Result<HeaderDev, CliError> {
    let len = crate::file::file_length(path)?;
    let file = crate::file::open_file_cached(path, writable, cache)?;
    Ok(Window::new(file, 0, len))
}

/// The LUKS region of the encrypted qcow2 image `path` as a header
/// device, after [`check_region`].
pub(super) fn qcow2_window(path: &str, writable: bool) -> Result<HeaderDev, CliError> {
    qcow2_window_cached(path, writable, CacheMode::Writeback)
}

/// [`qcow2_window`] with the file opened in cache mode `cache`.
fn qcow2_window_cached(
    path: &str,
    writable: bool,
    cache: CacheMode,
) -> Result<HeaderDev, CliError> {
    let (offset, len) = qcow2_region(path)?;
    let file = crate::file::open_file_cached(path, writable, cache)?;
    Ok(Window::new(file, offset, len))
}

/// Offset and length of the LUKS region of an encrypted qcow2 image.
fn qcow2_region(path: &str) -> Result<(u64, u64), CliError> {
    let opening = crate::qcow2::Opening::open(path)?;
    let info = opening.img.info();
    match info.header.crypt_method {
        qcow_core::CryptMethod::None => Err(CliError::io(
            path,
            "Can't amend encryption options - encryption not present".into(),
        )),
        qcow_core::CryptMethod::Aes => Err(CliError::io(
            path,
            "Only LUKS encryption options can be amended: legacy AES encryption (crypt_method \
             1) has no key slots; convert the image to encrypt.format=luks"
                .into(),
        )),
        qcow_core::CryptMethod::Luks => {
            let c = info.crypto.ok_or_else(|| {
                CliError::io(
                    path,
                    "the full disk encryption header extension is missing".into(),
                )
            })?;
            check_region(
                &info.header,
                c.offset,
                c.length,
                crate::file::file_length(path)?,
            )
            .map_err(|what| {
                CliError::io(
                    path,
                    format!(
                        "the LUKS region ({} bytes at {}) named by the full disk encryption \
                         header extension {what}; refusing to write key slots there \
                         (qemu-img check the image)",
                        c.length, c.offset
                    ),
                )
            })?;
            Ok((c.offset, c.length))
        }
    }
}

/// Before key slots are written into a qcow2 image's LUKS region: it must
/// be cluster-aligned, inside the file, and clear of the header cluster,
/// the L1 table, the refcount table and the snapshot table (the region is
/// untrusted input; a bad one must not let a key slot overwrite metadata).
fn check_region(
    h: &qcow_core::header::HeaderRepr,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<(), &'static str> {
    let cluster = h.cluster_size();
    let end = offset.checked_add(len).ok_or("overflows")?;
    if len == 0 || !offset.is_multiple_of(cluster) {
        return Err("is empty or not cluster-aligned");
    }
    if end > file_len {
        return Err("runs past the end of the file");
    }
    let tables = [
        (0, cluster),
        (h.l1_table_offset, u64::from(h.l1_size).saturating_mul(8)),
        (
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters).saturating_mul(cluster),
        ),
        (
            h.snapshots_offset,
            if h.nb_snapshots == 0 { 0 } else { cluster },
        ),
    ];
    for (at, n) in tables {
        if n != 0 && offset < at.saturating_add(n) && at < end {
            return Err("overlaps the image's metadata");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LUKS region must not let key slot writes reach qcow2 metadata.
    #[test]
    fn qcow2_luks_regions_are_checked_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("i.qcow2");
        let o = qcow_core::CreateOptions {
            size: 1 << 20,
            luks_region_len: Some(2 << 20),
            ..qcow_core::CreateOptions::default()
        };
        let dev = FileDevice::create(&f).unwrap();
        let w = qcow_core::create(dev, &o).unwrap();
        let (off, len) = w.crypto_region().unwrap();
        let h = *w.header();
        let file_len = std::fs::metadata(&f).unwrap().len();
        assert_eq!(check_region(&h, off, len, file_len), Ok(()));
        let c = h.cluster_size();
        assert!(check_region(&h, 0, len, file_len).is_err());
        assert!(check_region(&h, off + 512, len, file_len).is_err());
        assert!(check_region(&h, off, len + c, file_len).is_err());
        assert!(check_region(&h, off, 0, file_len).is_err());
        assert!(check_region(&h, h.l1_table_offset, c, u64::MAX).is_err());
        assert!(check_region(&h, h.refcount_table_offset, c, u64::MAX).is_err());
        assert!(check_region(&h, u64::MAX - c + 1, c, u64::MAX).is_err());
    }

    /// cryptsetup's luksHeaderBackup sizes, measured: 2068480 bytes for a
    /// 512-bit key, 1052672 for a 256-bit one, whatever the payload offset.
    #[test]
    fn header_backup_covers_the_key_material_rounded_to_4k() {
        for (key_bytes, want) in [(64u32, 2_068_480u64), (32, 1_052_672)] {
            let mut dev = luks_core::io::VecDevice::new();
            let params = luks1::FormatParams {
                key_bytes,
                iterations: 1000,
                digest_iterations: 1000,
                ..luks1::FormatParams::default()
            };
            let (hdr, _) = luks1::format(&mut dev, &params, None, b"p", &mut OsRng).unwrap();
            assert_eq!(area_len(&hdr), want);
            assert!(parse_raw_header(dev.as_slice()).is_some());
            assert!(parse_raw_header(&dev.as_slice()[1..]).is_none());
        }
    }
}
