//! `qimg luks ...`: the LUKS volume verbs with cryptsetup's meaning
//! (`dump` is in [`crate::luks`]). The key verbs work on any
//! [`KeySlots`]: a raw LUKS1 or LUKS2 volume, a detached header, or the
//! LUKS1 header of an encrypted qcow2 image; header backup and restore are
//! in [`crate::keyslots::backup`].

use crate::args::{Output, SecretArgs};
use crate::format::Format;
use crate::keyslots::backup::confirm;
use crate::keyslots::{KdfChoice, KeySlots};
use crate::luks_common::KeySource;
use crate::secret::{Secret, Secrets};
use crate::CliError;

/// `qimg luks ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum LuksCommand {
    /// Print the LUKS header and key slots (cryptsetup luksDump).
    Dump {
        /// JSON instead of cryptsetup's layout.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// The volume, or a detached header file.
        filename: String,
    },
    /// Add a key to a free key slot (cryptsetup luksAddKey).
    AddKey(KeyVerbArgs),
    /// Erase the key slot a key opens (cryptsetup luksRemoveKey).
    RemoveKey(KeyVerbArgs),
    /// Replace a key with a new one (cryptsetup luksChangeKey).
    ChangeKey(KeyVerbArgs),
    /// Save the header and key material area to a file (cryptsetup
    /// luksHeaderBackup).
    HeaderBackup(HeaderFileArgs),
    /// Write a header backup over the volume's header (cryptsetup
    /// luksHeaderRestore).
    HeaderRestore(HeaderFileArgs),
}

impl LuksCommand {
    /// Runs one `qimg luks` verb.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        use crate::keyslots::backup::{header_backup, header_restore};
        match self {
            Self::Dump { output, filename } => crate::luks::dump(&filename, output == Output::Json),
            Self::AddKey(a) => a.run(add_key),
            Self::RemoveKey(a) => a.run(remove_key),
            Self::ChangeKey(a) => a.run(change_key),
            Self::HeaderBackup(a) => header_backup(&a.volume, &a.header_backup_file),
            Self::HeaderRestore(a) => {
                crate::lock::will_write(&a.volume);
                header_restore(&a.volume, &a.header_backup_file, a.batch)
            }
        }
    }
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
    format: Option<Format>,
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

impl KeyVerbArgs {
    /// Opens the key slots (of the detached header, else of the volume;
    /// write-locked from the first open) and runs `verb` on them.
    fn run(
        &self,
        verb: fn(&Self, &mut dyn KeySlots, &Secrets) -> Result<(), CliError>,
    ) -> Result<u8, CliError> {
        let path = self.secrets.header.as_deref().unwrap_or(&self.volume);
        crate::lock::will_write(path);
        let secrets = Secrets::parse(&self.secrets.object)?;
        let mut t = crate::keyslots::open(path, self.format, true)?;
        verb(self, t.as_mut(), &secrets)?;
        Ok(0)
    }

    /// The new key slot's KDF choices.
    fn kdf(&self) -> KdfChoice {
        KdfChoice {
            pbkdf: self.pbkdf.clone(),
            memory_kib: self.pbkdf_memory,
            iterations: self.pbkdf_force_iterations,
            iter_time: self.iter_time,
        }
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
        match &self.new_key_file {
            Some(f) => crate::secret::read_key_file(f),
            None => self.existing(secrets),
        }
    }

    /// The new passphrase: the positional key file, or asked twice.
    fn new_key(&self) -> Result<Secret, CliError> {
        match &self.new_key_file {
            Some(f) => crate::secret::read_key_file(f),
            None => crate::secret::prompt(&format!("a new key slot of {}", self.volume), true),
        }
    }
}

/// `qimg luks add-key` (cryptsetup luksAddKey).
fn add_key(a: &KeyVerbArgs, t: &mut dyn KeySlots, secrets: &Secrets) -> Result<(), CliError> {
    let last = t.slot_count().saturating_sub(1);
    match a.key_slot {
        Some(s) if s > last => {
            return Err(t.err(&format!(
                "Key slot {s} is invalid, please select between 0 and {last}."
            )))
        }
        Some(s) if t.is_active(s) => {
            return Err(t.err(&format!("Key slot {s} is full, please select another one.")))
        }
        None if t.free_slot().is_none() => return Err(t.err("All key slots full.")),
        _ => {}
    }
    let pass = a.existing(secrets)?;
    let (vk, opened) = t.unlock(&pass, None)?;
    drop(pass);
    let new = a.new_key()?;
    let kdf = t.kdf(&a.kdf(), opened)?;
    t.add(&vk, &new, kdf, a.key_slot)?;
    Ok(())
}

/// `qimg luks remove-key` (cryptsetup luksRemoveKey): erases the slot the
/// given key opens, asking first when it is the last one that opens the
/// data.
fn remove_key(a: &KeyVerbArgs, t: &mut dyn KeySlots, secrets: &Secrets) -> Result<(), CliError> {
    let pass = a.removed_key(secrets)?;
    let (_, slot) = t.unlock(&pass, a.key_slot)?;
    drop(pass);
    if t.unlocking_slots().len() == 1 {
        confirm(
            a.batch,
            &format!(
                "This is the last key slot of {}: the data will be unreadable after it is \
                 erased.",
                a.volume
            ),
        )?;
    }
    t.erase(slot)
}

/// `qimg luks change-key` (cryptsetup luksChangeKey): the slot the
/// existing key opens (`--key-slot` restricts which) gets the new key.
/// It is written to a free slot first, then the old slot is erased, so a
/// crash leaves one of them; with `--key-slot` the new key then moves back
/// to that slot number the same way, as cryptsetup's keeps it. With no
/// free slot, see [`KeySlots::change_in_place`].
fn change_key(a: &KeyVerbArgs, t: &mut dyn KeySlots, secrets: &Secrets) -> Result<(), CliError> {
    let pass = a.existing(secrets)?;
    let (vk, old) = t.unlock(&pass, a.key_slot)?;
    drop(pass);
    let new = a.new_key()?;
    let kdf = t.kdf(&a.kdf(), old)?;
    let Some(free) = t.free_slot() else {
        return t.change_in_place(&vk, &new, kdf, old);
    };
    t.add(&vk, &new, kdf, Some(free))?;
    t.erase(old)?;
    if a.key_slot.is_some() {
        t.add(&vk, &new, kdf, Some(old))?;
        t.erase(free)?;
    }
    Ok(())
}
