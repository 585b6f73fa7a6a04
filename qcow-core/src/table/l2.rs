//! L2 lookups: guest offset -> (L1 index, L2 index, offset in the cluster,
//! subcluster); reading an L2 entry (standard or extended) from table bytes
//! and resolving it into what the guest bytes read as.

use crate::entry::{self, L2Entry, Subcluster};
use crate::error::Problem;
use crate::image::MapKind;
use crate::units::{ClusterSize, GuestOffset, HostOffset};

/// The L2 geometry of an image: cluster size, entry width (standard or
/// extended L2) and whether data lives in an external data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Geometry {
    cluster_bits: u32,
    extended: bool,
    data_file: bool,
}

/// Where the L2 entry of one guest offset lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Slot {
    /// Index in the L1 table.
    pub l1_index: u64,
    /// Index in the L2 table.
    pub l2_index: u64,
    /// Byte offset of the guest offset within its cluster.
    pub in_cluster: u64,
}

/// An L2 entry as stored: the standard 64-bit word and, with extended L2
/// entries, the subcluster bitmap word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawL2 {
    /// The standard entry.
    pub entry: u64,
    /// The subcluster bitmap (extended L2 only).
    pub bitmap: Option<u64>,
}

impl L2Geometry {
    /// The geometry for clusters of `cluster`, standard or `extended`
    /// entries, and an external data file or not.
    pub fn new(cluster: ClusterSize, extended: bool, data_file: bool) -> Self {
        Self {
            cluster_bits: cluster.bits(),
            extended,
            data_file,
        }
    }
    /// The geometry of an image with this header.
    pub fn of(hdr: &crate::header::HeaderRepr) -> Self {
        Self::new(ClusterSize::of(hdr), hdr.extended_l2(), hdr.has_data_file())
    }
    /// The cluster size.
    pub fn cluster(&self) -> ClusterSize {
        ClusterSize::clamped(self.cluster_bits)
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster().get()
    }
    /// Whether entries are extended (16 bytes, with a subcluster bitmap).
    pub fn extended(&self) -> bool {
        self.extended
    }
    /// Bytes per L2 entry: 8, or 16 when extended.
    pub fn entry_len(&self) -> usize {
        1usize << self.entry_bits()
    }
    fn entry_bits(&self) -> u32 {
        if self.extended {
            4
        } else {
            3
        }
    }
    /// log2 of the entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits.saturating_sub(self.entry_bits())
    }
    /// Entries per L2 table.
    pub fn entries_per_table(&self) -> u64 {
        1u64 << self.l2_bits()
    }
    /// Guest bytes one L1 entry covers (one whole L2 table).
    pub fn l1_span(&self) -> u64 {
        1u64 << self.l2_bits().saturating_add(self.cluster_bits)
    }
    /// L1 entries needed to cover `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l1_span())
    }
    /// Where the L2 entry of `guest` lives.
    pub fn locate(&self, guest: GuestOffset) -> L2Slot {
        let cluster = guest.cluster(self.cluster()).get();
        let l2_bits = self.l2_bits();
        L2Slot {
            l1_index: cluster >> l2_bits,
            l2_index: cluster & (1u64 << l2_bits).wrapping_sub(1),
            in_cluster: guest.in_cluster(self.cluster()),
        }
    }
    /// The guest offset where the range of L1 entry `l1_index` ends
    /// (saturating at `u64::MAX`).
    pub fn l1_end(&self, l1_index: u64) -> GuestOffset {
        GuestOffset::new(l1_index.saturating_add(1).saturating_mul(self.l1_span()))
    }
    /// Byte offset of entry `l2_index` in its L2 table.
    pub fn entry_byte(&self, l2_index: u64) -> u64 {
        l2_index << self.entry_bits()
    }
    /// Reads one entry from its `entry_len()` bytes (shorter input reads
    /// as zeros past its end).
    pub fn read(&self, bytes: &[u8]) -> RawL2 {
        let mut e = [0u8; 16];
        let n = bytes.len().min(self.entry_len());
        e[..n].copy_from_slice(&bytes[..n]);
        let w = |i: usize| super::word(&e, i).unwrap_or(0);
        RawL2 {
            entry: w(0),
            bitmap: self.extended.then(|| w(8)),
        }
    }
    /// Every entry of a whole L2 table, in order.
    pub fn entries<'t>(&self, table: &'t [u8]) -> impl Iterator<Item = RawL2> + 't {
        let g = *self;
        table.chunks_exact(self.entry_len()).map(move |b| g.read(b))
    }
    /// The host offset of a non-compressed entry's cluster, if it has one
    /// (the rule is [`entry::standard_host`]'s: with an external data file,
    /// offset 0 is a real cluster when COPIED is set).
    pub fn host(&self, e: u64) -> Option<HostOffset> {
        entry::standard_host(e, self.data_file).map(HostOffset::new)
    }
    /// Decodes the standard part of an entry.
    pub fn decode(&self, e: u64) -> L2Entry {
        L2Entry::decode(e, self.cluster_bits, self.extended, self.data_file)
    }
    /// What the guest bytes at `in_cluster` within the entry's cluster read
    /// as, and how many bytes from `in_cluster` on read the same way (to
    /// the end of the cluster, or of the subcluster with extended
    /// entries). Errors name what is wrong with the entry.
    pub fn resolve(&self, raw: RawL2, in_cluster: u64) -> Result<(MapKind, u64), Problem> {
        let cs = self.cluster_size();
        let intra = in_cluster & cs.wrapping_sub(1);
        let to_cluster_end = cs.wrapping_sub(intra);
        let decoded = self.decode(raw.entry);
        if let L2Entry::Compressed(d) = decoded {
            if self.data_file {
                return Err(Problem::CompressedNotAllowed);
            }
            return Ok((MapKind::Compressed(d), to_cluster_end));
        }
        let host = match decoded {
            L2Entry::Zero { host } | L2Entry::Normal { host } => host,
            _ => 0,
        };
        if host & cs.wrapping_sub(1) != 0 {
            return Err(Problem::Unaligned(host));
        }
        let at = |h: u64| {
            HostOffset::new(h)
                .checked_add(intra)
                .ok_or(Problem::Overflow)
        };
        let Some(bitmap) = raw.bitmap.filter(|_| self.extended) else {
            let kind = match decoded {
                L2Entry::Zero { host: 0 } => MapKind::Zero { host: None },
                L2Entry::Zero { host } => MapKind::Zero {
                    host: Some(at(host)?),
                },
                L2Entry::Normal { host } => MapKind::Data { host: at(host)? },
                _ => MapKind::Unallocated,
            };
            return Ok((kind, to_cluster_end));
        };
        // 32 subclusters: the subcluster size is 2^(cluster_bits - 5).
        let sc_bits = self.cluster_bits.saturating_sub(5);
        let sc = 1u64 << sc_bits;
        let i = u32::try_from(intra >> sc_bits).unwrap_or(0);
        let to_sc_end = sc.wrapping_sub(intra & sc.wrapping_sub(1));
        let allocated = matches!(decoded, L2Entry::Normal { .. });
        let kind = match entry::subcluster(bitmap, i, allocated) {
            Subcluster::Invalid => return Err(Problem::InvalidSubcluster { bitmap }),
            Subcluster::Allocated => MapKind::Data { host: at(host)? },
            // A zero subcluster of an allocated cluster keeps its host
            // range; qemu-img map reports it.
            Subcluster::Zero if allocated => MapKind::Zero {
                host: Some(at(host)?),
            },
            Subcluster::Zero => MapKind::Zero { host: None },
            Subcluster::Unallocated if allocated => MapKind::UnallocatedAlloc { host: at(host)? },
            Subcluster::Unallocated => MapKind::Unallocated,
        };
        Ok((kind, to_sc_end))
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::cast_possible_truncation)] // test fixtures
mod tests {
    use super::*;
    use crate::entry::COPIED;

    fn cs(bits: u32) -> ClusterSize {
        ClusterSize::from_bits(bits).unwrap_or(ClusterSize::MIN)
    }
    fn h(v: u64) -> HostOffset {
        HostOffset::new(v)
    }

    #[test]
    fn locate_splits_guest_offsets() {
        let g = L2Geometry::new(cs(16), false, false);
        assert_eq!(g.entries_per_table(), 8192);
        assert_eq!(g.l1_span(), 512 << 20);
        let s = g.locate(GuestOffset::new((512 << 20) * 3 + 65536 * 5 + 17));
        assert_eq!((s.l1_index, s.l2_index, s.in_cluster), (3, 5, 17));
        assert_eq!(g.entry_byte(5), 40);
        assert_eq!(g.l1_end(3), GuestOffset::new((512 << 20) * 4));
        assert_eq!(g.l1_end(u64::MAX), GuestOffset::new(u64::MAX));
        let x = L2Geometry::new(cs(16), true, false);
        assert_eq!(x.entries_per_table(), 4096);
        assert_eq!(x.entry_byte(5), 80);
        assert_eq!(x.l1_entries_for(1 << 30), 4);
    }

    #[test]
    fn entries_read_standard_and_extended() {
        let mut t = [0u8; 32];
        t[..8].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
        t[8..16].copy_from_slice(&3u64.to_be_bytes());
        let std: heapless::Vec<RawL2, 4> =
            L2Geometry::new(cs(9), false, false).entries(&t).collect();
        assert_eq!(std.len(), 4);
        assert_eq!(std[1].entry, 3);
        assert_eq!(std[1].bitmap, None);
        let ext: heapless::Vec<RawL2, 2> =
            L2Geometry::new(cs(14), true, false).entries(&t).collect();
        assert_eq!(ext.len(), 2);
        assert_eq!(ext[0].bitmap, Some(3));
    }

    #[test]
    fn host_agrees_with_decode() {
        // The data-file offset-0 rule lives in `entry::standard_host`; the
        // geometry's `host` and `L2Entry::decode` must read it the same way.
        for data_file in [false, true] {
            let g = L2Geometry::new(cs(16), false, data_file);
            for e in [0, COPIED, 0x3_0000, COPIED | 0x3_0000, 0x8_0000] {
                let via_decode = match g.decode(e) {
                    L2Entry::Normal { host } => Some(h(host)),
                    _ => None,
                };
                assert_eq!(g.host(e), via_decode, "{e:#x} data_file={data_file}");
            }
            assert_eq!(g.host(COPIED), data_file.then_some(h(0)));
        }
    }

    #[test]
    fn resolve_judges_entries() {
        let g = L2Geometry::new(cs(16), false, false);
        let raw = |entry| RawL2 {
            entry,
            bitmap: None,
        };
        assert_eq!(
            g.resolve(raw(0x5_0000), 3),
            Ok((MapKind::Data { host: h(0x5_0003) }, 65533))
        );
        assert_eq!(
            g.resolve(raw(0x5_0200), 0),
            Err(Problem::Unaligned(0x5_0200))
        );
        assert_eq!(
            g.resolve(raw(1), 0),
            Ok((MapKind::Zero { host: None }, 65536))
        );
        assert_eq!(g.resolve(raw(0), 9), Ok((MapKind::Unallocated, 65527)));
        let df = L2Geometry::new(cs(16), false, true);
        assert_eq!(
            df.resolve(raw(COPIED), 0),
            Ok((MapKind::Data { host: h(0) }, 65536))
        );
        assert_eq!(
            df.resolve(raw(entry::COMPRESSED | 0x1000), 0),
            Err(Problem::CompressedNotAllowed)
        );
        // Extended: subcluster 1 allocated, subcluster 2 zero; 2 KiB each.
        let x = L2Geometry::new(cs(16), true, false);
        let e = RawL2 {
            entry: 0x5_0000,
            bitmap: Some(0b10 | (0b100 << 32)),
        };
        assert_eq!(
            x.resolve(e, 2048 + 5),
            Ok((MapKind::Data { host: h(0x5_0805) }, 2043))
        );
        assert_eq!(
            x.resolve(e, 4096),
            Ok((
                MapKind::Zero {
                    host: Some(h(0x5_1000))
                },
                2048
            ))
        );
        assert_eq!(
            x.resolve(e, 0),
            Ok((MapKind::UnallocatedAlloc { host: h(0x5_0000) }, 2048))
        );
        let bad = RawL2 {
            entry: 0,
            bitmap: Some(1),
        };
        assert_eq!(
            x.resolve(bad, 0),
            Err(Problem::InvalidSubcluster { bitmap: 1 })
        );
    }
}
