//! Opening and reading a qcow2 image without an allocator.
//!
//! [`Qcow2`] reads through a caller-provided metadata cache (`&mut [u8]`)
//! that holds slices of L1, L2 and refcount tables ([`SLICE_BYTES`] each, at
//! most one cluster), so a 2 MiB-cluster image works with a 4 KiB cache.
//! Normal clusters are read straight into the caller's buffer, with
//! contiguous host runs coalesced into one device request. Compressed
//! clusters need two more caller buffers (see
//! [`Qcow2::with_compression_buffers`]).
//!
//! Backing files and external data files are devices the caller attaches;
//! the image only reports their names.

#![warn(clippy::arithmetic_side_effects)]

use core::fmt;
use core::marker::PhantomData;

use crate::decompress::{decompress, DecompressError};
use crate::entry::{self, CompressedDescriptor};
use crate::error::{Buffer, Error, LayerError, Limit, Problem, Structure, Unsupported};
use crate::header::{
    self, autoclear, compat, ext, incompat, BitmapsExt, CryptoExt, FeatureName, Header, HeaderRepr,
};
use crate::limits::{
    MAX_CACHE_SLICES, MAX_L1_ENTRIES, MAX_NAME_LEN, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS,
    MAX_UNKNOWN_EXTENSIONS, SLICE_BYTES,
};
use crate::snapshot::{field as snap_field, SnapshotFixed, SnapshotInfo};
use crate::table::{L2Geometry, RefblockAt, RefcountGeometry};
use crate::BlockIo;

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
/// For LUKS images (crypt_method 2) the IV sector is `host_offset / 512`;
/// for legacy AES (crypt_method 1) it is `guest_offset / 512`. Both are
/// passed; `buf` is a whole number of 512-byte sectors.
pub trait Decryptor {
    /// Decrypts `buf`, read from `host_offset`, holding guest bytes from
    /// `guest_offset`. Returns `false` on failure.
    fn decrypt(&mut self, host_offset: u64, guest_offset: u64, buf: &mut [u8]) -> bool;
}

/// What a guest range maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Not allocated in this image: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zero; `host` is a preallocated host range, if any.
    Zero {
        /// Host offset of the preallocated range.
        host: Option<u64>,
    },
    /// Data at `host` in the image file, or in the external data file when
    /// the image has one.
    Data {
        /// Host offset of the first byte of the range.
        host: u64,
    },
    /// Part of a compressed cluster.
    Compressed(CompressedDescriptor),
    /// An unallocated subcluster of an allocated cluster (extended L2):
    /// reads through to the backing file like [`MapKind::Unallocated`],
    /// but has a host range reserved at `host`.
    UnallocatedAlloc {
        /// Host offset of the reserved range.
        host: u64,
    },
}

/// A run of guest bytes with one kind, contiguous on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Start of the run.
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
            1 => Some("aes"),
            2 => Some("luks"),
            _ => None,
        }
    }
}

/// The metadata slice cache over caller memory.
struct Cache<'c> {
    mem: &'c mut [u8],
    slice: usize,
    slots: usize,
    tags: [u64; MAX_CACHE_SLICES],
    used: [u64; MAX_CACHE_SLICES],
    tick: u64,
    last: usize,
}

const EMPTY: u64 = u64::MAX;

impl Cache<'_> {
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
struct State<'c> {
    info: ImageInfo,
    /// Active L1 table (the image's, or a snapshot's).
    l1_offset: u64,
    l1_size: u32,
    size: u64,
    snapshot: Option<u32>,
    file_size: u64,
    cache: Cache<'c>,
    cin: &'c mut [u8],
    cout: &'c mut [u8],
    cout_tag: Option<u64>,
    decryptor: Option<&'c mut dyn Decryptor>,
    ignore_backing: bool,
    bounce: [u8; 512],
}

/// A qcow2 image opened read-only over device `D`, with backing device `B`
/// and external data file device `F`.
pub struct Qcow2<
    'c,
    D: BlockIo,
    B = NoDevice<<D as BlockIo>::Error>,
    F = NoDevice<<D as BlockIo>::Error>,
> {
    dev: D,
    backing: Option<B>,
    backing_size: u64,
    data: Option<F>,
    st: State<'c>,
}

fn io<E>(structure: Structure, offset: u64) -> impl FnOnce(E) -> Error<E> {
    move |source| Error::Io {
        source,
        structure,
        offset,
    }
}

/// Reads the sectors holding the compressed cluster `d` into `cin` (as many
/// as fit, and no further than the file's end) and returns where the stream
/// from `d.host` on lies in it.
fn compressed_input<D: BlockIo>(
    dev: &mut D,
    file_size: u64,
    d: CompressedDescriptor,
    cin: &mut [u8],
) -> Result<core::ops::Range<usize>, Error<D::Error>> {
    let aligned = d.host & !(SECTOR - 1);
    let skip = (d.host % SECTOR) as usize;
    let total = d.sectors.saturating_mul(SECTOR);
    let in_file = round_up_sector(file_size.saturating_sub(aligned));
    let cap = (cin.len() & !511) as u64;
    let n = usize::try_from(total.min(cap).min(in_file)).unwrap_or(0);
    if n <= skip {
        return Err(Error::corrupt(
            Structure::CompressedCluster,
            d.host,
            Problem::OutOfRange(d.host),
        ));
    }
    dev.read_at(aligned, &mut cin[..n])
        .map_err(io(Structure::CompressedCluster, aligned))?;
    Ok(skip..n)
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

impl<'c, D: BlockIo> Qcow2<'c, D> {
    /// Opens an image read-only. `cache` is the metadata cache: at least
    /// one slice (`min(4096, cluster_size)` bytes); up to 64 slices are used.
    pub fn open(mut dev: D, cache: &'c mut [u8]) -> Result<Self, Error<D::Error>> {
        let mut bounce = [0u8; 512];
        let file_size = dev.size().map_err(io(Structure::Header, 0))?;
        let mut info = read_header_info(&mut dev, &mut bounce, cache)?;
        let hdr = info.header;
        let cs = hdr.cluster_size();
        if hdr.backing_file_offset != 0 {
            info.backing_file = read_name(
                &mut dev,
                &mut bounce,
                hdr.backing_file_offset,
                hdr.backing_file_size,
                Structure::BackingFileName,
            )?;
        }
        // Feature bits: one SUPPORTED mask, unknown bits named.
        let unknown = hdr.unknown_incompatible();
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let bit8 = u8::try_from(bit).unwrap_or(u8::MAX);
            let name =
                feature_name_from(&mut dev, &mut bounce, &info, 0, bit8)?.unwrap_or_default();
            return Err(Error::Unsupported(Unsupported::IncompatibleFeature {
                bit: bit8,
                name,
            }));
        }
        if hdr.compression_type > header::COMPRESSION_ZSTD {
            return Err(Error::Unsupported(Unsupported::CompressionType(
                hdr.compression_type,
            )));
        }
        if hdr.extended_l2() && hdr.cluster_bits < 14 {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::INCOMPATIBLE_FEATURES.start as u64,
                Problem::ExtendedL2SmallCluster(hdr.cluster_bits),
            ));
        }
        if !hdr.has_data_file() && hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0 {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::AUTOCLEAR_FEATURES.start as u64,
                Problem::DataFileRawWithoutDataFile,
            ));
        }
        let rt_bytes = u64::from(hdr.refcount_table_clusters).saturating_mul(cs);
        Error::check_limit(
            Structure::Header,
            header::field::REFCOUNT_TABLE_CLUSTERS.start as u64,
            Limit::RefcountTableBytes,
            rt_bytes,
            MAX_REFCOUNT_TABLE_BYTES,
        )?;
        if !table_end_ok(hdr.refcount_table_offset, rt_bytes) {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::REFCOUNT_TABLE_OFFSET.start as u64,
                Problem::Overflow,
            ));
        }
        if hdr.crypt_method != 2 && info.crypto.is_some() {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::CRYPT_METHOD.start as u64,
                Problem::UnexpectedCryptoExtension(hdr.crypt_method),
            ));
        }
        if hdr.crypt_method == 2 && info.crypto.is_none() {
            return Err(Error::corrupt(
                Structure::Header,
                header::field::CRYPT_METHOD.start as u64,
                Problem::MissingCryptoExtension,
            ));
        }
        Error::check_limit(
            Structure::Header,
            header::field::NB_SNAPSHOTS.start as u64,
            Limit::Snapshots,
            u64::from(hdr.nb_snapshots),
            u64::from(MAX_SNAPSHOTS),
        )?;
        check_l1(
            &hdr,
            hdr.l1_table_offset,
            hdr.l1_size,
            hdr.size,
            Structure::Header,
            header::field::L1_SIZE.start as u64,
        )?;
        let slice = usize::try_from(cs).unwrap_or(SLICE_BYTES).min(SLICE_BYTES);
        let slots = cache
            .len()
            .checked_div(slice)
            .unwrap_or(0)
            .min(MAX_CACHE_SLICES);
        if slots == 0 {
            return Err(Error::BufferTooSmall {
                what: Buffer::Cache,
                needed: slice,
                given: cache.len(),
            });
        }
        let mut img = Self {
            dev,
            backing: None,
            backing_size: 0,
            data: None,
            st: State {
                l1_offset: hdr.l1_table_offset,
                l1_size: hdr.l1_size,
                size: sector_floor(hdr.size),
                snapshot: None,
                file_size,
                info,
                cache: Cache {
                    mem: cache,
                    slice,
                    slots,
                    tags: [EMPTY; MAX_CACHE_SLICES],
                    used: [0; MAX_CACHE_SLICES],
                    tick: 0,
                    last: 0,
                },
                cin: &mut [],
                cout: &mut [],
                cout_tag: None,
                decryptor: None,
                ignore_backing: false,
                bounce,
            },
        };
        // As QEMU, a snapshot table that does not parse refuses the open
        // (each entry is read once, without allocating).
        img.for_each_snapshot(|_| false)?;
        Ok(img)
    }

    /// This allocation-free reader stays read-only: refuses images marked
    /// corrupt with [`Error::MarkedCorrupt`], and everything else with
    /// [`Unsupported::Writing`]. Writing goes through `writer::Qcow2Writer`
    /// (the `alloc` feature), which has its own caches.
    pub fn open_rw(dev: D, cache: &'c mut [u8]) -> Result<Self, Error<D::Error>> {
        let img = Self::open(dev, cache)?;
        if img.info().corrupt() {
            return Err(Error::MarkedCorrupt);
        }
        Err(Error::Unsupported(Unsupported::Writing))
    }
}

/// Reads the header (a v3 header longer than a sector whole, through
/// `scratch`, which must hold it) and its extensions: what the reader and
/// the checker both start from.
pub(crate) fn read_header_info<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    scratch: &mut [u8],
) -> Result<ImageInfo, Error<D::Error>> {
    if scratch.len() < 512 {
        return Err(Error::BufferTooSmall {
            what: Buffer::Cache,
            needed: 512,
            given: scratch.len(),
        });
    }
    read_unaligned(dev, bounce, 0, &mut scratch[..512], Structure::Header)?;
    let mut first = [0u8; 512];
    first.copy_from_slice(&scratch[..512]);
    let view = Header::new_unchecked(&first[..]);
    // A v3 header longer than one sector: read it whole into the scratch.
    let hdr = if view.version() >= 3 && view.header_length() > 512 {
        let hl = view.header_length() as usize;
        if hl > scratch.len() {
            return Err(Error::BufferTooSmall {
                what: Buffer::Cache,
                needed: hl,
                given: scratch.len(),
            });
        }
        read_unaligned(dev, bounce, 0, &mut scratch[..hl], Structure::Header)?;
        HeaderRepr::parse(&Header::new_unchecked(&scratch[..hl]))?
    } else {
        HeaderRepr::parse(&view)?
    };
    let mut info = ImageInfo {
        header: hdr,
        backing_file: Name::new(),
        backing_format: Name::new(),
        data_file: None,
        crypto: None,
        bitmaps: None,
        feature_table: None,
        unknown_extensions: heapless::Vec::new(),
    };
    parse_extensions(dev, bounce, &mut info)?;
    Ok(info)
}

/// Reads snapshot table entry `index` at image offset `at` (the table
/// starting at `table_offset`): its fixed part, the known extra data and
/// the first bytes of its id and name, refusing an entry that ends past
/// the table's size limit. What the reader and the checker both use.
pub(crate) fn read_snapshot_entry<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    table_offset: u64,
    index: u32,
    at: u64,
) -> Result<SnapshotInfo, Error<D::Error>> {
    let mut fixed = [0u8; snap_field::FIXED_LEN];
    read_unaligned(dev, bounce, at, &mut fixed, Structure::SnapshotTable)?;
    let mut f = SnapshotFixed::parse(&fixed, at)?;
    let mut extra = [0u8; 24];
    let ne = (f.extra_size as usize).min(extra.len());
    let extra_at = at.saturating_add(snap_field::FIXED_LEN as u64);
    read_unaligned(
        dev,
        bounce,
        extra_at,
        &mut extra[..ne],
        Structure::SnapshotTable,
    )?;
    f.apply_extra(&extra[..ne]);
    let id_at = extra_at.saturating_add(u64::from(f.extra_size));
    let mut id = heapless::Vec::new();
    let mut name = heapless::Vec::new();
    let bad = || Error::corrupt(Structure::SnapshotTable, at, Problem::Overflow);
    // The first bytes of each, as many as fit inline; the rest is read
    // on demand (`read_snapshot_text`, `snapshot_text_is`).
    id.resize(usize::from(f.id_len).min(id.capacity()), 0)
        .map_err(|_| bad())?;
    name.resize(usize::from(f.name_len).min(name.capacity()), 0)
        .map_err(|_| bad())?;
    read_unaligned(dev, bounce, id_at, &mut id, Structure::SnapshotTable)?;
    let name_at = id_at.saturating_add(u64::from(f.id_len));
    read_unaligned(dev, bounce, name_at, &mut name, Structure::SnapshotTable)?;
    crate::snapshot::check_table_end(table_offset, at, f.unpadded_len())?;
    Ok(SnapshotInfo {
        index,
        entry_offset: at,
        fixed: f,
        id,
        name,
    })
}

/// Checks an L1 table (offset, entries) against the size it must cover.
fn check_l1<E>(
    hdr: &HeaderRepr,
    l1_offset: u64,
    l1_size: u32,
    size: u64,
    structure: Structure,
    at: u64,
) -> Result<(), Error<E>> {
    if l1_size > MAX_L1_ENTRIES {
        return Err(Error::Limit {
            structure,
            offset: at,
            limit: Limit::L1Entries,
            value: u64::from(l1_size),
            max: u64::from(MAX_L1_ENTRIES),
        });
    }
    let entry = if hdr.extended_l2() { 16 } else { 8 };
    let per_l2 = hdr.cluster_size().checked_div(entry).unwrap_or(1);
    let bytes_per_l1 = per_l2.saturating_mul(hdr.cluster_size());
    let needed = size.div_ceil(bytes_per_l1);
    if u64::from(l1_size) < needed {
        return Err(Error::corrupt(
            structure,
            at,
            Problem::L1TooSmall { l1_size, needed },
        ));
    }
    if l1_size > 0 && l1_offset == 0 {
        // Aligned, but cluster 0 is the header: qemu-img opens this and
        // reads the header bytes as L1 entries (its check then reports
        // them); refused here.
        let at = if structure == Structure::Header {
            header::field::L1_TABLE_OFFSET.start as u64
        } else {
            at
        };
        return Err(Error::corrupt(
            structure,
            at,
            Problem::L1AtHeader { l1_size },
        ));
    }
    if l1_size > 0 && l1_offset & (hdr.cluster_size().wrapping_sub(1)) != 0 {
        return Err(Error::corrupt(structure, at, Problem::Unaligned(l1_offset)));
    }
    // As QEMU: a table must end below 2^63 (file offsets are signed there).
    if !table_end_ok(l1_offset, u64::from(l1_size).saturating_mul(8)) {
        return Err(Error::corrupt(structure, at, Problem::Overflow));
    }
    Ok(())
}

/// Image offset and length of a snapshot's id (`name` false) or name.
fn snapshot_text_span(snap: &SnapshotInfo, name: bool) -> (u64, usize) {
    let id_at = snap.id_offset();
    if name {
        (
            id_at.saturating_add(u64::from(snap.fixed.id_len)),
            usize::from(snap.fixed.name_len),
        )
    } else {
        (id_at, usize::from(snap.fixed.id_len))
    }
}

/// Whether a table of `bytes` at `offset` ends at or below `i64::MAX`.
fn table_end_ok(offset: u64, bytes: u64) -> bool {
    offset
        .checked_add(bytes)
        .is_some_and(|end| end <= i64::MAX as u64)
}

fn parse_extensions<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    info: &mut ImageInfo,
) -> Result<(), Error<D::Error>> {
    let mut pos = info.header.extensions_start();
    let end = info.header.extensions_end();
    let mut seen = 0u32; // bit per known type, for duplicates
    while pos.checked_add(8).is_some_and(|e| e <= end) {
        let mut h = [0u8; 8];
        read_unaligned(dev, bounce, pos, &mut h, Structure::HeaderExtension)?;
        let (ty, len) = header::extension_header(&h);
        if ty == ext::END {
            break;
        }
        let payload = pos.saturating_add(8);
        if payload.checked_add(u64::from(len)).is_none_or(|e| e > end) {
            return Err(Error::corrupt(
                Structure::HeaderExtension,
                pos,
                Problem::ExtensionOverrun { ext_type: ty, len },
            ));
        }
        let bad_len = || {
            Error::corrupt(
                Structure::HeaderExtension,
                pos,
                Problem::ExtensionLength { ext_type: ty, len },
            )
        };
        let bit = match ty {
            ext::BACKING_FORMAT => 1,
            ext::FEATURE_TABLE => 2,
            ext::BITMAPS => 4,
            ext::CRYPTO => 8,
            ext::DATA_FILE => 16,
            _ => 0,
        };
        if bit != 0 {
            if seen & bit != 0 {
                return Err(Error::corrupt(
                    Structure::HeaderExtension,
                    pos,
                    Problem::DuplicateExtension(ty),
                ));
            }
            seen |= bit;
        }
        match ty {
            ext::BACKING_FORMAT => {
                info.backing_format =
                    read_name(dev, bounce, payload, len, Structure::HeaderExtension)?;
            }
            ext::DATA_FILE => {
                info.data_file = Some(read_name(
                    dev,
                    bounce,
                    payload,
                    len,
                    Structure::HeaderExtension,
                )?);
            }
            ext::FEATURE_TABLE => info.feature_table = Some((payload, len)),
            ext::CRYPTO => {
                if len as usize != CryptoExt::LEN {
                    return Err(bad_len());
                }
                let mut b = [0u8; CryptoExt::LEN];
                read_unaligned(dev, bounce, payload, &mut b, Structure::HeaderExtension)?;
                info.crypto = CryptoExt::parse(&b);
            }
            ext::BITMAPS => {
                if (len as usize) < BitmapsExt::LEN {
                    return Err(bad_len());
                }
                let mut b = [0u8; BitmapsExt::LEN];
                read_unaligned(dev, bounce, payload, &mut b, Structure::HeaderExtension)?;
                info.bitmaps = BitmapsExt::parse(&b);
            }
            _ => {
                // Unknown extensions are skipped; the first few are kept
                // for a writer to preserve.
                let _ = info.unknown_extensions.push(ExtensionLocation {
                    ext_type: ty,
                    offset: payload,
                    len,
                });
            }
        }
        pos = pos.saturating_add(header::extension_span(len));
    }
    Ok(())
}

fn feature_name_from<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    info: &ImageInfo,
    kind: u8,
    bit: u8,
) -> Result<Option<heapless::String<{ crate::error::FEATURE_NAME_LEN }>>, Error<D::Error>> {
    let Some((off, len)) = info.feature_table else {
        return Ok(None);
    };
    let n = u64::from(len)
        .checked_div(FeatureName::LEN as u64)
        .unwrap_or(0);
    for i in 0..n {
        let at = off.saturating_add(i.saturating_mul(FeatureName::LEN as u64));
        let mut b = [0u8; FeatureName::LEN];
        read_unaligned(dev, bounce, at, &mut b, Structure::HeaderExtension)?;
        if let Some(f) = FeatureName::parse(&b) {
            if f.kind == kind && f.bit == bit {
                return Ok(Some(f.name));
            }
        }
    }
    Ok(None)
}

impl<'c, D, B, F> Qcow2<'c, D, B, F>
where
    D: BlockIo,
    B: BlockIo,
    B::Error: LayerError<D::Error>,
    F: BlockIo,
    F::Error: LayerError<D::Error>,
{
    /// Attaches the backing device (the file named by
    /// [`ImageInfo::backing_file`], opened by the caller in the format of
    /// [`ImageInfo::backing_format`]). Reads past its end return zeros.
    pub fn with_backing<B2>(self, mut backing: B2) -> Result<Qcow2<'c, D, B2, F>, Error<D::Error>>
    where
        B2: BlockIo,
        B2::Error: LayerError<D::Error>,
    {
        let backing_size = backing
            .size()
            .map_err(|e| e.into_layer(Structure::Backing, 0))?;
        Ok(Qcow2 {
            dev: self.dev,
            backing: Some(backing),
            backing_size,
            data: self.data,
            st: self.st,
        })
    }

    /// Attaches the external data file device (named by
    /// [`ImageInfo::data_file`]).
    pub fn with_data_file<F2>(self, data: F2) -> Qcow2<'c, D, B, F2>
    where
        F2: BlockIo,
        F2::Error: LayerError<D::Error>,
    {
        Qcow2 {
            dev: self.dev,
            backing: self.backing,
            backing_size: self.backing_size,
            data: Some(data),
            st: self.st,
        }
    }

    /// Reads unallocated ranges as zeros even though the image names a
    /// backing file (like `qemu-img` with the backing ignored).
    pub fn ignore_backing(mut self) -> Self {
        self.st.ignore_backing = true;
        self
    }

    /// Gives the buffers compressed clusters are read through: `input` of
    /// at least 512 bytes (`cluster_size + 512` holds any cluster QEMU
    /// writes) and `output` of at least `cluster_size`.
    pub fn with_compression_buffers(mut self, input: &'c mut [u8], output: &'c mut [u8]) -> Self {
        self.st.cin = input;
        self.st.cout = output;
        self.st.cout_tag = None;
        self
    }

    /// Attaches the decryptor that reading an encrypted image needs.
    pub fn with_decryptor(mut self, d: &'c mut dyn Decryptor) -> Self {
        self.st.decryptor = Some(d);
        self
    }

    /// Header and extension information.
    pub fn info(&self) -> &ImageInfo {
        &self.st.info
    }

    /// The header.
    pub fn header(&self) -> &HeaderRepr {
        &self.st.info.header
    }

    /// Size of the disk being read: the virtual size, or the snapshot's
    /// disk size when a snapshot is selected.
    pub fn virtual_size(&self) -> u64 {
        self.st.size
    }

    /// The selected snapshot's index, if any.
    pub fn selected_snapshot(&self) -> Option<u32> {
        self.st.snapshot
    }

    /// The image device.
    pub fn device(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The attached backing device.
    pub fn backing(&mut self) -> Option<&mut B> {
        self.backing.as_mut()
    }

    /// Gives back the image, backing and data file devices.
    pub fn into_parts(self) -> (D, Option<B>, Option<F>) {
        (self.dev, self.backing, self.data)
    }

    /// Looks a name up in the feature name table (`kind` 0 incompatible,
    /// 1 compatible, 2 autoclear).
    pub fn feature_name(
        &mut self,
        kind: u8,
        bit: u8,
    ) -> Result<Option<heapless::String<{ crate::error::FEATURE_NAME_LEN }>>, Error<D::Error>> {
        feature_name_from(&mut self.dev, &mut self.st.bounce, &self.st.info, kind, bit)
    }

    /// Copies `out.len()` bytes at byte `index` of a table at
    /// `table_offset` of `table_len` bytes, through the slice cache.
    fn meta(
        &mut self,
        structure: Structure,
        table_offset: u64,
        table_len: u64,
        index: u64,
        out: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let c = &mut self.st.cache;
        let slice = c.slice as u64;
        let overflow = || Error::corrupt(structure, table_offset, Problem::Overflow);
        // `slice` is non-zero (at least 512) and `within < slice`.
        let within = index.checked_rem(slice).ok_or_else(overflow)?;
        let rel = index.wrapping_sub(within);
        let start = table_offset.checked_add(rel).ok_or_else(overflow)?;
        let slot = match c.find(start) {
            Some(s) => s,
            None => {
                let v = c.victim();
                let remain = table_len.saturating_sub(rel);
                let n = usize::try_from(round_up_sector(remain).min(slice)).unwrap_or(c.slice);
                let at = v.checked_mul(c.slice).ok_or_else(overflow)?;
                let buf = c
                    .mem
                    .get_mut(at..at.saturating_add(c.slice))
                    .ok_or_else(overflow)?;
                c.tags[v] = EMPTY;
                let (head, tail) = buf.split_at_mut(n.min(buf.len()));
                self.dev
                    .read_at(start, head)
                    .map_err(io(structure, start))?;
                tail.fill(0);
                c.tags[v] = start;
                c.find(start).unwrap_or(v)
            }
        };
        let at = slot
            .checked_mul(c.slice)
            .and_then(|a| a.checked_add(usize::try_from(within).ok()?))
            .ok_or_else(overflow)?;
        let src = c
            .mem
            .get(at..at.saturating_add(out.len()))
            .ok_or_else(overflow)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn meta_u64(
        &mut self,
        structure: Structure,
        table_offset: u64,
        table_len: u64,
        index: u64,
    ) -> Result<u64, Error<D::Error>> {
        let mut b = [0u8; 8];
        self.meta(structure, table_offset, table_len, index, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The kind of the cluster or subcluster holding `guest`, and where
    /// that unit (or a larger run of the same kind) ends.
    fn unit(&mut self, guest: u64) -> Result<(MapKind, u64), Error<D::Error>> {
        let geo = L2Geometry::of(&self.st.info.header);
        let slot = geo.locate(guest);
        let l1_end = geo.l1_end(slot.l1_index);
        if slot.l1_index >= u64::from(self.st.l1_size) {
            return Ok((MapKind::Unallocated, l1_end));
        }
        // l1_index < l1_size <= MAX_L1_ENTRIES: the products fit.
        let l1_len = u64::from(self.st.l1_size).saturating_mul(8);
        let l1_byte = slot.l1_index.saturating_mul(8);
        let l1e = self.meta_u64(Structure::L1Table, self.st.l1_offset, l1_len, l1_byte)?;
        let l2_off = entry::l1_l2_offset(l1e);
        if l2_off == 0 {
            return Ok((MapKind::Unallocated, l1_end));
        }
        let entry_at = self.st.l1_offset.saturating_add(l1_byte);
        if l2_off & geo.cluster_size().wrapping_sub(1) != 0 {
            return Err(Error::corrupt(
                Structure::L1Table,
                entry_at,
                Problem::Unaligned(l2_off),
            ));
        }
        let mut e = [0u8; 16];
        let byte = geo.entry_byte(slot.l2_index);
        let esz = geo.entry_len();
        self.meta(
            Structure::L2Table,
            l2_off,
            geo.cluster_size(),
            byte,
            &mut e[..esz],
        )?;
        let l2_at = l2_off.saturating_add(byte);
        let (kind, len) = geo
            .resolve(geo.read(&e[..esz]), slot.in_cluster)
            .map_err(|p| Error::corrupt(Structure::L2Table, l2_at, p))?;
        Ok((kind, guest.saturating_add(len)))
    }

    /// Maps `guest_offset..guest_offset + len` (clamped to the disk): the
    /// first run of one kind that is contiguous on the host. Call again
    /// from `guest_offset + mapping.len` for the rest.
    pub fn map(&mut self, guest_offset: u64, len: u64) -> Result<Mapping, Error<D::Error>> {
        let size = self.st.size;
        if guest_offset >= size {
            return Err(Error::BadRequest {
                offset: guest_offset,
                len,
                size,
            });
        }
        let end = guest_offset.saturating_add(len).min(size);
        let (kind, mut unit_end) = self.unit(guest_offset)?;
        let mut run_end = unit_end.min(end);
        if !matches!(kind, MapKind::Compressed(_)) {
            while run_end < end {
                let (next, next_end) = self.unit(run_end)?;
                let delta = run_end.saturating_sub(guest_offset);
                let same = match (kind, next) {
                    (MapKind::Unallocated, MapKind::Unallocated) => true,
                    (
                        MapKind::UnallocatedAlloc { host: a },
                        MapKind::UnallocatedAlloc { host: b },
                    ) => a.checked_add(delta) == Some(b),
                    (MapKind::Zero { host: None }, MapKind::Zero { host: None }) => true,
                    (MapKind::Zero { host: Some(a) }, MapKind::Zero { host: Some(b) })
                    | (MapKind::Data { host: a }, MapKind::Data { host: b }) => {
                        a.checked_add(delta) == Some(b)
                    }
                    _ => false,
                };
                if !same {
                    break;
                }
                unit_end = next_end;
                run_end = unit_end.min(end);
            }
        }
        Ok(Mapping {
            guest_offset,
            len: run_end.saturating_sub(guest_offset),
            kind,
        })
    }

    /// Reads guest bytes at `guest_offset` (both 512-byte aligned).
    pub fn read(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        let len = buf.len() as u64;
        let size = self.st.size;
        if !guest_offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || guest_offset.checked_add(len).is_none_or(|e| e > size)
        {
            return Err(Error::BadRequest {
                offset: guest_offset,
                len,
                size,
            });
        }
        // `guest_offset + buf.len()` was checked above, so the sums below
        // stay inside it.
        let mut rest = &mut buf[..];
        let mut g = guest_offset;
        while !rest.is_empty() {
            let m = self.map(g, rest.len() as u64)?;
            let n = usize::try_from(m.len).unwrap_or(0).min(rest.len());
            if n == 0 {
                return Err(Error::corrupt(Structure::L2Table, g, Problem::Overflow));
            }
            let (chunk, tail) = core::mem::take(&mut rest).split_at_mut(n);
            match m.kind {
                MapKind::Zero { .. } => chunk.fill(0),
                MapKind::Unallocated | MapKind::UnallocatedAlloc { .. } => {
                    self.read_backing(g, chunk)?
                }
                MapKind::Data { host } => self.read_data(host, g, chunk)?,
                MapKind::Compressed(d) => self.read_compressed(d, g, chunk)?,
            }
            rest = tail;
            g = g.saturating_add(n as u64);
        }
        Ok(())
    }

    fn read_backing(&mut self, g: u64, chunk: &mut [u8]) -> Result<(), Error<D::Error>> {
        let Some(b) = self.backing.as_mut() else {
            if !self.st.info.backing_file.is_empty() && !self.st.ignore_backing {
                return Err(Error::BackingMissing);
            }
            chunk.fill(0);
            return Ok(());
        };
        let avail = usize::try_from(self.backing_size.saturating_sub(g)).unwrap_or(usize::MAX);
        let n = avail.min(chunk.len());
        let aligned = n & !511;
        let (present, absent) = chunk.split_at_mut(n);
        let (whole, partial) = present.split_at_mut(aligned);
        if !whole.is_empty() {
            b.read_at(g, whole)
                .map_err(|e| e.into_layer(Structure::Backing, g))?;
        }
        if !partial.is_empty() {
            // A backing device ending mid-sector: read its last sector.
            let at = g.saturating_add(aligned as u64);
            let bounce = &mut self.st.bounce;
            b.read_at(at, bounce)
                .map_err(|e| e.into_layer(Structure::Backing, at))?;
            partial.copy_from_slice(&bounce[..partial.len()]);
        }
        absent.fill(0);
        Ok(())
    }

    fn check_encryption(&self) -> Result<(), Error<D::Error>> {
        let method = self.st.info.header.crypt_method;
        if method != 0 && self.st.decryptor.is_none() {
            return Err(Error::Unsupported(Unsupported::Encrypted { method }));
        }
        Ok(())
    }

    fn read_data(&mut self, host: u64, g: u64, chunk: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.check_encryption()?;
        if self.st.info.header.has_data_file() {
            let d = self.data.as_mut().ok_or(Error::DataFileMissing)?;
            d.read_at(host, chunk)
                .map_err(|e| e.into_layer(Structure::DataFile, host))?;
        } else {
            self.dev
                .read_at(host, chunk)
                .map_err(io(Structure::DataCluster, host))?;
        }
        if let Some(dec) = self.st.decryptor.as_mut() {
            if !dec.decrypt(host, g, chunk) {
                return Err(Error::Decrypt { host_offset: host });
            }
        }
        Ok(())
    }

    /// Reads the stored bytes of the compressed cluster `d` (from
    /// [`MapKind::Compressed`]) into `input` and returns where in it the
    /// compressed stream lies, exactly what the reader decodes: for callers
    /// that decode several clusters at once (on several threads) with
    /// [`crate::decompress::decompress`]. `input` should hold a cluster
    /// plus 512 bytes; a shorter one truncates the stream, which then fails
    /// to decode.
    pub fn compressed_input(
        &mut self,
        d: CompressedDescriptor,
        input: &mut [u8],
    ) -> Result<core::ops::Range<usize>, Error<D::Error>> {
        compressed_input(&mut self.dev, self.st.file_size, d, input)
    }

    fn read_compressed(
        &mut self,
        d: CompressedDescriptor,
        g: u64,
        chunk: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        self.check_encryption()?;
        let cs = usize::try_from(self.st.info.header.cluster_size()).unwrap_or(usize::MAX);
        if self.st.cout.len() < cs {
            return Err(Error::BufferTooSmall {
                what: Buffer::CompressedOutput,
                needed: cs,
                given: self.st.cout.len(),
            });
        }
        if self.st.cin.len() < 512 {
            return Err(Error::BufferTooSmall {
                what: Buffer::CompressedInput,
                needed: cs.saturating_add(512),
                given: self.st.cin.len(),
            });
        }
        let intra = usize::try_from(g & (cs as u64).wrapping_sub(1)).unwrap_or(0);
        // A whole cluster asked for (as a copy does) is decoded straight
        // into the caller's buffer; a part goes through `cout`, which keeps
        // the cluster for the next part.
        let whole = intra == 0 && chunk.len() == cs;
        if self.st.cout_tag != Some(d.host) {
            self.st.cout_tag = None;
            let at = compressed_input(&mut self.dev, self.st.file_size, d, &mut self.st.cin[..])?;
            let input = &self.st.cin[at];
            let out = if whole {
                &mut chunk[..]
            } else {
                &mut self.st.cout[..cs]
            };
            match decompress(self.st.info.header.compression_type, input, out) {
                Ok(()) => {}
                Err(DecompressError::ZstdWithoutAlloc) => {
                    return Err(Error::Unsupported(Unsupported::ZstdWithoutAlloc))
                }
                Err(DecompressError::UnknownType(t)) => {
                    return Err(Error::Unsupported(Unsupported::CompressionType(t)))
                }
                Err(DecompressError::Corrupt) => {
                    return Err(Error::corrupt(
                        Structure::CompressedCluster,
                        d.host,
                        Problem::Decompress,
                    ))
                }
            }
            if whole {
                return Ok(());
            }
            self.st.cout_tag = Some(d.host);
        }
        let src = self
            .st
            .cout
            .get(intra..intra.saturating_add(chunk.len()))
            .ok_or(Error::corrupt(
                Structure::CompressedCluster,
                d.host,
                Problem::Overflow,
            ))?;
        chunk.copy_from_slice(src);
        Ok(())
    }

    /// Refcount of host cluster `cluster` (host offset / cluster size),
    /// through the refcount table and blocks.
    pub fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let hdr = self.st.info.header;
        let cs = hdr.cluster_size();
        let geo = RefcountGeometry::of(&hdr);
        let slot = geo.locate(cluster);
        let rt_len = u64::from(hdr.refcount_table_clusters).saturating_mul(cs);
        let Some(rt_byte) = geo.table_byte(slot.table_index).filter(|&b| b < rt_len) else {
            return Ok(0);
        };
        let rte = self.meta_u64(
            Structure::RefcountTable,
            hdr.refcount_table_offset,
            rt_len,
            rt_byte,
        )?;
        let off = match geo.block_at(rte) {
            RefblockAt::Absent => return Ok(0),
            RefblockAt::At(off) => off,
            RefblockAt::Unaligned(off) => {
                return Err(Error::corrupt(
                    Structure::RefcountTable,
                    hdr.refcount_table_offset.saturating_add(rt_byte),
                    Problem::Unaligned(off),
                ))
            }
        };
        let (byte, w, sub) = geo.entry_bytes(slot.index);
        let mut b = [0u8; 8];
        self.meta(Structure::RefcountBlock, off, cs, byte, &mut b[..w])?;
        geo.get_in(&b[..w], sub).ok_or(Error::corrupt(
            Structure::RefcountBlock,
            off,
            Problem::Overflow,
        ))
    }

    /// Calls `each` with every entry of the persistent bitmap directory
    /// (what `qemu-img info` lists under `bitmaps`), without allocating.
    /// Stops early when `each` returns `true`.
    pub fn for_each_bitmap(
        &mut self,
        mut each: impl FnMut(&BitmapInfo) -> bool,
    ) -> Result<(), Error<D::Error>> {
        let Some(bm) = self.st.info.bitmaps else {
            return Ok(());
        };
        Error::check_limit(
            Structure::HeaderExtension,
            bm.directory_offset,
            Limit::BitmapDirectoryBytes,
            bm.directory_size,
            MAX_BITMAP_DIRECTORY_BYTES,
        )?;
        let end = bm
            .directory_offset
            .checked_add(bm.directory_size)
            .ok_or(Error::corrupt(
                Structure::HeaderExtension,
                bm.directory_offset,
                Problem::Overflow,
            ))?;
        let mut off = bm.directory_offset;
        for _ in 0..bm.nb_bitmaps {
            let mut f = [0u8; BitmapInfo::FIXED_LEN];
            let fixed_end = off.saturating_add(BitmapInfo::FIXED_LEN as u64);
            if fixed_end > end {
                return Err(Error::corrupt(
                    Structure::HeaderExtension,
                    off,
                    Problem::OutOfRange(off),
                ));
            }
            read_unaligned(
                &mut self.dev,
                &mut self.st.bounce,
                off,
                &mut f,
                Structure::HeaderExtension,
            )?;
            let mut b = BitmapInfo::parse_fixed(&f);
            // Layout: table offset u64, table size u32, flags u32, type u8,
            // granularity bits u8, name size u16, extra data size u32.
            let name_len = u16::from_be_bytes([f[18], f[19]]);
            let extra = u32::from_be_bytes([f[20], f[21], f[22], f[23]]);
            let name_at = fixed_end.saturating_add(u64::from(extra));
            let entry_end = name_at.saturating_add(u64::from(name_len));
            if entry_end > end || usize::from(name_len) > MAX_NAME_LEN {
                return Err(Error::corrupt(
                    Structure::HeaderExtension,
                    off,
                    Problem::OutOfRange(entry_end),
                ));
            }
            b.name
                .resize(usize::from(name_len), 0)
                .map_err(|_| Error::corrupt(Structure::HeaderExtension, off, Problem::Overflow))?;
            read_unaligned(
                &mut self.dev,
                &mut self.st.bounce,
                name_at,
                &mut b.name,
                Structure::HeaderExtension,
            )?;
            if each(&b) {
                return Ok(());
            }
            off = entry_end.checked_next_multiple_of(8).unwrap_or(u64::MAX);
        }
        Ok(())
    }

    /// Number of internal snapshots.
    pub fn snapshot_count(&self) -> u32 {
        self.st.info.header.nb_snapshots
    }

    /// Reads the snapshot entry at `offset`, the `index`th of the table.
    fn read_snapshot_at(
        &mut self,
        index: u32,
        offset: u64,
    ) -> Result<SnapshotInfo, Error<D::Error>> {
        let table = self.st.info.header.snapshots_offset;
        read_snapshot_entry(&mut self.dev, &mut self.st.bounce, table, index, offset)
    }

    /// Reads the id (`name` false) or name (`name` true) of `snap` into
    /// the start of `buf`, as much as fits, and returns the whole length
    /// (at most 65,535): a `buf` of that many bytes gets it all.
    pub fn read_snapshot_text(
        &mut self,
        snap: &SnapshotInfo,
        name: bool,
        buf: &mut [u8],
    ) -> Result<usize, Error<D::Error>> {
        let (at, len) = snapshot_text_span(snap, name);
        let n = len.min(buf.len());
        let dst = buf.get_mut(..n).unwrap_or_default();
        read_unaligned(
            &mut self.dev,
            &mut self.st.bounce,
            at,
            dst,
            Structure::SnapshotTable,
        )?;
        Ok(len)
    }

    /// Whether the whole id (`name` false) or name (`name` true) of `snap`
    /// is `key`, compared piecewise against the table without allocating.
    pub fn snapshot_text_is(
        &mut self,
        snap: &SnapshotInfo,
        name: bool,
        key: &[u8],
    ) -> Result<bool, Error<D::Error>> {
        let (mut at, len) = snapshot_text_span(snap, name);
        if len != key.len() {
            return Ok(false);
        }
        let kept: &[u8] = if name { &snap.name } else { &snap.id };
        let (head, mut rest) = key.split_at(kept.len().min(len));
        if head != kept {
            return Ok(false);
        }
        at = at.saturating_add(head.len() as u64);
        let mut chunk = [0u8; 256];
        while !rest.is_empty() {
            let n = rest.len().min(chunk.len());
            let (want, tail) = rest.split_at(n);
            let got = chunk.get_mut(..n).unwrap_or_default();
            read_unaligned(
                &mut self.dev,
                &mut self.st.bounce,
                at,
                got,
                Structure::SnapshotTable,
            )?;
            if got != want {
                return Ok(false);
            }
            at = at.saturating_add(n as u64);
            rest = tail;
        }
        Ok(true)
    }

    /// The first snapshot in table order whose whole id (`by_name` false)
    /// or name (`by_name` true) is `key`.
    pub fn find_snapshot_by(
        &mut self,
        key: &[u8],
        by_name: bool,
    ) -> Result<Option<SnapshotInfo>, Error<D::Error>> {
        let mut off = self.st.info.header.snapshots_offset;
        for i in 0..self.snapshot_count() {
            let s = self.read_snapshot_at(i, off)?;
            off = off.saturating_add(s.fixed.entry_len());
            if self.snapshot_text_is(&s, by_name, key)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// Calls `each` with every snapshot in table order, without allocating.
    /// Stops early (returning `Ok(Some(..))`) when `each` returns `true`
    /// for a snapshot, which is then returned.
    pub fn for_each_snapshot(
        &mut self,
        mut each: impl FnMut(&SnapshotInfo) -> bool,
    ) -> Result<Option<SnapshotInfo>, Error<D::Error>> {
        let mut off = self.st.info.header.snapshots_offset;
        for i in 0..self.snapshot_count() {
            let s = self.read_snapshot_at(i, off)?;
            off = off.saturating_add(s.fixed.entry_len());
            if each(&s) {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// The snapshot at table index `index`.
    pub fn snapshot(&mut self, index: u32) -> Result<SnapshotInfo, Error<D::Error>> {
        self.for_each_snapshot(|s| s.index == index)?
            .ok_or(Error::NoSuchSnapshot)
    }

    /// Finds a snapshot by id or, failing that, by name (as `qemu-img`
    /// does for `snapshot.name` / `-l`).
    pub fn find_snapshot(&mut self, id_or_name: &str) -> Result<SnapshotInfo, Error<D::Error>> {
        let key = id_or_name.as_bytes();
        if let Some(s) = self.find_snapshot_by(key, false)? {
            return Ok(s);
        }
        self.find_snapshot_by(key, true)?
            .ok_or(Error::NoSuchSnapshot)
    }

    /// Reads the disk as of `snap` from now on (read-only).
    pub fn select_snapshot(&mut self, snap: &SnapshotInfo) -> Result<(), Error<D::Error>> {
        let hdr = self.st.info.header;
        let size = snap.fixed.disk_size.unwrap_or(hdr.size);
        check_l1(
            &hdr,
            snap.fixed.l1_offset,
            snap.fixed.l1_size,
            size,
            Structure::SnapshotTable,
            snap.entry_offset,
        )?;
        self.st.l1_offset = snap.fixed.l1_offset;
        self.st.l1_size = snap.fixed.l1_size;
        self.st.size = sector_floor(size);
        self.st.snapshot = Some(snap.index);
        Ok(())
    }

    /// Goes back to reading the current disk state.
    pub fn select_current(&mut self) {
        let h = self.st.info.header;
        self.st.l1_offset = h.l1_table_offset;
        self.st.l1_size = h.l1_size;
        self.st.size = sector_floor(h.size);
        self.st.snapshot = None;
    }
}

impl<D, B, F> BlockIo for Qcow2<'_, D, B, F>
where
    D: BlockIo,
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
