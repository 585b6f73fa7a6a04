//! `qimg create`.

use std::path::Path;

use luks_core::io::{BlockIo, FileDevice};

use crate::cli::{FormatArg, SecretArgs};
use crate::opts::{parse_size, OptionMap};
use crate::CliError;

/// Runs `qimg create`.
pub(crate) fn run(
    format: FormatArg,
    options: &[String],
    quiet: bool,
    secrets: &SecretArgs,
    filename: &str,
    size: Option<&str>,
) -> Result<u8, CliError> {
    let opts = OptionMap::parse(options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    let size = match size {
        Some(s) => parse_size(s).map_err(|e| CliError::usage(e.to_string()))?,
        None => opts
            .get_size("size")
            .map_err(|e| CliError::usage(e.to_string()))?
            .ok_or_else(|| {
                CliError::usage(format!("{filename}: image creation needs a size parameter"))
            })?,
    };
    match format {
        FormatArg::Raw => create_raw(&opts, filename, size)?,
        FormatArg::Luks => {
            let s = crate::secret::Secrets::parse(&secrets.object)?;
            crate::luks::create(filename, &opts, &s, secrets.key_file.as_deref(), size)?
        }
        FormatArg::Qcow2 => {
            return Err(CliError::usage(
                "creating qcow2 images is not available in this build yet; use qemu-img create"
                    .into(),
            ));
        }
    }
    if !quiet {
        println!(
            "Formatting '{filename}', fmt={} size={size}",
            format_name(format)
        );
    }
    Ok(0)
}

fn format_name(f: FormatArg) -> &'static str {
    match f {
        FormatArg::Qcow2 => "qcow2",
        FormatArg::Raw => "raw",
        FormatArg::Luks => "luks",
    }
}

fn create_raw(opts: &OptionMap, filename: &str, size: u64) -> Result<(), CliError> {
    let prealloc = opts.get("preallocation").unwrap_or("off").to_string();
    opts.reject_unused("raw")
        .map_err(|e| CliError::usage(e.to_string()))?;
    let mut dev = FileDevice::create(Path::new(filename))
        .map_err(|e| CliError::io(filename, format!("cannot create: {e}")))?;
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
