//! `qimg check`: qemu-img's consistency check, its wording, JSON keys and
//! exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63
//! format without checks).

use luks_core::io::{BlockIo, FileDevice};
use luks_core::luks1;
use qcow_core::check::{self, CheckOutcome, CheckReport, Repair};
use serde_json::{json, Map, Value};

use crate::format::Format;
use crate::image;
use crate::CliError;

/// qemu-img's exit code for a format that has no checks.
const NOT_SUPPORTED: u8 = 63;

/// `-r leaks|all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RepairArg {
    /// Free leaked clusters only.
    Leaks,
    /// Fix every error qimg can fix (refcounts, COPIED flags, the refcount
    /// structure), and leaks.
    All,
}

/// What `qimg check` was asked.
#[derive(Debug)]
pub(crate) struct CheckArgs<'a> {
    /// Image format, if given.
    pub(crate) format: Option<Format>,
    /// Repair mode, if any.
    pub(crate) repair: Option<RepairArg>,
    /// JSON output.
    pub(crate) json: bool,
    /// No summary on standard output.
    pub(crate) quiet: bool,
    /// The image.
    pub(crate) filename: &'a str,
    /// `-T`.
    pub(crate) cache: crate::cache::CacheMode,
}

/// Runs `qimg check`; returns qemu-img's exit code.
pub(crate) fn run(a: &CheckArgs<'_>) -> Result<u8, CliError> {
    let path = a.filename;
    let format = crate::format::resolve(path, a.format, None)?;
    match format {
        Format::Raw => {
            eprintln!("qimg: This image format does not support checks");
            Ok(NOT_SUPPORTED)
        }
        Format::Luks => check_luks(a),
        Format::Qcow2 => check_qcow2(a),
    }
}

/// Whether the reader's open error is one that makes qemu-img's open (and
/// so its check) fail, rather than something `check` itself reports.
fn refuses_open<E>(e: &qcow_core::Error<E>) -> bool {
    use qcow_core::error::Problem;
    match e {
        qcow_core::Error::Unsupported(_) => true,
        qcow_core::Error::Corrupt { problem, .. } => matches!(
            problem,
            Problem::MissingCryptoExtension
                | Problem::UnexpectedCryptoExtension(_)
                | Problem::ExtensionOverrun { .. }
                | Problem::ExtensionLength { .. }
                | Problem::DuplicateExtension(_)
                | Problem::Overflow
        ),
        _ => false,
    }
}

fn check_qcow2(a: &CheckArgs<'_>) -> Result<u8, CliError> {
    let path = a.filename;
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let mut dev = crate::file::open_file_cached(path, repair != Repair::None, a.cache)?;
    // An image qemu-img cannot open (qcow2_open's checks: feature bits,
    // header extensions, table offsets, the encryption extension) is not
    // checkable: exit 1 with the reason, as qemu-img check does. The
    // reader's open makes the same checks without allocating.
    {
        let mut cache = vec![0u8; 64 * 1024];
        let linked = match qcow_core::Qcow2::open(&mut dev, &mut cache) {
            Err(e) if refuses_open(&e) => {
                return Err(CliError::io(path, format!("cannot check: {e}")));
            }
            Err(_) => None,
            Ok(img) => {
                let info = img.info();
                Some((
                    info.backing_file().map(str::to_string),
                    info.backing_format().map(str::to_string),
                    info.data_file().map(str::to_string),
                ))
            }
        };
        // qemu-img opens the backing and data files too, and exits 1 when
        // one cannot be opened (missing, a directory, the wrong format).
        if let Some((backing, fmt, data)) = linked {
            image::probe_linked(path, backing.as_deref(), fmt.as_deref(), data.as_deref())?;
        }
    }
    let out = check::check(&mut dev, repair).map_err(|e| CliError::io(path, e.to_string()))?;
    print_findings(&out.first);
    if let Some(after) = &out.after {
        if !a.json && (out.leaks_fixed > 0 || out.corruptions_fixed > 0) && !a.quiet {
            println!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                out.leaks_fixed, out.corruptions_fixed
            );
        }
        print_findings(after);
    }
    let r = out.result();
    if r.check_errors > 0 {
        eprintln!("qimg: Check failed");
    }
    if a.json {
        println!("{}", crate::pretty_json(&json_of(path, "qcow2", &out)));
    } else if !a.quiet {
        print!("{}", human(r));
    }
    Ok(exit_code(r))
}

fn print_findings(r: &CheckReport) {
    for f in &r.findings {
        eprintln!("{f}");
    }
}

/// qemu-img's exit code for a result.
fn exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// qemu-img's JSON: zero-valued counts other than `check-errors` are
/// left out, as qemu-img does.
fn json_of(path: &str, format: &str, out: &CheckOutcome) -> Value {
    let r = out.result();
    let mut m = Map::new();
    let mut opt = |k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    };
    opt("image-end-offset", r.image_end_offset);
    opt("total-clusters", r.frag.total_clusters);
    opt("corruptions", r.corruptions);
    opt("leaks", r.leaks);
    opt("corruptions-fixed", out.corruptions_fixed);
    opt("leaks-fixed", out.leaks_fixed);
    opt("allocated-clusters", r.frag.allocated_clusters);
    opt("fragmented-clusters", r.frag.fragmented_clusters);
    opt("compressed-clusters", r.frag.compressed_clusters);
    m.insert("check-errors".into(), json!(r.check_errors));
    m.insert("filename".into(), json!(path));
    m.insert("format".into(), json!(format));
    Value::Object(m)
}

/// The summary qemu-img prints on standard output.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    let f = &r.frag;
    if f.total_clusters != 0 && f.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            f.allocated_clusters,
            f.total_clusters,
            pct(f.allocated_clusters, f.total_clusters),
            pct(f.fragmented_clusters, f.allocated_clusters),
            pct(f.compressed_clusters, f.allocated_clusters),
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// A raw LUKS volume has no refcounts: check that its header parses, that
/// the key slots' key material does not overlap the header, each other or
/// the payload, and that the payload starts inside the file.
fn check_luks(a: &CheckArgs<'_>) -> Result<u8, CliError> {
    let path = a.filename;
    let mut dev = crate::file::open_file_cached(path, false, a.cache)?;
    let len = dev.size().map_err(|e| CliError::io(path, e.to_string()))?;
    let mut problems = Vec::new();
    if crate::format::luks_version(path)? == Some(2) {
        luks2_problems(&mut dev, len, &mut problems).map_err(|e| CliError::io(path, e))?;
        return report_luks(a, &problems);
    }
    let hdr = match luks1::read_header(&mut dev) {
        Ok(h) => Some(h),
        // A header that fails validation is the corruption check reports
        // (overlapping key slots, a key slot inside the header, ...).
        Err(e @ luks_core::Error::Corrupt { .. }) => {
            problems.push(format!("ERROR {e}"));
            None
        }
        Err(e) => return Err(CliError::io(path, e.to_string())),
    };
    if let Some(hdr) = hdr {
        slot_problems(&hdr, len, &mut problems);
    }
    report_luks(a, &problems)
}

/// A LUKS2 header: both copies' checksums and the metadata as the reader
/// validates them (key slot areas inside the key slots area and apart),
/// then the header area and the payload offset against the end of the
/// file. Errors other than a corrupt header are returned.
fn luks2_problems(
    dev: &mut FileDevice,
    len: u64,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let mut json = vec![0u8; luks_core::luks2::MAX_JSON_LEN];
    let h = match luks_core::luks2::read_header(dev, &mut json) {
        Ok(h) => h,
        Err(e @ luks_core::Error::Corrupt { .. }) => {
            problems.push(format!("ERROR {e}"));
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    };
    if !h.primary_ok || h.secondary.is_none() {
        problems.push(format!(
            "ERROR the {} LUKS2 header copy is damaged (the other one is in use)",
            if h.primary_ok { "secondary" } else { "primary" }
        ));
    }
    let area = h.meta.header_area_len(h.hdr.hdr_size);
    if area > len {
        problems.push(format!(
            "ERROR the LUKS2 header area ({area} bytes) ends past the end of the file ({len} \
             bytes)"
        ));
    }
    let payload = h.meta.data_segment().map_or(0, |s| s.offset);
    if payload > len {
        problems.push(format!(
            "ERROR payload offset {payload} is past the end of the file ({len} bytes)"
        ));
    }
    Ok(())
}

/// Prints `problems` (one corruption each) and the summary, as for LUKS1.
fn report_luks(a: &CheckArgs<'_>, problems: &[String]) -> Result<u8, CliError> {
    let path = a.filename;
    for p in problems {
        eprintln!("{p}");
    }
    let corruptions = problems.len() as u64;
    if a.json {
        let mut m = Map::new();
        if corruptions != 0 {
            m.insert("corruptions".into(), json!(corruptions));
        }
        m.insert("check-errors".into(), json!(0));
        m.insert("filename".into(), json!(path));
        m.insert("format".into(), json!("luks"));
        println!("{}", crate::pretty_json(&Value::Object(m)));
    } else if !a.quiet {
        let r = CheckReport {
            corruptions,
            ..CheckReport::default()
        };
        print!("{}", human(&r));
    }
    Ok(if corruptions > 0 { 2 } else { 0 })
}

/// Key material of each slot against the header, the other slots, the
/// payload and the end of the file; the payload against the end of the file.
fn slot_problems(hdr: &luks1::HeaderRepr, len: u64, problems: &mut Vec<String>) {
    let payload = u64::from(hdr.payload_offset) * 512;
    // The phdr is 592 bytes; key material starts past it.
    let mut ranges: Vec<(usize, u64, u64)> = Vec::new();
    for (i, ks) in hdr.key_slots.iter().enumerate() {
        let start = u64::from(ks.key_material_offset) * 512;
        let bytes = u64::from(hdr.key_bytes) * u64::from(ks.stripes);
        let end = start + bytes.div_ceil(512) * 512;
        if start < 592 {
            problems.push(format!(
                "ERROR key slot {i}: key material at {start} overlaps the LUKS header"
            ));
        }
        if payload != 0 && end > payload {
            problems.push(format!(
                "ERROR key slot {i}: key material {start}..{end} overlaps the payload at {payload}"
            ));
        }
        if ks.active && end > len {
            problems.push(format!(
                "ERROR key slot {i}: key material {start}..{end} ends past the end of the file ({len} bytes)"
            ));
        }
        for &(j, s2, e2) in &ranges {
            if start < e2 && s2 < end {
                problems.push(format!(
                    "ERROR key slot {i}: key material overlaps key slot {j}"
                ));
            }
        }
        ranges.push((i, start, end));
    }
    if payload > len {
        problems.push(format!(
            "ERROR payload offset {payload} is past the end of the file ({len} bytes)"
        ));
    }
}

/// The command line of `qimg check`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckCmd {
    /// Image format; detected from the file when absent.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<crate::format::Format>,
    /// Repair: `leaks` frees leaked clusters, `all` fixes every error.
    #[arg(short = 'r', value_enum)]
    repair: Option<RepairArg>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: crate::args::Output,
    /// Quiet: no summary.
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking QEMU's shared locks (not with -r).
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    force_share: bool,
    /// Cache mode of the image (none, directsync, writethrough,
    /// writeback: the default, unsafe).
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,
    /// Accepted for compatibility: the metadata of encrypted images is
    /// plaintext, so checking needs no key.
    #[command(flatten)]
    secrets: crate::args::SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The image file (or option list, with --image-opts).
    filename: String,
}

impl CheckCmd {
    /// Runs `qimg check`; returns qemu-img's exit code.
    pub(crate) fn run(self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        let cache = crate::cache::CacheMode::source(self.cache.as_deref())?;
        let spec = self.image_opts.spec(&self.filename, self.format)?;
        run(&CheckArgs {
            cache,
            format: Some(spec.resolve_for_io(None)?),
            repair: self.repair,
            json: self.output == crate::args::Output::Json,
            quiet: self.quiet,
            filename: &spec.path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow_core::check::Finding;

    #[test]
    fn summary_wording() {
        let mut r = CheckReport::default();
        assert_eq!(human(&r), "No errors were found on the image.\n");
        r.leaks = 2;
        r.image_end_offset = 65536;
        assert_eq!(
            human(&r),
            "\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\nImage end offset: 65536\n"
        );
        assert_eq!(exit_code(&r), 3);
        r.corruptions = 1;
        assert_eq!(exit_code(&r), 2);
        let f = Finding::Refcount {
            cluster: 5,
            refcount: 1,
            reference: 0,
            repaired: false,
        };
        assert_eq!(f.to_string(), "Leaked cluster 5 refcount=1 reference=0");
    }
}
