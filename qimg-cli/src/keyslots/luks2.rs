//! [`KeySlots`] over a LUKS2 header: a raw volume or a detached header
//! file. luks-core's `luks2::write` keeps both header copies in step; this
//! picks KDF parameters as cryptsetup does.

use luks_core::io::{BlockIo, FileDevice};
use luks_core::luks1::VolumeKey;
use luks_core::luks2::write::{self, KdfParams};
use luks_core::luks2::{self, Kdf, Luks2Header};
use luks_core::HashAlg;

use super::{unlock_error, usize_of, KdfChoice, KeySlots};
use crate::luks_common::OsRng;
use crate::CliError;

/// LUKS2 key slot ids run 0..=31.
const SLOTS: u8 = 32;

/// A LUKS2 header, opened.
pub(super) struct Luks2Slots {
    /// The file holding the header.
    path: String,
    /// It, open for writing when asked.
    dev: FileDevice,
    /// The header.
    h: Luks2Header,
    /// Its JSON text (tokens and flags are kept from it).
    json: Vec<u8>,
}

impl Luks2Slots {
    /// Opens the LUKS2 header of `path`. For writing, a header with
    /// requirements we do not know is refused, and so is a file that ends
    /// before its header area or payload offset (key slots written there
    /// would extend a truncated copy).
    /// `cache`: `amend -t`.
    pub(super) fn open(
        path: &str,
        writable: bool,
        cache: crate::cache::CacheMode,
    ) -> Result<Self, CliError> {
        let (h, json) = crate::luks2::read_header(path)?;
        if writable {
            luks2::check_requirements::<std::convert::Infallible>(&h.meta)
                .map_err(|e| CliError::io(path, e.to_string()))?;
            crate::luks2::check_length(path, &h)?;
        }
        let dev = crate::file::open_file_cached(path, writable, cache)?;
        Ok(Self {
            path: path.to_string(),
            dev,
            h,
            json,
        })
    }

    fn fail(&self, e: impl std::fmt::Display) -> CliError {
        CliError::io(&self.path, e.to_string())
    }
}

impl KeySlots for Luks2Slots {
    fn path(&self) -> &str {
        &self.path
    }

    fn in_qcow2(&self) -> bool {
        false
    }

    fn slot_count(&self) -> u8 {
        SLOTS
    }

    fn is_active(&self, slot: u8) -> bool {
        self.h.meta.keyslot(slot).is_some()
    }

    fn unlocking_slots(&self) -> Vec<u8> {
        self.h
            .meta
            .keyslots
            .iter()
            .filter(|k| luks2::is_bound(&self.h.meta, k.id))
            .map(|k| k.id)
            .collect()
    }

    fn unlock(&mut self, pass: &[u8], slot: Option<u8>) -> Result<(VolumeKey, u8), CliError> {
        let mut mem = crate::luks2::memory(&self.path, &self.h)?;
        luks2::unlock(&mut self.dev, &self.h, pass, slot, &mut mem)
            .map_err(|e| unlock_error(&self.path, e))
    }

    fn opens(&mut self, pass: &[u8], slot: u8) -> Result<bool, CliError> {
        if !self.is_active(slot) {
            return Ok(false);
        }
        let mut mem = crate::luks2::memory(&self.path, &self.h)?;
        match luks2::open_keyslot(&mut self.dev, &self.h, slot, pass, &mut mem) {
            Ok(k) => Ok(k.is_some()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// `c`'s PBKDF, else that of slot `like` (argon2id when it has none);
    /// PBKDF2 keeps `like`'s hash, Argon2 its memory and lanes; iterations
    /// or passes from `c`, else calibrated to `c.iter_time`.
    fn kdf(&self, c: &KdfChoice, like: u8) -> Result<KdfParams, CliError> {
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
                    .map_err(|e| self.fail(e))?,
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

    fn add(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
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
        .map_err(|e| self.fail(e))?;
        self.json = text.into_bytes();
        Ok(id)
    }

    fn replace(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        kdf: KdfParams,
        slot: u8,
    ) -> Result<(), CliError> {
        self.erase(slot)?;
        self.add(vk, pass, kdf, Some(slot)).map(|_| ())
    }

    fn change_in_place(
        &mut self,
        _vk: &VolumeKey,
        _pass: &[u8],
        _kdf: KdfParams,
        _slot: u8,
    ) -> Result<(), CliError> {
        Err(self.err(
            "All key slots full: no free key slot to write the new key to before the old one \
             is erased; remove a key slot first",
        ))
    }

    /// Even the last bound slot: the callers ask or refuse first.
    fn erase(&mut self, slot: u8) -> Result<(), CliError> {
        let text = write::remove_key(
            &mut self.dev,
            &mut self.h,
            &self.json,
            slot,
            true,
            &mut OsRng,
        )
        .map_err(|e| self.fail(e))?;
        self.json = text.into_bytes();
        Ok(())
    }

    /// Both header copies and the key slots area; a device shorter than
    /// that is refused.
    fn header_area(&mut self) -> Result<zeroize::Zeroizing<Vec<u8>>, CliError> {
        let len = area_len(&self.h);
        let size = self.dev.size().map_err(|e| self.fail(e))?;
        if size < len {
            return Err(self.err(&format!(
                "the device ({size} bytes) is smaller than its LUKS2 header area ({len} bytes): \
                 device too small (truncated copy?)"
            )));
        }
        let mut buf = zeroize::Zeroizing::new(vec![0u8; usize_of(len, &self.path)?]);
        self.dev.read_at(0, &mut buf).map_err(|e| self.fail(e))?;
        Ok(buf)
    }
}

/// Bytes cryptsetup's luksHeaderBackup copies from a LUKS2 device: both
/// header copies and the key slots area.
pub(super) fn area_len(h: &Luks2Header) -> u64 {
    h.meta.header_area_len(h.hdr.hdr_size)
}
