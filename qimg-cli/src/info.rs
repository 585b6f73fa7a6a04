//! `qimg info`: qemu-img's keys and layout, for people and scripts.

use serde_json::{json, Map, Value};

use crate::cli::{Output, SecretArgs};
use crate::image::{self, Format};
use crate::{human, CliError};

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotInfo {
    /// Numeric id as a string.
    pub(crate) id: String,
    /// Tag.
    pub(crate) name: String,
    /// VM state size in bytes.
    pub(crate) vm_state_size: u64,
    /// Creation time, seconds.
    pub(crate) date_sec: u64,
    /// Creation time, nanoseconds.
    pub(crate) date_nsec: u64,
    /// Guest clock, nanoseconds.
    pub(crate) vm_clock_nsec: u64,
    /// Instruction count; `None` when the image records none (the field is
    /// absent or all ones), shown by qemu-img as `--` and left out of JSON.
    pub(crate) icount: Option<u64>,
}

/// Everything `qimg info` prints about one image.
#[derive(Debug, Clone)]
pub(crate) struct ImageInfo {
    /// File name as given.
    pub(crate) filename: String,
    /// Format.
    pub(crate) format: Format,
    /// Guest-visible size.
    pub(crate) virtual_size: u64,
    /// Bytes allocated on disk.
    pub(crate) actual_size: u64,
    /// File length.
    pub(crate) file_length: u64,
    /// Dirty bit (qcow2 v3 with lazy refcounts).
    pub(crate) dirty: bool,
    /// Cluster size (qcow2).
    pub(crate) cluster_size: Option<u64>,
    /// Whether data is encrypted.
    pub(crate) encrypted: bool,
    /// Backing file name as stored.
    pub(crate) backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub(crate) full_backing_filename: Option<String>,
    /// Backing file format as stored.
    pub(crate) backing_format: Option<String>,
    /// Internal snapshots.
    pub(crate) snapshots: Vec<SnapshotInfo>,
    /// `format-specific` block: type and data.
    pub(crate) format_specific: Option<(String, Value)>,
}

impl ImageInfo {
    /// The basics every format has.
    pub(crate) fn basic(
        filename: &str,
        format: Format,
        virtual_size: u64,
    ) -> Result<Self, CliError> {
        Ok(Self {
            filename: filename.to_string(),
            format,
            virtual_size,
            actual_size: image::allocated_bytes(filename)?,
            file_length: image::sector_length(filename)?,
            dirty: false,
            cluster_size: None,
            encrypted: false,
            backing_filename: None,
            full_backing_filename: None,
            backing_format: None,
            snapshots: Vec::new(),
            format_specific: None,
        })
    }

    /// qemu-img's JSON object.
    pub(crate) fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "children".into(),
            json!([{
                "name": "file",
                "info": {
                    "children": [],
                    "virtual-size": self.file_length,
                    "filename": self.filename,
                    "format": "file",
                    "actual-size": self.actual_size,
                    "format-specific": {"type": "file", "data": {}},
                    "dirty-flag": false
                }
            }]),
        );
        if let Some(f) = &self.backing_format {
            m.insert("backing-filename-format".into(), json!(f));
        }
        if !self.snapshots.is_empty() {
            let snaps: Vec<Value> = self.snapshots.iter().map(snapshot_json).collect();
            m.insert("snapshots".into(), Value::Array(snaps));
        }
        m.insert("virtual-size".into(), json!(self.virtual_size));
        m.insert("filename".into(), json!(self.filename));
        if let Some(c) = self.cluster_size {
            m.insert("cluster-size".into(), json!(c));
        }
        m.insert("format".into(), json!(self.format.name()));
        m.insert("actual-size".into(), json!(self.actual_size));
        if let Some((t, data)) = &self.format_specific {
            m.insert("format-specific".into(), json!({"type": t, "data": data}));
        }
        if let Some(f) = &self.full_backing_filename {
            m.insert("full-backing-filename".into(), json!(f));
        }
        if let Some(f) = &self.backing_filename {
            m.insert("backing-filename".into(), json!(f));
        }
        if self.encrypted {
            m.insert("encrypted".into(), json!(true));
        }
        m.insert("dirty-flag".into(), json!(self.dirty));
        Value::Object(m)
    }

    /// qemu-img's human layout.
    pub(crate) fn to_human(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!("image: {}", self.filename));
        line(format!("file format: {}", self.format.name()));
        line(format!(
            "virtual size: {} ({} bytes)",
            human::size(self.virtual_size),
            self.virtual_size
        ));
        line(format!("disk size: {}", human::size(self.actual_size)));
        if self.encrypted {
            line("encrypted: yes".into());
        }
        if let Some(c) = self.cluster_size {
            line(format!("cluster_size: {c}"));
        }
        if let Some(b) = &self.backing_filename {
            match &self.full_backing_filename {
                Some(full) if full != b => line(format!("backing file: {b} (actual path: {full})")),
                _ => line(format!("backing file: {b}")),
            }
        }
        if let Some(f) = &self.backing_format {
            line(format!("backing file format: {f}"));
        }
        if !self.snapshots.is_empty() {
            line("Snapshot list:".into());
            line(snapshot_header());
            for sn in &self.snapshots {
                line(snapshot_row(sn));
            }
        }
        if let Some((_, data)) = &self.format_specific {
            line("Format specific information:".into());
            human_value(data, 1, &mut line);
        }
        line("Child node '/file':".into());
        line(format!("    filename: {}", self.filename));
        line("    protocol type: file".into());
        line(format!(
            "    file length: {} ({} bytes)",
            human::size(self.file_length),
            self.file_length
        ));
        line(format!("    disk size: {}", human::size(self.actual_size)));
        s
    }
}

/// One snapshot as `qemu-img info --output=json` lists it.
pub(crate) fn snapshot_json(s: &SnapshotInfo) -> Value {
    // qemu-img writes `icount` first, and only when the image records one.
    let mut v = serde_json::Map::new();
    if let Some(ic) = s.icount {
        v.insert("icount".into(), json!(ic));
    }
    let rest = json!({
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
        "name": s.name,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "id": s.id,
        "vm-state-size": s.vm_state_size
    });
    if let Value::Object(m) = rest {
        v.extend(m);
    }
    Value::Object(v)
}

/// The heading row of qemu-img's snapshot table.
pub(crate) fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One row of qemu-img's snapshot table.
pub(crate) fn snapshot_row(sn: &SnapshotInfo) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (sn.vm_clock_nsec / 1_000_000) % 1000
    );
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.id,
        sn.name,
        human::size(sn.vm_state_size),
        local_date(sn.date_sec),
        clock,
        sn.icount
            .map_or_else(|| "--".to_string(), |ic| ic.to_string())
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (qemu-img uses local time; the machines
/// qimg is tested on run in UTC).
fn local_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (proleptic Gregorian), after Howard Hinnant's method.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Prints a format-specific JSON value the way qemu-img's human output does:
/// keys with dashes as spaces, nested objects indented, arrays as `[i]:`.
fn human_value(v: &Value, depth: usize, line: &mut dyn FnMut(String)) {
    let pad = "    ".repeat(depth);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                let key = k.replace('-', " ");
                match val {
                    Value::Object(_) | Value::Array(_) => {
                        line(format!("{pad}{key}:"));
                        human_value(val, depth + 1, line);
                    }
                    _ => line(format!("{pad}{key}: {}", scalar(val))),
                }
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                line(format!("{pad}[{i}]:"));
                human_value(val, depth + 1, line);
            }
        }
        _ => line(format!("{pad}{}", scalar(v))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

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
                let f = info.backing_format.as_deref().and_then(|f| match f {
                    "qcow2" => Some(Format::Qcow2),
                    "raw" => Some(Format::Raw),
                    "luks" => Some(Format::Luks),
                    _ => None,
                });
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

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(super::local_date(0), "1970-01-01 00:00:00");
        assert_eq!(super::local_date(1795303415), "2026-11-21 23:23:35");
        assert_eq!(super::local_date(951_782_400), "2000-02-29 00:00:00");
    }
}
