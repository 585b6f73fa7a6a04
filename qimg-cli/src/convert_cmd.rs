//! `qimg convert`: its command line, and opening the source and creating
//! the destination around the copy engine in [`crate::convert`].

use crate::args::SecretArgs;
use crate::cache::CacheMode;
use crate::convert::{self, CopyOptions};
use crate::dev::{erased, AnyDev};
use crate::format::Format;
use crate::image::{self, OpenOptions};
use crate::opts::{parse_size, OptionMap};
use crate::secret::Secrets;
use crate::CliError;

/// The command line of `qimg convert`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConvertCmd {
    /// Source format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// Destination format (raw when absent; refused with
    /// --target-image-opts, whose driver names it).
    #[arg(short = 'O', value_enum)]
    output_format: Option<Format>,
    /// Destination options (`-o key=value,...`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Read the source as of an internal snapshot
    /// (`NAME`, `snapshot.name=NAME` or `snapshot.id=ID`).
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Minimum run of zero bytes left as a hole in the destination
    /// (default 4k; 0 writes everything).
    #[arg(short = 'S', value_name = "SIZE", default_value = "4k")]
    sparse_size: String,
    /// Skip creating the destination; it must exist and be large enough.
    #[arg(short = 'n')]
    no_create: bool,
    /// Compress the destination (qcow2): every cluster that shrinks is
    /// stored compressed.
    #[arg(short = 'c')]
    compress: bool,
    /// Backing file of the new qcow2 destination.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the `-B` backing file (written into the destination).
    #[arg(short = 'F', value_name = "FMT")]
    backing_fmt: Option<String>,
    /// The existing destination already reads as zero (with -n).
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Quiet (accepted for compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    /// Show progress: qemu-img's `    (NN.NN/100%)` lines on standard
    /// output, or a bar on standard error when both are terminals.
    #[arg(short = 'p')]
    progress: bool,
    /// Threads (qemu-img's `-m`): with 2 or more, one thread writes
    /// while the others read and do the decryption or encryption, and
    /// `-c` compresses on all of them. The default is 2 on machines
    /// with two cores or more. The output is byte-identical whatever
    /// the count.
    #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: Option<u16>,
    /// Allow out-of-order writes (qemu-img's `-W`). Accepted: qimg
    /// keeps writes in order, which `-W` permits, so the destination's
    /// layout stays the same with or without it.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Rate limit in bytes per second (qemu-img's `-r`; k, M, G, T, P, E
    /// suffixes; 0 is no limit): the copy waits before each chunk until
    /// the bytes done so far, divided by the time since the start, are
    /// within the rate.
    #[arg(short = 'r', value_name = "RATE", allow_hyphen_values = true)]
    rate_limit: Option<String>,
    /// Read the source without taking QEMU's shared locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Cache mode of the destination: none, directsync, writethrough,
    /// writeback or unsafe (the default: never synced).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the source and its backing files (default writeback).
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The destination is QEMU's option list (`driver=qcow2,file.filename=PATH,
    /// encrypt.key-secret=ID`; with -n: an existing image).
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Source image (absent with `-o help`).
    #[arg(required_unless_present = "options")]
    source: Option<String>,
    /// Destination image (absent with `-o help`).
    #[arg(required_unless_present = "options")]
    destination: Option<String>,
}

impl ConvertCmd {
    /// Runs `qimg convert`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        let Self {
            format,
            output_format,
            options,
            snapshot,
            sparse_size,
            no_create,
            compress,
            backing,
            backing_fmt,
            target_is_zero,
            quiet,
            progress,
            workers,
            out_of_order: _,
            rate_limit,
            force_share,
            cache,
            source_cache,
            secrets,
            image_opts,
            target_image_opts,
            source,
            destination,
        } = self;
        // qemu-img checks -r as it reads its options, before anything else.
        let rate_limit = rate_limit.as_deref().map(parse_rate).transpose()?;
        if crate::opts_help::asked(&options) {
            let with_target = destination.is_some();
            let text =
                crate::opts_help::create_help(output_format.unwrap_or(Format::Raw), with_target);
            return crate::opts_help::print(&text);
        }
        let (Some(source), Some(destination)) = (source, destination) else {
            return Err(CliError::usage("Expecting two image file names".into()));
        };
        crate::lock::set_force_share(force_share);
        let src_spec = image_opts.spec(&source, format)?;
        // The destination as an option set: -n only, its driver is the
        // output format and its key secret unlocks it.
        let (output_format, destination, target_key_secret) =
            if target_image_opts || destination.starts_with(crate::image_spec::JSON_PREFIX) {
                if target_image_opts && !no_create {
                    return Err(CliError::usage(
                        "--target-image-opts requires use of -n flag".into(),
                    ));
                }
                let t = crate::image_spec::ImageSpec::from_arg(
                    &destination,
                    target_image_opts,
                    output_format,
                )?;
                let f = t.resolve(None)?;
                (f, t.path.clone(), t.key_secret.clone())
            } else {
                (output_format.unwrap_or(Format::Raw), destination, None)
            };
        convert_cmd(ConvertArgs {
            cache: CacheMode::target(cache.as_deref(), CacheMode::Unsafe)?,
            source_cache: CacheMode::source(source_cache.as_deref())?,
            progress: progress && !quiet,
            rate_limit: rate_limit.unwrap_or(0),
            workers: workers.map_or_else(crate::parallel::default_workers, usize::from),
            compress,
            backing,
            backing_fmt,
            format,
            output_format,
            options,
            snapshot,
            sparse_size: parse_size(&sparse_size)
                .map_err(|e| CliError::usage(format!("-S: {e}")))?,
            no_create,
            target_is_zero,
            secrets,
            source,
            src_spec,
            destination,
            target_key_secret,
        })
    }
}

struct ConvertArgs {
    /// `-t`.
    cache: CacheMode,
    /// `-T`.
    source_cache: CacheMode,
    progress: bool,
    /// `-r`: bytes per second, 0 for no limit.
    rate_limit: u64,
    workers: usize,
    compress: bool,
    backing: Option<String>,
    backing_fmt: Option<String>,
    format: Option<Format>,
    output_format: Format,
    options: Vec<String>,
    snapshot: Option<String>,
    sparse_size: u64,
    no_create: bool,
    target_is_zero: bool,
    secrets: SecretArgs,
    source: String,
    /// What `source` names (a path, `--image-opts` or `json:`).
    src_spec: crate::image_spec::ImageSpec,
    destination: String,
    /// The destination's key secret from `--target-image-opts`.
    target_key_secret: Option<String>,
}

fn convert_cmd(a: ConvertArgs) -> Result<u8, CliError> {
    crate::parallel::set_workers(a.workers);
    crate::lock::creating_for(&format!("error while converting {}: ", a.output_format));
    let secrets = Secrets::parse(&a.secrets.object)?;
    let mut src = image::open(
        &a.src_spec.path,
        &OpenOptions {
            format: a.format,
            snapshot: a.snapshot.clone(),
            cache: a.source_cache,
            ..OpenOptions::from_args(&a.secrets)
        }
        .with_spec(&a.src_spec),
        &secrets,
    )?;
    crate::lock::refuse_self_overwrite(
        &a.destination,
        &src.files,
        "the source image or a file of its backing chain",
    )?;
    if a.backing.is_some() && a.output_format != Format::Qcow2 {
        return Err(CliError::usage(format!(
            "Backing file not supported for file format '{}'",
            a.output_format
        )));
    }
    if let Some(b) = &a.backing {
        // `-B` naming the destination itself (or a chain back to it).
        let full = image::resolve_backing(&a.destination, b);
        crate::chain_lock::refuse_backing_loop(
            &a.destination,
            &full.to_string_lossy(),
            Format::Qcow2,
        )?;
    }
    // LUKS payloads are whole sectors: a raw source of odd length is padded
    // with zeroes (reads past the end of a file are zero).
    let len = if a.output_format == Format::Luks {
        src.virtual_size.next_multiple_of(512)
    } else {
        src.virtual_size
    };
    let opts = OptionMap::parse(&a.options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    if let Some(df) = opts.get("data_file") {
        let full = image::resolve_backing(&a.destination, df);
        crate::lock::refuse_self_overwrite(
            &full.to_string_lossy(),
            &src.files,
            "the source image or a file of its backing chain",
        )?;
    }
    // A new LUKS volume's header, written while the copy runs.
    let mut header = None;
    // A LUKS destination's cipher: the copy encrypts on its reading side
    // and writes ciphertext to `dst`.
    let mut seal = None;
    let mut dst: AnyDev = match a.output_format {
        Format::Raw => {
            opts.reject_unused("raw")
                .map_err(|e| CliError::usage(e.to_string()))?;
            if a.no_create {
                image::warn_if_raw_looks_formatted(&a.destination);
            }
            let file = if a.no_create {
                crate::file::open_file_cached(&a.destination, true, a.cache)?
            } else {
                crate::cache::refuse_before_create(&a.destination, a.cache)?;
                let mut file = crate::lock::create_locked(&a.destination)?;
                a.cache.apply(&mut file, &a.destination)?;
                file
            };
            let mut dev = erased(file);
            // Sized first, as qemu-img does: a size the filesystem cannot
            // hold ("File too large") fails before any copying.
            if !a.no_create {
                dev.set_size(len).map_err(|e| {
                    CliError::io(&a.destination, format!("cannot size the output: {e}"))
                })?;
            }
            dev
        }
        Format::Qcow2 => {
            return convert_to_qcow2(&a, src.dev.as_mut(), len, &opts, &secrets);
        }
        Format::Luks if a.no_create => {
            // An existing volume: unlocked with `key-secret` from
            // --target-image-opts, else the only secret given.
            opts.reject_unused("luks")
                .map_err(|e| CliError::usage(e.to_string()))?;
            let keys = crate::luks_common::KeySource {
                key_file: None,
                key_secret: a.target_key_secret.clone(),
            };
            let vol =
                crate::luks::open_volume(&a.destination, None, &keys, &secrets, true, a.cache)?;
            let (dev, s) = crate::luks::sealed(vol);
            seal = Some(s);
            dev
        }
        Format::Luks => {
            crate::cache::refuse_before_create(&a.destination, a.cache)?;
            let (vol, pending) =
                crate::luks::create_for_convert(&a.destination, &opts, &secrets, len, a.cache)?;
            header = pending;
            let (dev, s) = crate::luks::sealed(vol);
            seal = Some(s);
            dev
        }
    };
    // A new LUKS payload reads as noise, not zeroes: write every sector.
    let dst_zeroed = a.output_format != Format::Luks;
    let copy_opts = CopyOptions {
        sparse_size: a.sparse_size,
        target_is_zero: (dst_zeroed && !a.no_create) || a.target_is_zero,
        pipelined: crate::parallel::pipelined(),
        keep_unallocated: false,
    };
    let bar = crate::progress::Bar::new(a.progress, len);
    let mut throttle = Throttle::new(a.rate_limit, len);
    let mut tick = |done| {
        bar.set(done);
        throttle.wait(done);
    };
    match &seal {
        Some(s) => convert::copy_sealed(src.dev.as_mut(), &mut dst, s, len, copy_opts, &mut tick),
        None => convert::copy(src.dev.as_mut(), &mut dst, len, copy_opts, &mut tick),
    }
    .map_err(|e| copy_err(&a, e))?;
    bar.finish();
    if let Some(h) = header {
        h.finish()?;
    }
    if !a.no_create {
        dst.set_size(len)
            .map_err(|e| CliError::io(&a.destination, e.to_string()))?;
    }
    dst.flush()
        .map_err(|e| CliError::io(&a.destination, e.to_string()))?;
    Ok(0)
}

/// `convert -O qcow2 [-c]`: a new (or, with `-n`, existing) qcow2 image
/// written without barriers and flushed once at the end.
fn convert_to_qcow2(
    a: &ConvertArgs,
    src: &mut dyn crate::dev::Source,
    len: u64,
    opts: &OptionMap,
    secrets: &Secrets,
) -> Result<u8, CliError> {
    let dst = &a.destination;
    if a.compress && opts.get("encrypt.format").is_some() {
        return Err(CliError::usage(
            "Compression can't be used with encryption".into(),
        ));
    }
    if a.compress && opts.get("data_file").is_some() {
        return Err(CliError::usage(
            "Compression can't be used with an external data file".into(),
        ));
    }
    // A new encrypted image's LUKS header, written while the copy runs.
    let mut header = None;
    let mut w = if a.no_create {
        // An encrypted destination's passphrase: `-o encrypt.key-secret=ID`
        // (qemu-img takes it in --target-image-opts), else the only
        // secret given, else a prompt.
        let keys = crate::luks_common::KeySource {
            key_file: None,
            key_secret: opts
                .get("encrypt.key-secret")
                .map(str::to_string)
                .or_else(|| a.target_key_secret.clone()),
        };
        opts.reject_unused("qcow2")
            .map_err(|e| CliError::usage(e.to_string()))?;
        crate::create::open_qcow2_writer_cached(dst, Some((&keys, secrets)), a.cache)?
    } else {
        let c = crate::create::Qcow2Create::parse(
            opts,
            a.backing.as_deref(),
            a.backing_fmt.as_deref(),
        )?;
        if c.backing_fmt.is_some() && c.backing_file.is_none() {
            return Err(CliError::io(
                dst,
                "error while converting qcow2: Backing format cannot be used without \
                 backing file"
                    .into(),
            ));
        }
        if let Some(b) = &c.backing_file {
            // qemu-img 10: a backing file needs its format, and must open.
            if c.backing_fmt.is_none() {
                return Err(CliError::usage(
                    "Use of backing file requires explicit backing format".into(),
                ));
            }
            let full = image::resolve_backing(dst, b);
            std::fs::File::open(&full).map_err(|e| {
                CliError::usage(format!(
                    "Could not open '{dst}': Could not open backing file: Could not open '{}': {}",
                    full.display(),
                    crate::os_text(&e)
                ))
            })?;
        }
        crate::cache::refuse_before_create(dst, a.cache)?;
        let (mut w, pending) = c.create_for_copy(dst, len, secrets)?;
        header = pending;
        a.cache.apply(w.device(), dst)?;
        w
    };
    // Before the final flush: the header must be on the medium too.
    let mut header_done = || match header.take() {
        Some(h) => h.finish(),
        None => Ok(()),
    };
    if let Some(data) = w.data_file_device() {
        // The data file is the image's other file: the same mode.
        a.cache.apply(data, dst)?;
    }
    // `-t none`: the writer's refcount and L2 updates, a few bytes each,
    // are merged in memory per block until the final flush (as QEMU's
    // metadata caches do), instead of a synchronous read and write of the
    // block for each cluster. Nothing without O_DIRECT.
    w.device()
        .set_block_cache(true)
        .map_err(|e| CliError::io(dst, e.to_string()))?;
    w.set_write_barriers(false);
    let workers = crate::parallel::workers();
    let cipher_workers = crate::parallel::cipher_workers();
    if cipher_workers > 1 {
        w.set_sector_crypt(Box::new(crate::parallel::ParallelEncrypt::new(
            cipher_workers,
        )));
    }
    if a.compress && w.header().crypt_method.is_encrypted() {
        return Err(CliError::usage(
            "Compression can't be used with encryption".into(),
        ));
    }
    if a.compress && w.header().has_data_file() {
        return Err(CliError::usage(
            "Compression can't be used with an external data file".into(),
        ));
    }
    let io_dst = |e: qcow_core::Error<luks_core::io::FileError>| CliError::io(dst, e.to_string());
    // What the copy leaves out would read from the backing file: zero the
    // range first, so the image reads as the source.
    let backed = w.header().backing_file_offset != 0 && !a.target_is_zero;
    // A new image over a backing file (`-B`, `-o backing_file`) gets what
    // the source's top layer holds, as qemu-img writes it: the rest reads
    // from the backing file.
    if backed && !a.no_create && !a.compress {
        let cluster = w.header().cluster_size();
        let mut top = TopLayer {
            inner: src,
            cluster,
            len,
        };
        let mut dev: AnyDev = erased(w);
        let copy_opts = CopyOptions {
            sparse_size: a.sparse_size,
            target_is_zero: false,
            pipelined: crate::parallel::pipelined(),
            keep_unallocated: true,
        };
        let bar = crate::progress::Bar::new(a.progress, len);
        let mut throttle = Throttle::new(a.rate_limit, len);
        convert::copy(&mut top, &mut dev, len, copy_opts, &mut |done| {
            bar.set(done);
            throttle.wait(done);
        })
        .map_err(|e| copy_err(a, e))?;
        header_done()?;
        dev.flush().map_err(|e| CliError::io(dst, e.to_string()))?;
        bar.finish();
        return Ok(0);
    }
    let cluster = w.header().cluster_size();
    let mut top = TopLayer {
        inner: src,
        cluster,
        len,
    };
    let new_backed = backed && !a.no_create;
    if new_backed {
        // `-c -B`: what the top layer holds reads as zero first (its
        // data clusters are then written compressed); the rest is left
        // to the backing file.
        let mut run: Option<(u64, u64)> = None;
        let mut off = 0u64;
        while off < len {
            let st = crate::dev::Source::block_status(&mut top, off, len - off)
                .map_err(|e| CliError::io(&a.source, e.to_string()))?;
            let n = st.len.clamp(1, len - off);
            if st.present {
                run = match run {
                    Some((s, e)) if e == off => Some((s, off + n)),
                    Some((s, e)) => {
                        w.write_zeroes(s, e - s).map_err(io_dst)?;
                        Some((off, off + n))
                    }
                    None => Some((off, off + n)),
                };
            }
            off += n;
        }
        if let Some((s, e)) = run {
            w.write_zeroes(s, e - s).map_err(io_dst)?;
        }
    } else if backed {
        w.write_zeroes(0, len).map_err(io_dst)?;
    }
    let src: &mut dyn crate::dev::Source = if new_backed {
        &mut top
    } else {
        &mut *top.inner
    };
    let bar = crate::progress::Bar::new(a.progress, len);
    let mut throttle = Throttle::new(a.rate_limit, len);
    if a.compress {
        let ctype = w.header().compression_type;
        convert::copy_clusters(
            src,
            len,
            cluster,
            crate::parallel::compress_window(workers, cluster),
            &mut |batch| {
                let packed = crate::parallel::compress_all(ctype, batch, workers);
                for ((idx, data), p) in batch.iter().zip(packed) {
                    w.write_precompressed(*idx, data, p.as_deref())
                        .map_err(|e| dev_err(dst, e))?;
                }
                Ok(())
            },
            &mut |done| {
                bar.set(done);
                throttle.wait(done);
            },
        )
        .map_err(|e| copy_err(a, e))?;
        header_done()?;
        w.close().map_err(io_dst)?;
    } else {
        let copy_opts = CopyOptions {
            sparse_size: a.sparse_size,
            target_is_zero: !a.no_create || a.target_is_zero || backed,
            pipelined: crate::parallel::pipelined(),
            keep_unallocated: false,
        };
        // A new encrypted image: its fresh clusters are allocated and
        // encrypted on the reading thread, and the writing thread only
        // writes their bytes (through a second handle to the file). Not
        // with O_DIRECT (a metadata block's read-modify-write may cover
        // data clusters of small cluster sizes) nor with a sync per write.
        let staged_file = if copy_opts.pipelined
            && !a.no_create
            && w.header().crypt_method.is_encrypted()
            && !w.header().has_data_file()
            && !w.device().is_direct()
            && w.device().sync_policy() != luks_core::io::SyncPolicy::EachWrite
        {
            w.device().file().try_clone().ok()
        } else {
            None
        };
        let mut tick = |done| {
            bar.set(done);
            throttle.wait(done);
        };
        if let Some(file) = staged_file {
            let mut dev = crate::dev::Erased(w);
            convert::copy_staged(src, &mut dev, &file, len, copy_opts, &mut tick)
                .map_err(|e| copy_err(a, e))?;
            header_done()?;
            luks_core::io::BlockIo::flush(&mut dev)
                .map_err(|e| CliError::io(dst, e.to_string()))?;
        } else {
            let mut dev: AnyDev = erased(w);
            convert::copy(src, &mut dev, len, copy_opts, &mut tick).map_err(|e| copy_err(a, e))?;
            header_done()?;
            dev.flush().map_err(|e| CliError::io(dst, e.to_string()))?;
        }
    }
    bar.finish();
    Ok(0)
}

impl convert::StagingDest
    for crate::dev::Erased<qcow_core::Qcow2Writer<luks_core::io::FileDevice>>
{
    fn cluster_size(&self) -> u64 {
        self.0.header().cluster_size()
    }

    fn stage(
        &mut self,
        off: u64,
        data: &mut [u8],
    ) -> Result<(usize, qcow_core::StagedRuns), crate::dev::DevError> {
        self.0
            .stage_fresh(off, data)
            .map_err(|e| crate::dev::DevError(e.to_string()))
    }
}

/// The source as `convert -B` copies it, as qemu-img does: what its top
/// layer holds (allocated there, or reading as zero because it has no
/// backing file under that range; every byte of a raw or LUKS source),
/// and nothing that would come from its backing files, which is reported
/// as not present and left to the destination's backing file. A
/// destination cluster the top layer holds only part of is copied whole
/// (the rest read through the source's chain), so no cluster of the new
/// image is written in part.
struct TopLayer<'a> {
    inner: &'a mut dyn crate::dev::Source,
    /// The destination's cluster size.
    cluster: u64,
    /// The guest size.
    len: u64,
}

impl TopLayer<'_> {
    /// Whether the top layer answers for the range (the chain reports
    /// depth 0 only for what the top holds or what nothing below covers).
    fn held(st: &crate::dev::BlockStatus) -> bool {
        st.depth == 0
    }

    /// Whether the top layer holds any byte of `start..end`.
    fn holds_any(&mut self, start: u64, end: u64) -> Result<bool, crate::dev::DevError> {
        let mut o = start;
        while o < end {
            let st = self.inner.block_status(o, end - o)?;
            if Self::held(&st) {
                return Ok(true);
            }
            o += st.len.max(1);
        }
        Ok(false)
    }
}

impl luks_core::io::BlockIo for TopLayer<'_> {
    type Error = crate::dev::DevError;
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        self.inner.size()
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.inner.read_at(off, buf)
    }
    fn write_at(&mut self, _: u64, _: &[u8]) -> Result<(), Self::Error> {
        Err(crate::dev::DevError("the source is read-only".into()))
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl crate::dev::Source for TopLayer<'_> {
    fn block_status(
        &mut self,
        offset: u64,
        max: u64,
    ) -> Result<crate::dev::BlockStatus, crate::dev::DevError> {
        let st = self.inner.block_status(offset, max)?;
        if Self::held(&st) {
            return Ok(crate::dev::BlockStatus {
                present: true,
                ..st
            });
        }
        let cs = self.cluster.max(1);
        let cstart = offset - offset % cs;
        let cend = cstart.saturating_add(cs).min(self.len);
        let end = offset.saturating_add(st.len.max(1));
        if (offset != cstart || end < cend) && self.holds_any(cstart, cend)? {
            return Ok(crate::dev::BlockStatus {
                len: st.len.clamp(1, cend.saturating_sub(offset).max(1)),
                present: true,
                ..st
            });
        }
        // Stop before a cluster the top layer may hold part of.
        let mut len = st.len.max(1);
        if end % cs != 0 && end < self.len && end - end % cs > offset {
            len = end - end % cs - offset;
        }
        Ok(crate::dev::BlockStatus {
            len,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        })
    }
}

fn dev_err(file: &str, e: impl std::fmt::Display) -> crate::dev::DevError {
    crate::dev::DevError(format!("{file}: {e}"))
}

fn copy_err(a: &ConvertArgs, e: convert::CopyError) -> CliError {
    match e {
        convert::CopyError::Read(e) => CliError::io(&a.source, e.to_string()),
        convert::CopyError::Write(e) => CliError::io(&a.destination, e.to_string()),
    }
}

/// `-r RATE` as qemu-img reads it: bytes per second, decimal or `0x` hex,
/// an optional one-letter suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`, any
/// case; a fraction needs one), at most `i64::MAX`; with qemu-img's errors.
fn parse_rate(v: &str) -> Result<u64, CliError> {
    let invalid = || CliError::usage(format!("Invalid rate limit specified: '{v}'."));
    let range = || {
        CliError::usage(format!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        ))
    };
    let t = v.trim_start();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let value: u128 = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        u128::from_str_radix(hex, 16).map_err(|_| range())?
    } else {
        let (num, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_lowercase() {
                    'b' => 0,
                    'k' => 10,
                    'm' => 20,
                    'g' => 30,
                    't' => 40,
                    'p' => 50,
                    'e' => 60,
                    _ => return Err(invalid()),
                };
                (&t[..i], Some(shift))
            }
            _ => (t, None),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !digits(int) || !digits(frac) || (num.contains('.') && shift.is_none())
        {
            return Err(invalid());
        }
        let shift = shift.unwrap_or(0);
        let int: u128 = int.parse().map_err(|_| range())?;
        let frac_v: u128 = if frac.is_empty() {
            0
        } else {
            frac.get(..18)
                .unwrap_or(frac)
                .parse()
                .map_err(|_| invalid())?
        };
        let scale = 10u128.pow(u32::try_from(frac.len().min(18)).unwrap_or(18));
        int.checked_shl(shift)
            .filter(|w| w >> shift == int)
            .ok_or_else(range)?
            .checked_add((frac_v << shift) / scale)
            .ok_or_else(range)?
    };
    if negative {
        return Err(range());
    }
    u64::try_from(value)
        .ok()
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(range)
}

/// `-r`: holds the copy back so that the bytes done, over the time since
/// the copy began, stay within the rate. It waits before the next chunk,
/// never after the last one (as qemu-img's limit delays the next request).
struct Throttle {
    /// Bytes per second; 0 for no limit.
    rate: u64,
    /// The guest length: at it, the copy is done and nothing waits.
    len: u64,
    /// When the copy began.
    start: std::time::Instant,
}

impl Throttle {
    /// A limit of `rate` bytes per second (0: none) on a copy of `len` bytes.
    fn new(rate: u64, len: u64) -> Self {
        Self {
            rate,
            len,
            start: std::time::Instant::now(),
        }
    }

    /// After `done` bytes: sleeps until `done / rate` seconds after the
    /// start.
    fn wait(&mut self, done: u64) {
        if self.rate == 0 || done >= self.len {
            return;
        }
        // u64 bytes over a u64 rate: whole seconds fit in u64, and the
        // remainder's nanoseconds are below 10^9.
        let secs = done / self.rate;
        let nanos = u128::from(done % self.rate) * 1_000_000_000 / u128::from(self.rate);
        let due = std::time::Duration::from_secs(secs)
            + std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
        if let Some(left) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(left);
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::parse_rate;

    #[test]
    fn rates_as_qemu_img_reads_them() {
        for (v, want) in [
            ("0", 0),
            ("100K", 102_400),
            ("102400K", 104_857_600),
            ("1.5k", 1536),
            ("5b", 5),
            (" 5", 5),
            ("0x10", 16),
            ("1T", 1 << 40),
            ("1E", 1 << 60),
        ] {
            assert_eq!(parse_rate(v).unwrap(), want, "{v}");
        }
        for v in ["abc", "10x", "1.5", "", "1KiB", "0x"] {
            let e = parse_rate(v).unwrap_err().to_string();
            assert!(
                e.contains(&format!("Invalid rate limit specified: '{v}'.")),
                "{v}: {e}"
            );
        }
        for v in ["-5", "-0", "8E", "9E", "99999999999999999999"] {
            let e = parse_rate(v).unwrap_err().to_string();
            assert!(
                e.contains("Must be between 0 and 9223372036854775807"),
                "{v}: {e}"
            );
        }
    }
}
