//! `qimg rebase`: point a qcow2 image at another backing file (qemu-img
//! rebase).
//!
//! `-u` (unsafe) only rewrites the backing file name and format. The safe
//! mode first keeps the guest content unchanged: every cluster the image
//! does not fully allocate itself is read through the old backing chain
//! and through the new backing file; where they differ, the old content
//! is written into the image. Then the name changes.

use luks_core::io::FileDevice;
use qcow_core::Qcow2Writer;

use crate::args::SecretArgs;
use crate::cache::CacheMode;
use crate::dev::Source;
use crate::format::Format;
use crate::image::{self, OpenOptions};
use crate::secret::Secrets;
use crate::CliError;

/// The command line of `qimg rebase`.
#[derive(Debug, clap::Args)]
pub(crate) struct RebaseCmd {
    /// Image format (qcow2).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Unsafe: change the backing file name only, without keeping the
    /// guest content (for a backing file that was moved or renamed).
    #[arg(short = 'u')]
    unsafe_: bool,
    /// The new backing file (`""` removes it, making the image standalone
    /// in safe mode). A relative name is relative to the image's folder.
    #[arg(short = 'b', value_name = "BACKING", required = true)]
    backing: String,
    /// Format of the new backing file (required with a backing file).
    #[arg(short = 'F', value_name = "FMT")]
    backing_fmt: Option<String>,
    /// Show progress: qemu-img's `    (NN.NN/100%)` lines on standard
    /// output when it is not a terminal, else a bar (`-q` wins).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of the image and its old backing chain (none,
    /// directsync, writethrough, writeback: the default, unsafe).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the new backing file (default writeback).
    #[arg(short = 'T', long = "backing-cache", value_name = "CACHE")]
    backing_cache: Option<String>,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image.
    filename: String,
}

impl RebaseCmd {
    /// Runs `qimg rebase`.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        let path = spec.path.as_str();
        let cache = CacheMode::target(self.cache.as_deref(), CacheMode::Writeback)?;
        let backing_cache = CacheMode::source(self.backing_cache.as_deref())?;
        qcow2_only(path, spec.format)?;
        spec.check_opened(Format::Qcow2, path)?;
        crate::lock::will_write(path);
        let new = (!self.backing.is_empty()).then_some(self.backing.as_str());
        let fail = |why: String| {
            CliError::usage(format!(
                "Could not change the backing file to '{}': {why}",
                self.backing
            ))
        };
        let new_fmt = match (new, self.backing_fmt.as_deref()) {
            (None, _) => None,
            (Some(_), None) => return Err(fail("backing format must be specified".into())),
            (Some(_), Some(f @ ("qcow2" | "raw"))) => Some(f),
            (Some(_), Some(f)) => {
                return Err(fail(format!(
                    "backing format '{f}' is not supported (qcow2 or raw)"
                )))
            }
        };
        if let Some(b) = new {
            let full = image::resolve_backing(path, b)
                .to_string_lossy()
                .into_owned();
            let fmt = new_fmt.and_then(Format::parse).unwrap_or(Format::Qcow2);
            // qemu-img rebase -u reads the new backing file with
            // force-share; the safe mode locks it for reading.
            if self.unsafe_ {
                crate::lock::set_force_share(true);
            }
            crate::chain_lock::refuse_backing_loop(path, &full, fmt)?;
        }
        let show = self.progress && !self.quiet;
        let bar = if self.unsafe_ {
            crate::progress::Bar::new(show, 0)
        } else {
            self.keep_content(&spec, new, new_fmt, cache, backing_cache, show)?
        };
        let mut w = open_metadata_writer(path, cache)?;
        w.set_backing(new, new_fmt)
            .map_err(|e| fail(e.to_string()))?;
        w.close().map_err(|e| CliError::io(path, e.to_string()))?;
        bar.finish();
        Ok(0)
    }

    /// Safe mode: writes into the image every cluster it does not allocate
    /// whose content differs between the old chain and the new backing.
    /// Returns the progress display (`show`: `-p`), not yet finished.
    fn keep_content(
        &self,
        spec: &crate::image_spec::ImageSpec,
        new: Option<&str>,
        fmt: Option<&str>,
        cache: CacheMode,
        backing_cache: CacheMode,
        show: bool,
    ) -> Result<crate::progress::Bar, CliError> {
        let path = spec.path.as_str();
        let secrets = Secrets::parse(&self.secrets.object)?;
        let mut old = image::open(
            path,
            &OpenOptions {
                format: Some(Format::Qcow2),
                cache,
                ..OpenOptions::from_args(&self.secrets)
            }
            .with_spec(spec),
            &secrets,
        )?;
        let mut new_view: Option<(String, Box<dyn Source>, u64)> = match new {
            Some(b) => {
                let full = image::resolve_backing(path, b)
                    .to_string_lossy()
                    .into_owned();
                let f = fmt.and_then(Format::parse).unwrap_or(Format::Qcow2);
                let o = image::open(
                    &full,
                    &OpenOptions {
                        format: Some(f),
                        cache: backing_cache,
                        ..OpenOptions::default()
                    },
                    &secrets,
                )
                .map_err(|e| CliError {
                    // qemu-img's words when the new backing file is locked.
                    msg: e
                        .msg
                        .replacen("Could not open '", "Could not open new backing file '", 1),
                    ..e
                })?;
                Some((full, o.dev, o.virtual_size))
            }
            None => None,
        };
        let dev = crate::file::open_file_cached(path, true, cache)?;
        let mut w = Qcow2Writer::open(dev).map_err(|e| {
            CliError::io(path, format!("{e}; `qimg rebase -u` changes only the name"))
        })?;
        // Closed once at the end: runs of fresh clusters keep their L2
        // entries until then (refcounts and data flushed first).
        w.defer_fresh_entries(true)
            .map_err(|e| CliError::io(path, e.to_string()))?;
        let size = old.virtual_size;
        let cs = w.header().cluster_size();
        // Chunks of whole clusters: each run of clusters the image does not
        // own is read once from the old chain and once from the new
        // backing, and each run of clusters that differ is written with
        // one `write` (whose fresh clusters share two flushes).
        let chunk = (CHUNK / cs).max(1) * cs;
        let piece = (PIECE / cs).max(1) * cs;
        let (mut a, mut b) = (vec![0u8; to_usize(chunk)], vec![0u8; to_usize(piece)]);
        let mut diff: Vec<bool> = Vec::new();
        let bar = crate::progress::Bar::new(show, size);
        let mut status = Status::default();
        let mut off = 0u64;
        while off < size {
            bar.set(off);
            let end = (off + chunk).min(size);
            let mut c = off;
            while c < end {
                // The run of clusters from `c` the image does not own, and
                // whether the old chain reads all of it as zero.
                let (mut e, mut old_zero) = (c, true);
                while e < end {
                    let n = cs.min(size - e);
                    let (own, zero) = status
                        .of(old.dev.as_mut(), e, n, end)
                        .map_err(|err| CliError::io(path, err.to_string()))?;
                    if own {
                        break;
                    }
                    old_zero &= zero;
                    e += n;
                }
                if e > c {
                    let (i, j) = (to_usize(c - off), to_usize(e - off));
                    if old_zero {
                        a[i..j].fill(0);
                    } else {
                        old.dev
                            .read_at(c, &mut a[i..j])
                            .map_err(|err| CliError::io(path, err.to_string()))?;
                    }
                    // The new backing, a piece at a time, against it.
                    diff.clear();
                    let mut p = c;
                    while p < e {
                        let q = (p + piece).min(e);
                        let bb = &mut b[..to_usize(q - p)];
                        let new_zero = read_new(new_view.as_mut(), p, bb)?;
                        let aa = &a[to_usize(p - off)..to_usize(q - off)];
                        for (x, y) in aa.chunks(to_usize(cs)).zip(bb.chunks(to_usize(cs))) {
                            diff.push(!(old_zero && new_zero) && x != y);
                        }
                        p = q;
                    }
                    write_differing(&mut w, path, c, cs, &a[i..j], &diff)?;
                }
                // Skip the owned cluster that ended the run.
                c = if e < end { e + cs.min(size - e) } else { e };
            }
            off = end;
        }
        w.close().map_err(|e| CliError::io(path, e.to_string()))?;
        Ok(bar)
    }
}

/// Guest bytes of the old chain read per step of a safe rebase: big
/// enough that a run of differing clusters is written in few `write`
/// calls (each with its own two flushes), small enough to keep the peak
/// memory below qemu-img's.
const CHUNK: u64 = 4 << 20;

/// Guest bytes of the new backing file read at a time to compare.
const PIECE: u64 = 512 << 10;

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The last block status of the old chain, reused for the clusters it
/// covers whole (one query per run, not per cluster).
#[derive(Default)]
struct Status {
    /// `[start, end)` of the run, and whether the image owns it and
    /// whether it reads as zero.
    run: Option<(u64, u64, bool, bool)>,
}

impl Status {
    /// Whether the image itself allocates the whole cluster `[at, at +
    /// n)`, and whether the cluster reads as zero; a cluster two runs
    /// share is neither. `limit`: the end of the current step.
    fn of(
        &mut self,
        old: &mut dyn Source,
        at: u64,
        n: u64,
        limit: u64,
    ) -> Result<(bool, bool), crate::dev::DevError> {
        let inside = |r: &(u64, u64, bool, bool)| r.0 <= at && at < r.1;
        if !self.run.as_ref().is_some_and(inside) {
            let st = old.block_status(at, limit.saturating_sub(at).max(n))?;
            let own = st.depth == 0 && st.present;
            let zero = st.zero || !st.present;
            self.run = Some((at, at + st.len.max(1), own, zero));
        }
        match self.run {
            Some((_, end, own, zero)) if at + n <= end => Ok((own, zero)),
            _ => {
                // The cluster straddles two runs: read it.
                self.run = None;
                Ok((false, false))
            }
        }
    }
}

/// Reads `buf.len()` bytes at `off` of the new backing file (`None`: no
/// backing file, all zero); past its end reads as zero. What its block
/// status reports as zero is not read. Returns whether all of it is zero
/// by that status (or absent).
fn read_new(
    new: Option<&mut (String, Box<dyn Source>, u64)>,
    off: u64,
    buf: &mut [u8],
) -> Result<bool, CliError> {
    let Some((name, dev, bsize)) = new else {
        buf.fill(0);
        return Ok(true);
    };
    let len = buf.len() as u64;
    let in_file = bsize.saturating_sub(off).min(len);
    buf[to_usize(in_file)..].fill(0);
    let mut all_zero = true;
    let mut x = 0u64;
    while x < in_file {
        let st = dev
            .block_status(off + x, in_file - x)
            .map_err(|e| CliError::io(name.as_str(), e.to_string()))?;
        let n = st.len.clamp(1, in_file - x);
        let (i, j) = (to_usize(x), to_usize(x + n));
        if st.zero {
            buf[i..j].fill(0);
        } else {
            all_zero = false;
            // Whole sectors (the last may pass the file's end: zero there).
            let m = to_usize((x + n).next_multiple_of(512).min(len));
            dev.read_at(off + x, &mut buf[i..m])
                .map_err(|e| CliError::io(name.as_str(), e.to_string()))?;
            if x + n < in_file || in_file < len {
                buf[j..m].fill(0);
            }
        }
        x += n;
    }
    Ok(all_zero)
}

/// Writes into the image at `at` (cluster-aligned) the clusters of
/// `old` (the old chain's content) that `diff` marks (one flag per
/// cluster): each run of consecutive marked clusters in one write.
fn write_differing(
    w: &mut Qcow2Writer<FileDevice>,
    path: &str,
    at: u64,
    cs: u64,
    old: &[u8],
    diff: &[bool],
) -> Result<(), CliError> {
    let csu = to_usize(cs).max(1);
    let mut k = 0usize;
    while k < diff.len() {
        if !diff[k] {
            k += 1;
            continue;
        }
        let mut l = k + 1;
        while l < diff.len() && diff[l] {
            l += 1;
        }
        let (i, j) = ((k * csu).min(old.len()), (l * csu).min(old.len()));
        w.write(at + i as u64, &old[i..j])
            .map_err(|e| CliError::io(path, e.to_string()))?;
        k = l;
    }
    Ok(())
}

/// Refuses `path` unless it is a qcow2 image (`format`, or detected):
/// only qcow2 images have a backing file (`commit`, `rebase`).
pub(crate) fn qcow2_only(path: &str, format: Option<Format>) -> Result<(), CliError> {
    let format = crate::format::resolve(path, format, None)?;
    if format != Format::Qcow2 {
        return Err(CliError::io(
            path,
            format!("{format} images have no backing file (qcow2 only)"),
        ));
    }
    Ok(())
}

/// Opens the qcow2 image `path` for metadata changes only (backing file
/// name, unmapping clusters): no key is needed. `cache`: `-t`.
pub(crate) fn open_metadata_writer(
    path: &str,
    cache: CacheMode,
) -> Result<Qcow2Writer<FileDevice>, CliError> {
    let dev = crate::file::open_file_cached(path, true, cache)?;
    Qcow2Writer::open_metadata_only(dev).map_err(|e| CliError::io(path, e.to_string()))
}
