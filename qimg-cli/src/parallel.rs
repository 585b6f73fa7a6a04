//! `convert -m N`: N threads. From two up, `convert`'s copy is pipelined
//! (see [`crate::convert::copy`]): one thread writes the destination while
//! another reads (and decrypts, or encrypts for a raw LUKS destination) the
//! next chunk, so the cipher work of one
//! large request is spread over the N - 1 threads left
//! ([`cipher_workers`]). Output never depends on N: each thread handles a
//! disjoint, sector-aligned piece of the same request with the same key and
//! the same IVs the single-threaded path would use, and requests still
//! reach the destination in order.
//!
//! Three shapes share a request's cipher work:
//! - [`Striped`]: independent devices over the same file (raw LUKS
//!   volumes, each with its own file handle and cipher); a large read or
//!   write is cut into pieces done concurrently by positional I/O.
//! - [`ParallelKey`]: the qcow2 reader's decryptor for encrypted images;
//!   one key, shared by reference (its sector functions take `&self`).
//!
//! - [`ParallelEncrypt`]: the qcow2 writer's encryption hook for
//!   encrypted qcow2 destinations; the same pieces, encrypted.
//! - [`ParallelSeal`]: a raw LUKS destination's cipher, encrypting each
//!   chunk on the copy's reading side before the writing thread gets it.
//!
//! `convert -c` compresses a window of clusters on the same threads
//! ([`compress_all`]): each takes the next cluster as it frees up, and the
//! writer stores the results in guest order, so the file layout is the one
//! thread's.
//!
//! The worker count is process-wide, set once from `-m` before images are
//! opened (the openers read it), so the openers' signatures stay the same
//! for every verb. The work itself runs on one pool of `-m` threads
//! started on first use and kept ([`run_all`]): threads started per request
//! were measured to queue behind their parent on its core.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use luks_core::io::BlockIo;
use luks_core::PayloadCipher;
use qcow_core::crypto::{ImageKey, SectorCrypt};
use qcow_core::{Decryptor, GuestOffset, HostOffset};

use crate::convert::Seal;
use crate::dev::DevError;

/// Requests shorter than this stay on one thread: below it, starting a
/// thread costs more than the cipher work it would take over.
pub(crate) const MIN_SPLIT: usize = 256 << 10;

/// Pieces are whole multiples of this (a LUKS sector of any size).
const UNIT: usize = 4096;

static WORKERS: AtomicUsize = AtomicUsize::new(1);

/// Sets the worker count (`-m`), at least 1.
pub(crate) fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

/// The worker count (`-m`): the threads that compress `convert -c`'s
/// clusters.
pub(crate) fn workers() -> usize {
    WORKERS.load(Ordering::Relaxed).max(1)
}

/// The threads that share one request's cipher work. With `-m N` for N of
/// 2 or more the copy is pipelined ([`crate::convert::copy`]): one thread
/// writes while the others read and decrypt (into a raw LUKS destination:
/// read and encrypt, [`ParallelSeal`]; into an encrypted qcow2 image, the
/// writing thread encrypts, [`ParallelEncrypt`]), so N - 1 threads are
/// left for the cipher.
pub(crate) fn cipher_workers() -> usize {
    workers().saturating_sub(1).max(1)
}

/// Whether `convert` pipelines its copy: reading on one thread, writing on
/// another.
pub(crate) fn pipelined() -> bool {
    workers() > 1
}

/// The default for `-m`: two threads on a machine with two cores or more,
/// one otherwise. Measured with `cargo xtask bench-compare` on a 2-core
/// VAES machine (1 GiB into /dev/shm), a pipelined copy (one thread reads
/// and decrypts while the other writes) took a LUKS qcow2 convert from
/// 0.45 s to about 0.25 s; splitting each request's AES-XTS work over a
/// further thread (`-m 3`) gains nothing there, since with hardware AES
/// one core decrypts at 8-14 GB/s, faster than the kernel copies the bytes
/// around it. Decoding compressed clusters, which is slow per byte, uses
/// all `-m` threads: 256 MiB of compressed text converts in 0.28 s with
/// `-m 2` against 0.45 s with `-m 1`.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// The `-m` worker threads: started on first use and kept for the rest of
/// the process. Measured on a 2-core VM, a thread started per request
/// begins on its parent's core and mostly waits for it: two 1.4 ms halves
/// of 128 requests took 340 ms on a fresh scoped thread each, 181 ms on a
/// thread kept between requests (the 179 ms of perfect overlap). `None`
/// with one worker, or if the threads cannot be started (the work then runs
/// on the calling thread).
fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| {
        let n = workers();
        if n < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("qimg-worker-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs every task, on the worker threads when there are several tasks and
/// workers, and returns their results in task order. A task's panic is
/// raised again here.
pub(crate) fn run_all<T, F>(tasks: Vec<F>) -> Vec<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    use rayon::prelude::*;
    match pool() {
        Some(p) if tasks.len() > 1 => p.install(|| tasks.into_par_iter().map(|f| f()).collect()),
        _ => tasks.into_iter().map(|f| f()).collect(),
    }
}

/// Cuts `len` bytes into at most `n` consecutive pieces, each a multiple of
/// [`UNIT`] except possibly the last; returns the piece lengths.
fn piece_lengths(len: usize, n: usize) -> Vec<usize> {
    let n = n.max(1);
    let per = len.div_ceil(n).next_multiple_of(UNIT);
    let mut out = Vec::with_capacity(n);
    let mut left = len;
    while left > 0 {
        let take = per.min(left);
        out.push(take);
        left -= take;
    }
    out
}

/// Splits `buf` into the pieces of [`piece_lengths`], with each piece's
/// offset in `buf`.
fn split_mut(buf: &mut [u8], n: usize) -> Vec<(usize, &mut [u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    let mut at = 0;
    for len in piece_lengths(rest.len(), n) {
        let (head, tail) = rest.split_at_mut(len);
        out.push((at, head));
        at += len;
        rest = tail;
    }
    out
}

/// N devices showing the same content (each over its own handle to the
/// same file); large requests run on all of them at once.
pub(crate) struct Striped<D> {
    devs: Vec<D>,
}

impl<D: BlockIo + Send> Striped<D> {
    /// Stripes over `devs` (at least one).
    pub(crate) fn new(devs: Vec<D>) -> Self {
        assert!(!devs.is_empty(), "Striped needs at least one device");
        Self { devs }
    }

    fn first(&mut self) -> &mut D {
        &mut self.devs[0]
    }
}

impl<D> BlockIo for Striped<D>
where
    D: BlockIo + Send,
    D::Error: Send,
{
    type Error = D::Error;

    fn sector_size(&self) -> u32 {
        self.devs[0].sector_size()
    }

    fn size(&mut self) -> Result<u64, Self::Error> {
        self.first().size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        if buf.len() < MIN_SPLIT || self.devs.len() == 1 {
            return self.first().read_at(offset, buf);
        }
        let pieces = split_mut(buf, self.devs.len());
        let tasks: Vec<_> = self
            .devs
            .iter_mut()
            .zip(pieces)
            .map(|(dev, (at, piece))| move || dev.read_at(offset + at as u64, piece))
            .collect();
        run_all(tasks).into_iter().collect()
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        if buf.len() < MIN_SPLIT || self.devs.len() == 1 {
            return self.first().write_at(offset, buf);
        }
        let lens = piece_lengths(buf.len(), self.devs.len());
        let mut at = 0usize;
        let mut tasks = Vec::new();
        for (dev, len) in self.devs.iter_mut().zip(lens) {
            let piece = &buf[at..at + len];
            let off = offset + at as u64;
            tasks.push(move || dev.write_at(off, piece));
            at += len;
        }
        run_all(tasks).into_iter().collect()
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        for d in &mut self.devs {
            d.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        self.first().write_zeroes(offset, len)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        self.first().discard(offset, len)
    }

    fn set_size(&mut self, size: u64) -> Result<bool, Self::Error> {
        self.first().set_size(size)
    }
}

/// An encrypted qcow2 image's key, decrypting large runs on several
/// threads.
pub(crate) struct ParallelKey {
    key: ImageKey,
    workers: usize,
}

impl ParallelKey {
    /// Wraps `key` for `workers` threads.
    pub(crate) fn new(key: ImageKey, workers: usize) -> Self {
        Self {
            key,
            workers: workers.max(1),
        }
    }
}

/// Decrypts one piece with a shared key.
fn decrypt_piece(key: &ImageKey, host: HostOffset, guest: GuestOffset, buf: &mut [u8]) -> bool {
    match key {
        ImageKey::Luks(c) => c.decrypt_sectors(host.get() / 512, buf).is_ok(),
        ImageKey::LegacyAes(k) => k.decrypt_sectors(guest.get() / 512, buf).is_ok(),
    }
}

impl Decryptor for ParallelKey {
    fn decrypt(
        &mut self,
        host_offset: HostOffset,
        guest_offset: GuestOffset,
        buf: &mut [u8],
    ) -> bool {
        if buf.len() < MIN_SPLIT || self.workers == 1 {
            return decrypt_piece(&self.key, host_offset, guest_offset, buf);
        }
        let key = &self.key;
        let tasks: Vec<_> = split_mut(buf, self.workers)
            .into_iter()
            .map(|(at, piece)| {
                let at = at as u64;
                let (h, g) = (host_offset.checked_add(at), guest_offset.checked_add(at));
                move || match (h, g) {
                    (Some(h), Some(g)) => decrypt_piece(key, h, g, piece),
                    _ => false,
                }
            })
            .collect();
        run_all(tasks).into_iter().all(|ok| ok)
    }
}

/// The qcow2 writer's encryption hook for encrypted destinations: large
/// data writes are encrypted in pieces on several threads, one key shared
/// by reference.
pub(crate) struct ParallelEncrypt {
    workers: usize,
}

impl ParallelEncrypt {
    /// Encrypts on `workers` threads.
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            workers: workers.max(1),
        }
    }
}

impl SectorCrypt for ParallelEncrypt {
    fn encrypt(
        &self,
        key: &ImageKey,
        host: HostOffset,
        guest: GuestOffset,
        buf: &mut [u8],
    ) -> bool {
        if buf.len() < MIN_SPLIT || self.workers == 1 {
            return key.encrypt(host, guest, buf);
        }
        let tasks: Vec<_> = split_mut(buf, self.workers)
            .into_iter()
            .map(|(at, piece)| {
                let at = at as u64;
                let (h, g) = (host.checked_add(at), guest.checked_add(at));
                move || match (h, g) {
                    (Some(h), Some(g)) => key.encrypt(h, g, piece),
                    _ => false,
                }
            })
            .collect();
        run_all(tasks).into_iter().all(|ok| ok)
    }
}

/// A raw LUKS destination's cipher on the copy's reading side
/// ([`crate::convert::copy_sealed`]): each chunk is encrypted there, in
/// pieces on the cipher workers when it is large and there are several,
/// while the writing thread writes the chunk before it.
pub(crate) struct ParallelSeal {
    payload: Arc<PayloadCipher>,
    workers: usize,
}

impl ParallelSeal {
    /// Encrypts with `payload` on `workers` threads.
    pub(crate) fn new(payload: Arc<PayloadCipher>, workers: usize) -> Self {
        Self {
            payload,
            workers: workers.max(1),
        }
    }
}

impl Seal for ParallelSeal {
    fn seal(&self, off: u64, buf: &mut [u8]) -> Result<(), DevError> {
        let p = &*self.payload;
        let one =
            |at: u64, piece: &mut [u8]| p.encrypt(at, piece).map_err(|e| DevError(e.to_string()));
        // Whole sectors per piece: `split_mut` cuts at multiples of UNIT
        // (4096, a multiple of every LUKS sector size).
        if buf.len() < MIN_SPLIT || self.workers == 1 {
            return one(off, buf);
        }
        let tasks: Vec<_> = split_mut(buf, self.workers)
            .into_iter()
            .map(|(at, piece)| move || one(off + at as u64, piece))
            .collect();
        run_all(tasks).into_iter().collect()
    }
}

/// Bytes of uncompressed clusters each compression worker gets per window.
/// The window's clusters (and their compressed copies) are most of
/// `convert -c`'s memory: measured on 256 MiB of the `bench-compare` source
/// with `-m 2` (/usr/bin/time -v), peak RSS was 11.0 MB at 2 MiB per worker,
/// 9.1 MB at 1 MiB, 7.8 MB at 512 KiB and 7.2 MB at 256 KiB (qemu-img's:
/// 10.8-11.9 MB), at the same CPU time (2.5 s user), since a window of 8
/// clusters a worker still takes milliseconds against microseconds to hand
/// it out.
const COMPRESS_PER_WORKER: u64 = 512 << 10;

/// How many clusters `convert -c` reads before compressing them: about
/// [`COMPRESS_PER_WORKER`] bytes per worker (at least two clusters each), so
/// memory stays bounded whatever the image size.
pub(crate) fn compress_window(workers: usize, cluster: u64) -> usize {
    let per = usize::try_from(COMPRESS_PER_WORKER / cluster.max(1))
        .unwrap_or(1)
        .max(2);
    per.saturating_mul(workers.max(1))
}

/// Compresses every cluster of `batch` for `compression_type` (as
/// [`qcow_core::compress::compress`]), on up to `workers` threads, each
/// taking the next cluster as it frees up; results come back in `batch`
/// order, so the writer stores them exactly as one thread would.
pub(crate) fn compress_all(
    compression_type: u8,
    batch: &[(u64, Vec<u8>)],
    workers: usize,
) -> Vec<Option<Vec<u8>>> {
    let one = |run: &[(u64, Vec<u8>)]| -> Vec<Option<Vec<u8>>> {
        run.iter()
            .map(|(_, d)| qcow_core::compress::compress(compression_type, d))
            .collect()
    };
    if workers <= 1 || batch.len() < 2 {
        return one(batch);
    }
    // One task per cluster, handed out as the threads free up (a cluster
    // is a millisecond or more of work): a thread the machine's other load
    // holds up, or a run of slow clusters, does not keep the other waiting
    // at the end of the window as one consecutive half each did.
    let tasks: Vec<_> = batch.chunks(1).map(|run| move || one(run)).collect();
    run_all(tasks).into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use luks_core::io::VecDevice;

    #[test]
    fn pieces_cover_the_request_in_order_and_aligned() {
        for len in [0usize, 512, 4096, 5000, 1 << 20, (1 << 20) + 512, 3 << 20] {
            for n in 1..=5 {
                let p = piece_lengths(len, n);
                assert_eq!(p.iter().sum::<usize>(), len, "len {len} n {n}");
                assert!(p.len() <= n);
                assert!(p.iter().rev().skip(1).all(|l| l % UNIT == 0));
            }
        }
    }

    #[test]
    fn striped_reads_and_writes_equal_one_device() {
        // Stripe over three copies of one disk: reads give the disk's bytes,
        // and each written piece lands, at its own offset, on the device
        // that took it.
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| u8::try_from((i * 7 + i / 4096) % 256).unwrap())
            .collect();
        let devs: Vec<VecDevice> = (0..3).map(|_| VecDevice::from_vec(data.clone())).collect();
        let mut s = Striped::new(devs);
        let mut buf = vec![0u8; 600 << 10];
        s.read_at(8192, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[8192..8192 + buf.len()]);
        let new: Vec<u8> = buf.iter().map(|b| b ^ 0x5a).collect();
        s.write_at(4096, &new).unwrap();
        // Piece i landed on device i at its own offset.
        let lens = piece_lengths(new.len(), 3);
        let mut at = 0;
        for (i, len) in lens.into_iter().enumerate() {
            let mut got = vec![0u8; len];
            s.devs[i].read_at(4096 + at as u64, &mut got).unwrap();
            assert_eq!(got, new[at..at + len], "piece {i}");
            at += len;
        }
    }

    #[test]
    fn parallel_decryption_equals_one_thread() {
        let key: Vec<u8> = (0..64u8).collect();
        let cipher =
            || luks_core::cipher::SectorCipher::new("aes", "xts-plain64", &key, 512).unwrap();
        let plain: Vec<u8> = (0..(2u32 << 20))
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut ct = plain.clone();
        cipher().encrypt_sectors(0x1234, &mut ct).unwrap();
        for workers in [1, 2, 3, 8] {
            let mut k = ParallelKey::new(ImageKey::Luks(cipher()), workers);
            let mut buf = ct.clone();
            assert!(k.decrypt(HostOffset::new(0x1234 * 512), GuestOffset::ZERO, &mut buf));
            assert!(buf == plain, "{workers} workers");
        }
    }

    #[test]
    fn parallel_compression_equals_one_thread() {
        let batch: Vec<(u64, Vec<u8>)> = (0..7u64)
            .map(|i| {
                let d = (0..65536u32)
                    .map(|j| u8::try_from((j / (u32::try_from(i).unwrap() + 1)) % 251).unwrap())
                    .collect();
                (i * 3, d)
            })
            .collect();
        for ctype in [
            qcow_core::header::COMPRESSION_ZLIB,
            qcow_core::header::COMPRESSION_ZSTD,
        ] {
            let want = compress_all(ctype, &batch, 1);
            assert_eq!(want.len(), batch.len());
            assert!(want.iter().all(Option::is_some));
            for workers in [2, 3, 8] {
                assert!(
                    compress_all(ctype, &batch, workers) == want,
                    "{workers} workers"
                );
            }
        }
        assert_eq!(compress_window(1, 65536), 8);
        assert_eq!(compress_window(2, 2 << 20), 4);
    }

    #[test]
    fn parallel_encryption_equals_one_thread() {
        let key: Vec<u8> = (0..64u8).rev().collect();
        let k = ImageKey::Luks(
            luks_core::cipher::SectorCipher::new("aes", "xts-plain64", &key, 512).unwrap(),
        );
        let plain: Vec<u8> = (0..(1u32 << 20) + 4096)
            .map(|i| u8::try_from(i % 249).unwrap())
            .collect();
        let mut want = plain.clone();
        let (h, g) = (HostOffset::new(0x30000), GuestOffset::new(0x10000));
        assert!(k.encrypt(h, g, &mut want));
        assert!(want != plain);
        for workers in [1, 2, 3, 8] {
            let mut buf = plain.clone();
            assert!(ParallelEncrypt::new(workers).encrypt(&k, h, g, &mut buf));
            assert!(buf == want, "{workers} workers");
        }
    }
}
