//! The snapshot table: entries, ids and names read on demand, lookup and
//! selecting a snapshot's L1 table.

use super::*;

/// Reads snapshot table entry `index` at image offset `at` (the table
/// starting at `table_offset`): its fixed part, the known extra data and
/// the first bytes of its id and name, refusing an entry that ends past
/// the table's size limit. What the reader and the checker both use.
pub(crate) fn read_snapshot_entry<D: BlockIo>(
    dev: &mut D,
    bounce: &mut [u8; 512],
    table_offset: u64,
    index: u32,
    at: u64,
) -> Result<SnapshotInfo, Error<D::Error>> {
    let mut fixed = [0u8; snap_field::FIXED_LEN];
    read_unaligned(dev, bounce, at, &mut fixed, Structure::SnapshotTable)?;
    let mut f = SnapshotFixed::parse(&fixed, at)?;
    let mut extra = [0u8; 24];
    let ne = (f.extra_size as usize).min(extra.len());
    let extra_at = at.saturating_add(snap_field::FIXED_LEN as u64);
    read_unaligned(
        dev,
        bounce,
        extra_at,
        &mut extra[..ne],
        Structure::SnapshotTable,
    )?;
    f.apply_extra(&extra[..ne]);
    let id_at = extra_at.saturating_add(u64::from(f.extra_size));
    let mut id = heapless::Vec::new();
    let mut name = heapless::Vec::new();
    let bad = || Error::corrupt(Structure::SnapshotTable, at, Problem::Overflow);
    // The first bytes of each, as many as fit inline; the rest is read
    // on demand (`read_snapshot_text`, `snapshot_text_is`).
    id.resize(usize::from(f.id_len).min(id.capacity()), 0)
        .map_err(|_| bad())?;
    name.resize(usize::from(f.name_len).min(name.capacity()), 0)
        .map_err(|_| bad())?;
    read_unaligned(dev, bounce, id_at, &mut id, Structure::SnapshotTable)?;
    let name_at = id_at.saturating_add(u64::from(f.id_len));
    read_unaligned(dev, bounce, name_at, &mut name, Structure::SnapshotTable)?;
    crate::snapshot::check_table_end(table_offset, at, f.unpadded_len())?;
    Ok(SnapshotInfo {
        index,
        entry_offset: at,
        fixed: f,
        id,
        name,
    })
}

/// Image offset and length of a snapshot's id (`name` false) or name.
pub(super) fn snapshot_text_span(snap: &SnapshotInfo, name: bool) -> (u64, usize) {
    let id_at = snap.id_offset();
    if name {
        (
            id_at.saturating_add(u64::from(snap.fixed.id_len)),
            usize::from(snap.fixed.name_len),
        )
    } else {
        (id_at, usize::from(snap.fixed.id_len))
    }
}

impl<D, S, B, F, K> Qcow2<D, S, B, F, K>
where
    D: BlockIo,
    S: AsMut<[u8]>,
    K: Decryptor,
    B: BlockIo,
    B::Error: LayerError<D::Error>,
    F: BlockIo,
    F::Error: LayerError<D::Error>,
{
    /// Number of internal snapshots.
    pub fn snapshot_count(&self) -> u32 {
        self.st.info.header.nb_snapshots
    }

    /// Reads the snapshot entry at `offset`, the `index`th of the table.
    pub(super) fn read_snapshot_at(
        &mut self,
        index: u32,
        offset: u64,
    ) -> Result<SnapshotInfo, Error<D::Error>> {
        let table = self.st.info.header.snapshots_offset;
        read_snapshot_entry(&mut self.dev, &mut self.st.bounce, table, index, offset)
    }

    /// Reads the id (`name` false) or name (`name` true) of `snap` into
    /// the start of `buf`, as much as fits, and returns the whole length
    /// (at most 65,535): a `buf` of that many bytes gets it all.
    pub fn read_snapshot_text(
        &mut self,
        snap: &SnapshotInfo,
        name: bool,
        buf: &mut [u8],
    ) -> Result<usize, Error<D::Error>> {
        let (at, len) = snapshot_text_span(snap, name);
        let n = len.min(buf.len());
        let dst = buf.get_mut(..n).unwrap_or_default();
        read_unaligned(
            &mut self.dev,
            &mut self.st.bounce,
            at,
            dst,
            Structure::SnapshotTable,
        )?;
        Ok(len)
    }

    /// Whether the whole id (`name` false) or name (`name` true) of `snap`
    /// is `key`, compared piecewise against the table without allocating.
    pub fn snapshot_text_is(
        &mut self,
        snap: &SnapshotInfo,
        name: bool,
        key: &[u8],
    ) -> Result<bool, Error<D::Error>> {
        let (mut at, len) = snapshot_text_span(snap, name);
        if len != key.len() {
            return Ok(false);
        }
        let kept: &[u8] = if name { &snap.name } else { &snap.id };
        let (head, mut rest) = key.split_at(kept.len().min(len));
        if head != kept {
            return Ok(false);
        }
        at = at.saturating_add(head.len() as u64);
        let mut chunk = [0u8; 256];
        while !rest.is_empty() {
            let n = rest.len().min(chunk.len());
            let (want, tail) = rest.split_at(n);
            let got = chunk.get_mut(..n).unwrap_or_default();
            read_unaligned(
                &mut self.dev,
                &mut self.st.bounce,
                at,
                got,
                Structure::SnapshotTable,
            )?;
            if got != want {
                return Ok(false);
            }
            at = at.saturating_add(n as u64);
            rest = tail;
        }
        Ok(true)
    }

    /// The first snapshot in table order whose whole id (`by_name` false)
    /// or name (`by_name` true) is `key`.
    pub fn find_snapshot_by(
        &mut self,
        key: &[u8],
        by_name: bool,
    ) -> Result<Option<SnapshotInfo>, Error<D::Error>> {
        let mut off = self.st.info.header.snapshots_offset;
        for i in 0..self.snapshot_count() {
            let s = self.read_snapshot_at(i, off)?;
            off = off.saturating_add(s.fixed.entry_len());
            if self.snapshot_text_is(&s, by_name, key)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// Calls `each` with every snapshot in table order, without allocating.
    /// Stops early (returning `Ok(Some(..))`) when `each` returns `true`
    /// for a snapshot, which is then returned.
    pub fn for_each_snapshot(
        &mut self,
        mut each: impl FnMut(&SnapshotInfo) -> bool,
    ) -> Result<Option<SnapshotInfo>, Error<D::Error>> {
        let mut off = self.st.info.header.snapshots_offset;
        for i in 0..self.snapshot_count() {
            let s = self.read_snapshot_at(i, off)?;
            off = off.saturating_add(s.fixed.entry_len());
            if each(&s) {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// The snapshot at table index `index`.
    pub fn snapshot(&mut self, index: u32) -> Result<SnapshotInfo, Error<D::Error>> {
        self.for_each_snapshot(|s| s.index == index)?
            .ok_or(Error::NoSuchSnapshot)
    }

    /// Finds a snapshot by id or, failing that, by name (as `qemu-img`
    /// does for `snapshot.name` / `-l`).
    pub fn find_snapshot(&mut self, id_or_name: &str) -> Result<SnapshotInfo, Error<D::Error>> {
        let key = id_or_name.as_bytes();
        if let Some(s) = self.find_snapshot_by(key, false)? {
            return Ok(s);
        }
        self.find_snapshot_by(key, true)?
            .ok_or(Error::NoSuchSnapshot)
    }

    /// Reads the disk as of `snap` from now on (read-only).
    pub fn select_snapshot(&mut self, snap: &SnapshotInfo) -> Result<(), Error<D::Error>> {
        let hdr = self.st.info.header;
        let size = snap.fixed.disk_size.unwrap_or(hdr.size);
        check_l1(
            &hdr,
            snap.fixed.l1_offset,
            snap.fixed.l1_size,
            size,
            Structure::SnapshotTable,
            snap.entry_offset,
        )?;
        self.st.l1_offset = snap.fixed.l1_offset;
        self.st.l1_size = snap.fixed.l1_size;
        self.st.size = sector_floor(size);
        self.st.snapshot = Some(snap.index);
        Ok(())
    }

    /// Goes back to reading the current disk state.
    pub fn select_current(&mut self) {
        let h = self.st.info.header;
        self.st.l1_offset = h.l1_table_offset;
        self.st.l1_size = h.l1_size;
        self.st.size = sector_floor(h.size);
        self.st.snapshot = None;
    }
}
