//! Reading: the metadata slice cache, guest offset -> mapping through the
//! table layer, data, backing, compressed and encrypted clusters, refcounts
//! and the bitmap directory.

use super::*;

/// Where the stored bytes of the compressed cluster `d` lie, for an input
/// buffer of `cap` bytes: reading `len` bytes at the sector-aligned host
/// offset `at` gets them (as many sectors as fit, and none past the end of
/// a file of `file_size` bytes), and the stream from `d.host` on is
/// `skip..len` of what was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedSpan {
    /// Sector-aligned host offset of the first byte to read.
    pub at: u64,
    /// Bytes to read (a whole number of sectors).
    pub len: usize,
    /// Where the stream starts in what was read (`d.host - at`).
    pub skip: usize,
}

impl CompressedSpan {
    /// The span of `d` for an input buffer of `cap` bytes in a file of
    /// `file_size` bytes; an error when no byte of the stream is there.
    pub fn of<E>(d: CompressedDescriptor, file_size: u64, cap: usize) -> Result<Self, Error<E>> {
        let aligned = d.host & !(SECTOR - 1);
        let skip = (d.host % SECTOR) as usize;
        let total = d.sectors.saturating_mul(SECTOR);
        let in_file = round_up_sector(file_size.saturating_sub(aligned));
        let cap = (cap & !511) as u64;
        let n = usize::try_from(total.min(cap).min(in_file)).unwrap_or(0);
        if n <= skip {
            return Err(Error::corrupt(
                Structure::CompressedCluster,
                d.host,
                Problem::OutOfRange(d.host),
            ));
        }
        Ok(Self {
            at: aligned,
            len: n,
            skip,
        })
    }
}

/// Reads the sectors holding the compressed cluster `d` into `cin` (as many
/// as fit, and no further than the file's end) and returns where the stream
/// from `d.host` on lies in it.
pub(super) fn compressed_input<D: BlockIo>(
    dev: &mut D,
    file_size: u64,
    d: CompressedDescriptor,
    cin: &mut [u8],
) -> Result<core::ops::Range<usize>, Error<D::Error>> {
    let span = CompressedSpan::of(d, file_size, cin.len())?;
    dev.read_at(span.at, &mut cin[..span.len])
        .map_err(io(Structure::CompressedCluster, span.at))?;
    Ok(span.skip..span.len)
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
    /// Copies `out.len()` bytes at byte `index` of a table at
    /// `table_offset` of `table_len` bytes, through the slice cache.
    pub(super) fn meta(
        &mut self,
        structure: Structure,
        table_offset: u64,
        table_len: u64,
        index: u64,
        out: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        let c = &mut self.st.cache;
        let slice = c.slice as u64;
        let overflow = || Error::corrupt(structure, table_offset, Problem::Overflow);
        // `slice` is non-zero (at least 512) and `within < slice`.
        let within = index.checked_rem(slice).ok_or_else(overflow)?;
        let rel = index.wrapping_sub(within);
        let start = table_offset.checked_add(rel).ok_or_else(overflow)?;
        let slot = match c.find(start) {
            Some(s) => s,
            None => {
                let v = c.victim();
                let remain = table_len.saturating_sub(rel);
                let n = usize::try_from(round_up_sector(remain).min(slice)).unwrap_or(c.slice);
                let at = v.checked_mul(c.slice).ok_or_else(overflow)?;
                let buf = c
                    .mem
                    .as_mut()
                    .get_mut(at..at.saturating_add(c.slice))
                    .ok_or_else(overflow)?;
                c.tags[v] = EMPTY;
                let (head, tail) = buf.split_at_mut(n.min(buf.len()));
                self.dev
                    .read_at(start, head)
                    .map_err(io(structure, start))?;
                tail.fill(0);
                c.tags[v] = start;
                c.find(start).unwrap_or(v)
            }
        };
        let at = slot
            .checked_mul(c.slice)
            .and_then(|a| a.checked_add(usize::try_from(within).ok()?))
            .ok_or_else(overflow)?;
        let src = c
            .mem
            .as_mut()
            .get(at..at.saturating_add(out.len()))
            .ok_or_else(overflow)?;
        out.copy_from_slice(src);
        Ok(())
    }

    pub(super) fn meta_u64(
        &mut self,
        structure: Structure,
        table_offset: u64,
        table_len: u64,
        index: u64,
    ) -> Result<u64, Error<D::Error>> {
        let mut b = [0u8; 8];
        self.meta(structure, table_offset, table_len, index, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// The kind of the cluster or subcluster holding `guest`, and where
    /// that unit (or a larger run of the same kind) ends.
    pub(super) fn unit(&mut self, guest: u64) -> Result<(MapKind, u64), Error<D::Error>> {
        let geo = L2Geometry::of(&self.st.info.header);
        let slot = geo.locate(GuestOffset::new(guest));
        let l1_end = geo.l1_end(slot.l1_index).get();
        if slot.l1_index >= u64::from(self.st.l1_size) {
            return Ok((MapKind::Unallocated, l1_end));
        }
        // l1_index < l1_size <= MAX_L1_ENTRIES: the products fit.
        let l1_len = u64::from(self.st.l1_size).saturating_mul(8);
        let l1_byte = slot.l1_index.saturating_mul(8);
        let l1e = self.meta_u64(Structure::L1Table, self.st.l1_offset, l1_len, l1_byte)?;
        let l2_off = entry::l1_l2_offset(l1e);
        if l2_off == 0 {
            return Ok((MapKind::Unallocated, l1_end));
        }
        let entry_at = self.st.l1_offset.saturating_add(l1_byte);
        if l2_off & geo.cluster_size().wrapping_sub(1) != 0 {
            return Err(Error::corrupt(
                Structure::L1Table,
                entry_at,
                Problem::Unaligned(l2_off),
            ));
        }
        let mut e = [0u8; 16];
        let byte = geo.entry_byte(slot.l2_index);
        let esz = geo.entry_len();
        self.meta(
            Structure::L2Table,
            l2_off,
            geo.cluster_size(),
            byte,
            &mut e[..esz],
        )?;
        let l2_at = l2_off.saturating_add(byte);
        let (kind, len) = geo
            .resolve(geo.read(&e[..esz]), slot.in_cluster)
            .map_err(|p| Error::corrupt(Structure::L2Table, l2_at, p))?;
        Ok((kind, guest.saturating_add(len)))
    }

    /// Maps `guest_offset..guest_offset + len` (clamped to the disk): the
    /// first run of one kind that is contiguous on the host. Call again
    /// from `guest_offset + mapping.len` for the rest.
    pub fn map(&mut self, guest_offset: u64, len: u64) -> Result<Mapping, Error<D::Error>> {
        let size = self.st.size;
        if guest_offset >= size {
            return Err(Error::BadRequest {
                offset: guest_offset,
                len,
                size,
            });
        }
        let end = guest_offset.saturating_add(len).min(size);
        let (kind, mut unit_end) = self.unit(guest_offset)?;
        let mut run_end = unit_end.min(end);
        if !matches!(kind, MapKind::Compressed(_)) {
            while run_end < end {
                let (next, next_end) = self.unit(run_end)?;
                let delta = run_end.saturating_sub(guest_offset);
                let same = match (kind, next) {
                    (MapKind::Unallocated, MapKind::Unallocated) => true,
                    (
                        MapKind::UnallocatedAlloc { host: a },
                        MapKind::UnallocatedAlloc { host: b },
                    ) => a.checked_add(delta) == Some(b),
                    (MapKind::Zero { host: None }, MapKind::Zero { host: None }) => true,
                    (MapKind::Zero { host: Some(a) }, MapKind::Zero { host: Some(b) })
                    | (MapKind::Data { host: a }, MapKind::Data { host: b }) => {
                        a.checked_add(delta) == Some(b)
                    }
                    _ => false,
                };
                if !same {
                    break;
                }
                unit_end = next_end;
                run_end = unit_end.min(end);
            }
        }
        Ok(Mapping {
            guest_offset,
            len: run_end.saturating_sub(guest_offset),
            kind,
        })
    }

    /// Reads guest bytes at `guest_offset` (both 512-byte aligned).
    pub fn read(&mut self, guest_offset: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        let len = buf.len() as u64;
        let size = self.st.size;
        if !guest_offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || guest_offset.checked_add(len).is_none_or(|e| e > size)
        {
            return Err(Error::BadRequest {
                offset: guest_offset,
                len,
                size,
            });
        }
        // `guest_offset + buf.len()` was checked above, so the sums below
        // stay inside it.
        let mut rest = &mut buf[..];
        let mut g = guest_offset;
        while !rest.is_empty() {
            let m = self.map(g, rest.len() as u64)?;
            let n = usize::try_from(m.len).unwrap_or(0).min(rest.len());
            if n == 0 {
                return Err(Error::corrupt(Structure::L2Table, g, Problem::Overflow));
            }
            let (chunk, tail) = core::mem::take(&mut rest).split_at_mut(n);
            match m.kind {
                MapKind::Zero { .. } => chunk.fill(0),
                MapKind::Unallocated | MapKind::UnallocatedAlloc { .. } => {
                    self.read_backing(g, chunk)?
                }
                MapKind::Data { host } => self.read_data(host, GuestOffset::new(g), chunk)?,
                MapKind::Compressed(d) => self.read_compressed(d, g, chunk)?,
            }
            rest = tail;
            g = g.saturating_add(n as u64);
        }
        Ok(())
    }

    pub(super) fn read_backing(&mut self, g: u64, chunk: &mut [u8]) -> Result<(), Error<D::Error>> {
        let Some(b) = self.backing.as_mut() else {
            if !self.st.info.backing_file.is_empty() && !self.st.ignore_backing {
                return Err(Error::BackingMissing);
            }
            chunk.fill(0);
            return Ok(());
        };
        let avail = usize::try_from(self.backing_size.saturating_sub(g)).unwrap_or(usize::MAX);
        let n = avail.min(chunk.len());
        let aligned = n & !511;
        let (present, absent) = chunk.split_at_mut(n);
        let (whole, partial) = present.split_at_mut(aligned);
        if !whole.is_empty() {
            b.read_at(g, whole)
                .map_err(|e| e.into_layer(Structure::Backing, g))?;
        }
        if !partial.is_empty() {
            // A backing device ending mid-sector: read its last sector.
            let at = g.saturating_add(aligned as u64);
            let bounce = &mut self.st.bounce;
            b.read_at(at, bounce)
                .map_err(|e| e.into_layer(Structure::Backing, at))?;
            partial.copy_from_slice(&bounce[..partial.len()]);
        }
        absent.fill(0);
        Ok(())
    }

    pub(super) fn check_encryption(&self) -> Result<(), Error<D::Error>> {
        let method = self.st.info.header.crypt_method;
        if method.is_encrypted() && self.st.decryptor.is_none() {
            return Err(Error::Unsupported(Unsupported::Encrypted { method }));
        }
        Ok(())
    }

    pub(super) fn read_data(
        &mut self,
        host: HostOffset,
        g: GuestOffset,
        chunk: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        self.check_encryption()?;
        let host_at = host;
        let host = host.get();
        if self.st.info.header.has_data_file() {
            let d = self.data.as_mut().ok_or(Error::DataFileMissing)?;
            d.read_at(host, chunk)
                .map_err(|e| e.into_layer(Structure::DataFile, host))?;
        } else {
            self.dev
                .read_at(host, chunk)
                .map_err(io(Structure::DataCluster, host))?;
        }
        if let Some(dec) = self.st.decryptor.as_mut() {
            if !dec.decrypt(host_at, g, chunk) {
                return Err(Error::Decrypt { host_offset: host });
            }
        }
        Ok(())
    }

    /// Reads the stored bytes of the compressed cluster `d` (from
    /// [`MapKind::Compressed`]) into `input` and returns where in it the
    /// compressed stream lies, exactly what the reader decodes: for callers
    /// that decode several clusters at once (on several threads) with
    /// [`crate::decompress::decompress`]. `input` should hold a cluster
    /// plus 512 bytes; a shorter one truncates the stream, which then fails
    /// to decode.
    pub fn compressed_input(
        &mut self,
        d: CompressedDescriptor,
        input: &mut [u8],
    ) -> Result<core::ops::Range<usize>, Error<D::Error>> {
        compressed_input(&mut self.dev, self.st.file_size, d, input)
    }

    /// Where the stored bytes of the compressed cluster `d` lie for an
    /// input buffer of `cap` bytes (a cluster plus 512 bytes, as
    /// [`Self::compressed_input`] wants): for callers that read the streams
    /// of several neighbouring clusters at once (one read through
    /// [`Self::read_host`]) and decode them with
    /// [`crate::decompress::decompress`].
    pub fn compressed_span(
        &self,
        d: CompressedDescriptor,
        cap: usize,
    ) -> Result<CompressedSpan, Error<D::Error>> {
        CompressedSpan::of(d, self.st.file_size, cap)
    }

    /// Reads `buf.len()` bytes of the image file at host offset `host`, as
    /// the stored bytes of compressed clusters (spans of
    /// [`Self::compressed_span`], or several neighbouring ones together).
    pub fn read_host(&mut self, host: u64, buf: &mut [u8]) -> Result<(), Error<D::Error>> {
        self.dev
            .read_at(host, buf)
            .map_err(io(Structure::CompressedCluster, host))
    }

    pub(super) fn read_compressed(
        &mut self,
        d: CompressedDescriptor,
        g: u64,
        chunk: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        self.check_encryption()?;
        let cs = usize::try_from(self.st.info.header.cluster_size()).unwrap_or(usize::MAX);
        let cout: &mut [u8] = self.st.cout.as_mut().map_or(&mut [], |b| b.as_mut());
        if cout.len() < cs {
            return Err(Error::BufferTooSmall {
                what: Buffer::CompressedOutput,
                needed: cs,
                given: cout.len(),
            });
        }
        let cin: &mut [u8] = self.st.cin.as_mut().map_or(&mut [], |b| b.as_mut());
        if cin.len() < 512 {
            return Err(Error::BufferTooSmall {
                what: Buffer::CompressedInput,
                needed: cs.saturating_add(512),
                given: cin.len(),
            });
        }
        let intra = usize::try_from(g & (cs as u64).wrapping_sub(1)).unwrap_or(0);
        // A whole cluster asked for (as a copy does) is decoded straight
        // into the caller's buffer; a part goes through `cout`, which keeps
        // the cluster for the next part.
        let whole = intra == 0 && chunk.len() == cs;
        if self.st.cout_tag != Some(d.host) {
            self.st.cout_tag = None;
            let at = compressed_input(&mut self.dev, self.st.file_size, d, cin)?;
            let input = &cin[at];
            let out = if whole {
                &mut chunk[..]
            } else {
                &mut cout[..cs]
            };
            match decompress(self.st.info.header.compression_type, input, out) {
                Ok(()) => {}
                Err(DecompressError::ZstdWithoutAlloc) => {
                    return Err(Error::Unsupported(Unsupported::ZstdWithoutAlloc))
                }
                Err(DecompressError::UnknownType(t)) => {
                    return Err(Error::Unsupported(Unsupported::CompressionType(t)))
                }
                Err(DecompressError::Corrupt) => {
                    return Err(Error::corrupt(
                        Structure::CompressedCluster,
                        d.host,
                        Problem::Decompress,
                    ))
                }
            }
            if whole {
                return Ok(());
            }
            self.st.cout_tag = Some(d.host);
        }
        let src = cout
            .get(intra..intra.saturating_add(chunk.len()))
            .ok_or(Error::corrupt(
                Structure::CompressedCluster,
                d.host,
                Problem::Overflow,
            ))?;
        chunk.copy_from_slice(src);
        Ok(())
    }

    /// Refcount of host cluster `cluster` (host offset / cluster size),
    /// through the refcount table and blocks.
    pub fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let hdr = self.st.info.header;
        let cs = hdr.cluster_size();
        let geo = RefcountGeometry::of(&hdr);
        let slot = geo.locate(ClusterIndex::new(cluster));
        let rt_len = u64::from(hdr.refcount_table_clusters).saturating_mul(cs);
        let Some(rt_byte) = geo.table_byte(slot.table_index).filter(|&b| b < rt_len) else {
            return Ok(0);
        };
        let rte = self.meta_u64(
            Structure::RefcountTable,
            hdr.refcount_table_offset,
            rt_len,
            rt_byte,
        )?;
        let off = match geo.block_at(rte) {
            RefblockAt::Absent => return Ok(0),
            RefblockAt::At(off) => off.get(),
            RefblockAt::Unaligned(off) => {
                return Err(Error::corrupt(
                    Structure::RefcountTable,
                    hdr.refcount_table_offset.saturating_add(rt_byte),
                    Problem::Unaligned(off),
                ))
            }
        };
        let (byte, w, sub) = geo.entry_bytes(slot.index);
        let mut b = [0u8; 8];
        self.meta(Structure::RefcountBlock, off, cs, byte, &mut b[..w])?;
        geo.get_in(&b[..w], sub).ok_or(Error::corrupt(
            Structure::RefcountBlock,
            off,
            Problem::Overflow,
        ))
    }

    /// Calls `each` with every entry of the persistent bitmap directory
    /// (what `qemu-img info` lists under `bitmaps`), without allocating.
    /// Stops early when `each` returns `true`.
    pub fn for_each_bitmap(
        &mut self,
        mut each: impl FnMut(&BitmapInfo) -> bool,
    ) -> Result<(), Error<D::Error>> {
        let Some(bm) = self.st.info.bitmaps else {
            return Ok(());
        };
        Error::check_limit(
            Structure::HeaderExtension,
            bm.directory_offset,
            Limit::BitmapDirectoryBytes,
            bm.directory_size,
            MAX_BITMAP_DIRECTORY_BYTES,
        )?;
        let end = bm
            .directory_offset
            .checked_add(bm.directory_size)
            .ok_or(Error::corrupt(
                Structure::HeaderExtension,
                bm.directory_offset,
                Problem::Overflow,
            ))?;
        let mut off = bm.directory_offset;
        for _ in 0..bm.nb_bitmaps {
            let mut f = [0u8; BitmapInfo::FIXED_LEN];
            let fixed_end = off.saturating_add(BitmapInfo::FIXED_LEN as u64);
            if fixed_end > end {
                return Err(Error::corrupt(
                    Structure::HeaderExtension,
                    off,
                    Problem::OutOfRange(off),
                ));
            }
            read_unaligned(
                &mut self.dev,
                &mut self.st.bounce,
                off,
                &mut f,
                Structure::HeaderExtension,
            )?;
            let mut b = BitmapInfo::parse_fixed(&f);
            // Layout: table offset u64, table size u32, flags u32, type u8,
            // granularity bits u8, name size u16, extra data size u32.
            let name_len = u16::from_be_bytes([f[18], f[19]]);
            let extra = u32::from_be_bytes([f[20], f[21], f[22], f[23]]);
            let name_at = fixed_end.saturating_add(u64::from(extra));
            let entry_end = name_at.saturating_add(u64::from(name_len));
            if entry_end > end || usize::from(name_len) > MAX_NAME_LEN {
                return Err(Error::corrupt(
                    Structure::HeaderExtension,
                    off,
                    Problem::OutOfRange(entry_end),
                ));
            }
            b.name
                .resize(usize::from(name_len), 0)
                .map_err(|_| Error::corrupt(Structure::HeaderExtension, off, Problem::Overflow))?;
            read_unaligned(
                &mut self.dev,
                &mut self.st.bounce,
                name_at,
                &mut b.name,
                Structure::HeaderExtension,
            )?;
            if each(&b) {
                return Ok(());
            }
            off = entry_end.checked_next_multiple_of(8).unwrap_or(u64::MAX);
        }
        Ok(())
    }
}
