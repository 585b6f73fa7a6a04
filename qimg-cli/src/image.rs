//! Opening images: secrets, backing chains, and the type-erased [`Source`]
//! every verb reads through (the format comes from [`crate::format`]).

use std::path::{Path, PathBuf};

use luks_core::io::BlockIo;

use crate::args::SecretArgs;
use crate::dev::erased;
use crate::dev::Source;
use crate::file::{refuse_dir, sector_length};
use crate::format::{detect, resolve, Format};
use crate::image_spec::{Backing, ImageSpec};
use crate::rawfile::RawFile;
use crate::secret::Secrets;
use crate::CliError;

mod chain;
use chain::{Chain, Layer};

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
    /// `-T`: the cache mode of every file of the image.
    pub(crate) cache: crate::cache::CacheMode,
    /// The option set the image was named with (`--image-opts`, `json:`):
    /// its backing and data file choices and checks.
    pub(crate) spec: Option<ImageSpec>,
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

    /// These options with what `spec` says: its driver and key secret
    /// replace `-f` and `--key-secret`, and its backing and data file
    /// choices go with it, so an option set opens the image a path with
    /// the same flags would.
    pub(crate) fn with_spec(mut self, spec: &ImageSpec) -> Self {
        if spec.format.is_some() {
            self.format = spec.format;
        }
        if spec.key_secret.is_some() {
            self.key_secret.clone_from(&spec.key_secret);
        }
        self.spec = Some(spec.clone());
        self
    }
}

/// The deepest backing chain qimg follows (images, the top one included).
///
/// qemu-img has no depth limit of its own; a chain ends where its file
/// descriptors do (about one per layer: it raises the soft `ulimit -n` to
/// the hard limit, so 1,000 layers open under the common 1024/4096
/// limits). qimg opens the chain and reads through it iteratively (no
/// recursion per layer), holds at most [`FDS_PER_LAYER`] descriptors per
/// layer (raising the soft limit as qemu-img does) and gives layers past
/// [`FULL_CACHE_LAYERS`] a [`DEEP_CACHE_BYTES`] metadata cache, so 4096
/// layers cost at most 8 x 256 KiB + 4088 x 16 KiB (about 66 MiB) of
/// metadata cache; deeper chains are refused with this number.
pub(crate) const MAX_CHAIN_DEPTH: usize = 4096;

/// Layers (from the top) that get the full metadata cache
/// ([`crate::qcow2::CACHE_BYTES`]): most reads end in the top few.
pub(crate) const FULL_CACHE_LAYERS: usize = 8;

/// Metadata cache of each layer deeper than [`FULL_CACHE_LAYERS`]: four
/// 4 KiB slices, enough for the header and an L2 slice at a time.
pub(crate) const DEEP_CACHE_BYTES: usize = 4 * 4096;

/// File descriptors a layer of a backing chain holds at most while a verb
/// runs: the image file and the duplicate that holds its locks (a third,
/// for asking the filesystem about holes, only on layers `map` lands on
/// data in, and a data file's two when there is one).
pub(crate) const FDS_PER_LAYER: u64 = 2;

/// Descriptors kept free for everything else a verb opens (the
/// destination, the standard streams, a data file).
const SPARE_FDS: u64 = 32;

/// The metadata cache for the layer `depth` images below the top.
pub(crate) fn layer_cache_bytes(depth: usize) -> usize {
    if depth < FULL_CACHE_LAYERS {
        crate::qcow2::CACHE_BYTES
    } else {
        DEEP_CACHE_BYTES
    }
}

/// Makes sure there are descriptors for layer `depth` (0 = top) of a
/// backing chain at `path`: raises the soft `RLIMIT_NOFILE` towards the
/// hard limit when the chain needs it (as qemu-img does), and otherwise
/// refuses with a message naming the layer, instead of failing somewhere
/// inside an open with "Too many open files".
pub(crate) fn ensure_fds(depth: usize, path: &str) -> Result<(), CliError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = (depth as u64 + 1)
        .saturating_mul(FDS_PER_LAYER)
        .saturating_add(SPARE_FDS);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    if need <= soft {
        return Ok(());
    }
    if need <= hard {
        // Straight to the hard limit (at most what the deepest chain
        // needs), so a deep chain raises it once.
        let want = hard.min((MAX_CHAIN_DEPTH as u64 + 1) * FDS_PER_LAYER + SPARE_FDS);
        if setrlimit(Resource::RLIMIT_NOFILE, want.max(need), hard).is_ok() {
            return Ok(());
        }
    }
    Err(CliError::io(
        path,
        format!(
            "layer {} of the backing chain needs about {need} open files, \
             more than this process may open (ulimit -n {soft}, hard limit {hard}); \
             raise the limit or shorten the chain (qimg commit)",
            depth + 1
        ),
    ))
}

/// The too-deep refusal for the image at `path`.
pub(crate) fn too_deep(path: &str) -> CliError {
    CliError::io(
        path,
        format!(
            "the backing chain is deeper than {MAX_CHAIN_DEPTH} images, qimg's limit \
             (shorten it with qimg commit or qimg rebase)"
        ),
    )
}

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
    if let Some(spec) = &opts.spec {
        spec.check_exists(path)?;
    }
    refuse_dir(path)?;
    let format = resolve(path, opts.format, opts.header.as_deref())?;
    if let Some(spec) = &opts.spec {
        spec.check_opened(format, path)?;
    }
    if opts.snapshot.is_some() && format != Format::Qcow2 {
        return Err(CliError::usage(format!(
            "{path}: -l needs a qcow2 image; this one is {format}"
        )));
    }
    match format {
        Format::Raw => {
            let file = opts.cache.open(path, false, |e| {
                CliError::io(path, format!("cannot open: {e}"))
            })?;
            crate::lock::lock(file.file(), path, crate::lock::Access::Read)?;
            let mut raw = RawFile::from_dev(file);
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
                keys: crate::luks_common::KeySource {
                    key_file: opts.key_file.clone(),
                    key_secret: opts.key_secret.clone(),
                },
                secrets,
                files: std::cell::RefCell::new(Vec::new()),
                cache: opts.cache,
            };
            let mut src = open_qcow2(
                path,
                opts.snapshot.as_deref(),
                &ctx,
                opts.spec.as_ref(),
                &mut seen,
                &mut chain,
            )?;
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
            let keys = crate::luks_common::KeySource {
                key_file: opts.key_file.clone(),
                key_secret: opts.key_secret.clone(),
            };
            let mut src = crate::luks::open(
                path,
                opts.header.as_deref(),
                &keys,
                secrets,
                false,
                opts.cache,
            )?;
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
    keys: crate::luks_common::KeySource,
    secrets: &'a Secrets,
    /// Every file opened so far.
    files: std::cell::RefCell<Vec<String>>,
    /// `-T`.
    cache: crate::cache::CacheMode,
}

/// The format a `backing_fmt` name stands for, if qimg reads it (`file`
/// is QEMU's name for the raw protocol layer).
pub(crate) fn backing_format(name: &str) -> Option<Format> {
    match name {
        "file" => Some(Format::Raw),
        _ => Format::parse(name).filter(|f| *f != Format::Luks),
    }
}

/// The format of the backing file at `path`: the image's `backing_fmt`
/// when it names one (detected from the file when it does not).
fn backing_fmt_of(path: &str, format: Option<&str>) -> Result<Format, CliError> {
    match format {
        Some(name) => backing_format(name).ok_or_else(|| {
            CliError::io(
                path,
                format!("backing file format '{name}' is not supported (qcow2 or raw)"),
            )
        }),
        None => crate::format::detect_backing(path),
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
    // qemu-img's words: `Could not open 'IMAGE': ` then, for the backing
    // file, `Could not open backing file: ` then the file's own error.
    let usable = |full: &Path, what: &str| -> Result<(), CliError> {
        let lead = match what {
            "backing file" => format!("Could not open '{path}': Could not open backing file: "),
            _ => format!("Could not open '{path}': "),
        };
        let os = |e: std::io::Error| {
            CliError::usage(format!(
                "{lead}Could not open '{}': {}",
                full.display(),
                crate::os_text(&e)
            ))
        };
        let meta = std::fs::metadata(full).map_err(os)?;
        if meta.is_dir() {
            return Err(CliError::usage(format!(
                "{lead}'file' driver requires '{}' to be a regular file",
                full.display()
            )));
        }
        // A FIFO or socket would block the open below; a character device
        // is a 0-byte raw backing file, as QEMU's host_device.
        crate::file::refuse_dir_backing(&full.to_string_lossy())?;
        std::fs::File::open(full).map_err(os)?;
        Ok(())
    };
    if let Some(b) = backing {
        let full = match ImageSpec::json(b)? {
            Some(spec) => PathBuf::from(spec.path),
            None => resolve_backing(path, b),
        };
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
            None => crate::format::detect_backing(&name)?,
        };
        match fmt {
            Format::Qcow2 if crate::format::detect_backing(&name)? != Format::Qcow2 => {
                return Err(CliError::usage(format!(
                    "Could not open '{path}': Could not open backing file: \
                     Image is not in qcow2 format"
                )))
            }
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
        return Err(too_deep(path));
    }
    ensure_fds(chain.len(), path)?;
    chain.push(path.to_string());
    Ok(())
}

/// Opens a qcow2 image and its backing chain, one layer after another (a
/// loop, not a recursion: a chain of [`MAX_CHAIN_DEPTH`] layers needs no
/// more stack than one of two).
///
/// `spec` is the top image's option set: its `backing.*` keys choose and
/// unlock the backing file, and a `json:` backing name written in an
/// image is read as the option set it is.
fn open_qcow2(
    path: &str,
    snapshot: Option<&str>,
    ctx: &Ctx<'_>,
    spec: Option<&ImageSpec>,
    seen: &mut std::collections::BTreeSet<PathBuf>,
    chain: &mut Vec<String>,
) -> Result<Box<dyn Source>, CliError> {
    let mut layers = Vec::new();
    let mut next = Some((path.to_string(), Format::Qcow2, spec.cloned()));
    let mut snapshot = snapshot;
    while let Some((cur, fmt, spec)) = next.take() {
        match fmt {
            Format::Qcow2 => {
                // A backing spec with its own secret unlocks its layer
                // with it; other layers take the top image's key options.
                let keys = match spec.as_ref().and_then(|s| s.key_secret.clone()) {
                    Some(id) if chain.is_empty() => crate::luks_common::KeySource {
                        key_secret: Some(id),
                        ..ctx.keys.clone()
                    },
                    Some(id) => crate::luks_common::KeySource {
                        key_file: None,
                        key_secret: Some(id),
                    },
                    None => ctx.keys.clone(),
                };
                let (layer, backing) = open_qcow2_layer(
                    &cur,
                    snapshot.take(),
                    ctx,
                    &keys,
                    spec.as_ref(),
                    seen,
                    chain,
                )?;
                layers.push(Layer::Qcow2(Box::new(layer)));
                next = next_layer(&cur, backing, spec)?;
            }
            Format::Raw => {
                guard_chain(&cur, seen, chain)?;
                crate::file::refuse_dir_backing(&cur)?;
                ctx.files.borrow_mut().push(cur.clone());
                let file = ctx.cache.open(&cur, false, |e| {
                    CliError::io(&cur, format!("cannot open the backing file: {e}"))
                })?;
                crate::lock::lock(file.file(), &cur, crate::lock::Access::Read)?;
                layers.push(Layer::Raw(RawFile::from_dev(file)));
            }
            Format::Luks => {
                return Err(CliError::io(
                    &cur,
                    "LUKS backing files are not supported".into(),
                ))
            }
        }
    }
    if layers.len() == 1 {
        if let Some(Layer::Qcow2(top)) = layers.pop() {
            return Ok(top);
        }
    }
    Ok(Box::new(Chain::new(layers)?))
}

/// The backing file an image names: (name as written, `backing_fmt`).
type BackingName = (String, Option<String>);

/// The layer below the qcow2 image `cur`: what its option set `spec` says
/// (no backing file, or another one), else the backing file it names (a
/// `json:` name is an option set, its file names relative to the working
/// directory as in qemu-img; other names are relative to `cur`).
fn next_layer(
    cur: &str,
    written: Option<BackingName>,
    spec: Option<ImageSpec>,
) -> Result<Option<(String, Format, Option<ImageSpec>)>, CliError> {
    // Errors about a file the option set names are worded as qemu-img's.
    let parent = spec
        .as_ref()
        .map(|s| ImageSpec::path(&s.path, s.format).named(s));
    let chosen = spec.map_or(Backing::AsWritten, |s| s.backing);
    let (name, bfmt) = match (chosen, written) {
        (Backing::Without, _) => return Ok(None),
        (Backing::Spec(b), written) => {
            let mut b = *b;
            if b.path.is_empty() {
                // Only keys for the backing file: it is the one named.
                let Some((name, _)) = &written else {
                    return Err(CliError::io(
                        cur,
                        "Could not open backing file: the image has no backing file \
                         and the options name none (backing.file.filename)"
                            .into(),
                    ));
                };
                b.path = resolve_backing(cur, name).to_string_lossy().into_owned();
            }
            if let (Err(e), Some(p)) = (std::fs::metadata(&b.path), &parent) {
                return Err(p.error(&format!(
                    "Could not open backing file: Could not open '{}': {}",
                    b.path,
                    crate::os_text(&e)
                )));
            }
            let f = match b.format {
                Some(f) => f,
                None => backing_fmt_of(&b.path, written.and_then(|w| w.1).as_deref())?,
            };
            b.check_format(f)?;
            return Ok(Some((b.path.clone(), f, Some(b))));
        }
        (Backing::AsWritten, None) => return Ok(None),
        (Backing::AsWritten, Some(w)) => w,
    };
    if let Some(js) = ImageSpec::json(&name)? {
        let f = match js.format {
            Some(f) => f,
            None => backing_fmt_of(&js.path, bfmt.as_deref())?,
        };
        js.check_format(f)?;
        return Ok(Some((js.path.clone(), f, Some(js))));
    }
    let full = resolve_backing(cur, &name).to_string_lossy().into_owned();
    let f = backing_fmt_of(&full, bfmt.as_deref())?;
    Ok(Some((full, f, None)))
}

/// Opens one qcow2 layer of a chain (the top one with `snapshot`
/// selected), with its data file but no backing device: [`Chain`] reads
/// through the layers.
fn open_qcow2_layer(
    path: &str,
    snapshot: Option<&str>,
    ctx: &Ctx<'_>,
    keys: &crate::luks_common::KeySource,
    spec: Option<&ImageSpec>,
    seen: &mut std::collections::BTreeSet<PathBuf>,
    chain: &mut Vec<String>,
) -> Result<(crate::qcow2::Qcow2Source, Option<BackingName>), CliError> {
    guard_chain(path, seen, chain)?;
    refuse_dir(path)?;
    ctx.files.borrow_mut().push(path.to_string());
    let depth = chain.len().saturating_sub(1);
    let opening = crate::qcow2::Opening::open_in_mode(path, layer_cache_bytes(depth), ctx.cache)?;
    if let Some(spec) = spec {
        spec.check_encryption(opening.img.info().header.crypt_method)?;
    }
    let mut opening = crate::qcow2::unlock(path, opening, keys, ctx.secrets)?;
    let info = opening.img.info();
    let backing_name = info.backing_file().map(str::to_string);
    let backing_fmt = info.backing_format().map(str::to_string);
    // `data-file.*` names the data file instead of the header (relative
    // to the working directory, as any file an option set names).
    let given_data = spec.and_then(|s| s.data_file.clone());
    let data_name = given_data.clone().or(info.data_file().map(str::to_string));
    if given_data.is_none() && info.data_file_name_missing() {
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
    let data = match data_name {
        Some(d) => {
            let full = match &given_data {
                Some(g) => PathBuf::from(g),
                None => resolve_backing(path, &d),
            };
            refuse_dir(&full.to_string_lossy())?;
            ctx.files
                .borrow_mut()
                .push(full.to_string_lossy().into_owned());
            let file = ctx.cache.open(&full.to_string_lossy(), false, |e| {
                match (spec, &given_data) {
                    (Some(s), Some(g)) => {
                        s.error(&format!("Could not open '{g}': {}", crate::os_text(&e)))
                    }
                    _ => CliError::io(
                        path,
                        format!("cannot open the data file {}: {e}", full.display()),
                    ),
                }
            })?;
            crate::lock::lock(
                file.file(),
                &full.to_string_lossy(),
                crate::lock::Access::Read,
            )?;
            let holes = file
                .file()
                .try_clone()
                .map_err(|e| CliError::io(path, e.to_string()))?;
            // The data lives there: `map` names it, as qemu-img does.
            if let Some(name) = chain.get_mut(depth) {
                *name = full.to_string_lossy().into_owned();
            }
            Some((erased(file), holes))
        }
        None => None,
    };
    let src = crate::qcow2::Qcow2Source::new(path, opening, data)?;
    Ok((src, backing_name.map(|b| (b, backing_fmt))))
}

/// Resolves a backing file name relative to the image that names it, as
/// QEMU does.
///
/// A `json:` name is an option set, not a path: it is kept whole, as
/// qemu-img shows it (`full-backing-filename`).
pub(crate) fn resolve_backing(image: &str, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() || backing.starts_with(crate::image_spec::JSON_PREFIX) {
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
) -> Result<crate::image_info::ImageInfo, CliError> {
    if let Some(spec) = ImageSpec::json(path)? {
        // A `json:` name (given, or a backing file's) shows as its file.
        return info(&spec.path, spec.format.or(format), args);
    }
    refuse_dir(path)?;
    let format = resolve(path, format, args.header.as_deref())?;
    match format {
        Format::Raw => crate::image_info::ImageInfo::basic(path, format, sector_length(path)?),
        Format::Qcow2 => {
            let mut opening = crate::qcow2::Opening::open(path)?;
            let info = opening.img.info().clone();
            let mut out = crate::image_info::ImageInfo::basic(path, format, info.virtual_size())?;
            out.cluster_size = Some(info.cluster_size());
            out.dirty = info.dirty();
            out.encrypted = info.header.crypt_method.is_encrypted();
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
