//! Named limits on values read from disk, each with its reason. They keep
//! a hostile image from making the reader loop for ages or overflow.

/// Smallest `cluster_bits` (512-byte clusters): the qcow2 spec minimum.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest `cluster_bits` (2 MiB clusters): the qcow2 spec maximum, and what
/// keeps the compressed-descriptor split and buffers bounded.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Most L1 entries accepted: QEMU's `QCOW_MAX_L1_SIZE` of 32 MiB of L1.
pub const MAX_L1_ENTRIES: u32 = 32 * 1024 * 1024 / 8;
/// Largest refcount table accepted: QEMU's `QCOW_MAX_REFTABLE_SIZE` (8 MiB).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Most internal snapshots: QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Most extra data per snapshot entry: QEMU's
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Longest backing file, backing format or data file name (QEMU: 1023).
pub const MAX_NAME_LEN: usize = 1023;
/// Longest snapshot id kept (QEMU writes decimal numbers).
pub const MAX_SNAPSHOT_ID_LEN: usize = 128;
/// Longest snapshot name kept in fixed storage.
pub const MAX_SNAPSHOT_NAME_LEN: usize = 1024;
/// Smallest v3 `header_length`: the fixed fields up to `header_length`.
pub const MIN_V3_HEADER_LEN: u32 = 104;
/// Fixed v2 header length.
pub const V2_HEADER_LEN: u32 = 72;
/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Most unknown header extensions remembered (for the writer to preserve).
pub const MAX_UNKNOWN_EXTENSIONS: usize = 16;
/// Most L2/L1/refcount slices the cache tracks (larger cache memory is
/// left unused).
pub const MAX_CACHE_SLICES: usize = 64;
/// Bytes per cached metadata slice (capped at the cluster size).
pub const SLICE_BYTES: usize = 4096;
