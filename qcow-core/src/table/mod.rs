//! The table layer: where a host cluster's refcount and a guest offset's L2
//! entry live, and how those entries read. This is the one place that maps
//! a host cluster to (refcount table index, index in its refcount block,
//! byte span of the entry) and a guest offset to (L1 index, L2 index,
//! subcluster); the reader, the checker and the writer look entries up
//! through it and differ only in how they fetch and cache table bytes
//! (the no-alloc reader through its slice cache, the checker and the
//! writer through their own buffers). Nothing here allocates or touches a
//! device.
//!
//! The bit-level encoding of single entries (L2 flags, compressed
//! descriptors, refcount packing) is [`crate::entry`]'s.

pub mod l2;
pub mod refcount;

pub use l2::{L2Geometry, L2Slot, RawL2};
pub use refcount::{RefblockAt, RefcountGeometry, RefcountSlot};

/// Reads the big-endian 64-bit table entry starting at byte `at` of
/// `table` (`None` if it does not fit).
pub fn word(table: &[u8], at: usize) -> Option<u64> {
    let b = table.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}
