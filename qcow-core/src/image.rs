//! Opening and reading a qcow2 image without an allocator.
//!
//! [`Qcow2`] reads through a metadata cache it owns, of any storage `S:
//! AsMut<[u8]>` the caller hands it (a `&mut [u8]` in firmware, a `Vec<u8>`
//! with an allocator), that holds slices of L1, L2 and refcount tables ([`SLICE_BYTES`] each, at
//! most one cluster), so a 2 MiB-cluster image works with a 4 KiB cache.
//! Normal clusters are read straight into the caller's buffer, with
//! contiguous host runs coalesced into one device request. Compressed
//! clusters need two more caller buffers (see
//! [`Qcow2::with_compression_buffers`]).
//!
//! Backing files and external data files are devices the caller attaches;
//! the image only reports their names.

use core::fmt;
use core::marker::PhantomData;

use crate::decompress::{decompress, DecompressError};
use crate::entry::{self, CompressedDescriptor};
use crate::error::{Buffer, Error, LayerError, Limit, Problem, Structure, Unsupported};
use crate::header::{
    self, autoclear, compat, ext, incompat, BitmapsExt, CryptMethod, CryptoExt, FeatureName,
    Header, HeaderRepr,
};
use crate::limits::{
    MAX_CACHE_SLICES, MAX_L1_ENTRIES, MAX_NAME_LEN, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS,
    MAX_UNKNOWN_EXTENSIONS, SLICE_BYTES,
};
use crate::snapshot::{field as snap_field, SnapshotFixed, SnapshotInfo};
use crate::table::{L2Geometry, RefblockAt, RefcountGeometry};
use crate::units::{ClusterIndex, GuestOffset, HostOffset};
use crate::BlockIo;

mod open;
mod read;
mod snapshots;
pub use read::CompressedSpan;

// The checker's and the writer's way in to the reader's parsing.
#[cfg(feature = "alloc")]
pub(crate) use open::read_header_info;
use open::*;
// The checker's and the writer's way in to the reader's parsing.
#[cfg(feature = "alloc")]
pub(crate) use snapshots::read_snapshot_entry;

/// Sector size the image presents and the alignment of guest requests.
pub const SECTOR: u64 = 512;

/// Most bytes the snapshot table may span: QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;

/// A placeholder device for "no backing file" / "no external data file":
/// zero bytes long; never read by the image.
pub struct NoDevice<E>(PhantomData<fn() -> E>);

impl<E> NoDevice<E> {
    /// The placeholder.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<E> Default for NoDevice<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> fmt::Debug for NoDevice<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoDevice")
    }
}

impl<E: fmt::Debug + fmt::Display> BlockIo for NoDevice<E> {
    type Error = E;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, E> {
        Ok(0)
    }
    fn read_at(&mut self, _offset: u64, buf: &mut [u8]) -> Result<(), E> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), E> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), E> {
        Ok(())
    }
}

/// Decrypts data sectors in place; the hook for encrypted images.
///
/// For LUKS images the IV sector is `host_offset / 512`; for legacy AES it
/// is `guest_offset / 512`. Both are passed; `buf` is a whole number of
/// 512-byte sectors.
pub trait Decryptor {
    /// Decrypts `buf`, read from `host_offset`, holding guest bytes from
    /// `guest_offset`. Returns `false` on failure.
    fn decrypt(
        &mut self,
        host_offset: HostOffset,
        guest_offset: GuestOffset,
        buf: &mut [u8],
    ) -> bool;
}

impl<T: Decryptor + ?Sized> Decryptor for &mut T {
    fn decrypt(
        &mut self,
        host_offset: HostOffset,
        guest_offset: GuestOffset,
        buf: &mut [u8],
    ) -> bool {
        (**self).decrypt(host_offset, guest_offset, buf)
    }
}

/// The decryptor type of an image with none attached (the default `K` of
/// [`Qcow2`]); never called, as the reader refuses encrypted data without
/// a decryptor.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDecryptor;

impl Decryptor for NoDecryptor {
    fn decrypt(&mut self, _host: HostOffset, _guest: GuestOffset, _buf: &mut [u8]) -> bool {
        false
    }
}

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Not allocated in this image: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zero; `host` is a preallocated host range, if any.
    Zero {
        /// Host offset of the preallocated range.
        host: Option<HostOffset>,
    },
    /// Data at `host` in the image file, or in the external data file when
    /// the image has one.
    Data {
        /// Host offset of the first byte of the range.
        host: HostOffset,
    },
    /// Part of a compressed cluster.
    Compressed(CompressedDescriptor),
    /// An unallocated subcluster of an allocated cluster (extended L2):
    /// reads through to the backing file like [`MapKind::Unallocated`],
    /// but has a host range reserved at `host`.
    UnallocatedAlloc {
        /// Host offset of the reserved range.
        host: HostOffset,
    },
}

/// A run of guest bytes with one kind, contiguous on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Start of the run (a guest offset, kept `u64` like the reader's
    /// `read`/`map` arguments).
    pub guest_offset: u64,
    /// Bytes in the run.
    pub len: u64,
    /// What the run maps to.
    pub kind: MapKind,
}

/// Most bytes of the bitmap directory read: QEMU's `BME_MAX_DIRECTORY_SIZE`
/// (64 MiB).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 * 1024 * 1024;

/// One persistent dirty bitmap (kept opaque beyond what `qemu-img info`
/// shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags: bit 0 in-use, bit 1 auto, bit 2 extra-data-compatible.
    pub flags: u32,
    /// Bitmap type (1: dirty tracking).
    pub bitmap_type: u8,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Name.
    pub name: Name,
}

impl BitmapInfo {
    /// Bytes of the fixed part of a directory entry.
    pub const FIXED_LEN: usize = 24;
    fn parse_fixed(f: &[u8; Self::FIXED_LEN]) -> Self {
        Self {
            table_offset: header::be64(f, 0..8),
            table_size: header::be32(f, 8..12),
            flags: header::be32(f, 12..16),
            bitmap_type: f[16],
            granularity_bits: f[17],
            name: Name::new(),
        }
    }
    /// Granularity in bytes (0 if the field is out of range).
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits))
            .unwrap_or(0)
    }
    /// The `in-use` flag.
    pub fn in_use(&self) -> bool {
        self.flags & 1 != 0
    }
    /// The `auto` flag.
    pub fn auto(&self) -> bool {
        self.flags & 2 != 0
    }
    /// The name as text.
    pub fn name_str(&self) -> Option<&str> {
        core::str::from_utf8(&self.name).ok()
    }
}

/// Where an unknown header extension lies (kept so a writer can preserve it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtensionLocation {
    /// Extension type.
    pub ext_type: u32,
    /// Offset of its payload in the image.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

/// A file name from the header (bytes; usually UTF-8).
pub type Name = heapless::Vec<u8, MAX_NAME_LEN>;

/// Everything the header and its extensions say.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The header.
    pub header: HeaderRepr,
    /// Backing file name (empty: none).
    pub backing_file: Name,
    /// Backing format name from the extension (empty: not given).
    pub backing_format: Name,
    /// External data file name from the extension.
    pub data_file: Option<Name>,
    /// Full disk encryption header pointer.
    pub crypto: Option<CryptoExt>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Feature name table: payload offset and length.
    pub feature_table: Option<(u64, u32)>,
    /// Unknown extensions (up to [`MAX_UNKNOWN_EXTENSIONS`]).
    pub unknown_extensions: heapless::Vec<ExtensionLocation, MAX_UNKNOWN_EXTENSIONS>,
}

fn as_str(n: &[u8]) -> Option<&str> {
    if n.is_empty() {
        None
    } else {
        core::str::from_utf8(n).ok()
    }
}

impl ImageInfo {
    /// Virtual size in bytes: the header's size in whole 512-byte sectors
    /// (QEMU 10.0.2 keeps `size / 512` sectors, so a size of 1000 reads as
    /// 512 bytes and 511 as 0).
    pub fn virtual_size(&self) -> u64 {
        sector_floor(self.header.size)
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }
    /// `compat`: "0.10" for v2, "1.1" for v3.
    pub fn compat(&self) -> &'static str {
        if self.header.version >= 3 {
            "1.1"
        } else {
            "0.10"
        }
    }
    /// `compression-type`: "zlib" or "zstd".
    pub fn compression_type(&self) -> &'static str {
        if self.header.compression_type == header::COMPRESSION_ZSTD {
            "zstd"
        } else {
            "zlib"
        }
    }
    /// Dirty bit (incompatible bit 0).
    pub fn dirty(&self) -> bool {
        self.header.incompatible_features & incompat::DIRTY != 0
    }
    /// Corrupt bit (incompatible bit 1).
    pub fn corrupt(&self) -> bool {
        self.header.incompatible_features & incompat::CORRUPT != 0
    }
    /// Lazy refcounts (compatible bit 0).
    pub fn lazy_refcounts(&self) -> bool {
        self.header.compatible_features & compat::LAZY_REFCOUNTS != 0
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        self.header.refcount_bits()
    }
    /// Extended L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.header.extended_l2()
    }
    /// `data-file-raw` (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.header.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }
    /// Backing file name as text.
    pub fn backing_file(&self) -> Option<&str> {
        as_str(&self.backing_file)
    }
    /// Backing format as text.
    pub fn backing_format(&self) -> Option<&str> {
        as_str(&self.backing_format)
    }
    /// External data file name as text.
    pub fn data_file(&self) -> Option<&str> {
        self.data_file.as_deref().and_then(as_str)
    }
    /// True when the header sets the external-data-file incompatible bit
    /// but no data file name extension names the file. QEMU refuses such
    /// an image for I/O ("'data-file' is required for this image"); guest
    /// data must never be read as zeros from it.
    pub fn data_file_name_missing(&self) -> bool {
        self.header.has_data_file() && self.data_file.is_none()
    }
    /// `encrypt.format`: "aes" (1) or "luks" (2).
    pub fn encryption_format(&self) -> Option<&'static str> {
        match self.header.crypt_method {
            CryptMethod::Aes => Some("aes"),
            CryptMethod::Luks => Some("luks"),
            CryptMethod::None => None,
        }
    }
}

/// The metadata slice cache over caller-provided storage.
struct Cache<S> {
    mem: S,
    slice: usize,
    slots: usize,
    tags: [u64; MAX_CACHE_SLICES],
    used: [u64; MAX_CACHE_SLICES],
    tick: u64,
    last: usize,
}

const EMPTY: u64 = u64::MAX;

impl<S> Cache<S> {
    fn find(&mut self, key: u64) -> Option<usize> {
        let hit = if self.tags.get(self.last) == Some(&key) {
            Some(self.last)
        } else {
            self.tags[..self.slots].iter().position(|&t| t == key)
        }?;
        self.tick = self.tick.wrapping_add(1);
        self.used[hit] = self.tick;
        self.last = hit;
        Some(hit)
    }
    fn victim(&mut self) -> usize {
        let mut best = 0usize;
        for i in 0..self.slots {
            if self.tags[i] == EMPTY {
                best = i;
                break;
            }
            if self.used[i] < self.used[best] {
                best = i;
            }
        }
        best
    }
}

/// The non-generic state of an open image.
struct State<S, K> {
    info: ImageInfo,
    /// Active L1 table (the image's, or a snapshot's).
    l1_offset: u64,
    l1_size: u32,
    size: u64,
    snapshot: Option<u32>,
    file_size: u64,
    cache: Cache<S>,
    /// Compressed cluster input and output buffers, once given.
    cin: Option<S>,
    cout: Option<S>,
    cout_tag: Option<u64>,
    decryptor: Option<K>,
    ignore_backing: bool,
    bounce: [u8; 512],
}

/// A qcow2 image opened read-only over device `D`, its buffers in storage
/// `S` (`&mut [u8]`, `Vec<u8>`, `Box<[u8]>`, ...: owned by the reader, so
/// nothing outlives it), with backing device `B`, external data file device
/// `F` and decryptor `K`.
///
/// `B`, `F` and `K` are optional at run time: an image without one holds
/// `None`, and [`Qcow2::with_backing_opt`], [`Qcow2::with_data_file_opt`]
/// and [`Qcow2::with_decryptor_opt`] name the type either way.
pub struct Qcow2<
    D: BlockIo,
    S,
    B = NoDevice<<D as BlockIo>::Error>,
    F = NoDevice<<D as BlockIo>::Error>,
    K = NoDecryptor,
> {
    dev: D,
    backing: Option<B>,
    backing_size: u64,
    data: Option<F>,
    st: State<S, K>,
}

/// An image, or why it could not be opened or finished.
type Opened<D, S, B, F, K> = Result<Qcow2<D, S, B, F, K>, Error<<D as BlockIo>::Error>>;

fn io<E>(structure: Structure, offset: u64) -> impl FnOnce(E) -> Error<E> {
    move |source| Error::Io {
        source,
        structure,
        offset,
    }
}

fn round_up_sector(v: u64) -> u64 {
    v.checked_next_multiple_of(SECTOR).unwrap_or(!(SECTOR - 1))
}

/// Reads `buf.len()` bytes at any `offset` through a 512-byte bounce.
fn read_unaligned<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    offset: u64,
    buf: &mut [u8],
    structure: Structure,
) -> Result<(), Error<D::Error>> {
    use luks_core::io::{read_bytes, BytesError};
    read_bytes(dev, offset, buf, bounce).map_err(|e| match e {
        BytesError::Device(source) => Error::Io {
            source,
            structure,
            offset,
        },
        BytesError::BounceTooSmall { sector_size, .. } | BytesError::BadSectorSize(sector_size) => {
            Error::BufferTooSmall {
                what: Buffer::Bounce,
                needed: sector_size as usize,
                given: 512,
            }
        }
        _ => Error::corrupt(structure, offset, Problem::Overflow),
    })
}

fn read_name<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    offset: u64,
    len: u32,
    structure: Structure,
) -> Result<Name, Error<D::Error>> {
    let mut name = Name::new();
    if len as usize > MAX_NAME_LEN {
        return Err(Error::Limit {
            structure,
            offset,
            limit: Limit::NameLength,
            value: u64::from(len),
            max: MAX_NAME_LEN as u64,
        });
    }
    name.resize(len as usize, 0)
        .map_err(|_| Error::corrupt(structure, offset, Problem::Overflow))?;
    read_unaligned(dev, bounce, offset, &mut name, structure)?;
    Ok(name)
}

/// A disk size as QEMU sees it: whole 512-byte sectors, the tail dropped.
fn sector_floor(size: u64) -> u64 {
    size & !511
}

impl<D, S, B, F, K> BlockIo for Qcow2<D, S, B, F, K>
where
    D: BlockIo,
    S: AsMut<[u8]>,
    K: Decryptor,
    B: BlockIo,
    B::Error: LayerError<D::Error>,
    F: BlockIo,
    F::Error: LayerError<D::Error>,
{
    type Error = Error<D::Error>;
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.st.size)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.read(offset, buf)
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), Self::Error> {
        Err(Error::ReadOnly)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<(), Self::Error> {
        Err(Error::ReadOnly)
    }
}

#[cfg(test)]
mod tests;
