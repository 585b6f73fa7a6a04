//! Consistency check and repair of qcow2 images (needs `alloc`).
//!
//! [`check`] walks every structure an image references: cluster 0 (header
//! and extensions), the active L1 table and those of every snapshot, their
//! L2 tables, data and compressed clusters, the snapshot table, the
//! refcount table and blocks, the bitmap directory and bitmap tables and
//! the LUKS header region of encrypted images. It rebuilds the reference
//! count of every cluster of the file and compares it with the stored
//! refcounts, reporting each difference as qemu-img does (a *leak* when the
//! stored refcount is higher, a *corruption* when it is lower), together
//! with misaligned tables and clusters, references past the end of the file,
//! reserved bits, wrong COPIED flags and broken refcount tables.
//!
//! Memory: the rebuilt counts are one saturating `u16` per cluster that
//! exists in the file (file length / cluster size), not per guest cluster,
//! so a sparse 4 TiB image with a small file needs a small table. Tables
//! are read a cluster at a time.
//!
//! Repair ([`Repair::Leaks`], [`Repair::All`]) follows the writer's
//! ordering (ARCHITECTURE.md, "qcow2 write ordering"): refcounts are only
//! lowered for clusters nothing references; when a refcount is too low or
//! the refcount structure is unusable, a complete new refcount table and
//! new blocks are written past the end of the file and flushed before one
//! header write switches to them, so a crash leaves either the old or the
//! new structure in place, never a mix. COPIED flags are fixed last, once
//! the refcounts they describe are right.

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::entry::{self, CompressedDescriptor, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Error, LayerError, Limit, Problem, Structure};
use crate::header::{autoclear, field, incompat, BitmapsExt, CryptoExt, HeaderRepr};
use crate::limits::{MAX_L1_ENTRIES, MAX_REFCOUNT_TABLE_BYTES};
use crate::snapshot::{self, SnapshotFixed};
use crate::table::{word, L2Geometry, RawL2, RefblockAt, RefcountGeometry};
use luks_core::io::BlockIo;

/// Reserved bits of an L1 entry (bits 0..=8 and 56..=62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry that is not compressed (bits 1..=8
/// and 56..=61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry (bits 0..=8).
const REFT_RESERVED: u64 = 0x1ff;
/// Bitmap table entries: the offset field.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Most bitmaps a directory may list (QEMU's limit).
const MAX_BITMAPS: u32 = 65535;
/// The largest byte offset a file can have (`i64::MAX`).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;
/// L1 entries read per device request.
const L1_CHUNK: usize = 4096;

/// What `check` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Read only.
    #[default]
    None,
    /// Lower refcounts that are too high (leaked clusters).
    Leaks,
    /// Fix leaks, refcounts that are too low, COPIED flags, and rebuild the
    /// refcount structure when it is damaged.
    All,
}

/// Fragmentation figures, as `qemu-img check` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FragInfo {
    /// Clusters of the virtual disk (`total-clusters`).
    pub total_clusters: u64,
    /// Guest clusters with a host cluster in the active layer.
    pub allocated_clusters: u64,
    /// Allocated clusters not right after the previous one in the file.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
}

/// One inconsistency, worded as qemu-img words it (see `Display`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// Stored refcount differs from the references found.
    Refcount {
        /// Host cluster index.
        cluster: u64,
        /// Stored refcount.
        refcount: u64,
        /// References found.
        reference: u64,
        /// Whether repair changed it.
        repaired: bool,
    },
    /// The stored refcount of a cluster cannot be read (its refcount
    /// block's table entry is unusable).
    RefcountUnreadable {
        /// Host cluster index.
        cluster: u64,
    },
    /// A reference to a range that lies one cluster or more past the end of
    /// the file.
    PastEnd {
        /// Start of the range.
        offset: u64,
        /// Its length.
        size: u64,
    },
    /// More than 65535 references to one cluster.
    Overflow {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// An L1 entry with reserved bits set.
    L1Reserved {
        /// The entry.
        entry: u64,
    },
    /// An L1 entry naming an L2 table that is not cluster aligned.
    L2Unaligned {
        /// The L2 table offset.
        offset: u64,
    },
    /// An L2 entry with reserved bits set.
    L2Reserved {
        /// The entry.
        entry: u64,
    },
    /// An L2 entry naming a data cluster that is not cluster aligned.
    DataUnaligned {
        /// The host offset.
        offset: u64,
        /// Whether the entry is a preallocated zero cluster.
        zero: bool,
        /// Whether repair made it a plain zero cluster (preallocated zero
        /// clusters only: they hold no data).
        repaired: bool,
    },
    /// An allocated cluster whose extended L2 bitmap marks a subcluster
    /// both allocated and reading as zero.
    SubclusterBitmap {
        /// The host offset.
        offset: u64,
    },
    /// An unallocated cluster whose extended L2 bitmap marks subclusters
    /// allocated.
    SubclusterUnallocated,
    /// A compressed cluster whose extended L2 bitmap is not zero; its
    /// data is not counted as referenced (as qemu-img does).
    CompressedBitmap {
        /// The entry's index in its L2 table.
        index: u64,
        /// The L2 entry.
        entry: u64,
    },
    /// A compressed cluster descriptor with COPIED set.
    CompressedCopied {
        /// Host offset of the compressed data.
        offset: u64,
    },
    /// A refcount table entry with reserved bits set.
    ReftableReserved {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount table entry that is not cluster aligned.
    RefblockUnaligned {
        /// Index in the refcount table.
        index: u64,
    },
    /// A refcount table entry past the end of the file.
    RefblockOutside {
        /// Index in the refcount table.
        index: u64,
        /// Whether repair rebuilt the refcount structure.
        repaired: bool,
    },
    /// A refcount block referenced other than exactly once.
    RefblockShared {
        /// Index in the refcount table.
        index: u64,
        /// References found for its cluster.
        refcount: u64,
    },
    /// An L1 entry whose COPIED flag disagrees with its L2 table's refcount.
    CopiedL2 {
        /// Index in the active L1 table.
        l1_index: u64,
        /// The entry.
        l1_entry: u64,
        /// The refcount.
        refcount: u64,
        /// Whether repair fixed the flag.
        repaired: bool,
    },
    /// An L2 entry whose COPIED flag disagrees with its cluster's refcount.
    CopiedData {
        /// The entry.
        l2_entry: u64,
        /// The refcount.
        refcount: u64,
        /// Whether repair fixed the flag.
        repaired: bool,
    },
    /// A snapshot's L1 table offset is not cluster aligned.
    SnapshotL1Unaligned {
        /// The snapshot's id and name.
        snapshot: SnapshotName,
        /// The offset.
        offset: u64,
    },
    /// A snapshot table entry (version 3) without the extra data version 3
    /// requires.
    SnapshotIncomplete {
        /// Index in the snapshot table.
        index: u32,
    },
    /// A snapshot's L1 table is larger than any image may have.
    SnapshotL1TooLarge {
        /// The snapshot's id and name.
        snapshot: SnapshotName,
        /// Its entries.
        size: u32,
    },
    /// Repair is replacing the refcount table and blocks (the findings
    /// before this one are what it fixes).
    Rebuilding,
    /// A structure could not be read from the device.
    ReadFailed {
        /// What was read.
        structure: Structure,
        /// Where.
        offset: u64,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fix = |r: bool| if r { "Repairing" } else { "ERROR" };
        match *self {
            Self::Refcount {
                cluster,
                refcount,
                reference,
                repaired,
            } => {
                let word = if repaired {
                    "Repairing"
                } else if refcount < reference {
                    "ERROR"
                } else {
                    "Leaked"
                };
                write!(
                    f,
                    "{word} cluster {cluster} refcount={refcount} reference={reference}"
                )
            }
            Self::RefcountUnreadable { cluster } => write!(
                f,
                "Can't get refcount for cluster {cluster}: Input/output error"
            ),
            Self::PastEnd { offset, size } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ),
            Self::Overflow { offset } => write!(
                f,
                "ERROR: overflow cluster offset={offset:#x}\nMore references than the refcount width holds: widen refcount_bits, or convert to a clean copy"
            ),
            Self::L1Reserved { entry } => {
                write!(f, "ERROR found L1 entry with reserved bits set: {entry:x}")
            }
            Self::L2Unaligned { offset } => write!(
                f,
                "ERROR l2_offset={offset:x}: Table is not cluster aligned; L1 entry corrupted"
            ),
            Self::L2Reserved { entry } => {
                write!(f, "ERROR found l2 entry with reserved bits set: {entry:x}")
            }
            Self::DataUnaligned {
                offset,
                zero,
                repaired,
            } => write!(
                f,
                "{} offset={offset:x}: {} cluster is not properly aligned; L2 entry corrupted.",
                fix(repaired),
                if zero { "Preallocated" } else { "Data" }
            ),
            Self::SubclusterBitmap { offset } => write!(
                f,
                "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
            ),
            Self::CompressedBitmap { index, entry } => write!(
                f,
                "ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry={entry:#x}"
            ),
            Self::SubclusterUnallocated => {
                f.write_str("ERROR: Unallocated cluster has non-zero subcluster allocation map")
            }
            Self::CompressedCopied { offset } => write!(
                f,
                "ERROR: coffset={offset:#x}: copied flag must never be set for compressed clusters"
            ),
            Self::ReftableReserved { index } => write!(
                f,
                "ERROR refcount table entry {index} has reserved bits set"
            ),
            Self::RefblockUnaligned { index } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted"
            ),
            Self::RefblockOutside { index, repaired } => {
                write!(f, "{} refcount block {index} is outside image", fix(repaired))
            }
            Self::RefblockShared { index, refcount } => {
                write!(f, "ERROR refcount block {index} refcount={refcount}")
            }
            Self::CopiedL2 {
                l1_index,
                l1_entry,
                refcount,
                repaired,
            } => write!(
                f,
                "{} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} refcount={refcount}",
                fix(repaired)
            ),
            Self::CopiedData {
                l2_entry,
                refcount,
                repaired,
            } => write!(
                f,
                "{} OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}",
                fix(repaired)
            ),
            Self::SnapshotL1Unaligned {
                ref snapshot,
                offset,
            } => write!(
                f,
                "ERROR snapshot {snapshot} l1_offset={offset:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"
            ),
            Self::SnapshotL1TooLarge { ref snapshot, size } => write!(
                f,
                "ERROR snapshot {snapshot} l1_size={size:#x}: L1 table is too large; snapshot table entry corrupted"
            ),
            Self::SnapshotIncomplete { index } => {
                write!(f, "ERROR snapshot table entry {index} is incomplete")
            }
            Self::Rebuilding => f.write_str("Rebuilding refcount structure"),
            Self::ReadFailed { structure, offset } => {
                write!(f, "ERROR reading the {structure} at offset {offset:#x}")
            }
        }
    }
}

/// A snapshot's id and name, shown as qemu-img shows them: `ID (NAME)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotName {
    /// The id string.
    pub id: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id, self.name)
    }
}

/// The result of one pass over an image: qemu-img's counters and the
/// problems found, in the order qemu-img reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Structures that could not be checked (`check-errors`).
    pub check_errors: u64,
    /// Corruptions left (`corruptions`).
    pub corruptions: u64,
    /// Leaked clusters left (`leaks`).
    pub leaks: u64,
    /// Corruptions repaired (`corruptions-fixed`).
    pub corruptions_fixed: u64,
    /// Leaks repaired (`leaks-fixed`).
    pub leaks_fixed: u64,
    /// End of the last cluster in use (`image-end-offset`).
    pub image_end_offset: u64,
    /// Fragmentation figures.
    pub frag: FragInfo,
    /// Every problem, in order.
    pub findings: Vec<Finding>,
}

/// What [`check`] did: the first pass, what repair changed, and with
/// repair, the pass that double-checks the repaired image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOutcome {
    /// The first pass (findings marked `repaired` where repair fixed them).
    pub first: CheckReport,
    /// With repair: the pass after repairing, whose counters stand.
    pub after: Option<CheckReport>,
    /// Leaked clusters repair fixed.
    pub leaks_fixed: u64,
    /// Corruptions repair fixed.
    pub corruptions_fixed: u64,
}

impl CheckOutcome {
    /// The counters that stand: the double-check pass after a repair, else
    /// the only pass.
    pub fn result(&self) -> &CheckReport {
        self.after.as_ref().unwrap_or(&self.first)
    }
}

/// Everything a pass learns that repair needs.
struct Pass {
    report: CheckReport,
    /// References found per cluster (without the refcount structure).
    base: Vec<u16>,
    /// References found per cluster, the refcount structure included.
    counts: Vec<u16>,
    /// The refcount structure must be rebuilt.
    rebuild: bool,
    /// Stored refcounts are unreadable for some cluster.
    unreadable: bool,
}

/// The image being checked: its header and geometry.
struct Img<'d, D: BlockIo> {
    dev: &'d mut D,
    hdr: HeaderRepr,
    file_len: u64,
    bits: u32,
    cs: u64,
    reftable: Vec<u64>,
    crypto: Option<CryptoExt>,
    bitmaps: Option<BitmapsExt>,
    /// Cached refcount block: (reftable index, bytes).
    rb_cache: Option<(u64, Vec<u8>)>,
    /// Where refcounts live.
    rc: RefcountGeometry,
    /// Where L2 entries live.
    l2g: L2Geometry,
}

/// The checked device as qemu-img reads a file: bytes past its end read
/// as zero. The reader's parsing reads through it.
struct ZeroTail<'a, D> {
    dev: &'a mut D,
    len: u64,
}

impl<D: BlockIo> BlockIo for ZeroTail<'_, D> {
    type Error = D::Error;
    fn sector_size(&self) -> u32 {
        self.dev.sector_size()
    }
    fn size(&mut self) -> Result<u64, D::Error> {
        Ok(self.len)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D::Error> {
        let avail = self.len.saturating_sub(offset);
        let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            self.dev.read_at(offset, head)?;
        }
        tail.fill(0);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), D::Error> {
        self.dev.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), D::Error> {
        self.dev.flush()
    }
}

fn io<E>(e: E, structure: Structure, offset: u64) -> Error<E> {
    e.into_layer(structure, offset)
}

impl<'d, D: BlockIo> Img<'d, D> {
    fn open(dev: &'d mut D) -> Result<Self, Error<D::Error>> {
        let file_len = dev.size().map_err(|e| io(e, Structure::Header, 0))?;
        // The header and its extensions as the reader parses them, with
        // room for a long `header_length` (at most a cluster; 64 KiB
        // covers every header qemu-img writes).
        let mut scratch = vec![0u8; 64 * 1024];
        let info = crate::image::read_header_info(
            &mut ZeroTail { dev, len: file_len },
            &mut [0u8; 512],
            &mut scratch,
        )?;
        let hdr = info.header;
        // Unknown incompatible features: the image cannot be interpreted
        // (qemu-img refuses to open it too).
        hdr.refuse_unknown_incompatible()?;
        // "Raw external data" without an external data file: qemu-img
        // refuses to open the image.
        if hdr.autoclear_features & autoclear::DATA_FILE_RAW != 0 && !hdr.has_data_file() {
            return Err(Error::corrupt(
                Structure::Header,
                field::AUTOCLEAR_FEATURES.start as u64,
                Problem::DataFileRawWithoutDataFile,
            ));
        }
        hdr.check_l1_limit()?;
        let cs = hdr.cluster_size();
        // The L1 table must cover the virtual size; qemu-img refuses to
        // open (and so to check) an image whose table is too small.
        let l2_entries = cs / if hdr.extended_l2() { 16 } else { 8 };
        let needed = hdr.size.div_ceil(cs).div_ceil(l2_entries);
        if u64::from(hdr.l1_size) < needed {
            return Err(Error::corrupt(
                Structure::Header,
                field::L1_SIZE.start as u64,
                Problem::L1TooSmall {
                    l1_size: hdr.l1_size,
                    needed,
                },
            ));
        }
        let mut img = Self {
            dev,
            hdr,
            file_len,
            bits: hdr.cluster_bits,
            cs,
            reftable: Vec::new(),
            crypto: info.crypto,
            bitmaps: info.bitmaps,
            rb_cache: None,
            rc: RefcountGeometry::of(&hdr),
            l2g: L2Geometry::of(&hdr),
        };
        img.read_reftable()?;
        Ok(img)
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file
    /// read as zero (as a file does for qemu-img).
    fn read(&mut self, off: u64, buf: &mut [u8], s: Structure) -> Result<(), Error<D::Error>> {
        let avail = self.file_len.saturating_sub(off);
        let n = usize::try_from(avail.min(buf.len() as u64)).unwrap_or(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            self.dev.read_at(off, head).map_err(|e| io(e, s, off))?;
        }
        tail.fill(0);
        Ok(())
    }

    fn read_reftable(&mut self) -> Result<(), Error<D::Error>> {
        let bytes = u64::from(self.hdr.refcount_table_clusters).saturating_mul(self.cs);
        self.hdr.check_reftable_limit(bytes)?;
        let mut raw = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        let at = self.hdr.refcount_table_offset;
        self.read(at, &mut raw, Structure::RefcountTable)?;
        self.reftable = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(())
    }

    /// The stored refcount of `cluster`; `None` when its refcount block's
    /// table entry is not cluster aligned.
    fn stored(&mut self, cluster: u64) -> Result<Option<u64>, Error<D::Error>> {
        let slot = self.rc.locate(cluster);
        let idx = slot.table_index;
        let Some(&e) = usize::try_from(idx).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(Some(0));
        };
        let off = match self.rc.block_at(e) {
            RefblockAt::Absent => return Ok(Some(0)),
            // qemu-img cannot read an unaligned block either.
            RefblockAt::Unaligned(_) => return Ok(None),
            RefblockAt::At(off) => off,
        };
        // Beyond the largest offset a file can have: unreadable too.
        if off > MAX_FILE_OFFSET.saturating_sub(self.cs) {
            return Ok(None);
        }
        if self.rb_cache.as_ref().map(|c| c.0) != Some(idx) {
            let mut b = vec![0u8; usize::try_from(self.cs).unwrap_or(0)];
            self.read(off, &mut b, Structure::RefcountBlock)?;
            self.rb_cache = Some((idx, b));
        }
        Ok(self
            .rb_cache
            .as_ref()
            .and_then(|c| self.rc.get(&c.1, slot.index)))
    }

    fn nb_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.cs)
    }
}

/// Reference counting for one pass.
struct Counter {
    counts: Vec<u16>,
    /// Most references one cluster may have: the image's refcount maximum
    /// (as qemu-img counts), capped by the `u16` cells.
    max: u16,
    file_len: u64,
    bits: u32,
    cs: u64,
}

impl Counter {
    fn inc(&mut self, r: &mut CheckReport, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let end = offset.checked_add(size);
        let past = match end {
            Some(end) => end > self.file_len && end - self.file_len >= self.cs,
            None => true,
        };
        if past {
            r.findings.push(Finding::PastEnd { offset, size });
            r.corruptions += 1;
            return;
        }
        let end = end.unwrap_or(offset);
        let first = offset >> self.bits;
        let last = (end - 1) >> self.bits;
        for c in first..=last {
            let Ok(i) = usize::try_from(c) else { return };
            if i >= self.counts.len() {
                self.counts.resize(i + 1, 0);
            }
            if self.counts[i] >= self.max {
                r.findings.push(Finding::Overflow {
                    offset: c << self.bits,
                });
                r.corruptions += 1;
            } else {
                self.counts[i] += 1;
            }
        }
    }
}

/// Checks the qcow2 image on `dev` and, with `repair`, repairs it, then
/// checks it again. Errors are returned only when the image cannot be
/// checked at all (no qcow2 header, a device failure); everything else is
/// a [`Finding`].
pub fn check<D: BlockIo>(dev: &mut D, repair: Repair) -> Result<CheckOutcome, Error<D::Error>> {
    let mut img = Img::open(dev)?;
    if img.crypto.is_some() && img.hdr.crypt_method != 2 {
        return Err(Error::corrupt(
            Structure::Header,
            field::CRYPT_METHOD.start as u64,
            Problem::UnexpectedCryptoExtension(img.hdr.crypt_method),
        ));
    }
    let dirty = img.hdr.incompatible_features & incompat::DIRTY != 0;
    let mut first = pass(&mut img, repair != Repair::None)?;
    if repair == Repair::None {
        return Ok(CheckOutcome {
            first: first.report,
            after: None,
            leaks_fixed: 0,
            corruptions_fixed: 0,
        });
    }
    // Fixes that change what is referenced come first (-r all); the
    // references are then counted again before refcounts are repaired.
    let mut pre_fixed = 0u64;
    if repair == Repair::All {
        if let Some(end) = crypto_past_end(&img, &first) {
            // The LUKS header region ends past the end of the file (images
            // from QEMU < 5.0). Freeing its clusters as leaks, as qemu-img
            // does, would let new data overwrite the key slots: extend the
            // file to cover the region instead, then count it like any
            // other.
            let at = end.saturating_sub(img.cs);
            let zero = vec![0u8; usize::try_from(img.cs).unwrap_or(0)];
            img.dev
                .write_at(at, &zero)
                .map_err(|x| io(x, Structure::HeaderExtension, at))?;
            img.dev
                .flush()
                .map_err(|x| io(x, Structure::HeaderExtension, at))?;
            pre_fixed += 1;
        }
        let has_bad_zero = first
            .report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::DataUnaligned { zero: true, .. }));
        if has_bad_zero {
            let n = fix_unaligned_zero(&mut img)?;
            for f in &mut first.report.findings {
                if let Finding::DataUnaligned {
                    zero: true,
                    repaired,
                    ..
                } = f
                {
                    *repaired = true;
                }
            }
            pre_fixed += n;
        }
    }
    if repair == Repair::All
        && first
            .report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::SnapshotIncomplete { .. }))
    {
        pre_fixed += fix_incomplete_snapshots(&mut img)?;
    }
    let (leaks_fixed, corruptions_fixed) = if pre_fixed > 0 {
        drop(img);
        img = Img::open(dev)?;
        let mut again = pass(&mut img, true)?;
        let fixed = fix(&mut img, &mut again, repair, dirty)?;
        // What the recount found and repaired, after the first report. A
        // set of the report's lines keeps this linear: a crafted table of
        // 65,535 snapshots gives as many findings, and comparing each with
        // every other took a minute.
        let seen: alloc::collections::BTreeSet<String> = first
            .report
            .findings
            .iter()
            .map(alloc::string::ToString::to_string)
            .collect();
        for f in again.report.findings {
            if !seen.contains(&alloc::string::ToString::to_string(&f)) {
                first.report.findings.push(f);
            }
        }
        fixed
    } else {
        fix(&mut img, &mut first, repair, dirty)?
    };
    let corruptions_fixed = corruptions_fixed + pre_fixed;
    drop(img);
    let mut img = Img::open(dev)?;
    let second = pass(&mut img, false)?;
    let mut after = second.report;
    after.leaks_fixed = leaks_fixed;
    after.corruptions_fixed = corruptions_fixed;
    Ok(CheckOutcome {
        first: first.report,
        after: Some(after),
        leaks_fixed,
        corruptions_fixed,
    })
}

/// The cluster-aligned end of the LUKS header region when a pass found it
/// past the end of the file.
fn crypto_past_end<D: BlockIo>(img: &Img<'_, D>, p: &Pass) -> Option<u64> {
    let cr = img.crypto.filter(|_| img.hdr.crypt_method == 2)?;
    let hit = p.report.findings.iter().any(|f| {
        matches!(f, Finding::PastEnd { offset, size } if *offset == cr.offset && *size == cr.length)
    });
    let end = cr
        .offset
        .checked_add(cr.length)?
        .checked_next_multiple_of(img.cs)?;
    // Only a modest extension: the region is the LUKS header and key
    // material, a few MiB at most.
    (hit && end - img.file_len <= 64 << 20).then_some(end)
}

/// One pass: count references, compare with the stored refcounts, check
/// COPIED flags. Changes nothing.
fn pass<D: BlockIo>(img: &mut Img<'_, D>, keep_base: bool) -> Result<Pass, Error<D::Error>> {
    let mut r = CheckReport {
        frag: FragInfo {
            total_clusters: img.hdr.size.div_ceil(img.cs),
            ..FragInfo::default()
        },
        ..CheckReport::default()
    };
    let nb = img.nb_clusters();
    let bits = img.hdr.refcount_bits();
    let mut c = Counter {
        counts: vec![0u16; usize::try_from(nb).unwrap_or(0)],
        max: if bits >= 16 {
            u16::MAX
        } else {
            u16::try_from((1u32 << bits) - 1).unwrap_or(u16::MAX)
        },
        file_len: img.file_len,
        bits: img.bits,
        cs: img.cs,
    };
    let cs = img.cs;
    // The snapshot table is read and judged first (qemu-img does it when
    // opening the image, so its findings come first).
    let (snaps, incomplete) = read_snapshots(img)?;
    for index in incomplete {
        r.findings.push(Finding::SnapshotIncomplete { index });
        r.corruptions += 1;
    }
    let mut table_len = 0u64;
    let mut snapshot_l1s = Vec::new();
    for (sn, len, snapshot) in snaps {
        table_len = table_len.saturating_add(len);
        if sn.l1_offset & (cs - 1) != 0 {
            r.findings.push(Finding::SnapshotL1Unaligned {
                snapshot,
                offset: sn.l1_offset,
            });
            r.corruptions += 1;
        } else if sn.l1_size > MAX_L1_ENTRIES {
            r.findings.push(Finding::SnapshotL1TooLarge {
                snapshot,
                size: sn.l1_size,
            });
            r.corruptions += 1;
        } else {
            snapshot_l1s.push((sn.l1_offset, sn.l1_size));
        }
    }
    c.inc(&mut r, 0, cs);
    let mut next_contig = 0u64;
    let (l1_off, l1_size) = (img.hdr.l1_table_offset, img.hdr.l1_size);
    walk_l1(img, &mut c, &mut r, l1_off, l1_size, Some(&mut next_contig))?;
    for (off, size) in snapshot_l1s {
        walk_l1(img, &mut c, &mut r, off, size, None)?;
    }
    c.inc(&mut r, img.hdr.snapshots_offset, table_len);
    // LUKS header region.
    if img.hdr.crypt_method == 2 {
        if let Some(cr) = img.crypto {
            c.inc(&mut r, cr.offset, cr.length);
        }
    }
    // Bitmaps.
    walk_bitmaps(img, &mut c, &mut r)?;
    // The counts without the refcount structure, for a rebuild.
    let base = if keep_base {
        c.counts.clone()
    } else {
        Vec::new()
    };
    // Refcount table and blocks.
    let rt_bytes = (img.reftable.len() as u64).saturating_mul(8);
    c.inc(&mut r, img.hdr.refcount_table_offset, rt_bytes);
    let mut rebuild = false;
    for (i, &e) in img.reftable.iter().enumerate() {
        let index = i as u64;
        if e & REFT_RESERVED != 0 {
            r.findings.push(Finding::ReftableReserved { index });
            r.corruptions += 1;
            rebuild = true;
            continue;
        }
        let off = entry::reftable_block_offset(e);
        if off & (cs - 1) != 0 {
            r.findings.push(Finding::RefblockUnaligned { index });
            r.corruptions += 1;
            rebuild = true;
            continue;
        }
        if off == 0 {
            continue;
        }
        let cluster = off >> img.bits;
        if cluster >= nb {
            r.findings.push(Finding::RefblockOutside {
                index,
                repaired: false,
            });
            r.corruptions += 1;
            rebuild = true;
            continue;
        }
        c.inc(&mut r, off, cs);
        // Judged as soon as counted, as qemu-img does: a later entry naming
        // the same cluster is reported at its own index.
        let n = c
            .counts
            .get(usize::try_from(cluster).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        if n != 1 {
            r.findings.push(Finding::RefblockShared {
                index,
                refcount: u64::from(n),
            });
            r.corruptions += 1;
            rebuild = true;
        }
    }
    // Compare.
    let mut highest = 0u64;
    let mut unreadable = false;
    for i in 0..c.counts.len() {
        let cl = i as u64;
        let Some(stored) = img.stored(cl)? else {
            r.findings.push(Finding::RefcountUnreadable { cluster: cl });
            r.check_errors += 1;
            unreadable = true;
            continue;
        };
        let found = u64::from(c.counts[i]);
        if stored > 0 || found > 0 {
            highest = cl;
        }
        if stored != found {
            r.findings.push(Finding::Refcount {
                cluster: cl,
                refcount: stored,
                reference: found,
                repaired: false,
            });
            if stored < found {
                r.corruptions += 1;
            } else {
                r.leaks += 1;
            }
        }
    }
    if !unreadable {
        check_copied(img, &mut r, CopiedFix::None)?;
    }
    r.image_end_offset = highest.saturating_add(1).saturating_mul(cs);
    Ok(Pass {
        report: r,
        base,
        counts: c.counts,
        rebuild,
        unreadable,
    })
}

/// Walks one L1 table and its L2 tables. `frag` is the fragmentation
/// cursor for the active layer (`None` for snapshots).
fn walk_l1<D: BlockIo>(
    img: &mut Img<'_, D>,
    c: &mut Counter,
    r: &mut CheckReport,
    l1_off: u64,
    l1_size: u32,
    mut frag: Option<&mut u64>,
) -> Result<(), Error<D::Error>> {
    let cs = img.cs;
    c.inc(r, l1_off, u64::from(l1_size).saturating_mul(8));
    if l1_size > MAX_L1_ENTRIES {
        r.check_errors += 1;
        r.findings.push(Finding::ReadFailed {
            structure: Structure::L1Table,
            offset: l1_off,
        });
        return Ok(());
    }
    let mut chunk = vec![0u8; L1_CHUNK * 8];
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let geo = img.l2g;
    let l1_len = usize::try_from(l1_size).unwrap_or(0);
    let mut start = 0usize;
    while start < l1_len {
        let n = (l1_len - start).min(L1_CHUNK);
        let at = l1_off.saturating_add(start as u64 * 8);
        img.read(at, &mut chunk[..n * 8], Structure::L1Table)?;
        for k in 0..n {
            let e = word(&chunk, k * 8).unwrap_or(0);
            if e & L1_RESERVED != 0 {
                r.findings.push(Finding::L1Reserved { entry: e });
                r.corruptions += 1;
            }
            // Like qemu-img, any non-zero entry names an L2 table, even one
            // whose offset field is 0 (the header cluster).
            if e == 0 {
                continue;
            }
            let l2_off = entry::l1_l2_offset(e);
            c.inc(r, l2_off, cs);
            if l2_off & (cs - 1) != 0 {
                r.findings.push(Finding::L2Unaligned { offset: l2_off });
                r.corruptions += 1;
            }
            img.read(l2_off, &mut l2, Structure::L2Table)?;
            // qemu-img measures fragmentation within each L2 table.
            if let Some(f) = frag.as_deref_mut() {
                *f = 0;
            }
            for (index, RawL2 { entry: e2, bitmap }) in geo.entries(&l2).enumerate() {
                if e2 & COMPRESSED != 0 && bitmap.is_some_and(|b| b != 0) {
                    r.findings.push(Finding::CompressedBitmap {
                        index: index as u64,
                        entry: e2,
                    });
                    r.corruptions += 1;
                    continue;
                }
                walk_l2_entry(img, c, r, e2, bitmap, frag.as_deref_mut());
            }
        }
        start += n;
    }
    Ok(())
}

fn walk_l2_entry<D: BlockIo>(
    img: &Img<'_, D>,
    c: &mut Counter,
    r: &mut CheckReport,
    e: u64,
    bitmap: Option<u64>,
    frag: Option<&mut u64>,
) {
    let cs = img.cs;
    if e & COMPRESSED != 0 {
        let d = CompressedDescriptor::decode(e, img.bits);
        if e & COPIED != 0 {
            r.findings
                .push(Finding::CompressedCopied { offset: d.host });
            r.corruptions += 1;
        }
        if frag.is_some() {
            r.frag.allocated_clusters += 1;
            r.frag.compressed_clusters += 1;
            r.frag.fragmented_clusters += 1;
        }
        c.inc(r, d.host, d.len());
        return;
    }
    let extended = img.hdr.extended_l2();
    if e & L2_RESERVED != 0 {
        r.findings.push(Finding::L2Reserved { entry: e });
        r.corruptions += 1;
    }
    let zero = !extended && e & ZERO != 0;
    // With an external data file, offset 0 is a real cluster when COPIED
    // is set (qemu-img's rule; see `L2Entry::decode`).
    let Some(host) = img.l2g.host(e) else {
        if bitmap.is_some_and(|b| b & 0xffff_ffff != 0) {
            r.findings.push(Finding::SubclusterUnallocated);
            r.corruptions += 1;
        }
        return;
    };
    if let Some(b) = bitmap {
        if b & (b >> 32) != 0 {
            r.findings.push(Finding::SubclusterBitmap { offset: host });
            r.corruptions += 1;
        }
    }
    if let Some(next) = frag {
        r.frag.allocated_clusters += 1;
        if *next != 0 && host != *next {
            r.frag.fragmented_clusters += 1;
        }
        *next = host.saturating_add(cs);
    }
    if host & (cs - 1) != 0 {
        r.findings.push(Finding::DataUnaligned {
            offset: host,
            zero,
            repaired: false,
        });
        r.corruptions += 1;
    }
    if !img.hdr.has_data_file() {
        c.inc(r, host, cs);
    }
}

/// A snapshot table entry: fixed part, entry length, id and name.
type SnapshotEntry = (SnapshotFixed, u64, SnapshotName);
/// The snapshot table entries, and the indexes of those whose extra data
/// is shorter than version 3 requires.
type SnapshotTable = (Vec<SnapshotEntry>, Vec<u32>);

/// Reads the snapshot table: each snapshot's fixed part, entry length, id
/// and name.
fn read_snapshots<D: BlockIo>(img: &mut Img<'_, D>) -> Result<SnapshotTable, Error<D::Error>> {
    img.hdr.check_snapshot_limit()?;
    let n = img.hdr.nb_snapshots;
    let mut out = Vec::new();
    let mut incomplete = Vec::new();
    let mut at = img.hdr.snapshots_offset;
    let table = img.hdr.snapshots_offset;
    for index in 0..n {
        let mut dev = ZeroTail {
            dev: &mut *img.dev,
            len: img.file_len,
        };
        let sn =
            crate::image::read_snapshot_entry(&mut dev, &mut [0u8; 512], table, index, at)?.fixed;
        let len = sn.entry_len();
        // Version 3 requires the 64-bit VM state size and the disk size in
        // the extra data; qemu-img calls a shorter entry incomplete (an
        // entry read past the end of the file is all zeros, so it is too).
        if img.hdr.version >= 3 && sn.extra_size < 16 {
            incomplete.push(index);
        }
        // Id and name follow the extra data (each at most 64 KiB).
        let mut text = vec![0u8; usize::from(sn.id_len) + usize::from(sn.name_len)];
        let text_at = at
            .saturating_add(snapshot::field::FIXED_LEN as u64)
            .saturating_add(u64::from(sn.extra_size));
        img.read(text_at, &mut text, Structure::SnapshotTable)?;
        let (id, name) = text.split_at(usize::from(sn.id_len));
        let name = SnapshotName {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
        };
        out.push((sn, len, name));
        at = at.saturating_add(len);
    }
    Ok((out, incomplete))
}

/// Rewrites the snapshot table with every entry's extra data complete
/// (the 64-bit VM state size, the disk size, the instruction count), as
/// qemu-img's repair does: version 3 requires the first two. An entry
/// without them gets the 32-bit VM state size, the image's virtual size
/// and no instruction count (all ones). The new table goes past the end
/// of the file and the header is switched to it in one write, so a crash
/// leaves the old table or the new one; the old table's clusters are then
/// leaks for the refcount repair to free. Returns the entries completed.
fn fix_incomplete_snapshots<D: BlockIo>(img: &mut Img<'_, D>) -> Result<u64, Error<D::Error>> {
    use snapshot::field as f;
    img.hdr.check_snapshot_limit()?;
    let mut table = Vec::new();
    let mut fixed_n = 0u64;
    let mut at = img.hdr.snapshots_offset;
    for _ in 0..img.hdr.nb_snapshots {
        let mut fixed = [0u8; f::FIXED_LEN];
        img.read(at, &mut fixed, Structure::SnapshotTable)?;
        let sn = SnapshotFixed::parse::<D::Error>(&fixed, at)?;
        let mut rest = vec![0u8; usize::try_from(sn.extra_size).unwrap_or(0)];
        img.read(
            at.saturating_add(f::FIXED_LEN as u64),
            &mut rest,
            Structure::SnapshotTable,
        )?;
        let mut text = vec![0u8; usize::from(sn.id_len) + usize::from(sn.name_len)];
        img.read(
            at.saturating_add(f::FIXED_LEN as u64)
                .saturating_add(u64::from(sn.extra_size)),
            &mut text,
            Structure::SnapshotTable,
        )?;
        if rest.len() < 16 {
            fixed_n += 1;
        }
        let word = |i: usize, default: u64| -> u64 { word(&rest, i * 8).unwrap_or(default) };
        let vm_state = u64::from(crate::header::be32(&fixed, f::VM_STATE_SIZE));
        let mut extra = Vec::with_capacity(rest.len().max(24));
        extra.extend_from_slice(&word(0, vm_state).to_be_bytes());
        extra.extend_from_slice(&word(1, img.hdr.size).to_be_bytes());
        extra.extend_from_slice(&word(2, u64::MAX).to_be_bytes());
        if rest.len() > 24 {
            extra.extend_from_slice(&rest[24..]);
        }
        let extra_len = u32::try_from(extra.len()).unwrap_or(u32::MAX);
        fixed[f::EXTRA_SIZE].copy_from_slice(&extra_len.to_be_bytes());
        let start = table.len();
        table.extend_from_slice(&fixed);
        table.extend_from_slice(&extra);
        table.extend_from_slice(&text);
        while (table.len() - start) % 8 != 0 {
            table.push(0);
        }
        at = at.saturating_add(sn.entry_len());
    }
    if fixed_n == 0 {
        return Ok(0);
    }
    let new_off = img
        .file_len
        .checked_next_multiple_of(img.cs)
        .ok_or_else(|| Error::corrupt(Structure::SnapshotTable, img.file_len, Problem::Overflow))?;
    img.dev
        .write_at(new_off, &table)
        .map_err(|x| io(x, Structure::SnapshotTable, new_off))?;
    img.dev
        .flush()
        .map_err(|x| io(x, Structure::SnapshotTable, new_off))?;
    img.dev
        .write_at(field::SNAPSHOTS_OFFSET.start as u64, &new_off.to_be_bytes())
        .map_err(|x| io(x, Structure::Header, 0))?;
    img.dev.flush().map_err(|x| io(x, Structure::Header, 0))?;
    Ok(fixed_n)
}

/// Counts the bitmap directory and every bitmap table and data cluster.
fn walk_bitmaps<D: BlockIo>(
    img: &mut Img<'_, D>,
    c: &mut Counter,
    r: &mut CheckReport,
) -> Result<(), Error<D::Error>> {
    let Some(bm) = img.bitmaps else {
        return Ok(());
    };
    if img.hdr.autoclear_features & autoclear::BITMAPS == 0 || bm.nb_bitmaps == 0 {
        return Ok(());
    }
    c.inc(r, bm.directory_offset, bm.directory_size);
    if bm.nb_bitmaps > MAX_BITMAPS || bm.directory_size > crate::image::MAX_BITMAP_DIRECTORY_BYTES {
        r.check_errors += 1;
        r.findings.push(Finding::ReadFailed {
            structure: Structure::HeaderExtension,
            offset: bm.directory_offset,
        });
        return Ok(());
    }
    let mut dir = vec![0u8; usize::try_from(bm.directory_size).unwrap_or(0)];
    img.read(bm.directory_offset, &mut dir, Structure::HeaderExtension)?;
    let mut pos = 0usize;
    let mut tables = Vec::new();
    for _ in 0..bm.nb_bitmaps {
        let Some(f) = dir.get(pos..pos + 24) else {
            break;
        };
        let table_offset = word(f, 0).unwrap_or(0);
        let table_size = u32::from_be_bytes([f[8], f[9], f[10], f[11]]);
        let name_size = usize::from(u16::from_be_bytes([f[18], f[19]]));
        let extra = usize::try_from(u32::from_be_bytes([f[20], f[21], f[22], f[23]])).unwrap_or(0);
        tables.push((table_offset, table_size));
        pos = (pos + 24 + extra + name_size).next_multiple_of(8);
    }
    let cs = img.cs;
    for (off, size) in tables {
        c.inc(r, off, u64::from(size).saturating_mul(8));
        let bytes = u64::from(size)
            .saturating_mul(8)
            .min(MAX_REFCOUNT_TABLE_BYTES);
        let mut t = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
        img.read(off, &mut t, Structure::HeaderExtension)?;
        for e in t.chunks_exact(8).map(|c| word(c, 0).unwrap_or(0)) {
            let data = e & BME_OFFSET_MASK;
            if data != 0 {
                c.inc(r, data, cs);
            }
        }
    }
    Ok(())
}

/// How the COPIED check may change flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopiedFix<'a> {
    /// Report against the stored refcounts; change nothing.
    None,
    /// Against the repaired refcounts: fix every flag (`-r all`).
    All(&'a [u16]),
    /// Against the repaired refcounts: only set a missing flag on a
    /// cluster whose refcount is now 1 (`-r leaks`, as qemu-img does).
    Missing(&'a [u16]),
}

impl<'a> CopiedFix<'a> {
    fn known(self) -> Option<&'a [u16]> {
        match self {
            Self::None => None,
            Self::All(k) | Self::Missing(k) => Some(k),
        }
    }
    /// Whether a flag that disagrees with refcount `rc` is fixed.
    fn fixes(self, rc: u64, copied: bool) -> bool {
        match self {
            Self::None => false,
            Self::All(_) => true,
            Self::Missing(_) => rc == 1 && !copied,
        }
    }
}

/// Checks COPIED flags of the active L1 and L2 tables against the
/// refcounts, reporting each disagreement; fixes them on the device as
/// `fix` allows, marking those findings repaired. Returns how many it
/// fixed.
fn check_copied<D: BlockIo>(
    img: &mut Img<'_, D>,
    r: &mut CheckReport,
    fix: CopiedFix<'_>,
) -> Result<u64, Error<D::Error>> {
    let cs = img.cs;
    let known = fix.known();
    let mut fixed = 0u64;
    let l1_off = img.hdr.l1_table_offset;
    let l1_len = usize::try_from(img.hdr.l1_size.min(MAX_L1_ENTRIES)).unwrap_or(0);
    let entry_len: usize = if img.hdr.extended_l2() { 16 } else { 8 };
    let mut chunk = vec![0u8; L1_CHUNK * 8];
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let mut start = 0usize;
    let refcount = |img: &mut Img<'_, D>, off: u64| -> Result<Option<u64>, Error<D::Error>> {
        let cl = off >> img.bits;
        match known {
            Some(k) => Ok(Some(
                usize::try_from(cl)
                    .ok()
                    .and_then(|i| k.get(i))
                    .map_or(0, |&v| u64::from(v)),
            )),
            None => img.stored(cl),
        }
    };
    let meta = if known.is_some() {
        metadata_ranges(img)?
    } else {
        Vec::new()
    };
    while start < l1_len {
        let n = (l1_len - start).min(L1_CHUNK);
        let at = l1_off.saturating_add(start as u64 * 8);
        img.read(at, &mut chunk[..n * 8], Structure::L1Table)?;
        for k in 0..n {
            let e = word(&chunk, k * 8).unwrap_or(0);
            let l2_off = entry::l1_l2_offset(e);
            if l2_off == 0 {
                continue;
            }
            let Some(rc) = refcount(img, l2_off)? else {
                r.check_errors += 1;
                return Ok(fixed);
            };
            let copied = e & COPIED != 0;
            if (rc == 1) != copied {
                let off = at.saturating_add(k as u64 * 8);
                let repaired = fix.fixes(rc, copied) && sole_user(known, off, img.bits);
                r.findings.push(Finding::CopiedL2 {
                    l1_index: (start + k) as u64,
                    l1_entry: e,
                    refcount: rc,
                    repaired,
                });
                if repaired {
                    let ne = if rc == 1 { e | COPIED } else { e & !COPIED };
                    img.dev
                        .write_at(off, &ne.to_be_bytes())
                        .map_err(|x| io(x, Structure::L1Table, off))?;
                    fixed += 1;
                } else {
                    r.corruptions += 1;
                }
            }
            // qemu-img reads an unaligned table where it points; repair
            // only writes back aligned ones.
            if l2_off >= img.file_len {
                continue;
            }
            img.read(l2_off, &mut l2, Structure::L2Table)?;
            // A shared L2 table (a snapshot's too) is rewritten as
            // qemu-img does; only one overlapping other metadata is not.
            let writable =
                l2_off & (cs - 1) == 0 && known.is_some() && !overlaps(&meta, l2_off, cs);
            let mut dirty = false;
            for j in 0..l2.len() / entry_len {
                let p = j * entry_len;
                let e2 = word(&l2, p).unwrap_or(0);
                if e2 & COMPRESSED != 0 {
                    // Reported by the reference walk; cleared by -r all.
                    if e2 & COPIED != 0 && matches!(fix, CopiedFix::All(_)) && writable {
                        l2[p..p + 8].copy_from_slice(&(e2 & !COPIED).to_be_bytes());
                        dirty = true;
                    }
                    continue;
                }
                let host = e2 & OFFSET_MASK;
                if host == 0 || img.hdr.has_data_file() {
                    continue;
                }
                let Some(rc) = refcount(img, host)? else {
                    r.check_errors += 1;
                    return Ok(fixed);
                };
                let copied = e2 & COPIED != 0;
                if (rc == 1) != copied {
                    let repaired = fix.fixes(rc, copied) && writable;
                    r.findings.push(Finding::CopiedData {
                        l2_entry: e2,
                        refcount: rc,
                        repaired,
                    });
                    if repaired {
                        let ne = if rc == 1 { e2 | COPIED } else { e2 & !COPIED };
                        l2[p..p + 8].copy_from_slice(&ne.to_be_bytes());
                        dirty = true;
                        fixed += 1;
                    } else {
                        r.corruptions += 1;
                    }
                }
            }
            if dirty {
                img.dev
                    .write_at(l2_off, &l2)
                    .map_err(|x| io(x, Structure::L2Table, l2_off))?;
            }
        }
        start += n;
    }
    if fixed > 0 {
        img.dev.flush().map_err(|x| io(x, Structure::L2Table, 0))?;
    }
    Ok(fixed)
}

/// The byte ranges (offset, length) of the metadata other than L2 tables
/// that qemu-img's overlap check protects before it rewrites an L2 table:
/// the header, the active and snapshot L1 tables, the refcount table and
/// blocks, the snapshot table and the LUKS header region.
fn metadata_ranges<D: BlockIo>(img: &mut Img<'_, D>) -> Result<Vec<(u64, u64)>, Error<D::Error>> {
    let cs = img.cs;
    let mut v = vec![
        (0, cs),
        (
            img.hdr.l1_table_offset,
            u64::from(img.hdr.l1_size.min(MAX_L1_ENTRIES)) * 8,
        ),
        (
            img.hdr.refcount_table_offset,
            (img.reftable.len() as u64).saturating_mul(8),
        ),
    ];
    for &e in &img.reftable {
        let off = entry::reftable_block_offset(e);
        if off != 0 {
            v.push((off, cs));
        }
    }
    let mut table_len = 0u64;
    for (sn, len, _) in read_snapshots(img)?.0 {
        table_len = table_len.saturating_add(len);
        v.push((sn.l1_offset, u64::from(sn.l1_size.min(MAX_L1_ENTRIES)) * 8));
    }
    v.push((img.hdr.snapshots_offset, table_len));
    if img.hdr.crypt_method == 2 {
        if let Some(cr) = img.crypto {
            v.push((cr.offset, cr.length));
        }
    }
    Ok(v)
}

/// Whether `[off, off + len)` overlaps one of `ranges`.
fn overlaps(ranges: &[(u64, u64)], off: u64, len: u64) -> bool {
    let end = off.saturating_add(len);
    ranges
        .iter()
        .any(|&(o, l)| l > 0 && o < end && off < o.saturating_add(l))
}

/// Whether the table holding byte `off` is the only user of its cluster
/// (per the repaired refcounts `known`), so fixing a COPIED flag in it
/// cannot write into other metadata (an L2 table "at" the header, say).
fn sole_user(known: Option<&[u16]>, off: u64, bits: u32) -> bool {
    known.is_some_and(|k| {
        usize::try_from(off >> bits)
            .ok()
            .and_then(|i| k.get(i))
            .is_some_and(|&v| v == 1)
    })
}

/// Turns every preallocated zero cluster whose host offset is not cluster
/// aligned into a plain zero cluster (it reads as zero either way, so no
/// data is lost), in the active L2 tables and the snapshots'. The entry
/// loses its reference before any refcount is lowered. Returns how many
/// entries changed.
fn fix_unaligned_zero<D: BlockIo>(img: &mut Img<'_, D>) -> Result<u64, Error<D::Error>> {
    let cs = img.cs;
    if img.hdr.extended_l2() {
        return Ok(0);
    }
    let mut tables = vec![(img.hdr.l1_table_offset, img.hdr.l1_size)];
    for (sn, _, _) in read_snapshots(img)?.0 {
        if sn.l1_offset & (cs - 1) == 0 && sn.l1_size <= MAX_L1_ENTRIES {
            tables.push((sn.l1_offset, sn.l1_size));
        }
    }
    let mut seen = alloc::collections::BTreeSet::new();
    let mut l2 = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    let mut l1e = [0u8; 8];
    let mut fixed = 0u64;
    for (l1_off, l1_size) in tables {
        for k in 0..u64::from(l1_size.min(MAX_L1_ENTRIES)) {
            img.read(l1_off.saturating_add(k * 8), &mut l1e, Structure::L1Table)?;
            let l2_off = entry::l1_l2_offset(u64::from_be_bytes(l1e));
            if l2_off == 0
                || l2_off & (cs - 1) != 0
                || l2_off >= img.file_len
                || !seen.insert(l2_off)
            {
                continue;
            }
            img.read(l2_off, &mut l2, Structure::L2Table)?;
            let mut dirty = false;
            for ent in l2.chunks_exact_mut(8) {
                let e = word(ent, 0).unwrap_or(0);
                let host = e & OFFSET_MASK;
                if e & COMPRESSED == 0 && e & ZERO != 0 && host != 0 && host & (cs - 1) != 0 {
                    ent.copy_from_slice(&ZERO.to_be_bytes());
                    dirty = true;
                    fixed += 1;
                }
            }
            if dirty {
                img.dev
                    .write_at(l2_off, &l2)
                    .map_err(|x| io(x, Structure::L2Table, l2_off))?;
            }
        }
    }
    img.dev.flush().map_err(|x| io(x, Structure::L2Table, 0))?;
    Ok(fixed)
}

/// Repairs what `mode` allows; returns (leaks fixed, corruptions fixed).
fn fix<D: BlockIo>(
    img: &mut Img<'_, D>,
    p: &mut Pass,
    mode: Repair,
    dirty: bool,
) -> Result<(u64, u64), Error<D::Error>> {
    let cs = img.cs;
    let max_rc = if img.hdr.refcount_order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << img.hdr.refcount_order)) - 1
    };
    let mut leaks_fixed = 0u64;
    let mut corruptions_fixed = 0u64;
    // As qemu-img: a refcount that is too low is raised in place; only a
    // referenced cluster whose refcount is 0 makes the structure rebuilt
    // (its refcount block may not exist), so a repair need not grow the
    // file.
    let too_low =
        p.report.findings.iter().any(
            |f| matches!(f, Finding::Refcount { refcount: 0, reference, .. } if *reference > 0),
        );
    let rebuild = (mode == Repair::All || dirty) && (p.rebuild || too_low || p.unreadable);
    // The refcounts the image has once repair is done, for the COPIED fix.
    let mut known: Vec<u16>;
    if rebuild {
        known = rebuild_refcounts(img, &p.base, max_rc)?;
        for f in &mut p.report.findings {
            match f {
                // Worded as found (qemu-img prints them before rebuilding).
                Finding::Refcount {
                    refcount,
                    reference,
                    ..
                } => {
                    if *refcount < *reference {
                        corruptions_fixed += 1;
                    } else {
                        leaks_fixed += 1;
                    }
                }
                Finding::RefblockOutside { .. } => {
                    corruptions_fixed += 1;
                }
                Finding::RefblockUnaligned { .. }
                | Finding::RefblockShared { .. }
                | Finding::ReftableReserved { .. } => {
                    corruptions_fixed += 1;
                }
                _ => {}
            }
        }
        p.report.findings.push(Finding::Rebuilding);
    } else {
        // In place: each change is to a cluster in an existing, readable
        // refcount block. Raising is safe at any time; lowering is only
        // done for clusters with fewer references than their refcount.
        let rc = img.rc;
        known = p.counts.clone();
        let mut changes: Vec<(u64, u64)> = Vec::new();
        // Ranges referenced past the end of the file were not counted; the
        // part inside the file is still in use, so never free it.
        let past_end: Vec<(u64, u64)> = p
            .report
            .findings
            .iter()
            .filter_map(|f| match *f {
                Finding::PastEnd { offset, size } => Some((offset, size)),
                _ => None,
            })
            .collect();
        // qemu-img reports each mismatch as found, then again as it
        // repairs it; the repaired copies follow the first pass's findings.
        let mut repairs = Vec::new();
        for f in &p.report.findings {
            if let Finding::Refcount {
                cluster,
                refcount,
                reference,
                ..
            } = f
            {
                // Never write into a refcount structure that is itself
                // damaged (a block shared with data, unreadable entries):
                // only a rebuild (-r all) may replace it.
                let usable = !(p.rebuild || p.unreadable);
                let allowed = usable
                    && if *refcount > *reference {
                        mode != Repair::None && !in_past_end(&past_end, *cluster, cs)
                    } else {
                        mode == Repair::All
                    };
                if allowed {
                    changes.push((*cluster, *reference));
                    repairs.push(Finding::Refcount {
                        cluster: *cluster,
                        refcount: *refcount,
                        reference: *reference,
                        repaired: true,
                    });
                    if *refcount > *reference {
                        leaks_fixed += 1;
                    } else {
                        corruptions_fixed += 1;
                    }
                } else if let Some(k) = usize::try_from(*cluster)
                    .ok()
                    .and_then(|i| known.get_mut(i))
                {
                    *k = u16::try_from(*refcount).unwrap_or(u16::MAX);
                }
            }
        }
        p.report.findings.extend(repairs);
        let mut i = 0;
        while i < changes.len() {
            let idx = rc.locate(changes[i].0).table_index;
            let e = usize::try_from(idx)
                .ok()
                .and_then(|x| img.reftable.get(x))
                .copied()
                .unwrap_or(0);
            let off = entry::reftable_block_offset(e);
            let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            img.read(off, &mut block, Structure::RefcountBlock)?;
            while i < changes.len() && rc.locate(changes[i].0).table_index == idx {
                let (cl, v) = changes[i];
                rc.set(&mut block, rc.locate(cl).index, v.min(max_rc));
                i += 1;
            }
            if off != 0 {
                img.dev
                    .write_at(off, &block)
                    .map_err(|x| io(x, Structure::RefcountBlock, off))?;
            }
        }
        img.rb_cache = None;
        img.dev
            .flush()
            .map_err(|x| io(x, Structure::RefcountBlock, 0))?;
    }
    // COPIED flags, judged again against the refcounts as repaired (the
    // first pass judged them against the stored ones): with -r all every
    // one is fixed; with -r leaks only a missing flag on a cluster whose
    // refcount is now 1, as qemu-img does.
    p.report
        .findings
        .retain(|f| !matches!(f, Finding::CopiedL2 { .. } | Finding::CopiedData { .. }));
    let policy = if mode == Repair::All || rebuild {
        CopiedFix::All(&known)
    } else {
        CopiedFix::Missing(&known)
    };
    corruptions_fixed += check_copied(img, &mut p.report, policy)?;
    // Clear the dirty and corrupt bits.
    if img.hdr.version >= 3
        && img.hdr.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0
        && (mode == Repair::All || dirty)
    {
        let mut h = [0u8; 512];
        img.read(0, &mut h, Structure::Header)?;
        let inc = img.hdr.incompatible_features & !(incompat::DIRTY | incompat::CORRUPT);
        h[field::INCOMPATIBLE_FEATURES].copy_from_slice(&inc.to_be_bytes());
        img.dev
            .write_at(0, &h)
            .map_err(|x| io(x, Structure::Header, 0))?;
        img.dev.flush().map_err(|x| io(x, Structure::Header, 0))?;
    }
    Ok((leaks_fixed, corruptions_fixed))
}

/// Whether cluster `c` lies in one of the `ranges` (offset, size).
fn in_past_end(ranges: &[(u64, u64)], c: u64, cs: u64) -> bool {
    let start = c.saturating_mul(cs);
    ranges
        .iter()
        .any(|&(o, n)| start < o.saturating_add(n) && o < start.saturating_add(cs))
}

/// Writes a new refcount table and blocks holding `base` (references
/// without the old refcount structure) plus themselves, past the end of
/// the file; flushes; then switches the header to them. Returns the new
/// refcounts.
fn rebuild_refcounts<D: BlockIo>(
    img: &mut Img<'_, D>,
    base: &[u16],
    max_rc: u64,
) -> Result<Vec<u16>, Error<D::Error>> {
    let cs = img.cs;
    let per = img.rc.entries_per_block();
    let start = img.nb_clusters().max(base.len() as u64).max(1);
    // Blocks and table clusters: a fixed point of "cover everything,
    // including ourselves".
    let mut nblocks = 0u64;
    let mut ntable = 0u64;
    loop {
        let total = start + nblocks + ntable;
        let nb = total.div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if nb == nblocks && nt == ntable {
            break;
        }
        nblocks = nb;
        ntable = nt;
    }
    let total = start + nblocks + ntable;
    Error::check_limit(
        Structure::RefcountTable,
        start.saturating_mul(cs),
        Limit::RefcountTableBytes,
        ntable.saturating_mul(cs),
        MAX_REFCOUNT_TABLE_BYTES,
    )?;
    let mut counts = base.to_vec();
    counts.resize(usize::try_from(total).unwrap_or(0), 0);
    for c in start..total {
        counts[usize::try_from(c).unwrap_or(0)] = 1;
    }
    let mut table = vec![0u8; usize::try_from(ntable * cs).unwrap_or(0)];
    let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    for b in 0..nblocks {
        block.fill(0);
        for i in 0..per {
            let c = b * per + i;
            let Some(&v) = usize::try_from(c).ok().and_then(|x| counts.get(x)) else {
                break;
            };
            if v != 0 {
                img.rc.set(&mut block, i, u64::from(v).min(max_rc));
            }
        }
        let off = (start + b) * cs;
        img.dev
            .write_at(off, &block)
            .map_err(|x| io(x, Structure::RefcountBlock, off))?;
        let tb = usize::try_from(b * 8).unwrap_or(0);
        table[tb..tb + 8].copy_from_slice(&off.to_be_bytes());
    }
    let table_off = (start + nblocks) * cs;
    img.dev
        .write_at(table_off, &table)
        .map_err(|x| io(x, Structure::RefcountTable, table_off))?;
    img.dev
        .flush()
        .map_err(|x| io(x, Structure::RefcountTable, table_off))?;
    // One sector write switches the header to the new structure.
    let mut h = [0u8; 512];
    img.read(0, &mut h, Structure::Header)?;
    h[field::REFCOUNT_TABLE_OFFSET].copy_from_slice(&table_off.to_be_bytes());
    let ntc = u32::try_from(ntable).unwrap_or(u32::MAX);
    h[field::REFCOUNT_TABLE_CLUSTERS].copy_from_slice(&ntc.to_be_bytes());
    img.dev
        .write_at(0, &h)
        .map_err(|x| io(x, Structure::Header, 0))?;
    img.dev.flush().map_err(|x| io(x, Structure::Header, 0))?;
    img.file_len = img.file_len.max(total * cs);
    img.hdr.refcount_table_offset = table_off;
    img.hdr.refcount_table_clusters = ntc;
    img.rb_cache = None;
    img.read_reftable()?;
    Ok(counts)
}

#[cfg(test)]
mod tests;
