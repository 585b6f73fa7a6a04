//! A bare-metal program with no global allocator that opens a qcow2 image
//! held in memory and reads it through the no-alloc reader; with feature
//! `luks1` it also unlocks an encrypted qcow2 image and parses a LUKS1
//! header, with `luks2` it reads a LUKS2 header and unlocks it (Argon2). If
//! anything on these paths needed `alloc`, this binary would fail to link
//! ("no global memory allocator found").
//!
//! The inputs pass through `black_box`, so the optimiser cannot prove a
//! path dead and leave it out: each build links what its features name,
//! which is what `cargo xtask core-sizes` measures.

#![no_std]
#![no_main]

use core::hint::black_box;
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

/// Opens the qcow2 image in `image` (decrypting with its key when it is
/// encrypted and the build has `luks1`) and checks a sector reads as zeroes.
fn read_qcow2(image: &mut [u8], passphrase: &[u8]) -> bool {
    let mut cache = [0u8; 4096];
    let mut sector = [0u8; 512];
    let Ok(img) = Qcow2::open(MemDevice::new(&mut *image), &mut cache[..]) else {
        return false;
    };
    #[cfg(feature = "luks1")]
    {
        // Unlocked in place: one open, the key owned by the reader.
        let Ok(mut img) = img.unlock(passphrase) else {
            return false;
        };
        img.read_at(4096, &mut sector).is_ok() && sector.iter().all(|&b| b == 0)
    }
    #[cfg(not(feature = "luks1"))]
    {
        let _ = passphrase;
        let mut img = img;
        img.read_at(4096, &mut sector).is_ok() && sector.iter().all(|&b| b == 0)
    }
}

/// A raw LUKS1 header in `hdr`: parse it and try `passphrase`.
#[cfg(feature = "luks1")]
fn luks1(hdr: &mut [u8], passphrase: &[u8]) -> bool {
    let mut dev = MemDevice::new(hdr);
    match luks_core::luks1::read_header(&mut dev) {
        Ok(h) => luks_core::luks1::unlock(&mut dev, &h, passphrase, None).is_err(),
        Err(_) => true,
    }
}

/// A raw LUKS2 header in `dev`: header, JSON metadata and (Argon2) unlock
/// in caller memory.
#[cfg(feature = "luks2")]
fn luks2(dev: &mut [u8], passphrase: &[u8]) -> bool {
    let mut json = [0u8; 1024];
    let mut mem = [luks_core::luks2::Argon2Block::new(); 8];
    let mut dev = MemDevice::new(dev);
    match luks_core::luks2::read_header(&mut dev, &mut json) {
        Ok(h) => luks_core::luks2::unlock(&mut dev, &h, passphrase, None, &mut mem).is_err(),
        Err(_) => true,
    }
}

/// The entry point the bootloader would jump to.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    let mut image = [0u8; 4 * 65536];
    tiny_image(&mut image);
    let passphrase = black_box(*b"pw");
    // Opaque to the optimiser: a crypt_method it cannot see keeps the
    // decryption paths in the `luks1` build.
    let ok = read_qcow2(black_box(&mut image), &passphrase)
        && luks_core::probe(black_box(&image[..8])).is_none();
    #[cfg(feature = "luks1")]
    let ok = ok && luks1(black_box(&mut [0u8; 4096]), &passphrase);
    #[cfg(feature = "luks2")]
    let ok = ok && luks2(black_box(&mut [0u8; 2 * 16384]), &passphrase);
    halt(ok)
}

fn halt(ok: bool) -> ! {
    // Observed, so nothing that computes `ok` can be optimised away.
    black_box(ok);
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    halt(false)
}
