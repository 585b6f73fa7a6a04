//! The qcow2 header: a view over bytes (`Header`) and a validated
//! representation (`HeaderRepr`) in the smoltcp style.
//!
//! Contract: once [`Header::check_len`] passed, no accessor panics; `emit`
//! never panics on a buffer of `buffer_len()` bytes. `HeaderRepr::parse`
//! validates geometry (cluster bits, header length, refcount order, ...) but
//! not feature bits: refusing unknown incompatible features is the opener's
//! job, so parse/emit round-trip any header.

use crate::error::{Error, Problem, Structure, Unsupported};
use crate::limits::{
    MAX_CLUSTER_BITS, MAX_NAME_LEN, MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS, MIN_V3_HEADER_LEN,
    V2_HEADER_LEN,
};
#[cfg(feature = "alloc")]
use crate::{
    error::Limit,
    limits::{MAX_L1_ENTRIES, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS},
};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Byte ranges of the header fields.
pub mod field {
    use core::ops::Range;
    /// Magic.
    pub const MAGIC: Range<usize> = 0..4;
    /// Version.
    pub const VERSION: Range<usize> = 4..8;
    /// Backing file name offset.
    pub const BACKING_FILE_OFFSET: Range<usize> = 8..16;
    /// Backing file name length.
    pub const BACKING_FILE_SIZE: Range<usize> = 16..20;
    /// log2 of the cluster size.
    pub const CLUSTER_BITS: Range<usize> = 20..24;
    /// Virtual size.
    pub const SIZE: Range<usize> = 24..32;
    /// Encryption method.
    pub const CRYPT_METHOD: Range<usize> = 32..36;
    /// L1 entries.
    pub const L1_SIZE: Range<usize> = 36..40;
    /// L1 offset.
    pub const L1_TABLE_OFFSET: Range<usize> = 40..48;
    /// Refcount table offset.
    pub const REFCOUNT_TABLE_OFFSET: Range<usize> = 48..56;
    /// Refcount table clusters.
    pub const REFCOUNT_TABLE_CLUSTERS: Range<usize> = 56..60;
    /// Number of snapshots.
    pub const NB_SNAPSHOTS: Range<usize> = 60..64;
    /// Snapshot table offset.
    pub const SNAPSHOTS_OFFSET: Range<usize> = 64..72;
    /// Incompatible features (v3).
    pub const INCOMPATIBLE_FEATURES: Range<usize> = 72..80;
    /// Compatible features (v3).
    pub const COMPATIBLE_FEATURES: Range<usize> = 80..88;
    /// Autoclear features (v3).
    pub const AUTOCLEAR_FEATURES: Range<usize> = 88..96;
    /// log2 of the refcount width (v3).
    pub const REFCOUNT_ORDER: Range<usize> = 96..100;
    /// Header length (v3).
    pub const HEADER_LENGTH: Range<usize> = 100..104;
    /// Compression type (v3, when `header_length > 104`).
    pub const COMPRESSION_TYPE: usize = 104;
}

/// Incompatible feature bits.
pub mod incompat {
    /// Dirty: refcounts may be stale (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// Corrupt: metadata is known to be damaged.
    pub const CORRUPT: u64 = 1 << 1;
    /// External data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` field is meaningful.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended (128-bit) L2 entries with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every incompatible bit this reader understands.
    pub const SUPPORTED: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// Bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xE279_2ACA;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_F857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_BE77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Compression type 0: raw deflate.
pub const COMPRESSION_ZLIB: u8 = 0;
/// Compression type 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

pub(crate) fn be32(b: &[u8], r: core::ops::Range<usize>) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(r) {
        if s.len() == 4 {
            a.copy_from_slice(s);
        }
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], r: core::ops::Range<usize>) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(r) {
        if s.len() == 8 {
            a.copy_from_slice(s);
        }
    }
    u64::from_be_bytes(a)
}

fn put(b: &mut [u8], r: core::ops::Range<usize>, v: &[u8]) {
    if let Some(s) = b.get_mut(r) {
        if s.len() == v.len() {
            s.copy_from_slice(v);
        }
    }
}

/// A view of header bytes.
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

macro_rules! getters {
    ($($(#[$m:meta])* $name:ident, $set:ident: $ty:ty = $f:ident via $rd:ident;)*) => {
        impl<T: AsRef<[u8]>> Header<T> {
            $($(#[$m])* pub fn $name(&self) -> $ty { $rd(self.buffer.as_ref(), field::$f) })*
        }
        impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
            $(
                /// Sets the field of the same name.
                pub fn $set(&mut self, v: $ty) { put(self.buffer.as_mut(), field::$f, &v.to_be_bytes()) }
            )*
        }
    };
}

getters! {
    /// Magic number.
    magic, set_magic: u32 = MAGIC via be32;
    /// Version.
    version, set_version: u32 = VERSION via be32;
    /// Backing file name offset.
    backing_file_offset, set_backing_file_offset: u64 = BACKING_FILE_OFFSET via be64;
    /// Backing file name length.
    backing_file_size, set_backing_file_size: u32 = BACKING_FILE_SIZE via be32;
    /// log2 of the cluster size.
    cluster_bits, set_cluster_bits: u32 = CLUSTER_BITS via be32;
    /// Virtual size.
    size, set_size: u64 = SIZE via be64;
    /// Encryption method.
    crypt_method, set_crypt_method: u32 = CRYPT_METHOD via be32;
    /// L1 entries.
    l1_size, set_l1_size: u32 = L1_SIZE via be32;
    /// L1 offset.
    l1_table_offset, set_l1_table_offset: u64 = L1_TABLE_OFFSET via be64;
    /// Refcount table offset.
    refcount_table_offset, set_refcount_table_offset: u64 = REFCOUNT_TABLE_OFFSET via be64;
    /// Refcount table clusters.
    refcount_table_clusters, set_refcount_table_clusters: u32 = REFCOUNT_TABLE_CLUSTERS via be32;
    /// Number of snapshots.
    nb_snapshots, set_nb_snapshots: u32 = NB_SNAPSHOTS via be32;
    /// Snapshot table offset.
    snapshots_offset, set_snapshots_offset: u64 = SNAPSHOTS_OFFSET via be64;
    /// Incompatible features (v3).
    incompatible_features, set_incompatible_features: u64 = INCOMPATIBLE_FEATURES via be64;
    /// Compatible features (v3).
    compatible_features, set_compatible_features: u64 = COMPATIBLE_FEATURES via be64;
    /// Autoclear features (v3).
    autoclear_features, set_autoclear_features: u64 = AUTOCLEAR_FEATURES via be64;
    /// Refcount order (v3).
    refcount_order, set_refcount_order: u32 = REFCOUNT_ORDER via be32;
    /// Header length (v3).
    header_length, set_header_length: u32 = HEADER_LENGTH via be32;
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps bytes without checking their length.
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }
    /// Wraps bytes, checking they hold the fixed header of their version.
    pub fn new_checked<E>(buffer: T) -> Result<Self, Error<E>> {
        let h = Self::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }
    /// Checks the bytes hold the whole header (v2: 72 bytes; v3: 104 bytes
    /// and `header_length`).
    pub fn check_len<E>(&self) -> Result<(), Error<E>> {
        let len = self.buffer.as_ref().len();
        let trunc = |needed: u64| {
            Error::corrupt(
                Structure::Header,
                0,
                Problem::Truncated {
                    needed,
                    available: len as u64,
                },
            )
        };
        if len < field::VERSION.end {
            return Err(trunc(field::VERSION.end as u64));
        }
        let needed = if self.version() >= 3 {
            if len < MIN_V3_HEADER_LEN as usize {
                return Err(trunc(u64::from(MIN_V3_HEADER_LEN)));
            }
            self.header_length().max(MIN_V3_HEADER_LEN)
        } else {
            V2_HEADER_LEN
        };
        if (len as u64) < u64::from(needed) {
            return Err(trunc(u64::from(needed)));
        }
        Ok(())
    }
    /// Compression type byte (v3 with `header_length > 104`), else 0.
    pub fn compression_type(&self) -> u8 {
        if self.version() >= 3 && self.header_length() > MIN_V3_HEADER_LEN {
            self.buffer
                .as_ref()
                .get(field::COMPRESSION_TYPE)
                .copied()
                .unwrap_or(0)
        } else {
            0
        }
    }
    /// Gives back the bytes.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Sets the compression type byte.
    pub fn set_compression_type(&mut self, v: u8) {
        if let Some(b) = self.buffer.as_mut().get_mut(field::COMPRESSION_TYPE) {
            *b = v;
        }
    }
}

/// How guest data is encrypted: the header's `crypt_method` field,
/// validated once when the header is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CryptMethod {
    /// 0: plaintext.
    None = 0,
    /// 1: legacy AES-128-CBC keyed by the passphrase (read only).
    Aes = 1,
    /// 2: LUKS1 stored inside the image.
    Luks = 2,
}

impl CryptMethod {
    /// The method stored as `v` on disk, or `None` for any other value.
    pub const fn from_raw(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Aes),
            2 => Some(Self::Luks),
            _ => None,
        }
    }
    /// The on-disk value (0, 1 or 2).
    pub const fn raw(self) -> u32 {
        self as u32
    }
    /// Whether guest data is encrypted (anything but [`CryptMethod::None`]).
    pub const fn is_encrypted(self) -> bool {
        !matches!(self, Self::None)
    }
}

impl core::fmt::Display for CryptMethod {
    /// Writes the on-disk number, as qemu-img's messages name it.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.raw())
    }
}

/// A validated qcow2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRepr {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0 (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name (at most 1023).
    pub backing_file_size: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// How guest data is encrypted.
    pub crypt_method: CryptMethod,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 in v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (0 in v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (0 in v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 in v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 in v2).
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
}

impl HeaderRepr {
    /// Parses and validates a header view.
    pub fn parse<T: AsRef<[u8]>, E>(h: &Header<T>) -> Result<Self, Error<E>> {
        h.check_len()?;
        let bad = |off: usize, p: Problem| Error::corrupt(Structure::Header, off as u64, p);
        if h.magic() != MAGIC {
            return Err(bad(field::MAGIC.start, Problem::BadMagic(h.magic())));
        }
        let version = h.version();
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(Unsupported::Version(version)));
        }
        let cluster_bits = h.cluster_bits();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                field::CLUSTER_BITS.start,
                Problem::ClusterBits(cluster_bits),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (inc, com, auto, order, hlen, ctype) = if version == 3 {
            let hlen = h.header_length();
            if hlen < MIN_V3_HEADER_LEN || !hlen.is_multiple_of(8) || u64::from(hlen) > cluster_size
            {
                return Err(bad(field::HEADER_LENGTH.start, Problem::HeaderLength(hlen)));
            }
            let order = h.refcount_order();
            if order > MAX_REFCOUNT_ORDER {
                return Err(bad(
                    field::REFCOUNT_ORDER.start,
                    Problem::RefcountOrder(order),
                ));
            }
            (
                h.incompatible_features(),
                h.compatible_features(),
                h.autoclear_features(),
                order,
                hlen,
                h.compression_type(),
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN, 0)
        };
        if ctype != COMPRESSION_ZLIB && inc & incompat::COMPRESSION == 0 {
            return Err(bad(
                field::COMPRESSION_TYPE,
                Problem::CompressionTypeWithoutFeature(ctype),
            ));
        }
        let bfo = h.backing_file_offset();
        let bfs = h.backing_file_size();
        if bfo != 0 {
            if bfs as usize > MAX_NAME_LEN {
                return Err(bad(
                    field::BACKING_FILE_SIZE.start,
                    Problem::OutOfRange(u64::from(bfs)),
                ));
            }
            match bfo.checked_add(u64::from(bfs)) {
                Some(end) if end <= cluster_size && bfo >= u64::from(hlen) => {}
                _ => {
                    return Err(bad(
                        field::BACKING_FILE_OFFSET.start,
                        Problem::OutOfRange(bfo),
                    ))
                }
            }
        }
        let raw_crypt = h.crypt_method();
        let Some(crypt) = CryptMethod::from_raw(raw_crypt) else {
            return Err(bad(
                field::CRYPT_METHOD.start,
                Problem::CryptMethod(raw_crypt),
            ));
        };
        let mask = cluster_size.wrapping_sub(1);
        for (f, v) in [
            (field::L1_TABLE_OFFSET.start, h.l1_table_offset()),
            (
                field::REFCOUNT_TABLE_OFFSET.start,
                h.refcount_table_offset(),
            ),
            (field::SNAPSHOTS_OFFSET.start, h.snapshots_offset()),
        ] {
            if v & mask != 0 {
                return Err(bad(f, Problem::Unaligned(v)));
            }
        }
        Ok(Self {
            version,
            backing_file_offset: bfo,
            backing_file_size: bfs,
            cluster_bits,
            size: h.size(),
            crypt_method: crypt,
            l1_size: h.l1_size(),
            l1_table_offset: h.l1_table_offset(),
            refcount_table_offset: h.refcount_table_offset(),
            refcount_table_clusters: h.refcount_table_clusters(),
            nb_snapshots: h.nb_snapshots(),
            snapshots_offset: h.snapshots_offset(),
            incompatible_features: inc,
            compatible_features: com,
            autoclear_features: auto,
            refcount_order: order,
            header_length: hlen,
            compression_type: ctype,
        })
    }

    /// Parses a header from raw bytes.
    pub fn parse_bytes<E>(bytes: &[u8]) -> Result<Self, Error<E>> {
        Self::parse(&Header::new_unchecked(bytes))
    }

    /// Bytes `emit` writes: 72 for v2, `header_length` for v3.
    pub fn buffer_len(&self) -> usize {
        if self.version >= 3 {
            self.header_length.max(MIN_V3_HEADER_LEN) as usize
        } else {
            V2_HEADER_LEN as usize
        }
    }

    /// Writes the header into a view of at least `buffer_len()` bytes
    /// (shorter buffers get the fields that fit). Padding after the
    /// compression type is zeroed.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Header<T>) {
        h.set_magic(MAGIC);
        h.set_version(self.version);
        h.set_backing_file_offset(self.backing_file_offset);
        h.set_backing_file_size(self.backing_file_size);
        h.set_cluster_bits(self.cluster_bits);
        h.set_size(self.size);
        h.set_crypt_method(self.crypt_method.raw());
        h.set_l1_size(self.l1_size);
        h.set_l1_table_offset(self.l1_table_offset);
        h.set_refcount_table_offset(self.refcount_table_offset);
        h.set_refcount_table_clusters(self.refcount_table_clusters);
        h.set_nb_snapshots(self.nb_snapshots);
        h.set_snapshots_offset(self.snapshots_offset);
        if self.version >= 3 {
            h.set_incompatible_features(self.incompatible_features);
            h.set_compatible_features(self.compatible_features);
            h.set_autoclear_features(self.autoclear_features);
            h.set_refcount_order(self.refcount_order);
            h.set_header_length(self.header_length);
            let end = self.buffer_len();
            if let Some(pad) = h.buffer.as_mut().get_mut(field::COMPRESSION_TYPE..end) {
                pad.fill(0);
            }
            if self.header_length > MIN_V3_HEADER_LEN {
                h.set_compression_type(self.compression_type);
            }
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(MAX_CLUSTER_BITS)
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order.min(MAX_REFCOUNT_ORDER)
    }
    /// Where header extensions start.
    pub fn extensions_start(&self) -> u64 {
        u64::from(self.header_length)
    }
    /// Where the extension area ends: the backing file name, or the end of
    /// cluster 0.
    pub fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }
    /// Whether extended L2 entries are in use.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }
    /// Whether the image keeps its data in an external file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }
    /// Unknown incompatible bits.
    pub fn unknown_incompatible(&self) -> u64 {
        self.incompatible_features & !incompat::SUPPORTED
    }
    /// Refuses an L1 table of more than [`MAX_L1_ENTRIES`] entries
    /// ([`Error::Limit`] at the table's offset).
    #[cfg(feature = "alloc")]
    pub(crate) fn check_l1_limit<E>(&self) -> Result<(), Error<E>> {
        Error::check_limit(
            Structure::L1Table,
            self.l1_table_offset,
            Limit::L1Entries,
            u64::from(self.l1_size),
            u64::from(MAX_L1_ENTRIES),
        )
    }
    /// Refuses a refcount table of `bytes` bytes above
    /// [`MAX_REFCOUNT_TABLE_BYTES`] ([`Error::Limit`] at the table's offset).
    #[cfg(feature = "alloc")]
    pub(crate) fn check_reftable_limit<E>(&self, bytes: u64) -> Result<(), Error<E>> {
        Error::check_limit(
            Structure::RefcountTable,
            self.refcount_table_offset,
            Limit::RefcountTableBytes,
            bytes,
            MAX_REFCOUNT_TABLE_BYTES,
        )
    }
    /// Refuses more than [`MAX_SNAPSHOTS`] snapshots ([`Error::Limit`] at
    /// the snapshot table's offset).
    #[cfg(feature = "alloc")]
    pub(crate) fn check_snapshot_limit<E>(&self) -> Result<(), Error<E>> {
        Error::check_limit(
            Structure::SnapshotTable,
            self.snapshots_offset,
            Limit::Snapshots,
            u64::from(self.nb_snapshots),
            u64::from(MAX_SNAPSHOTS),
        )
    }
    /// Refuses an image with unknown incompatible bits (it cannot be
    /// interpreted): [`Unsupported::IncompatibleFeature`] naming the lowest
    /// such bit, without a name (the reader looks names up in the feature
    /// name table itself).
    #[cfg(feature = "alloc")]
    pub(crate) fn refuse_unknown_incompatible<E>(&self) -> Result<(), Error<E>> {
        let unknown = self.unknown_incompatible();
        if unknown == 0 {
            return Ok(());
        }
        Err(Error::Unsupported(Unsupported::IncompatibleFeature {
            bit: u8::try_from(unknown.trailing_zeros()).unwrap_or(u8::MAX),
            name: heapless::String::new(),
        }))
    }
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (NUL-trimmed, lossy for non-UTF-8).
    pub name: heapless::String<{ crate::error::FEATURE_NAME_LEN }>,
}

impl FeatureName {
    /// Bytes per entry.
    pub const LEN: usize = 48;
    /// Parses one 48-byte entry (`None` if shorter).
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::LEN)?;
        let raw = &b[2..];
        let n = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let mut name = heapless::String::new();
        for ch in core::str::from_utf8(&raw[..n]).unwrap_or("?").chars() {
            if name.push(ch).is_err() {
                break;
            }
        }
        Some(Self {
            kind: b[0],
            bit: b[1],
            name,
        })
    }
    /// Writes the entry into 48 bytes.
    pub fn emit(&self, b: &mut [u8]) {
        if let Some(b) = b.get_mut(..Self::LEN) {
            b.fill(0);
            b[0] = self.kind;
            b[1] = self.bit;
            let n = self.name.len().min(Self::LEN - 2);
            b[2..2usize.saturating_add(n)].copy_from_slice(&self.name.as_bytes()[..n]);
        }
    }
}

/// The bitmaps extension (kept opaque beyond its directory pointer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Bytes of the bitmap directory.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Extension payload length.
    pub const LEN: usize = 24;
    /// Parses the 24-byte payload.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::LEN)?;
        Some(Self {
            nb_bitmaps: be32(b, 0..4),
            directory_size: be64(b, 8..16),
            directory_offset: be64(b, 16..24),
        })
    }
    /// Writes the payload.
    pub fn emit(&self, b: &mut [u8]) {
        put(b, 0..4, &self.nb_bitmaps.to_be_bytes());
        put(b, 4..8, &[0; 4]);
        put(b, 8..16, &self.directory_size.to_be_bytes());
        put(b, 16..24, &self.directory_offset.to_be_bytes());
    }
}

/// The full disk encryption header pointer extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CryptoExt {
    /// Offset of the LUKS header region.
    pub offset: u64,
    /// Its length.
    pub length: u64,
}

impl CryptoExt {
    /// Extension payload length.
    pub const LEN: usize = 16;
    /// Parses the 16-byte payload.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::LEN)?;
        Some(Self {
            offset: be64(b, 0..8),
            length: be64(b, 8..16),
        })
    }
    /// Writes the payload.
    pub fn emit(&self, b: &mut [u8]) {
        put(b, 0..8, &self.offset.to_be_bytes());
        put(b, 8..16, &self.length.to_be_bytes());
    }
}

/// Writes one header extension (type, length, payload, zero padding to 8)
/// at the start of `buf`; returns the bytes used, or `None` if `buf` is too
/// short or the payload longer than `u32::MAX`.
pub fn emit_extension(buf: &mut [u8], ext_type: u32, payload: &[u8]) -> Option<usize> {
    let len = u32::try_from(payload.len()).ok()?;
    let span = usize::try_from(extension_span(len)).ok()?;
    let out = buf.get_mut(..span)?;
    out.fill(0);
    out.get_mut(0..4)?.copy_from_slice(&ext_type.to_be_bytes());
    out.get_mut(4..8)?.copy_from_slice(&len.to_be_bytes());
    out.get_mut(8..8usize.checked_add(payload.len())?)?
        .copy_from_slice(payload);
    Some(span)
}

/// Parses an extension's 8-byte header: `(type, length)`.
pub fn extension_header(b: &[u8; 8]) -> (u32, u32) {
    (be32(b, 0..4), be32(b, 4..8))
}

/// Bytes an extension of `len` payload bytes occupies, padded to 8.
pub fn extension_span(len: u32) -> u64 {
    8u64.saturating_add(u64::from(len).next_multiple_of(8))
}

#[cfg(test)]
mod tests;
