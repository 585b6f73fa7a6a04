//! Opening the image: qcow2 (plain, compressed, LUKS-in-qcow2) or raw
//! LUKS1/LUKS2, unlocked with a passphrase, as one [`Reader`] that the
//! installed Block I/O device reads through.
//!
//! Working memory is fixed: every buffer below is allocated once per
//! image layer and never grows with the image.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Display;

use luks_core::io::BlockIo;
use luks_core::luks1::{self, HeaderRepr, VolumeKey};
use luks_core::luks2::{self, Argon2Block, Luks2Header};
use luks_core::LuksVolume;
use qcow_core::error::LayerError;
use qcow_core::{CryptMethod, Qcow2};
use uefi::println;

use crate::secret::{Secrets, TRIES};

/// qcow2 metadata cache (L2 table slices).
pub const CACHE: usize = 64 * 1024;
/// Largest cluster a compressed image may use (QEMU's default).
pub const MAX_COMPRESSED_CLUSTER: usize = 64 * 1024;
/// Compressed input: a cluster plus the sector it may spill into.
pub const COMPRESSED_IN: usize = MAX_COMPRESSED_CLUSTER + 512;
/// Per-layer memory of a qcow2 image.
pub const PER_LAYER: usize = CACHE + COMPRESSED_IN + MAX_COMPRESSED_CLUSTER;
/// LUKS2 JSON text accepted (freed after the header is parsed).
pub const LUKS2_JSON: usize = 64 * 1024;
/// The most Argon2 memory a LUKS2 key slot may take from the pool (KiB,
/// freed after unlocking).
pub const MAX_ARGON2_KIB: usize = 1024 * 1024;

/// The opened virtual disk, as the installed device reads it.
pub trait Reader {
    /// Reads `buf.len()` bytes (whole 512-byte blocks) at `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// Largest sector a device under the reader may have (LUKS2 allows 4 KiB).
pub const MAX_SECTOR: usize = 4096;

/// Any sector device whose errors print, as a [`Reader`]. The firmware
/// asks for 512-byte blocks; a device with larger sectors (a LUKS2 volume
/// with 4 KiB sectors) is read through a one-sector bounce buffer.
pub struct Layer<T> {
    dev: T,
    bounce: Box<[u8]>,
}

impl<T: BlockIo> Layer<T> {
    /// Wraps `dev`, with a bounce buffer of one of its sectors.
    pub fn new(dev: T) -> Self {
        let sector = (dev.sector_size() as usize).clamp(512, MAX_SECTOR);
        Self {
            dev,
            bounce: vec![0u8; sector].into_boxed_slice(),
        }
    }
}

impl<T: BlockIo> Reader for Layer<T>
where
    T::Error: Display,
{
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let len = buf.len();
        luks_core::io::read_bytes(&mut self.dev, offset, buf, &mut self.bounce)
            .map_err(|e| format!("request of {len} bytes at offset {offset}: {e}"))
    }
}

/// An opened image.
pub struct Opened {
    /// The virtual disk.
    pub reader: Box<dyn Reader>,
    /// `qcow2`, `qcow2-luks`, `luks1` or `luks2`.
    pub kind: &'static str,
    /// Image layers (1 + backing files).
    pub layers: usize,
    /// Virtual size in bytes.
    pub size: u64,
}

/// Why no image was opened.
pub enum Failure {
    /// A structural or I/O problem (printed as QIMG-ERROR).
    Error(String),
    /// Every passphrase was wrong, or no passphrase could be had
    /// (printed as QIMG-FAIL).
    Fail(String),
}

impl<T: Display> From<T> for Failure {
    fn from(e: T) -> Self {
        Self::Error(format!("{e}"))
    }
}

/// The image format from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// QEMU qcow2 (`QFI\xfb`).
    Qcow2,
    /// LUKS version 1.
    Luks1,
    /// LUKS version 2.
    Luks2,
}

/// Names the format of a first sector, if it is one the program opens.
pub fn probe(head: &[u8]) -> Option<Kind> {
    if head.starts_with(b"QFI\xfb") {
        Some(Kind::Qcow2)
    } else {
        match luks2::version(head) {
            Some(1) => Some(Kind::Luks1),
            Some(2) => Some(Kind::Luks2),
            _ => None,
        }
    }
}

/// A zeroed buffer that lives for the rest of boot (a reader's fixed
/// working memory, allocated once).
pub fn leaked(len: usize) -> &'static mut [u8] {
    Box::leak(vec![0u8; len].into_boxed_slice())
}

/// Asks for passphrases until `attempt` opens `name` with one. `attempt`
/// returns `Ok(None)` for a wrong passphrase.
fn with_passphrase<T>(
    secrets: &Secrets,
    name: &str,
    mut attempt: impl FnMut(&[u8]) -> Result<Option<T>, Failure>,
) -> Result<T, Failure> {
    let mut n = 1;
    while let Some(mut pass) = secrets.get(name, n).map_err(Failure::Error)? {
        let result = attempt(&pass);
        pass.fill(0);
        core::hint::black_box(&pass);
        if let Some(t) = result? {
            return Ok(t);
        }
        println!("QIMG-WRONG-PASSPHRASE try={n}/{TRIES}: no key slot of {name} opens with this passphrase");
        n += 1;
    }
    Err(Failure::Fail(match secrets {
        Secrets::File(_) => format!("the passphrase file opens no key slot of {name}"),
        Secrets::Prompt => format!("{TRIES} wrong passphrases for {name}"),
    }))
}

/// Opens a qcow2 image on `dev` (no backing file), unlocking it if it is
/// encrypted.
pub fn open_qcow2<D>(dev: D, name: &str, secrets: &Secrets) -> Result<Opened, Failure>
where
    D: BlockIo + 'static,
    D::Error: Display + core::fmt::Debug,
{
    let img = Qcow2::open(dev, leaked(CACHE))
        .map_err(|e| Failure::Error(format!("{name}: {e}")))?
        .with_compression_buffers(leaked(COMPRESSED_IN), leaked(MAX_COMPRESSED_CLUSTER));
    if let Some(b) = img.info().backing_file() {
        return Err(Failure::Error(format!(
            "{name}: the image has backing file `{b}`; backing files are opened only for image=\\path (a file on the boot volume)"
        )));
    }
    if img.info().data_file().is_some() {
        return Err(Failure::Error(format!(
            "{name}: qcow2 header extension: external data files are not supported by qimg-efi"
        )));
    }
    unlock_qcow2(img, 1, name, secrets)
}

/// Unlocks an opened qcow2 image (backing files attached) if it is
/// encrypted, asking for passphrases as needed.
pub fn unlock_qcow2<D, B>(
    mut img: Qcow2<D, &'static mut [u8], B>,
    layers: usize,
    name: &str,
    secrets: &Secrets,
) -> Result<Opened, Failure>
where
    D: BlockIo + 'static,
    D::Error: Display + core::fmt::Debug,
    B: BlockIo + 'static,
    B::Error: LayerError<D::Error>,
{
    let kind = match img.info().header.crypt_method {
        CryptMethod::None => "qcow2",
        CryptMethod::Luks => "qcow2-luks",
        CryptMethod::Aes => "qcow2-aes",
    };
    let size = img.virtual_size();
    let key = if kind == "qcow2" {
        None
    } else {
        with_passphrase(secrets, name, |pass| match img.unlock_key(pass) {
            Ok(k) => Ok(Some(k)),
            Err(qcow_core::Error::Luks(luks_core::Error::WrongPassphrase)) => Ok(None),
            Err(e) => Err(Failure::Error(format!("{name}: {e}"))),
        })?
    };
    let img = img.with_decryptor_opt(key);
    Ok(Opened {
        reader: Box::new(Layer::new(img)),
        kind,
        layers,
        size,
    })
}

/// A parsed and unlocked LUKS header.
enum Unlocked {
    V1(Box<HeaderRepr>, VolumeKey),
    V2(Box<Luks2Header>, VolumeKey),
}

/// Reads the LUKS header on `hdr` and unlocks a key slot.
fn unlock_luks<H>(
    hdr: &mut H,
    name: &str,
    secrets: &Secrets,
) -> Result<(Unlocked, &'static str), Failure>
where
    H: BlockIo,
    H::Error: Display + core::fmt::Debug,
{
    let mut head = vec![0u8; (hdr.sector_size() as usize).clamp(512, 4096)];
    hdr.read_at(0, &mut head)
        .map_err(|e| Failure::Error(format!("{name}: LUKS header at byte 0: {e}")))?;
    if luks2::version(&head) == Some(2) {
        let h = {
            let mut json = vec![0u8; LUKS2_JSON];
            luks2::read_header(hdr, &mut json)
                .map_err(|e| Failure::Error(format!("{name}: {e}")))?
        };
        let blocks = h
            .meta
            .keyslots
            .iter()
            .filter_map(luks2::argon2_blocks)
            .max()
            .unwrap_or(0);
        if blocks > MAX_ARGON2_KIB {
            return Err(Failure::Error(format!(
                "{name}: LUKS2 JSON keyslots: Argon2 asks for {blocks} KiB, more than the {MAX_ARGON2_KIB} KiB qimg-efi allows"
            )));
        }
        let mut mem = Vec::new();
        mem.try_reserve_exact(blocks).map_err(|_| {
            Failure::Error(format!(
                "{name}: the firmware has no {blocks} KiB for Argon2"
            ))
        })?;
        mem.resize(blocks, Argon2Block::new());
        let key = with_passphrase(secrets, name, |pass| {
            match luks2::unlock(hdr, &h, pass, None, &mut mem) {
                Ok((k, _)) => Ok(Some(k)),
                Err(luks_core::Error::WrongPassphrase) => Ok(None),
                Err(e) => Err(Failure::Error(format!("{name}: {e}"))),
            }
        })?;
        drop(mem);
        Ok((Unlocked::V2(Box::new(h), key), "luks2"))
    } else {
        let h = luks1::read_header(hdr).map_err(|e| Failure::Error(format!("{name}: {e}")))?;
        let key = with_passphrase(secrets, name, |pass| {
            match luks1::unlock(hdr, &h, pass, None) {
                Ok((k, _)) => Ok(Some(k)),
                Err(luks_core::Error::WrongPassphrase) => Ok(None),
                Err(e) => Err(Failure::Error(format!("{name}: {e}"))),
            }
        })?;
        Ok((Unlocked::V1(Box::new(h), key), "luks1"))
    }
}

/// Opens a raw LUKS volume: the header on `header` (a detached header
/// file) or on `data` itself.
pub fn open_luks<D, H>(
    mut data: D,
    header: Option<H>,
    name: &str,
    secrets: &Secrets,
) -> Result<Opened, Failure>
where
    D: BlockIo + 'static,
    D::Error: Display + core::fmt::Debug,
    H: BlockIo,
    H::Error: Display + core::fmt::Debug,
{
    let (unlocked, kind) = match header {
        Some(mut h) => unlock_luks(&mut h, name, secrets)?,
        None => unlock_luks(&mut data, name, secrets)?,
    };
    let mut vol = match &unlocked {
        Unlocked::V1(h, k) => LuksVolume::open_luks1(data, h, k),
        Unlocked::V2(h, k) => LuksVolume::open_luks2(data, h, k),
    }
    .map_err(|e| Failure::Error(format!("{name}: {e}")))?;
    drop(unlocked);
    let size = vol
        .size()
        .map_err(|e| Failure::Error(format!("{name}: {e}")))?;
    Ok(Opened {
        reader: Box::new(Layer::new(vol)),
        kind,
        layers: 1,
        size,
    })
}
