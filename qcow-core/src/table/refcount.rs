//! Refcount lookups: host cluster -> refcount table index, index in the
//! refcount block and the bytes holding the entry; reading that entry.

use crate::entry;
use crate::units::{ClusterIndex, ClusterSize, HostOffset};

/// The refcount geometry of an image: cluster size and refcount width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountGeometry {
    cluster_bits: u32,
    order: u32,
}

/// Where the refcount of one host cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountSlot {
    /// Index of the refcount table entry naming the block.
    pub table_index: u64,
    /// Index of the entry within its refcount block.
    pub index: u64,
}

/// What a refcount table entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefblockAt {
    /// No block: every cluster it would cover has refcount 0.
    Absent,
    /// A cluster-aligned block at this host offset.
    At(HostOffset),
    /// A block offset that is not cluster aligned (the entry is corrupt).
    Unaligned(u64),
}

impl RefcountGeometry {
    /// The geometry for clusters of `cluster` and `refcount_order` (the
    /// width is `1 << refcount_order` bits; orders above 6 are clamped to
    /// 6, so no lookup can overflow).
    pub fn new(cluster: ClusterSize, refcount_order: u32) -> Self {
        Self {
            cluster_bits: cluster.bits(),
            order: refcount_order.min(6),
        }
    }
    /// The geometry of an image with this header.
    pub fn of(hdr: &crate::header::HeaderRepr) -> Self {
        Self::new(ClusterSize::of(hdr), hdr.refcount_order)
    }
    /// The cluster size.
    pub fn cluster_size(&self) -> ClusterSize {
        ClusterSize::clamped(self.cluster_bits)
    }
    /// The refcount order (log2 of the entry width in bits).
    pub fn order(&self) -> u32 {
        self.order
    }
    /// log2 of the entries per refcount block: `cluster_bits + 3 - order`.
    pub fn block_bits(&self) -> u32 {
        // cluster_bits >= 9 and order <= 6: no underflow.
        self.cluster_bits
            .saturating_add(3)
            .saturating_sub(self.order)
    }
    /// Entries (host clusters covered) per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        1u64 << self.block_bits()
    }
    /// Where the refcount of host cluster `cluster` lives.
    pub fn locate(&self, cluster: ClusterIndex) -> RefcountSlot {
        let cluster = cluster.get();
        let bits = self.block_bits();
        RefcountSlot {
            table_index: cluster >> bits,
            index: cluster & (1u64 << bits).wrapping_sub(1),
        }
    }
    /// The host cluster whose refcount is entry `index` of the block at
    /// table index `table_index` (the inverse of [`Self::locate`]; `None`
    /// on overflow).
    pub fn cluster(&self, slot: RefcountSlot) -> Option<ClusterIndex> {
        slot.table_index
            .checked_shl(self.block_bits())
            .filter(|c| c >> self.block_bits() == slot.table_index)?
            .checked_add(slot.index)
            .map(ClusterIndex::new)
    }
    /// Byte offset of table entry `table_index` in the refcount table.
    pub fn table_byte(&self, table_index: u64) -> Option<u64> {
        table_index.checked_mul(8)
    }
    /// The bytes of a refcount block holding entry `index`: (byte offset in
    /// the block, length, index of the entry within those bytes). Entries
    /// narrower than a byte share one byte; wider ones span `2^(order-3)`.
    pub fn entry_bytes(&self, index: u64) -> (u64, usize, u64) {
        if self.order < 3 {
            let per_byte_bits = 3u32.saturating_sub(self.order);
            (
                index >> per_byte_bits,
                1,
                index & (1u64 << per_byte_bits).wrapping_sub(1),
            )
        } else {
            let wb = self.order.saturating_sub(3);
            (index << wb, 1usize << wb, 0)
        }
    }
    /// Byte offset in the block of the 512-byte sector holding entry
    /// `index` (what a writer rewrites after setting it).
    pub fn entry_sector(&self, index: u64) -> u64 {
        self.entry_bytes(index).0 & !511
    }
    /// Reads entry `index` of a whole refcount block (`None` if outside).
    pub fn get(&self, block: &[u8], index: u64) -> Option<u64> {
        entry::refcount_get(block, index, self.order)
    }
    /// Reads the entry from the bytes [`Self::entry_bytes`] named: `bytes`
    /// of that length, `sub` the index within them.
    pub fn get_in(&self, bytes: &[u8], sub: u64) -> Option<u64> {
        entry::refcount_get(bytes, sub, self.order)
    }
    /// Writes entry `index` of a whole refcount block; `false` if outside
    /// or `value` does not fit the width.
    pub fn set(&self, block: &mut [u8], index: u64, value: u64) -> bool {
        entry::refcount_set(block, index, self.order, value)
    }
    /// What refcount table entry `e` points at.
    pub fn block_at(&self, e: u64) -> RefblockAt {
        let off = entry::reftable_block_offset(e);
        if off == 0 {
            RefblockAt::Absent
        } else if off & (1u64 << self.cluster_bits).wrapping_sub(1) != 0 {
            RefblockAt::Unaligned(off)
        } else {
            RefblockAt::At(HostOffset::new(off))
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::cast_possible_truncation)] // test fixtures
mod tests {
    use super::*;

    fn cs(bits: u32) -> ClusterSize {
        ClusterSize::from_bits(bits).unwrap_or(ClusterSize::MIN)
    }

    #[test]
    fn locate_round_trips_at_every_width() {
        for order in 0..=6 {
            let g = RefcountGeometry::new(cs(16), order);
            assert_eq!(g.entries_per_block(), (65536 * 8) >> order);
            for c in [0u64, 1, 7, 8, 4095, 4096, 65535, 1 << 40] {
                let s = g.locate(ClusterIndex::new(c));
                assert_eq!(s.table_index, c / g.entries_per_block());
                assert_eq!(s.index, c % g.entries_per_block());
                assert_eq!(g.cluster(s), Some(ClusterIndex::new(c)));
            }
        }
    }

    #[test]
    fn entry_bytes_pick_the_entry() {
        // A 512-byte block filled with a counting pattern: reading through
        // the entry's own bytes gives what reading the whole block gives.
        let block: [u8; 512] = core::array::from_fn(|i| (i as u8).wrapping_mul(37));
        for order in 0..=6 {
            let g = RefcountGeometry::new(ClusterSize::MIN, order);
            for idx in [0u64, 1, 3, 5, 63, 64, ((512 * 8) >> order) - 1] {
                if idx >= g.entries_per_block() {
                    continue;
                }
                let (at, len, sub) = g.entry_bytes(idx);
                let at = at as usize;
                assert_eq!(g.get_in(&block[at..at + len], sub), g.get(&block, idx));
                assert_eq!(g.entry_sector(idx), 0);
            }
            assert_eq!(g.get(&block, (512 * 8) >> order), None);
        }
    }

    #[test]
    fn block_offsets_are_judged() {
        let g = RefcountGeometry::new(cs(16), 4);
        assert_eq!(g.block_at(0), RefblockAt::Absent);
        assert_eq!(g.block_at(0x1ff), RefblockAt::Absent);
        assert_eq!(
            g.block_at(0x3_0000),
            RefblockAt::At(HostOffset::new(0x3_0000))
        );
        assert_eq!(g.block_at(0x3_0200), RefblockAt::Unaligned(0x3_0200));
    }
}
