//! `qimg create`.

use luks_core::io::{BlockIo, FileDevice};

use crate::args::SecretArgs;
use crate::file::open_file_cached;
use crate::format::Format;
use crate::header_job::PendingHeader;
use crate::opts::{parse_size, OptionMap};
use crate::CliError;

/// What `qimg create` was asked for.
pub(crate) struct CreateArgs<'a> {
    pub(crate) format: Format,
    pub(crate) options: &'a [String],
    pub(crate) quiet: bool,
    pub(crate) secrets: &'a SecretArgs,
    pub(crate) filename: &'a str,
    pub(crate) size: Option<&'a str>,
    pub(crate) backing: Option<&'a str>,
    pub(crate) backing_fmt: Option<&'a str>,
    /// `-u`: do not open the backing file (it may not exist yet).
    pub(crate) unsafe_backing: bool,
}

/// Runs `qimg create`.
pub(crate) fn run(a: CreateArgs<'_>) -> Result<u8, CliError> {
    let CreateArgs {
        format,
        options,
        quiet,
        secrets,
        filename,
        size,
        backing,
        backing_fmt,
        unsafe_backing,
    } = a;
    let opts = OptionMap::parse(options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    let size = size
        .map(|s| parse_size(s).map_err(|e| CliError::usage(e.to_string())))
        .transpose()?;
    let need_size = |size: Option<u64>| -> Result<u64, CliError> {
        match size {
            Some(s) => Ok(s),
            None => opts
                .get_size("size")
                .map_err(|e| CliError::usage(e.to_string()))?
                .ok_or_else(|| {
                    CliError::usage(format!("{filename}: Image creation needs a size parameter"))
                }),
        }
    };
    if backing.is_some() && format != Format::Qcow2 {
        return Err(CliError::usage(format!(
            "{filename}: Backing file not supported for file format '{}'",
            format_name(format)
        )));
    }
    let size = match format {
        Format::Qcow2 => {
            let b = BackingArgs {
                file: backing,
                fmt: backing_fmt,
                unsafe_backing,
            };
            create_qcow2(&opts, filename, size, b, quiet, secrets)?;
            return Ok(0);
        }
        Format::Raw => {
            let size = need_size(size)?;
            create_raw(&opts, filename, size)?;
            size
        }
        Format::Luks => {
            let size = need_size(size)?;
            let s = crate::secret::Secrets::parse(&secrets.object)?;
            crate::luks::create(filename, &opts, &s, secrets.key_file.as_deref(), size)?;
            size
        }
    };
    if !quiet {
        println!(
            "Formatting '{filename}', fmt={} size={size}",
            format_name(format)
        );
    }
    Ok(0)
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Qcow2 => "qcow2",
        Format::Raw => "raw",
        Format::Luks => "luks",
    }
}

fn create_raw(opts: &OptionMap, filename: &str, size: u64) -> Result<(), CliError> {
    let prealloc = opts.get("preallocation").unwrap_or("off").to_string();
    opts.reject_unused("raw")
        .map_err(|e| CliError::usage(e.to_string()))?;
    let mut dev = crate::lock::create_locked(filename)?;
    let io = |e: luks_core::io::FileError| CliError::io(filename, e.to_string());
    match prealloc.as_str() {
        "off" => {
            dev.set_size(size).map_err(io)?;
        }
        // Both allocate every block; qimg writes zeroes for `falloc` too.
        "full" | "falloc" => {
            let chunk = vec![0u8; crate::convert::CHUNK];
            let mut off = 0u64;
            while off < size {
                let n =
                    crate::convert::CHUNK.min(usize::try_from(size - off).unwrap_or(usize::MAX));
                dev.write_at(off, &chunk[..n]).map_err(io)?;
                off += n as u64;
            }
            dev.flush().map_err(io)?;
        }
        other => {
            return Err(CliError::usage(format!(
                "invalid preallocation mode '{other}' for raw: use off, falloc or full"
            )))
        }
    }
    Ok(())
}

/// qcow2 creation options from `-o` (and `-b`/`-F`), with qemu-img's names.
pub(crate) struct Qcow2Create {
    /// Virtual size, when known.
    pub(crate) size: Option<u64>,
    v3: bool,
    cluster_size: u64,
    refcount_bits: u32,
    lazy_refcounts: bool,
    preallocation: qcow_core::Preallocation,
    compression_type: u8,
    extended_l2: bool,
    data_file: Option<String>,
    data_file_raw: bool,
    /// `backing_file` / `-b`.
    pub(crate) backing_file: Option<String>,
    /// `backing_fmt` / `-F`.
    pub(crate) backing_fmt: Option<String>,
    /// `encrypt.format=luks` and its `encrypt.*` options.
    encrypt: Option<crate::luks_common::CreateOptions>,
}

fn on_off(opts: &OptionMap, key: &str) -> Result<bool, CliError> {
    match opts.get(key) {
        None | Some("off") | Some("false") => Ok(false),
        Some("on") | Some("true") => Ok(true),
        Some(v) => Err(CliError::usage(format!(
            "parameter '{key}' expects 'on' or 'off', got '{v}'"
        ))),
    }
}

impl Qcow2Create {
    /// Reads qcow2 options; refuses unknown ones as qemu-img does.
    pub(crate) fn parse(
        opts: &OptionMap,
        backing: Option<&str>,
        backing_fmt: Option<&str>,
    ) -> Result<Self, CliError> {
        let bad = |e: crate::opts::OptError| CliError::usage(e.to_string());
        let legacy = "legacy qcow AES encryption (encrypt.format=aes, encryption=on) is \
                      not supported for new images: it is insecure (unauthenticated AES-CBC \
                      with predictable IVs derived from the guest offset and a key taken \
                      straight from the passphrase) and QEMU no longer creates it; use \
                      encrypt.format=luks";
        if matches!(opts.get("encryption"), Some("on") | Some("true")) {
            return Err(CliError::usage(legacy.into()));
        }
        let encrypt = match opts.get("encrypt.format") {
            None => None,
            Some("luks") => Some(crate::luks_common::CreateOptions::parse(opts, "encrypt.")?),
            Some("aes") => return Err(CliError::usage(legacy.into())),
            Some(v) => {
                return Err(CliError::usage(format!(
                    "Invalid encrypt.format '{v}' (luks)"
                )))
            }
        };
        let v3 = match opts.get("compat") {
            None | Some("1.1") | Some("v3") => true,
            Some("0.10") | Some("0.1") | Some("v2") => false,
            Some(v) => {
                return Err(CliError::usage(format!(
                    "Invalid compatibility level: '{v}' (use 0.10 or 1.1)"
                )))
            }
        };
        let preallocation = match opts.get("preallocation") {
            None | Some("off") => qcow_core::Preallocation::Off,
            Some("metadata") => qcow_core::Preallocation::Metadata,
            Some("full") | Some("falloc") => qcow_core::Preallocation::Full,
            Some(v) => {
                return Err(CliError::usage(format!(
                    "Invalid preallocation mode: '{v}' (off, metadata, falloc or full)"
                )))
            }
        };
        let compression_type = match opts.get("compression_type") {
            None | Some("zlib") => 0,
            Some("zstd") => 1,
            Some(v) => {
                return Err(CliError::usage(format!(
                    "Invalid compression type '{v}' (zlib or zstd)"
                )))
            }
        };
        let refcount_bits = match opts.get_u64("refcount_bits").map_err(bad)? {
            Some(b) => u32::try_from(b)
                .map_err(|_| CliError::usage(format!("refcount_bits {b} is too large")))?,
            None => 16,
        };
        let out = Self {
            size: opts.get_size("size").map_err(bad)?,
            v3,
            cluster_size: opts.get_size("cluster_size").map_err(bad)?.unwrap_or(65536),
            refcount_bits,
            lazy_refcounts: on_off(opts, "lazy_refcounts")?,
            preallocation,
            compression_type,
            extended_l2: on_off(opts, "extended_l2")?,
            data_file: opts.get("data_file").map(str::to_string),
            data_file_raw: on_off(opts, "data_file_raw")?,
            backing_file: backing
                .map(str::to_string)
                .or_else(|| opts.get("backing_file").map(str::to_string)),
            backing_fmt: backing_fmt
                .map(str::to_string)
                .or_else(|| opts.get("backing_fmt").map(str::to_string)),
            encrypt,
        };
        opts.reject_unused("qcow2")
            .map_err(|e| CliError::usage(e.to_string()))?;
        Ok(out)
    }

    /// Creates the image at `path` of `size` bytes and returns its writer.
    pub(crate) fn create(
        &self,
        path: &str,
        size: u64,
        secrets: &crate::secret::Secrets,
    ) -> Result<qcow_core::Qcow2Writer<FileDevice>, CliError> {
        let (w, pending) = self.create_with(path, size, secrets, false)?;
        debug_assert!(pending.is_none());
        Ok(w)
    }

    /// As [`Self::create`], for `convert`: an encrypted image's LUKS header
    /// (the PBKDF2 benchmark, 50-500 ms of CPU by `iter-time`, then the
    /// key slot) is written on a thread of its own while the
    /// copy runs, the writer encrypting with the volume key from the
    /// start. The caller waits for the [`PendingHeader`] before its final
    /// flush.
    pub(crate) fn create_for_copy(
        &self,
        path: &str,
        size: u64,
        secrets: &crate::secret::Secrets,
    ) -> Result<(qcow_core::Qcow2Writer<FileDevice>, Option<PendingHeader>), CliError> {
        self.create_with(path, size, secrets, true)
    }

    fn create_with(
        &self,
        path: &str,
        size: u64,
        secrets: &crate::secret::Secrets,
        defer_header: bool,
    ) -> Result<(qcow_core::Qcow2Writer<FileDevice>, Option<PendingHeader>), CliError> {
        // The passphrase first: a missing secret must not leave a file.
        let luks = match &self.encrypt {
            Some(e) => {
                let keys = crate::luks_common::KeySource {
                    key_file: None,
                    key_secret: e.key_secret.clone(),
                };
                let pass = keys.resolve(path, secrets, true)?;
                Some((e, pass, luks_region_sectors(e)?))
            }
            None => None,
        };
        // The data file, sized to the disk as qemu-img does.
        let data = match &self.data_file {
            Some(df) => {
                let full = crate::image::resolve_backing(path, df);
                let f = std::fs::File::create(&full).map_err(|e| {
                    CliError::io(
                        path,
                        format!("cannot create the data file {}: {e}", full.display()),
                    )
                })?;
                f.set_len(size)
                    .map_err(|e| CliError::io(path, format!("cannot size the data file: {e}")))?;
                Some(f)
            }
            None => None,
        };
        let dev = crate::lock::create_locked(path)?;
        let o = self.core_options(size, luks.as_ref().map(|l| l.2));
        let w = qcow_core::create(dev, &o).map_err(|e| CliError::io(path, e.to_string()))?;
        let w = match data {
            Some(f) => w
                .with_data_file(FileDevice::new(f))
                .map_err(|e| CliError::io(path, e.to_string()))?,
            None => w,
        };
        let Some((e, pass, sectors)) = luks else {
            return Ok((w, None));
        };
        let mut w = w;
        let (off, len) = w
            .crypto_region()
            .ok_or_else(|| CliError::io(path, "no LUKS region was reserved".into()))?;
        if defer_header {
            let (cipher, pending) = start_luks_header(path, e, pass, sectors, (off, len))?;
            let w = w
                .with_key(qcow_core::crypto::ImageKey::Luks(cipher))
                .map_err(|e| CliError::io(path, e.to_string()))?;
            return Ok((w, Some(pending)));
        }
        // Offsets inside the region are relative to it.
        let mut region = luks_core::io::Window::new(w.device(), off, len);
        let (hdr, vk) = crate::luks::format_volume(
            &mut region,
            e,
            &pass,
            Some(sectors),
            path,
            luks_core::luks1::Pbkdf2Reader::Qemu,
            None,
        )?;
        let cipher = luks_core::luks1::data_cipher::<std::convert::Infallible>(&hdr, &vk)
            .map_err(|e| CliError::io(path, e.to_string()))?;
        w.flush().map_err(|e| CliError::io(path, e.to_string()))?;
        let w = w
            .with_key(qcow_core::crypto::ImageKey::Luks(cipher))
            .map_err(|e| CliError::io(path, e.to_string()))?;
        Ok((w, None))
    }

    /// The core's options for an image of `size` bytes, with a LUKS
    /// region of `luks_sectors` 512-byte sectors when encrypted.
    fn core_options(&self, size: u64, luks_sectors: Option<u32>) -> qcow_core::CreateOptions<'_> {
        qcow_core::CreateOptions {
            size,
            v3: self.v3,
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            lazy_refcounts: self.lazy_refcounts,
            preallocation: self.preallocation,
            compression_type: self.compression_type,
            extended_l2: self.extended_l2,
            data_file: self.data_file.as_deref(),
            data_file_raw: self.data_file_raw,
            backing_file: self.backing_file.as_deref(),
            backing_fmt: self.backing_fmt.as_deref(),
            luks_region_len: luks_sectors.map(|s| u64::from(s) * 512),
        }
    }

    /// What the image would take on disk (`qimg measure`), for a virtual
    /// size of `size` bytes.
    pub(crate) fn measure(&self, size: u64) -> Result<qcow_core::Measure, CliError> {
        let luks = self.encrypt.as_ref().map(luks_region_sectors).transpose()?;
        let o = self.core_options(size, luks);
        qcow_core::measure::<std::convert::Infallible>(&o)
            .map_err(|e| CliError::usage(e.to_string()))
    }

    /// Whether every data cluster is written at creation
    /// (`preallocation=full` or `falloc`).
    pub(crate) fn preallocates_data(&self) -> bool {
        self.preallocation == qcow_core::Preallocation::Full
    }

    /// qemu-img's "Formatting ..." line.
    pub(crate) fn describe(&self, path: &str, size: u64) -> String {
        let mut s = format!(
            "Formatting '{path}', fmt=qcow2{} cluster_size={} extended_l2={} compression_type={} size={size}",
            match &self.encrypt {
                Some(e) => format!(
                    " encrypt.format=luks{}",
                    e.key_secret
                        .as_deref()
                        .map(|k| format!(" encrypt.key-secret={k}"))
                        .unwrap_or_default()
                ),
                None => String::new(),
            },
            self.cluster_size,
            if self.extended_l2 { "on" } else { "off" },
            if self.compression_type == 1 { "zstd" } else { "zlib" },
        );
        if let Some(b) = &self.backing_file {
            // qemu-img prints string options with commas doubled.
            s.push_str(&format!(" backing_file={}", b.replace(',', ",,")));
        }
        if let Some(f) = &self.backing_fmt {
            s.push_str(&format!(" backing_fmt={f}"));
        }
        s.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            if self.lazy_refcounts { "on" } else { "off" },
            self.refcount_bits
        ));
        s
    }
}

/// Draws the volume key of a new LUKS qcow2 image, starts its header's
/// thread ([`PendingHeader`]), and returns the data cipher.
fn start_luks_header(
    path: &str,
    e: &crate::luks_common::CreateOptions,
    pass: crate::opts::Secret,
    sectors: u32,
    (off, len): (u64, u64),
) -> Result<(luks_core::cipher::SectorCipher, PendingHeader), CliError> {
    let io = |m: String| CliError::io(path, m);
    let kb = usize::try_from(e.key_bytes()).unwrap_or(usize::MAX);
    let mut vk = zeroize::Zeroizing::new(vec![0u8; kb]);
    getrandom::fill(&mut vk).map_err(|err| io(format!("no random volume key: {err}")))?;
    let mode = e.mode_spec();
    let cipher = luks_core::cipher::SectorCipher::new(&e.cipher, &mode, &vk, 512)
        .map_err(|err| io(err.to_string()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|err| io(crate::os_text(&err)))?;
    let (path, e) = (path.to_string(), e.clone());
    let pending = PendingHeader::spawn(&path.clone(), move || -> Result<(), CliError> {
        let mut dev = FileDevice::new(file);
        let mut region = luks_core::io::Window::new(&mut dev, off, len);
        let (hdr, _) = crate::luks::format_volume(
            &mut region,
            &e,
            &pass,
            Some(sectors),
            &path,
            luks_core::luks1::Pbkdf2Reader::Qemu,
            Some(&vk),
        )?;
        // The data was encrypted with a cipher made from the
        // options; the header must name that very cipher.
        if hdr.cipher_name.as_str() != e.cipher || hdr.cipher_mode.as_str() != mode {
            return Err(CliError::io(
                &path,
                format!(
                    "the LUKS header names {}-{}, the data was encrypted with {}-{mode}",
                    hdr.cipher_name, hdr.cipher_mode, e.cipher
                ),
            ));
        }
        dev.flush()
            .map_err(|err| CliError::io(&path, err.to_string()))
    })?;
    Ok((cipher, pending))
}

/// Sectors of the LUKS header region qemu-img reserves inside a qcow2
/// image: the key material's end, rounded up to 4 KiB.
pub(crate) fn luks_region_sectors(e: &crate::luks_common::CreateOptions) -> Result<u32, CliError> {
    let key_bytes = e.key_bytes();
    let (_, end) = luks_core::luks1::key_slot_layout(key_bytes)
        .ok_or_else(|| CliError::usage(format!("a {key_bytes}-byte key is too large for LUKS1")))?;
    Ok(end.next_multiple_of(8))
}

/// Opens an existing qcow2 image for writing, with its external data file
/// (resolved as the readers resolve it) attached when it has one.
pub(crate) fn open_qcow2_writer(
    path: &str,
) -> Result<qcow_core::Qcow2Writer<FileDevice>, CliError> {
    open_qcow2_writer_keyed(path, None)
}

/// As [`open_qcow2_writer`], for an image that may be encrypted: its
/// passphrase comes from `keys` (`encrypt.key-secret`, the only secret
/// given, or a prompt), and every write is encrypted with its key.
pub(crate) fn open_qcow2_writer_keyed(
    path: &str,
    keys: Option<(&crate::luks_common::KeySource, &crate::secret::Secrets)>,
) -> Result<qcow_core::Qcow2Writer<FileDevice>, CliError> {
    open_qcow2_writer_cached(path, keys, crate::cache::CacheMode::Writeback)
}

/// [`open_qcow2_writer_keyed`] with the image and its data file in cache
/// mode `cache` (`amend -t`).
pub(crate) fn open_qcow2_writer_cached(
    path: &str,
    keys: Option<(&crate::luks_common::KeySource, &crate::secret::Secrets)>,
    cache: crate::cache::CacheMode,
) -> Result<qcow_core::Qcow2Writer<FileDevice>, CliError> {
    let mut dev = open_file_cached(path, true, cache)?;
    let info = {
        let mut cache = vec![0u8; 64 * 1024];
        qcow_core::Qcow2::open(&mut dev, &mut cache)
            .map_err(|e| CliError::io(path, e.to_string()))?
            .info()
            .clone()
    };
    let w = match (info.header.crypt_method, keys) {
        (qcow_core::CryptMethod::None, _) | (_, None) => qcow_core::Qcow2Writer::open(dev),
        (_, Some((keys, secrets))) => {
            let pass = keys.resolve(path, secrets, false)?;
            let key = qcow_core::crypto::ImageKey::unlock(&mut dev, &info, &pass)
                .map_err(|e| CliError::io(path, e.to_string()))?
                .ok_or_else(|| CliError::io(path, "the image is not encrypted".into()))?;
            qcow_core::Qcow2Writer::open_with_key(dev, key)
        }
    }
    .map_err(|e| CliError::io(path, e.to_string()))?;
    if !w.header().has_data_file() {
        return Ok(w);
    }
    let name = info
        .data_file()
        .ok_or_else(|| CliError::io(path, "the image needs a data file but names none".into()))?;
    let full = crate::image::resolve_backing(path, name);
    let mut data = FileDevice::open_rw(&full).map_err(|e| {
        CliError::io(
            path,
            format!("cannot open the data file {}: {e}", full.display()),
        )
    })?;
    cache.apply(&mut data, &full.to_string_lossy())?;
    let data = crate::lock::lock_dev(data, &full.to_string_lossy(), crate::lock::Access::Write)?;
    w.with_data_file(data)
        .map_err(|e| CliError::io(path, e.to_string()))
}

/// `-b`, `-F` and `-u` of `qimg create`.
pub(crate) struct BackingArgs<'a> {
    /// `-b`.
    pub(crate) file: Option<&'a str>,
    /// `-F`.
    pub(crate) fmt: Option<&'a str>,
    /// `-u`: the backing file is not opened (it may not exist yet).
    pub(crate) unsafe_backing: bool,
}

/// Opens the backing file `full` of the new image as qemu-img's create
/// does: it must exist and be in `fmt` (any format qimg reads when `fmt`
/// is `None`). Returns its detected format. Errors are qemu-img's, with
/// its hint `Could not open backing image.`
pub(crate) fn open_new_backing(
    filename: &str,
    full: &str,
    fmt: Option<&str>,
) -> Result<Format, CliError> {
    let hint = |m: String| CliError::io(filename, format!("{m}\nCould not open backing image."));
    let meta = std::fs::metadata(full)
        .map_err(|e| hint(format!("Could not open '{full}': {}", crate::os_text(&e))))?;
    if meta.is_dir() {
        return Err(hint(format!(
            "'file' driver requires '{full}' to be a regular file"
        )));
    }
    std::fs::File::open(full)
        .map_err(|e| hint(format!("Could not open '{full}': {}", crate::os_text(&e))))?;
    let detected = crate::format::detect_backing(full)?;
    match fmt {
        None => Ok(detected),
        Some(name) => match Format::parse(name) {
            None => Err(hint(format!("Unknown driver '{name}'"))),
            Some(Format::Qcow2) if detected != Format::Qcow2 => {
                Err(hint("Image is not in qcow2 format".into()))
            }
            Some(Format::Luks) if detected != Format::Luks => {
                Err(hint("Volume is not in LUKS format".into()))
            }
            Some(f) => Ok(f),
        },
    }
}

/// `qimg create -f qcow2`: the size comes from the argument, `-o size=`, or
/// the backing file. As in qemu-img 10, a backing file needs its format
/// (`-F` or `-o backing_fmt=`), and is opened (so must exist) unless `-u`.
pub(crate) fn create_qcow2(
    opts: &OptionMap,
    filename: &str,
    size: Option<u64>,
    backing: BackingArgs<'_>,
    quiet: bool,
    secrets: &SecretArgs,
) -> Result<(), CliError> {
    let c = Qcow2Create::parse(opts, backing.file, backing.fmt)?;
    let mut size = size.or(c.size);
    if let Some(b) = &c.backing_file {
        if b.is_empty() {
            return Err(CliError::io(
                filename,
                "Expected backing file name, got empty string".into(),
            ));
        }
        // qemu-img create reads the backing file with force-share: a
        // running VM's image can be a backing file.
        crate::lock::set_force_share(true);
        // A `json:{...}` name (Cinder's encrypted snapshots) is written
        // verbatim into the header, as qemu-img writes it; its file is the
        // one checked and sized here.
        let spec = crate::image_spec::ImageSpec::json(b)?;
        let full = match &spec {
            Some(s) => s.path.clone(),
            None => crate::image::resolve_backing(filename, b)
                .to_string_lossy()
                .into_owned(),
        };
        if backing.unsafe_backing {
            if c.backing_fmt.is_none() {
                return Err(CliError::io(
                    filename,
                    "Backing file specified without backing format".into(),
                ));
            }
        } else {
            let detected = open_new_backing(filename, &full, c.backing_fmt.as_deref())?;
            if let Some(s) = &spec {
                s.check_format(detected)?;
            }
            let Some(fmt) = c.backing_fmt.as_deref() else {
                return Err(CliError::io(
                    filename,
                    format!(
                        "Backing file specified without backing format\nDetected format of {detected}."
                    ),
                ));
            };
            let fmt = Format::parse(fmt).unwrap_or(detected);
            if size.is_none() && crate::file::is_char_device(&full) {
                // A character device is a 0-byte raw image, as in QEMU.
                size = Some(0);
            } else if size.is_none() {
                size = Some(
                    crate::image::info(&full, Some(fmt), &crate::args::SecretArgs::default())?
                        .virtual_size,
                );
            }
        }
        if std::path::Path::new(&full).exists() {
            let fmt = c
                .backing_fmt
                .as_deref()
                .and_then(Format::parse)
                .unwrap_or(Format::Qcow2);
            crate::chain_lock::refuse_backing_loop(filename, &full, fmt)?;
        }
    }
    let secrets = crate::secret::Secrets::parse(&secrets.object)?;
    let Some(size) = size else {
        return Err(CliError::usage(format!(
            "{filename}: Image creation needs a size parameter"
        )));
    };
    if !quiet {
        println!("{}", c.describe(filename, size));
    }
    let w = c.create(filename, size, &secrets)?;
    w.close()
        .map(|_| ())
        .map_err(|e| CliError::io(filename, e.to_string()))
}

/// The command line of `qimg create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateCmd {
    /// Image format.
    #[arg(short = 'f', long = "format", value_enum, default_value = "raw")]
    format: Format,
    /// Format options (`-o key=value,...`). LUKS: qemu-img's names
    /// (key-secret, cipher-alg, cipher-mode, ivgen-alg, hash-alg,
    /// iter-time) plus luks-version=1|2; for LUKS2 also
    /// pbkdf=argon2id|argon2i|pbkdf2, pbkdf-memory=KiB,
    /// pbkdf-parallel=N, pbkdf-iterations=N (fixed PBKDF2 iterations
    /// or Argon2 passes instead of timing iter-time),
    /// sector-size=512..4096, metadata-size=16k..4M, label=TEXT,
    /// detached-header=on (the file holds only the header; the size is
    /// ignored and the payload is any file read with --header).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Backing file (qcow2 only); the size defaults to its size.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (required with `-b`, as in qemu-img).
    #[arg(short = 'F', value_name = "FMT")]
    backing_fmt: Option<String>,
    /// Unsafe: do not open the backing file (it may not exist yet); the
    /// size must then be given.
    #[arg(short = 'u')]
    unsafe_backing: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    /// The new image file (absent with `-o help`).
    #[arg(required_unless_present = "options")]
    filename: Option<String>,
    /// Virtual size, with an optional k, M, G, T suffix.
    size: Option<String>,
}

impl CreateCmd {
    /// Runs `qimg create`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        if crate::opts_help::asked(&self.options) {
            let with_target = self.filename.is_some();
            return crate::opts_help::print(&crate::opts_help::create_help(
                self.format,
                with_target,
            ));
        }
        let filename = self
            .filename
            .as_deref()
            .ok_or_else(|| CliError::usage("Expecting image file name".into()))?;
        run(CreateArgs {
            format: self.format,
            options: &self.options,
            quiet: self.quiet,
            secrets: &self.secrets,
            filename,
            size: self.size.as_deref(),
            backing: self.backing.as_deref(),
            backing_fmt: self.backing_fmt.as_deref(),
            unsafe_backing: self.unsafe_backing,
        })
    }
}
