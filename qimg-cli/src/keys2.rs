//! The cryptsetup-style key verbs on raw LUKS2 volumes (or detached LUKS2
//! headers): `qimg luks add-key | remove-key | change-key |
//! header-backup | header-restore`. luks-core's `luks2::write` keeps both
//! header copies in step; this module picks slots, KDF parameters and
//! confirmations as cryptsetup does.

use luks_core::io::{BlockIo, FileDevice};
use luks_core::luks1::VolumeKey;
use luks_core::luks2::write::{self, KdfParams};
use luks_core::luks2::{self, Kdf, Luks2Header};
use luks_core::HashAlg;

use crate::keys_io::usize_of;
use crate::luks_common::OsRng;
use crate::secret::Secret;
use crate::CliError;

/// LUKS2 key slot ids run 0..=31.
const SLOTS: u8 = 32;

/// How the new key slot's KDF is chosen: `--pbkdf`, `--pbkdf-memory`,
/// `--pbkdf-force-iterations`, `--iter-time`; what is not given comes from
/// the key slot the existing passphrase opened.
#[derive(Debug, Clone, Default)]
pub(crate) struct KdfChoice {
    /// `--pbkdf`: pbkdf2, argon2i or argon2id.
    pub(crate) pbkdf: Option<String>,
    /// `--pbkdf-memory` in KiB (Argon2).
    pub(crate) memory_kib: Option<u32>,
    /// `--pbkdf-force-iterations`: fixed iterations or passes.
    pub(crate) iterations: Option<u32>,
    /// `--iter-time` in milliseconds (calibration target).
    pub(crate) iter_time: u32,
}

/// A LUKS2 header opened for changing key slots.
pub(crate) struct Target2 {
    /// The file holding the header.
    path: String,
    /// It, open for writing.
    dev: FileDevice,
    /// The header.
    h: Luks2Header,
    /// Its JSON text (tokens and flags are kept from it).
    json: Vec<u8>,
}

impl Target2 {
    /// Opens the LUKS2 header of `path` for writing; a file that ends
    /// before its header area or payload offset is refused (key slots
    /// written there would extend a truncated copy).
    pub(crate) fn open(path: &str) -> Result<Self, CliError> {
        let (h, json) = crate::luks2::read_header(path)?;
        luks2::check_requirements::<std::convert::Infallible>(&h.meta)
            .map_err(|e| CliError::io(path, e.to_string()))?;
        crate::luks2::check_length(path, &h)?;
        let dev = crate::file::open_file(path, true)?;
        Ok(Self {
            path: path.to_string(),
            dev,
            h,
            json,
        })
    }

    fn err(&self, msg: impl Into<String>) -> CliError {
        CliError::io(&self.path, msg.into())
    }

    /// Whether key slot `s` exists.
    pub(crate) fn active(&self, s: u8) -> bool {
        self.h.meta.keyslot(s).is_some()
    }

    /// The lowest free key slot id.
    pub(crate) fn free_slot(&self) -> Option<u8> {
        (0..SLOTS).find(|&s| !self.active(s))
    }

    /// Key slots bound to the data segment.
    pub(crate) fn bound_count(&self) -> usize {
        self.h
            .meta
            .keyslots
            .iter()
            .filter(|k| luks2::is_bound(&self.h.meta, k.id))
            .count()
    }

    /// Checks `slot` for add-key as cryptsetup does.
    pub(crate) fn check_new_slot(&self, slot: Option<u8>) -> Result<(), CliError> {
        match slot {
            Some(s) if s >= SLOTS => Err(self.err(format!(
                "Key slot {s} is invalid, please select between 0 and {}.",
                SLOTS - 1
            ))),
            Some(s) if self.active(s) => {
                Err(self.err(format!("Key slot {s} is full, please select another one.")))
            }
            None if self.free_slot().is_none() => Err(self.err("All key slots full.")),
            _ => Ok(()),
        }
    }

    /// The volume key `pass` opens (in `slot` only, if given), and the slot.
    pub(crate) fn unlock(
        &mut self,
        pass: &[u8],
        slot: Option<u8>,
    ) -> Result<(VolumeKey, u8), CliError> {
        let mut mem = crate::luks2::memory(&self.path, &self.h)?;
        luks2::unlock(&mut self.dev, &self.h, pass, slot, &mut mem)
            .map_err(|e| crate::keys_io::unlock_error(&self.path, e))
    }

    /// The KDF of a new key slot: `c` where given, else like key slot
    /// `like`.
    pub(crate) fn kdf(&self, c: &KdfChoice, like: u8) -> Result<KdfParams, CliError> {
        let old = self.h.meta.keyslot(like).and_then(|k| k.kdf.clone());
        let name = match (&c.pbkdf, &old) {
            (Some(n), _) => n.clone(),
            (None, Some(Kdf::Argon2 { id: false, .. })) => "argon2i".into(),
            (None, Some(Kdf::Pbkdf2 { .. })) => "pbkdf2".into(),
            _ => "argon2id".into(),
        };
        let elapsed_since = |t: std::time::Instant| {
            move || u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
        };
        let ms = c.iter_time.max(1);
        match name.as_str() {
            "pbkdf2" => {
                let hash = match &old {
                    Some(Kdf::Pbkdf2 { hash, .. }) => *hash,
                    _ => HashAlg::Sha256,
                };
                let iterations = match c.iterations {
                    Some(n) => n,
                    None => luks_core::luks1::calibrate_iterations(
                        hash,
                        self.h
                            .meta
                            .keyslot(like)
                            .map_or(64, |k| usize::try_from(k.key_size).unwrap_or(64)),
                        ms,
                        luks_core::luks1::Pbkdf2Reader::Cryptsetup,
                        crate::luks_common::cpu_clock(),
                    ),
                };
                Ok(KdfParams::Pbkdf2 { hash, iterations })
            }
            "argon2i" | "argon2id" => {
                let id = name == "argon2id";
                let (old_mem, old_cpus) = match &old {
                    Some(Kdf::Argon2 {
                        memory_kib, cpus, ..
                    }) => (*memory_kib, *cpus),
                    _ => (
                        crate::luks2::default_argon2_memory_kib(),
                        crate::luks2::default_argon2_lanes(),
                    ),
                };
                let memory_kib = c.memory_kib.unwrap_or(old_mem);
                let time = match c.iterations {
                    Some(n) => n,
                    None => write::calibrate_argon2::<std::convert::Infallible>(
                        id,
                        memory_kib,
                        old_cpus,
                        ms,
                        elapsed_since(std::time::Instant::now()),
                    )
                    .map_err(|e| self.err(e.to_string()))?,
                };
                Ok(KdfParams::Argon2 {
                    id,
                    time,
                    memory_kib,
                    cpus: old_cpus,
                })
            }
            other => Err(CliError::usage(format!(
                "--pbkdf '{other}' is not one of pbkdf2, argon2i, argon2id"
            ))),
        }
    }

    /// Writes `pass` for `vk` into `slot` (or the lowest free one).
    pub(crate) fn add(
        &mut self,
        vk: &VolumeKey,
        pass: &Secret,
        kdf: KdfParams,
        slot: Option<u8>,
    ) -> Result<u8, CliError> {
        let (text, id) = write::add_key(
            &mut self.dev,
            &mut self.h,
            &self.json,
            vk,
            pass,
            kdf,
            slot,
            &mut OsRng,
        )
        .map_err(|e| CliError::io(&self.path, e.to_string()))?;
        self.json = text.into_bytes();
        Ok(id)
    }

    /// Whether `pass` opens key slot `slot`.
    fn opens(&mut self, pass: &[u8], slot: u8) -> Result<bool, CliError> {
        let mut mem = crate::luks2::memory(&self.path, &self.h)?;
        match luks2::open_keyslot(&mut self.dev, &self.h, slot, pass, &mut mem) {
            Ok(k) => Ok(k.is_some()),
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    /// Erases key slot `slot` (`force`: even the last bound one).
    pub(crate) fn erase(&mut self, slot: u8, force: bool) -> Result<(), CliError> {
        let text = write::remove_key(
            &mut self.dev,
            &mut self.h,
            &self.json,
            slot,
            force,
            &mut OsRng,
        )
        .map_err(|e| CliError::io(&self.path, e.to_string()))?;
        self.json = text.into_bytes();
        Ok(())
    }
}

/// Bytes cryptsetup's luksHeaderBackup copies from a LUKS2 device: both
/// header copies and the key slots area.
fn area_len(h: &Luks2Header) -> u64 {
    h.meta.header_area_len(h.hdr.hdr_size)
}

/// `qimg luks header-backup` of a LUKS2 volume: the header area, byte for
/// byte, into a new file readable by its owner only.
pub(crate) fn header_backup(volume: &str, backup: &str) -> Result<u8, CliError> {
    let (h, _) = crate::luks2::read_header(volume)?;
    let len = area_len(&h);
    let mut dev = crate::file::open_file(volume, false)?;
    let size = dev
        .size()
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    if size < len {
        return Err(CliError::io(
            volume,
            format!(
                "the device ({size} bytes) is smaller than its LUKS2 header area ({len} bytes): \
                 device too small (truncated copy?)"
            ),
        ));
    }
    let mut buf = zeroize::Zeroizing::new(vec![0u8; usize_of(len, volume)?]);
    dev.read_at(0, &mut buf)
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    crate::keys_io::write_backup(backup, &buf)?;
    Ok(0)
}

/// `qimg luks header-restore` with a LUKS2 backup: refuses a backup whose
/// UUID, header size, key slots area or data offset differ from the
/// volume's LUKS2 header, then writes the backup's header area over the
/// volume's. `confirm` asks before the write.
pub(crate) fn header_restore(
    volume: &str,
    backup: &str,
    confirm: impl FnOnce(&str) -> Result<(), CliError>,
) -> Result<u8, CliError> {
    let bad = || crate::keys_io::incompatible_backup(backup);
    let (new, _) = crate::luks2::read_header(backup).map_err(|_| bad())?;
    let len = area_len(&new);
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(backup).map_err(|e| CliError::io(backup, format!("cannot read: {e}")))?,
    );
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
            if data_offset(&old) != data_offset(&new) || area_len(&old) != len {
                return Err(CliError::io(
                    volume,
                    "Data offset or header area differs on device and backup, restore failed."
                        .into(),
                ));
            }
            confirm(&format!(
                "{volume} already contains a LUKS2 header: restoring replaces its key slots."
            ))?;
        }
        Some(_) => {
            return Err(CliError::io(
                volume,
                "holds a LUKS1 header and the backup is LUKS2: restore failed (data offset \
                 and layout differ)"
                    .into(),
            ))
        }
        None => confirm(&format!(
            "{volume} does not contain a LUKS header: restoring one can destroy data on it."
        ))?,
    }
    let mut dev = crate::file::open_file(volume, true)?;
    let size = dev
        .size()
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    crate::keys_io::write_area(&mut dev, volume, size, area)?;
    Ok(0)
}

/// What `qimg amend` on a raw LUKS2 volume was given (already unlocked
/// with `pass` by the caller's rules: qemu-img's option names).
pub(crate) struct Amend2<'a> {
    /// The file holding the LUKS2 header.
    pub(crate) path: &'a str,
    /// `state=active` (else `inactive`).
    pub(crate) activate: bool,
    /// `keyslot`, 0..=31.
    pub(crate) keyslot: Option<u8>,
    /// `new-secret`'s value.
    pub(crate) new: Option<Secret>,
    /// `old-secret`'s value.
    pub(crate) old: Option<Secret>,
    /// `iter-time` in milliseconds.
    pub(crate) iter_ms: u32,
    /// `--force`.
    pub(crate) force: bool,
    /// The existing passphrase.
    pub(crate) pass: Secret,
}

/// `qimg amend` on a raw LUKS2 volume: qemu-img's key slot semantics and
/// messages (qemu-img itself has no LUKS2), over LUKS2 slots 0..=31; a new
/// slot's PBKDF is that of the slot the existing passphrase opens.
pub(crate) fn amend(a: &Amend2<'_>) -> Result<u8, CliError> {
    let mut t = Target2::open(a.path)?;
    // qemu-img exits 1 for a wrong passphrase.
    let (vk, opened) = t
        .unlock(&a.pass, None)
        .map_err(|e| CliError { code: 1, ..e })?;
    if a.activate {
        let Some(new) = &a.new else {
            return Err(t.err("'new-secret' is required to activate a keyslot"));
        };
        if a.old.is_some() {
            return Err(t.err("'old-secret' must not be given when activating keyslots"));
        }
        let kdf = t.kdf(
            &KdfChoice {
                iter_time: a.iter_ms,
                ..KdfChoice::default()
            },
            opened,
        )?;
        let slot = match a.keyslot {
            Some(s) if t.active(s) && !a.force => {
                return Err(t.err(format!(
                    "Refusing to overwrite active keyslot {s} - please erase it first \
                     (or use --force)"
                )))
            }
            Some(s) => {
                if t.active(s) {
                    t.erase(s, true)?;
                }
                s
            }
            None => t
                .free_slot()
                .ok_or_else(|| t.err("Can't add a keyslot - all keyslots are in use"))?,
        };
        t.add(&vk, new, kdf, Some(slot))?;
        return Ok(0);
    }
    if a.new.is_some() {
        return Err(t.err("'new-secret' must not be given when erasing keyslots"));
    }
    let doomed: Vec<u8> = match (a.keyslot, &a.old) {
        (None, None) => {
            return Err(t.err(
                "To erase keyslot(s), either explicit keyslot index or the password \
                 currently contained in them must be given",
            ))
        }
        (Some(s), old) => {
            if let Some(old) = old {
                if t.active(s) && !t.opens(old, s)? {
                    return Err(t.err(format!(
                        "Given keyslot {s} doesn't contain the given old password for erase \
                         operation"
                    )));
                }
            }
            if !t.active(s) {
                return Err(t.err(format!("Given keyslot {s} is already erased (inactive)")));
            }
            vec![s]
        }
        (None, Some(old)) => {
            let mut m = Vec::new();
            let active: Vec<u8> = (0..SLOTS).filter(|&s| t.active(s)).collect();
            for s in active {
                if t.opens(old, s)? {
                    m.push(s);
                }
            }
            if m.is_empty() {
                return Err(t.err("No keyslots match given (old) password for erase operation"));
            }
            m
        }
    };
    let bound_left =
        t.h.meta
            .keyslots
            .iter()
            .filter(|k| luks2::is_bound(&t.h.meta, k.id) && !doomed.contains(&k.id))
            .count();
    if bound_left == 0 && !a.force {
        return Err(t.err(
            "Attempt to erase the only active keyslot(s) which will erase all the data in the \
             image irreversibly - refusing operation (--force erases them)",
        ));
    }
    for s in doomed {
        t.erase(s, true)?;
    }
    Ok(0)
}
