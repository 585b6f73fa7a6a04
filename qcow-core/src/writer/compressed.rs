//! Compressed cluster writes and their packing.

use super::*;

impl<D: BlockIo, B: BlockIo> Qcow2Writer<D, B>
where
    B::Error: LayerError<D::Error>,
{
    /// Checks that `data` is exactly guest cluster `cluster_index`, a
    /// cluster inside the image (the last one may run past a size that is
    /// not cluster aligned), and returns the cluster's guest offset.
    pub(super) fn whole_cluster(
        &self,
        cluster_index: u64,
        data: &[u8],
    ) -> Result<u64, Error<D::Error>> {
        let cs = self.cs();
        let g = cluster_index
            .checked_shl(self.cb())
            .filter(|g| g.saturating_add(cs) <= self.hdr.size.div_ceil(cs).saturating_mul(cs))
            .ok_or(Error::BadRequest {
                offset: cluster_index,
                len: data.len() as u64,
                size: self.hdr.size,
            })?;
        if data.len() as u64 != cs {
            return Err(Error::BadRequest {
                offset: g,
                len: data.len() as u64,
                size: self.hdr.size,
            });
        }
        Ok(g)
    }

    /// Writes one whole guest cluster compressed (raw deflate for zlib
    /// images, a zstd frame for zstd images). When compression does not
    /// save space, the cluster is written uncompressed, as qemu-img does.
    /// `data` must be exactly one cluster.
    ///
    /// Consecutive compressed clusters are packed byte by byte into the
    /// same host clusters, as QEMU does: each host cluster's refcount
    /// counts every compressed cluster that touches it.
    pub fn write_compressed(
        &mut self,
        cluster_index: u64,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        self.whole_cluster(cluster_index, data)?;
        let packed = crate::compress::compress(self.hdr.compression_type, data);
        self.write_precompressed(cluster_index, data, packed.as_deref())
    }

    /// Stores one whole guest cluster whose compressed form the caller made
    /// already (with [`crate::compress::compress`] for this image's
    /// `compression_type`, e.g. on other threads): `packed` is stored as
    /// [`Self::write_compressed`] would store it; when it is `None` or does
    /// not save space, `data` (exactly one cluster) is written
    /// uncompressed. The one storing path of compressed clusters.
    pub fn write_precompressed(
        &mut self,
        cluster_index: u64,
        data: &[u8],
        packed: Option<&[u8]>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.cs();
        let g = self.whole_cluster(cluster_index, data)?;
        self.settle()?;
        // Compressed clusters are never encrypted (QEMU refuses both).
        if self.hdr.has_data_file() || self.hdr.crypt_method.is_encrypted() {
            return Err(Error::Unsupported(Unsupported::Writing));
        }
        let Some(packed) = packed.filter(|p| (p.len() as u64) < cs) else {
            let n = usize::try_from(self.hdr.size.saturating_sub(g).min(cs)).unwrap_or(0);
            return self.write(g, &data[..n]);
        };
        // The L2 table first, so it does not land between packed clusters.
        self.ensure_l2(g)?;
        let (_, e, _) = self.get_entry(g)?;
        let dec = self.decode(e);
        let len = packed.len() as u64;
        // Refcounts first (durable on return), then the data, then the L2
        // entry, then the old references go.
        let host = self.alloc_compressed(len)?.get();
        let end = host.saturating_add(len);
        // Up to the end of the last sector, so readers of whole sectors
        // stay inside the file (the next packed cluster overwrites it).
        let mut buf = packed.to_vec();
        buf.resize(
            usize::try_from(end.next_multiple_of(SECTOR).saturating_sub(host)).unwrap_or(0),
            0,
        );
        self.write_dev(host, &buf, Structure::CompressedCluster)?;
        self.barrier()?;
        let d = CompressedDescriptor {
            host,
            sectors: (host & (SECTOR - 1))
                .saturating_add(len)
                .div_ceil(SECTOR)
                .max(1),
        };
        self.set_entry(g, d.encode(self.cb()), 0)?;
        self.barrier()?;
        self.ctail = if end & cs.wrapping_sub(1) == 0 {
            0
        } else {
            end
        };
        self.release(dec, e)?;
        self.barrier()
    }

    /// Host bytes for `len` compressed bytes: right after the previous
    /// compressed cluster when the clusters it spills into are free (its
    /// last host cluster gains a reference), else at fresh clusters.
    pub(super) fn alloc_compressed(&mut self, len: u64) -> Result<HostOffset, Error<D::Error>> {
        let cs = self.cs();
        let cb = self.cb();
        let t = self.ctail;
        if t != 0 {
            let c = t >> cb;
            let room = cs.saturating_sub(t & cs.wrapping_sub(1));
            let extra = len.saturating_sub(room).div_ceil(cs);
            let rc = self.refcount(c)?;
            let max = match self.hdr.refcount_order {
                6 => u64::MAX,
                o => (1u64 << (1u32 << o)).wrapping_sub(1),
            };
            if rc != 0 && rc < max && self.alloc_exact(c.saturating_add(1), extra)? {
                self.set_refcount_existing(c, rc.saturating_add(1))?;
                self.barrier()?;
                return Ok(HostOffset::new(t));
            }
        }
        self.alloc_clusters(len.div_ceil(cs).max(1))
    }

    /// Allocates clusters `c..c + n` with refcount 1 if all are free;
    /// `false` (nothing allocated) otherwise.
    pub(super) fn alloc_exact(&mut self, c: u64, n: u64) -> Result<bool, Error<D::Error>> {
        for i in 0..n {
            let ci = c.saturating_add(i);
            if !self.has_block(ci) {
                self.ensure_block(ci)?;
            }
        }
        for i in 0..n {
            if self.refcount(c.saturating_add(i))? != 0 {
                return Ok(false);
            }
        }
        for i in 0..n {
            self.set_refcount_existing(c.saturating_add(i), 1)?;
        }
        Ok(true)
    }
}
