//! The marker "operating system" of `cargo xtask uefi-test`'s boot
//! scenarios: loaded from a FAT volume inside a (usually encrypted) disk
//! image, it prints `QIMG-INNER-MARKER <text>`, where `<text>` is the
//! trimmed content of `\marker.txt` on the volume it was loaded from, and
//! shuts the machine down. Seeing the line proves the firmware booted a
//! loader out of that very image.

#![no_std]
#![no_main]

use uefi::prelude::*;
use uefi::runtime::{self, ResetType};
use uefi::{boot, println};

#[entry]
fn main() -> Status {
    match read_marker() {
        Ok(text) => println!("QIMG-INNER-MARKER {}", text.trim()),
        Err(why) => println!("QIMG-INNER-MARKER-ERROR {why}"),
    }
    runtime::reset(ResetType::SHUTDOWN, Status::SUCCESS, None)
}

/// `\marker.txt` of the volume this program was loaded from, as text.
fn read_marker() -> Result<alloc::string::String, alloc::string::String> {
    use alloc::format;
    let fs = boot::get_image_file_system(boot::image_handle())
        .map_err(|e| format!("no file system on the boot volume: {e}"))?;
    let mut fs = uefi::fs::FileSystem::new(fs);
    let bytes = fs
        .read(cstr16!("\\marker.txt"))
        .map_err(|e| format!("\\marker.txt: {e}"))?;
    alloc::string::String::from_utf8(bytes).map_err(|_| "\\marker.txt is not UTF-8".into())
}

extern crate alloc;
