//! The kind of an image, decided in one place: [`Format`] is what `-f`,
//! `-O`, `-F` and a `backing_fmt` name, parsed by [`Format::parse`] (the
//! clap value parser agrees with it), and [`resolve`] is "the format
//! given, else detected from the file's first bytes".

use std::path::Path;

use luks_core::io::{BlockIo, FileDevice};

use crate::CliError;

/// Formats qimg reads and writes, by qemu-img's driver names.
///
/// `luks` is one format for both header versions, as in cryptsetup: the
/// version is read from the header where the volume is opened
/// ([`luks_version`]), never chosen on the command line (a new
/// volume's version comes from `-o luks-version=1|2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// qcow2 (v2 compat=0.10 or v3 compat=1.1).
    Qcow2,
    /// A plain disk image.
    Raw,
    /// A LUKS volume (LUKS1 or LUKS2).
    Luks,
}

impl Format {
    /// The name qemu-img uses.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Luks => "luks",
        }
    }

    /// The format qemu-img's driver `name` stands for (`qcow2`, `raw`,
    /// `luks`), `None` for any other name. Callers decide what an unknown
    /// name means where they read it.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        [Self::Qcow2, Self::Raw, Self::Luks]
            .into_iter()
            .find(|f| f.name() == name)
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
pub(crate) fn detect(path: &str) -> Result<Format, CliError> {
    crate::file::refuse_dir(path)?;
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

/// [`detect`] for a backing file: a character device (`/dev/null`) is raw
/// without being read (see [`crate::file::is_char_device`]).
pub(crate) fn detect_backing(path: &str) -> Result<Format, CliError> {
    if crate::file::is_char_device(path) {
        return Ok(Format::Raw);
    }
    detect(path)
}

/// The LUKS header version of `path` (1 or 2), or `None` if it is not a
/// LUKS header (or is shorter than the 8 bytes that say). The one place
/// that decides whether a LUKS volume or header is handled as LUKS1 or
/// LUKS2; errors name `path`.
pub(crate) fn luks_version(path: &str) -> Result<Option<u16>, CliError> {
    let mut dev = crate::file::open_file(path, false)?;
    let mut head = [0u8; 8];
    if dev.size().map_err(|e| CliError::io(path, e.to_string()))? < 8 {
        return Ok(None);
    }
    luks_core::io::read_bytes(&mut dev, 0, &mut head, &mut [0u8; 4096])
        .map_err(|e| CliError::io(path, e.to_string()))?;
    Ok(luks_core::luks2::version(&head))
}

/// The format of the image at `path`: `given` (`-f`) when there is one,
/// LUKS when a detached `header` is given (the data file has no magic of
/// its own), else detected from the file.
pub(crate) fn resolve(
    path: &str,
    given: Option<Format>,
    header: Option<&str>,
) -> Result<Format, CliError> {
    match (given, header) {
        (Some(f), _) => Ok(f),
        (None, Some(_)) => Ok(Format::Luks),
        (None, None) => detect(path),
    }
}

#[cfg(test)]
mod tests {
    use super::Format;

    #[test]
    fn parse_knows_qemu_img_driver_names_only() {
        for f in [Format::Qcow2, Format::Raw, Format::Luks] {
            assert_eq!(Format::parse(f.name()), Some(f));
            let clap = <Format as clap::ValueEnum>::from_str(f.name(), false);
            assert_eq!(clap, Ok(f), "clap's parser agrees with Format::parse");
        }
        for other in ["", "QCOW2", "file", "vmdk", "luks2", "qcow"] {
            assert_eq!(Format::parse(other), None, "{other}");
        }
    }
}
