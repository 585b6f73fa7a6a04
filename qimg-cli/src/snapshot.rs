//! `qimg snapshot`: list, create, apply and delete internal snapshots of
//! a qcow2 image (qemu-img snapshot), with qemu-img's table (or, with
//! `--output json`, the objects of `qemu-img info --output=json`).

use qcow_core::writer::snapshots::NewSnapshot;
use qcow_core::Qcow2Writer;

use crate::cli::{FormatArg, Output};
use crate::CliError;

/// The command line of `qimg snapshot`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true)))]
pub(crate) struct SnapshotCmd {
    /// List the snapshots.
    #[arg(short = 'l', group = "action")]
    list: bool,
    /// Take a snapshot of the current state, named NAME.
    #[arg(short = 'c', value_name = "NAME", group = "action")]
    create: Option<String>,
    /// Revert the image to snapshot NAME (an id or a name).
    #[arg(short = 'a', value_name = "NAME", group = "action")]
    apply: Option<String>,
    /// Delete snapshot NAME (an id or a name).
    #[arg(short = 'd', value_name = "NAME", group = "action")]
    delete: Option<String>,
    /// Image format (only qcow2 has internal snapshots).
    #[arg(short = 'f', value_enum)]
    format: Option<FormatArg>,
    /// Output format of `-l`.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking QEMU's shared locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

impl SnapshotCmd {
    /// Runs `qimg snapshot`.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        let path = self.filename.as_str();
        let format = match self.format {
            Some(f) => f.into(),
            None => crate::image::detect(path)?,
        };
        // qemu-img lists a raw image's (absent) snapshots as nothing at
        // all and exits 0; creating, applying or deleting fails.
        if self.list && format == crate::image::Format::Raw {
            return Ok(0);
        }
        if format != crate::image::Format::Qcow2 {
            return Err(CliError::io(
                path,
                format!("{format} images have no internal snapshots (qcow2 only)"),
            ));
        }
        // qemu-img opens the image with its backing chain: read locks.
        crate::lock::lock_backing_chain(path)?;
        if self.list {
            return self.list(path);
        }
        let dev = crate::create::open_file(path, true)?;
        let mut w =
            Qcow2Writer::open_metadata_only(dev).map_err(|e| CliError::io(path, e.to_string()))?;
        if let Some(name) = &self.create {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // qemu-img takes the time in microseconds.
            let s = NewSnapshot {
                name,
                date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: 0,
                icount: 0,
            };
            w.create_snapshot(&s)
                .map_err(|e| CliError::usage(format!("Could not create snapshot '{name}': {e}")))?;
        } else if let Some(name) = &self.apply {
            w.apply_snapshot(name)
                .map_err(|e| CliError::usage(format!("Could not apply snapshot '{name}': {e}")))?;
        } else if let Some(name) = &self.delete {
            w.delete_snapshot(name)
                .map_err(|e| CliError::usage(format!("Could not delete snapshot '{name}': {e}")))?;
        }
        w.close().map_err(|e| CliError::io(path, e.to_string()))?;
        Ok(0)
    }

    /// `-l`: qemu-img's table, nothing when there are no snapshots.
    fn list(&self, path: &str) -> Result<u8, CliError> {
        let mut opening = crate::qcow2::Opening::open(path)?;
        let snaps = crate::qcow2::snapshots(&mut opening.img, path)?;
        match self.output {
            Output::Json => {
                let v: Vec<serde_json::Value> =
                    snaps.iter().map(crate::info::snapshot_json).collect();
                println!("{}", crate::pretty_json(&serde_json::Value::Array(v)));
            }
            Output::Human if snaps.is_empty() => {}
            Output::Human => {
                println!("Snapshot list:");
                println!("{}", crate::info::snapshot_header());
                for s in &snaps {
                    println!("{}", crate::info::snapshot_row(s));
                }
            }
        }
        Ok(0)
    }
}
