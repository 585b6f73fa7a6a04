//! Key slot management: `qimg amend` with qemu-img's key slot options
//! (`encrypt.state`, `encrypt.keyslot`, `encrypt.new-secret`,
//! `encrypt.old-secret`, `encrypt.iter-time` for qcow2; the same names
//! without `encrypt.` for raw LUKS), and `qimg luks add-key | remove-key |
//! change-key | header-backup | header-restore` with cryptsetup's meaning.
//!
//! Both work on the LUKS1 header of a raw volume or the one stored in the
//! crypto region of an encrypted qcow2 image (offsets in the region are
//! region-relative, so the same luks-core calls serve both). luks-core
//! writes new key material and flushes it before the header names it, and
//! wipes (and flushes) material before the header drops a slot.

use std::io::{IsTerminal, Write};
use std::path::Path;

use luks_core::io::{BlockIo, FileDevice, Window};
use luks_core::luks1::{self, HeaderRepr, VolumeKey, KEY_SLOTS};

use crate::args::SecretArgs;
use crate::format::Format;
use crate::keys_io::{incompatible_backup, unlock_error, usize_of, write_area, write_backup};
use crate::luks_common::{KeySource, OsRng};
use crate::opts::OptionMap;
use crate::secret::{Secret, Secrets};
use crate::CliError;

/// The device a LUKS1 header is read and written through: the whole file
/// of a raw volume, or the crypto region of a qcow2 image.
type HeaderDev = Window<FileDevice>;

/// The LUKS1 header of an image, opened for reading and writing.
struct Target {
    /// The file holding the header.
    path: String,
    /// Whether it lies inside a qcow2 image (option names get `encrypt.`).
    qcow2: bool,
    /// The header's device.
    dev: HeaderDev,
    /// The header as read.
    hdr: HeaderRepr,
}

impl Target {
    /// Opens the LUKS header of `path` (format from `format` or the magic)
    /// for writing.
    fn open(path: &str, format: Option<Format>, writable: bool) -> Result<Self, CliError> {
        let format = crate::format::resolve(path, format, None)?;
        if format == Format::Luks && crate::format::luks_version(path)? == Some(2) {
            return Err(CliError::io(
                path,
                "is a LUKS2 volume, but was opened as a LUKS1 header (give -f luks, or \
                 the header file with --header)"
                    .into(),
            ));
        }
        let (mut dev, qcow2) = open_window(path, format, writable)?;
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

    fn err(&self, msg: impl Into<String>) -> CliError {
        CliError::io(&self.path, msg.into())
    }

    /// The volume key that `pass` opens (in `slot` only, if given).
    fn unlock(&mut self, pass: &[u8], slot: Option<u8>) -> Result<(VolumeKey, u8), CliError> {
        luks1::unlock(&mut self.dev, &self.hdr, pass, slot).map_err(|e| unlock_error(&self.path, e))
    }

    /// Whether `pass` opens key slot `slot`.
    fn opens(&mut self, pass: &[u8], slot: u8) -> Result<bool, CliError> {
        match luks1::unlock(&mut self.dev, &self.hdr, pass, Some(slot)) {
            Ok(_) => Ok(true),
            Err(luks_core::Error::WrongPassphrase | luks_core::Error::KeySlotNotActive(_)) => {
                Ok(false)
            }
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    fn active(&self, slot: u8) -> bool {
        self.hdr
            .key_slots
            .get(usize::from(slot))
            .is_some_and(|k| k.active)
    }

    fn active_count(&self) -> usize {
        self.hdr.active_slots().count()
    }

    /// PBKDF2 iterations for a new slot that take about `ms` here.
    fn iterations(&self, ms: u32) -> Result<u32, CliError> {
        let hash = luks_core::hash::HashAlg::from_name(&self.hdr.hash_spec)
            .map_err(|e| self.err(e.to_string()))?;
        let key_bytes = usize::try_from(self.hdr.key_bytes).unwrap_or(usize::MAX);
        // A qcow2 image's slots are opened by QEMU, a raw volume's by
        // cryptsetup: count by their PBKDF2's speed.
        let reader = if self.qcow2 {
            luks1::Pbkdf2Reader::Qemu
        } else {
            luks1::Pbkdf2Reader::Cryptsetup
        };
        Ok(luks1::calibrate_iterations(
            hash,
            key_bytes,
            ms.max(1),
            reader,
            crate::luks_common::cpu_clock(),
        ))
    }

    /// Writes `pass` into `slot` (a free one, or an active one when
    /// `overwrite`), or into the lowest free slot.
    fn add(
        &mut self,
        vk: &VolumeKey,
        pass: &[u8],
        iterations: u32,
        slot: Option<u8>,
        overwrite: bool,
    ) -> Result<u8, CliError> {
        let r = match slot {
            Some(s) if overwrite && self.active(s) => luks1::replace_key(
                &mut self.dev,
                &mut self.hdr,
                vk,
                pass,
                iterations,
                s,
                &mut OsRng,
            )
            .map(|()| s),
            _ => luks1::add_key(
                &mut self.dev,
                &mut self.hdr,
                vk,
                pass,
                iterations,
                slot,
                &mut OsRng,
            ),
        };
        r.map_err(|e| self.err(e.to_string()))
    }

    /// Erases `slot` (the caller has decided it may go).
    fn erase(&mut self, slot: u8) -> Result<(), CliError> {
        luks1::remove_key(&mut self.dev, &mut self.hdr, slot, true)
            .map_err(|e| self.err(e.to_string()))
    }

    /// The first inactive slot.
    fn free_slot(&self) -> Option<u8> {
        (0..KEY_SLOTS)
            .find(|&i| !self.hdr.key_slots[i].active)
            .and_then(|i| u8::try_from(i).ok())
    }
}

/// The device holding the LUKS header of `path`: the whole file of a raw
/// volume, or the crypto region of a qcow2 image (then `true`).
fn open_window(path: &str, format: Format, writable: bool) -> Result<(HeaderDev, bool), CliError> {
    let (qcow2, (offset, len)) = match format {
        Format::Luks => (false, (0, crate::file::file_length(path)?)),
        Format::Qcow2 => (true, qcow2_region(path)?),
        Format::Raw => {
            return Err(CliError::io(
                path,
                "not encrypted: key slots exist only in LUKS volumes and LUKS-encrypted qcow2 \
                 images"
                    .into(),
            ))
        }
    };
    let file = crate::file::open_file(path, writable)?;
    Ok((Window::new(file, offset, len), qcow2))
}

/// Offset and length of the LUKS region of an encrypted qcow2 image.
fn qcow2_region(path: &str) -> Result<(u64, u64), CliError> {
    let opening = crate::qcow2::Opening::open(path)?;
    let info = opening.img.info();
    match info.header.crypt_method {
        0 => Err(CliError::io(
            path,
            "Can't amend encryption options - encryption not present".into(),
        )),
        1 => Err(CliError::io(
            path,
            "Only LUKS encryption options can be amended: legacy AES encryption (crypt_method \
             1) has no key slots; convert the image to encrypt.format=luks"
                .into(),
        )),
        _ => {
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

/// What `qimg amend` was given.
pub(crate) struct AmendArgs<'a> {
    /// `-f`.
    pub(crate) format: Option<Format>,
    /// `-o` lists.
    pub(crate) options: &'a [String],
    /// `--force`.
    pub(crate) force: bool,
    /// `--image-opts`: `filename` is an option list.
    pub(crate) image_opts: bool,
    /// `--object`, `--key-file`, `--key-secret`.
    pub(crate) secrets: &'a SecretArgs,
    /// The image (or its option list).
    pub(crate) filename: &'a str,
}

/// `state=active|inactive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Inactive,
}

/// `qimg amend`: adds or erases key slots as qemu-img amend does.
pub(crate) fn amend(a: &AmendArgs<'_>) -> Result<u8, CliError> {
    let secrets = Secrets::parse(&a.secrets.object)?;
    let spec = crate::image_spec::ImageSpec::from_arg(a.filename, a.image_opts, a.format)?;
    spec.refuse_backing_keys()?;
    let (mut path, mut format, mut key_secret) = (
        spec.path.clone(),
        Some(spec.resolve(a.secrets.header.as_deref())?),
        spec.key_secret.clone(),
    );
    // A raw LUKS volume with a detached header: the key slots are there.
    if let Some(h) = &a.secrets.header {
        path.clone_from(h);
        format = Some(Format::Luks);
    }
    crate::lock::will_write(&path);
    if a.options.is_empty() {
        return Err(CliError::usage(
            "Must specify options (-o); see `qimg amend --help`".into(),
        ));
    }
    let opts = OptionMap::parse(a.options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    let format = crate::format::resolve(&path, format, None)?;
    if format == Format::Qcow2 {
        crate::chain_lock::lock_backing_chain(&path)?;
    }
    if format == Format::Luks {
        crate::lock::lock_for_luks_amend(&path)?;
    }
    // A raw LUKS2 volume goes to keys2 once the options are read.
    let luks2 = format == Format::Luks && crate::format::luks_version(&path)? == Some(2);
    let t = if luks2 {
        None
    } else {
        Some(Target::open(&path, Some(format), true)?)
    };
    let qcow2 = t.as_ref().is_some_and(|t| t.qcow2);
    let p = if qcow2 { "encrypt." } else { "" };
    let get = |k: &str| opts.get(&format!("{p}{k}")).map(str::to_string);
    if opts.get(&format!("{p}format")).is_some() {
        return Err(CliError::usage(format!(
            "Invalid parameter '{p}format': this option is only supported for image creation"
        )));
    }
    let state = get("state");
    let keyslot = get("keyslot");
    let new_secret = get("new-secret");
    let old_secret = get("old-secret");
    let iter_time = get("iter-time");
    if let Some(k) = get("key-secret") {
        key_secret = Some(k);
    }
    opts.reject_unused(if qcow2 { "qcow2" } else { "luks" })
        .map_err(|e| CliError::io(&path, format!("{e} (amend changes key slots only)")))?;
    let state = match state.as_deref() {
        None => return Err(CliError::usage("Parameter 'state' is missing".into())),
        Some("active") => State::Active,
        Some("inactive") => State::Inactive,
        Some(v) => {
            return Err(CliError::usage(format!(
                "Parameter 'state' does not accept value '{v}' (active or inactive)"
            )))
        }
    };
    let keyslot = keyslot
        .map(|s| parse_slot(&s, if luks2 { 32 } else { KEY_SLOTS }))
        .transpose()?;
    let iter_ms = match iter_time {
        None => 2000,
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| CliError::usage(format!("Parameter 'iter-time' expects a number: {v}")))?,
    };
    // Like qemu-img, the image is opened (unlocked) first.
    let keys = KeySource {
        key_file: a.secrets.key_file.clone(),
        key_secret: key_secret.or_else(|| a.secrets.key_secret.clone()),
    };
    let pass = keys.resolve(&path, &secrets, false)?;
    let Some(mut t) = t else {
        let new = new_secret.map(|id| secrets.get(&id)).transpose()?;
        let old = old_secret.map(|id| secrets.get(&id)).transpose()?;
        return crate::keys2::amend(&crate::keys2::Amend2 {
            path: &path,
            activate: state == State::Active,
            keyslot,
            new,
            old,
            iter_ms,
            force: a.force,
            pass,
        });
    };
    // qemu-img exits 1 for a wrong passphrase (cryptsetup: 2).
    let (vk, _) = t
        .unlock(&pass, None)
        .map_err(|e| CliError { code: 1, ..e })?;
    drop(pass);
    match state {
        State::Active => {
            let Some(new_id) = new_secret else {
                return Err(t.err("'new-secret' is required to activate a keyslot"));
            };
            if old_secret.is_some() {
                return Err(t.err("'old-secret' must not be given when activating keyslots"));
            }
            let new_pass = secrets.get(&new_id)?;
            let slot = match keyslot {
                Some(s) if t.active(s) && !a.force => {
                    return Err(t.err(format!(
                        "Refusing to overwrite active keyslot {s} - please erase it first \
                         (or use --force)"
                    )))
                }
                Some(s) => s,
                None => t
                    .free_slot()
                    .ok_or_else(|| t.err("Can't add a keyslot - all keyslots are in use"))?,
            };
            let iterations = t.iterations(iter_ms)?;
            t.add(&vk, &new_pass, iterations, Some(slot), a.force)?;
        }
        State::Inactive => {
            if new_secret.is_some() {
                return Err(t.err("'new-secret' must not be given when erasing keyslots"));
            }
            let old = old_secret.map(|id| secrets.get(&id)).transpose()?;
            match (keyslot, old) {
                (None, None) => {
                    return Err(t.err(
                        "To erase keyslot(s), either explicit keyslot index or the password \
                         currently contained in them must be given",
                    ))
                }
                (Some(s), old) => {
                    if let Some(old) = &old {
                        if !t.opens(old, s)? {
                            return Err(t.err(format!(
                                "Given keyslot {s} doesn't contain the given old password for \
                                 erase operation"
                            )));
                        }
                    }
                    if !t.active(s) {
                        return Err(
                            t.err(format!("Given keyslot {s} is already erased (inactive)"))
                        );
                    }
                    if t.active_count() == 1 && !a.force {
                        return Err(t.err(format!(
                            "Attempt to erase the only active keyslot {s} which will erase all \
                             the data in the image irreversibly - refusing operation (--force \
                             erases it)"
                        )));
                    }
                    t.erase(s)?;
                }
                (None, Some(old)) => {
                    let mut matching = Vec::new();
                    for s in t.hdr.active_slots().collect::<Vec<_>>() {
                        if t.opens(&old, s)? {
                            matching.push(s);
                        }
                    }
                    if matching.is_empty() {
                        return Err(
                            t.err("No keyslots match given (old) password for erase operation")
                        );
                    }
                    if matching.len() == t.active_count() && !a.force {
                        return Err(t.err(
                            "All the active keyslots match the (old) password that was given and \
                             erasing them will erase all the data in the image irreversibly - \
                             refusing operation (--force erases them)",
                        ));
                    }
                    for s in matching {
                        t.erase(s)?;
                    }
                }
            }
        }
    }
    Ok(0)
}

/// A key slot number below `count` (8 for LUKS1, 32 for LUKS2), with
/// qemu-img's messages.
fn parse_slot(s: &str, count: usize) -> Result<u8, CliError> {
    let n: i64 = s
        .parse()
        .map_err(|_| CliError::usage(format!("Parameter 'keyslot' expects a number: '{s}'")))?;
    u8::try_from(n)
        .ok()
        .filter(|&n| usize::from(n) < count)
        .ok_or_else(|| {
            CliError::usage(format!(
                "Invalid keyslot {n} specified, must be between 0 and {}",
                count.saturating_sub(1)
            ))
        })
}

/// The command line of `qimg luks add-key | remove-key | change-key`.
#[derive(Debug, clap::Args)]
pub(crate) struct KeyVerbArgs {
    /// The volume: a raw LUKS volume or a LUKS-encrypted qcow2 image.
    volume: String,
    /// A file holding the new key (add-key, change-key) or the key to
    /// remove (remove-key), byte for byte; asked on the terminal when
    /// absent.
    #[arg(value_name = "KEY_FILE")]
    new_key_file: Option<String>,
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<crate::format::Format>,
    /// The key slot: where the new key goes (add-key), or the only slot
    /// the existing key is tried in (remove-key, change-key).
    #[arg(short = 'S', long = "key-slot", value_name = "N")]
    key_slot: Option<u8>,
    /// PBKDF2 time for the new key slot, in milliseconds.
    #[arg(
        short = 'i',
        long = "iter-time",
        value_name = "MS",
        default_value_t = 2000
    )]
    iter_time: u32,
    /// LUKS2: the new key slot's PBKDF (pbkdf2, argon2i, argon2id);
    /// that of the key slot the existing key opens when absent.
    #[arg(long = "pbkdf", value_name = "PBKDF")]
    pbkdf: Option<String>,
    /// LUKS2: Argon2 memory of the new key slot, in KiB.
    #[arg(long = "pbkdf-memory", value_name = "KIB")]
    pbkdf_memory: Option<u32>,
    /// LUKS2: fixed PBKDF2 iterations / Argon2 passes instead of
    /// calibrating to --iter-time.
    #[arg(long = "pbkdf-force-iterations", value_name = "N")]
    pbkdf_force_iterations: Option<u32>,
    /// Ask no questions (removing the last key slot needs this when
    /// standard input is not a terminal).
    #[arg(short = 'q', long = "batch-mode")]
    batch: bool,
    #[command(flatten)]
    secrets: SecretArgs,
}

/// Which of the key verbs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyVerb {
    /// luksAddKey.
    Add,
    /// luksRemoveKey.
    Remove,
    /// luksChangeKey.
    Change,
}

/// Runs `qimg luks add-key | remove-key | change-key`.
pub(crate) fn run_key_verb(verb: KeyVerb, c: &KeyVerbArgs) -> Result<u8, CliError> {
    // The file with the key slots is written: write-locked from its first
    // open (a detached header, else the volume).
    crate::lock::will_write(c.secrets.header.as_deref().unwrap_or(&c.volume));
    let a = LuksKeyArgs {
        volume: &c.volume,
        format: c.format,
        key_file_arg: c.new_key_file.as_deref(),
        key_slot: c.key_slot,
        iter_time: c.iter_time,
        kdf: crate::keys2::KdfChoice {
            pbkdf: c.pbkdf.clone(),
            memory_kib: c.pbkdf_memory,
            iterations: c.pbkdf_force_iterations,
            iter_time: c.iter_time,
        },
        batch: c.batch,
        secrets: &c.secrets,
    };
    match verb {
        KeyVerb::Add => add_key(&a),
        KeyVerb::Remove => remove_key(&a),
        KeyVerb::Change => change_key(&a),
    }
}

/// The command line of `qimg luks header-backup | header-restore`.
#[derive(Debug, clap::Args)]
pub(crate) struct HeaderFileArgs {
    /// The raw LUKS volume (or detached header).
    volume: String,
    /// The backup file (created by header-backup, which refuses to
    /// overwrite it; read by header-restore).
    #[arg(long = "header-backup-file", value_name = "PATH")]
    header_backup_file: String,
    /// Ask no questions (header-restore needs this when standard input is
    /// not a terminal).
    #[arg(short = 'q', long = "batch-mode")]
    batch: bool,
}

/// Runs `qimg luks header-backup` (`restore` false) or `header-restore`.
pub(crate) fn run_header_verb(restore: bool, c: &HeaderFileArgs) -> Result<u8, CliError> {
    let v2 = |p: &str| -> Result<bool, CliError> {
        Ok(std::fs::metadata(p).is_ok() && crate::format::luks_version(p)? == Some(2))
    };
    if restore {
        crate::lock::will_write(&c.volume);
        if v2(&c.header_backup_file)? {
            return crate::keys2::header_restore(&c.volume, &c.header_backup_file, |w| {
                confirm(c.batch, w)
            });
        }
        if v2(&c.volume)? {
            return Err(CliError::io(
                &c.volume,
                "holds a LUKS2 header and the backup is not a LUKS2 one: restore failed (data \
                 offset and layout differ)"
                    .into(),
            ));
        }
        header_restore(&c.volume, &c.header_backup_file, c.batch)
    } else {
        if Path::new(&c.header_backup_file).exists() {
            return Err(CliError::io(
                &c.header_backup_file,
                "Requested header backup file already exists; remove it or choose another name"
                    .into(),
            ));
        }
        if v2(&c.volume)? {
            return crate::keys2::header_backup(&c.volume, &c.header_backup_file);
        }
        header_backup(&c.volume, &c.header_backup_file)
    }
}

/// What the cryptsetup-style `qimg luks` key verbs were given.
struct LuksKeyArgs<'a> {
    /// The volume (raw LUKS, or an encrypted qcow2 image).
    volume: &'a str,
    /// `-f`: the volume's format when it is not to be detected.
    format: Option<Format>,
    /// The positional key file: the new key (add-key, change-key) or the
    /// key to remove (remove-key).
    key_file_arg: Option<&'a str>,
    /// `--key-slot N`.
    key_slot: Option<u8>,
    /// `--iter-time MS` (PBKDF2 time for the new slot).
    iter_time: u32,
    /// LUKS2: the new key slot's KDF choices.
    kdf: crate::keys2::KdfChoice,
    /// `-q` / `--batch-mode`: no confirmation questions.
    batch: bool,
    /// Existing key: `--key-file`, `--object` with `--key-secret`.
    secrets: &'a SecretArgs,
}

impl LuksKeyArgs<'_> {
    /// The LUKS2 header's file, when the volume is a LUKS2 one.
    fn luks2(&self) -> Result<Option<crate::keys2::Target2>, CliError> {
        let path = self.secrets.header.as_deref().unwrap_or(self.volume);
        let format = crate::format::resolve(path, self.format, None)?;
        if format == Format::Luks && crate::format::luks_version(path)? == Some(2) {
            crate::keys2::Target2::open(path).map(Some)
        } else {
            Ok(None)
        }
    }

    fn target(&self) -> Result<Target, CliError> {
        let path = self.secrets.header.as_deref().unwrap_or(self.volume);
        Target::open(path, self.format, true)
    }

    /// The existing passphrase: `--key-file`, a secret, or a prompt.
    fn existing(&self, secrets: &Secrets) -> Result<Secret, CliError> {
        KeySource {
            key_file: self.secrets.key_file.clone(),
            key_secret: self.secrets.key_secret.clone(),
        }
        .resolve(
            &format!("{} (any existing key)", self.volume),
            secrets,
            false,
        )
    }

    /// The key of the slot `remove-key` erases: the key file argument, or
    /// the existing key as `--key-file`/secrets/prompt give it.
    fn removed_key(&self, secrets: &Secrets) -> Result<Secret, CliError> {
        match self.key_file_arg {
            Some(f) => crate::secret::read_key_file(f),
            None => self.existing(secrets),
        }
    }

    /// Asks before erasing the last key slot of `name` (see [`confirm`]).
    fn confirm_last(&self, name: &str) -> Result<(), CliError> {
        confirm(
            self.batch,
            &format!(
                "This is the last key slot of {name}: the data will be unreadable after it is \
                 erased."
            ),
        )
    }

    /// The new passphrase: the positional key file, or asked twice.
    fn new_key(&self) -> Result<Secret, CliError> {
        match self.key_file_arg {
            Some(f) => crate::secret::read_key_file(f),
            None => crate::secret::prompt(&format!("a new key slot of {}", self.volume), true),
        }
    }
}

/// `qimg luks add-key` (cryptsetup luksAddKey).
fn add_key(a: &LuksKeyArgs<'_>) -> Result<u8, CliError> {
    let secrets = Secrets::parse(&a.secrets.object)?;
    if let Some(mut t) = a.luks2()? {
        t.check_new_slot(a.key_slot)?;
        let pass = a.existing(&secrets)?;
        let (vk, opened) = t.unlock(&pass, None)?;
        drop(pass);
        let new = a.new_key()?;
        let kdf = t.kdf(&a.kdf, opened)?;
        t.add(&vk, &new, kdf, a.key_slot)?;
        return Ok(0);
    }
    let mut t = a.target()?;
    match a.key_slot {
        Some(s) if usize::from(s) >= KEY_SLOTS => {
            return Err(t.err(format!(
                "Key slot {s} is invalid, please select between 0 and {}.",
                KEY_SLOTS - 1
            )))
        }
        Some(s) if t.active(s) => {
            return Err(t.err(format!("Key slot {s} is full, please select another one.")))
        }
        None if t.free_slot().is_none() => return Err(t.err("All key slots full.")),
        _ => {}
    }
    let pass = a.existing(&secrets)?;
    let (vk, _) = t.unlock(&pass, None)?;
    drop(pass);
    let new = a.new_key()?;
    let iterations = t.iterations(a.iter_time)?;
    t.add(&vk, &new, iterations, a.key_slot, false)?;
    Ok(0)
}

/// `qimg luks remove-key` (cryptsetup luksRemoveKey): erases the slot the
/// given key opens.
fn remove_key(a: &LuksKeyArgs<'_>) -> Result<u8, CliError> {
    let secrets = Secrets::parse(&a.secrets.object)?;
    if let Some(mut t) = a.luks2()? {
        let pass = a.removed_key(&secrets)?;
        let (_, slot) = t.unlock(&pass, a.key_slot)?;
        drop(pass);
        if t.bound_count() == 1 {
            a.confirm_last(a.volume)?;
        }
        t.erase(slot, true)?;
        return Ok(0);
    }
    let mut t = a.target()?;
    let pass = a.removed_key(&secrets)?;
    let (_, slot) = t.unlock(&pass, a.key_slot)?;
    drop(pass);
    if t.active_count() == 1 {
        a.confirm_last(&t.path)?;
    }
    t.erase(slot)?;
    Ok(0)
}

/// `qimg luks change-key` (cryptsetup luksChangeKey): the slot the
/// existing key opens (`--key-slot` restricts which) gets the new key;
/// written to a free slot first when there is one, then the old slot is
/// erased.
fn change_key(a: &LuksKeyArgs<'_>) -> Result<u8, CliError> {
    let secrets = Secrets::parse(&a.secrets.object)?;
    if let Some(mut t) = a.luks2()? {
        let pass = a.existing(&secrets)?;
        let (vk, old) = t.unlock(&pass, a.key_slot)?;
        drop(pass);
        let new = a.new_key()?;
        let kdf = t.kdf(&a.kdf, old)?;
        // The new key is written to a free slot before the old slot is
        // erased, so a crash leaves one of them; with no free slot the
        // change is refused rather than overwriting the slot in place.
        let Some(free) = t.free_slot() else {
            return Err(CliError::io(
                a.volume,
                "All key slots full: no free key slot to write the new key to before the \
                 old one is erased; remove a key slot first"
                    .into(),
            ));
        };
        t.add(&vk, &new, kdf, Some(free))?;
        t.erase(old, true)?;
        // With --key-slot, cryptsetup's new key keeps that slot number:
        // moved back the same way (written, then the copy erased).
        if a.key_slot.is_some() {
            t.add(&vk, &new, kdf, Some(old))?;
            t.erase(free, true)?;
        }
        return Ok(0);
    }
    let mut t = a.target()?;
    let pass = a.existing(&secrets)?;
    let (vk, old) = t.unlock(&pass, a.key_slot)?;
    drop(pass);
    let new = a.new_key()?;
    let iterations = t.iterations(a.iter_time)?;
    match t.free_slot() {
        Some(free) => {
            t.add(&vk, &new, iterations, Some(free), false)?;
            t.erase(old)?;
        }
        None => {
            t.add(&vk, &new, iterations, Some(old), true)?;
        }
    }
    Ok(0)
}

/// Bytes of the header and key material area, as cryptsetup's
/// luksHeaderBackup writes them: up to the end of the last key slot's
/// material, rounded up to 4 KiB.
fn header_area_len(hdr: &HeaderRepr) -> u64 {
    hdr.key_material_end().next_multiple_of(4096)
}

/// Reads the LUKS1 header of a raw file (a backup or a volume), `None`
/// when the file does not start with a valid one.
fn parse_raw_header(bytes: &[u8]) -> Option<HeaderRepr> {
    let h = luks1::Header::new_checked(bytes.get(..luks1::HEADER_LEN)?).ok()?;
    HeaderRepr::parse(&h).ok()
}

/// `qimg luks header-backup` (cryptsetup luksHeaderBackup): the header
/// and key material area of a raw volume (or of the LUKS region inside an
/// encrypted qcow2 image) into a new file, readable by its owner only.
fn header_backup(volume: &str, backup: &str) -> Result<u8, CliError> {
    if Path::new(backup).exists() {
        return Err(CliError::io(
            backup,
            "Requested header backup file already exists; remove it or choose another name".into(),
        ));
    }
    let mut t = Target::open(volume, None, false)?;
    let len = header_area_len(&t.hdr);
    let mut buf = zeroize::Zeroizing::new(vec![0u8; usize_of(len, volume)?]);
    // A detached header file may end right after the key material; the
    // rest of the last 4 KiB reads as zeroes.
    let have = t.dev.size().map_err(|e| t.err(e.to_string()))?.min(len);
    let have = usize_of(have, volume)?;
    t.dev
        .read_at(0, &mut buf[..have])
        .map_err(|e| t.err(e.to_string()))?;
    write_backup(backup, &buf)?;
    Ok(0)
}

/// `qimg luks header-restore` (cryptsetup luksHeaderRestore): writes a
/// backup's header and key material area over the volume's (or over the
/// LUKS region inside an encrypted qcow2 image).
fn header_restore(volume: &str, backup: &str, batch: bool) -> Result<u8, CliError> {
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(backup).map_err(|e| CliError::io(backup, format!("cannot read: {e}")))?,
    );
    let bad = || incompatible_backup(backup);
    let new = parse_raw_header(&bytes).ok_or_else(bad)?;
    let len = header_area_len(&new);
    let area = bytes.get(..usize_of(len, backup)?).ok_or_else(bad)?;
    let format = match crate::format::detect(volume)? {
        Format::Qcow2 => Format::Qcow2,
        _ => Format::Luks,
    };
    let (mut dev, _) = open_window(volume, format, true)?;
    let size = dev
        .size()
        .map_err(|e| CliError::io(volume, e.to_string()))?;
    let mut head = [0u8; luks1::HEADER_LEN];
    if size >= head.len() as u64 {
        dev.read_at(0, &mut head)
            .map_err(|e| CliError::io(volume, e.to_string()))?;
    }
    match parse_raw_header(&head) {
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
        None => confirm(
            batch,
            &format!(
                "{volume} does not contain a LUKS header: restoring one can destroy data on it."
            ),
        )?,
    }
    write_area(&mut dev, volume, size, area)?;
    Ok(0)
}

/// Asks for `YES` on the terminal before a destructive step; `batch`
/// (`-q`) skips the question. Without a terminal and without `-q` the
/// step is refused (cryptsetup would go ahead silently).
fn confirm(batch: bool, warning: &str) -> Result<(), CliError> {
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

/// The command line of `qimg amend`.
#[derive(Debug, clap::Args)]
pub(crate) struct AmendCmd {
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<crate::format::Format>,
    /// Key slot options (`-o key=value,...`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Overwrite an active key slot, or erase the last active one.
    #[arg(long)]
    force: bool,
    /// FILENAME is qemu-img's option list
    /// (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Quiet (accepted for compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    /// The image.
    filename: String,
}

impl AmendCmd {
    /// Runs `qimg amend`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        amend(&AmendArgs {
            format: self.format,
            options: &self.options,
            force: self.force,
            image_opts: self.image_opts,
            secrets: &self.secrets,
            filename: &self.filename,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_numbered_as_qemu_img_says() {
        assert_eq!(parse_slot("0", 8).unwrap(), 0);
        assert_eq!(parse_slot("7", 8).unwrap(), 7);
        assert_eq!(parse_slot("31", 32).unwrap(), 31);
        assert!(parse_slot("32", 32).is_err());
        for bad in ["8", "-1", "300"] {
            let e = parse_slot(bad, 8).unwrap_err().msg;
            assert!(e.contains("must be between 0 and 7"), "{e}");
        }
        assert!(parse_slot("abc", 8)
            .unwrap_err()
            .msg
            .contains("expects a number"));
    }

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
            assert_eq!(header_area_len(&hdr), want);
            assert!(parse_raw_header(dev.as_slice()).is_some());
            assert!(parse_raw_header(&dev.as_slice()[1..]).is_none());
        }
    }
}
