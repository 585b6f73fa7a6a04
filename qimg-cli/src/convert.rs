//! The copy engine behind `qimg convert`: streams a source device into a
//! destination in bounded chunks, skipping ranges the source reports as
//! zero and chunks that read as zero, so the destination stays sparse.

use luks_core::io::BlockIo as _;

use qcow_core::StagedRuns;

use crate::dev::{AnyDev, DevError, Source};

/// How much is read and written at once.
pub(crate) const CHUNK: usize = 2 << 20;

/// The memory alignment of the copy's buffers: an `O_DIRECT` destination
/// (`-t none`) takes a transfer straight from memory only when its address
/// is a multiple of the logical block size (4096 at most,
/// [`crate::cache::DIRECT_ALIGN`]); anything else goes through the
/// device's bounce buffer, one copy and one megabyte at a time.
const BUF_ALIGN: usize = 4096;

/// A zeroed buffer of [`CHUNK`] bytes that starts on a [`BUF_ALIGN`]
/// boundary in memory: a `Vec` over-allocated by one alignment unit and
/// used from its first aligned byte (a large `Vec` from the allocator
/// starts 16 bytes into its page). Any offset in it that is a multiple of
/// 4096 is aligned too, so the copy's writes, which start at multiples of
/// the sparse granularity or of the cluster size, reach an `O_DIRECT`
/// file without a bounce.
pub(crate) struct ChunkBuf {
    raw: Vec<u8>,
    start: usize,
}

impl ChunkBuf {
    /// A new zeroed, aligned buffer.
    pub(crate) fn new() -> Self {
        let raw = vec![0u8; CHUNK + BUF_ALIGN];
        let start = (BUF_ALIGN - raw.as_ptr().addr() % BUF_ALIGN) % BUF_ALIGN;
        Self { raw, start }
    }
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + CHUNK]
    }
}

impl std::ops::DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + CHUNK]
    }
}

/// Options of the copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyOptions {
    /// Minimum run of zero bytes (`-S`) that is skipped instead of written;
    /// 0 writes every byte.
    pub(crate) sparse_size: u64,
    /// The destination already reads as zero (new file, `--target-is-zero`),
    /// so skipped ranges need no explicit zeroing.
    pub(crate) target_is_zero: bool,
    /// Write on a second thread while the next chunk is read (and
    /// decrypted): see [`copy`].
    pub(crate) pipelined: bool,
    /// `convert -B`: ranges the source reports as not present are left
    /// alone in the destination (they read from its backing file), as
    /// qemu-img leaves what the source's top layer does not hold.
    pub(crate) keep_unallocated: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            sparse_size: 4096,
            target_is_zero: true,
            pipelined: false,
            keep_unallocated: false,
        }
    }
}

/// A copy failed while reading the source or writing the destination.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// Reading the source failed.
    Read(DevError),
    /// Writing the destination failed.
    Write(DevError),
}

/// Encrypts a destination's data on the copy's reading side, before the
/// writing side gets it (a raw LUKS destination: [`copy_sealed`]).
pub(crate) trait Seal: Sync {
    /// Encrypts `buf`, whole destination sectors bound for `off`, in place.
    fn seal(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError>;
}

/// Chunks in flight in a pipelined copy: one being read, one queued, one
/// being written. Memory stays at `BUFFERS * CHUNK` whatever the size.
const BUFFERS: usize = 3;

/// One step of the copy, decided from the source and applied to the
/// destination.
enum Step {
    /// `buf[..len]` goes to `off`, leaving out runs of zeroes.
    Data { off: u64, buf: ChunkBuf, len: usize },
    /// `len` bytes at `off` that read as zero and must be written as
    /// zero-filled data (`-S 0`).
    Fill { off: u64, buf: ChunkBuf, len: usize },
    /// `len` bytes at `off` read as zero: zeroed in the destination unless
    /// it reads as zero already.
    Zero { off: u64, len: u64 },
    /// Bytes the destination's backing file provides: not written.
    Skip,
}

impl Step {
    /// Whether applying the step changes nothing: a zero range of a
    /// destination that reads as zero already, or a range its backing file
    /// provides.
    fn is_noop(&self, opts: CopyOptions) -> bool {
        match self {
            Step::Skip => true,
            Step::Zero { .. } => opts.target_is_zero,
            Step::Data { .. } | Step::Fill { .. } => false,
        }
    }

    /// Applies the step to `dst`, returning the bytes written as data and
    /// the buffer for reuse.
    fn apply(
        self,
        dst: &mut AnyDev,
        opts: CopyOptions,
    ) -> (Result<u64, DevError>, Option<ChunkBuf>) {
        match self {
            // The buffer's bytes are not needed once written: an
            // encrypting destination may encrypt them in place.
            Step::Data { off, mut buf, len } => {
                (write_sparse(dst, off, &mut buf[..len], opts), Some(buf))
            }
            Step::Fill { off, mut buf, len } => (
                dst.write_at_consuming(off, &mut buf[..len])
                    .map(|()| len as u64),
                Some(buf),
            ),
            Step::Zero { off, len } => {
                let r = if opts.target_is_zero {
                    Ok(())
                } else {
                    dst.write_zeroes(off, len)
                };
                (r.map(|()| 0), None)
            }
            Step::Skip => (Ok(0), None),
        }
    }
}

/// What the reading side needs to know of the destination, asked once
/// before the copy (neither changes while it runs: the copy writes only
/// below the offset it has reached).
#[derive(Clone, Copy)]
struct Geometry {
    /// The destination's sector size.
    sector: u32,
    /// The destination's size, when it has one.
    size: Option<u64>,
}

impl Geometry {
    fn of(dst: &mut AnyDev) -> Self {
        Self {
            sector: dst.sector_size(),
            size: dst.size().ok(),
        }
    }
}

/// Reads the source from `off` (at most [`CHUNK`] bytes) into `buf` and
/// says what to do with it; returns the step, the bytes it covers and the
/// buffer when the step does not use it.
///
/// With `seal`, every byte of the destination is written, each chunk
/// encrypted here first: data whole (its zero runs too), and a range that
/// reads as zero as a chunk of zeroes (never read from the source), unless
/// the destination's plaintext is known to read as zero already.
fn next_step(
    src: &mut dyn Source,
    dst: Geometry,
    seal: Option<&dyn Seal>,
    off: u64,
    len: u64,
    opts: CopyOptions,
    mut buf: ChunkBuf,
) -> Result<(Step, u64, Option<ChunkBuf>), CopyError> {
    let align = u64::from(dst.sector.max(src.sector_size())).max(1);
    // Ask about everything left: a range that reads as zero is skipped in
    // one step however large (a sparse 4 TiB image has few steps, not one
    // per chunk); only data is cut to what one buffer holds.
    let st = src.block_status(off, len - off).map_err(CopyError::Read)?;
    // Zeroes written as encrypted data take a buffer too.
    let zeroes_as_data = seal.is_some() && !opts.target_is_zero;
    let max = if st.data || opts.sparse_size == 0 || zeroes_as_data {
        (len - off).min(CHUNK as u64)
    } else {
        len - off
    };
    let mut n = st.len.clamp(1, max);
    // Data ranges that follow make one read: a qcow2 image reports each
    // compressed (or host-discontiguous) cluster on its own, and one large
    // read lets the reader decode them together.
    if st.data {
        while n < max {
            let next = src
                .block_status(off + n, max - n)
                .map_err(CopyError::Read)?;
            if !next.data {
                break;
            }
            n += next.len.clamp(1, max - n);
        }
    }
    // Keep every request whole sectors of the destination (a raw
    // source's status can end at an odd file length); only the very
    // end of an odd-sized copy may be partial.
    let n = if n >= align {
        n - n % align
    } else {
        align.min(len - off)
    };
    let n_usize = usize::try_from(n.min(CHUNK as u64)).unwrap_or(CHUNK);
    // An odd tail into a destination with larger sectors (LUKS2 with
    // 4096-byte sectors, sized in whole sectors): zero-pad to a whole
    // destination sector when the destination has room for it.
    let ds = u64::from(dst.sector).max(1);
    let padded = if n % ds != 0 && dst.size.is_some_and(|s| s >= off + n.next_multiple_of(ds)) {
        n.next_multiple_of(ds)
    } else {
        n
    };
    let padded_usize = usize::try_from(padded).unwrap_or(CHUNK).min(CHUNK);
    let seal_err = |e: DevError| CopyError::Write(e);
    Ok(match st.data {
        false if opts.keep_unallocated && !st.present => (Step::Skip, n, Some(buf)),
        // `-S 0` turns sparse detection off, as in qemu-img: even a
        // range the source leaves unallocated is written as data, so
        // the destination ends up fully allocated.
        false if opts.sparse_size == 0 || zeroes_as_data => {
            let fill = if seal.is_some() {
                padded_usize
            } else {
                n_usize
            };
            buf[..fill].fill(0);
            if let Some(seal) = seal {
                seal.seal(off, &mut buf[..fill]).map_err(seal_err)?;
            }
            let step = Step::Fill {
                off,
                buf,
                len: fill,
            };
            (step, n, None)
        }
        false => (Step::Zero { off, len: padded }, n, Some(buf)),
        true => {
            let chunk = &mut buf[..padded_usize];
            src.read_at(off, &mut chunk[..n_usize])
                .map_err(CopyError::Read)?;
            chunk[n_usize..].fill(0);
            let step = match seal {
                Some(seal) => {
                    seal.seal(off, chunk).map_err(seal_err)?;
                    Step::Fill {
                        off,
                        buf,
                        len: padded_usize,
                    }
                }
                None => Step::Data {
                    off,
                    buf,
                    len: padded_usize,
                },
            };
            (step, n, None)
        }
    })
}

/// Copies `len` bytes of `src` to `dst`, returning the bytes written as data.
/// `progress` is told the bytes done after every chunk.
///
/// With [`CopyOptions::pipelined`], the destination side (the zero scan and
/// the writes) runs on a second thread while this one reads and decrypts
/// the next chunk; at most [`BUFFERS`] chunks are in flight, and writes
/// reach the destination in the same order as without it.
pub(crate) fn copy(
    src: &mut dyn Source,
    dst: &mut AnyDev,
    len: u64,
    opts: CopyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, CopyError> {
    copy_with(src, dst, None, len, opts, progress)
}

/// [`copy`] into an encrypted destination whose `dst` takes ciphertext:
/// the reading side encrypts each chunk with `seal` (in pieces on the `-m`
/// cipher workers when there are several) and, pipelined, hands it to the
/// writing thread, so encryption overlaps the writes as decryption does
/// when reading. Ranges that read as zero are not read: a buffer of zeroes
/// is encrypted instead (every sector of a new volume must be written,
/// each with its own tweak). Returns the bytes written.
pub(crate) fn copy_sealed(
    src: &mut dyn Source,
    dst: &mut AnyDev,
    seal: &dyn Seal,
    len: u64,
    opts: CopyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, CopyError> {
    copy_with(src, dst, Some(seal), len, opts, progress)
}

/// The chunk buffers of a pipelined copy: at most [`BUFFERS`] are made,
/// and the writing thread gives each back through `returned` when done.
struct Buffers {
    made: usize,
    /// A buffer the reading side got back unused.
    spare: Option<ChunkBuf>,
    returned: std::sync::mpsc::Receiver<ChunkBuf>,
}

impl Buffers {
    fn new(returned: std::sync::mpsc::Receiver<ChunkBuf>) -> Self {
        Self {
            made: 0,
            spare: None,
            returned,
        }
    }

    /// A buffer for the next chunk: the spare one, one given back, a new
    /// one while fewer than [`BUFFERS`] exist, else the next one given
    /// back. `None` when the writer has stopped (an error: its result says
    /// why).
    fn take(&mut self) -> Option<ChunkBuf> {
        if let Some(b) = self.spare.take().or_else(|| self.returned.try_recv().ok()) {
            return Some(b);
        }
        if self.made < BUFFERS {
            self.made += 1;
            return Some(ChunkBuf::new());
        }
        self.returned.recv().ok()
    }
}

fn copy_with(
    src: &mut dyn Source,
    dst: &mut AnyDev,
    seal: Option<&dyn Seal>,
    len: u64,
    opts: CopyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, CopyError> {
    let geometry = Geometry::of(dst);
    if !opts.pipelined {
        let mut spare = Some(ChunkBuf::new());
        let mut off = 0u64;
        let mut written = 0u64;
        while off < len {
            let buf = spare.take().unwrap_or_else(ChunkBuf::new);
            let (step, n, unused) = next_step(src, geometry, seal, off, len, opts, buf)?;
            let (r, back) = step.apply(dst, opts);
            written += r.map_err(CopyError::Write)?;
            spare = back.or(unused);
            off += n;
            progress(off);
        }
        return Ok(written);
    }
    std::thread::scope(|s| {
        let (to_writer, steps) = std::sync::mpsc::sync_channel::<Step>(1);
        let (give_back, returned) = std::sync::mpsc::channel::<ChunkBuf>();
        let writer = s.spawn(move || -> Result<u64, DevError> {
            let mut written = 0u64;
            for step in steps {
                let (r, back) = step.apply(dst, opts);
                written += r?;
                if let Some(b) = back {
                    // The reader may have finished; a lost buffer is fine.
                    let _ = give_back.send(b);
                }
            }
            Ok(written)
        });
        let mut buffers = Buffers::new(returned);
        let mut off = 0u64;
        let mut failed = None;
        while off < len {
            let Some(buf) = buffers.take() else {
                break;
            };
            let (step, n, unused) = match next_step(src, geometry, seal, off, len, opts, buf) {
                Ok(v) => v,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            buffers.spare = unused;
            // Only steps with work go to the writer: every hand-over can
            // wake it, and on a loaded machine a wake-up may wait for a
            // time slice (the source's holes were half of the hand-overs
            // of a raw->qcow2 convert).
            if step.is_noop(opts) {
                off += n;
                progress(off);
                continue;
            }
            if to_writer.send(step).is_err() {
                break;
            }
            off += n;
            progress(off);
        }
        drop(to_writer);
        let written = match writer.join() {
            Ok(r) => r.map_err(CopyError::Write)?,
            Err(p) => std::panic::resume_unwind(p),
        };
        match failed {
            Some(e) => Err(e),
            None => Ok(written),
        }
    })
}

/// A destination whose fresh clusters the copy's reading thread prepares
/// (allocates and encrypts) and whose data bytes the writing thread writes
/// through its own handle to the file ([`copy_staged`]): a new encrypted
/// qcow2 image, whose sector IVs are host offsets known only once the
/// clusters are allocated.
pub(crate) trait StagingDest: luks_core::io::BlockIo<Error = DevError> {
    /// The destination's cluster size.
    fn cluster_size(&self) -> u64;

    /// Stages the run of fresh clusters `data` starts with, at guest
    /// offset `off`: returns the bytes taken (0: none, write the next
    /// cluster with `write_at_consuming`) and the runs to write, each
    /// `(file offset, offset in data, length)`, encrypted in `data`
    /// (`qcow_core::Qcow2Writer::stage_fresh`).
    fn stage(&mut self, off: u64, data: &mut [u8]) -> Result<(usize, StagedRuns), DevError>;
}

/// A chunk whose runs the writing thread writes to the file, then gives
/// the buffer back.
struct StagedChunk {
    buf: ChunkBuf,
    /// `(file offset, offset in buf, length)`.
    runs: StagedRuns,
}

/// [`copy`] (pipelined) into a [`StagingDest`]: the reading thread reads
/// each chunk, leaves out zero runs as [`write_sparse`] does, allocates
/// and encrypts the fresh clusters in the chunk's own buffer (no copy),
/// and hands the buffer with its file runs to the writing thread, which
/// only writes them to `file` (a handle to the destination's file). The
/// rest (the first cluster under a new L2 table, partial clusters) is
/// written through `dst` on the reading thread. Memory stays at
/// [`BUFFERS`] chunks. The caller flushes `dst` afterwards, which makes
/// the writing thread's bytes durable too (same file). Returns the bytes
/// written as data.
pub(crate) fn copy_staged(
    src: &mut dyn Source,
    dst: &mut dyn StagingDest,
    file: &std::fs::File,
    len: u64,
    opts: CopyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, CopyError> {
    use std::os::unix::fs::FileExt as _;
    let geometry = Geometry {
        sector: dst.sector_size(),
        size: dst.size().ok(),
    };
    std::thread::scope(|s| {
        let (to_writer, jobs) = std::sync::mpsc::sync_channel::<StagedChunk>(1);
        let (give_back, returned) = std::sync::mpsc::channel::<ChunkBuf>();
        let writer = s.spawn(move || -> Result<(), DevError> {
            for job in jobs {
                for &(at, o, n) in &job.runs {
                    file.write_all_at(&job.buf[o..o + n], at)
                        .map_err(|e| DevError(format!("write at {at}: {e}")))?;
                }
                // The reader may have finished; a lost buffer is fine.
                let _ = give_back.send(job.buf);
            }
            Ok(())
        });
        let mut buffers = Buffers::new(returned);
        let mut off = 0u64;
        let mut written = 0u64;
        let mut failed = None;
        while off < len {
            let Some(buf) = buffers.take() else {
                break;
            };
            let (step, n, unused) = match next_step(src, geometry, None, off, len, opts, buf) {
                Ok(v) => v,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            buffers.spare = unused;
            let staged = match step {
                Step::Data { off, mut buf, len } => stage_sparse(dst, off, &mut buf[..len], opts)
                    .map(|(w, runs)| (w, Some(buf), runs)),
                Step::Fill { off, mut buf, len } => {
                    let o = CopyOptions {
                        sparse_size: 0,
                        ..opts
                    };
                    stage_sparse(dst, off, &mut buf[..len], o).map(|(w, runs)| (w, Some(buf), runs))
                }
                Step::Zero { off, len } if !opts.target_is_zero => {
                    dst.write_zeroes(off, len).map(|()| (0, None, Vec::new()))
                }
                Step::Zero { .. } | Step::Skip => Ok((0, None, Vec::new())),
            };
            match staged {
                Ok((w, buf, runs)) => {
                    written += w;
                    match buf {
                        Some(buf) if !runs.is_empty() => {
                            if to_writer.send(StagedChunk { buf, runs }).is_err() {
                                break;
                            }
                        }
                        b => buffers.spare = buffers.spare.take().or(b),
                    }
                }
                Err(e) => {
                    failed = Some(CopyError::Write(e));
                    break;
                }
            }
            off += n;
            progress(off);
        }
        drop(to_writer);
        match writer.join() {
            Ok(r) => r.map_err(CopyError::Write)?,
            Err(p) => std::panic::resume_unwind(p),
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(written),
        }
    })
}

/// [`write_sparse`] into a [`StagingDest`]: each piece's fresh runs are
/// staged (returned as `(file offset, offset in data, length)`), the rest
/// written here. Returns the bytes written or staged, and the runs.
fn stage_sparse(
    dst: &mut dyn StagingDest,
    off: u64,
    data: &mut [u8],
    opts: CopyOptions,
) -> Result<(u64, StagedRuns), DevError> {
    let mut runs = Vec::new();
    let written = sparse_runs(dst, off, data, opts, |dst, s, e, data| {
        let cs = dst.cluster_size().max(1);
        let mut at = s;
        while at < e {
            let g = off + at as u64;
            let (took, rs) = dst.stage(g, &mut data[at..e])?;
            if took == 0 {
                let n = usize::try_from(cs - g % cs)
                    .unwrap_or(usize::MAX)
                    .min(e - at);
                dst.write_at_consuming(g, &mut data[at..at + n])?;
                at += n;
            } else {
                runs.extend(rs.into_iter().map(|(h, o, n)| (h, at + o, n)));
                at += took;
            }
        }
        Ok(())
    })?;
    Ok((written, runs))
}

/// Receives a window of clusters in guest order: each one's index and its
/// (zero-padded) bytes.
pub(crate) type ClusterWriter<'a> = dyn FnMut(&[(u64, Vec<u8>)]) -> Result<(), DevError> + 'a;

/// Copies `len` bytes of `src` cluster by cluster to `write`, skipping
/// clusters that read as zero (the last one is zero-padded): the shape a
/// compressing writer needs. Clusters are handed over in guest order, up to
/// `window` at a time (at least one), so the writer can compress a window
/// on several threads while memory stays bounded. `progress` is told the
/// bytes done.
pub(crate) fn copy_clusters(
    src: &mut dyn Source,
    len: u64,
    cluster: u64,
    window: usize,
    write: &mut ClusterWriter<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<(), CopyError> {
    let cs = usize::try_from(cluster).unwrap_or(CHUNK);
    let window = window.max(1);
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(window);
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut idx = 0u64;
    while idx.saturating_mul(cluster) < len {
        let off = idx * cluster;
        let n = (len - off).min(cluster);
        let st = src.block_status(off, n).map_err(CopyError::Read)?;
        let has_data = st.data || st.len < n;
        if has_data {
            let mut buf = spare.pop().unwrap_or_else(|| vec![0u8; cs]);
            let n_usize = usize::try_from(n).unwrap_or(cs);
            buf.fill(0);
            // Whole sectors of the source; a short tail reads as zero.
            let want = n_usize.next_multiple_of(512).min(cs);
            src.read_at(off, &mut buf[..want])
                .map_err(CopyError::Read)?;
            buf[n_usize..].fill(0);
            if buf.iter().any(|&b| b != 0) {
                batch.push((idx, buf));
            } else {
                spare.push(buf);
            }
        }
        idx += 1;
        let done = (off + n).min(len);
        if batch.len() >= window || done >= len {
            if !batch.is_empty() {
                write(&batch).map_err(CopyError::Write)?;
            }
            spare.extend(batch.drain(..).map(|(_, b)| b));
            progress(done);
        }
    }
    Ok(())
}

/// Writes `data` at `off`, leaving out aligned runs of zeroes of at least
/// `sparse_size` bytes. Returns the bytes written. Written bytes may be
/// left changed in `data` ([`BlockIo::write_at_consuming`]): each byte is
/// looked at before the piece holding it is written, never after.
///
/// [`BlockIo::write_at_consuming`]: luks_core::io::BlockIo::write_at_consuming
/// Bytes [`is_zero`] ORs together before it looks at the result.
const ZERO_BLOCK: usize = 128;

/// Whether every byte of `d` is zero: an OR of each 128-byte block (which
/// the compiler turns into a few vector instructions), stopping at the
/// first block that holds data. A plain early-exit loop over the bytes
/// does not vectorise: scanning the decrypted zeroes of a raw LUKS volume
/// that way took a quarter of a convert's CPU time.
pub(crate) fn is_zero(d: &[u8]) -> bool {
    let mut blocks = d.chunks_exact(ZERO_BLOCK);
    let whole = blocks.by_ref().all(|b| {
        <&[u8; ZERO_BLOCK]>::try_from(b).is_ok_and(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
    });
    whole && blocks.remainder().iter().all(|&b| b == 0)
}

fn write_sparse(
    dst: &mut AnyDev,
    off: u64,
    data: &mut [u8],
    opts: CopyOptions,
) -> Result<u64, DevError> {
    sparse_runs(&mut **dst, off, data, opts, |dst, s, e, data| {
        dst.write_at_consuming(off + s as u64, &mut data[s..e])
    })
}

/// Walks `data` (at guest offset `off` of `dst`) in `opts.sparse_size`
/// pieces: each run of pieces holding data goes to `run` as `(start,
/// end)` in `data`, and zero pieces are written as zeroes unless the
/// target already reads as zero. With `sparse_size` 0 all of `data` is one
/// run. Returns the bytes handed to `run`.
fn sparse_runs<D: luks_core::io::BlockIo<Error = DevError> + ?Sized>(
    dst: &mut D,
    off: u64,
    data: &mut [u8],
    opts: CopyOptions,
    mut run: impl FnMut(&mut D, usize, usize, &mut [u8]) -> Result<(), DevError>,
) -> Result<u64, DevError> {
    if opts.sparse_size == 0 {
        run(dst, 0, data.len(), data)?;
        return Ok(data.len() as u64);
    }
    let gran = usize::try_from(opts.sparse_size)
        .unwrap_or(data.len())
        .max(1);
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        let end = (pos + gran).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                run(dst, s, pos, data)?;
                written += (pos - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        if zero && !opts.target_is_zero {
            dst.write_zeroes(off + pos as u64, (end - pos) as u64)?;
        }
        pos = end;
    }
    if let Some(s) = run_start {
        let e = data.len();
        run(dst, s, e, data)?;
        written += (e - s) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_byte_anywhere() {
        for len in [0usize, 1, 127, 128, 129, 4096, 4097] {
            let mut d = vec![0u8; len];
            assert!(is_zero(&d), "{len} zero bytes");
            for at in [0, len / 2, len.saturating_sub(1)] {
                if at < len {
                    d[at] = 0x80;
                    assert!(!is_zero(&d), "{len} bytes, data at {at}");
                    d[at] = 0;
                }
            }
        }
    }
    use crate::dev::{erased, BlockStatus, Flat};
    use luks_core::io::{BlockIo, VecDevice};

    /// A source whose first `zero_until` bytes claim to read as zero.
    struct HalfZero(Flat<AnyDev>, u64);

    impl BlockIo for HalfZero {
        type Error = DevError;
        fn sector_size(&self) -> u32 {
            1
        }
        fn size(&mut self) -> Result<u64, DevError> {
            self.0.size()
        }
        fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), DevError> {
            self.0.read_at(o, b)
        }
        fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), DevError> {
            self.0.write_at(o, b)
        }
        fn flush(&mut self) -> Result<(), DevError> {
            Ok(())
        }
    }

    impl Source for HalfZero {
        fn block_status(&mut self, o: u64, m: u64) -> Result<BlockStatus, DevError> {
            let mut st = self.0.block_status(o, m)?;
            if o < self.1 {
                st.len = (self.1 - o).min(m);
                st.data = false;
                st.zero = true;
            }
            Ok(st)
        }
    }

    #[test]
    fn chunk_buffers_are_aligned_zeroed_and_whole() {
        // Several live at once, as in a pipelined copy: each one aligned.
        let bufs: Vec<ChunkBuf> = (0..BUFFERS + 2).map(|_| ChunkBuf::new()).collect();
        for b in &bufs {
            assert_eq!(b.len(), CHUNK);
            assert_eq!(b.as_ptr().addr() % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let mut b = ChunkBuf::new();
        b[CHUNK - 1] = 7;
        assert_eq!(b.last(), Some(&7));
    }

    #[test]
    fn copies_exactly_and_skips_zero_runs() {
        let mut data = vec![0u8; 3 * CHUNK + 12345];
        for (i, b) in data.iter_mut().enumerate() {
            if (i / 4096) % 3 == 1 {
                *b = u8::try_from(i % 251).unwrap_or(0) | 1;
            }
        }
        let len = data.len() as u64;
        let mut src = Flat::at_offsets(erased(VecDevice::from_vec(data.clone())));
        let mut dst = erased(VecDevice::new());
        let mut last = 0;
        let written = copy(&mut src, &mut dst, len, CopyOptions::default(), &mut |d| {
            last = d
        })
        .unwrap();
        assert_eq!(last, len);
        // Roughly a third of the 4 KiB blocks hold data.
        assert!(written < len / 2, "{written}");
        dst.set_size(len).unwrap();
        let mut back = vec![0u8; data.len()];
        dst.read_at(0, &mut back).unwrap();
        assert!(back == data);
    }

    /// A device that fails every read or write reaching `fail_from`.
    struct FailFrom(AnyDev, u64);

    impl BlockIo for FailFrom {
        type Error = DevError;
        fn sector_size(&self) -> u32 {
            self.0.sector_size()
        }
        fn size(&mut self) -> Result<u64, DevError> {
            self.0.size()
        }
        fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), DevError> {
            if o + b.len() as u64 > self.1 {
                return Err(DevError(format!("read failed at {o}")));
            }
            self.0.read_at(o, b)
        }
        fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), DevError> {
            if o + b.len() as u64 > self.1 {
                return Err(DevError(format!("write failed at {o}")));
            }
            self.0.write_at(o, b)
        }
        fn flush(&mut self) -> Result<(), DevError> {
            Ok(())
        }
    }

    /// Data with zero runs of several sizes and an odd tail.
    fn patterned(len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        for (i, b) in data.iter_mut().enumerate() {
            if (i / 4096) % 5 == 1 || (i / (CHUNK + 4096)) % 3 == 2 {
                *b = u8::try_from(i % 241).unwrap_or(0) | 2;
            }
        }
        data
    }

    #[test]
    fn pipelined_copy_writes_what_the_serial_copy_writes() {
        let data = patterned(7 * CHUNK + 777);
        let len = data.len() as u64;
        for sparse_size in [0u64, 4096, 65536] {
            for target_is_zero in [true, false] {
                let mut results = Vec::new();
                for pipelined in [false, true] {
                    let mut src = Flat::at_offsets(erased(VecDevice::from_vec(data.clone())));
                    // A destination full of noise shows missed zeroing.
                    let noise = if target_is_zero { 0 } else { 0x5a };
                    let mut dst = erased(VecDevice::from_vec(vec![noise; data.len()]));
                    let opts = CopyOptions {
                        sparse_size,
                        target_is_zero,
                        pipelined,
                        keep_unallocated: false,
                    };
                    let mut seen = Vec::new();
                    let written =
                        copy(&mut src, &mut dst, len, opts, &mut |d| seen.push(d)).unwrap();
                    let mut back = vec![1u8; data.len()];
                    dst.read_at(0, &mut back).unwrap();
                    assert!(
                        back == data,
                        "S={sparse_size} zero={target_is_zero} p={pipelined}"
                    );
                    assert_eq!(seen.last(), Some(&len));
                    assert!(seen.windows(2).all(|w| w[0] < w[1]));
                    results.push(written);
                }
                assert_eq!(results[0], results[1], "S={sparse_size}");
            }
        }
    }

    /// A pipelined copy with the default options.
    fn pipelined_copy(src: &mut dyn Source, dst: &mut AnyDev, len: u64) -> Result<u64, CopyError> {
        let opts = CopyOptions {
            pipelined: true,
            ..CopyOptions::default()
        };
        copy(src, dst, len, opts, &mut |_| {})
    }

    #[test]
    fn pipelined_copy_reports_a_failed_write() {
        let data = patterned(9 * CHUNK);
        let len = data.len() as u64;
        let mut src = Flat::at_offsets(erased(VecDevice::from_vec(data.clone())));
        let mut dst: AnyDev = Box::new(FailFrom(erased(VecDevice::new()), 3 * CHUNK as u64));
        match pipelined_copy(&mut src, &mut dst, len) {
            Err(CopyError::Write(e)) => assert!(e.0.contains("write failed"), "{e}"),
            other => panic!("expected a write error, got {other:?}"),
        }
    }

    #[test]
    fn pipelined_copy_reports_a_failed_read() {
        let data = patterned(9 * CHUNK);
        let len = data.len() as u64;
        let failing: AnyDev = Box::new(FailFrom(
            erased(VecDevice::from_vec(data.clone())),
            5 * CHUNK as u64 + 4096,
        ));
        let mut src = Flat::at_offsets(failing);
        let mut dst = erased(VecDevice::new());
        match pipelined_copy(&mut src, &mut dst, len) {
            Err(CopyError::Read(e)) => assert!(e.0.contains("read failed"), "{e}"),
            other => panic!("expected a read error, got {other:?}"),
        }
        // What came before the failure was written, in order.
        let mut back = vec![0u8; 5 * CHUNK];
        dst.read_at(0, &mut back).unwrap();
        assert!(back[..] == data[..5 * CHUNK]);
    }

    #[test]
    fn zero_status_ranges_are_not_read() {
        let mut src = HalfZero(
            Flat::at_offsets(erased(VecDevice::from_vec(vec![7u8; 8192]))),
            4096,
        );
        let mut dst = erased(VecDevice::new());
        copy(
            &mut src,
            &mut dst,
            8192,
            CopyOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        let mut back = vec![1u8; 8192];
        dst.read_at(0, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 7));
    }

    /// `convert -B`: a range the source reports as not present is left as
    /// the destination had it (its backing file shows through); a range
    /// present as zero is zeroed, even in a destination that is not zero.
    #[test]
    fn keep_unallocated_skips_absent_ranges_only() {
        for absent in [true, false] {
            let mut src = HalfZero(
                Flat::at_offsets(erased(VecDevice::from_vec(vec![7u8; 8192]))),
                4096,
            );
            struct Absent<'a>(&'a mut HalfZero, bool);
            impl BlockIo for Absent<'_> {
                type Error = DevError;
                fn sector_size(&self) -> u32 {
                    1
                }
                fn size(&mut self) -> Result<u64, DevError> {
                    self.0.size()
                }
                fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), DevError> {
                    self.0.read_at(o, b)
                }
                fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), DevError> {
                    self.0.write_at(o, b)
                }
                fn flush(&mut self) -> Result<(), DevError> {
                    Ok(())
                }
            }
            impl Source for Absent<'_> {
                fn block_status(&mut self, o: u64, m: u64) -> Result<BlockStatus, DevError> {
                    let mut st = self.0.block_status(o, m)?;
                    if st.zero && self.1 {
                        st.present = false;
                    }
                    Ok(st)
                }
            }
            let mut dst = erased(VecDevice::from_vec(vec![0x5a; 8192]));
            let opts = CopyOptions {
                target_is_zero: false,
                keep_unallocated: true,
                ..CopyOptions::default()
            };
            copy(
                &mut Absent(&mut src, absent),
                &mut dst,
                8192,
                opts,
                &mut |_| {},
            )
            .unwrap();
            let mut back = vec![1u8; 8192];
            dst.read_at(0, &mut back).unwrap();
            let want = if absent { 0x5a } else { 0 };
            assert!(back[..4096].iter().all(|&b| b == want), "absent={absent}");
            assert!(back[4096..].iter().all(|&b| b == 7));
        }
    }
}
