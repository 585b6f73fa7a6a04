//! `qimg info`: qemu-img's keys and layout, for people and scripts.

use serde_json::Value;

use crate::args::{Output, SecretArgs};
use crate::format::Format;
use crate::image_info::ImageInfo;
use crate::CliError;

/// Runs `qimg info`.
pub(crate) fn run(
    filename: &str,
    format: Option<Format>,
    output: Output,
    backing_chain: bool,
    secrets: &SecretArgs,
) -> Result<u8, CliError> {
    let mut chain = Vec::new();
    let mut next = Some((filename.to_string(), format));
    let mut seen = std::collections::BTreeSet::new();
    while let Some((name, fmt)) = next.take() {
        let canon = std::fs::canonicalize(&name).unwrap_or_else(|_| name.clone().into());
        if !seen.insert(canon) {
            return Err(CliError::io(
                &name,
                "the backing chain loops back to this file; fix it with `qimg rebase -u`".into(),
            ));
        }
        if chain.len() >= crate::image::MAX_CHAIN_DEPTH {
            return Err(crate::image::too_deep(&name));
        }
        // Each image shown keeps its lock descriptor until exit.
        crate::image::ensure_fds(chain.len(), &name)?;
        let info = crate::image::info(&name, fmt, secrets)?;
        if backing_chain {
            next = info.full_backing_filename.clone().map(|b| {
                let f = info.backing_format.as_deref().and_then(Format::parse);
                (b, f)
            });
        }
        chain.push(info);
    }
    match output {
        Output::Json => {
            let v = if backing_chain {
                Value::Array(chain.iter().map(ImageInfo::to_json).collect())
            } else {
                chain[0].to_json()
            };
            println!("{}", crate::pretty_json(&v));
        }
        Output::Human => {
            let texts: Vec<String> = chain.iter().map(ImageInfo::to_human).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(0)
}

/// The command line of `qimg info`.
#[derive(Debug, clap::Args)]
pub(crate) struct InfoCmd {
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<crate::format::Format>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Open without taking QEMU's shared locks, so an image another
    /// process writes can be read (its content may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image file (or option list, with --image-opts).
    filename: String,
}

impl InfoCmd {
    /// Runs `qimg info`.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        crate::lock::set_reads_without_io(true);
        // qemu-img's info opens no backing file, so takes no backing keys.
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        spec.refuse_backing_keys()?;
        let format = spec.resolve(self.secrets.header.as_deref())?;
        if format == Format::Qcow2 && spec.text.is_some() {
            let img = crate::qcow2::Opening::open(&spec.path)?.img;
            spec.check_encryption(img.info().header.crypt_method)?;
        }
        run(
            &spec.path,
            Some(format),
            self.output,
            self.backing_chain,
            &self.secrets,
        )
    }
}
