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
        let size = old.virtual_size;
        let cs = w.header().cluster_size();
        let cs_usize = usize::try_from(cs).unwrap_or(0);
        let (mut a, mut b) = (vec![0u8; cs_usize], vec![0u8; cs_usize]);
        let bar = crate::progress::Bar::new(show, size);
        let mut off = 0u64;
        while off < size {
            bar.set(off);
            let n = cs.min(size - off);
            let nu = usize::try_from(n).unwrap_or(0);
            let st = old
                .dev
                .block_status(off, n)
                .map_err(|e| CliError::io(path, e.to_string()))?;
            let own = st.depth == 0 && st.present && st.len >= n;
            if !own {
                old.dev
                    .read_at(off, &mut a[..nu])
                    .map_err(|e| CliError::io(path, e.to_string()))?;
                b[..nu].fill(0);
                if let Some((name, dev, bsize)) = new_view.as_mut() {
                    if off < *bsize {
                        // Whole sectors; past the new backing's end is zero.
                        let m = usize::try_from((*bsize - off).min(n).next_multiple_of(512))
                            .unwrap_or(nu)
                            .min(nu);
                        dev.read_at(off, &mut b[..m])
                            .map_err(|e| CliError::io(name, e.to_string()))?;
                        if (*bsize - off) < n {
                            let keep = usize::try_from(*bsize - off).unwrap_or(nu);
                            b[keep..nu].fill(0);
                        }
                    }
                }
                if a[..nu] != b[..nu] {
                    w.write(off, &a[..nu])
                        .map_err(|e| CliError::io(path, e.to_string()))?;
                }
            }
            off += n;
        }
        w.close().map_err(|e| CliError::io(path, e.to_string()))?;
        Ok(bar)
    }
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
