//! Creating qcow2 images (needs `alloc`), with qemu-img's options, checks
//! and messages, and the layout qemu-img 10 writes: header and extensions
//! in cluster 0, the refcount table in cluster 1, the first refcount block
//! in cluster 2, the L1 table from cluster 3.

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::error::Error;
use crate::header::{
    autoclear, compat, emit_extension, ext, incompat, CryptMethod, FeatureName, Header, HeaderRepr,
    COMPRESSION_ZLIB, COMPRESSION_ZSTD,
};
use crate::limits::{MAX_L1_ENTRIES, MAX_NAME_LEN};
use crate::table::{L2Geometry, RefcountGeometry};
use crate::units::ClusterSize;
use crate::writer::Qcow2Writer;
use luks_core::io::BlockIo;

/// qemu-img's `preallocation` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the metadata qemu-img always writes.
    #[default]
    Off,
    /// Every L2 table and data cluster allocated (the file stays sparse).
    Metadata,
    /// As `Metadata`, and every data cluster written with zeroes.
    Full,
}

/// qemu-img's `-o` options for `create -f qcow2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions<'a> {
    /// Virtual size in bytes (rounded up to 512, as qemu-img does).
    pub size: u64,
    /// `compat=1.1` (true, version 3) or `compat=0.10` (false, version 2).
    pub v3: bool,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width in bits: a power of two up to 64; 16 on v2.
    pub refcount_bits: u32,
    /// Lazy refcounts (v3 only). This writer still updates refcounts
    /// eagerly, which the feature allows.
    pub lazy_refcounts: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// 0 zlib, 1 zstd (v3 only; sets incompatible bit 3).
    pub compression_type: u8,
    /// Extended L2 entries (v3, clusters of at least 16 KiB).
    pub extended_l2: bool,
    /// External data file name (v3); the caller creates the file.
    pub data_file: Option<&'a str>,
    /// The external data file is a valid raw image.
    pub data_file_raw: bool,
    /// Backing file name.
    pub backing_file: Option<&'a str>,
    /// Backing file format name.
    pub backing_fmt: Option<&'a str>,
    /// LUKS encryption (crypt_method 2): the length in bytes of the LUKS
    /// header region (header and key material). `create` reserves it
    /// (whole clusters, right after the L1 table, zero-filled), writes the
    /// full disk encryption header extension and returns a writer that
    /// refuses guest I/O until given a key: format LUKS1 into
    /// `Window(dev, offset, length)` (see [`Qcow2Writer::crypto_region`])
    /// and attach the key with [`Qcow2Writer::with_key`].
    pub luks_region_len: Option<u64>,
}

impl Default for CreateOptions<'_> {
    /// qemu-img's defaults (with size 0).
    fn default() -> Self {
        Self {
            size: 0,
            v3: true,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            compression_type: COMPRESSION_ZLIB,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
            backing_file: None,
            backing_fmt: None,
            luks_region_len: None,
        }
    }
}

/// Why `create` refused or failed. The messages are qemu-img's.
#[derive(Debug)]
#[non_exhaustive]
pub enum CreateError<E> {
    /// The device failed.
    Qcow2(Error<E>),
    /// Cluster size not a power of two in 512..=2 MiB.
    ClusterSize(u64),
    /// Refcount width not a power of two up to 64.
    RefcountWidth(u32),
    /// A refcount width other than 16 on v2.
    RefcountWidthNeedsV3,
    /// Lazy refcounts on v2.
    LazyRefcountsNeedV3,
    /// zstd on v2.
    CompressionNeedsV3,
    /// Unknown compression type.
    CompressionType(u8),
    /// Extended L2 on v2.
    ExtendedL2NeedsV3,
    /// Extended L2 with clusters below 16 KiB.
    ExtendedL2ClusterSize,
    /// External data file on v2.
    DataFileNeedsV3,
    /// `data_file_raw` without `data_file`.
    DataFileRawNeedsDataFile,
    /// Full preallocation with an external data file (the data device
    /// belongs to the caller).
    DataFilePreallocation,
    /// `backing_fmt` without `backing_file`.
    BackingFmtWithoutFile,
    /// A name longer than 1023 bytes.
    NameTooLong,
    /// The header, extensions and backing file name do not fit cluster 0.
    HeaderTooLarge,
    /// The virtual size needs more L1 entries than QEMU allows.
    TooLarge(u64),
    /// Encryption on v2, with an external data file, with full
    /// preallocation, or an empty LUKS region.
    Encryption(&'static str),
}

impl<E> From<Error<E>> for CreateError<E> {
    fn from(e: Error<E>) -> Self {
        Self::Qcow2(e)
    }
}

const V3_HINT: &str = "(use version=v3 or greater)";

impl<E: fmt::Display> fmt::Display for CreateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Qcow2(e) => e.fmt(f),
            Self::ClusterSize(_) => {
                f.write_str("Cluster size must be a power of two between 512 and 2048k")
            }
            Self::RefcountWidth(_) => {
                f.write_str("Refcount width must be a power of two and may not exceed 64 bits")
            }
            Self::RefcountWidthNeedsV3 => write!(
                f,
                "Different refcount widths than 16 bits require compatibility level 1.1 or above {V3_HINT}"
            ),
            Self::LazyRefcountsNeedV3 => write!(
                f,
                "Lazy refcounts only supported with compatibility level 1.1 and above {V3_HINT}"
            ),
            Self::CompressionNeedsV3 => write!(
                f,
                "Non-zlib compression type is only supported with compatibility level 1.1 and above {V3_HINT}"
            ),
            Self::CompressionType(t) => write!(f, "Unknown compression type {t}"),
            Self::ExtendedL2NeedsV3 => write!(
                f,
                "Extended L2 entries are only supported with compatibility level 1.1 and above {V3_HINT}"
            ),
            Self::ExtendedL2ClusterSize => f.write_str(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ),
            Self::DataFileNeedsV3 => write!(
                f,
                "External data files are only supported with compatibility level 1.1 and above {V3_HINT}"
            ),
            Self::DataFileRawNeedsDataFile => f.write_str("data-file-raw requires data-file"),
            Self::DataFilePreallocation => f.write_str(
                "Full preallocation with an external data file is not supported by qcow-core",
            ),
            Self::BackingFmtWithoutFile => {
                f.write_str("Backing format cannot be used without backing file")
            }
            Self::NameTooLong => f.write_str("File name too long (at most 1023 bytes)"),
            Self::HeaderTooLarge => {
                f.write_str("The header extensions and backing file name do not fit in cluster 0")
            }
            Self::TooLarge(s) => write!(f, "Image size {s} is too large for this cluster size"),
            Self::Encryption(why) => write!(f, "Encryption: {why}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for CreateError<E> {}

/// The feature name table QEMU 10 writes: (type, bit, name).
const FEATURES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Header length QEMU 10 writes for v3: 104 + compression type, padded.
pub(crate) const V3_HEADER_LEN: u32 = 112;

/// Largest LUKS header region accepted (LUKS1 with a 512-byte key needs
/// about 16 MiB).
const MAX_LUKS_REGION: u64 = 64 << 20;

fn validate<E>(o: &CreateOptions<'_>) -> Result<(ClusterSize, u32), CreateError<E>> {
    let cs = o.cluster_size;
    let csz = ClusterSize::from_bytes(cs).map_err(|_| CreateError::ClusterSize(cs))?;
    let rb = o.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(CreateError::RefcountWidth(rb));
    }
    if !o.v3 {
        if rb != 16 {
            return Err(CreateError::RefcountWidthNeedsV3);
        }
        if o.lazy_refcounts {
            return Err(CreateError::LazyRefcountsNeedV3);
        }
        if o.compression_type != COMPRESSION_ZLIB {
            return Err(CreateError::CompressionNeedsV3);
        }
        if o.extended_l2 {
            return Err(CreateError::ExtendedL2NeedsV3);
        }
        if o.data_file.is_some() {
            return Err(CreateError::DataFileNeedsV3);
        }
    }
    if o.compression_type != COMPRESSION_ZLIB && o.compression_type != COMPRESSION_ZSTD {
        return Err(CreateError::CompressionType(o.compression_type));
    }
    if o.extended_l2 && cs < 16384 {
        return Err(CreateError::ExtendedL2ClusterSize);
    }
    if o.data_file_raw && o.data_file.is_none() {
        return Err(CreateError::DataFileRawNeedsDataFile);
    }
    if o.data_file.is_some() && o.preallocation == Preallocation::Full {
        return Err(CreateError::DataFilePreallocation);
    }
    if let Some(len) = o.luks_region_len {
        // A version 2 image carries the LUKS header region in the same
        // crypto header extension as version 3 (qemu-img 10 writes it for
        // `compat=0.10,encrypt.format=luks`, as libvirt asks).
        if o.data_file.is_some() {
            return Err(CreateError::Encryption(
                "an external data file cannot be encrypted by qcow-core",
            ));
        }
        if o.preallocation == Preallocation::Full {
            return Err(CreateError::Encryption(
                "full preallocation of an encrypted image is not supported by qcow-core",
            ));
        }
        if len == 0 || len > MAX_LUKS_REGION {
            return Err(CreateError::Encryption("invalid LUKS header region length"));
        }
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err(CreateError::BackingFmtWithoutFile);
    }
    for n in [o.data_file, o.backing_file, o.backing_fmt]
        .into_iter()
        .flatten()
    {
        if n.len() > MAX_NAME_LEN {
            return Err(CreateError::NameTooLong);
        }
    }
    Ok((csz, rb.trailing_zeros()))
}

/// The payload of the feature name table extension QEMU 10 writes.
pub(crate) fn feature_table() -> Vec<u8> {
    let mut table = vec![0u8; FEATURES.len().saturating_mul(FeatureName::LEN)];
    for (i, (kind, bit, name)) in FEATURES.iter().enumerate() {
        let mut s = heapless::String::new();
        let _ = s.push_str(name);
        let fname = FeatureName {
            kind: *kind,
            bit: *bit,
            name: s,
        };
        let off = i.saturating_mul(FeatureName::LEN);
        if let Some(b) = table.get_mut(off..) {
            fname.emit(b);
        }
    }
    table
}

/// Cluster 0: header, extensions, end marker, backing file name.
fn cluster0<E>(
    hdr: &mut HeaderRepr,
    o: &CreateOptions<'_>,
    crypto: Option<(u64, u64)>,
) -> Result<Vec<u8>, CreateError<E>> {
    let mut buf = vec![0u8; usize::try_from(hdr.cluster_size()).unwrap_or(0)];
    let too_big = || CreateError::HeaderTooLarge;
    let mut at = hdr.buffer_len();
    if let Some(f) = o.backing_fmt {
        let n = emit_extension(
            buf.get_mut(at..).ok_or_else(too_big)?,
            ext::BACKING_FORMAT,
            f.as_bytes(),
        )
        .ok_or_else(too_big)?;
        at = at.saturating_add(n);
    }
    if let Some(f) = o.data_file {
        let n = emit_extension(
            buf.get_mut(at..).ok_or_else(too_big)?,
            ext::DATA_FILE,
            f.as_bytes(),
        )
        .ok_or_else(too_big)?;
        at = at.saturating_add(n);
    }
    if let Some((off, len)) = crypto {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&off.to_be_bytes());
        payload[8..].copy_from_slice(&len.to_be_bytes());
        let n = emit_extension(
            buf.get_mut(at..).ok_or_else(too_big)?,
            ext::CRYPTO,
            &payload,
        )
        .ok_or_else(too_big)?;
        at = at.saturating_add(n);
    }
    if hdr.version >= 3 {
        let table = feature_table();
        // Optional: left out when it does not fit (small clusters with
        // an encryption extension), as QEMU does; qemu-img 10 also leaves
        // it out of images with clusters of 4 KiB and less.
        let need = at
            .saturating_add(8)
            .saturating_add(table.len().next_multiple_of(8))
            .saturating_add(8)
            .saturating_add(o.backing_file.map_or(0, str::len));
        if need <= buf.len() && buf.len() > 4096 {
            let n = emit_extension(
                buf.get_mut(at..).ok_or_else(too_big)?,
                ext::FEATURE_TABLE,
                &table,
            )
            .ok_or_else(too_big)?;
            at = at.saturating_add(n);
        }
    }
    let n = emit_extension(buf.get_mut(at..).ok_or_else(too_big)?, ext::END, &[])
        .ok_or_else(too_big)?;
    at = at.saturating_add(n);
    if let Some(b) = o.backing_file {
        buf.get_mut(at..at.saturating_add(b.len()))
            .ok_or_else(too_big)?
            .copy_from_slice(b.as_bytes());
        hdr.backing_file_offset = at as u64;
        hdr.backing_file_size = u32::try_from(b.len()).map_err(|_| CreateError::NameTooLong)?;
    }
    let len = hdr.buffer_len();
    hdr.emit(&mut Header::new_unchecked(&mut buf[..len]));
    Ok(buf)
}

/// Writes a new, empty qcow2 image onto `dev` (which should be empty) and
/// returns it open for writing. The data device of an external data file
/// is the caller's business: with `data_file` set, create the file (QEMU
/// sizes it to the virtual size) and attach it with
/// [`Qcow2Writer::with_data_file`] before writing guest data. With
/// `data_file_raw`, every cluster is mapped 1:1 into it at creation.
pub fn create<D: BlockIo>(
    dev: D,
    o: &CreateOptions<'_>,
) -> Result<Qcow2Writer<D>, CreateError<D::Error>> {
    let (csz, order) = validate(o)?;
    let cb = csz.bits();
    let cs = o.cluster_size;
    let size = o
        .size
        .checked_next_multiple_of(512)
        .ok_or(CreateError::TooLarge(o.size))?;
    let l1_size = L2Geometry::new(csz, o.extended_l2, false).l1_entries_for(size);
    if l1_size > u64::from(MAX_L1_ENTRIES) {
        return Err(CreateError::TooLarge(size));
    }
    let mut inc = 0u64;
    if o.compression_type != COMPRESSION_ZLIB {
        inc |= incompat::COMPRESSION;
    }
    if o.extended_l2 {
        inc |= incompat::EXTENDED_L2;
    }
    if o.data_file.is_some() {
        inc |= incompat::DATA_FILE;
    }
    let mut hdr = HeaderRepr {
        version: if o.v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size,
        crypt_method: if o.luks_region_len.is_some() {
            CryptMethod::Luks
        } else {
            CryptMethod::None
        },
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: inc,
        compatible_features: if o.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if o.data_file_raw {
            autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: order,
        header_length: if o.v3 { V3_HEADER_LEN } else { 72 },
        compression_type: o.compression_type,
    };
    let placeholder = o.luks_region_len.map(|l| (0, l));
    let c0 = cluster0(&mut hdr.clone(), o, placeholder)?;
    let csu = usize::try_from(cs).unwrap_or(0);
    let mut rt = vec![0u8; csu];
    rt[..8].copy_from_slice(&cs.saturating_mul(2).to_be_bytes());
    let mut rb = vec![0u8; csu];
    let rc = RefcountGeometry::new(csz, order);
    for c in 0..3 {
        rc.set(&mut rb, c, 1);
    }
    let mut reftable = vec![0u64; usize::try_from(cs >> 3).unwrap_or(0)];
    reftable[0] = cs.saturating_mul(2);
    let mut w = Qcow2Writer::<D>::from_parts(dev, hdr, Vec::new(), reftable, 0);
    w.raw_write(0, &c0)?;
    w.raw_write(cs, &rt)?;
    w.raw_write(cs.saturating_mul(2), &rb)?;
    // The L1 table through the allocator, which adds refcount blocks (and
    // grows the refcount table) should the table be large.
    let l1_clusters = l1_size.saturating_mul(8).div_ceil(cs).max(1);
    let l1_off = w.alloc(l1_clusters)?.get();
    let l1_bytes = l1_size.saturating_mul(8).next_multiple_of(512).max(512);
    w.raw_write(l1_off, &vec![0u8; usize::try_from(l1_bytes).unwrap_or(0)])?;
    w.set_l1(l1_off, vec![0u64; usize::try_from(l1_size).unwrap_or(0)]);
    // The LUKS region right after the L1 table, as QEMU places it, zeroed
    // to whole clusters so that no reference points past the end of file.
    let mut crypto = None;
    if let Some(len) = o.luks_region_len {
        let clusters = len.div_ceil(cs);
        let off = w.alloc(clusters)?.get();
        let zero = vec![0u8; csu];
        for i in 0..clusters {
            w.raw_write(off.saturating_add(i.saturating_mul(cs)), &zero)?;
        }
        w.set_crypto_region(off, len);
        crypto = Some((off, len));
    }
    hdr = *w.header();
    let c0 = cluster0(&mut hdr, o, crypto)?;
    w.raw_write(0, &c0)?;
    w.set_header(hdr);
    w.flush()?;
    match o.preallocation {
        // QEMU maps every cluster of a raw data file 1:1 at creation, so
        // that the file stays a valid raw image.
        Preallocation::Off if o.data_file_raw => w.preallocate(false)?,
        Preallocation::Off => {}
        Preallocation::Metadata => w.preallocate(false)?,
        Preallocation::Full => w.preallocate(true)?,
    }
    Ok(w)
}

/// What an image created with some options would take on disk, split the
/// way `qemu-img measure` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes of metadata once every guest cluster is allocated: cluster 0,
    /// the L1 table, every L2 table, the refcount table and blocks that
    /// count all of it, and the LUKS header region (whole clusters).
    pub metadata: u64,
    /// The cluster size, the granularity of data allocation.
    pub cluster_size: u64,
    /// Guest bytes of data clusters when all are allocated (the virtual
    /// size rounded up to whole clusters).
    pub data: u64,
}

impl Measure {
    /// `qemu-img measure`'s "fully allocated size".
    pub fn fully_allocated(&self) -> u64 {
        self.metadata.saturating_add(self.data)
    }
}

/// Refcount blocks and refcount table clusters (in clusters) needed to
/// count `clusters` clusters plus themselves: the smallest fixed point of
/// blocks = ⌈(clusters + blocks + table) / refcounts per block⌉,
/// table = ⌈blocks × 8 / cluster size⌉, reached by iterating from zero
/// (each step can only grow both, and they are bounded by `clusters`).
fn refcount_clusters(clusters: u64, cluster: ClusterSize, refcount_order: u32) -> u64 {
    let cluster_bits = cluster.bits();
    // A block holds cluster_size × 8 / refcount_bits entries; a table
    // cluster holds cluster_size / 8 block offsets. `validate` bounds
    // cluster_bits to 9..=21 and refcount_order to 0..=6.
    let shift = |bits: Option<u32>| bits.and_then(|b| 1u64.checked_shl(b)).unwrap_or(1);
    let per_block = RefcountGeometry::new(cluster, refcount_order).entries_per_block();
    let per_table = shift(cluster_bits.checked_sub(3));
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let covered = clusters.saturating_add(blocks).saturating_add(table);
        let nb = covered.div_ceil(per_block);
        let nt = nb.div_ceil(per_table);
        if (nb, nt) == (blocks, table) {
            return blocks.saturating_add(table);
        }
        (blocks, table) = (nb, nt);
    }
}

/// Sizes an image created with `o` would reach, as qemu-img measures them
/// (the options are validated as [`create`] does; `preallocation` does not
/// change the result, the caller decides what is required). Pure
/// arithmetic over the format: no device is touched.
pub fn measure<E>(o: &CreateOptions<'_>) -> Result<Measure, CreateError<E>> {
    // Measuring does not preallocate: check the rest of the options only.
    let check = CreateOptions {
        preallocation: Preallocation::Off,
        ..o.clone()
    };
    let (cluster, refcount_order) = validate::<E>(&check)?;
    let cluster_bits = cluster.bits();
    let cs = o.cluster_size;
    let too_large = || CreateError::TooLarge(o.size);
    let aligned = o.size.checked_next_multiple_of(cs).ok_or_else(too_large)?;
    let data_clusters = aligned >> cluster_bits;
    // An L2 entry is 8 bytes, or 16 with extended L2.
    let l2_entry_bits = if o.extended_l2 { 4 } else { 3 };
    let per_l2 = cluster_bits
        .checked_sub(l2_entry_bits)
        .and_then(|b| 1u64.checked_shl(b))
        .ok_or_else(too_large)?;
    let l2_tables = data_clusters.div_ceil(per_l2);
    if l2_tables > u64::from(MAX_L1_ENTRIES) {
        return Err(too_large());
    }
    // At most MAX_L1_ENTRIES (4 Mi) tables: none of the sums below can
    // overflow before the refcounts, which saturate.
    let l1_clusters = l2_tables.saturating_mul(8).div_ceil(cs);
    // Cluster 0 (header), L1, L2 tables, then refcounts covering those and
    // every data cluster.
    let tables = l1_clusters.saturating_add(l2_tables).saturating_add(1);
    let counted = tables.saturating_add(data_clusters);
    let meta_clusters = tables.saturating_add(refcount_clusters(counted, cluster, refcount_order));
    let luks = match o.luks_region_len {
        Some(len) => len.checked_next_multiple_of(cs).ok_or_else(too_large)?,
        None => 0,
    };
    let metadata = meta_clusters
        .checked_mul(cs)
        .and_then(|m| m.checked_add(luks))
        .ok_or_else(too_large)?;
    Ok(Measure {
        metadata,
        cluster_size: cs,
        data: aligned,
    })
}

#[cfg(test)]
mod measure_tests {
    use super::*;

    fn meta(size: u64, cs: u64, rb: u32, ext: bool) -> u64 {
        let o = CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits: rb,
            extended_l2: ext,
            ..CreateOptions::default()
        };
        measure::<()>(&o).unwrap().metadata
    }

    #[test]
    fn ten_gib_by_hand() {
        // 163840 data clusters: 20 L2 tables, 1 L1 cluster, the header;
        // 163862 clusters need 6 refcount blocks (32768 each) and 1 table.
        assert_eq!(meta(10 << 30, 65536, 16, false), 29 * 65536);
        // Extended L2: 40 tables.
        assert_eq!(meta(10 << 30, 65536, 16, true), 49 * 65536);
        // 1-bit refcounts: one block covers 524288 clusters.
        assert_eq!(meta(10 << 30, 65536, 1, false), 24 * 65536);
    }

    #[test]
    fn refcounts_count_themselves() {
        // 512 B clusters, 16-bit refcounts: 256 entries a block. 254
        // clusters, the block and the table fit one block; 255 need two.
        assert_eq!(refcount_clusters(254, ClusterSize::MIN, 4), 2);
        assert_eq!(refcount_clusters(255, ClusterSize::MIN, 4), 3);
    }

    #[test]
    fn bad_options_are_refused() {
        let o = CreateOptions {
            cluster_size: 1000,
            ..CreateOptions::default()
        };
        assert!(matches!(
            measure::<()>(&o),
            Err(CreateError::ClusterSize(1000))
        ));
    }
}

#[cfg(test)]
mod v2_luks_tests {
    use super::*;

    /// `compat=0.10,encrypt.format=luks` (libvirt's qcow2-luks line): a
    /// version 2 header whose extensions carry the backing format and the
    /// LUKS region, the region right after the L1 table. The expected
    /// bytes are those qemu-img 10.0.2 writes for
    /// `create -f qcow2 -b /dev/null -o backing_fmt=raw,encrypt.format=luks,compat=0.10 IMG 5242880K`.
    #[test]
    fn version_2_luks_header_is_qemu_imgs() {
        let o = CreateOptions {
            size: 5 << 30,
            v3: false,
            backing_file: Some("/dev/null"),
            backing_fmt: Some("raw"),
            luks_region_len: Some(0x1f_9000),
            ..CreateOptions::default()
        };
        let w = create(luks_core::io::VecDevice::new(), &o).unwrap();
        let dev = w.into_device();
        let mut want = [0u8; 0x88];
        let words: [(usize, &[u8]); 9] = [
            (
                0x00,
                b"QFI\xfb\0\0\0\x02\0\0\0\0\0\0\0\x78\0\0\0\x09\0\0\0\x10\0\0\0\x01\x40\0\0\0",
            ),
            (
                0x20,
                b"\0\0\0\x02\0\0\0\x0a\0\0\0\0\0\x03\0\0\0\0\0\0\0\x01\0\0",
            ),
            (0x38, b"\0\0\0\x01"),
            (0x48, b"\xe2\x79\x2a\xca\0\0\0\x03raw\0"),
            (0x58, b"\x05\x37\xbe\x77\0\0\0\x10"),
            (0x60, b"\0\0\0\0\0\x04\0\0"),
            (0x68, b"\0\0\0\0\0\x1f\x90\0"),
            (0x70, b"\0\0\0\0\0\0\0\0"),
            (0x78, b"/dev/null"),
        ];
        for (at, bytes) in words {
            want[at..at + bytes.len()].copy_from_slice(bytes);
        }
        assert_eq!(&dev.as_slice()[..0x88], &want[..]);
    }
}
