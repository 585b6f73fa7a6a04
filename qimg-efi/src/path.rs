//! Device path bytes: the child device's path, file path nodes.

use alloc::vec::Vec;

use uefi::proto::device_path::DevicePath;
use uefi::{guid, Guid, Handle};

use crate::ffi;

/// The vendor GUID of qimg's device path nodes.
pub const QIMG_GUID: Guid = guid!("7a1b9c3e-51d4-4f2a-9e0b-71696d672d31");
/// The End Entire Device Path node.
const END: [u8; 4] = [0x7f, 0xff, 4, 0];

/// The bytes of `handle`'s device path without its End node, if it has
/// one.
pub fn of_handle(handle: Handle) -> Option<Vec<u8>> {
    let dp = ffi::open_shared::<DevicePath>(handle).ok()?;
    let bytes = dp.as_bytes();
    let body = bytes.strip_suffix(&END)?;
    Some(body.to_vec())
}

fn node(out: &mut Vec<u8>, kind: u8, sub: u8, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&[kind, sub]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(data);
}

/// The child device's path, without End: the source device's path and a
/// Vendor media node, or a Vendor hardware node when the source has no
/// path.
pub fn child(source: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    match source {
        Some(p) => {
            out.extend_from_slice(p);
            node(&mut out, 4, 3, &QIMG_GUID.to_bytes());
        }
        None => node(&mut out, 1, 4, &QIMG_GUID.to_bytes()),
    }
    out
}

/// `body` with the End node appended.
pub fn whole(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(&END);
    out
}

/// `body`, a File Path media node for `file` (UCS-2, NUL-terminated), and
/// End.
pub fn with_file(body: &[u8], file: &str) -> Vec<u8> {
    let mut data = Vec::new();
    for u in file.encode_utf16().chain(core::iter::once(0)) {
        data.extend_from_slice(&u.to_le_bytes());
    }
    let mut out = body.to_vec();
    node(&mut out, 4, 4, &data);
    out.extend_from_slice(&END);
    out
}
