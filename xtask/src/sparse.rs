//! `cargo xtask bench-sparse`: `convert -O raw` of sparse qcow2 images
//! (4 TiB and 15 TiB virtual, two 64 KiB clusters written) with qimg at
//! `-m 1` and `-m 2` and with qemu-img, printed as seconds. The copy skips
//! what block status reports as zero in one step, so the times should not
//! grow with the virtual size.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::{cargo, root, run};

/// Virtual sizes benchmarked, in TiB (ext4 holds files up to 16 TiB).
const SIZES_TIB: [u64; 2] = [4, 15];

/// Runs `cmd`, failing with its stderr when it fails.
fn ok(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Seconds `cmd` takes to convert into `out` (removed before and after).
fn time_convert(out: &Path, mut cmd: Command) -> Result<f64, String> {
    let _ = std::fs::remove_file(out);
    let start = Instant::now();
    ok(&mut cmd)?;
    let secs = start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(out);
    Ok(secs)
}

/// Builds qimg (release), makes the images in a temporary folder and prints
/// one line per image and tool.
pub(crate) fn bench_sparse() -> Result<(), String> {
    run(
        "build qimg (release)",
        cargo().args(["build", "--release", "-p", "qimg-cli", "--bin", "qimg"]),
    )?;
    let qimg = root().join("target").join("release").join("qimg");
    let dir = std::env::temp_dir().join(format!("qimg-bench-sparse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = (|| -> Result<(), String> {
        println!(
            "{:<10} {:>12} {:>12} {:>12}",
            "virtual", "qimg -m 1", "qimg -m 2", "qemu-img"
        );
        for tib in SIZES_TIB {
            let img = dir.join(format!("sparse-{tib}t.qcow2"));
            let out = dir.join("out.raw");
            ok(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&img)
                .arg(format!("{tib}T")))?;
            let half = tib << 39;
            ok(Command::new("qemu-io")
                .args(["-c", "write -P 0x5a 0 64k", "-c"])
                .arg(format!("write -P 0xa5 {half} 64k"))
                .arg(&img))?;
            let mut row = Vec::new();
            for m in ["1", "2"] {
                let mut c = Command::new(&qimg);
                c.args(["convert", "-O", "raw", "-m", m])
                    .arg(&img)
                    .arg(&out);
                row.push(time_convert(&out, c)?);
            }
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-O", "raw"]).arg(&img).arg(&out);
            row.push(time_convert(&out, c)?);
            println!(
                "{:<10} {:>11.3}s {:>11.3}s {:>11.3}s",
                format!("{tib} TiB"),
                row[0],
                row[1],
                row[2]
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
