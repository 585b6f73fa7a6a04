//! What a check reports: findings, counts, fragmentation, the outcome of a
//! repair.

use super::*;

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
