//! qimg's firmware reader: a UEFI application that finds disks through the
//! Block I/O protocol, opens each qcow2 or LUKS image on them with the
//! no-alloc cores (unlocking encrypted ones with a passphrase from the EFI
//! system partition), reads the whole virtual disk through a fixed memory
//! budget, and prints its size and SHA-256 to the console (serial), then
//! shuts the machine down.
//!
//! The only heap use is the one-time allocation of the fixed budget below,
//! the LUKS2 JSON text and Argon2 memory handed to the core per volume
//! (and the firmware's file API reading the config); the cores themselves
//! never allocate.

#![no_std]
#![no_main]

extern crate alloc;

// qimg-efi's Block I/O device: one source, built by both programs. The
// reader has no use for its buffer alignment (`io_align`).
#[allow(dead_code)]
#[path = "../../../qimg-efi/src/disk.rs"]
mod disk;

use alloc::format;
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
use luks_core::luks2::{self, Argon2Block};
use luks_core::{luks1, LuksVolume};
use qcow_core::{CryptMethod, Qcow2};

/// Bytes read per step while hashing the virtual disk.
const CHUNK: usize = 64 * 1024;
/// qcow2 metadata cache (16 slices of 4 KiB L2 tables).
const CACHE: usize = 64 * 1024;
/// Largest cluster a compressed image may use here (QEMU's default).
const MAX_COMPRESSED_CLUSTER: usize = 64 * 1024;
/// Compressed input: a cluster plus the sector it may spill into.
const COMPRESSED_IN: usize = MAX_COMPRESSED_CLUSTER + 512;

/// LUKS2 JSON metadata text the reader accepts (cryptsetup writes a few
/// KiB; 64 KiB covers the largest metadata qimg or cryptsetup make by
/// default).
const LUKS2_JSON: usize = 64 * 1024;
/// The most Argon2 memory a LUKS2 key slot may ask of the firmware (KiB).
const MAX_ARGON2_KIB: usize = 256 * 1024;

/// The whole memory budget of the reader, allocated once at start.
const BUDGET: usize = CHUNK + CACHE + COMPRESSED_IN + MAX_COMPRESSED_CLUSTER;

/// The fixed buffers, carved once from the firmware's pool.
struct Buffers {
    chunk: Vec<u8>,
    cache: Vec<u8>,
    cin: Vec<u8>,
    cout: Vec<u8>,
}

#[entry]
fn main() -> Status {
    println!("QIMG-START uefi-reader");
    let config = read_esp_file(cstr16!("\\qimg\\config.txt"));
    let config = config
        .as_deref()
        .and_then(|c| core::str::from_utf8(c).ok())
        .unwrap_or("");
    let wanted: Vec<&str> = config
        .lines()
        .filter_map(|l| l.strip_prefix("read="))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let pass = read_esp_file(cstr16!("\\qimg\\passphrase")).unwrap_or_default();
    println!(
        "QIMG-CONFIG read={:?} passphrase-bytes={}",
        wanted,
        pass.len()
    );
    println!(
        "QIMG-BUDGET bytes={} (read chunk {}, L2 cache {}, compressed in {}, compressed out {})",
        BUDGET, CHUNK, CACHE, COMPRESSED_IN, MAX_COMPRESSED_CLUSTER
    );
    let mut bufs = Buffers {
        chunk: vec![0u8; CHUNK],
        cache: vec![0u8; CACHE],
        cin: vec![0u8; COMPRESSED_IN],
        cout: vec![0u8; MAX_COMPRESSED_CLUSTER],
    };

    let handles = match boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID)) {
        Ok(h) => h,
        Err(e) => {
            println!("QIMG-ERROR no block devices: {:?}", e.status());
            shutdown();
        }
    };
    let mut index = 0usize;
    for (i, &handle) in handles.iter().enumerate() {
        let Ok(proto) = boot::open_protocol_exclusive::<BlockIO>(handle) else {
            continue;
        };
        if proto.media().is_logical_partition() {
            continue;
        }
        let Some(mut disk) = Disk::new(proto, format!("blockio:{i}")) else {
            continue;
        };
        let mut head = [0u8; 512];
        if luks_core::io::read_bytes(&mut disk, 0, &mut head, &mut bufs.chunk).is_err() {
            continue;
        }
        let kind = if head.starts_with(b"QFI\xfb") {
            "qcow2"
        } else if head.starts_with(b"LUKS\xba\xbe") {
            "luks"
        } else {
            continue;
        };
        if !wanted.iter().any(|w| *w == "all" || *w == kind) {
            continue;
        }
        index += 1;
        let result = match kind {
            "qcow2" => read_qcow2(&mut disk, &pass, &mut bufs),
            _ if luks2::probe(&head) => read_luks2(&mut disk, &pass, &mut bufs.chunk),
            _ => read_luks(&mut disk, &pass, &mut bufs.chunk),
        };
        match result {
            Ok((what, size, hex)) => println!(
                "QIMG-RESULT disk={} kind={} layer=virtual size={} sha256={}",
                index,
                what,
                size,
                hex.as_str()
            ),
            Err(e) => println!("QIMG-ERROR disk={} {}", index, e.as_str()),
        }
    }
    println!("QIMG-DONE disks={}", index);
    shutdown();
}

/// A short error text without allocation beyond one line. (256 bytes on
/// the stack, returned once per disk: clippy's `result_large_err` is
/// allowed on the functions that return it.)
struct Msg(heapless::String<256>);

/// What reading one disk gives: its kind, size and SHA-256, or the error.
type DiskRead = Result<(&'static str, u64, Hex), Msg>;

impl Msg {
    fn of(e: impl core::fmt::Display) -> Self {
        use core::fmt::Write;
        let mut s = heapless::String::new();
        let _ = write!(s, "{e}");
        Self(s)
    }
    fn as_str(&self) -> &str {
        &self.0
    }
}

/// Opens a qcow2 image once, unlocks it in place if encrypted, and hashes
/// its disk. The buffers are lent to the reader for this one disk.
#[allow(clippy::result_large_err)]
fn read_qcow2(disk: &mut Disk, pass: &[u8], bufs: &mut Buffers) -> DiskRead {
    let img = Qcow2::open(&mut *disk, &mut bufs.cache[..])
        .map_err(Msg::of)?
        .with_compression_buffers(&mut bufs.cin[..], &mut bufs.cout[..]);
    if img.info().backing_file().is_some() {
        return Err(Msg::of(
            "images with a backing file are not read by the firmware reader",
        ));
    }
    let what = match img.info().header.crypt_method {
        CryptMethod::Luks => "qcow2-luks",
        CryptMethod::Aes => "qcow2-aes",
        CryptMethod::None => "qcow2",
    };
    let mut img = img.unlock(pass).map_err(Msg::of)?;
    let (size, hex) = hash_device(&mut img, &mut bufs.chunk).map_err(Msg::of)?;
    Ok((what, size, hex))
}

/// Unlocks a raw LUKS volume and hashes its payload.
#[allow(clippy::result_large_err)]
fn read_luks(disk: &mut Disk, pass: &[u8], chunk: &mut [u8]) -> DiskRead {
    let hdr = luks1::read_header(&mut *disk).map_err(Msg::of)?;
    let (key, slot) = luks1::unlock(&mut *disk, &hdr, pass, None).map_err(Msg::of)?;
    println!("QIMG-UNLOCK luks key slot {}", slot);
    let mut vol = LuksVolume::open_luks1(&mut *disk, &hdr, &key).map_err(Msg::of)?;
    let (size, hex) = hash_device(&mut vol, chunk).map_err(Msg::of)?;
    Ok(("luks", size, hex))
}

/// Unlocks a raw LUKS2 volume and hashes its payload. The JSON text and
/// the Argon2 memory (as much as the key slots ask, up to
/// [`MAX_ARGON2_KIB`]) come from the firmware's pool, handed to the core.
#[allow(clippy::result_large_err)]
fn read_luks2(disk: &mut Disk, pass: &[u8], chunk: &mut [u8]) -> DiskRead {
    let mut json = vec![0u8; LUKS2_JSON];
    let h = luks2::read_header(&mut *disk, &mut json).map_err(Msg::of)?;
    drop(json);
    let blocks = h
        .meta
        .keyslots
        .iter()
        .filter_map(luks2::argon2_blocks)
        .max()
        .unwrap_or(0)
        .min(MAX_ARGON2_KIB);
    let mut mem = vec![Argon2Block::new(); blocks];
    println!("QIMG-ARGON2 memory-kib={}", blocks);
    let (key, slot) = luks2::unlock(&mut *disk, &h, pass, None, &mut mem).map_err(Msg::of)?;
    drop(mem);
    println!("QIMG-UNLOCK luks2 key slot {}", slot);
    let mut vol = LuksVolume::open_luks2(&mut *disk, &h, &key).map_err(Msg::of)?;
    let (size, hex) = hash_device(&mut vol, chunk).map_err(Msg::of)?;
    Ok(("luks2", size, hex))
}

/// SHA-256 of every byte of a device, in `chunk`-sized reads.
fn hash_device<D: BlockIo>(dev: &mut D, chunk: &mut [u8]) -> Result<(u64, Hex), D::Error> {
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
