//! L2 updates: the L2 table cache, looking entries up through the table
//! layer, allocating and unsharing tables, setting entries, discard and
//! unmap.

use super::*;

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    pub(super) fn l2_table(&mut self, off: u64) -> Result<&mut Vec<u64>, Error<D::Error>> {
        if !self.l2_cache.contains_key(&off) {
            if self.l2_cache.len() >= MAX_CACHED_TABLES {
                // Tables holding deferred entries stay.
                let pending = &self.l2_pending;
                self.l2_cache.retain(|off, _| pending.contains_key(off));
            }
            let n = usize::try_from(self.cs() >> 3).unwrap_or(0);
            let t = self.read_u64s(off, n, Structure::L2Table)?;
            self.l2_cache.insert(off, t);
        }
        self.l2_cache
            .get_mut(&off)
            .ok_or_else(|| overflow(Structure::L2Table, off))
    }

    pub(super) fn split(&self, g: u64) -> (usize, usize) {
        let slot = self.l2g().locate(GuestOffset::new(g));
        (
            usize::try_from(slot.l1_index).unwrap_or(usize::MAX),
            usize::try_from(slot.l2_index).unwrap_or(0),
        )
    }

    /// The L2 entry (and bitmap) for guest offset `g`; `None` for the L2
    /// table when the L1 entry is empty.
    pub(super) fn get_entry(&mut self, g: u64) -> Result<(Option<u64>, u64, u64), Error<D::Error>> {
        let (l1i, l2i) = self.split(g);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| overflow(Structure::L1Table, self.hdr.l1_table_offset))?;
        let l2off = entry::l1_l2_offset(l1e);
        if l2off == 0 {
            return Ok((None, 0, 0));
        }
        let w = self.l2_words();
        let t = self.l2_table(l2off)?;
        let i = l2i.saturating_mul(w);
        let e = t.get(i).copied().unwrap_or(0);
        let bm = if w == 2 {
            t.get(i.saturating_add(1)).copied().unwrap_or(0)
        } else {
            0
        };
        Ok((Some(l2off), e, bm))
    }

    /// The L2 table for `g`, ready to be changed: allocated (zeroed, then
    /// the L1 entry) if the L1 entry is empty, copied first if a snapshot
    /// shares it.
    pub(super) fn ensure_l2(&mut self, g: u64) -> Result<u64, Error<D::Error>> {
        let (l1i, _) = self.split(g);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| overflow(Structure::L1Table, self.hdr.l1_table_offset))?;
        let cur = entry::l1_l2_offset(l1e);
        if cur != 0 {
            if l1e & COPIED != 0 {
                return Ok(cur);
            }
            return self.unshare_l2(l1i, cur);
        }
        let off = self.alloc_clusters(1)?.get();
        let n = usize::try_from(self.cs() >> 3).unwrap_or(0);
        let t = vec![0u64; n];
        self.write_words(off, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
        self.l2_cache.insert(off, t);
        self.barrier()?;
        if let Some(e) = self.l1.get_mut(l1i) {
            *e = off | COPIED;
        }
        self.write_l1(l1i, l1i)?;
        self.barrier()?;
        Ok(off)
    }

    /// Makes the L2 table at `old` (L1 index `l1i`, no COPIED flag) the
    /// active image's own. With refcount 1 only the flags were missing:
    /// they are set (the entries' too). Otherwise a snapshot shares the table: it is copied to a new
    /// cluster (entries keep their clusters, whose refcounts already count
    /// both paths; COPIED set where a cluster's refcount is 1), flushed,
    /// the L1 entry switched to it (flushed), and only then the old table
    /// loses the active image's reference.
    pub(super) fn unshare_l2(&mut self, l1i: usize, old: u64) -> Result<u64, Error<D::Error>> {
        let shared = self.refcount(old >> self.cb())? > 1;
        let target = if shared {
            let mut t = self.l2_table(old)?.clone();
            self.recompute_copied(&mut t)?;
            let new = self.alloc_clusters(1)?.get();
            let n = t.len();
            self.write_words(new, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
            self.l2_cache.insert(new, t);
            self.barrier()?;
            new
        } else {
            // Ours alone, only the flags were stale (another writer, or a
            // crash inside a snapshot deletion): fix the entries' flags too,
            // so owned clusters are written in place again.
            let mut t = self.l2_table(old)?.clone();
            if self.recompute_copied(&mut t)? {
                let n = t.len();
                self.write_words(old, &t, 0, n.saturating_sub(1), Structure::L2Table)?;
                self.l2_cache.insert(old, t);
                self.barrier()?;
            }
            old
        };
        if let Some(e) = self.l1.get_mut(l1i) {
            *e = target | COPIED;
        }
        self.write_l1(l1i, l1i)?;
        self.barrier()?;
        if shared {
            self.free_range(old, self.cs())?;
            self.barrier()?;
        }
        Ok(target)
    }

    /// Sets COPIED on exactly the entries of L2 table `t` whose host
    /// cluster has refcount 1 (compressed entries never carry it).
    pub(crate) fn recompute_copied(&mut self, t: &mut [u64]) -> Result<bool, Error<D::Error>> {
        let w = self.l2_words();
        let cb = self.cb();
        let mut changed = false;
        for i in (0..t.len()).step_by(w) {
            let e = t[i];
            let host = e & OFFSET_MASK;
            if e & entry::COMPRESSED != 0 || host == 0 {
                continue;
            }
            let want = if self.refcount(host >> cb)? == 1 {
                e | COPIED
            } else {
                e & !COPIED
            };
            if want != e {
                t[i] = want;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Writes the L2 entry for `g` (the table must exist). Not flushed.
    pub(super) fn set_entry(&mut self, g: u64, e: u64, bm: u64) -> Result<(), Error<D::Error>> {
        let l2off = self.ensure_l2(g)?;
        let (_, l2i) = self.split(g);
        let w = self.l2_words();
        let i = l2i.saturating_mul(w);
        let t = self.l2_table(l2off)?;
        if let Some(x) = t.get_mut(i) {
            *x = e;
        }
        if w == 2 {
            if let Some(x) = t.get_mut(i.saturating_add(1)) {
                *x = bm;
            }
        }
        let t = self.l2_cache.remove(&l2off).unwrap_or_default();
        let r = self.write_words(
            l2off,
            &t,
            i,
            i.saturating_add(w).saturating_sub(1),
            Structure::L2Table,
        );
        self.l2_cache.insert(l2off, t);
        r
    }

    /// Discards whole clusters in `[g, g + len)` (partial clusters are left
    /// alone): their host clusters are freed; on v3 they then read as zero
    /// (zero flag), on v2 they fall through to the backing file or zero.
    /// With a raw external data file the mapping stays and the clusters
    /// are zeroed instead.
    pub fn discard(&mut self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_writable(g, len)?;
        self.settle()?;
        let cs = self.cs();
        let (mut at, end) = self.whole_clusters(g, len);
        while at < end {
            if self.df_raw() {
                self.zero_cluster(at)?;
            } else if let (Some(_), e, bm) = self.get_entry(at)? {
                let (ne, nbm) = match (self.hdr.version >= 3, self.extended()) {
                    (true, true) => (0, ALL_ZERO),
                    (true, false) => (ZERO, 0),
                    (false, _) => (0, 0),
                };
                if ne != e || nbm != bm {
                    self.switch_entry(at, (ne, nbm), self.decode(e), e)?;
                }
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// Takes whole clusters in `[g, g + len)` out of this image, so that
    /// they read from the backing file again (partial clusters are left
    /// alone). This is `qemu-img commit` emptying the committed image.
    ///
    /// Batched per L2 table: the table's cleared entries are written and
    /// flushed once, then the old host clusters' refcounts dropped and
    /// flushed once (rule 3 holds for the batch: no refcount falls while
    /// an entry on disk still names the cluster), then the host clusters
    /// left unreferenced are discarded on the device (holes punched on
    /// files). An L2 table shared with a snapshot is unshared by the
    /// first change, cluster by cluster as before.
    pub fn unmap(&mut self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_range(g, len)?;
        self.settle()?;
        let (at, end) = self.whole_clusters(g, len);
        self.unmap_clusters(at, end)
    }

    /// [`unmap`](Self::unmap) of the clusters `[at, end)` (cluster-aligned;
    /// `end` may pass the disk's end by a partial last cluster, which a
    /// shrink takes out too).
    pub(super) fn unmap_clusters(&mut self, mut at: u64, end: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        // Guest bytes one L2 table maps.
        let span = self.l2g().l1_span();
        while at < end {
            let (l1i, _) = self.split(at);
            let owned = self.l1.get(l1i).is_some_and(|e| e & COPIED != 0);
            let stop = (at.saturating_add(span) & !(span.wrapping_sub(1))).min(end);
            if owned && !self.df() {
                self.unmap_in_table(at, stop)?;
                at = stop;
                continue;
            }
            let (l2, e, bm) = self.get_entry(at)?;
            if l2.is_some() && (e != 0 || bm != 0) {
                let dec = L2Entry::decode(e, self.cb(), self.extended(), false);
                self.switch_entry(at, (0, 0), dec, e)?;
            }
            at = at.saturating_add(cs);
        }
        Ok(())
    }

    /// [`unmap`](Self::unmap) of the whole clusters `[at, stop)`, all under
    /// one L2 table this image owns alone.
    pub(super) fn unmap_in_table(&mut self, at: u64, stop: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let (l2, _, _) = self.get_entry(at)?;
        let Some(l2off) = l2 else {
            return Ok(());
        };
        let w = self.l2_words();
        let (_, i0) = self.split(at);
        let n = usize::try_from(stop.saturating_sub(at) >> self.cb()).unwrap_or(0);
        let (cb, ext) = (self.cb(), self.extended());
        let t = self.l2_table(l2off)?;
        let mut old = Vec::new();
        let (mut first, mut last) = (usize::MAX, 0usize);
        for k in 0..n {
            let i = i0.saturating_add(k).saturating_mul(w);
            let e = t.get(i).copied().unwrap_or(0);
            let bm = if w == 2 {
                t.get(i.saturating_add(1)).copied().unwrap_or(0)
            } else {
                0
            };
            if e == 0 && bm == 0 {
                continue;
            }
            if let Some(x) = t.get_mut(i) {
                *x = 0;
            }
            if w == 2 {
                if let Some(x) = t.get_mut(i.saturating_add(1)) {
                    *x = 0;
                }
            }
            first = first.min(i);
            last = last.max(i.saturating_add(w).saturating_sub(1));
            old.push((L2Entry::decode(e, cb, ext, false), e));
        }
        if old.is_empty() {
            return Ok(());
        }
        let t = self.l2_cache.remove(&l2off).unwrap_or_default();
        let r = self.write_words(l2off, &t, first, last, Structure::L2Table);
        self.l2_cache.insert(l2off, t);
        r?;
        // The cleared entries durable before any refcount drops.
        self.barrier()?;
        // Plain clusters lose their references in one batch (a refcount
        // write per block, not per cluster); the rest one by one.
        let mut plain = Vec::with_capacity(old.len());
        for &(dec, e) in &old {
            match dec {
                L2Entry::Normal { host } | L2Entry::Zero { host } if host != 0 => {
                    plain.push(host >> cb);
                }
                _ => self.release(dec, e)?,
            }
        }
        self.free_clusters(&mut plain)?;
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for &(dec, e) in &old {
            let host = match dec {
                L2Entry::Normal { host } | L2Entry::Zero { host } => host,
                L2Entry::Unallocated => e & OFFSET_MASK,
                L2Entry::Compressed(_) => 0,
            };
            if host != 0 && self.refcount(host >> cb)? == 0 {
                match freed.last_mut() {
                    Some((s, l)) if s.saturating_add(*l) == host => *l = l.saturating_add(cs),
                    _ => freed.push((host, cs)),
                }
            }
        }
        self.barrier()?;
        // Unreferenced now (and durably so): give the space back.
        for (off, len) in freed {
            self.dev
                .discard(off, len)
                .map_err(|e| e.into_layer(Structure::DataCluster, off))?;
        }
        Ok(())
    }

    /// Drops the L2 tables this image owns alone (COPIED in L1) whose
    /// every entry is zero, as `qemu-img commit` leaves an emptied image
    /// without them: the L1 entries cleared (flushed), then the tables'
    /// references dropped (flushed) and their clusters punched. Tables a
    /// snapshot shares, and images with an external data file, are left
    /// as they are.
    pub fn drop_empty_tables(&mut self) -> Result<(), Error<D::Error>> {
        self.settle()?;
        if self.df() {
            return Ok(());
        }
        let (mut first, mut last) = (usize::MAX, 0usize);
        let mut tables = Vec::new();
        for l1i in 0..self.l1.len() {
            let e = self.l1.get(l1i).copied().unwrap_or(0);
            let off = entry::l1_l2_offset(e);
            if off == 0 || e & COPIED == 0 || self.l2_table(off)?.iter().any(|&x| x != 0) {
                continue;
            }
            if let Some(x) = self.l1.get_mut(l1i) {
                *x = 0;
            }
            (first, last) = (first.min(l1i), last.max(l1i));
            tables.push(off);
        }
        if tables.is_empty() {
            return Ok(());
        }
        self.write_l1(first, last)?;
        // No L1 entry names the tables (durably) before they are freed.
        self.barrier()?;
        let cb = self.cb();
        let mut clusters: Vec<u64> = tables.iter().map(|&off| off >> cb).collect();
        for off in &tables {
            self.l2_cache.remove(off);
        }
        self.free_clusters(&mut clusters)?;
        self.barrier()?;
        for off in tables {
            if self.refcount(off >> cb)? == 0 {
                self.dev
                    .discard(off, self.cs())
                    .map_err(|e| e.into_layer(Structure::L2Table, off))?;
            }
        }
        Ok(())
    }

    /// Shrinks the file to the end of the last cluster in use (refcount
    /// not 0), as `qemu-img commit` leaves an emptied image. Every
    /// refcount is durable at this point, so nothing referenced is cut.
    pub fn truncate_unused(&mut self) -> Result<(), Error<D::Error>> {
        self.settle()?;
        self.barrier()?;
        let end = self.highest_used()?.saturating_add(1) << self.cb();
        if end < self.file_len {
            let done = self
                .dev
                .set_size(end)
                .map_err(|e| e.into_layer(Structure::DataCluster, end))?;
            if done {
                self.file_len = end;
            }
        }
        Ok(())
    }

    /// The whole clusters inside `[g, g + len)`: the guest offsets of the
    /// first one and of the end of the last one (equal when there are none).
    pub(super) fn whole_clusters(&self, g: u64, len: u64) -> (u64, u64) {
        let cs = self.cs();
        let start = g.div_ceil(cs).saturating_mul(cs);
        let end = g.saturating_add(len) & !(cs.wrapping_sub(1));
        (start, end)
    }

    /// Points the L2 entry of guest cluster `at` at `(entry, bitmap)`,
    /// flushed, and only then drops the references of the old entry `e`
    /// (decoded as `dec`), flushed.
    pub(super) fn switch_entry(
        &mut self,
        at: u64,
        (entry, bitmap): (u64, u64),
        dec: L2Entry,
        e: u64,
    ) -> Result<(), Error<D::Error>> {
        self.set_entry(at, entry, bitmap)?;
        self.barrier()?;
        self.release(dec, e)?;
        self.barrier()
    }
}
