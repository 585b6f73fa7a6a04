//! The one module of qimg-efi that talks to the firmware through raw
//! pointers: shared (GET_PROTOCOL) protocol opens, the Block I/O and
//! Device Path protocols installed for the opened image, a loaded image's
//! load options, and the time-stamp counter.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment; the rest of the
//! crate is `#![deny(unsafe_code)]`.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, Ordering};

use uefi::boot::{self, OpenProtocolAttributes, OpenProtocolParams, ScopedProtocol};
use uefi::proto::device_path::DevicePath;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::block::BlockIO;
use uefi::proto::ProtocolPointer;
use uefi::{println, Handle, Identify, Status};
use uefi_raw::protocol::block::{BlockIoMedia, BlockIoProtocol, Lba};
use uefi_raw::Boolean;

use crate::image::Reader;

/// Set once any ReadBlocks of the installed device failed.
static READ_FAILED: AtomicBool = AtomicBool::new(false);

/// Whether a ReadBlocks of the installed device has failed (after a
/// QIMG-ERROR the program boots nothing).
pub fn read_failed() -> bool {
    READ_FAILED.load(Ordering::Relaxed)
}

/// Block size of the installed device.
pub const BLOCK: usize = 512;

/// Opens protocol `P` on `handle` with GET_PROTOCOL: shared, so no driver
/// that manages `handle` (the FAT driver on the ESP, the partition driver
/// on a disk) is disconnected, as an exclusive open would do.
pub fn open_shared<P: ProtocolPointer + ?Sized>(handle: Handle) -> uefi::Result<ScopedProtocol<P>> {
    // SAFETY: a GET_PROTOCOL open gives no exclusivity: the interface stays
    // valid while the driver that installed it is connected. The program
    // uses these interfaces only while it runs, before any driver it could
    // unload is stopped, and never uninstalls a protocol it did not install.
    unsafe {
        boot::open_protocol::<P>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
}

/// Gives a loaded (not yet started) image its load options: `options` is
/// UCS-2 text ending in NUL, leaked so it outlives the image.
pub fn set_load_options(image: &mut LoadedImage, options: &'static [u16]) {
    let bytes = u32::try_from(core::mem::size_of_val(options)).unwrap_or(u32::MAX);
    // SAFETY: `options` is 'static (leaked by the caller), so the pointer
    // stays valid for as long as the started image may read it.
    unsafe { image.set_load_options(options.as_ptr().cast(), bytes) }
}

/// The CPU's time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The installed device: the Block I/O protocol first (its address is the
/// `this` pointer the firmware passes back), then its media and the
/// reader. Allocated once and leaked: it must live as long as the
/// firmware may call it.
#[repr(C)]
struct Installed {
    proto: BlockIoProtocol,
    media: BlockIoMedia,
    reader: RefCell<Box<dyn Reader>>,
    reported: Cell<bool>,
}

/// Installs the image as a new read-only Block I/O device with device
/// path `path` (a whole device path, ending in the End node), returning
/// the new handle. `size` is the image's virtual size (the tail past the
/// last whole block is not reachable); `io_align` the alignment the
/// reader's own device needs of buffers (1 for none).
pub fn install(
    reader: Box<dyn Reader>,
    size: u64,
    io_align: u32,
    path: Vec<u8>,
) -> uefi::Result<Handle> {
    let blocks = size / BLOCK as u64;
    let dev = Box::leak(Box::new(Installed {
        proto: BlockIoProtocol {
            revision: BlockIoProtocol::REVISION,
            media: core::ptr::null(),
            reset,
            read_blocks,
            write_blocks,
            flush_blocks,
        },
        media: BlockIoMedia {
            media_id: 0,
            removable_media: Boolean::FALSE,
            media_present: Boolean::TRUE,
            logical_partition: Boolean::FALSE,
            read_only: Boolean::TRUE,
            write_caching: Boolean::FALSE,
            block_size: BLOCK as u32,
            io_align: io_align.max(1),
            last_block: blocks.saturating_sub(1),
            lowest_aligned_lba: 0,
            logical_blocks_per_physical_block: 1,
            optimal_transfer_length_granularity: 0,
        },
        reader: RefCell::new(reader),
        reported: Cell::new(false),
    }));
    dev.proto.media = &dev.media;
    // From here on only shared references exist: the firmware may call
    // ReadBlocks (which reads `dev` through `this`) as soon as the
    // protocol is installed.
    let dev: &'static Installed = dev;
    let path: &'static [u8] = Vec::leak(path);
    // SAFETY: the Device Path GUID matches the bytes installed (a whole
    // device path ending in the End node, checked by the caller), which
    // are leaked and so valid for the rest of boot.
    let child = unsafe {
        boot::install_protocol_interface(None, &DevicePath::GUID, path.as_ptr().cast::<c_void>())
    }?;
    // SAFETY: the Block I/O GUID matches `proto`, a valid
    // EFI_BLOCK_IO_PROTOCOL of revision 1 whose media pointer points into
    // the same leaked allocation; it lives for the rest of boot.
    unsafe {
        boot::install_protocol_interface(
            Some(child),
            &BlockIO::GUID,
            core::ptr::from_ref(&dev.proto).cast::<c_void>(),
        )
    }?;
    Ok(child)
}

/// Takes the installed device away again after a failure (so nothing
/// boots from it): disconnects the drivers bound to `child`, then
/// uninstalls its Block I/O and Device Path protocols. The leaked memory
/// stays allocated (the firmware may still hold the pointers). Errors are
/// reported, not fatal: the program is failing already.
pub fn remove(child: Handle) {
    let _ = boot::disconnect_controller(child, None, None);
    let Ok(bio) = open_shared::<BlockIO>(child) else {
        return;
    };
    let proto = core::ptr::from_ref::<BlockIO>(&bio).cast::<c_void>();
    drop(bio);
    // SAFETY: `proto` is the interface `install` put on `child` (opened
    // through the firmware, which returns that very pointer); its memory is
    // leaked, so no reference to it dangles after the uninstall.
    if let Err(e) = unsafe { boot::uninstall_protocol_interface(child, &BlockIO::GUID, proto) } {
        println!(
            "QIMG-ERROR removing the image's Block I/O device failed: {:?}",
            e.status()
        );
        return;
    }
    if let Ok(dp) = open_shared::<DevicePath>(child) {
        let p = dp.as_ffi_ptr().cast::<c_void>();
        drop(dp);
        // SAFETY: as above, for the leaked device path bytes.
        let _ = unsafe { boot::uninstall_protocol_interface(child, &DevicePath::GUID, p) };
    }
}

/// Recovers the installed device from the `this` pointer the firmware
/// passes to a Block I/O function.
fn device<'a>(this: *const BlockIoProtocol) -> Option<&'a Installed> {
    if this.is_null() {
        return None;
    }
    // SAFETY: the firmware calls these functions only through the
    // protocol installed by `install`, whose interface pointer is the
    // first field of a leaked, never freed `#[repr(C)] Installed`; the
    // program only reads it through shared references (the reader sits in
    // a RefCell).
    Some(unsafe { &*this.cast::<Installed>() })
}

extern "efiapi" fn reset(_this: *mut BlockIoProtocol, _extended: Boolean) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn flush_blocks(_this: *mut BlockIoProtocol) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn write_blocks(
    _this: *mut BlockIoProtocol,
    _media_id: u32,
    _lba: Lba,
    _size: usize,
    _buffer: *const c_void,
) -> Status {
    Status::WRITE_PROTECTED
}

extern "efiapi" fn read_blocks(
    this: *const BlockIoProtocol,
    media_id: u32,
    lba: Lba,
    size: usize,
    buffer: *mut c_void,
) -> Status {
    let Some(dev) = device(this) else {
        return Status::INVALID_PARAMETER;
    };
    let media = &dev.media;
    if media_id != media.media_id {
        return Status::MEDIA_CHANGED;
    }
    if buffer.is_null() {
        return Status::INVALID_PARAMETER;
    }
    if size == 0 {
        return Status::SUCCESS;
    }
    if !size.is_multiple_of(BLOCK) {
        return Status::BAD_BUFFER_SIZE;
    }
    let count = (size / BLOCK) as u64;
    match lba.checked_add(count - 1) {
        Some(last) if last <= media.last_block => {}
        _ => return Status::INVALID_PARAMETER,
    }
    if !(buffer as usize).is_multiple_of(media.io_align.max(1) as usize) {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the caller gives a writable buffer of `size` bytes at
    // `buffer` (non-null, checked above), which it does not touch while
    // this call runs.
    let buf = unsafe { core::slice::from_raw_parts_mut(buffer.cast::<u8>(), size) };
    let Ok(mut reader) = dev.reader.try_borrow_mut() else {
        return Status::DEVICE_ERROR;
    };
    match reader.read(lba * BLOCK as u64, buf) {
        Ok(()) => Status::SUCCESS,
        Err(e) => {
            READ_FAILED.store(true, Ordering::Relaxed);
            if !dev.reported.replace(true) {
                println!("QIMG-ERROR reading block {lba} (+{count}) of the image: {e}");
            }
            Status::DEVICE_ERROR
        }
    }
}
