//! Changing an image's options in place, as `qemu-img amend` does:
//! compatibility level (v2 <-> v3), lazy refcounts, refcount width, the
//! external data file's name and its "raw" bit, and the virtual size.
//!
//! Every refusal is decided by [`Qcow2Writer::amend`] before the first
//! byte is written, so a refused amend leaves the image byte-identical
//! (qemu-img may have finished an earlier step, such as the upgrade,
//! before it refuses a later one). Shrinking drops the clusters past the
//! new end, as qemu-img does, except with an external data file (refused
//! while any is allocated).
//!
//! Crash safety: each step leaves a consistent image behind. The new
//! refcount structures of a width change are written past every used
//! cluster and flushed before one sector write of the header points at
//! them; the old structures are counted as free in the new blocks, so
//! nothing is freed afterwards. Header changes are one write of cluster 0
//! (or of the fields), then a flush.

#![warn(clippy::arithmetic_side_effects)]

extern crate alloc;

use alloc::collections::BTreeSet;
use alloc::vec;
use alloc::vec::Vec;

use super::{overflow, Qcow2Writer, ResizeError, SECTOR_BYTES};
use crate::entry::{self, COMPRESSED, ZERO};
use crate::error::{Error, LayerError, Problem, Structure};
use crate::header::{
    autoclear, compat, emit_extension, ext, extension_header, extension_span, field, incompat,
    COMPRESSION_ZLIB,
};
use crate::table::RefcountGeometry;
use crate::units::ClusterSize;
use luks_core::io::BlockIo;

/// What to change; `None` leaves an option as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmendOptions<'a> {
    /// Header version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: Option<u32>,
    /// The lazy refcounts compatible feature.
    pub lazy_refcounts: Option<bool>,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: Option<u32>,
    /// A new name for the external data file.
    pub data_file: Option<&'a str>,
    /// The "raw external data" autoclear bit (can only be cleared).
    pub data_file_raw: Option<bool>,
    /// A new virtual size in bytes.
    pub size: Option<u64>,
}

/// Why an amend was refused (qemu-img's words in `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AmendRefusal {
    /// Not 2 or 3.
    Version(u32),
    /// Not 0..=6.
    RefcountOrder(u32),
    /// A refcount width other than 16 on a v2 image.
    RefcountWidthNeedsV3,
    /// Lazy refcounts on a v2 image.
    LazyRefcountsNeedV3,
    /// `data_file` on an image without one.
    NoDataFile,
    /// An empty data file name (qimg: the image would name no file).
    EmptyDataFileName,
    /// `data_file_raw=on` on an image whose data file is not raw.
    DataFileRawOn,
    /// Downgrade with a refcount width other than 16.
    DowngradeRefcountWidth,
    /// Downgrade of an image with an external data file.
    DowngradeDataFile,
    /// Downgrade with a snapshot of another disk size or a VM state
    /// larger than 32 bits can say.
    DowngradeSnapshots,
    /// Downgrade with these incompatible features set.
    DowngradeIncompatible(u64),
    /// Downgrade of a zstd image holding compressed clusters.
    DowngradeZstd,
    /// Downgrade of an encrypted overlay with zero clusters in a
    /// snapshot's tables (qimg writes encrypted zeroes only through the
    /// active layer).
    DowngradeSnapshotZeroClusters,
    /// A narrower refcount width cannot hold this cluster's refcount.
    RefcountTooLarge {
        /// The new width in bits.
        bits: u32,
        /// Host offset of the cluster.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
}

impl core::fmt::Display for AmendRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Version(v) => write!(f, "Cannot change the image to version {v}"),
            Self::RefcountOrder(_) => {
                f.write_str("Refcount width must be a power of two and may not exceed 64 bits")
            }
            Self::RefcountWidthNeedsV3 => f.write_str(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)",
            ),
            Self::LazyRefcountsNeedV3 => f.write_str(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            ),
            Self::NoDataFile => {
                f.write_str("data-file can only be set for images that use an external data file")
            }
            Self::EmptyDataFileName => f.write_str(
                "data-file must name a file (an image with an external data file cannot \
                 drop its name)",
            ),
            Self::DataFileRawOn => f.write_str("data-file-raw cannot be set on existing images"),
            Self::DowngradeRefcountWidth => f.write_str("compat=0.10 requires refcount_bits=16"),
            Self::DowngradeDataFile => f.write_str("Cannot downgrade an image with a data file"),
            Self::DowngradeSnapshots => {
                f.write_str("Internal snapshots prevent downgrade of image")
            }
            Self::DowngradeIncompatible(bits) => write!(
                f,
                "Cannot downgrade an image with incompatible features {bits:#x} set"
            ),
            Self::DowngradeZstd => f.write_str(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters",
            ),
            Self::DowngradeSnapshotZeroClusters => f.write_str(
                "Cannot downgrade: an internal snapshot of this encrypted overlay has zero \
                 clusters, which version 2 cannot express, and qimg writes encrypted zeroes \
                 only through the active layer (delete the snapshot first)",
            ),
            Self::RefcountTooLarge {
                bits,
                offset,
                refcount,
            } => write!(
                f,
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset \
                 {offset:#x} has a refcount of {refcount}"
            ),
        }
    }
}

/// Why [`Qcow2Writer::amend`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AmendError<E> {
    /// Refused before anything was written.
    Refused(AmendRefusal),
    /// The image (or its device) failed.
    Qcow2(Error<E>),
    /// The size change failed.
    Resize(ResizeError<E>),
}

impl<E> From<Error<E>> for AmendError<E> {
    fn from(e: Error<E>) -> Self {
        Self::Qcow2(e)
    }
}

impl<E: core::fmt::Display> core::fmt::Display for AmendError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Refused(r) => r.fmt(f),
            Self::Qcow2(e) => e.fmt(f),
            Self::Resize(e) => e.fmt(f),
        }
    }
}

impl<E: core::fmt::Debug + core::fmt::Display> core::error::Error for AmendError<E> {}

/// What a scan of the L2 tables found.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    /// A snapshot's tables hold a zero cluster.
    snapshot_zero: bool,
    /// Some table holds a compressed cluster.
    compressed: bool,
}

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    /// Applies `o` in qemu-img's order: upgrade, refcount width, data file
    /// name and raw bit, lazy refcounts, size, downgrade. Every refusal is
    /// checked first, so a refused amend writes nothing.
    ///
    /// A downgrade turns the active layer's zero clusters into unallocated
    /// clusters (no backing file) or zero-filled data clusters (with one,
    /// which must then be attached so partial clusters can be copied).
    pub fn amend(&mut self, o: &AmendOptions<'_>) -> Result<(), AmendError<D::Error>> {
        self.settle()?;
        let refuse = |r| Err(AmendError::Refused(r));
        let old_version = self.hdr.version;
        let version = o.version.unwrap_or(old_version);
        if version != 2 && version != 3 {
            return refuse(AmendRefusal::Version(version));
        }
        let order = o.refcount_order.unwrap_or(self.hdr.refcount_order);
        if order > 6 {
            return refuse(AmendRefusal::RefcountOrder(order));
        }
        if order != self.hdr.refcount_order && version < 3 && order != 4 {
            return refuse(AmendRefusal::RefcountWidthNeedsV3);
        }
        if o.data_file.is_some() && !self.df() {
            return refuse(AmendRefusal::NoDataFile);
        }
        if o.data_file == Some("") {
            return refuse(AmendRefusal::EmptyDataFileName);
        }
        if o.data_file_raw == Some(true) && !self.df_raw() {
            return refuse(AmendRefusal::DataFileRawOn);
        }
        let lazy_now = self.hdr.compatible_features & compat::LAZY_REFCOUNTS != 0;
        let lazy = o.lazy_refcounts.unwrap_or(lazy_now);
        if lazy && !lazy_now && version < 3 {
            return refuse(AmendRefusal::LazyRefcountsNeedV3);
        }
        let new_size = o.size.unwrap_or(self.hdr.size);
        if new_size != self.hdr.size {
            self.check_resize(new_size).map_err(AmendError::Resize)?;
        }
        let downgrade = version < old_version;
        if downgrade {
            self.check_downgrade(order, new_size)?;
        }
        if order < self.hdr.refcount_order {
            self.check_refcounts_fit(order)?;
        }

        if version > old_version {
            self.upgrade()?;
        }
        if order != self.hdr.refcount_order {
            self.change_refcount_order(order)?;
        }
        let raw_off = o.data_file_raw == Some(false) && self.df_raw();
        if raw_off || o.data_file.is_some() {
            let mut h = self.hdr;
            if raw_off {
                h.autoclear_features &= !autoclear::DATA_FILE_RAW;
            }
            self.rewrite_cluster0(h, o.data_file)?;
        }
        if lazy != lazy_now {
            let mut bits = self.hdr.compatible_features;
            if lazy {
                bits |= compat::LAZY_REFCOUNTS;
            } else {
                bits &= !compat::LAZY_REFCOUNTS;
            }
            self.write_dev(
                field::COMPATIBLE_FEATURES.start as u64,
                &bits.to_be_bytes(),
                Structure::Header,
            )?;
            self.flush_dev()?;
            self.hdr.compatible_features = bits;
        }
        if new_size != self.hdr.size {
            if new_size < self.hdr.size && !self.df() {
                self.drop_past(new_size)?;
            }
            self.resize(new_size).map_err(AmendError::Resize)?;
        }
        if downgrade {
            self.downgrade()?;
        }
        Ok(())
    }

    /// The refusals of a resize to `new_size`, checked without writing.
    fn check_resize(&mut self, new_size: u64) -> Result<(), ResizeError<D::Error>> {
        if !new_size.is_multiple_of(512) {
            return Err(ResizeError::Unaligned(new_size));
        }
        if self.df() && self.data.is_none() {
            return Err(ResizeError::Qcow2(Error::DataFileMissing));
        }
        if !self.df() {
            // Dropped, as qemu-img drops them (see `drop_past`).
            return Ok(());
        }
        let cs = self.cs();
        let mut at = new_size.div_ceil(cs).saturating_mul(cs);
        while at < self.hdr.size {
            let (_, e, bm) = self.get_entry(at)?;
            if e & (entry::OFFSET_MASK | COMPRESSED) != 0 || bm & super::ALL_ALLOCATED != 0 {
                return Err(ResizeError::ShrinkAllocated { offset: at });
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// Takes every cluster wholly past guest offset `end` out of the image
    /// (its data is lost, as qemu-img's amend drops it when shrinking).
    fn drop_past(&mut self, end: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let mut at = end.div_ceil(cs).saturating_mul(cs);
        while at < self.hdr.size {
            let (l2, e, bm) = self.get_entry(at)?;
            if l2.is_some() && (e != 0 || bm != 0) {
                let dec = self.decode(e);
                self.switch_entry(at, (0, 0), dec, e)?;
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// The refusals of a downgrade to v2 (after the refcount width became
    /// `order` and the size `size`).
    fn check_downgrade(&mut self, order: u32, size: u64) -> Result<(), AmendError<D::Error>> {
        let refuse = |r| Err(AmendError::Refused(r));
        if order != 4 {
            return refuse(AmendRefusal::DowngradeRefcountWidth);
        }
        if self.df() {
            return refuse(AmendRefusal::DowngradeDataFile);
        }
        let snaps = self.snapshots()?;
        if snaps.iter().any(|s| {
            s.fixed.vm_state_size > u64::from(u32::MAX) || s.fixed.disk_size.unwrap_or(size) != size
        }) {
            return refuse(AmendRefusal::DowngradeSnapshots);
        }
        // The dirty bit was settled when the image was opened.
        let other = self.hdr.incompatible_features & !incompat::COMPRESSION;
        if other != 0 {
            return refuse(AmendRefusal::DowngradeIncompatible(other));
        }
        let scan = self.scan_tables()?;
        let backed = self.hdr.backing_file_offset != 0;
        if scan.snapshot_zero && backed && self.hdr.crypt_method.is_encrypted() {
            return refuse(AmendRefusal::DowngradeSnapshotZeroClusters);
        }
        if self.hdr.compression_type != COMPRESSION_ZLIB && scan.compressed {
            return refuse(AmendRefusal::DowngradeZstd);
        }
        Ok(())
    }

    /// Looks through the L2 tables of the active layer and every snapshot
    /// for compressed clusters and (snapshots only) zero clusters.
    fn scan_tables(&mut self) -> Result<Scan, Error<D::Error>> {
        let mut scan = Scan::default();
        let mut seen = BTreeSet::new();
        let active = self.l1.clone();
        self.scan_layer(&active, false, &mut seen, &mut scan)?;
        // One snapshot's L1 table in memory at a time.
        for s in self.snapshots()? {
            let l1 = self.read_snapshot_l1(&s)?;
            self.scan_layer(&l1, true, &mut seen, &mut scan)?;
        }
        Ok(scan)
    }

    /// [`Self::scan_tables`] for the L2 tables of one L1 table (each table
    /// looked at once per kind of layer).
    fn scan_layer(
        &mut self,
        l1: &[u64],
        is_snapshot: bool,
        seen: &mut BTreeSet<(bool, u64)>,
        scan: &mut Scan,
    ) -> Result<(), Error<D::Error>> {
        let words = usize::try_from(self.cs() >> 3).unwrap_or(0);
        let step = self.l2_words().max(1);
        for &l1e in l1 {
            let off = entry::l1_l2_offset(l1e);
            if off == 0 || !seen.insert((is_snapshot, off)) {
                continue;
            }
            let t = self.read_u64s(off, words, Structure::L2Table)?;
            for e in t.iter().step_by(step) {
                if e & COMPRESSED != 0 {
                    scan.compressed = true;
                } else if is_snapshot && e & ZERO != 0 {
                    scan.snapshot_zero = true;
                }
            }
        }
        Ok(())
    }

    /// v2 -> v3: snapshot entries get the v3 extra data (64-bit VM state
    /// size, disk size), then cluster 0 is rewritten as a v3 header with
    /// the feature name table, as QEMU writes it.
    fn upgrade(&mut self) -> Result<(), Error<D::Error>> {
        let snaps = self.snapshots()?;
        if snaps.iter().any(|s| s.fixed.extra_size < 16) {
            let size = self.hdr.size;
            let list: Vec<_> = snaps
                .into_iter()
                .map(|mut s| {
                    if s.fixed.extra_size < 16 {
                        let mut extra = Vec::with_capacity(24);
                        extra.extend_from_slice(&s.fixed.vm_state_size.to_be_bytes());
                        extra.extend_from_slice(&size.to_be_bytes());
                        extra.extend_from_slice(&u64::MAX.to_be_bytes());
                        s.fixed.extra_size = 24;
                        s.fixed.disk_size = Some(size);
                        s.extra = extra;
                    }
                    s
                })
                .collect();
            self.replace_table(&list)?;
        }
        let mut h = self.hdr;
        h.version = 3;
        h.header_length = crate::create::V3_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.refcount_order = 4;
        h.compression_type = COMPRESSION_ZLIB;
        self.rewrite_cluster0(h, None)
    }

    /// v3 -> v2, after [`Self::check_downgrade`]: the active layer's zero
    /// clusters are expanded, then cluster 0 is rewritten as a v2 header.
    fn downgrade(&mut self) -> Result<(), Error<D::Error>> {
        let backed = self.hdr.backing_file_offset != 0;
        let cs = self.cs();
        let span = self.l2g().l1_span();
        let zeros = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for l1i in 0..self.l1.len() {
            let l1e = self.l1.get(l1i).copied().unwrap_or(0);
            if entry::l1_l2_offset(l1e) == 0 {
                continue;
            }
            let first = (l1i as u64).saturating_mul(span);
            let end = first.saturating_add(span).min(self.hdr.size);
            let mut g = first;
            while g < end {
                let (_, e, _) = self.get_entry(g)?;
                if e & COMPRESSED == 0 && e & ZERO != 0 {
                    if backed {
                        let n = usize::try_from(cs.min(end.saturating_sub(g))).unwrap_or(0);
                        self.write(g, zeros.get(..n).unwrap_or(&[]))?;
                    } else {
                        let dec = self.decode(e);
                        self.switch_entry(g, (0, 0), dec, e)?;
                    }
                }
                g = g.saturating_add(cs);
            }
        }
        self.flush_dev()?;
        self.expand_snapshot_zeroes(backed)?;
        let mut h = self.hdr;
        h.version = 2;
        h.header_length = 72;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = COMPRESSION_ZLIB;
        self.rewrite_cluster0(h, None)
    }

    /// The zero clusters left in the snapshots' L2 tables (the active
    /// layer's expansion copied any table it shared with them). Without
    /// a backing file an entry is cleared; with one, a fresh zeroed
    /// cluster takes its place, counted once per reference to the table.
    /// Per table: new clusters written and counted, flushed; the table
    /// rewritten in place (every snapshot sharing it reads the same
    /// zeroes), flushed; the old clusters' references dropped, flushed.
    fn expand_snapshot_zeroes(&mut self, backed: bool) -> Result<(), Error<D::Error>> {
        let cb = self.cb();
        let cs = self.cs();
        let words = usize::try_from(cs >> 3).unwrap_or(0);
        let zeros = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let mut seen = BTreeSet::new();
        for s in self.snapshots()? {
            for l1e in self.read_snapshot_l1(&s)? {
                let off = entry::l1_l2_offset(l1e);
                if off == 0 || !seen.insert(off) {
                    continue;
                }
                let mut t = self.read_u64s(off, words, Structure::L2Table)?;
                if !t.iter().any(|e| e & COMPRESSED == 0 && e & ZERO != 0) {
                    continue;
                }
                let refs = self.refcount(off >> cb)?.max(1);
                let mut old = Vec::new();
                for e in t.iter_mut() {
                    if *e & COMPRESSED != 0 || *e & ZERO == 0 {
                        continue;
                    }
                    let host = *e & entry::OFFSET_MASK;
                    if host != 0 {
                        old.push(host >> cb);
                    }
                    *e = if backed {
                        let c = self.alloc_clusters(1)?.get();
                        self.write_dev(c, &zeros, Structure::DataCluster)?;
                        if refs > 1 {
                            self.set_refcount_existing(c >> cb, refs)?;
                        }
                        c | if refs == 1 { entry::COPIED } else { 0 }
                    } else {
                        0
                    };
                }
                self.flush_dev()?;
                let mut raw = Vec::with_capacity(words.saturating_mul(8));
                for w in &t {
                    raw.extend_from_slice(&w.to_be_bytes());
                }
                self.write_dev(off, &raw, Structure::L2Table)?;
                self.l2_cache.remove(&off);
                self.flush_dev()?;
                for c in old {
                    let r = self.refcount(c)?;
                    self.set_refcount_existing(c, r.saturating_sub(refs))?;
                }
                self.flush_dev()?;
            }
        }
        Ok(())
    }

    /// Refuses a narrower width that some refcount does not fit.
    fn check_refcounts_fit(&mut self, order: u32) -> Result<(), AmendError<D::Error>> {
        let max = match 1u32
            .checked_shl(order)
            .and_then(|bits| 1u64.checked_shl(bits))
        {
            Some(v) => v.saturating_sub(1),
            None => u64::MAX,
        };
        let per = self.rcg().entries_per_block();
        for ti in 0..self.reftable.len() {
            if entry::reftable_block_offset(self.reftable.get(ti).copied().unwrap_or(0)) == 0 {
                continue;
            }
            let first = (ti as u64).saturating_mul(per);
            for c in first..first.saturating_add(per) {
                let r = self.refcount(c)?;
                if r > max {
                    return Err(AmendError::Refused(AmendRefusal::RefcountTooLarge {
                        bits: 1 << order,
                        offset: c.saturating_mul(self.cs()),
                        refcount: r,
                    }));
                }
            }
        }
        Ok(())
    }

    /// Rewrites the refcount table and blocks at width `1 << order`: new
    /// structures past every used cluster, flushed; then one write of the
    /// header's first sector switches to them. The new blocks count the
    /// old structures as free, so nothing is left to free afterwards.
    fn change_refcount_order(&mut self, order: u32) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let cb = self.cb();
        let old_rt = self.hdr.refcount_table_offset >> cb;
        let old_rt_n = u64::from(self.hdr.refcount_table_clusters);
        let old_blocks: BTreeSet<u64> = self
            .reftable
            .iter()
            .map(|&e| entry::reftable_block_offset(e) >> cb)
            .filter(|&c| c != 0)
            .collect();
        let used_end = self.highest_used()?.saturating_add(1);
        let start = self.file_len.div_ceil(cs).max(used_end);
        let ng = RefcountGeometry::new(ClusterSize::of(&self.hdr), order);
        let per = ng.entries_per_block();
        // Blocks (one per table entry, dense) and table clusters, covering
        // everything up to and including themselves.
        let (mut blocks, mut rt) = (0u64, 0u64);
        loop {
            let total = start
                .checked_add(rt)
                .and_then(|t| t.checked_add(blocks))
                .ok_or_else(|| overflow(Structure::RefcountTable, 0))?;
            let b = total.div_ceil(per);
            let r = b.saturating_mul(8).div_ceil(cs).max(1);
            if (b, r) == (blocks, rt) {
                break;
            }
            (blocks, rt) = (b, r);
        }
        let rt_clusters = u32::try_from(rt).map_err(|_| overflow(Structure::RefcountTable, 0))?;
        self.hdr
            .check_reftable_limit(rt.saturating_mul(cs))
            .map_err(|_: Error<D::Error>| overflow(Structure::RefcountTable, 0))?;
        let total = start.saturating_add(rt).saturating_add(blocks);
        let new_rt_off = start.saturating_mul(cs);
        let mut table = Vec::with_capacity(usize::try_from(blocks).unwrap_or(0));
        let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for bi in 0..blocks {
            block.fill(0);
            let first = bi.saturating_mul(per);
            for (i, c) in (first..first.saturating_add(per).min(total)).enumerate() {
                let v = if c >= start {
                    1
                } else if (old_rt..old_rt.saturating_add(old_rt_n)).contains(&c)
                    || old_blocks.contains(&c)
                {
                    0
                } else {
                    self.refcount(c)?
                };
                if !ng.set(&mut block, i as u64, v) {
                    return Err(overflow(Structure::RefcountBlock, c.saturating_mul(cs)));
                }
            }
            let at = start
                .saturating_add(rt)
                .saturating_add(bi)
                .saturating_mul(cs);
            self.write_dev(at, &block, Structure::RefcountBlock)?;
            table.push(at);
        }
        let mut raw = vec![0u8; usize::try_from(rt.saturating_mul(cs)).unwrap_or(0)];
        for (i, off) in table.iter().enumerate() {
            let s = i.saturating_mul(8);
            if let Some(d) = raw.get_mut(s..s.saturating_add(8)) {
                d.copy_from_slice(&off.to_be_bytes());
            }
        }
        self.write_dev(new_rt_off, &raw, Structure::RefcountTable)?;
        self.flush_dev()?;
        // The switch: table offset, its clusters and the order, all in the
        // first sector.
        let mut s0 = vec![0u8; SECTOR_BYTES];
        self.read_dev(0, &mut s0, Structure::Header)?;
        let put = |s0: &mut [u8], r: core::ops::Range<usize>, b: &[u8]| {
            if let Some(d) = s0.get_mut(r) {
                d.copy_from_slice(b);
            }
        };
        put(
            &mut s0,
            field::REFCOUNT_TABLE_OFFSET,
            &new_rt_off.to_be_bytes(),
        );
        put(
            &mut s0,
            field::REFCOUNT_TABLE_CLUSTERS,
            &rt_clusters.to_be_bytes(),
        );
        put(&mut s0, field::REFCOUNT_ORDER, &order.to_be_bytes());
        self.write_dev(0, &s0, Structure::Header)?;
        self.flush_dev()?;
        self.hdr.refcount_table_offset = new_rt_off;
        self.hdr.refcount_table_clusters = rt_clusters;
        self.hdr.refcount_order = order;
        self.reftable = table;
        self.rb_cache.clear();
        self.free_hint = 0;
        self.ctail = 0;
        Ok(())
    }

    /// Writes cluster 0 anew for header `h`: the header, then the backing
    /// format, data file name (`data_file`, else the current one), crypto
    /// header and (v3) feature name table extensions in QEMU's order, the
    /// other extensions as they were, the end marker and the backing file
    /// name. One write, then a flush.
    fn rewrite_cluster0(
        &mut self,
        mut h: crate::header::HeaderRepr,
        data_file: Option<&str>,
    ) -> Result<(), Error<D::Error>> {
        let cs = usize::try_from(self.cs()).unwrap_or(0);
        let mut c0 = vec![0u8; cs];
        self.read_dev(0, &mut c0, Structure::Header)?;
        let start = usize::try_from(self.hdr.extensions_start()).unwrap_or(cs);
        let end = usize::try_from(self.hdr.extensions_end())
            .unwrap_or(cs)
            .min(cs);
        let mut fmt = None;
        let mut df = None;
        let mut crypto = None;
        let mut rest: Vec<(u32, &[u8])> = Vec::new();
        let mut at = start;
        while at.saturating_add(8) <= end {
            let mut hb = [0u8; 8];
            hb.copy_from_slice(c0.get(at..at.saturating_add(8)).unwrap_or(&[0; 8]));
            let (t, len) = extension_header(&hb);
            if t == ext::END {
                break;
            }
            let body = at
                .checked_add(8)
                .and_then(|s| Some(s..s.checked_add(usize::try_from(len).ok()?)?))
                .and_then(|r| c0.get(r))
                .ok_or_else(|| {
                    Error::corrupt(Structure::HeaderExtension, at as u64, Problem::Overflow)
                })?;
            match t {
                ext::BACKING_FORMAT => fmt = Some(body),
                ext::DATA_FILE => df = Some(body),
                ext::CRYPTO => crypto = Some(body),
                ext::FEATURE_TABLE => {}
                _ => rest.push((t, body)),
            }
            at = at.saturating_add(usize::try_from(extension_span(len)).unwrap_or(usize::MAX));
        }
        let name: Vec<u8> = usize::try_from(self.hdr.backing_file_offset)
            .ok()
            .filter(|&o| o != 0)
            .and_then(|o| {
                let n = usize::try_from(self.hdr.backing_file_size).ok()?;
                c0.get(o..o.checked_add(n)?)
            })
            .unwrap_or(&[])
            .to_vec();
        let df: Option<&[u8]> = data_file.map(str::as_bytes).or(df);
        let table = crate::create::feature_table();
        let mut out = vec![0u8; cs];
        let too_big = || Error::corrupt(Structure::HeaderExtension, 0, Problem::Overflow);
        let mut pos = h.buffer_len();
        let emit = |out: &mut [u8], pos: &mut usize, t: u32, b: &[u8]| {
            let n = out
                .get_mut(*pos..)
                .and_then(|o| emit_extension(o, t, b))
                .ok_or_else(too_big)?;
            *pos = pos.saturating_add(n);
            Ok::<(), Error<D::Error>>(())
        };
        for (t, b) in [
            (ext::BACKING_FORMAT, fmt),
            (ext::DATA_FILE, df),
            (ext::CRYPTO, crypto),
        ] {
            if let Some(b) = b {
                emit(&mut out, &mut pos, t, b)?;
            }
        }
        if h.version >= 3 {
            // As `create`: left out when it does not fit, and from images
            // with clusters of 4 KiB and less.
            let rest_len: usize = rest
                .iter()
                .map(|(_, b)| b.len().next_multiple_of(8).saturating_add(8))
                .sum();
            let need = pos
                .saturating_add(8)
                .saturating_add(table.len().next_multiple_of(8))
                .saturating_add(rest_len)
                .saturating_add(8)
                .saturating_add(name.len());
            if need <= cs && cs > 4096 {
                emit(&mut out, &mut pos, ext::FEATURE_TABLE, &table)?;
            }
        }
        for (t, b) in &rest {
            emit(&mut out, &mut pos, *t, b)?;
        }
        emit(&mut out, &mut pos, ext::END, &[])?;
        if name.is_empty() {
            h.backing_file_offset = 0;
            h.backing_file_size = 0;
        } else {
            out.get_mut(pos..pos.saturating_add(name.len()))
                .ok_or_else(too_big)?
                .copy_from_slice(&name);
            h.backing_file_offset = pos as u64;
            pos = pos.saturating_add(name.len());
        }
        let hl = h.buffer_len();
        if let Some(b) = out.get_mut(..hl) {
            h.emit(&mut crate::header::Header::new_unchecked(b));
        }
        // Whatever the old layout used of cluster 0 is rewritten too.
        let old_used = end.max(
            usize::try_from(
                self.hdr
                    .backing_file_offset
                    .saturating_add(u64::from(self.hdr.backing_file_size)),
            )
            .unwrap_or(cs),
        );
        let len = pos.max(old_used).next_multiple_of(SECTOR_BYTES).min(cs);
        self.write_dev(0, out.get(..len).unwrap_or(&[]), Structure::Header)?;
        self.flush_dev()?;
        self.hdr = h;
        Ok(())
    }
}
