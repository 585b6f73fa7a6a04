//! `qimg compare`: whether two images show the guest the same bytes, as
//! `qemu-img compare` decides it. Exit codes as qemu-img's: 0 identical,
//! 1 different, 2 an image could not be opened, 3 block status (sector
//! allocation) failed, 4 reading data failed.
//!
//! Both images are walked by block status: ranges both report as zero are
//! skipped unread, ranges only one of them allocates are checked for
//! zeroes, and only ranges both allocate are read and compared. A
//! difference is reported at the 512-byte sector where it starts. With
//! `-s` (strict) a size difference or any difference in block status
//! (allocated, zero, data, compressed, host offset known, and the extent
//! that ends an odd-sized raw file) is a mismatch.

use crate::args::SecretArgs;
use crate::convert::CHUNK;
use crate::dev::{BlockStatus, DevError, Source};
use crate::format::Format;
use crate::image::{self, OpenOptions};
use crate::secret::Secrets;
use crate::CliError;

/// qemu-img's exit status when an image (or its secrets) could not be opened.
const EXIT_OPEN: u8 = 2;
/// qemu-img's exit status when asking an image's block status failed.
const EXIT_STATUS: u8 = 3;
/// qemu-img's exit status when reading an image's data failed.
const EXIT_READ: u8 = 4;

/// `e` with qemu-img compare's exit status `code`.
fn with_code(mut e: CliError, code: u8) -> CliError {
    e.code = code;
    e
}

/// Granularity of a reported mismatch offset.
const SECTOR: u64 = 512;
/// [`SECTOR`] as a slice length.
const SECTOR_LEN: usize = 512;

/// The command line of `qimg compare`.
#[derive(Debug, clap::Args)]
pub(crate) struct CompareCmd {
    /// Format of the first image; detected from the file when absent.
    #[arg(short = 'f', value_enum)]
    format1: Option<Format>,
    /// Format of the second image; detected from the file when absent.
    #[arg(short = 'F', value_enum)]
    format2: Option<Format>,
    /// Strict: images of different sizes, or whose allocation differs, are
    /// different even when their content is the same.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: print nothing; only the exit status tells.
    #[arg(short = 'q')]
    quiet: bool,
    /// Read without taking QEMU's shared locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Cache mode of both images (none, directsync, writethrough,
    /// writeback: the default, unsafe).
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    image_opts: crate::args::ImageOptsArg,
    /// The first image.
    file1: String,
    /// The second image.
    file2: String,
}

impl CompareCmd {
    /// Runs `qimg compare`; a failure exits 2 (open), 3 (block status) or
    /// 4 (read), as qemu-img compare.
    pub(crate) fn run(&self) -> Result<u8, CliError> {
        crate::lock::set_force_share(self.force_share);
        compare(self)
    }
}

/// One image being compared.
struct Side {
    name: String,
    src: Box<dyn Source>,
    size: u64,
    /// The real length of a raw file whose length is not whole sectors.
    odd_end: Option<u64>,
    /// The last extent asked about (start, status): the other image may
    /// change status many times inside one long extent of this one, which
    /// is then not asked for again.
    last: Option<(u64, BlockStatus)>,
}

impl Side {
    fn open(
        path: &str,
        format: Option<Format>,
        a: &CompareCmd,
        s: &Secrets,
        cache: crate::cache::CacheMode,
    ) -> Result<Self, CliError> {
        let spec = a
            .image_opts
            .spec(path, format)
            .map_err(|e| with_code(e, EXIT_OPEN))?;
        let o = image::open(
            &spec.path,
            &OpenOptions {
                format: spec.format,
                cache,
                ..OpenOptions::from_args(&a.secrets)
            }
            .with_spec(&spec),
            s,
        )
        .map_err(|e| with_code(e, EXIT_OPEN))?;
        Ok(Self {
            name: path.to_string(),
            src: o.dev,
            // qemu-img compares whole sectors: an odd-sized raw file
            // counts as its size rounded up, reading zero past its end.
            size: o.virtual_size.next_multiple_of(SECTOR),
            odd_end: o.odd_raw_len,
            last: None,
        })
    }

    /// Whether the extent `st` at `off` runs into the unaligned end of an
    /// odd-sized raw file: qemu-img's block status marks that extent, so
    /// strict mode tells it apart from the same bytes in a whole-sector
    /// image.
    fn at_odd_end(&self, off: u64, st: &BlockStatus) -> bool {
        self.odd_end
            .is_some_and(|end| off < end && off.saturating_add(st.len) == end)
    }

    fn err(&self, e: &DevError, code: u8) -> CliError {
        with_code(CliError::io(&self.name, e.to_string()), code)
    }

    fn status(&mut self, off: u64, max: u64) -> Result<BlockStatus, CliError> {
        if let Some((start, st)) = self.last {
            let end = start.saturating_add(st.len);
            if start <= off && off < end {
                let mut rest = st;
                rest.len = (end - off).min(max);
                rest.offset = st.offset.map(|o| o.saturating_add(off - start));
                return Ok(rest);
            }
        }
        let st = self.src.block_status(off, max);
        let mut st = st.map_err(|e| self.err(&e, EXIT_STATUS))?;
        st.len = st.len.clamp(1, max);
        self.last = Some((off, st));
        Ok(st)
    }

    /// Reads `n` bytes at `off` into `buf` (through whole sectors: a raw
    /// file's status can change at any byte, a qcow2 image reads only
    /// whole sectors) and returns them.
    fn read<'b>(&mut self, off: u64, buf: &'b mut Vec<u8>, n: u64) -> Result<&'b [u8], CliError> {
        let start = off / SECTOR * SECTOR;
        let end = off.saturating_add(n).next_multiple_of(SECTOR);
        let span = usize::try_from(end - start).unwrap_or(usize::MAX);
        if buf.len() < span {
            buf.resize(span, 0);
        }
        let r = self.src.read_at(start, &mut buf[..span]);
        r.map_err(|e| self.err(&e, EXIT_READ))?;
        let skip = usize::try_from(off - start).unwrap_or(0);
        let len = usize::try_from(n).unwrap_or(0);
        Ok(&buf[skip..skip + len])
    }
}

/// What qemu-img's strict mode compares of a block status (`odd_end`:
/// see [`Side::at_odd_end`]).
fn status_word(st: &BlockStatus, odd_end: bool) -> [bool; 6] {
    [
        st.present,
        st.zero,
        st.data,
        st.compressed,
        st.offset.is_some(),
        odd_end,
    ]
}

/// Where the first 512-byte sector of `a` (a chunk starting at `off`)
/// that differs from the same sector of `b` starts, if any (sectors count
/// from the chunk's start, which is not always sector-aligned in a raw
/// file). The whole chunk is compared at once (memcmp); only a chunk that
/// differs is walked sector by sector to locate the difference.
fn first_diff(off: u64, a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    a.chunks(SECTOR_LEN)
        .zip(b.chunks(SECTOR_LEN))
        .position(|(x, y)| x != y)
        .map(|i| off + i as u64 * SECTOR)
}

/// Sectors of zeroes to compare a chunk against, a slice at a time.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// Where the first 512-byte sector of `d` (a chunk starting at `off`)
/// holding a byte other than zero starts, if any: as [`first_diff`]
/// against a chunk of zeroes.
fn first_nonzero(off: u64, d: &[u8]) -> Option<u64> {
    let mut at = 0u64;
    for piece in d.chunks(ZEROES.len()) {
        if let Some(s) = first_diff(at, piece, &ZEROES[..piece.len()]) {
            return Some(off + s);
        }
        at += piece.len() as u64;
    }
    None
}

fn compare(a: &CompareCmd) -> Result<u8, CliError> {
    let cache =
        crate::cache::CacheMode::source(a.cache.as_deref()).map_err(|e| with_code(e, EXIT_OPEN))?;
    let secrets = Secrets::parse(&a.secrets.object).map_err(|e| with_code(e, EXIT_OPEN))?;
    let mut one = Side::open(&a.file1, a.format1, a, &secrets, cache)?;
    let mut two = Side::open(&a.file2, a.format2, a, &secrets, cache)?;
    let say = |msg: &str| {
        if !a.quiet {
            println!("{msg}");
        }
    };
    if one.size != two.size && a.strict {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let common = one.size.min(two.size);
    let mut b1 = vec![0u8; CHUNK];
    let mut b2 = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < common {
        // Each side's status over all of its own remaining bytes, as
        // qemu-img asks; the chunk is where both hold, at most CHUNK.
        let s1 = one.status(off, one.size - off)?;
        let s2 = two.status(off, two.size - off)?;
        let n = s1.len.min(s2.len).min(common - off).min(CHUNK as u64);
        let w1 = status_word(&s1, one.at_odd_end(off, &s1));
        let w2 = status_word(&s2, two.at_odd_end(off, &s2));
        if a.strict && w1 != w2 {
            say(&format!("Strict mode: Offset {off} block status mismatch!"));
            return Ok(1);
        }
        let mismatch = if s1.zero && s2.zero {
            None
        } else if s1.present && s2.present {
            let d1 = one.read(off, &mut b1, n)?;
            let d2 = two.read(off, &mut b2, n)?;
            first_diff(off, d1, d2)
        } else if s1.present {
            let d1 = one.read(off, &mut b1, n)?;
            first_nonzero(off, d1)
        } else if s2.present {
            let d2 = two.read(off, &mut b2, n)?;
            first_nonzero(off, d2)
        } else {
            None
        };
        if let Some(at) = mismatch {
            say(&format!("Content mismatch at offset {at}!"));
            return Ok(1);
        }
        off += n;
    }
    // The longer image's extra area must read as zero.
    if one.size != two.size {
        say("Warning: Image size mismatch!");
    }
    let longer = if one.size > two.size {
        &mut one
    } else {
        &mut two
    };
    while off < longer.size {
        let max = (longer.size - off).min(CHUNK as u64);
        let st = longer.status(off, max)?;
        let n = st.len;
        if st.present && !st.zero {
            let d = longer.read(off, &mut b1, n)?;
            if let Some(at) = first_nonzero(off, d) {
                say(&format!("Content mismatch at offset {at}!"));
                return Ok(1);
            }
        }
        off += n;
    }
    say("Images are identical.");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_offsets_are_sector_starts() {
        let a = [0u8; 1024];
        let mut b = [0u8; 1024];
        b[700] = 1;
        assert_eq!(first_diff(4096, &a, &b), Some(4096 + 512));
        assert_eq!(first_nonzero(4096, &b), Some(4096 + 512));
        assert_eq!(first_diff(4096, &a, &a), None);
        assert_eq!(first_nonzero(4096, &a), None);
    }

    #[test]
    fn mismatch_offsets_past_the_first_zero_slice() {
        // A chunk longer than the zero slice, with a short last sector.
        let n = ZEROES.len() * 2 + 700;
        let a = vec![0u8; n];
        let mut b = vec![0u8; n];
        assert_eq!(first_nonzero(100, &b), None);
        b[n - 1] = 7;
        let last = (n as u64 - 1) / SECTOR * SECTOR;
        assert_eq!(first_nonzero(100, &b), Some(100 + last));
        assert_eq!(first_diff(100, &a, &b), Some(100 + last));
        b[ZEROES.len() + 3] = 1;
        let want = 100 + ZEROES.len() as u64;
        assert_eq!(first_nonzero(100, &b), Some(want));
        assert_eq!(first_diff(100, &a, &b), Some(want));
    }
}
