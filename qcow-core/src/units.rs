//! Typed offsets and units for the values that cross qcow-core's APIs: a
//! byte offset in the guest's view ([`GuestOffset`]), a byte offset in the
//! image or data file ([`HostOffset`]), a cluster number
//! ([`ClusterIndex`]) and a validated cluster size ([`ClusterSize`]).
//!
//! Conversions are explicit (`new`/`From<u64>` in, `get`/`From<..> for
//! u64` out) and there are no arithmetic operator impls: every sum or
//! difference goes through a `checked_*` method, so overflow from an
//! on-disk value is always handled where it happens.

use core::fmt;

use crate::error::Problem;
use crate::limits::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

macro_rules! offset {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Offset 0.
            pub const ZERO: Self = Self(0);
            /// Wraps a byte offset.
            pub const fn new(v: u64) -> Self {
                Self(v)
            }
            /// The byte offset.
            pub const fn get(self) -> u64 {
                self.0
            }
            /// `self + n` bytes, `None` on overflow.
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// `self - n` bytes, `None` below 0.
            pub const fn checked_sub(self, n: u64) -> Option<Self> {
                match self.0.checked_sub(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// Bytes from `start` up to `self`, `None` if `start` is past it.
            pub const fn checked_since(self, start: Self) -> Option<u64> {
                self.0.checked_sub(start.0)
            }
            /// The byte's offset within its cluster.
            pub const fn in_cluster(self, cs: ClusterSize) -> u64 {
                self.0 & cs.mask()
            }
            /// Whether the offset is at the start of a cluster.
            pub const fn is_cluster_aligned(self, cs: ClusterSize) -> bool {
                self.in_cluster(cs) == 0
            }
            /// The index of the cluster holding the byte.
            pub const fn cluster(self, cs: ClusterSize) -> ClusterIndex {
                ClusterIndex(self.0 >> cs.bits)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            /// Writes the offset in decimal.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

offset! {
    /// A byte offset in the guest's view of the disk (what a VM reads).
    GuestOffset
}

offset! {
    /// A byte offset in the image file, or in its external data file for
    /// guest data when the image has one.
    HostOffset
}

/// A cluster number: a byte offset shifted right by the cluster bits (a
/// host cluster for refcounts, a guest cluster for L2 lookups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterIndex(u64);

impl ClusterIndex {
    /// Wraps a cluster number.
    pub const fn new(v: u64) -> Self {
        Self(v)
    }
    /// The cluster number.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// `self + n` clusters, `None` on overflow.
    pub const fn checked_add(self, n: u64) -> Option<Self> {
        match self.0.checked_add(n) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
    /// The host offset of the cluster's first byte, `None` if it does not
    /// fit in 64 bits.
    pub const fn host_offset(self, cs: ClusterSize) -> Option<HostOffset> {
        if self.0 > u64::MAX >> cs.bits {
            None
        } else {
            Some(HostOffset(self.0 << cs.bits))
        }
    }
    /// The guest offset of the cluster's first byte, `None` if it does not
    /// fit in 64 bits.
    pub const fn guest_offset(self, cs: ClusterSize) -> Option<GuestOffset> {
        match self.host_offset(cs) {
            Some(h) => Some(GuestOffset(h.0)),
            None => None,
        }
    }
}

impl From<u64> for ClusterIndex {
    fn from(v: u64) -> Self {
        Self(v)
    }
}

impl From<ClusterIndex> for u64 {
    fn from(v: ClusterIndex) -> u64 {
        v.0
    }
}

/// A cluster size validated to be a power of two from 512 bytes to 2 MiB
/// (`cluster_bits` 9..=21, the qcow2 spec's range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterSize {
    bits: u32,
}

impl ClusterSize {
    /// The smallest cluster size, 512 bytes.
    pub const MIN: Self = Self {
        bits: MIN_CLUSTER_BITS,
    };
    /// The largest cluster size, 2 MiB.
    pub const MAX: Self = Self {
        bits: MAX_CLUSTER_BITS,
    };

    /// The size of `2^bits` bytes; [`Problem::ClusterBits`] outside 9..=21.
    pub const fn from_bits(bits: u32) -> Result<Self, Problem> {
        if bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS {
            Err(Problem::ClusterBits(bits))
        } else {
            Ok(Self { bits })
        }
    }
    /// The size of `bytes` bytes; [`Problem::OutOfRange`] unless it is a
    /// power of two from 512 to 2 MiB.
    pub const fn from_bytes(bytes: u64) -> Result<Self, Problem> {
        if !bytes.is_power_of_two() {
            return Err(Problem::OutOfRange(bytes));
        }
        match Self::from_bits(bytes.trailing_zeros()) {
            Ok(s) => Ok(s),
            Err(_) => Err(Problem::OutOfRange(bytes)),
        }
    }
    /// The cluster size of an image with this header (validated by
    /// [`crate::header::HeaderRepr::parse`]; a hand-built header's
    /// `cluster_bits` is clamped into 9..=21).
    pub const fn of(hdr: &crate::header::HeaderRepr) -> Self {
        Self::clamped(hdr.cluster_bits)
    }
    /// `bits` clamped into 9..=21: for geometry built from a header the
    /// parser already validated (a hand-built out-of-range value cannot
    /// make a lookup overflow).
    pub(crate) const fn clamped(bits: u32) -> Self {
        Self {
            bits: if bits < MIN_CLUSTER_BITS {
                MIN_CLUSTER_BITS
            } else if bits > MAX_CLUSTER_BITS {
                MAX_CLUSTER_BITS
            } else {
                bits
            },
        }
    }
    /// log2 of the size (9..=21).
    pub const fn bits(self) -> u32 {
        self.bits
    }
    /// The size in bytes.
    pub const fn get(self) -> u64 {
        1u64 << self.bits
    }
    /// `get() - 1`: the mask of an offset's bytes within its cluster.
    pub const fn mask(self) -> u64 {
        // bits >= 9: no wrap.
        (1u64 << self.bits).wrapping_sub(1)
    }
}

impl From<ClusterSize> for u64 {
    fn from(v: ClusterSize) -> u64 {
        v.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_size_is_validated() {
        assert_eq!(ClusterSize::from_bits(8), Err(Problem::ClusterBits(8)));
        assert_eq!(ClusterSize::from_bits(22), Err(Problem::ClusterBits(22)));
        assert_eq!(ClusterSize::from_bits(16).map(ClusterSize::get), Ok(65536));
        assert_eq!(ClusterSize::from_bytes(512), Ok(ClusterSize::MIN));
        assert_eq!(ClusterSize::from_bytes(2 << 20), Ok(ClusterSize::MAX));
        assert_eq!(ClusterSize::from_bytes(256), Err(Problem::OutOfRange(256)));
        assert_eq!(
            ClusterSize::from_bytes(4 << 20),
            Err(Problem::OutOfRange(4 << 20))
        );
        assert_eq!(
            ClusterSize::from_bytes(3 << 10),
            Err(Problem::OutOfRange(3 << 10))
        );
        assert_eq!(ClusterSize::from_bytes(0), Err(Problem::OutOfRange(0)));
        assert_eq!(ClusterSize::clamped(3), ClusterSize::MIN);
        assert_eq!(ClusterSize::clamped(40), ClusterSize::MAX);
    }

    #[test]
    fn offsets_convert_and_check() {
        let cs = ClusterSize::from_bits(16).unwrap_or(ClusterSize::MIN);
        let h = HostOffset::new(0x3_0017);
        assert_eq!(h.cluster(cs), ClusterIndex::new(3));
        assert_eq!(h.in_cluster(cs), 0x17);
        assert!(!h.is_cluster_aligned(cs));
        assert_eq!(
            ClusterIndex::new(3).host_offset(cs),
            Some(HostOffset::new(0x3_0000))
        );
        assert_eq!(ClusterIndex::new(u64::MAX >> 15).host_offset(cs), None);
        assert_eq!(HostOffset::new(u64::MAX).checked_add(1), None);
        assert_eq!(GuestOffset::new(0).checked_sub(1), None);
        assert_eq!(
            GuestOffset::new(9).checked_since(GuestOffset::new(4)),
            Some(5)
        );
        assert_eq!(GuestOffset::new(4).checked_since(GuestOffset::new(9)), None);
        assert_eq!(u64::from(GuestOffset::from(7)), 7);
    }
}
