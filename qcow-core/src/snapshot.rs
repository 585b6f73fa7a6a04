//! Snapshot table entries: a fixed 40-byte part, extra data, id and name,
//! padded to 8 bytes.

use crate::error::{Error, Limit, Problem, Structure};
use crate::header::{be32, be64};
use crate::limits::{MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_ID_LEN, MAX_SNAPSHOT_NAME_LEN};

/// Longest id qemu-img shows (`QEMUSnapshotInfo::id_str` holds 127 bytes
/// and a NUL): `info` and `snapshot -l` cut longer ids there.
pub const SHOWN_ID_LEN: usize = 127;
/// Longest name qemu-img shows (`QEMUSnapshotInfo::name` holds 255 bytes
/// and a NUL): `info` and `snapshot -l` cut longer names there, and
/// `qemu-img snapshot -c` stores at most that many bytes.
pub const SHOWN_NAME_LEN: usize = 255;

/// `text` as qemu-img shows a snapshot id or name: up to the first NUL (the
/// table holds C strings for QEMU), at most `max` bytes.
pub fn shown(text: &[u8], max: usize) -> &[u8] {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    text.get(..end.min(max)).unwrap_or(text)
}

/// Byte ranges of the fixed part of a snapshot table entry.
pub mod field {
    use core::ops::Range;
    /// Offset of the snapshot's L1 table.
    pub const L1_OFFSET: Range<usize> = 0..8;
    /// Entries of that L1 table.
    pub const L1_SIZE: Range<usize> = 8..12;
    /// Bytes of the id.
    pub const ID_LEN: Range<usize> = 12..14;
    /// Bytes of the name.
    pub const NAME_LEN: Range<usize> = 14..16;
    /// Seconds of the creation date.
    pub const DATE_SEC: Range<usize> = 16..20;
    /// Nanoseconds of the creation date.
    pub const DATE_NSEC: Range<usize> = 20..24;
    /// Guest clock.
    pub const VM_CLOCK_NSEC: Range<usize> = 24..32;
    /// VM state size (32-bit).
    pub const VM_STATE_SIZE: Range<usize> = 32..36;
    /// Bytes of extra data.
    pub const EXTRA_SIZE: Range<usize> = 36..40;
    /// Length of the fixed part.
    pub const FIXED_LEN: usize = 40;
}

/// The fixed part and extra data of a snapshot entry, before id and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotFixed {
    /// Offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries in it.
    pub l1_size: u32,
    /// Bytes of the id.
    pub id_len: u16,
    /// Bytes of the name.
    pub name_len: u16,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, ns.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Bytes of extra data.
    pub extra_size: u32,
    /// Virtual disk size at creation (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count (extra data), if recorded and not -1.
    pub icount: Option<u64>,
}

impl SnapshotFixed {
    /// Parses the 40-byte fixed part at image offset `at`.
    pub fn parse<E>(b: &[u8], at: u64) -> Result<Self, Error<E>> {
        if b.len() < field::FIXED_LEN {
            return Err(Error::corrupt(
                Structure::SnapshotTable,
                at,
                Problem::Truncated {
                    needed: field::FIXED_LEN as u64,
                    available: b.len() as u64,
                },
            ));
        }
        let extra_size = be32(b, field::EXTRA_SIZE);
        Error::check_limit(
            Structure::SnapshotTable,
            at,
            Limit::SnapshotExtra,
            u64::from(extra_size),
            u64::from(MAX_SNAPSHOT_EXTRA),
        )?;
        // Id and name lengths are 16-bit (at most 64 KiB each), as in
        // QEMU, which reads any length the table holds; the whole table is
        // bounded by `MAX_SNAPSHOT_TABLE_BYTES`.
        let id_len = u16::from_be_bytes([b[12], b[13]]);
        let name_len = u16::from_be_bytes([b[14], b[15]]);
        Ok(Self {
            l1_offset: be64(b, field::L1_OFFSET),
            l1_size: be32(b, field::L1_SIZE),
            id_len,
            name_len,
            date_sec: be32(b, field::DATE_SEC),
            date_nsec: be32(b, field::DATE_NSEC),
            vm_clock_nsec: be64(b, field::VM_CLOCK_NSEC),
            vm_state_size: u64::from(be32(b, field::VM_STATE_SIZE)),
            extra_size,
            disk_size: None,
            icount: None,
        })
    }

    /// Applies the known extra data fields (`extra` is the start of the
    /// extra data, at most `extra_size` bytes).
    pub fn apply_extra(&mut self, extra: &[u8]) {
        if extra.len() >= 8 {
            self.vm_state_size = be64(extra, 0..8);
        }
        if extra.len() >= 16 {
            self.disk_size = Some(be64(extra, 8..16));
        }
        if extra.len() >= 24 {
            let ic = be64(extra, 16..24);
            self.icount = (ic != u64::MAX).then_some(ic);
        }
    }

    /// Bytes of the whole entry, padded to 8.
    pub fn entry_len(&self) -> u64 {
        self.unpadded_len().next_multiple_of(8)
    }

    /// Bytes of the entry up to the end of its name (before the padding).
    pub fn unpadded_len(&self) -> u64 {
        (field::FIXED_LEN as u64)
            .saturating_add(u64::from(self.extra_size))
            .saturating_add(u64::from(self.id_len))
            .saturating_add(u64::from(self.name_len))
    }

    /// Writes the fixed part (40 bytes) and the 24 bytes of extra data QEMU
    /// 10 writes when `extra_size >= 24` into `b`.
    pub fn emit(&self, b: &mut [u8]) {
        let mut put = |r: core::ops::Range<usize>, v: &[u8]| {
            if let Some(s) = b.get_mut(r) {
                if s.len() == v.len() {
                    s.copy_from_slice(v);
                }
            }
        };
        put(field::L1_OFFSET, &self.l1_offset.to_be_bytes());
        put(field::L1_SIZE, &self.l1_size.to_be_bytes());
        put(field::ID_LEN, &self.id_len.to_be_bytes());
        put(field::NAME_LEN, &self.name_len.to_be_bytes());
        put(field::DATE_SEC, &self.date_sec.to_be_bytes());
        put(field::DATE_NSEC, &self.date_nsec.to_be_bytes());
        put(field::VM_CLOCK_NSEC, &self.vm_clock_nsec.to_be_bytes());
        let small = u32::try_from(self.vm_state_size).unwrap_or(0);
        put(field::VM_STATE_SIZE, &small.to_be_bytes());
        put(field::EXTRA_SIZE, &self.extra_size.to_be_bytes());
        if self.extra_size >= 24 {
            put(40..48, &self.vm_state_size.to_be_bytes());
            put(48..56, &self.disk_size.unwrap_or(0).to_be_bytes());
            put(56..64, &self.icount.unwrap_or(u64::MAX).to_be_bytes());
        }
    }
}

/// Refuses an entry at `entry_offset` whose name ends (`entry_len`: its
/// [`SnapshotFixed::unpadded_len`]) more than
/// [`crate::image::MAX_SNAPSHOT_TABLE_BYTES`] past `table_offset`, as QEMU
/// ("Snapshot table is too big"). With 16-bit ids and names this is
/// what bounds the memory the whole table takes.
pub fn check_table_end<E>(
    table_offset: u64,
    entry_offset: u64,
    entry_len: u64,
) -> Result<(), Error<E>> {
    let spans = entry_offset
        .saturating_add(entry_len)
        .saturating_sub(table_offset);
    Error::check_limit(
        Structure::SnapshotTable,
        entry_offset,
        Limit::SnapshotTableBytes,
        spans,
        crate::image::MAX_SNAPSHOT_TABLE_BYTES,
    )
}

/// A snapshot as listed by `qemu-img info`.
///
/// `id` and `name` hold the first `MAX_SNAPSHOT_ID_LEN` /
/// `MAX_SNAPSHOT_NAME_LEN` bytes (more than qemu-img shows, see
/// [`SHOWN_ID_LEN`], [`SHOWN_NAME_LEN`]); the table may hold up to 65,535.
/// [`crate::Qcow2::read_snapshot_text`] reads the whole strings into a
/// caller's buffer, and the lookups compare whole strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Index in the snapshot table.
    pub index: u32,
    /// Offset of the entry in the image.
    pub entry_offset: u64,
    /// Fixed fields and extra data.
    pub fixed: SnapshotFixed,
    /// Id (QEMU writes decimal numbers): the first bytes, all of them when
    /// [`Self::id_complete`].
    pub id: heapless::Vec<u8, MAX_SNAPSHOT_ID_LEN>,
    /// Name: the first bytes, all of them when [`Self::name_complete`].
    pub name: heapless::Vec<u8, MAX_SNAPSHOT_NAME_LEN>,
}

impl SnapshotInfo {
    /// The id as text (`None` if not UTF-8 or longer than kept inline).
    pub fn id_str(&self) -> Option<&str> {
        self.id_complete()
            .then(|| core::str::from_utf8(&self.id).ok())
            .flatten()
    }
    /// The name as text (`None` if not UTF-8 or longer than kept inline).
    pub fn name_str(&self) -> Option<&str> {
        self.name_complete()
            .then(|| core::str::from_utf8(&self.name).ok())
            .flatten()
    }
    /// Whether `id` holds the whole id.
    pub fn id_complete(&self) -> bool {
        self.id.len() == usize::from(self.fixed.id_len)
    }
    /// Whether `name` holds the whole name.
    pub fn name_complete(&self) -> bool {
        self.name.len() == usize::from(self.fixed.name_len)
    }
    /// Image offset of the id (the name follows it).
    pub fn id_offset(&self) -> u64 {
        self.entry_offset
            .saturating_add(field::FIXED_LEN as u64)
            .saturating_add(u64::from(self.fixed.extra_size))
    }
    /// The id as qemu-img shows it (at most [`SHOWN_ID_LEN`] bytes).
    pub fn shown_id(&self) -> &[u8] {
        shown(&self.id, SHOWN_ID_LEN)
    }
    /// The name as qemu-img shows it (at most [`SHOWN_NAME_LEN`] bytes).
    pub fn shown_name(&self) -> &[u8] {
        shown(&self.name, SHOWN_NAME_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_round_trips_and_rejects_garbage() {
        let f = SnapshotFixed {
            l1_offset: 0x30000,
            l1_size: 8,
            id_len: 1,
            name_len: 2,
            date_sec: 5,
            date_nsec: 6,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            extra_size: 24,
            disk_size: Some(1 << 30),
            icount: None,
        };
        let mut b = [0u8; 64];
        f.emit(&mut b);
        let mut g = SnapshotFixed::parse::<()>(&b, 0).unwrap();
        g.apply_extra(&b[40..64]);
        assert_eq!(f, g);
        assert_eq!(f.entry_len(), 72);
        assert!(SnapshotFixed::parse::<()>(&b[..39], 0).is_err());
        b[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(SnapshotFixed::parse::<()>(&b, 0).is_err());
        // 16-bit ids and names of any length parse.
        b[36..40].copy_from_slice(&24u32.to_be_bytes());
        b[12..16].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let g = SnapshotFixed::parse::<()>(&b, 0).unwrap();
        assert_eq!((g.id_len, g.name_len), (u16::MAX, u16::MAX));
        assert_eq!(g.unpadded_len(), 40 + 24 + 2 * 65535);
        assert_eq!(g.entry_len(), (40 + 24 + 2 * 65535u64).next_multiple_of(8));
    }

    #[test]
    fn the_table_is_bounded_as_in_qemu() {
        let max = crate::image::MAX_SNAPSHOT_TABLE_BYTES;
        let t = 0x1_0000;
        assert!(check_table_end::<()>(t, t + max - 100, 100).is_ok());
        let e = check_table_end::<()>(t, t + max - 100, 101).unwrap_err();
        assert!(matches!(
            e,
            Error::Limit {
                limit: Limit::SnapshotTableBytes,
                ..
            }
        ));
    }

    #[test]
    fn shown_cuts_at_nul_and_length() {
        assert_eq!(shown(b"abc\0def", 255), b"abc");
        assert_eq!(shown(&[b'x'; 300], SHOWN_NAME_LEN).len(), 255);
        assert_eq!(shown(b"12", SHOWN_ID_LEN), b"12");
    }
}
