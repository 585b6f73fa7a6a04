//! A bare-metal program with no global allocator that opens a qcow2 image
//! held in memory, reads it through the no-alloc reader, and checks a LUKS
//! header parse and a LUKS2 header read and unlock. If anything on these paths needed `alloc`, this binary
//! would fail to link ("no global memory allocator found").

#![no_std]
#![no_main]

use core::panic::PanicInfo;

use luks_core::io::{BlockIo, MemDevice};
use qcow_core::Qcow2;

/// A 64 KiB-cluster qcow2 v3 header with no tables: enough for `open` to
/// validate it; reading an empty image yields zeroes.
fn tiny_image(buf: &mut [u8]) {
    buf[0..4].copy_from_slice(b"QFI\xfb");
    buf[4..8].copy_from_slice(&3u32.to_be_bytes());
    buf[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
    buf[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // 1 MiB disk
    buf[36..40].copy_from_slice(&1u32.to_be_bytes()); // l1_size
    buf[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes()); // L1 in cluster 3
    buf[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes()); // refcount table
    buf[56..60].copy_from_slice(&1u32.to_be_bytes());
    buf[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
    buf[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
}

/// The entry point the bootloader would jump to.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    let mut image = [0u8; 4 * 65536];
    tiny_image(&mut image);
    let mut cache = [0u8; 4096];
    let mut sector = [0u8; 512];
    let ok = match Qcow2::open(MemDevice::new(&mut image), &mut cache) {
        Ok(mut img) => img.read_at(4096, &mut sector).is_ok() && sector.iter().all(|&b| b == 0),
        Err(_) => false,
    };
    let mut hdr = [0u8; 4096];
    let luks = luks_core::luks1::read_header(&mut MemDevice::new(&mut hdr)).is_err();
    // LUKS2: header, JSON metadata and (Argon2) unlock in caller memory.
    let mut dev = [0u8; 2 * 16384];
    let mut json = [0u8; 1024];
    let mut mem = [luks_core::luks2::Argon2Block::new(); 8];
    let luks2 = match luks_core::luks2::read_header(&mut MemDevice::new(&mut dev), &mut json) {
        Ok(h) => {
            luks_core::luks2::unlock(&mut MemDevice::new(&mut hdr), &h, b"pw", None, &mut mem)
                .is_err()
        }
        Err(_) => true,
    };
    halt(ok && luks && luks2)
}

fn halt(_ok: bool) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    halt(false)
}
