//! `check=` and `speed-mib=`: reads through the installed device's Block
//! I/O protocol, opened on the child handle through the firmware (so the
//! firmware's dispatch and the protocol's ReadBlocks are what is tested).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use core::fmt::Write;
use core::time::Duration;

use sha2::{Digest, Sha256};
use uefi::proto::media::block::BlockIO;
use uefi::{boot, println, Handle};

use crate::config::Check;
use crate::ffi::{self, BLOCK};

/// Bytes per read request.
pub const CHUNK: usize = 64 * 1024;

fn hex(d: &[u8]) -> String {
    let mut s = String::with_capacity(64);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Runs every check; `Err` on a read failure or a mismatch.
pub fn checks(child: Handle, checks: &[Check]) -> Result<(), String> {
    if checks.is_empty() {
        return Ok(());
    }
    let mut proto = ffi::open_shared::<BlockIO>(child).map_err(|e| {
        format!(
            "opening the installed Block I/O protocol failed: {:?}",
            e.status()
        )
    })?;
    let media_id = proto.media().media_id();
    let last = proto.media().last_block();
    let mut buf = vec![0u8; CHUNK];
    let mut failed = 0;
    for c in checks {
        match c.lba.checked_add(c.count - 1) {
            Some(end) if end <= last => {}
            _ => {
                return Err(format!(
                    "check lba={} count={}: past the device's last block {last}",
                    c.lba, c.count
                ))
            }
        }
        let mut h = Sha256::new();
        let mut lba = c.lba;
        let mut left = c.count;
        while left > 0 {
            let n = left.min((CHUNK / BLOCK) as u64);
            let bytes = &mut buf[..n as usize * BLOCK];
            proto.read_blocks(media_id, lba, bytes).map_err(|e| {
                format!(
                    "check lba={} count={}: ReadBlocks at block {lba} failed: {:?}",
                    c.lba,
                    c.count,
                    e.status()
                )
            })?;
            h.update(&*bytes);
            lba += n;
            left -= n;
        }
        let got = hex(&h.finalize());
        if got == c.sha256 {
            println!("QIMG-CHECK lba={} count={} ok", c.lba, c.count);
        } else {
            println!(
                "QIMG-CHECK lba={} count={} MISMATCH sha256={got}",
                c.lba, c.count
            );
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(format!(
            "{failed} of {} check= ranges read different data",
            checks.len()
        ));
    }
    Ok(())
}

/// Time-stamp counter ticks per millisecond, measured against the
/// firmware's stall.
fn ticks_per_ms() -> u64 {
    let t0 = ffi::rdtsc();
    boot::stall(Duration::from_millis(50));
    let t1 = ffi::rdtsc();
    (t1.saturating_sub(t0) / 50).max(1)
}

/// Reads `mib` MiB (or the whole device if smaller) in [`CHUNK`] requests
/// and prints the speed.
pub fn speed(child: Handle, mib: u64) -> Result<(), String> {
    let mut proto = ffi::open_shared::<BlockIO>(child).map_err(|e| {
        format!(
            "opening the installed Block I/O protocol failed: {:?}",
            e.status()
        )
    })?;
    let media_id = proto.media().media_id();
    let blocks = proto.media().last_block() + 1;
    let total = (mib << 20).min(blocks * BLOCK as u64);
    let mut buf = vec![0u8; CHUNK];
    let per_ms = ticks_per_ms();
    let t0 = ffi::rdtsc();
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(CHUNK as u64) as usize;
        let n = n - n % BLOCK;
        if n == 0 {
            break;
        }
        proto
            .read_blocks(media_id, done / BLOCK as u64, &mut buf[..n])
            .map_err(|e| {
                format!(
                    "speed test: ReadBlocks at byte {done} failed: {:?}",
                    e.status()
                )
            })?;
        done += n as u64;
    }
    let ms = (ffi::rdtsc().saturating_sub(t0) / per_ms).max(1);
    // MiB/s with one decimal, in integers.
    let tenths = done.saturating_mul(10_000) / (ms << 20);
    println!(
        "QIMG-SPEED bytes={done} ms={ms} mib-per-s={}.{}",
        tenths / 10,
        tenths % 10
    );
    Ok(())
}
