//! `check-mem FILE`: runs the qcow2 consistency check over `FILE` in this
//! process and prints the findings' counters and the process's peak
//! resident memory (`VmHWM` from `/proc/self/status`), for `cargo xtask
//! check-mem`.
//!
//! Output line: `check file=.. corruptions=.. leaks=.. check_errors=..
//! allocated=.. peak_rss_kib=..`.

use std::path::Path;
use std::process::ExitCode;

use luks_core::io::FileDevice;
use qcow_core::check::{check, Repair};

/// Peak resident set size of this process in KiB, from `/proc/self/status`.
fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check-mem FILE");
        return ExitCode::FAILURE;
    };
    let mut dev = match FileDevice::open(Path::new(&path)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("check-mem: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = match check(&mut dev, Repair::None) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("check-mem: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = out.result();
    println!(
        "check file={path} corruptions={} leaks={} check_errors={} allocated={} peak_rss_kib={}",
        r.corruptions,
        r.leaks,
        r.check_errors,
        r.frag.allocated_clusters,
        peak_rss_kib().unwrap_or(0)
    );
    ExitCode::SUCCESS
}
