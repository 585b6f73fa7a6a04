//! Argument groups shared by the verbs: secrets (`--object`,
//! `--key-file`, `--key-secret`, `--header`) and `--output`. Verbs import
//! these; this module imports no verb. (`-f` and `-O` take a
//! [`crate::format::Format`].)

use clap::{Args, ValueEnum};

use crate::secret::ObjectArg;

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum Output {
    /// Text for people, laid out like qemu-img's.
    #[default]
    Human,
    /// JSON with qemu-img's keys, for scripts.
    Json,
}

/// How secrets reach qimg.
#[derive(Debug, Args, Default, Clone)]
pub(crate) struct SecretArgs {
    /// Define a secret: `secret,id=ID,data=STRING|file=PATH[,format=base64]`
    /// (refer to it with `key-secret=ID` or `encrypt.key-secret=ID`).
    #[arg(long = "object", value_name = "OBJECT", value_parser = ObjectArg::parse)]
    pub(crate) object: Vec<ObjectArg>,
    /// Read the passphrase from PATH, byte for byte as cryptsetup does
    /// (`-` for standard input).
    #[arg(long = "key-file", value_name = "PATH")]
    pub(crate) key_file: Option<String>,
    /// Which `--object` secret unlocks the source (qemu-img's
    /// `key-secret`); with a single secret object it is used by default.
    #[arg(long = "key-secret", value_name = "ID")]
    pub(crate) key_secret: Option<String>,
    /// A detached LUKS header for a LUKS source.
    #[arg(long = "header", value_name = "PATH")]
    pub(crate) header: Option<String>,
}
