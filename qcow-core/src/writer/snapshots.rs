//! Internal snapshots for the writer: create, revert to (apply) and delete.
//!
//! A snapshot is a copy of the active L1 table plus an entry in the
//! snapshot table. Refcounts count references per L1 path: taking a
//! snapshot adds one to every L2 table the active L1 names and to every
//! cluster those tables name; deleting one takes them away again. Shared
//! clusters lose their COPIED flag, and the writer copies them before it
//! changes them (see `Qcow2Writer::ensure_l2` and `write_in_cluster`).
//! The LUKS header region of an encrypted image is referenced by the
//! header alone and is never counted twice.
//!
//! Ordering (each step flushed before the next):
//!
//! - create: COPIED cleared in the active tables, then the refcounts
//!   raised, then the snapshot's L1 copy, then the new snapshot table, then
//!   one header write switching `nb_snapshots` and `snapshots_offset`,
//!   then the old table freed;
//! - apply: the snapshot's tree gains a reference, the active L1 is
//!   rewritten to the snapshot's, the old active tree loses its reference;
//! - delete: the new table without the entry, the header switch, the old
//!   table freed, the snapshot's tree and L1 copy released, then COPIED
//!   set again where a cluster is the active image's alone.
//!
//! A power cut at any point leaves references covered by refcounts (leaks
//! at worst). It can leave COPIED flags missing on clusters whose refcount
//! is 1: in create, between clearing the flags and raising the refcounts;
//! in delete, between dropping the refcounts and restoring the flags.
//! `qemu-img check` reports those, and `-r all` repairs them; no data is
//! at risk since a missing COPIED only makes the writer copy before
//! writing (the reverse, COPIED on a shared cluster, never happens). QEMU
//! has the same windows. Apply has none: the tree it installs is shared
//! with the snapshot, so its refcounts stay at 2 or more.

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use super::{overflow, Qcow2Writer, SECTOR_BYTES};
use crate::entry::{self, L2Entry, COPIED, OFFSET_MASK};
use crate::error::{Error, LayerError, Limit, Structure, Unsupported};
use crate::header::field;
use crate::limits::{
    MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_ID_LEN, MAX_SNAPSHOT_NAME_LEN,
};
use crate::snapshot::{field as sfield, SnapshotFixed};
use luks_core::io::BlockIo;

/// Bytes of extra data QEMU 10 writes: the 64-bit VM state size, the
/// virtual disk size and the instruction count.
const EXTRA_V10: u32 = 24;

/// One snapshot table entry as the writer keeps it (unknown extra data
/// preserved byte for byte when the table is rewritten).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Fixed fields and known extra data.
    pub fixed: SnapshotFixed,
    /// The extra data, raw.
    pub extra: Vec<u8>,
    /// Id (QEMU writes decimal numbers).
    pub id: Vec<u8>,
    /// Name.
    pub name: Vec<u8>,
}

impl SnapshotEntry {
    /// The entry's bytes, padded to 8.
    fn emit(&self) -> Vec<u8> {
        let mut fixed = [0u8; sfield::FIXED_LEN];
        self.fixed.emit(&mut fixed);
        let mut out = fixed.to_vec();
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        out
    }

    /// Whether `key` names this entry by id or by name.
    fn is_named(&self, key: &[u8], by_id: bool) -> bool {
        if by_id {
            self.id == key
        } else {
            self.name == key
        }
    }
}

/// The number `strtoul(text, NULL, 10)` gives for a snapshot id: leading
/// white space and a `+` skipped, then decimal digits, saturating at
/// `u64::MAX`, negated (mod 2^64) after a `-`; 0 when there are none.
fn leading_decimal(text: &[u8]) -> u64 {
    let mut rest = text;
    while let Some((&c, tail)) = rest.split_first() {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            break;
        }
        rest = tail;
    }
    let negative = rest.first() == Some(&b'-');
    if let Some((b'+' | b'-', tail)) = rest.split_first() {
        rest = tail;
    }
    let mut v: Option<u64> = Some(0);
    for &c in rest.iter().take_while(|c| c.is_ascii_digit()) {
        v = v
            .and_then(|v| v.checked_mul(10))
            .and_then(|v| v.checked_add(u64::from(c.wrapping_sub(b'0'))));
    }
    match v {
        None => u64::MAX,
        Some(v) if negative => v.wrapping_neg(),
        Some(v) => v,
    }
}

/// What [`Qcow2Writer::create_snapshot`] records besides the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSnapshot<'a> {
    /// The snapshot's name (tag).
    pub name: &'a str,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock (0 for a disk-only snapshot).
    pub vm_clock_nsec: u64,
    /// Instruction count (qemu-img records 0).
    pub icount: u64,
}

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    /// The snapshot table, in order.
    pub fn snapshots(&mut self) -> Result<Vec<SnapshotEntry>, Error<D::Error>> {
        self.hdr.check_snapshot_limit()?;
        let n = self.hdr.nb_snapshots;
        let mut out = Vec::new();
        let mut off = self.hdr.snapshots_offset;
        let table = self.hdr.snapshots_offset;
        for index in 0..n {
            // The entry as the reader parses it; then its variable part whole.
            let mut fixed = crate::image::read_snapshot_entry(
                &mut self.dev,
                &mut [0u8; 512],
                table,
                index,
                off,
            )?
            .fixed;
            // Bounded by MAX_SNAPSHOT_EXTRA and 16-bit lengths; the table
            // by MAX_SNAPSHOT_TABLE_BYTES.
            let var = usize::try_from(fixed.extra_size)
                .unwrap_or(usize::MAX)
                .saturating_add(usize::from(fixed.id_len))
                .saturating_add(usize::from(fixed.name_len));
            let mut rest = vec![0u8; var];
            let at = off.saturating_add(sfield::FIXED_LEN as u64);
            self.read_dev(at, &mut rest, Structure::SnapshotTable)?;
            let e = usize::try_from(fixed.extra_size).unwrap_or(0);
            let i = e.saturating_add(usize::from(fixed.id_len));
            fixed.apply_extra(&rest[..e]);
            out.push(SnapshotEntry {
                fixed,
                extra: rest[..e].to_vec(),
                id: rest[e..i].to_vec(),
                name: rest[i..].to_vec(),
            });
            off = off
                .checked_add(fixed.entry_len())
                .ok_or_else(|| overflow(Structure::SnapshotTable, off))?;
        }
        Ok(out)
    }

    /// Index of the snapshot with id `key`, else the first with that name
    /// (qemu-img's lookup).
    fn find(list: &[SnapshotEntry], key: &str) -> Result<usize, Error<D::Error>> {
        let k = key.as_bytes();
        list.iter()
            .position(|s| s.is_named(k, true))
            .or_else(|| list.iter().position(|s| s.is_named(k, false)))
            .ok_or(Error::NoSuchSnapshot)
    }

    /// Takes a snapshot of the active image named `s.name`, with the next
    /// free numeric id, and returns its entry.
    pub fn create_snapshot(
        &mut self,
        s: &NewSnapshot<'_>,
    ) -> Result<SnapshotEntry, Error<D::Error>> {
        self.settle()?;
        if self.hdr.refcount_order == 0 {
            return Err(Error::Unsupported(Unsupported::SnapshotRefcountWidth));
        }
        if self.hdr.has_data_file() {
            return Err(Error::Unsupported(Unsupported::SnapshotWithDataFile));
        }
        let mut list = self.snapshots()?;
        if list.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::Limit {
                structure: Structure::SnapshotTable,
                offset: self.hdr.snapshots_offset,
                limit: Limit::Snapshots,
                value: list.len() as u64,
                max: u64::from(MAX_SNAPSHOTS),
            });
        }
        Error::check_limit(
            Structure::SnapshotTable,
            self.hdr.snapshots_offset,
            Limit::SnapshotNameLength,
            s.name.len() as u64,
            MAX_SNAPSHOT_NAME_LEN as u64,
        )?;
        // The next id: one past the largest id read as C's `strtoul` reads
        // it, as QEMU does (leading digits, saturating; past 2^64 - 1 the
        // next id wraps to 0).
        let next = list
            .iter()
            .map(|e| leading_decimal(&e.id))
            .max()
            .unwrap_or(0)
            .wrapping_add(1);
        let mut id = Vec::new();
        push_decimal(&mut id, next);
        debug_assert!(id.len() <= MAX_SNAPSHOT_ID_LEN);

        // 1. COPIED off everywhere in the active tree, 2. refcounts up.
        // The copy is the active L1 as it stood, COPIED flags included,
        // byte for byte what QEMU writes (flags in a snapshot's tables
        // mean nothing; `apply` clears them).
        let l1 = self.l1.clone();
        self.check_room(&l1)?;
        self.set_active_copied(false)?;
        self.barrier()?;
        self.adjust_tree(&l1, true)?;
        self.barrier()?;
        // 3. The snapshot's copy of the L1 table.
        let l1_bytes = (l1.len() as u64).saturating_mul(8);
        let l1_off = if l1.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(l1_bytes.div_ceil(self.cs()))?.get();
            let n = l1.len();
            self.write_words(off, &l1, 0, n.saturating_sub(1), Structure::SnapshotL1Table)?;
            self.barrier()?;
            off
        };
        let fixed = SnapshotFixed {
            l1_offset: l1_off,
            l1_size: self.hdr.l1_size,
            id_len: u16::try_from(id.len()).unwrap_or(0),
            name_len: u16::try_from(s.name.len()).unwrap_or(u16::MAX),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            vm_state_size: 0,
            extra_size: EXTRA_V10,
            disk_size: Some(self.hdr.size),
            icount: Some(s.icount),
        };
        let mut extra = [0u8; sfield::FIXED_LEN + EXTRA_V10 as usize];
        fixed.emit(&mut extra);
        let entry = SnapshotEntry {
            fixed,
            extra: extra[sfield::FIXED_LEN..].to_vec(),
            id,
            name: s.name.as_bytes().to_vec(),
        };
        list.push(entry.clone());
        // 4-6. New table, header switch, old table freed.
        self.replace_table(&list)?;
        Ok(entry)
    }

    /// Reverts the active image to snapshot `key` (id, else name), at the
    /// virtual size the snapshot was taken at. The snapshot stays; what
    /// only the old active state referenced is freed.
    pub fn apply_snapshot(&mut self, key: &str) -> Result<(), Error<D::Error>> {
        self.settle()?;
        let list = self.snapshots()?;
        let sn = list
            .get(Self::find(&list, key)?)
            .ok_or(Error::NoSuchSnapshot)?
            .clone();
        let size = sn.fixed.disk_size.unwrap_or(self.hdr.size);
        let current = self.hdr.size;
        let mut new_l1 = self.read_snapshot_l1(&sn)?;
        self.check_room(&new_l1)?;
        // A snapshot taken at a larger size: grow first (the L1 table
        // with it), as QEMU does.
        if size > current {
            self.resize(size).map_err(|e| match e {
                super::ResizeError::Qcow2(e) => e,
                _ => Error::Unsupported(Unsupported::SnapshotSize {
                    snapshot: size,
                    current,
                }),
            })?;
        }
        if new_l1.len() > self.l1.len() {
            return Err(Error::Unsupported(Unsupported::SnapshotSize {
                snapshot: size,
                current,
            }));
        }
        new_l1.resize(self.l1.len(), 0);
        // The snapshot's tree gains the active reference first.
        self.adjust_tree(&new_l1, true)?;
        self.barrier()?;
        // Clusters the snapshot also holds are shared: no COPIED.
        for e in &mut new_l1 {
            *e &= !COPIED;
        }
        let old_l1 = core::mem::replace(&mut self.l1, new_l1);
        self.write_l1(0, self.l1.len().saturating_sub(1))?;
        self.barrier()?;
        self.adjust_tree(&old_l1, false)?;
        self.barrier()?;
        self.set_active_copied(true)?;
        self.barrier()?;
        // A snapshot taken at a smaller size: the disk is that size again
        // (nothing past it is mapped any more).
        if size < self.hdr.size {
            self.write_dev(
                field::SIZE.start as u64,
                &size.to_be_bytes(),
                Structure::Header,
            )?;
            self.barrier()?;
            self.hdr.size = size;
        }
        Ok(())
    }

    /// Deletes snapshot `key` (id, else name), releasing what only it
    /// referenced.
    pub fn delete_snapshot(&mut self, key: &str) -> Result<(), Error<D::Error>> {
        let list = self.snapshots()?;
        let i = Self::find(&list, key)?;
        self.delete_snapshot_at(i)
    }

    /// Deletes the snapshot at table index `index` (of [`Self::snapshots`]).
    pub fn delete_snapshot_at(&mut self, index: usize) -> Result<(), Error<D::Error>> {
        self.settle()?;
        let mut list = self.snapshots()?;
        if index >= list.len() {
            return Err(Error::NoSuchSnapshot);
        }
        let sn = list.remove(index);
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        self.replace_table(&list)?;
        self.adjust_tree(&sn_l1, false)?;
        self.barrier()?;
        let bytes = u64::from(sn.fixed.l1_size).saturating_mul(8);
        if sn.fixed.l1_offset != 0 && bytes != 0 {
            let len = bytes.div_ceil(self.cs()).saturating_mul(self.cs());
            self.free_range(sn.fixed.l1_offset, len)?;
            self.barrier()?;
        }
        self.set_active_copied(true)?;
        self.barrier()
    }

    /// Reads a snapshot's L1 table (COPIED flags as stored).
    pub(super) fn read_snapshot_l1(
        &mut self,
        sn: &SnapshotEntry,
    ) -> Result<Vec<u64>, Error<D::Error>> {
        let n = sn.fixed.l1_size;
        Error::check_limit(
            Structure::SnapshotL1Table,
            sn.fixed.l1_offset,
            Limit::L1Entries,
            u64::from(n),
            u64::from(crate::limits::MAX_L1_ENTRIES),
        )?;
        if n != 0 && !sn.fixed.l1_offset.is_multiple_of(self.cs()) {
            return Err(overflow(Structure::SnapshotL1Table, sn.fixed.l1_offset));
        }
        self.read_u64s(
            sn.fixed.l1_offset,
            usize::try_from(n).unwrap_or(0),
            Structure::SnapshotL1Table,
        )
    }

    /// Adds (`up`) or removes one reference from every L2 table `l1` names
    /// and every host cluster those tables name (compressed clusters: each
    /// cluster their sectors touch). Not flushed.
    fn adjust_tree(&mut self, l1: &[u64], up: bool) -> Result<(), Error<D::Error>> {
        let mut ranges = Vec::new();
        self.walk_tree(l1, &mut |off, len| ranges.push((off, len)))?;
        for (off, len) in ranges {
            self.adjust_range(off, len, up)?;
        }
        Ok(())
    }

    /// Refuses (before anything changes) a tree whose clusters cannot
    /// take one more reference each within the refcount width: with 2-bit
    /// refcounts a host cluster packed with three compressed clusters is
    /// already at the limit.
    fn check_room(&mut self, l1: &[u64]) -> Result<(), Error<D::Error>> {
        let mut adds: BTreeMap<u64, u64> = BTreeMap::new();
        let cb = self.cb();
        self.walk_tree(l1, &mut |off, len| {
            let last = off.saturating_add(len).saturating_sub(1) >> cb;
            for c in (off >> cb)..=last {
                let n = adds.entry(c).or_insert(0);
                *n = n.saturating_add(1);
            }
        })?;
        let max = self.max_refcount();
        for (c, n) in adds {
            let v = self.refcount(c)?;
            if v.saturating_add(n) > max {
                return Err(Error::Limit {
                    structure: Structure::RefcountBlock,
                    offset: c << cb,
                    limit: Limit::RefcountValue,
                    value: v.saturating_add(n),
                    max,
                });
            }
        }
        Ok(())
    }

    /// The largest refcount the image's width holds.
    fn max_refcount(&self) -> u64 {
        match self.hdr.refcount_order {
            o if o >= 6 => u64::MAX,
            o => (1u64 << (1u32 << o)).saturating_sub(1),
        }
    }

    /// Calls `each(offset, length)` for every L2 table `l1` names and
    /// every host range those tables name.
    fn walk_tree(
        &mut self,
        l1: &[u64],
        each: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Error<D::Error>> {
        let cb = self.cb();
        let ext = self.extended();
        let w = self.l2_words();
        let cs = self.cs();
        for &l1e in l1 {
            let l2 = entry::l1_l2_offset(l1e);
            if l2 == 0 {
                continue;
            }
            let t = self.l2_table(l2)?;
            for i in (0..t.len()).step_by(w) {
                let e = t[i];
                match L2Entry::decode(e, cb, ext, false) {
                    L2Entry::Compressed(d) => {
                        let (off, len) = Self::compressed_range(&d);
                        each(off, len);
                    }
                    _ if e & OFFSET_MASK != 0 => each(e & OFFSET_MASK, cs),
                    _ => {}
                }
            }
            each(l2, cs);
        }
        Ok(())
    }

    /// One reference more or less on each cluster of `[off, off + len)`.
    fn adjust_range(&mut self, off: u64, len: u64, up: bool) -> Result<(), Error<D::Error>> {
        if !up {
            return self.free_range(off, len);
        }
        let cb = self.cb();
        let first = off >> cb;
        let last = off.saturating_add(len).saturating_sub(1) >> cb;
        let max = self.max_refcount();
        for c in first..=last {
            let v = self.refcount(c)?;
            if v == 0 || v >= max {
                return Err(Error::Limit {
                    structure: Structure::RefcountBlock,
                    offset: c << cb,
                    limit: Limit::RefcountValue,
                    value: v.saturating_add(1),
                    max,
                });
            }
            self.set_refcount_existing(c, v.saturating_add(1))?;
        }
        Ok(())
    }

    /// Sets COPIED in the active L1 and L2 tables exactly where the
    /// cluster's refcount is 1 (`exact`), or clears it everywhere (before
    /// a snapshot shares the whole tree). Tables a snapshot shares are
    /// left alone: their entries are shared too and carry no COPIED.
    /// Changed sectors are written, not flushed.
    fn set_active_copied(&mut self, exact: bool) -> Result<(), Error<D::Error>> {
        let cb = self.cb();
        let mut l1 = core::mem::take(&mut self.l1);
        let mut l1_changed = false;
        let r = (|| {
            for e in l1.iter_mut() {
                let l2 = entry::l1_l2_offset(*e);
                if l2 == 0 {
                    continue;
                }
                let own = self.refcount(l2 >> cb)? == 1;
                if own {
                    let mut t = self.l2_table(l2)?.clone();
                    let changed = if exact {
                        self.recompute_copied(&mut t)?
                    } else {
                        let mut c = false;
                        for i in (0..t.len()).step_by(self.l2_words()) {
                            if t[i] & COPIED != 0 {
                                t[i] &= !COPIED;
                                c = true;
                            }
                        }
                        c
                    };
                    if changed {
                        let n = t.len();
                        self.write_words(l2, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
                        self.l2_cache.insert(l2, t);
                    }
                }
                let want = if exact && own {
                    *e | COPIED
                } else {
                    *e & !COPIED
                };
                if want != *e {
                    *e = want;
                    l1_changed = true;
                }
            }
            Ok(())
        })();
        self.l1 = l1;
        if r.is_ok() && l1_changed {
            return self.write_l1(0, self.l1.len().saturating_sub(1));
        }
        r
    }

    /// Writes `list` as the new snapshot table in new clusters, switches
    /// the header to it (count and offset in one write), then frees the
    /// old table. Flushed between the steps.
    pub(super) fn replace_table(&mut self, list: &[SnapshotEntry]) -> Result<(), Error<D::Error>> {
        let old_off = self.hdr.snapshots_offset;
        let old_len = self.table_len()?;
        let mut bytes = Vec::new();
        for e in list {
            bytes.extend_from_slice(&e.emit());
        }
        let new_off = if bytes.is_empty() {
            0
        } else {
            let off = self
                .alloc_clusters((bytes.len() as u64).div_ceil(self.cs()))?
                .get();
            bytes.resize(bytes.len().next_multiple_of(SECTOR_BYTES), 0);
            self.write_dev(off, &bytes, Structure::SnapshotTable)?;
            self.barrier()?;
            off
        };
        let nb = u32::try_from(list.len()).unwrap_or(u32::MAX);
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&nb.to_be_bytes());
        h[4..].copy_from_slice(&new_off.to_be_bytes());
        self.write_dev(field::NB_SNAPSHOTS.start as u64, &h, Structure::Header)?;
        self.barrier()?;
        self.hdr.nb_snapshots = nb;
        self.hdr.snapshots_offset = new_off;
        if old_len != 0 && old_off != 0 {
            let len = old_len.div_ceil(self.cs()).saturating_mul(self.cs());
            self.free_range(old_off, len)?;
            self.barrier()?;
        }
        Ok(())
    }

    /// Bytes of the current snapshot table.
    fn table_len(&mut self) -> Result<u64, Error<D::Error>> {
        Ok(self
            .snapshots()?
            .iter()
            .map(|e| e.fixed.entry_len())
            .fold(0u64, u64::saturating_add))
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i = i.saturating_sub(1);
        digits[i] = b'0'.saturating_add(u8::try_from(v % 10).unwrap_or(0));
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Keeps the extra-data limit in view for readers of this module: the
/// entries written here carry [`EXTRA_V10`] bytes, within QEMU's limit.
const _: () = assert!(EXTRA_V10 <= MAX_SNAPSHOT_EXTRA);
