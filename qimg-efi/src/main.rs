//! qimg-efi: a UEFI program that boots from inside a qcow2 (plain,
//! compressed, LUKS-encrypted) or raw LUKS1/LUKS2 image.
//!
//! It reads `\qimg\qimg.cfg` from the volume it was loaded from, finds
//! and unlocks the image with qimg's no-alloc cores, installs the virtual
//! disk as a new read-only Block I/O device (with a device path below the
//! source device), lets the firmware connect its partition and FAT
//! drivers to it, and loads and starts the loader (`boot=`) from it.
//!
//! Working memory is fixed (printed as QIMG-BUDGET); the Argon2 memory of
//! a LUKS2 key slot is taken from the pool and freed after unlocking.
//! Raw firmware pointers appear only in [`ffi`].

#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

mod check;
mod config;
mod disk;
// The FAT reader's whole interface (shared with its host tests); the
// program uses part of it.
#[allow(dead_code)]
mod fat;
#[allow(unsafe_code)]
mod ffi;
mod filesrc;
mod image;
mod launch;
mod path;
mod secret;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use luks_core::io::BlockIo;
use uefi::boot::{self, SearchType};
use uefi::prelude::*;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::block::BlockIO;
use uefi::proto::media::fs::SimpleFileSystem;
use uefi::{println, CString16, Handle, Identify};

use config::{Config, Image};
use disk::Disk;
use image::{Failure, Kind, Opened};
use secret::Secrets;

use fat::MAX_EXTENTS;
use filesrc::MAX_BACKING_DEPTH;

/// Why the program stopped without booting.
enum Stop {
    /// QIMG-ERROR: a problem with a file, structure or device.
    Error(String),
    /// QIMG-FAIL: no passphrase opened the image, or a check failed.
    Fail(String),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Error(e) => Self::Error(e),
            Failure::Fail(e) => Self::Fail(e),
        }
    }
}

#[entry]
fn main() -> Status {
    println!("QIMG-START qimg-efi {}", env!("CARGO_PKG_VERSION"));
    match run() {
        Ok(status) => status,
        Err(Stop::Error(e)) => {
            println!("QIMG-ERROR {e}");
            println!("QIMG-FAIL an error stopped qimg-efi; not booting");
            Status::ABORTED
        }
        Err(Stop::Fail(e)) => {
            println!("QIMG-FAIL {e}; not booting");
            Status::SECURITY_VIOLATION
        }
    }
}

/// The device qimg.efi was loaded from (the ESP partition).
fn boot_device() -> Result<Handle, Stop> {
    let li = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
        .map_err(|e| Stop::Error(format!("LoadedImage of qimg-efi: {:?}", e.status())))?;
    li.device().ok_or_else(|| {
        Stop::Error(
            "qimg-efi was not loaded from a device (no LoadedImage.DeviceHandle)".to_string(),
        )
    })
}

/// The boot volume's file system, opened shared.
fn boot_fs(esp: Handle) -> Result<uefi::fs::FileSystem, Stop> {
    let proto = ffi::open_shared::<SimpleFileSystem>(esp).map_err(|e| {
        Stop::Error(format!(
            "the boot volume has no Simple File System protocol: {:?}",
            e.status()
        ))
    })?;
    Ok(uefi::fs::FileSystem::new(proto))
}

fn ucs2(path: &str) -> Result<CString16, Stop> {
    CString16::try_from(path).map_err(|_| Stop::Error(format!("{path}: not a UCS-2 path")))
}

/// Reads a whole file of the boot volume, or `None` if it is absent.
fn read_file(fs: &mut uefi::fs::FileSystem, path: &str) -> Result<Option<Vec<u8>>, Stop> {
    let name = ucs2(path)?;
    if !fs.try_exists(name.as_ref()).unwrap_or(false) {
        return Ok(None);
    }
    fs.read(name.as_ref())
        .map(Some)
        .map_err(|e| Stop::Error(format!("{path}: reading the file failed: {e}")))
}

fn run() -> Result<Status, Stop> {
    let esp = boot_device()?;
    let mut fs = boot_fs(esp)?;
    let cfg = match read_file(&mut fs, config::PATH)? {
        None => Config::default(),
        Some(bytes) => {
            let text = core::str::from_utf8(&bytes).map_err(|e| {
                Stop::Error(format!(
                    "{}: not UTF-8 text at byte {}",
                    config::PATH,
                    e.valid_up_to()
                ))
            })?;
            Config::parse(text).map_err(Stop::Error)?
        }
    };
    println!("QIMG-CONFIG {}", cfg.summary());
    let secrets = match &cfg.passphrase_file {
        None => Secrets::Prompt,
        Some(p) => Secrets::File(secret::strip_line_end(
            read_file(&mut fs, p)?
                .ok_or_else(|| Stop::Error(format!("{p}: passphrase file not found")))?,
        )),
    };
    let image = match &cfg.image {
        Image::Default
            if fs
                .try_exists(ucs2(config::DEFAULT_IMAGE)?.as_ref())
                .unwrap_or(false) =>
        {
            Image::File(config::DEFAULT_IMAGE.to_string())
        }
        Image::Default => Image::Scan,
        other => other.clone(),
    };
    drop(fs);

    print_budget();
    let src = match &image {
        Image::File(p) => {
            let vol = filesrc::Volume::mount(esp)?;
            let opened = filesrc::open(&vol, p, cfg.header.as_deref(), &secrets)?;
            Source {
                opened,
                name: format!("file:{p}"),
                path: path::of_handle(esp),
                align: vol.align,
            }
        }
        _ => open_scanned(esp, &secrets)?,
    };
    println!(
        "QIMG-IMAGE source={} kind={} layers={} size={}",
        src.name, src.opened.kind, src.opened.layers, src.opened.size
    );
    install_and_boot(src, &cfg)
}

/// An opened image and where it came from.
struct Source {
    /// The unlocked image.
    opened: Opened,
    /// `file:\path` or `blockio:N`.
    name: String,
    /// The source device's path (without End), if it has one.
    path: Option<Vec<u8>>,
    /// The buffer alignment the source device needs (0 or 1: none).
    align: u32,
}

fn print_budget() {
    let layers = MAX_BACKING_DEPTH + 1;
    let extents = MAX_EXTENTS * 16;
    let per_layer = image::PER_LAYER + extents;
    let total = per_layer * layers + extents + check::CHUNK + image::MAX_SECTOR;
    println!(
        "QIMG-BUDGET bytes={total} (per layer {per_layer} = L2 cache {} + compressed in {} + compressed out {} + extent list {extents}; up to {layers} layers; detached header extent list {extents}; check/speed buffer {}; sector bounce {}; LUKS2 JSON {} and Argon2 memory are freed after unlock)",
        image::CACHE,
        image::COMPRESSED_IN,
        image::MAX_COMPRESSED_CLUSTER,
        check::CHUNK,
        image::MAX_SECTOR,
        image::LUKS2_JSON,
    );
}

/// Connects every controller's drivers, as a firmware's "connect all"
/// does: a boot order that names one disk leaves the others without Block
/// I/O, and the image may be on one of them. Failures (handles no driver
/// takes) are expected and ignored.
fn connect_all() {
    if let Ok(all) = boot::locate_handle_buffer(SearchType::AllHandles) {
        for &h in all.iter() {
            let _ = boot::connect_controller(h, &[], None, true);
        }
    }
}

/// `image=scan`: the first Block I/O device (not the boot device) whose
/// first block is a qcow2 or LUKS header, opened and unlocked.
fn open_scanned(esp: Handle, secrets: &Secrets) -> Result<Source, Stop> {
    connect_all();
    let handles =
        boot::locate_handle_buffer(SearchType::ByProtocol(&BlockIO::GUID)).map_err(|e| {
            Stop::Error(format!(
                "image=scan: no Block I/O devices: {:?}",
                e.status()
            ))
        })?;
    for (i, &h) in handles.iter().enumerate() {
        if h == esp {
            continue;
        }
        let name = format!("blockio:{i}");
        let opened = ffi::open_shared::<BlockIO>(h).ok();
        let Some(mut disk) = opened.and_then(|p| Disk::new(p, name.clone())) else {
            continue;
        };
        let mut head = alloc::vec![0u8; disk.sector_size() as usize];
        if disk.read_at(0, &mut head).is_err() {
            continue;
        }
        let Some(kind) = image::probe(&head) else {
            continue;
        };
        let align = disk.io_align();
        let opened = match kind {
            Kind::Qcow2 => image::open_qcow2(disk, &name, secrets)?,
            Kind::Luks1 | Kind::Luks2 => {
                image::open_luks::<Disk, Disk>(disk, None, &name, secrets)?
            }
        };
        return Ok(Source {
            opened,
            name,
            path: path::of_handle(h),
            align,
        });
    }
    Err(Stop::Error(
        "image=scan: no Block I/O device (other than the boot volume) starts with a qcow2 or LUKS header".to_string(),
    ))
}

/// Installs the opened image as a Block I/O device, connects the
/// firmware's drivers, runs the checks and boots the loader.
fn install_and_boot(src: Source, cfg: &Config) -> Result<Status, Stop> {
    let child_path = path::child(src.path.as_deref());
    let size = src.opened.size;
    let child = ffi::install(src.opened.reader, size, src.align, path::whole(&child_path))
        .map_err(|e| {
            Stop::Error(format!(
                "installing the image's Block I/O device failed: {:?}",
                e.status()
            ))
        })?;
    println!("QIMG-DEVICE blocks={} block-size=512 read-only", size / 512);
    let result = connect_and_boot(child, &child_path, cfg);
    if result.is_err() {
        ffi::remove(child);
    }
    result
}

/// Connects the firmware's drivers to the installed device, runs the
/// checks and boots the loader.
fn connect_and_boot(child: Handle, child_path: &[u8], cfg: &Config) -> Result<Status, Stop> {
    // Not every image holds something a driver binds to; a missing driver
    // shows below as "no file system".
    let _ = boot::connect_controller(child, &[], None, true);
    check::checks(child, &cfg.checks).map_err(Stop::Fail)?;
    if let Some(mib) = cfg.speed_mib {
        check::speed(child, mib).map_err(Stop::Error)?;
    }
    if ffi::read_failed() {
        return Err(Stop::Error(
            "a read of the image failed (QIMG-ERROR above)".to_string(),
        ));
    }
    launch::boot_loader(child_path, &cfg.boot, cfg.options.as_deref()).map_err(Stop::Error)
}
