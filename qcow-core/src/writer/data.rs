//! Guest data: reads (own clusters, backing, compressed, data file),
//! writes with copy-on-write, zero writes.

use super::*;

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    pub(super) fn read_backing(&mut self, g: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        buf.fill(0);
        let Some(b) = self.backing.as_mut() else {
            return Ok(());
        };
        if g >= self.backing_size {
            return Ok(());
        }
        let n = usize::try_from(self.backing_size.saturating_sub(g))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        b.read_at(g, &mut buf[..n])
            .map_err(|e| e.into_layer(Structure::Backing, g))
    }

    pub(super) fn read_compressed(
        &mut self,
        d: &CompressedDescriptor,
        out: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let mut input = vec![0u8; usize::try_from(d.len()).unwrap_or(0)];
        self.read_dev(d.host, &mut input, Structure::CompressedCluster)?;
        crate::decompress::decompress(self.hdr.compression_type, &input, out)
            .map_err(|_| Error::corrupt(Structure::CompressedCluster, d.host, Problem::Decompress))
    }

    /// The whole guest cluster holding `g` as it reads now.
    pub(super) fn read_cluster(&mut self, g: u64) -> Result<Vec<u8>, Error<D::Error>> {
        let cs = self.cs();
        let base = g & !(cs.wrapping_sub(1));
        let mut out = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        let (_, e, bm) = self.get_entry(base)?;
        let ext = self.extended();
        let present = self.has_host(e);
        let dec = self.decode(e);
        match dec {
            L2Entry::Compressed(d) => self.read_compressed(&d, &mut out)?,
            L2Entry::Zero { .. } => {}
            L2Entry::Unallocated if !ext => self.read_backing(base, &mut out)?,
            L2Entry::Normal { host } if !ext => {
                self.read_data(host, base, &mut out)?;
            }
            L2Entry::Unallocated | L2Entry::Normal { .. } => {
                let host = e & OFFSET_MASK;
                let sc = usize::try_from(cs >> 5).unwrap_or(0);
                for (i, chunk) in out.chunks_mut(sc).enumerate() {
                    let i32_ = u32::try_from(i).unwrap_or(0);
                    let off = (i as u64).saturating_mul(cs >> 5);
                    match entry::subcluster(bm, i32_, present) {
                        entry::Subcluster::Allocated => self.read_data(
                            host.saturating_add(off),
                            base.saturating_add(off),
                            chunk,
                        )?,
                        entry::Subcluster::Zero => {}
                        entry::Subcluster::Unallocated => {
                            self.read_backing(base.saturating_add(off), chunk)?;
                        }
                        entry::Subcluster::Invalid => {
                            return Err(Error::corrupt(
                                Structure::L2Table,
                                0,
                                Problem::InvalidSubcluster { bitmap: bm },
                            ))
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads guest bytes (any offset and length inside the disk).
    pub fn read(&mut self, g: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.check_range(g, buf.len() as u64)?;
        if !key_fits(self.hdr.crypt_method, self.key.as_ref()) {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let at = g.saturating_add(done as u64);
            let o = usize::try_from(at & cs.wrapping_sub(1)).unwrap_or(0);
            let n = usize::try_from(cs)
                .unwrap_or(0)
                .saturating_sub(o)
                .min(buf.len().saturating_sub(done));
            let c = self.read_cluster(at)?;
            buf[done..done.saturating_add(n)].copy_from_slice(&c[o..o.saturating_add(n)]);
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// Guest writes need the key of an encrypted image and the data file
    /// of an image that has one.
    pub(super) fn check_writable(&self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        if !key_fits(self.hdr.crypt_method, self.key.as_ref()) {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        if self.df() && self.data.is_none() {
            return Err(Error::DataFileMissing);
        }
        self.check_range(g, len)
    }

    pub(super) fn check_range(&self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        match g.checked_add(len) {
            Some(end) if end <= self.hdr.size => Ok(()),
            _ => Err(Error::BadRequest {
                offset: g,
                len,
                size: self.hdr.size,
            }),
        }
    }

    /// Writes `data` at guest offset `g` (any offset and length inside the
    /// disk).
    ///
    /// Runs of whole clusters that are unallocated under existing L2 tables
    /// are written as contiguous host runs (one data write, and one
    /// encryption, per run), with the same clusters allocated as cluster by
    /// cluster.
    pub fn write(&mut self, g: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        self.write_payload(g, Payload::Shared(data))
    }

    /// [`Self::write`], leaving any bytes in `data` afterwards: on an
    /// encrypted image, runs of fresh clusters are encrypted in `data`
    /// itself instead of in a copy. The image bytes are those
    /// [`Self::write`] writes.
    pub fn write_consuming(&mut self, g: u64, data: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.write_payload(g, Payload::Scratch(data))
    }

    fn write_payload(&mut self, g: u64, mut data: Payload<'_>) -> Result<(), Error<D::Error>> {
        let total = data.len();
        self.check_writable(g, total as u64)?;
        let cs = self.cs();
        let csu = usize::try_from(cs).unwrap_or(usize::MAX);
        let mut done = 0usize;
        while done < total {
            let at = g.saturating_add(done as u64);
            let o = at & cs.wrapping_sub(1);
            let n = usize::try_from(cs.saturating_sub(o))
                .unwrap_or(usize::MAX)
                .min(total.saturating_sub(done));
            if o == 0 && n == csu {
                let whole = total.saturating_sub(done).checked_div(csu).unwrap_or(0);
                let k = self.fresh_run(at, whole)?;
                if k > 1 {
                    let len = k.saturating_mul(csu);
                    self.write_fresh_run(at, data.part(done, done.saturating_add(len)))?;
                    done = done.saturating_add(len);
                    continue;
                }
            }
            let piece = data.part(done, done.saturating_add(n));
            self.write_in_cluster(at, piece.bytes())?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    /// Prepares whole fresh clusters for a caller that writes their data
    /// itself (on another thread, through its own handle to the image
    /// file), for an image written without barriers
    /// ([`set_write_barriers`](Self::set_write_barriers)`(false)`) and
    /// with no external data file.
    ///
    /// When the whole clusters from `g` (cluster-aligned) that `data`
    /// covers start with a run [`write`](Self::write) would allocate at
    /// once (two or more clusters unallocated under existing L2 tables),
    /// allocates that run exactly as `write` does, encrypts its bytes in
    /// `data` in place for their host offsets (on encrypted images), and
    /// records its refcounts and L2 entries as `write` keeps them back.
    /// Returns the bytes of `data` taken (0: nothing was staged, write the
    /// next cluster with [`write`](Self::write)) and the host runs: `(host
    /// offset, offset in data, length)`.
    ///
    /// The caller must write each run's bytes of `data` at its host
    /// offset before the next [`flush`](Self::flush) or
    /// [`close`](Self::close), and must not read or write those guest
    /// clusters through this writer before that: the image then holds
    /// the bytes `write` would have written. Without barriers a crash may
    /// leave the image corrupt anyway; with barriers on (or a data file)
    /// nothing is staged.
    pub fn stage_fresh(
        &mut self,
        g: u64,
        data: &mut [u8],
    ) -> Result<(usize, StagedRuns), Error<D::Error>> {
        self.check_writable(g, data.len() as u64)?;
        let cs = self.cs();
        let csu = usize::try_from(cs).unwrap_or(usize::MAX);
        if self.barriers || self.df() || g & cs.wrapping_sub(1) != 0 {
            return Ok((0, Vec::new()));
        }
        let whole = data.len().checked_div(csu).unwrap_or(0);
        let k = self.fresh_run(g, whole)?;
        if k < 2 {
            return Ok((0, Vec::new()));
        }
        let targets = self.alloc_each(k)?;
        let mut runs = Vec::new();
        for (i, j) in host_runs(&targets, cs) {
            let (a, b) = (i.saturating_mul(csu), j.saturating_mul(csu));
            let host = targets[i];
            self.encrypt_in_place(host, g.saturating_add(a as u64), &mut data[a..b])?;
            // The caller writes the run: the file reaches its end.
            self.file_len = self
                .file_len
                .max(host.saturating_add(b.saturating_sub(a) as u64));
            runs.push((host, a, b.saturating_sub(a)));
        }
        self.set_fresh_entries(g, &targets)?;
        self.bound_kept_back()?;
        Ok((k.saturating_mul(csu), runs))
    }

    /// How many of the (at most `max`) whole clusters from `g` on are
    /// unallocated (no host cluster, no flags) under an L2 table this
    /// image owns alone, so writing them changes no other metadata than
    /// their own entries and refcounts.
    pub(super) fn fresh_run(&mut self, g: u64, max: usize) -> Result<usize, Error<D::Error>> {
        if self.df() {
            return Ok(0);
        }
        let cs = self.cs();
        let mut k = 0usize;
        while k < max {
            let at = g.saturating_add((k as u64).saturating_mul(cs));
            let (l1i, _) = self.split(at);
            let owned = self.l1.get(l1i).is_some_and(|e| e & COPIED != 0);
            if !owned {
                break;
            }
            match self.get_entry(at)? {
                (Some(_), 0, 0) => k = k.saturating_add(1),
                _ => break,
            }
        }
        Ok(k)
    }

    /// Writes whole clusters that [`Self::fresh_run`] found unallocated,
    /// with two flushes for the whole run however long it is: the
    /// clusters are allocated (the ones single-cluster writes would get;
    /// one refcount write per refcount block) and the data written in
    /// contiguous host runs, then one flush makes refcounts and data
    /// durable, then the L2 entries are set (one write per L2 table) and
    /// flushed. No L2 entry reaches the device before the refcount and
    /// the data of its cluster are durable: a crash leaks, never corrupts.
    ///
    /// With deferred entries or without barriers ([`Self::keep_back`])
    /// the entries (and, without barriers, the refcounts too) stay in
    /// memory for [`Self::settle`] instead, which writes the refcounts
    /// before the entries.
    pub(super) fn write_fresh_run(
        &mut self,
        g: u64,
        mut data: Payload<'_>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let csu = usize::try_from(cs).unwrap_or(usize::MAX);
        let k = data.len().checked_div(csu).unwrap_or(0);
        let targets = self.alloc_each(k)?;
        // Data before the L2 entries that point at it.
        for (i, j) in host_runs(&targets, cs) {
            let (a, b) = (i.saturating_mul(csu), j.saturating_mul(csu));
            let gi = g.saturating_add(a as u64);
            match data.part(a, b) {
                Payload::Shared(d) => self.write_data(targets[i], gi, d)?,
                Payload::Scratch(d) => self.write_data_in_place(targets[i], gi, d)?,
            }
        }
        if self.keep_back() {
            // Kept back: `settle` writes them after the refcounts (and,
            // with barriers on, a flush).
            self.set_fresh_entries(g, &targets)?;
            return self.bound_kept_back();
        }
        // Refcounts and data durable before any entry names the clusters.
        self.barrier()?;
        self.set_fresh_entries(g, &targets)?;
        self.barrier()
    }

    /// Points the L2 entries of the whole clusters from `g` on at
    /// `targets` (COPIED, all subclusters allocated): the tables exist and
    /// are this image's own ([`Self::fresh_run`]); each table's changed
    /// entries go out in one write (not flushed).
    fn set_fresh_entries(&mut self, g: u64, targets: &[u64]) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let w = self.l2_words();
        let bm_new = if self.extended() { ALL_ALLOCATED } else { 0 };
        let geo = self.l2g();
        let split = |at: u64| {
            let slot = geo.locate(GuestOffset::new(at));
            (
                slot.l1_index,
                usize::try_from(slot.l2_index).unwrap_or(usize::MAX),
            )
        };
        let mut i = 0usize;
        while i < targets.len() {
            let gi = g.saturating_add((i as u64).saturating_mul(cs));
            let l2off = self.ensure_l2(gi)?;
            let (l1i, _) = split(gi);
            let t = self.l2_table(l2off)?;
            let (mut first, mut last) = (usize::MAX, 0usize);
            while let Some(&h) = targets.get(i) {
                let at = g.saturating_add((i as u64).saturating_mul(cs));
                let (li, l2i) = split(at);
                if li != l1i {
                    break;
                }
                let x = l2i.saturating_mul(w);
                if let Some(e) = t.get_mut(x) {
                    *e = h | COPIED;
                }
                if w == 2 {
                    if let Some(e) = t.get_mut(x.saturating_add(1)) {
                        *e = bm_new;
                    }
                }
                first = first.min(x);
                last = last.max(x.saturating_add(w).saturating_sub(1));
                i = i.saturating_add(1);
            }
            if self.keep_back() {
                let r = self.l2_pending.entry(l2off).or_insert((first, last));
                *r = (r.0.min(first), r.1.max(last));
                continue;
            }
            let t = self.l2_cache.remove(&l2off).unwrap_or_default();
            let r = self.write_words(l2off, &t, first, last, Structure::L2Table);
            self.l2_cache.insert(l2off, t);
            r?;
        }
        Ok(())
    }

    /// Writes inside one cluster.
    pub(super) fn write_in_cluster(&mut self, g: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let base = g & !(cs.wrapping_sub(1));
        let o = g.saturating_sub(base);
        let (_, e, bm) = self.get_entry(base)?;
        let ext = self.extended();
        let dec = self.decode(e);
        let host = e & OFFSET_MASK;
        let present = self.has_host(e);
        // In place: a normal cluster we own alone, fully readable from host.
        if let L2Entry::Normal { host } = dec {
            let full = !ext || bm & ALL_ALLOCATED == ALL_ALLOCATED;
            if full && e & COPIED != 0 {
                return self.write_sectors(host, base, o, data);
            }
        }
        // The paths below write an L2 entry, maybe into a table holding
        // deferred entries: those go first.
        self.settle()?;
        // Otherwise: the whole cluster as it reads now, merged with `data`.
        let mut cluster = if data.len() as u64 == cs {
            data.to_vec()
        } else {
            self.read_cluster(base)?
        };
        let ou = usize::try_from(o).unwrap_or(0);
        cluster[ou..ou.saturating_add(data.len())].copy_from_slice(data);
        let reuse = match dec {
            // Preallocated zero cluster or partly allocated extended
            // cluster that we own alone: fill it in place.
            L2Entry::Zero { host } if present && e & COPIED != 0 => Some(host),
            L2Entry::Normal { host } if e & COPIED != 0 => Some(host),
            L2Entry::Unallocated if ext && present && e & COPIED != 0 => Some(host),
            _ => None,
        };
        let target = match reuse {
            Some(h) => h,
            // External data file: host offset = guest offset, and the data
            // file's clusters are not refcounted.
            None if self.df() => base,
            None => self.alloc_clusters(1)?.get(),
        };
        // Data before the L2 entry that points at it.
        self.write_data(target, base, &cluster)?;
        self.barrier()?;
        let bm_new = if ext { ALL_ALLOCATED } else { 0 };
        self.set_entry(base, target | COPIED, bm_new)?;
        self.barrier()?;
        // The old references go only after the new entry is durable.
        if reuse.is_none() {
            self.release(dec, e)?;
            self.barrier()?;
        }
        Ok(())
    }

    /// Drops the references an old L2 entry held (after it was replaced).
    pub(super) fn release(&mut self, dec: L2Entry, raw: u64) -> Result<(), Error<D::Error>> {
        if self.df() {
            // Data-file clusters hold no refcounts.
            return Ok(());
        }
        match dec {
            L2Entry::Compressed(d) => {
                let (off, len) = Self::compressed_range(&d);
                self.free_range(off, len)
            }
            L2Entry::Normal { host } | L2Entry::Zero { host } if host != 0 => {
                self.free_range(host, self.cs())
            }
            _ if self.extended() && raw & OFFSET_MASK != 0 => {
                self.free_range(raw & OFFSET_MASK, self.cs())
            }
            _ => Ok(()),
        }
    }

    /// Reads guest data from host offset `host` (guest offset `g`),
    /// decrypting it on encrypted images.
    pub(super) fn read_data(
        &mut self,
        host: u64,
        g: u64,
        buf: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        if self.df() {
            self.read_datafile(host, buf)?;
        } else {
            self.read_dev(host, buf, Structure::DataCluster)?;
        }
        if let Some(k) = self.key.as_mut() {
            if !crate::image::Decryptor::decrypt(k, HostOffset::new(host), GuestOffset::new(g), buf)
            {
                return Err(Error::Decrypt { host_offset: host });
            }
        }
        Ok(())
    }

    /// Writes guest data (whole sectors on encrypted images) at host
    /// offset `host` (guest offset `g`), encrypting it on encrypted images.
    pub(super) fn write_data(
        &mut self,
        host: u64,
        g: u64,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        if self.key.is_none() {
            return self.write_host(host, data);
        }
        let mut buf = data.to_vec();
        self.write_data_in_place(host, g, &mut buf)
    }

    /// [`Self::write_data`] of `data`, encrypted in `data` itself on
    /// encrypted images.
    pub(super) fn write_data_in_place(
        &mut self,
        host: u64,
        g: u64,
        data: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        self.encrypt_in_place(host, g, data)?;
        self.write_host(host, data)
    }

    /// Encrypts `data` (guest offset `g`) in place for host offset `host`
    /// on encrypted images; leaves it as it is on plain ones.
    fn encrypt_in_place(&self, host: u64, g: u64, data: &mut [u8]) -> Result<(), Error<D::Error>> {
        if let Some(k) = self.key.as_ref() {
            let ok = match self.crypt.as_ref() {
                Some(c) => c.encrypt(k, HostOffset::new(host), GuestOffset::new(g), data),
                None => k.encrypt(HostOffset::new(host), GuestOffset::new(g), data),
            };
            if !ok {
                return Err(Error::Decrypt { host_offset: host });
            }
        }
        Ok(())
    }

    /// Writes bytes as they go to the medium at host offset `host`: into
    /// the data file when the image has one.
    fn write_host(&mut self, host: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        if self.df() {
            self.write_datafile(host, data)
        } else {
            self.write_dev(host, data, Structure::DataCluster)
        }
    }

    /// Reads the external data file (zeroes past its end).
    pub(super) fn read_datafile(
        &mut self,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let avail = self.data_len.saturating_sub(off);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.data
            .as_mut()
            .ok_or(Error::DataFileMissing)?
            .read_at(off, head)
            .map_err(|e| e.into_layer(Structure::DataFile, off))
    }

    /// Writes the external data file.
    pub(super) fn write_datafile(&mut self, off: u64, buf: &[u8]) -> Result<(), Error<D::Error>> {
        self.data
            .as_mut()
            .ok_or(Error::DataFileMissing)?
            .write_at(off, buf)
            .map_err(|e| e.into_layer(Structure::DataFile, off))?;
        self.data_len = self.data_len.max(off.saturating_add(buf.len() as u64));
        Ok(())
    }

    /// Writes `data` at `host + o` (guest cluster `base`),
    /// read-modify-writing partial sectors.
    pub(super) fn write_sectors(
        &mut self,
        host: u64,
        base: u64,
        o: u64,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let s = o & !(SECTOR - 1);
        let end = o.saturating_add(data.len() as u64);
        let e = end.div_ceil(SECTOR).saturating_mul(SECTOR);
        if s == o && e == end {
            return self.write_data(host.saturating_add(o), base.saturating_add(o), data);
        }
        let mut buf = vec![0u8; usize::try_from(e.saturating_sub(s)).unwrap_or(0)];
        self.read_data(host.saturating_add(s), base.saturating_add(s), &mut buf)?;
        let i = usize::try_from(o.saturating_sub(s)).unwrap_or(0);
        buf[i..i.saturating_add(data.len())].copy_from_slice(data);
        self.write_data(host.saturating_add(s), base.saturating_add(s), &buf)
    }

    /// Makes `[g, g + len)` read as zero: whole clusters through the zero
    /// flag (v3; the host cluster stays allocated, as QEMU does without
    /// unmap), whole subclusters of extended L2 clusters through their zero
    /// bits, and the rest (parts of subclusters, v2) by writing zeroes.
    pub fn write_zeroes(&mut self, g: u64, len: u64) -> Result<(), Error<D::Error>> {
        self.check_writable(g, len)?;
        self.settle()?;
        let cs = self.cs();
        let mut at = g;
        let end = g.saturating_add(len);
        while at < end {
            let base = at & !(cs.wrapping_sub(1));
            let n = base.saturating_add(cs).min(end).saturating_sub(at);
            if n == cs && self.hdr.version >= 3 {
                self.zero_cluster(base)?;
            } else if self.extended() {
                self.zero_subclusters(at, n)?;
            } else {
                self.write_zero_bytes(at, n)?;
            }
            at = at.saturating_add(n);
        }
        Ok(())
    }

    /// Writes `n` zero bytes at guest offset `g` (inside one cluster).
    pub(super) fn write_zero_bytes(&mut self, g: u64, n: u64) -> Result<(), Error<D::Error>> {
        let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
        self.write(g, &z)
    }

    /// Zeroes `[g, g + n)` inside one extended-L2 cluster: the subclusters
    /// it covers whole get their zero bit (and lose their allocated bit);
    /// the parts of subclusters at either end are written with zeroes.
    pub(super) fn zero_subclusters(&mut self, g: u64, n: u64) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let sc = cs >> 5;
        let base = g & !(cs.wrapping_sub(1));
        let o = g.saturating_sub(base);
        let end = o.saturating_add(n);
        let first = o.div_ceil(sc);
        let last = end.checked_div(sc).unwrap_or(0);
        let (_, e, _) = self.get_entry(base)?;
        if first >= last || matches!(self.decode(e), L2Entry::Compressed(_)) {
            return self.write_zero_bytes(g, n);
        }
        let head_end = first.saturating_mul(sc);
        let tail_start = last.saturating_mul(sc);
        if head_end > o {
            self.write_zero_bytes(g, head_end.saturating_sub(o))?;
        }
        if end > tail_start {
            self.write_zero_bytes(
                base.saturating_add(tail_start),
                end.saturating_sub(tail_start),
            )?;
        }
        // The partial writes above may have allocated the cluster.
        let (_, e, bm) = self.get_entry(base)?;
        if self.df_raw() && self.has_host(e) {
            // The raw data file must read as the disk does.
            let host = (e & OFFSET_MASK).saturating_add(head_end);
            let z = vec![0u8; usize::try_from(tail_start.saturating_sub(head_end)).unwrap_or(0)];
            self.write_datafile(host, &z)?;
            self.barrier()?;
        }
        let bits = last.saturating_sub(first);
        let mask = (1u64 << bits).wrapping_sub(1) << first;
        let nbm = (bm & !mask) | (mask << 32);
        if nbm != bm {
            self.set_entry(base, e, nbm)?;
            self.barrier()?;
        }
        Ok(())
    }

    pub(super) fn zero_cluster(&mut self, base: u64) -> Result<(), Error<D::Error>> {
        let (_, e, _) = self.get_entry(base)?;
        let ext = self.extended();
        let dec = self.decode(e);
        let mut host = e & OFFSET_MASK;
        let mut owned =
            e & COPIED != 0 && self.has_host(e) && !matches!(dec, L2Entry::Compressed(_));
        if self.df_raw() {
            // The raw data file keeps its 1:1 mapping and must read as the
            // disk does: zero the bytes, then flag the cluster.
            let n = self.hdr.size.saturating_sub(base).min(self.cs());
            let z = vec![0u8; usize::try_from(n).unwrap_or(0)];
            self.write_datafile(base, &z)?;
            self.barrier()?;
            owned = true;
            host = base;
        }
        if ext {
            let keep = if owned { host | COPIED } else { 0 };
            self.set_entry(base, keep, ALL_ZERO)?;
        } else if owned {
            self.set_entry(base, host | COPIED | ZERO, 0)?;
        } else {
            self.set_entry(base, ZERO, 0)?;
        }
        self.barrier()?;
        if !owned {
            self.release(dec, e)?;
            self.barrier()?;
        }
        Ok(())
    }

    /// Allocates every cluster of the disk (`preallocation=metadata`), and
    /// with `full` writes zeroes into them (`preallocation=full`).
    pub(crate) fn preallocate(&mut self, full: bool) -> Result<(), Error<D::Error>> {
        self.map_clusters(0)?;
        let cs = self.cs();
        // The file covers every cluster (sparse unless `full`).
        let end = self.highest_used()?.saturating_add(1) << self.cb();
        if full {
            let z = vec![0u8; usize::try_from(cs).unwrap_or(0)];
            let mut at = 0u64;
            while at < self.hdr.size {
                let (_, e, _) = self.get_entry(at)?;
                let h = e & OFFSET_MASK;
                self.write_dev(h, &z, Structure::DataCluster)?;
                at = at.saturating_add(cs);
            }
        } else if end > self.file_len {
            let ok = self
                .dev
                .set_size(end)
                .map_err(|e| e.into_layer(Structure::DataCluster, end))?;
            if ok {
                self.file_len = end;
            } else {
                let z = vec![0u8; SECTOR_BYTES];
                self.write_dev(end.saturating_sub(SECTOR), &z, Structure::DataCluster)?;
            }
        }
        self.flush_dev()
    }
}

/// Guest bytes handed to a write: borrowed, or the caller's scratch
/// buffer that an encrypted image's fresh clusters are encrypted in.
pub(super) enum Payload<'a> {
    /// Left as they are.
    Shared(&'a [u8]),
    /// May be overwritten.
    Scratch(&'a mut [u8]),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        self.bytes().len()
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Shared(d) => d,
            Payload::Scratch(d) => d,
        }
    }

    /// Bytes `a..b` (callers keep `a <= b <= len`).
    fn part(&mut self, a: usize, b: usize) -> Payload<'_> {
        match self {
            Payload::Shared(d) => Payload::Shared(&d[a..b]),
            Payload::Scratch(d) => Payload::Scratch(&mut d[a..b]),
        }
    }
}

/// The runs of consecutive host clusters in `targets` (guest cluster `i`
/// of a run at host offset `targets[i]`, clusters of `cs` bytes): each run
/// as the index range `(i, j)`, in order.
fn host_runs(targets: &[u64], cs: u64) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0usize;
    core::iter::from_fn(move || {
        if i >= targets.len() {
            return None;
        }
        let mut j = i.saturating_add(1);
        while j < targets.len() && targets[j] == targets[j.saturating_sub(1)].saturating_add(cs) {
            j = j.saturating_add(1);
        }
        let run = (i, j);
        i = j;
        Some(run)
    })
}
