//! `qimg map`: where each guest range lives, in qemu-img's two layouts.

use crate::args::{Output, SecretArgs};
use crate::dev::BlockStatus;
use crate::image::{self, OpenOptions};
use crate::secret::Secrets;
use crate::CliError;

/// One merged map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Guest offset.
    pub(crate) start: u64,
    /// Status of `status.len` bytes from `start`.
    pub(crate) status: BlockStatus,
}

/// Whether `b` continues `a` with the same status (host offsets contiguous).
fn continues(a: &Entry, b: &BlockStatus) -> bool {
    let s = &a.status;
    s.depth == b.depth
        && s.present == b.present
        && s.zero == b.zero
        && s.data == b.data
        && s.compressed == b.compressed
        && match (s.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => x.checked_add(s.len) == Some(y),
            _ => false,
        }
}

/// Walks the whole image, merging runs, as qemu-img map does.
pub(crate) fn entries(src: &mut dyn crate::dev::Source, size: u64) -> Result<Vec<Entry>, CliError> {
    let mut out: Vec<Entry> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let st = src
            .block_status(off, size - off)
            .map_err(|e| CliError::usage(e.to_string()))?;
        let st = BlockStatus {
            len: st.len.clamp(1, size - off),
            ..st
        };
        match out.last_mut() {
            Some(last) if continues(last, &st) => last.status.len += st.len,
            _ => out.push(Entry {
                start: off,
                status: st,
            }),
        }
        off += st.len;
    }
    Ok(out)
}

/// One line of `--output json`, in qemu-img's spelling.
pub(crate) fn json_line(e: &Entry) -> String {
    let s = &e.status;
    let mut line = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, s.len, s.depth, s.present, s.zero, s.data, s.compressed
    );
    if let Some(o) = s.offset {
        line.push_str(&format!(", \"offset\": {o}"));
    }
    line.push('}');
    line
}

/// C's `%#x`: `0` for zero, `0x..` otherwise.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Runs `qimg map`.
pub(crate) fn run(
    spec: &crate::image_spec::ImageSpec,
    output: Output,
    args: &SecretArgs,
) -> Result<u8, CliError> {
    let filename = spec.path.as_str();
    let secrets = Secrets::parse(&args.object)?;
    let mut img = image::open(
        filename,
        &OpenOptions {
            format: spec.format,
            ..OpenOptions::from_args(args)
        }
        .with_spec(spec),
        &secrets,
    )?;
    let list = entries(img.dev.as_mut(), img.virtual_size)?;
    match output {
        Output::Json => {
            let lines: Vec<String> = list.iter().map(json_line).collect();
            println!("[{}]", lines.join(",\n"));
        }
        Output::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            // As qemu-img: data that reads as zero (a hole of a
            // metadata-preallocated image or of its data file) is left out.
            for e in list.iter().filter(|e| e.status.data && !e.status.zero) {
                if let Some(o) = e.status.offset {
                    let file = img
                        .chain
                        .get(e.status.depth as usize)
                        .map_or(filename, String::as_str);
                    println!(
                        "{:<16}{:<16}{:<16}{}",
                        alt_hex(e.start),
                        alt_hex(e.status.len),
                        alt_hex(o),
                        file
                    );
                }
            }
        }
    }
    Ok(0)
}

/// The command line of `qimg map`.
#[derive(Debug, clap::Args)]
pub(crate) struct MapCmd {
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<crate::format::Format>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Open without taking QEMU's shared locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image file (or option list, with --image-opts).
    filename: String,
}

impl MapCmd {
    /// Runs `qimg map`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        run(&spec, self.output, &self.secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_match_qemu_img_spelling() {
        let e = Entry {
            start: 0,
            status: BlockStatus {
                len: 4096,
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: Some(0),
            },
        };
        assert_eq!(
            json_line(&e),
            "{ \"start\": 0, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 0}"
        );
        assert_eq!(alt_hex(0), "0");
        assert_eq!(alt_hex(4096), "0x1000");
    }
}
