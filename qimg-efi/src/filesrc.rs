//! `image=\path`: the image (and its backing files and detached header)
//! as files on the boot volume, mapped to their clusters by [`crate::fat`]
//! and read through the boot partition's own Block I/O protocol (opened
//! shared), never through the firmware's FAT driver once the device is
//! installed.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use core::cell::RefCell;
use core::fmt;

use luks_core::io::BlockIo;
use qcow_core::{CryptMethod, Qcow2};
use uefi::proto::media::block::BlockIO;
use uefi::proto::media::file::{File, FileAttribute, FileMode};
use uefi::proto::media::fs::SimpleFileSystem;
use uefi::{CString16, Handle};

use crate::disk::{Disk, DiskError};
use crate::fat::{self, FatError, FatFile, FatVolume};
use crate::ffi;
use crate::image::{self, Failure, Kind, Opened, Reader};
use crate::secret::Secrets;

/// Most backing files below the image (QEMU-made chains are far shorter).
pub const MAX_BACKING_DEPTH: usize = 8;
/// Bytes of the image compared between the FAT reader and the
/// firmware's file protocol before the device is installed.
pub const CROSS_CHECK: usize = 64 * 1024;

/// The boot partition, shared by every open file.
#[derive(Clone)]
pub struct Shared(Rc<RefCell<Disk>>);

impl BlockIo for Shared {
    type Error = DiskError;
    fn sector_size(&self) -> u32 {
        self.0.borrow().sector_size()
    }
    fn size(&mut self) -> Result<u64, DiskError> {
        self.0.borrow_mut().size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.borrow_mut().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.0.borrow_mut().write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
}

/// One device error type for every layer, so a chain of any depth has
/// one type: the message names the file, structure and byte offset.
#[derive(Debug)]
pub struct IoErr(String);

impl fmt::Display for IoErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A file on the boot volume, its errors named with its path.
pub struct Named {
    file: FatFile<Shared>,
    path: String,
}

impl BlockIo for Named {
    type Error = IoErr;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, IoErr> {
        Ok(self.file.len().next_multiple_of(512))
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoErr> {
        let path = &self.path;
        self.file
            .read_at(offset, buf)
            .map_err(|e| IoErr(format!("{path}: {e}")))
    }
    fn write_at(&mut self, offset: u64, _buf: &[u8]) -> Result<(), IoErr> {
        Err(IoErr(format!(
            "{}: write at byte {offset} refused (read-only)",
            self.path
        )))
    }
    fn flush(&mut self) -> Result<(), IoErr> {
        Ok(())
    }
}

/// A whole opened layer (qcow2 or raw) behind one type, as a backing
/// device of the layer above.
struct Erased {
    reader: Box<dyn Reader>,
    size: u64,
}

impl BlockIo for Erased {
    type Error = IoErr;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, IoErr> {
        Ok(self.size)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoErr> {
        self.reader.read(offset, buf).map_err(IoErr)
    }
    fn write_at(&mut self, offset: u64, _buf: &[u8]) -> Result<(), IoErr> {
        Err(IoErr(format!(
            "backing file: write at byte {offset} refused (read-only)"
        )))
    }
    fn flush(&mut self) -> Result<(), IoErr> {
        Ok(())
    }
}

fn fat_err<E: fmt::Display>(e: FatError<E>) -> Failure {
    Failure::Error(format!("{e}"))
}

/// The mounted boot volume.
pub struct Volume {
    fat: FatVolume<Shared>,
    esp: Handle,
    /// The buffer alignment the boot partition's Block I/O needs.
    pub align: u32,
}

impl Volume {
    /// Mounts the FAT file system of the boot partition `esp` (its Block
    /// I/O opened shared, so the firmware's FAT driver stays connected).
    pub fn mount(esp: Handle) -> Result<Self, Failure> {
        let opened = ffi::open_shared::<BlockIO>(esp).ok();
        let disk = opened
            .and_then(|p| Disk::new(p, "boot volume".to_string()))
            .ok_or_else(|| {
                Failure::Error("the boot volume has no Block I/O protocol with media".to_string())
            })?;
        let align = disk.io_align();
        let fat = FatVolume::mount(Shared(Rc::new(RefCell::new(disk))))
            .map_err(|e| Failure::Error(format!("boot volume: {e}")))?;
        Ok(Self { fat, esp, align })
    }

    fn open(&self, path: &str) -> Result<Named, Failure> {
        let file = self.fat.open(path).map_err(fat_err)?;
        Ok(Named {
            file,
            path: path.to_string(),
        })
    }

    /// Compares the first [`CROSS_CHECK`] bytes of `path` read by the FAT
    /// reader with the same bytes read through EFI_FILE_PROTOCOL.
    fn cross_check(&self, path: &str, file: &mut Named) -> Result<(), Failure> {
        let len = usize::try_from(file.file.len())
            .unwrap_or(usize::MAX)
            .min(CROSS_CHECK);
        let mut ours = vec![0u8; len.next_multiple_of(512)];
        file.read_at(0, &mut ours)
            .map_err(|e| Failure::Error(format!("{e}")))?;
        let theirs = read_prefix(self.esp, path, len)?;
        if let Some(at) = ours[..len]
            .iter()
            .zip(theirs.iter())
            .position(|(a, b)| a != b)
        {
            return Err(Failure::Error(format!(
                "{path}: byte {at} read through the FAT reader differs from the firmware's file protocol; not trusting the cluster map"
            )));
        }
        if theirs.len() != len {
            return Err(Failure::Error(format!(
                "{path}: the firmware's file protocol gave {} of the first {len} bytes",
                theirs.len()
            )));
        }
        Ok(())
    }
}

/// The first `len` bytes of `path` through the firmware's file protocol.
fn read_prefix(esp: Handle, path: &str, len: usize) -> Result<alloc::vec::Vec<u8>, Failure> {
    let fail = |what: &str, s: uefi::Status| {
        Failure::Error(format!(
            "{path}: {what} through EFI_FILE_PROTOCOL failed: {s:?}"
        ))
    };
    let name = CString16::try_from(path)
        .map_err(|_| Failure::Error(format!("{path}: not a UCS-2 path")))?;
    let mut sfs = ffi::open_shared::<SimpleFileSystem>(esp)
        .map_err(|e| fail("opening the volume", e.status()))?;
    let mut root = sfs
        .open_volume()
        .map_err(|e| fail("opening the root", e.status()))?;
    let handle = root
        .open(&name, FileMode::Read, FileAttribute::empty())
        .map_err(|e| fail("opening", e.status()))?;
    let mut file = handle
        .into_regular_file()
        .ok_or_else(|| Failure::Error(format!("{path}: not a regular file")))?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = file
            .read(&mut buf[got..])
            .map_err(|e| fail("reading", e.status()))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// A layer's reader, its virtual size and the layers it spans.
struct Layer {
    erased: Erased,
    layers: usize,
}

/// Opens `path` as a backing layer (qcow2 or raw, unencrypted) with its own
/// backing files, `depth` layers below the image.
fn open_backing(
    vol: &Volume,
    path: &str,
    format: Option<&str>,
    depth: usize,
) -> Result<Layer, Failure> {
    if depth > MAX_BACKING_DEPTH {
        return Err(Failure::Error(format!(
            "{path}: backing chain deeper than {MAX_BACKING_DEPTH} files"
        )));
    }
    let mut file = vol.open(path)?;
    let mut head = [0u8; 512];
    file.read_at(0, &mut head)
        .map_err(|e| Failure::Error(format!("{e}")))?;
    let is_qcow2 = image::probe(&head) == Some(Kind::Qcow2) && format != Some("raw");
    if !is_qcow2 {
        let size = file.file.len();
        return Ok(Layer {
            erased: Erased {
                reader: Box::new(image::Layer::new(file)),
                size,
            },
            layers: 1,
        });
    }
    let (reader, size, layers, crypt) = open_qcow2_layer(vol, path, file, depth)?;
    if crypt != CryptMethod::None {
        return Err(Failure::Error(format!(
            "{path}: qcow2 header at byte 32: encrypted backing files are not supported by qimg-efi"
        )));
    }
    Ok(Layer {
        erased: Erased { reader, size },
        layers,
    })
}

type Img = Qcow2<Named, &'static mut [u8], Erased>;

/// Opens a qcow2 file with its backing chain attached (not unlocked).
fn open_qcow2_chain(
    vol: &Volume,
    path: &str,
    file: Named,
    depth: usize,
) -> Result<(Img, usize), Failure> {
    let img = Qcow2::open(file, image::leaked(image::CACHE))
        .map_err(|e| Failure::Error(format!("{path}: {e}")))?
        .with_compression_buffers(
            image::leaked(image::COMPRESSED_IN),
            image::leaked(image::MAX_COMPRESSED_CLUSTER),
        );
    if img.info().data_file().is_some() {
        return Err(Failure::Error(format!(
            "{path}: qcow2 header extension: external data files are not supported by qimg-efi"
        )));
    }
    let backing = match img.info().backing_file() {
        None => None,
        Some(name) => {
            let bpath = fat::sibling(path, name);
            let fmt = img.info().backing_format().map(str::to_string);
            Some(open_backing(vol, &bpath, fmt.as_deref(), depth + 1)?)
        }
    };
    let layers = 1 + backing.as_ref().map_or(0, |b| b.layers);
    let img = img
        .with_backing_opt(backing.map(|b| b.erased))
        .map_err(|e| Failure::Error(format!("{path}: {e}")))?;
    Ok((img, layers))
}

fn open_qcow2_layer(
    vol: &Volume,
    path: &str,
    file: Named,
    depth: usize,
) -> Result<(Box<dyn Reader>, u64, usize, CryptMethod), Failure> {
    let (img, layers) = open_qcow2_chain(vol, path, file, depth)?;
    let size = img.virtual_size();
    let crypt = img.info().header.crypt_method;
    Ok((Box::new(image::Layer::new(img)), size, layers, crypt))
}

/// Opens the image file `path` (with `header`, a detached LUKS header
/// file), cross-checks its first bytes against the firmware's file
/// protocol, and unlocks it.
pub fn open(
    vol: &Volume,
    path: &str,
    header: Option<&str>,
    secrets: &Secrets,
) -> Result<Opened, Failure> {
    let mut file = vol.open(path)?;
    vol.cross_check(path, &mut file)?;
    let name = path.to_string();
    if let Some(h) = header {
        let mut hdr = vol.open(h)?;
        vol.cross_check(h, &mut hdr)?;
        return image::open_luks(file, Some(hdr), &name, secrets);
    }
    let mut head = [0u8; 512];
    file.read_at(0, &mut head)
        .map_err(|e| Failure::Error(format!("{e}")))?;
    match image::probe(&head) {
        Some(Kind::Qcow2) => {
            let (img, layers) = open_qcow2_chain(vol, path, file, 0)?;
            image::unlock_qcow2(img, layers, &name, secrets)
        }
        Some(Kind::Luks1 | Kind::Luks2) => {
            image::open_luks::<Named, Named>(file, None, &name, secrets)
        }
        None => Err(Failure::Error(format!(
            "{path}: byte 0: neither a qcow2 nor a LUKS header (and no header= given)"
        ))),
    }
}
