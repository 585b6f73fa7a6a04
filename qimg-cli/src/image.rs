//! Opening images: format detection by magic, secrets, backing chains, and
//! the type-erased [`Source`] every verb reads through.

use std::path::{Path, PathBuf};

use luks_core::io::{BlockIo, FileDevice};

use crate::cli::SecretArgs;
use crate::dev::Source;
use crate::rawfile::RawFile;
use crate::secret::Secrets;
use crate::CliError;

/// Formats qimg reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// Raw disk image.
    Raw,
    /// LUKS volume.
    Luks,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Luks => "luks",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// qcow2 magic.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// LUKS magic (both versions).
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Guesses the format from the first bytes of a file.
pub fn detect(path: &str) -> Result<Format, CliError> {
    let mut dev = FileDevice::open(Path::new(path))
        .map_err(|e| CliError::io(path, format!("cannot open: {e}")))?;
    let mut head = [0u8; 8];
    dev.read_at(0, &mut head)
        .map_err(|e| CliError::io(path, e.to_string()))?;
    Ok(if head.starts_with(QCOW2_MAGIC) {
        Format::Qcow2
    } else if head.starts_with(LUKS_MAGIC) {
        Format::Luks
    } else {
        Format::Raw
    })
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// `-f`; detected when `None`.
    pub format: Option<Format>,
    /// `-l`: read as of this internal snapshot.
    pub snapshot: Option<String>,
    /// `--key-file`.
    pub key_file: Option<String>,
    /// `--header` for a detached LUKS header.
    pub header: Option<String>,
}

impl OpenOptions {
    /// The secret-related options from the command line.
    pub fn from_args(a: &SecretArgs) -> Self {
        Self {
            key_file: a.key_file.clone(),
            header: a.header.clone(),
            ..Self::default()
        }
    }
}

/// The deepest backing chain qimg follows.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// An opened image.
pub struct Opened {
    /// File names of the chain, top first (index = map depth).
    pub chain: Vec<String>,
    /// The file name as given.
    pub path: String,
    /// Its format.
    pub format: Format,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The guest view.
    pub dev: Box<dyn Source>,
}

/// Opens `path` read-only.
pub fn open(path: &str, opts: &OpenOptions, secrets: &Secrets) -> Result<Opened, CliError> {
    let _ = secrets;
    let format = match opts.format {
        Some(f) => f,
        None => detect(path)?,
    };
    if opts.snapshot.is_some() && format != Format::Qcow2 {
        return Err(CliError::usage(format!(
            "{path}: -l needs a qcow2 image; this one is {format}"
        )));
    }
    match format {
        Format::Raw => {
            let file = std::fs::File::open(path)
                .map_err(|e| CliError::io(path, format!("cannot open: {e}")))?;
            let mut raw = RawFile::new(file);
            let virtual_size = raw.size().map_err(|e| CliError::io(path, e.to_string()))?;
            Ok(Opened {
                chain: vec![path.to_string()],
                path: path.to_string(),
                format,
                virtual_size,
                dev: Box::new(raw),
            })
        }
        Format::Qcow2 | Format::Luks => Err(CliError::usage(format!(
            "{path}: reading {format} images is not available in this build"
        ))),
    }
}

/// Bytes a file occupies on disk (qemu-img's "disk size"/"actual-size").
pub fn allocated_bytes(path: &str) -> Result<u64, CliError> {
    let meta =
        std::fs::metadata(path).map_err(|e| CliError::io(path, format!("cannot stat: {e}")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Ok(meta.blocks() * 512)
    }
    #[cfg(not(unix))]
    {
        Ok(meta.len())
    }
}

/// The length of a file in bytes.
pub fn file_length(path: &str) -> Result<u64, CliError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| CliError::io(path, format!("cannot stat: {e}")))
}

/// Resolves a backing file name relative to the image that names it, as
/// QEMU does.
pub fn resolve_backing(image: &str, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// What `qimg info` shows about one image (not its backing files).
pub fn info(
    path: &str,
    format: Option<Format>,
    args: &SecretArgs,
) -> Result<crate::info::ImageInfo, CliError> {
    let format = match format {
        Some(f) => f,
        None => detect(path)?,
    };
    match format {
        Format::Raw => crate::info::ImageInfo::basic(path, format, file_length(path)?),
        Format::Qcow2 | Format::Luks => {
            let _ = args;
            Err(CliError::usage(format!(
                "{path}: reading {format} images is not available in this build"
            )))
        }
    }
}
