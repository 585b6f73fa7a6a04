//! `qimg measure`: how large a new image would be, as `qemu-img measure`
//! reports it.
//!
//! For a qcow2 target the metadata comes from the format's arithmetic
//! (`qcow_core::measure`: cluster 0, L1, L2 tables, refcount blocks and
//! table counting everything including themselves, the LUKS region).
//! "Fully allocated" adds every data cluster; "required" adds only the
//! target clusters the source has data in (found by block status, so holes
//! and zero ranges cost nothing), or every cluster with
//! `preallocation=full|falloc`. The metadata in "required" is still the
//! fully allocated one, an overestimate qemu-img makes too. "bitmaps size"
//! (a qcow2 source into a qcow2 target) is what the source's persistent
//! bitmaps would take at the target's cluster size. A LUKS target is its
//! header and key material (as `create -f luks` lays them out) plus the
//! payload.

use serde_json::json;

use crate::args::{Output, SecretArgs};
use crate::format::Format;
use crate::image::{self, OpenOptions};
use crate::opts::{parse_size, OptionMap};
use crate::secret::Secrets;
use crate::CliError;

/// Guest sizes are whole sectors.
const SECTOR: u64 = 512;

/// The command line of `qimg measure`.
#[derive(Debug, clap::Args)]
pub(crate) struct MeasureCmd {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Format of the image to measure for.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    output_format: Format,
    /// Options of the image to measure for (`-o key=value,...`, as
    /// `create`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure a new empty image of this virtual size instead of a copy of
    /// FILE.
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Format of FILE; detected from the file when absent.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Measure FILE as of an internal snapshot.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Read without taking QEMU's shared locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image whose copy is measured.
    filename: Option<String>,
}

/// What the source contributes.
struct SourceFacts {
    /// Virtual size, whole sectors.
    size: u64,
    /// `--size` as given (qemu-img's LUKS measure does not round it), or
    /// the source's size in whole sectors.
    given_size: u64,
    /// Data ranges (start, length) in guest order.
    data: Vec<(u64, u64)>,
    /// Persistent bitmaps of a qcow2 source: (granularity, name length).
    bitmaps: Option<Vec<(u64, usize)>>,
}

impl MeasureCmd {
    /// Runs `qimg measure`.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        let source = match (&self.size, &self.filename) {
            (Some(_), Some(_)) => {
                return Err(CliError::usage(
                    "--size N cannot be used together with a filename".into(),
                ))
            }
            (None, None) => {
                return Err(CliError::usage(
                    "Either --size N or one filename must be specified".into(),
                ))
            }
            (Some(s), None) => {
                let given = parse_size(s).map_err(|e| CliError::usage(format!("--size: {e}")))?;
                SourceFacts {
                    size: given.next_multiple_of(SECTOR),
                    given_size: given,
                    data: Vec::new(),
                    bitmaps: None,
                }
            }
            (None, Some(f)) => self.scan(f)?,
        };
        let opts =
            OptionMap::parse(&self.options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
        let (required, fully, bitmaps) = match self.output_format {
            Format::Raw => {
                // Checked as qemu-img does, without effect on the numbers.
                let _ = opts.get("preallocation");
                opts.reject_unused("raw")
                    .map_err(|e| CliError::usage(e.to_string()))?;
                (source.size, source.size, None)
            }
            Format::Qcow2 => {
                let c = crate::create::Qcow2Create::parse(&opts, None, None)?;
                let m = c.measure(source.size)?;
                let data = if c.preallocates_data() {
                    m.data
                } else {
                    cluster_bytes(&source.data, m.cluster_size)
                };
                let bitmaps = source
                    .bitmaps
                    .as_ref()
                    .map(|b| bitmaps_size(b, source.size, m.cluster_size));
                (
                    m.metadata.saturating_add(data),
                    m.fully_allocated(),
                    bitmaps,
                )
            }
            Format::Luks => {
                // The header and key material, then the payload. No
                // passphrase is needed to know the layout.
                let o = crate::luks_common::CreateOptions::parse(&opts, "")?;
                opts.reject_unused("luks")
                    .map_err(|e| CliError::usage(e.to_string()))?;
                let header = u64::from(crate::create::luks_region_sectors(&o)?) * SECTOR;
                let total = header.saturating_add(source.given_size);
                (total, total, None)
            }
        };
        match self.output {
            Output::Human => {
                println!("required size: {required}");
                println!("fully allocated size: {fully}");
                if let Some(b) = bitmaps {
                    println!("bitmaps size: {b}");
                }
            }
            Output::Json => {
                let mut v = serde_json::Map::new();
                if let Some(b) = bitmaps {
                    v.insert("bitmaps".into(), json!(b));
                }
                v.insert("required".into(), json!(required));
                v.insert("fully-allocated".into(), json!(fully));
                println!("{}", crate::pretty_json(&serde_json::Value::Object(v)));
            }
        }
        Ok(0)
    }

    /// Opens FILE and collects its size, data ranges and bitmaps.
    fn scan(&self, arg: &str) -> Result<SourceFacts, CliError> {
        let secrets = Secrets::parse(&self.secrets.object)?;
        let spec = self.image_opts.spec(arg, self.format)?;
        let path = spec.path.as_str();
        let format = spec.resolve(self.secrets.header.as_deref())?;
        let mut src = image::open(
            path,
            &OpenOptions {
                format: Some(format),
                snapshot: self.snapshot.clone(),
                ..OpenOptions::from_args(&self.secrets)
            }
            .with_spec(&spec),
            &secrets,
        )?;
        let size = src.virtual_size.next_multiple_of(SECTOR);
        let mut data = Vec::new();
        let mut off = 0u64;
        while off < size {
            let st = src
                .dev
                .block_status(off, size - off)
                .map_err(|e| CliError::io(path, e.to_string()))?;
            let len = st.len.clamp(1, size - off);
            if !st.zero && st.present && st.data {
                data.push((off, len));
            }
            off += len;
        }
        let bitmaps = if format == Format::Qcow2 && self.output_format == Format::Qcow2 {
            let mut img = crate::qcow2::Opening::open(path)?.img;
            let mut list = Vec::new();
            img.for_each_bitmap(|b| {
                list.push((b.granularity(), b.name.len()));
                false
            })
            .map_err(|e| CliError::io(path, e.to_string()))?;
            Some(list)
        } else {
            None
        };
        Ok(SourceFacts {
            size,
            given_size: size,
            data,
            bitmaps,
        })
    }
}

/// Bytes of whole target clusters that hold any of the `data` ranges.
fn cluster_bytes(data: &[(u64, u64)], cluster: u64) -> u64 {
    let mut total = 0u64;
    // End of the last cluster counted, so that neighbouring ranges sharing
    // a cluster count it once.
    let mut counted_to = 0u64;
    for &(start, len) in data {
        let first = (start / cluster * cluster).max(counted_to);
        let end = start.saturating_add(len).next_multiple_of(cluster);
        if end > first {
            total = total.saturating_add(end - first);
            counted_to = end;
        }
    }
    total
}

/// What persistent bitmaps take in a qcow2 image of `size` bytes and
/// `cluster`-byte clusters: per bitmap, its bits in whole clusters plus
/// its bitmap table (8 bytes a data cluster) in whole clusters; and the
/// bitmap directory (entries of 24 bytes plus the name, 8-aligned) in
/// whole clusters.
fn bitmaps_size(bitmaps: &[(u64, usize)], size: u64, cluster: u64) -> u64 {
    let mut total = 0u64;
    let mut dir = 0u64;
    for &(granularity, name_len) in bitmaps {
        let bits = size.div_ceil(granularity.max(1));
        let clusters = bits.div_ceil(cluster.saturating_mul(8));
        let table = clusters.saturating_mul(8).next_multiple_of(cluster);
        total = total
            .saturating_add(clusters.saturating_mul(cluster))
            .saturating_add(table);
        dir = dir.saturating_add((24 + name_len as u64).next_multiple_of(8));
    }
    total.saturating_add(dir.next_multiple_of(cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_counts_whole_clusters_once() {
        let c = 65536;
        assert_eq!(cluster_bytes(&[(0, 1024)], c), c);
        assert_eq!(cluster_bytes(&[(0, 1024), (2048, 512)], c), c);
        assert_eq!(cluster_bytes(&[(204_800, 307_200)], c), 5 * c);
        assert_eq!(cluster_bytes(&[], c), 0);
    }

    #[test]
    fn bitmaps_by_hand() {
        // 100 MiB, 64 KiB clusters: a 64 KiB-granularity bitmap and a
        // 512-byte one take a data cluster and a table cluster each; the
        // directory (32 + 40 bytes) one cluster.
        let b = [(65536, 3), (512, 13)];
        assert_eq!(bitmaps_size(&b, 100 << 20, 65536), 5 * 65536);
        assert_eq!(bitmaps_size(&b, 100 << 20, 4096), 45056);
        assert_eq!(bitmaps_size(&[], 100 << 20, 4096), 0);
    }
}
