//! Table entries: L1, L2 (standard and extended), compressed cluster
//! descriptors and refcounts. Pure functions over integers and bytes.

/// Bits 9..=55: the offset field of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: COPIED (refcount is exactly 1).
pub const COPIED: u64 = 1 << 63;
/// Bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0: reads as zero (v3, standard L2 entries).
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// The L2 table offset of an L1 entry (0: no L2 table).
pub fn l1_l2_offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

/// An L2 entry decoded (standard part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// No host cluster, not zero: falls through to the backing file.
    Unallocated,
    /// Reads as zero; `host` is the preallocated cluster, if any.
    Zero {
        /// Preallocated host cluster (0 if none).
        host: u64,
    },
    /// A host cluster.
    Normal {
        /// Host offset of the cluster.
        host: u64,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// The host offset a standard (non-compressed) L2 entry names, if it names
/// one: its offset bits, where 0 means "no cluster" except with an external
/// data file (`data_file`) and COPIED set, since clusters in a data file
/// always have refcount 1 and qemu-img uses COPIED to tell offset 0 from
/// "unallocated". The one place this rule lives: [`L2Entry::decode`] and
/// [`crate::table::L2Geometry::host`] both ask it.
pub fn standard_host(entry: u64, data_file: bool) -> Option<u64> {
    let host = entry & OFFSET_MASK;
    (host != 0 || (data_file && entry & COPIED != 0)).then_some(host)
}

impl L2Entry {
    /// Decodes a standard L2 entry. With `extended`, the zero flag is
    /// reserved (the bitmap decides instead). Whether a non-zero entry
    /// names a cluster is [`standard_host`]'s rule (`data_file`: offset 0
    /// with COPIED is a real cluster in an external data file).
    pub fn decode(entry: u64, cluster_bits: u32, extended: bool, data_file: bool) -> Self {
        if entry & COMPRESSED != 0 {
            return Self::Compressed(CompressedDescriptor::decode(entry, cluster_bits));
        }
        // qemu-img honours the zero flag in v2 images too (the spec calls
        // the bit reserved there); match qemu-img.
        if !extended && entry & ZERO != 0 {
            return Self::Zero {
                host: entry & OFFSET_MASK,
            };
        }
        match standard_host(entry, data_file) {
            Some(host) => Self::Normal { host },
            None => Self::Unallocated,
        }
    }
    /// Encodes a standard entry (`copied` sets bit 63 on normal clusters).
    pub fn encode(&self, cluster_bits: u32, copied: bool) -> u64 {
        let c = if copied { COPIED } else { 0 };
        match *self {
            Self::Unallocated => 0,
            Self::Zero { host } => (host & OFFSET_MASK) | ZERO | if host != 0 { c } else { 0 },
            Self::Normal { host } => (host & OFFSET_MASK) | c,
            Self::Compressed(d) => d.encode(cluster_bits),
        }
    }
}

/// A compressed cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data.
    pub host: u64,
    /// Number of 512-byte sectors (at least 1) holding it, counted from the
    /// sector containing `host`.
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bit where the sector count starts: `62 - (cluster_bits - 8)`.
    pub fn shift(cluster_bits: u32) -> u32 {
        62u32.saturating_sub(cluster_bits.saturating_sub(8))
    }
    /// Decodes the descriptor bits of an L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = Self::shift(cluster_bits);
        let off_mask = (1u64 << x).wrapping_sub(1);
        let n_mask = (1u64 << 62u32.saturating_sub(x)).wrapping_sub(1);
        Self {
            host: entry & off_mask,
            sectors: ((entry >> x) & n_mask).saturating_add(1),
        }
    }
    /// Encodes into an L2 entry (bit 62 set).
    pub fn encode(&self, cluster_bits: u32) -> u64 {
        let x = Self::shift(cluster_bits);
        let off_mask = (1u64 << x).wrapping_sub(1);
        let n_mask = (1u64 << 62u32.saturating_sub(x)).wrapping_sub(1);
        COMPRESSED | (self.host & off_mask) | ((self.sectors.saturating_sub(1) & n_mask) << x)
    }
    /// Compressed bytes from `host` to the end of the last sector.
    pub fn len(&self) -> u64 {
        self.sectors
            .saturating_mul(512)
            .saturating_sub(self.host % 512)
    }
    /// Whether the descriptor covers no bytes (never, for a decoded one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one subcluster of an extended L2 entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Falls through to the backing file.
    Unallocated,
    /// Reads as zero.
    Zero,
    /// Allocated at the cluster's host offset plus its index times the
    /// subcluster size.
    Allocated,
    /// Both allocated and zero, or allocated without a host cluster.
    Invalid,
}

/// Decodes subcluster `i` of an extended L2 bitmap word for a cluster that
/// has a host cluster (`allocated`) or not.
pub fn subcluster(bitmap: u64, i: u32, allocated: bool) -> Subcluster {
    let i = i % SUBCLUSTERS;
    let alloc = bitmap >> i & 1 != 0;
    let zero = bitmap >> (i.wrapping_add(SUBCLUSTERS)) & 1 != 0;
    match (alloc, zero) {
        (true, true) => Subcluster::Invalid,
        (true, false) if !allocated => Subcluster::Invalid,
        (true, false) => Subcluster::Allocated,
        (false, true) => Subcluster::Zero,
        (false, false) => Subcluster::Unallocated,
    }
}

/// The refcount block offset of a refcount table entry (0: none).
pub fn reftable_block_offset(entry: u64) -> u64 {
    entry & !0x1ff
}

/// Reads refcount `index` from a refcount block with `1 << order`-bit
/// entries (big-endian; narrower than a byte packed LSB-first). `None` if
/// `index` is outside `block` or `order > 6`.
pub fn refcount_get(block: &[u8], index: u64, order: u32) -> Option<u64> {
    if order > 6 {
        return None;
    }
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8u64.checked_div(bits)?;
        let byte = block.get(usize::try_from(index.checked_div(per_byte)?).ok()?)?;
        let shift = index.checked_rem(per_byte)?.checked_mul(bits)?;
        let mask = (1u64 << bits).wrapping_sub(1);
        Some((u64::from(*byte) >> shift) & mask)
    } else {
        let w = usize::try_from(bits / 8).ok()?;
        let start = usize::try_from(index).ok()?.checked_mul(w)?;
        let b = block.get(start..start.checked_add(w)?)?;
        Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }
}

/// Writes refcount `index` (see [`refcount_get`]). Returns `false` if the
/// index is outside `block` or `value` does not fit the width.
pub fn refcount_set(block: &mut [u8], index: u64, order: u32, value: u64) -> bool {
    if order > 6 {
        return false;
    }
    let bits = 1u64 << order;
    if bits < 64 && value >> bits != 0 {
        return false;
    }
    if bits < 8 {
        // order 0..=2: 8 >> order entries per byte.
        let per_byte_bits = 3u32.saturating_sub(order);
        let Ok(i) = usize::try_from(index >> per_byte_bits) else {
            return false;
        };
        let Some(byte) = block.get_mut(i) else {
            return false;
        };
        let shift = (index & ((1u64 << per_byte_bits).wrapping_sub(1))) << order;
        let mask = ((1u64 << bits).wrapping_sub(1)) << shift;
        let v = (u64::from(*byte) & !mask) | (value << shift);
        *byte = v.to_le_bytes()[0];
        true
    } else {
        let w = 1usize << order.saturating_sub(3);
        let Some(start) = usize::try_from(index).ok().and_then(|i| i.checked_mul(w)) else {
            return false;
        };
        let Some(b) = start
            .checked_add(w)
            .and_then(|end| block.get_mut(start..end))
        else {
            return false;
        };
        let be = value.to_be_bytes();
        b.copy_from_slice(&be[be.len().saturating_sub(w)..]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trips_at_all_cluster_sizes() {
        for bits in 9..=21u32 {
            let x = CompressedDescriptor::shift(bits);
            assert_eq!(x, 62 - (bits - 8));
            let max_sectors = 1u64 << (bits - 8);
            for &(host, sectors) in &[
                (0x1234u64, 1u64),
                (0x10_0000_0200, 2),
                (512 * 7 + 13, max_sectors),
            ] {
                let host = host & ((1 << x) - 1);
                let d = CompressedDescriptor { host, sectors };
                let e = d.encode(bits);
                assert_ne!(e & COMPRESSED, 0);
                assert_eq!(CompressedDescriptor::decode(e, bits), d, "bits {bits}");
                assert_eq!(
                    L2Entry::decode(e, bits, false, false),
                    L2Entry::Compressed(d)
                );
            }
        }
        // 64 KiB clusters: x = 54, known layout.
        let e = COMPRESSED | (3u64 << 54) | 0x5_0100;
        let d = CompressedDescriptor::decode(e, 16);
        assert_eq!(
            d,
            CompressedDescriptor {
                host: 0x5_0100,
                sectors: 4
            }
        );
        assert_eq!(d.len(), 4 * 512 - 0x100);
    }

    #[test]
    fn l2_entries_decode() {
        assert_eq!(L2Entry::decode(0, 16, false, false), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(COPIED | 0x3_0000, 16, false, false),
            L2Entry::Normal { host: 0x3_0000 }
        );
        assert_eq!(
            L2Entry::decode(1, 16, false, false),
            L2Entry::Zero { host: 0 }
        );
        assert_eq!(
            L2Entry::decode(0x3_0001, 16, false, false),
            L2Entry::Zero { host: 0x3_0000 }
        );
        // With extended L2 the zero flag is reserved.
        assert_eq!(L2Entry::decode(1, 16, true, false), L2Entry::Unallocated);
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero { host: 0x20000 },
            L2Entry::Normal { host: 0x40000 },
        ] {
            assert_eq!(L2Entry::decode(e.encode(16, true), 16, false, false), e);
        }
        assert_eq!(l1_l2_offset(COPIED | 0x5_0000), 0x5_0000);
        // External data file: offset 0 with COPIED is allocated.
        assert_eq!(
            L2Entry::decode(COPIED, 16, false, true),
            L2Entry::Normal { host: 0 }
        );
        assert_eq!(
            L2Entry::decode(COPIED, 16, false, false),
            L2Entry::Unallocated
        );
        assert_eq!(L2Entry::decode(0, 16, false, true), L2Entry::Unallocated);
    }

    #[test]
    fn subclusters_decode() {
        let bitmap = 0b01 | (0b10u64 << 32) | (1 << 5) | (1 << 37);
        assert_eq!(subcluster(bitmap, 0, true), Subcluster::Allocated);
        assert_eq!(subcluster(bitmap, 1, true), Subcluster::Zero);
        assert_eq!(subcluster(bitmap, 2, true), Subcluster::Unallocated);
        assert_eq!(subcluster(bitmap, 5, true), Subcluster::Invalid);
        assert_eq!(subcluster(bitmap, 0, false), Subcluster::Invalid);
    }

    #[test]
    fn refcounts_all_widths() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut block = [0u8; 64];
            let n = 64 * 8 / u64::from(bits);
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for i in 0..n {
                assert!(refcount_set(&mut block, i, order, (i * 7 + 1) & max));
            }
            for i in 0..n {
                assert_eq!(refcount_get(&block, i, order), Some((i * 7 + 1) & max));
            }
            assert_eq!(refcount_get(&block, n, order), None);
            assert!(!refcount_set(&mut block, n, order, 1));
            if bits < 64 {
                assert!(!refcount_set(&mut block, 0, order, max + 1));
            }
        }
        // 16-bit big-endian, and 1-bit LSB-first packing.
        assert_eq!(refcount_get(&[0x01, 0x02], 0, 4), Some(0x0102));
        assert_eq!(refcount_get(&[0b0000_0010], 1, 0), Some(1));
        assert_eq!(refcount_get(&[0b0000_0010], 0, 0), Some(0));
        assert_eq!(refcount_get(&[0x12], 0, 2), Some(2));
        assert_eq!(refcount_get(&[0x12], 1, 2), Some(1));
    }
}
