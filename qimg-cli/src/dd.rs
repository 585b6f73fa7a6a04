//! `qimg dd`: copy part of an image into a new one, with `qemu-img dd`'s
//! operands and arithmetic.
//!
//! qemu-img dd reads the input's virtual size (whole sectors), cuts it to
//! `count × bs` bytes when that is smaller, then starts at `skip × bs`:
//! the output (created anew, in `-O` format, its size rounded up to a
//! sector) holds input bytes `skip × bs .. min(size, count × bs)`, so
//! `count` counts from the start of the input, not from `skip`. A `skip`
//! past that end leaves the output empty and prints "cannot skip to
//! specified offset", yet exits 0, as qemu-img 10 does. Every byte is
//! written, zeroes included, as qemu-img does.

use luks_core::io::BlockIo;

use crate::args::SecretArgs;
use crate::convert::CHUNK;
use crate::dev::{erased, AnyDev, Source};
use crate::format::Format;
use crate::image::{self, OpenOptions};
use crate::secret::Secrets;
use crate::CliError;

/// Guest sizes are whole sectors.
const SECTOR: u64 = 512;

/// The largest block size qemu-img accepts.
const MAX_BS: u64 = i32::MAX as u64;

/// The command line of `qimg dd`.
#[derive(Debug, clap::Args)]
pub(crate) struct DdCmd {
    /// Input format; detected from the file when absent.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Output format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    output_format: Format,
    /// Open the input without the write lock (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// `if=INPUT`, `of=OUTPUT` (both required), `bs=BYTES` (block size,
    /// default 512, with k/M/G suffixes), `count=BLOCKS` (copy only the
    /// first BLOCKS blocks of the input), `skip=BLOCKS` (start that many
    /// blocks into the input).
    #[arg(value_name = "OPERAND", required = true)]
    operands: Vec<String>,
}

/// The parsed operands.
#[derive(Debug, PartialEq, Eq)]
struct Operands {
    input: String,
    output: String,
    bs: u64,
    count: Option<u64>,
    skip: u64,
}

fn parse_operands(ops: &[String]) -> Result<Operands, CliError> {
    let (mut input, mut output) = (None, None);
    let mut bs = SECTOR;
    let (mut count, mut skip) = (None, 0u64);
    let blocks = |what: &str, v: &str| -> Result<u64, CliError> {
        let n: i64 = v
            .parse()
            .map_err(|_| CliError::usage(format!("Invalid {what} specified: '{v}'.")))?;
        u64::try_from(n).map_err(|_| {
            CliError::usage(format!(
                "Invalid {what} specified. Must be between 0 and {}.",
                i64::MAX
            ))
        })
    };
    for op in ops {
        let (k, v) = op
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("unrecognized operand {op}")))?;
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => {
                bs = crate::opts::parse_size(v)
                    .map_err(|_| CliError::usage(format!("Invalid bs specified: '{v}'.")))?;
                if !(1..=MAX_BS).contains(&bs) {
                    return Err(CliError::usage(format!(
                        "Invalid bs specified. Must be between 1 and {MAX_BS}."
                    )));
                }
            }
            "count" => count = Some(blocks("count", v)?),
            "skip" => skip = blocks("skip", v)?,
            _ => return Err(CliError::usage(format!("unrecognized operand {k}"))),
        }
    }
    match (input, output) {
        (Some(input), Some(output)) => Ok(Operands {
            input,
            output,
            bs,
            count,
            skip,
        }),
        _ => Err(CliError::usage(
            "Must specify both input and output files".into(),
        )),
    }
}

impl DdCmd {
    /// Runs `qimg dd`.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        let ops = parse_operands(&self.operands)?;
        let secrets = Secrets::parse(&self.secrets.object)?;
        let spec = self.image_opts.spec(&ops.input, self.format)?;
        let mut src = image::open(
            &spec.path,
            &OpenOptions {
                format: spec.format,
                ..OpenOptions::from_args(&self.secrets)
            }
            .with_spec(&spec),
            &secrets,
        )?;
        let in_size = src.virtual_size.next_multiple_of(SECTOR);
        let end = match ops.count {
            Some(c) => c.saturating_mul(ops.bs).min(in_size),
            None => in_size,
        };
        let start = ops.skip.saturating_mul(ops.bs);
        let len = end.saturating_sub(start);
        let out = &ops.output;
        crate::lock::refuse_self_overwrite(
            out,
            &src.files,
            "the input image or a file of its backing chain",
        )?;
        crate::lock::creating_for("error while creating output image: ");
        let mut dst = self.create_output(out, len.next_multiple_of(SECTOR), &secrets)?;
        if start > end {
            // qemu-img reports this but still exits 0, with the empty
            // output left in place; qimg does the same for scripts that
            // depend on it.
            eprintln!("qimg: {}: cannot skip to specified offset", ops.input);
            return Ok(0);
        }
        copy_range(src.dev.as_mut(), &mut dst, start, len)
            .map_err(|(file, e)| CliError::io(if file { out } else { &ops.input }, e))?;
        dst.flush().map_err(|e| CliError::io(out, e.to_string()))?;
        Ok(0)
    }

    /// Creates the output image of `size` bytes.
    fn create_output(&self, path: &str, size: u64, secrets: &Secrets) -> Result<AnyDev, CliError> {
        match self.output_format {
            Format::Raw => {
                let mut f = crate::lock::create_locked(path)?;
                f.set_size(size)
                    .map_err(|e| CliError::io(path, e.to_string()))?;
                Ok(erased(f))
            }
            Format::Qcow2 => {
                let opts = crate::opts::OptionMap::parse::<&str>(&[])
                    .map_err(|e| CliError::usage(e.to_string()))?;
                let c = crate::create::Qcow2Create::parse(&opts, None, None)?;
                let mut w = c.create(path, size, secrets)?;
                // A new file that nobody else sees yet: one flush at the end.
                w.set_write_barriers(false);
                Ok(erased(w))
            }
            Format::Luks => Err(CliError::usage(format!(
                "{path}: dd cannot create LUKS output (it takes no encryption options); \
                 use `qimg convert -O luks`"
            ))),
        }
    }
}

/// Copies `len` bytes of `src` from `start` to `dst` at 0, every byte
/// written. The source is read in whole sectors through a bounce buffer
/// (`start` need not be aligned); the last piece is zero-padded to a
/// sector. Errors say whether the output (true) or the input failed.
fn copy_range(
    src: &mut dyn Source,
    dst: &mut AnyDev,
    start: u64,
    len: u64,
) -> Result<(), (bool, String)> {
    // Room for a chunk plus the sector-alignment slack at both ends.
    let lead = start % SECTOR;
    let mut bounce = vec![0u8; CHUNK + 1024];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64);
        let from = start + done;
        let aligned = from - lead;
        let span = (lead + n).next_multiple_of(SECTOR);
        let span_u = usize::try_from(span).unwrap_or(bounce.len());
        src.read_at(aligned, &mut bounce[..span_u])
            .map_err(|e| (false, e.to_string()))?;
        let lead_u = usize::try_from(lead).unwrap_or(0);
        let n_u = usize::try_from(n).unwrap_or(0);
        let out_len = n.next_multiple_of(SECTOR);
        let out_u = usize::try_from(out_len).unwrap_or(n_u);
        // The piece, moved to the buffer's start and zero-padded.
        bounce.copy_within(lead_u..lead_u + n_u, 0);
        bounce[n_u..out_u].fill(0);
        dst.write_at(done, &bounce[..out_u])
            .map_err(|e| (true, e.to_string()))?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(list: &[&str]) -> Result<Operands, CliError> {
        let v: Vec<String> = list.iter().map(|s| (*s).to_string()).collect();
        parse_operands(&v)
    }

    #[test]
    fn operands_parse_like_qemu_img() {
        let o = ops(&["bs=4k", "count=3", "count=5", "skip=2", "if=a", "of=b"]).unwrap();
        assert_eq!(
            o,
            Operands {
                input: "a".into(),
                output: "b".into(),
                bs: 4096,
                count: Some(5),
                skip: 2,
            }
        );
        for (bad, msg) in [
            (&["bs=0", "if=a", "of=b"][..], "Must be between 1 and"),
            (
                &["bs=1x", "if=a", "of=b"][..],
                "Invalid bs specified: '1x'.",
            ),
            (
                &["count=1k", "if=a", "of=b"][..],
                "Invalid count specified: '1k'.",
            ),
            (&["count=-1", "if=a", "of=b"][..], "Must be between 0 and"),
            (&["foo=1", "if=a", "of=b"][..], "unrecognized operand foo"),
            (&["if=a"][..], "Must specify both input and output files"),
        ] {
            let e = ops(bad).unwrap_err();
            assert!(e.msg.contains(msg), "{bad:?}: {}", e.msg);
        }
    }
}
