//! `qimg resize`.

use luks_core::io::BlockIo;

use crate::format::Format;
use crate::image;
use crate::opts::parse_size;
use crate::CliError;

/// Runs `qimg resize FILE [+|-]SIZE`.
pub(crate) fn run(
    path: &str,
    format: Option<Format>,
    shrink: bool,
    quiet: bool,
    size: &str,
) -> Result<u8, CliError> {
    crate::lock::will_write(path);
    let format = crate::format::resolve(path, format, None)?;
    if format == Format::Qcow2 {
        crate::chain_lock::lock_backing_chain(path)?;
    }
    let current = match format {
        Format::Raw => crate::file::file_length(path)?,
        Format::Qcow2 => crate::qcow2::Opening::open(path)?.img.info().virtual_size(),
        Format::Luks => {
            return Err(CliError::usage(format!(
                "{path}: resizing LUKS volumes is not supported; resize the device underneath"
            )))
        }
    };
    let bad = |e: crate::opts::OptError| CliError::usage(e.to_string());
    let new = if let Some(d) = size.strip_prefix('+') {
        current
            .checked_add(parse_size(d).map_err(bad)?)
            .ok_or_else(|| CliError::usage(format!("{path}: the new size overflows")))?
    } else if let Some(d) = size.strip_prefix('-') {
        current
            .checked_sub(parse_size(d).map_err(bad)?)
            .ok_or_else(|| CliError::usage(format!("{path}: cannot shrink below zero bytes")))?
    } else {
        parse_size(size).map_err(bad)?
    };
    if new < current && !shrink {
        return Err(CliError::usage(format!(
            "{path}: Use the --shrink option to perform a shrink operation (data past the new end is lost)"
        )));
    }
    let open_rw = || crate::file::open_file(path, true);
    match format {
        Format::Raw => {
            image::warn_if_raw_looks_formatted(path);
            let mut dev = open_rw()?;
            dev.set_size(new)
                .map_err(|e| CliError::io(path, e.to_string()))?;
        }
        Format::Qcow2 => {
            let mut w = crate::create::open_qcow2_writer(path)?;
            w.resize(new)
                .map_err(|e| CliError::io(path, e.to_string()))?;
            w.close().map_err(|e| CliError::io(path, e.to_string()))?;
        }
        Format::Luks => {}
    }
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}

/// The command line of `qimg resize`.
#[derive(Debug, clap::Args)]
pub(crate) struct ResizeCmd {
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<crate::format::Format>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image (or option list, with --image-opts).
    filename: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

impl ResizeCmd {
    /// Runs `qimg resize`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        let format = spec.resolve_for_io(None)?;
        run(
            &spec.path,
            Some(format),
            self.shrink,
            self.quiet,
            &self.size,
        )
    }
}
