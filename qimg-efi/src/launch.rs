//! Finding the loader on the file systems the firmware mounted from the
//! installed device, and starting it.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use uefi::boot::{self, LoadImageSource, SearchType};
use uefi::proto::device_path::text::{AllowShortcuts, DisplayOnly};
use uefi::proto::device_path::DevicePath;
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::fs::SimpleFileSystem;
use uefi::proto::BootPolicy;
use uefi::{println, CString16, Handle, Identify, Status};

use crate::{ffi, path};

/// The file system handles below `child` (its path is a prefix of
/// theirs), in firmware order.
fn file_systems(child_path: &[u8]) -> Vec<(Handle, Vec<u8>)> {
    let Ok(handles) = boot::locate_handle_buffer(SearchType::ByProtocol(&SimpleFileSystem::GUID))
    else {
        return Vec::new();
    };
    handles
        .iter()
        .filter_map(|&h| path::of_handle(h).map(|p| (h, p)))
        .filter(|(_, p)| p.starts_with(child_path))
        .collect()
}

fn has_file(fs: Handle, file: &str) -> bool {
    let Ok(name) = CString16::try_from(file) else {
        return false;
    };
    let Ok(proto) = ffi::open_shared::<SimpleFileSystem>(fs) else {
        return false;
    };
    let mut fs = uefi::fs::FileSystem::new(proto);
    fs.try_exists(name.as_ref()).unwrap_or(false)
}

/// Loads `file` from the first file system under the child device that
/// holds it, gives it `options`, and starts it. Returns the loader's
/// status if it returns.
pub fn boot_loader(child_path: &[u8], file: &str, options: Option<&str>) -> Result<Status, String> {
    let systems = file_systems(child_path);
    if systems.is_empty() {
        return Err(
            "the firmware found no file system on the image's disk (no FAT partition or volume)"
                .to_string(),
        );
    }
    let Some((index, (_, fs_path))) = systems
        .iter()
        .enumerate()
        .find(|(_, (h, _))| has_file(*h, file))
    else {
        return Err(format!(
            "none of the image's {} file system(s) holds {file}",
            systems.len()
        ));
    };
    let body = fs_path.clone();
    let full = path::with_file(&body, file);
    let dp: &DevicePath = <&DevicePath>::try_from(full.as_slice())
        .map_err(|e| format!("building the loader's device path failed: {e:?}"))?;
    let fs_dp_bytes = path::whole(&body);
    let label = <&DevicePath>::try_from(fs_dp_bytes.as_slice())
        .ok()
        .and_then(|d| {
            d.to_string16(DisplayOnly(false), AllowShortcuts(false))
                .ok()
        })
        .map_or_else(|| format!("file system {index}"), |t| t.to_string());
    let image = boot::load_image(
        boot::image_handle(),
        LoadImageSource::FromDevicePath {
            device_path: dp,
            boot_policy: BootPolicy::ExactMatch,
        },
    )
    .map_err(|e| format!("LoadImage {file} from {label} failed: {:?}", e.status()))?;
    if let Some(opts) = options {
        let mut li = boot::open_protocol_exclusive::<LoadedImage>(image)
            .map_err(|e| format!("LoadedImage of {file}: {:?}", e.status()))?;
        let ucs2: Vec<u16> = opts.encode_utf16().chain(core::iter::once(0)).collect();
        ffi::set_load_options(&mut li, Vec::leak(ucs2));
    }
    if ffi::read_failed() {
        let _ = boot::unload_image(image);
        return Err(format!(
            "{file}: a read of the image failed (QIMG-ERROR above); not starting the loader"
        ));
    }
    println!("QIMG-BOOT {file} from {label}");
    match boot::start_image(image) {
        Ok(()) => {
            println!("QIMG-RETURNED {file} status={:?}", Status::SUCCESS);
            Ok(Status::SUCCESS)
        }
        Err(e) => {
            println!("QIMG-RETURNED {file} status={:?}", e.status());
            Ok(e.status())
        }
    }
}
