//! `qimg luks ...`: the LUKS volume verbs with cryptsetup's meaning
//! (`dump` is in [`crate::luks`], the key and header verbs in
//! [`crate::keys`]).

use crate::args::Output;
use crate::keys::{HeaderFileArgs, KeyVerb, KeyVerbArgs};
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
        match self {
            Self::Dump { output, filename } => crate::luks::dump(&filename, output == Output::Json),
            Self::AddKey(a) => crate::keys::run_key_verb(KeyVerb::Add, &a),
            Self::RemoveKey(a) => crate::keys::run_key_verb(KeyVerb::Remove, &a),
            Self::ChangeKey(a) => crate::keys::run_key_verb(KeyVerb::Change, &a),
            Self::HeaderBackup(a) => crate::keys::run_header_verb(false, &a),
            Self::HeaderRestore(a) => crate::keys::run_header_verb(true, &a),
        }
    }
}
