//! Opening images: format detection by magic, secrets, backing chains, and
//! the type-erased [`Source`] every verb reads through.

use std::path::{Path, PathBuf};

use luks_core::io::{BlockIo, FileDevice};

use crate::cli::SecretArgs;
use crate::dev::erased;
use crate::dev::Source;
use crate::rawfile::RawFile;
use crate::secret::Secrets;
use crate::CliError;

/// Formats qimg reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// qcow2.
    Qcow2,
    /// Raw disk image.
    Raw,
    /// LUKS volume.
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

/// Before writing to `path` as raw bytes: a file whose first bytes say it
/// is a qcow2 image or a LUKS volume is never treated as raw silently (a
/// guest could have planted such a header, or `-f raw` could be a slip).
/// Only an explicit raw format reaches here (detection never answers raw
/// for such a file), so qimg warns and goes on, as the user asked.
pub(crate) fn warn_if_raw_looks_formatted(path: &str) {
    if let Ok(found) = detect(path) {
        if found != Format::Raw {
            eprintln!(
                "qimg: warning: {path} starts with a {} header but is written as raw bytes because of the format given; its header can be overwritten",
                found.name()
            );
        }
    }
}

/// Refuses a directory named where an image file belongs (opening one
/// succeeds on Unix, and reading it fails with a less helpful message), and
/// a FIFO, socket or character device: those cannot be sized, and opening a
/// FIFO blocks until a writer appears. The type is read with `stat`, which
/// never blocks, before anything opens the file.
pub(crate) fn refuse_dir(path: &str) -> Result<(), CliError> {
    let Ok(meta) = std::fs::metadata(path) else {
        // Opening reports a missing file with the system's reason.
        return Ok(());
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(CliError::io(
            path,
            "is a directory, not an image file; name the image file itself".into(),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let kind = if ft.is_fifo() {
            Some("a FIFO (named pipe)")
        } else if ft.is_socket() {
            Some("a socket")
        } else if ft.is_char_device() {
            Some("a character device")
        } else {
            None
        };
        if let Some(kind) = kind {
            return Err(CliError::io(
                path,
                format!(
                    "is {kind}, not a regular file or block device: an image must have a \
                     size and be readable at any offset"
                ),
            ));
        }
    }
    Ok(())
}

/// Guesses the format from the first bytes of a file.
pub(crate) fn detect(path: &str) -> Result<Format, CliError> {
    refuse_dir(path)?;
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
pub(crate) struct OpenOptions {
    /// `-f`; detected when `None`.
    pub(crate) format: Option<Format>,
    /// `-l`: read as of this internal snapshot.
    pub(crate) snapshot: Option<String>,
    /// `--key-file`.
    pub(crate) key_file: Option<String>,
    /// `--header` for a detached LUKS header.
    pub(crate) header: Option<String>,
    /// `--key-secret`.
    pub(crate) key_secret: Option<String>,
}

impl OpenOptions {
    /// The secret-related options from the command line.
    pub(crate) fn from_args(a: &SecretArgs) -> Self {
        Self {
            key_file: a.key_file.clone(),
            header: a.header.clone(),
            key_secret: a.key_secret.clone(),
            ..Self::default()
        }
    }
}

/// The deepest backing chain qimg follows.
pub(crate) const MAX_CHAIN_DEPTH: usize = 32;

/// An opened image.
pub(crate) struct Opened {
    /// File names of the chain, top first (index = map depth).
    pub(crate) chain: Vec<String>,
    /// Guest-visible size in bytes.
    pub(crate) virtual_size: u64,
    /// The guest view.
    pub(crate) dev: Box<dyn Source>,
    /// Every file the view reads: the image, its backing chain, data
    /// files and a detached LUKS header (for the self-overwrite guard).
    pub(crate) files: Vec<String>,
    /// A raw image's length in bytes when it is not whole sectors (the
    /// guest view is rounded up to whole sectors, as in qemu-img).
    pub(crate) odd_raw_len: Option<u64>,
}

/// Opens `path` read-only.
pub(crate) fn open(path: &str, opts: &OpenOptions, secrets: &Secrets) -> Result<Opened, CliError> {
    refuse_dir(path)?;
    let format = match (opts.format, &opts.header) {
        (Some(f), _) => f,
        // A detached header: the data file has no magic of its own.
        (None, Some(_)) => Format::Luks,
        (None, None) => detect(path)?,
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
            crate::lock::lock(&file, path, crate::lock::Access::Read)?;
            let mut raw = RawFile::new(file);
            // Whole sectors, as qemu-img: an odd tail is padded with zeroes.
            let len = raw.size().map_err(|e| CliError::io(path, e.to_string()))?;
            Ok(Opened {
                chain: vec![path.to_string()],
                virtual_size: len.next_multiple_of(512),
                dev: Box::new(raw),
                files: vec![path.to_string()],
                odd_raw_len: (!len.is_multiple_of(512)).then_some(len),
            })
        }
        Format::Qcow2 => {
            let mut seen = std::collections::BTreeSet::new();
            let mut chain = Vec::new();
            let ctx = Ctx {
                keys: crate::luks::KeySource {
                    key_file: opts.key_file.clone(),
                    key_secret: opts.key_secret.clone(),
                },
                secrets,
                files: std::cell::RefCell::new(Vec::new()),
            };
            let mut src = open_qcow2(path, opts.snapshot.as_deref(), &ctx, &mut seen, &mut chain)?;
            let virtual_size = src.size().map_err(|e| CliError::usage(e.to_string()))?;
            Ok(Opened {
                chain,
                virtual_size,
                dev: src,
                files: ctx.files.into_inner(),
                odd_raw_len: None,
            })
        }
        Format::Luks => {
            let keys = crate::luks::KeySource {
                key_file: opts.key_file.clone(),
                key_secret: opts.key_secret.clone(),
            };
            let mut src = crate::luks::open(path, opts.header.as_deref(), &keys, secrets, false)?;
            let virtual_size = src.size().map_err(|e| CliError::usage(e.to_string()))?;
            let mut files = vec![path.to_string()];
            files.extend(opts.header.iter().cloned());
            Ok(Opened {
                chain: vec![path.to_string()],
                virtual_size,
                dev: src,
                files,
                odd_raw_len: None,
            })
        }
    }
}

/// What opening an encrypted layer of a chain needs.
struct Ctx<'a> {
    keys: crate::luks::KeySource,
    secrets: &'a Secrets,
    /// Every file opened so far.
    files: std::cell::RefCell<Vec<String>>,
}

/// The format a `backing_fmt` name stands for, if qimg reads it (`file`
/// is QEMU's name for the raw protocol layer).
pub(crate) fn backing_format(name: &str) -> Option<Format> {
    match name {
        "qcow2" => Some(Format::Qcow2),
        "raw" | "file" => Some(Format::Raw),
        _ => None,
    }
}

/// Opens a backing file named by an image, in `format` (detected when the
/// image does not say).
fn open_backing(
    path: &str,
    format: Option<&str>,
    ctx: &Ctx<'_>,
    seen: &mut std::collections::BTreeSet<PathBuf>,
    chain: &mut Vec<String>,
) -> Result<Box<dyn Source>, CliError> {
    let fmt = match format {
        Some(name) => backing_format(name).ok_or_else(|| {
            CliError::io(
                path,
                format!("backing file format '{name}' is not supported (qcow2 or raw)"),
            )
        })?,
        None => detect(path)?,
    };
    match fmt {
        Format::Qcow2 => open_qcow2(path, None, ctx, seen, chain),
        Format::Raw => {
            guard_chain(path, seen, chain)?;
            refuse_dir(path)?;
            ctx.files.borrow_mut().push(path.to_string());
            let file = std::fs::File::open(path)
                .map_err(|e| CliError::io(path, format!("cannot open the backing file: {e}")))?;
            crate::lock::lock(&file, path, crate::lock::Access::Read)?;
            Ok(Box::new(RawFile::new(file)))
        }
        Format::Luks => Err(CliError::io(
            path,
            "LUKS backing files are not supported".into(),
        )),
    }
}

/// Whether the backing file (in `backing_fmt`, detected when `None`) and
/// the external data file that the qcow2 image at `path` names can be
/// opened, as qemu-img's open of the image requires: each must be a
/// readable regular file, and the backing file must be in a format qimg
/// reads (a qcow2 backing file's header is checked, not its own chain).
pub(crate) fn probe_linked(
    path: &str,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    data: Option<&str>,
) -> Result<(), CliError> {
    let usable = |full: &Path, what: &str| -> Result<(), CliError> {
        let meta = std::fs::metadata(full).map_err(|e| {
            CliError::io(
                path,
                format!("cannot open the {what} {}: {e}", full.display()),
            )
        })?;
        if meta.is_dir() {
            return Err(CliError::io(
                path,
                format!("the {what} {} is a directory", full.display()),
            ));
        }
        // A FIFO, socket or character device would block the open below.
        refuse_dir(&full.to_string_lossy())?;
        std::fs::File::open(full).map_err(|e| {
            CliError::io(
                path,
                format!("cannot open the {what} {}: {e}", full.display()),
            )
        })?;
        Ok(())
    };
    if let Some(b) = backing {
        let full = resolve_backing(path, b);
        usable(&full, "backing file")?;
        let name = full.to_string_lossy().into_owned();
        let fmt = match backing_fmt {
            Some(other) => backing_format(other).ok_or_else(|| {
                CliError::io(
                    path,
                    format!(
                        "backing file format '{other}' of {name} is not supported (qcow2 or raw)"
                    ),
                )
            })?,
            None => detect(&name)?,
        };
        match fmt {
            Format::Qcow2 => {
                crate::qcow2::Opening::open(&name)?;
            }
            Format::Raw => {}
            Format::Luks => {
                return Err(CliError::io(
                    path,
                    format!(
                        "the backing file {name} is LUKS, which qimg cannot use as a backing file"
                    ),
                ))
            }
        }
    }
    if let Some(d) = data {
        usable(&resolve_backing(path, d), "data file")?;
    }
    Ok(())
}

/// Refuses chains that loop or grow too deep, and records `path`.
fn guard_chain(
    path: &str,
    seen: &mut std::collections::BTreeSet<PathBuf>,
    chain: &mut Vec<String>,
) -> Result<(), CliError> {
    let canon =
        std::fs::canonicalize(path).map_err(|e| CliError::io(path, format!("cannot open: {e}")))?;
    if !seen.insert(canon) {
        return Err(CliError::io(
            path,
            "the backing chain loops back to this file; fix it with `qimg rebase -u`".into(),
        ));
    }
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(CliError::io(
            path,
            format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
        ));
    }
    chain.push(path.to_string());
    Ok(())
}

/// Opens a qcow2 image and, recursively, its backing chain.
fn open_qcow2(
    path: &str,
    snapshot: Option<&str>,
    ctx: &Ctx<'_>,
    seen: &mut std::collections::BTreeSet<PathBuf>,
    chain: &mut Vec<String>,
) -> Result<Box<dyn Source>, CliError> {
    guard_chain(path, seen, chain)?;
    refuse_dir(path)?;
    ctx.files.borrow_mut().push(path.to_string());
    let depth = chain.len().saturating_sub(1);
    let opening = crate::qcow2::Opening::open(path)?;
    let mut opening = crate::qcow2::unlock(path, opening, &ctx.keys, ctx.secrets)?;
    let info = opening.img.info();
    let backing_name = info.backing_file().map(str::to_string);
    let backing_fmt = info.backing_format().map(str::to_string);
    let data_name = info.data_file().map(str::to_string);
    if info.data_file_name_missing() {
        return Err(CliError::io(
            path,
            "'data-file' is required for this image (external data file bit set, \
             no data file name extension in the header)"
                .to_string(),
        ));
    }
    if let Some(spec) = snapshot {
        let err = |e: qcow_core::Error<crate::dev::DevError>| CliError::io(path, e.to_string());
        let snap = if let Some(name) = spec.strip_prefix("snapshot.name=") {
            opening
                .img
                .find_snapshot_by(name.as_bytes(), true)
                .map_err(err)?
        } else if let Some(id) = spec.strip_prefix("snapshot.id=") {
            opening
                .img
                .find_snapshot_by(id.as_bytes(), false)
                .map_err(err)?
        } else {
            opening.img.find_snapshot(spec).ok()
        };
        let snap = snap.ok_or_else(|| {
            CliError::io(
                path,
                format!("no snapshot '{spec}'; list them with `qimg snapshot -l`"),
            )
        })?;
        opening.img.select_snapshot(&snap).map_err(err)?;
    }
    let backing = match backing_name {
        Some(b) => {
            let full = resolve_backing(path, &b);
            let full = full.to_string_lossy().into_owned();
            Some(open_backing(
                &full,
                backing_fmt.as_deref(),
                ctx,
                seen,
                chain,
            )?)
        }
        None => None,
    };
    let data = match data_name {
        Some(d) => {
            let full = resolve_backing(path, &d);
            refuse_dir(&full.to_string_lossy())?;
            ctx.files
                .borrow_mut()
                .push(full.to_string_lossy().into_owned());
            let file = std::fs::File::open(&full).map_err(|e| {
                CliError::io(
                    path,
                    format!("cannot open the data file {}: {e}", full.display()),
                )
            })?;
            crate::lock::lock(&file, &full.to_string_lossy(), crate::lock::Access::Read)?;
            let holes = file
                .try_clone()
                .map_err(|e| CliError::io(path, e.to_string()))?;
            // The data lives there: `map` names it, as qemu-img does.
            if let Some(name) = chain.get_mut(depth) {
                *name = full.to_string_lossy().into_owned();
            }
            Some((erased(FileDevice::new(file)), holes))
        }
        None => None,
    };
    Ok(Box::new(crate::qcow2::Qcow2Source::new(
        path, opening, backing, data,
    )?))
}

/// Bytes a file occupies on disk (qemu-img's "disk size"/"actual-size").
pub(crate) fn allocated_bytes(path: &str) -> Result<u64, CliError> {
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
pub(crate) fn file_length(path: &str) -> Result<u64, CliError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| CliError::io(path, format!("cannot stat: {e}")))
}

/// The length of a file as QEMU's file layer reports it: rounded up to whole
/// 512-byte sectors (a raw image of 1000 bytes is 1024 bytes big, the tail
/// reading as zero).
pub(crate) fn sector_length(path: &str) -> Result<u64, CliError> {
    Ok(file_length(path)?.next_multiple_of(512))
}

/// Resolves a backing file name relative to the image that names it, as
/// QEMU does.
pub(crate) fn resolve_backing(image: &str, backing: &str) -> PathBuf {
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
pub(crate) fn info(
    path: &str,
    format: Option<Format>,
    args: &SecretArgs,
) -> Result<crate::info::ImageInfo, CliError> {
    refuse_dir(path)?;
    let format = match (format, &args.header) {
        (Some(f), _) => f,
        // A detached header: the data file has no magic of its own.
        (None, Some(_)) => Format::Luks,
        (None, None) => detect(path)?,
    };
    match format {
        Format::Raw => crate::info::ImageInfo::basic(path, format, sector_length(path)?),
        Format::Qcow2 => {
            let mut opening = crate::qcow2::Opening::open(path)?;
            let info = opening.img.info().clone();
            let mut out = crate::info::ImageInfo::basic(path, format, info.virtual_size())?;
            out.cluster_size = Some(info.cluster_size());
            out.dirty = info.dirty();
            out.encrypted = info.header.crypt_method != 0;
            if let Some(b) = info.backing_file() {
                out.backing_filename = Some(b.to_string());
                out.full_backing_filename =
                    Some(resolve_backing(path, b).to_string_lossy().into_owned());
            }
            out.backing_format = info.backing_format().map(str::to_string);
            out.snapshots = crate::qcow2::snapshots(&mut opening.img, path)?;
            let luks = crate::qcow2::luks_header(path, &info)?;
            out.format_specific = Some((
                "qcow2".into(),
                crate::qcow2::format_specific(&info, luks.as_ref()),
            ));
            Ok(out)
        }
        Format::Luks => crate::luks::info(path, args.header.as_deref()),
    }
}
