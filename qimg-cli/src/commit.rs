//! `qimg commit`: write what a qcow2 image holds into its backing file,
//! then empty the image (qemu-img commit).
//!
//! Every cluster of the backing file that the image allocates any part
//! of is rewritten whole with the guest content seen through the image
//! (which, where the image allocates nothing, is the backing file's own
//! content), so a qcow2 backing file never has to copy a partial cluster
//! from its own backing chain. All-zero clusters become zero writes.
//! Unless `-d`, the image's clusters are then unmapped, so it reads
//! through to the updated backing file.

use std::sync::mpsc;

use luks_core::io::BlockIo;

use crate::args::SecretArgs;
use crate::cache::CacheMode;
use crate::dev::{erased, AnyDev, Source};
use crate::format::Format;
use crate::image;
use crate::rebase::{open_metadata_writer, qcow2_only};
use crate::secret::Secrets;
use crate::CliError;

/// The command line of `qimg commit`.
#[derive(Debug, clap::Args)]
pub(crate) struct CommitCmd {
    /// Image format (qcow2).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Keep the image's content after committing (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress: qemu-img's `    (NN.NN/100%)` lines on standard
    /// output when it is not a terminal, else a bar (`-q` wins).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no "Image committed." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of the image and its backing file (none, directsync,
    /// writethrough, writeback: the default, unsafe).
    #[arg(short = 't', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image to commit into its backing file.
    filename: String,
}

impl CommitCmd {
    /// Runs `qimg commit`.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        let path = spec.path.as_str();
        let cache = CacheMode::target(self.cache.as_deref(), CacheMode::Writeback)?;
        qcow2_only(path, spec.format)?;
        spec.check_opened(Format::Qcow2, path)?;
        crate::lock::will_write(path);
        let args = self.secrets.with_spec(&spec);
        let info = image::info(path, Some(Format::Qcow2), &args)?;
        // `backing.*` keys name the backing file (and its key secret).
        let bspec = match &spec.backing {
            crate::image_spec::Backing::Spec(b) => Some(b.as_ref()),
            _ => None,
        };
        let given = bspec.filter(|b| !b.path.is_empty()).map(|b| b.path.clone());
        let Some(base) = given.or(info.full_backing_filename.clone()) else {
            return Err(CliError::io(
                path,
                "Image does not have a backing file".into(),
            ));
        };
        // A backing_fmt other than raw is read as qcow2.
        let base_fmt = match bspec
            .and_then(|b| b.format.map(|f| f.name()))
            .or(info.backing_format.as_deref())
            .map(Format::parse)
        {
            Some(Some(Format::Raw)) => Format::Raw,
            Some(_) => Format::Qcow2,
            None => crate::format::detect(&base)?,
        };
        // Never write into a qcow2 or LUKS file as if it were raw.
        let looks = crate::format::detect(&base)?;
        if base_fmt == Format::Raw && looks != Format::Raw {
            return Err(CliError::io(
                &base,
                format!(
                    "the image names this backing file as raw, but it looks like {looks}; \
                     refusing to write into it as raw (fix the name with `qimg rebase -u -F {looks}`)"
                ),
            ));
        }
        let secrets = Secrets::parse(&self.secrets.object)?;
        let mut top = image::open(
            path,
            &image::OpenOptions {
                format: Some(Format::Qcow2),
                cache,
                ..image::OpenOptions::from_args(&args)
            }
            .with_spec(&spec),
            &secrets,
        )?;
        let size = top.virtual_size;
        // An encrypted backing file is unlocked with its own key secret
        // (`backing.encrypt.key-secret`), else the image's key options.
        let base_keys = crate::luks_common::KeySource {
            key_file: args.key_file.clone(),
            key_secret: bspec
                .and_then(|b| b.key_secret.clone())
                .or(args.key_secret.clone()),
        };
        let (mut dst, cluster) = open_base(&base, base_fmt, size, cache, (&base_keys, &secrets))?;
        let bar = crate::progress::Bar::new(self.progress && !self.quiet, size);
        let to = Copy {
            size,
            cluster,
            path,
            base: &base,
            bar: &bar,
        };
        let ranges = copy_allocated(top.dev.as_mut(), &mut dst, &to)?;
        dst.flush()
            .map_err(|e| CliError::io(&base, e.to_string()))?;
        drop(dst);
        if !self.keep && !ranges.is_empty() {
            let mut w = open_metadata_writer(path, cache)?;
            for (off, len) in ranges {
                w.unmap(off, len)
                    .map_err(|e| CliError::io(path, e.to_string()))?;
            }
            w.drop_empty_tables()
                .map_err(|e| CliError::io(path, e.to_string()))?;
            // As qemu-img leaves it: no L2 tables left (they are all
            // zero now), and the file cut after its last cluster
            // in use (the freed clusters inside were punched by `unmap`).
            w.truncate_unused()
                .map_err(|e| CliError::io(path, e.to_string()))?;
            w.close().map_err(|e| CliError::io(path, e.to_string()))?;
        }
        // As qemu-img: the progress ends after the image was emptied.
        bar.finish();
        if !self.quiet {
            println!("Image committed.");
        }
        Ok(0)
    }
}

/// Opens the backing file for writing, grown to `size` if smaller, and
/// returns it with its write granularity (its cluster size; 512 for raw).
fn open_base(
    base: &str,
    fmt: Format,
    size: u64,
    cache: CacheMode,
    keys: (&crate::luks_common::KeySource, &Secrets),
) -> Result<(AnyDev, u64), CliError> {
    let io = |e: &dyn std::fmt::Display| CliError::io(base, e.to_string());
    match fmt {
        Format::Raw => {
            let mut file = crate::file::open_file_cached(base, true, cache)?;
            if file.size().map_err(|e| io(&e))? < size {
                file.set_size(size).map_err(|e| io(&e))?;
            }
            Ok((erased(file), 512))
        }
        Format::Qcow2 => {
            let mut w = crate::create::open_qcow2_writer_cached(base, Some(keys), cache)?;
            if w.virtual_size() < size {
                w.resize(size).map_err(|e| io(&e))?;
            }
            // The commit flushes once at the end: runs of fresh clusters
            // keep their L2 entries until then (refcounts and data are
            // flushed before the entries are written).
            w.defer_fresh_entries(true).map_err(|e| io(&e))?;
            let cs = w.header().cluster_size();
            Ok((erased(w), cs))
        }
        Format::Luks => Err(CliError::io(
            base,
            "LUKS backing files are not supported".into(),
        )),
    }
}

/// What [`copy_allocated`] copies and where it reports.
struct Copy<'a> {
    /// The guest size.
    size: u64,
    /// The backing file's write granularity.
    cluster: u64,
    /// The image committed (named in its errors).
    path: &'a str,
    /// The backing file (named in its errors).
    base: &'a str,
    /// Progress over the guest size.
    bar: &'a crate::progress::Bar,
}

/// Writes every `cluster`-sized piece of `dst` that overlaps a range the
/// top image allocates itself, with the content `top` shows there;
/// returns the top's allocated ranges.
fn copy_allocated(
    top: &mut dyn Source,
    dst: &mut AnyDev,
    to: &Copy<'_>,
) -> Result<Vec<(u64, u64)>, CliError> {
    let Copy {
        size,
        cluster,
        path,
        base,
        bar,
    } = *to;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let st = top
            .block_status(off, size - off)
            .map_err(|e| CliError::io(path, e.to_string()))?;
        let len = st.len.clamp(1, size - off);
        if st.depth == 0 && st.present {
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == off => *l += len,
                _ => ranges.push((off, len)),
            }
        }
        off += len;
    }
    // Whole clusters are read a batch at a time here and written by a
    // second thread (one write per run of data clusters, one zero write
    // per run of all-zero clusters), so reading the next batch overlaps
    // writing the last one, as qemu-img keeps several requests in
    // flight. Batches stay small enough for the buffer to be still in
    // the CPU cache when it is written: with 4 MiB batches the kernel's
    // copy into the backing file's page cache cost 5x the CPU time.
    // A qcow2 backing file flushes around each run of fresh clusters it
    // allocates: it gets larger batches, so fewer flushes.
    let batch = if cluster > 512 { QCOW2_BATCH } else { BATCH };
    let per = (batch / cluster).max(1);
    let chunk = usize::try_from(per * cluster).unwrap_or(0);
    let mut jobs = Vec::new();
    let mut done_to = 0u64;
    for &(s, l) in &ranges {
        let mut c = (s / cluster * cluster).max(done_to);
        let end = (s + l)
            .next_multiple_of(cluster)
            .min(size.next_multiple_of(cluster));
        while c < end {
            // `c` is cluster-aligned and below `size` rounded up: in range.
            let n = (end - c).min(per * cluster).min(size.saturating_sub(c));
            if n == 0 {
                break;
            }
            jobs.push((c, n));
            c += n;
        }
        done_to = done_to.max(end);
    }
    std::thread::scope(|scope| {
        let (work, todo) = mpsc::sync_channel::<(u64, usize, Vec<u8>)>(BUFFERS);
        let (give_back, returned) = mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> Result<(), String> {
            for (at, n, buf) in todo {
                write_runs(dst, at, buf.get(..n).unwrap_or(&buf), cluster)?;
                // The reader may have stopped (its error is reported).
                let _ = give_back.send(buf);
            }
            Ok(())
        });
        let mut spare: Vec<Vec<u8>> = (0..=BUFFERS).map(|_| vec![0u8; chunk]).collect();
        let mut read = Ok(());
        for (c, n) in jobs {
            let Some(mut buf) = spare.pop().or_else(|| returned.recv().ok()) else {
                break; // the writer stopped: its error follows
            };
            let nu = usize::try_from(n).unwrap_or(0);
            let want = usize::try_from(n.next_multiple_of(512))
                .unwrap_or(nu)
                .min(buf.len());
            if let Err(e) = top.read_at(c, &mut buf[..want]) {
                read = Err(CliError::io(path, e.to_string()));
                break;
            }
            if work.send((c, nu, buf)).is_err() {
                break;
            }
            bar.set(c + n);
        }
        drop(work);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err("the writing thread panicked".into()));
        read?;
        wrote.map_err(|e| CliError::io(base, e))
    })?;
    Ok(ranges)
}

/// Guest bytes read and written in one step: small enough to stay in the
/// CPU cache between the read and the write.
const BATCH: u64 = 128 << 10;

/// Guest bytes written in one step into a qcow2 backing file.
const QCOW2_BATCH: u64 = 4 << 20;

/// Batches queued for the writing thread beyond the one it writes.
const BUFFERS: usize = 2;

/// Writes `data` (guest offset `at`, cluster-aligned) to `dst`: each run
/// of clusters that hold data in one write, each run of all-zero clusters
/// as one zero write.
fn write_runs(dst: &mut AnyDev, at: u64, data: &[u8], cluster: u64) -> Result<(), String> {
    let cu = usize::try_from(cluster).unwrap_or(usize::MAX).max(1);
    let mut i = 0usize;
    while i < data.len() {
        let zero = |k: usize| crate::convert::is_zero(&data[k..(k + cu).min(data.len())]);
        let z = zero(i);
        let mut j = (i + cu).min(data.len());
        while j < data.len() && zero(j) == z {
            j = (j + cu).min(data.len());
        }
        let off = at + i as u64;
        let r = if z {
            dst.write_zeroes(off, (j - i) as u64)
        } else {
            dst.write_at(off, &data[i..j])
        };
        r.map_err(|e| e.to_string())?;
        i = j;
    }
    Ok(())
}
