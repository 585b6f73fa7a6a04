//! Argument groups shared by the verbs: the image format (`-f`, `-O`),
//! secrets (`--object`, `--key-file`, `--key-secret`, `--header`) and
//! `--output`. Verbs import these; this module imports no verb.

use clap::{Args, ValueEnum};

use crate::image::Format;
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

/// Image formats on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FormatArg {
    /// qcow2 (v2 compat=0.10 or v3 compat=1.1).
    Qcow2,
    /// A plain disk image.
    Raw,
    /// A LUKS volume (LUKS1 or LUKS2).
    Luks,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Qcow2 => Format::Qcow2,
            FormatArg::Raw => Format::Raw,
            FormatArg::Luks => Format::Luks,
        }
    }
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
