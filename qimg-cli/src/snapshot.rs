//! `qimg snapshot`: list, create, apply and delete internal snapshots of
//! a qcow2 image (qemu-img snapshot), with qemu-img's table (or, with
//! `--output json`, the objects of `qemu-img info --output=json`).

use qcow_core::writer::snapshots::{NewSnapshot, SnapshotEntry};
use qcow_core::Qcow2Writer;

use crate::args::Output;
use crate::format::Format;
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
    format: Option<Format>,
    /// Output format of `-l`.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking QEMU's shared locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Secrets for a LUKS volume (`-l` opens it to list its none).
    #[command(flatten)]
    secrets: crate::args::SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image (or option list, with --image-opts).
    filename: String,
}

impl SnapshotCmd {
    /// Runs `qimg snapshot`.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        // qemu-img's snapshot opens no backing file: no backing keys.
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        spec.refuse_backing_keys()?;
        let path = spec.path.as_str();
        let format = spec.resolve(None)?;
        // qemu-img lists a raw image's (absent) snapshots as nothing at
        // all and exits 0; creating, applying or deleting fails.
        if self.list && format == crate::format::Format::Raw {
            return Ok(0);
        }
        // A LUKS volume: qemu-img 10 knows LUKS1 only. It probes a LUKS2
        // volume as raw (nothing listed, exit 0) and fails to open a LUKS1
        // one (or anything given `-f luks`) without a key-secret (exit 1).
        if self.list && format == crate::format::Format::Luks {
            // (An unreadable header is not LUKS2 here: the open below
            // reports it.)
            if spec.format.is_none() && crate::format::luks_version(path).ok().flatten() == Some(2)
            {
                return Ok(0);
            }
            // Given a secret (as qemu-img given `key-secret`), the volume
            // is opened, the passphrase checked, and nothing listed.
            if !self.secrets.object.is_empty() || self.secrets.key_file.is_some() {
                let secrets = crate::secret::Secrets::parse(&self.secrets.object)?;
                let opts = crate::image::OpenOptions {
                    format: Some(format),
                    ..crate::image::OpenOptions::from_args(&self.secrets.with_spec(&spec))
                };
                crate::image::open(path, &opts, &secrets)?;
                return Ok(0);
            }
            return Err(CliError::io(
                path,
                "Could not open: Parameter 'key-secret' is required for cipher \
                 (as qemu-img; a LUKS volume has no internal snapshots)"
                    .to_string(),
            ));
        }
        if format != crate::format::Format::Qcow2 {
            return Err(CliError::io(
                path,
                format!("{format} images have no internal snapshots (qcow2 only)"),
            ));
        }
        // qemu-img opens the image with its backing chain: read locks.
        crate::chain_lock::lock_backing_chain(path)?;
        if self.list {
            return self.list(path);
        }
        let dev = crate::file::open_file(path, true)?;
        let mut w =
            Qcow2Writer::open_metadata_only(dev).map_err(|e| CliError::io(path, e.to_string()))?;
        if let Some(name) = &self.create {
            // qemu-img keeps the first 255 bytes of the name (here: up to
            // a character boundary, so the name stays UTF-8).
            let name = cut_name(name);
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
            let fail = |e: &dyn std::fmt::Display| {
                CliError::usage(format!("Could not delete snapshot '{name}': {e}"))
            };
            let list = w.snapshots().map_err(|e| fail(&e))?;
            let i = find_for_delete(&list, name).map_err(|e| fail(&e))?;
            w.delete_snapshot_at(i)
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
                    snaps.iter().map(crate::image_info::snapshot_json).collect();
                println!("{}", crate::pretty_json(&serde_json::Value::Array(v)));
            }
            Output::Human if snaps.is_empty() => {}
            Output::Human => {
                println!("Snapshot list:");
                println!("{}", crate::image_info::snapshot_header());
                for s in &snaps {
                    println!("{}", crate::image_info::snapshot_row(s));
                }
            }
        }
        Ok(0)
    }
}

/// `name` cut to the 255 bytes `qemu-img snapshot -c` keeps, at a
/// character boundary.
fn cut_name(name: &str) -> &str {
    let mut end = name.len().min(qcow_core::snapshot::SHOWN_NAME_LEN);
    while !name.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    name.get(..end).unwrap_or(name)
}

/// The index of the snapshot `qemu-img snapshot -d key` deletes: the first
/// whose name, as qemu-img lists it (at most 255 bytes), is `key` (ids do
/// not count); then the one with that listed id and whole name, which
/// fails when the real name or id is longer than qemu-img lists.
fn find_for_delete(list: &[SnapshotEntry], key: &str) -> Result<usize, &'static str> {
    use qcow_core::snapshot::{shown, SHOWN_ID_LEN, SHOWN_NAME_LEN};
    let listed = list
        .iter()
        .find(|s| shown(&s.name, SHOWN_NAME_LEN) == key.as_bytes())
        .ok_or("snapshot not found")?;
    let (id, name) = (
        shown(&listed.id, SHOWN_ID_LEN),
        shown(&listed.name, SHOWN_NAME_LEN),
    );
    list.iter()
        .position(|s| s.id == id && s.name == name)
        .ok_or("Can't find the snapshot")
}
