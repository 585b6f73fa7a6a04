//! Argument groups shared by the verbs: secrets (`--object`,
//! `--key-file`, `--key-secret`, `--header`), `--image-opts` and
//! `--output`. Verbs import
//! these; this module imports no verb. (`-f` and `-O` take a
//! [`crate::format::Format`].)

use clap::{Args, ValueEnum};

use crate::format::Format;
use crate::image_spec::ImageSpec;
use crate::secret::ObjectArg;
use crate::CliError;

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

/// `--image-opts`: the image argument is QEMU's option list
/// (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,...`).
#[derive(Debug, Args, Default, Clone, Copy)]
pub(crate) struct ImageOptsArg {
    /// The image argument is QEMU's option list
    /// (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,backing.file.filename=...`);
    /// without it, a `json:{...}` argument is one too.
    #[arg(long = "image-opts")]
    pub(crate) image_opts: bool,
}

impl ImageOptsArg {
    /// What the image argument `arg` names, given `-f` `format`.
    pub(crate) fn spec(self, arg: &str, format: Option<Format>) -> Result<ImageSpec, CliError> {
        ImageSpec::from_arg(arg, self.image_opts, format)
    }
}

impl SecretArgs {
    /// These secret options with the key secret `spec` names, which
    /// replaces `--key-secret`.
    pub(crate) fn with_spec(&self, spec: &ImageSpec) -> Self {
        let mut out = self.clone();
        if spec.key_secret.is_some() {
            out.key_secret.clone_from(&spec.key_secret);
        }
        out
    }
}
