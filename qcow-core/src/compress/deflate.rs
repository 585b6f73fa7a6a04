//! A raw deflate encoder (RFC 1951) whose back-references never reach
//! further than [`WINDOW`] bytes, for readers that inflate with window
//! bits 12 (qemu-img). `miniz_oxide` only offers a 32 KiB window, and
//! resetting its dictionary every 4 KiB costs about a tenth of the output.
//!
//! Lazy LZ77 matching over hash chains (zlib level 6's search limits),
//! then dynamic Huffman blocks of at most [`BLOCK_TOKENS`] tokens with
//! length-limited canonical codes.
//!
//! Plain arithmetic and narrowing casts are fine here: the input is the
//! caller's buffer, not on-disk data, and every value is bounded by
//! construction (positions below the input length, match lengths up to
//! 258, distances up to 4096, code lengths up to 15, counts up to 286).
//! Positions past `u32::MAX` are never entered in the hash chains, so a
//! huge input only compresses worse there.

#![allow(clippy::arithmetic_side_effects, clippy::cast_possible_truncation)]

extern crate alloc;

use alloc::collections::BinaryHeap;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

/// Largest back-reference distance (window bits 12).
const WINDOW: usize = 4096;
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
const HASH_BITS: u32 = 15;
/// Hash chain links followed per search.
const MAX_CHAIN: usize = 128;
/// A match this long ends the search.
const NICE_MATCH: usize = 128;
/// Matches shorter than this are checked against the next position.
const LAZY_MATCH: usize = 16;
/// A match at least this long searches only a quarter of the chain for a
/// longer one at the next position (zlib level 6's `good_length`).
const GOOD_MATCH: usize = 8;
/// Tokens per Huffman block.
const BLOCK_TOKENS: usize = 32768;
const NONE: u32 = u32::MAX;

/// Base match length of length codes 257..=285.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
/// Extra bits of length codes 257..=285.
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distance of distance codes 0..=29.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
/// Extra bits of distance codes 0..=29.
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// Order in which code length code lengths are sent.
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Positions kept in the hash chain ring: twice the window, so a link is
/// never overwritten while its position can still be reached.
const RING: usize = 2 * WINDOW;

/// A literal (`dist == 0`, `len` = the byte) or a match.
#[derive(Clone, Copy)]
struct Token {
    len: u16,
    dist: u16,
}

/// Length code (0..=28, i.e. symbol 257 + code) of each match length.
const LEN_CODE: [u8; MAX_MATCH + 1] = {
    let mut t = [0u8; MAX_MATCH + 1];
    let mut c = 0;
    while c < 29 {
        let lo = LEN_BASE[c] as usize;
        let hi = if c == 28 {
            MAX_MATCH
        } else {
            lo + (1 << LEN_EXTRA[c]) - 1
        };
        let mut l = lo;
        while l <= hi && l <= MAX_MATCH {
            t[l] = c as u8;
            l += 1;
        }
        c += 1;
    }
    // 258 has its own code (28), not 227's last extra value.
    t[MAX_MATCH] = 28;
    t
};

/// Distance code of each distance up to [`WINDOW`].
const DIST_CODE: [u8; WINDOW + 1] = {
    let mut t = [0u8; WINDOW + 1];
    let mut c = 0;
    while c < 30 {
        let lo = DIST_BASE[c] as usize;
        let mut d = lo;
        while d < lo + (1 << DIST_EXTRA[c]) && d <= WINDOW {
            t[d] = c as u8;
            d += 1;
        }
        c += 1;
    }
    t
};

fn len_code(len: u16) -> usize {
    usize::from(LEN_CODE[usize::from(len).min(MAX_MATCH)])
}

fn dist_code(dist: u16) -> usize {
    usize::from(DIST_CODE[usize::from(dist).min(WINDOW)])
}

/// Compresses `data` into one raw deflate stream; `None` as soon as the
/// stream is known to need more than `limit` bytes (after each block, and
/// before writing one whose exact size would pass it).
pub(crate) fn deflate(data: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut w = BitWriter::default();
    let mut block: Vec<Token> = Vec::with_capacity(BLOCK_TOKENS.min(data.len() + 1));
    let complete = lz77(data, |t| {
        if block.len() == BLOCK_TOKENS {
            if !write_block(&mut w, &block, false, limit) {
                return false;
            }
            block.clear();
        }
        block.push(t);
        true
    });
    if !complete || !write_block(&mut w, &block, true, limit) {
        return None;
    }
    let out = w.finish();
    (out.len() <= limit).then_some(out)
}

fn hash(d: &[u8], i: usize) -> usize {
    let v = u32::from(d[i]) << 16 | u32::from(d[i + 1]) << 8 | u32::from(d[i + 2]);
    (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
}

/// How many leading bytes of `data[a..]` and `data[b..]` agree, up to `max`
/// (both ranges lie inside `data`), eight bytes at a time.
fn common(data: &[u8], a: usize, b: usize, max: usize) -> usize {
    let (x, y) = (&data[a..a + max], &data[b..b + max]);
    let mut k = 0;
    for (p, q) in x.chunks_exact(8).zip(y.chunks_exact(8)) {
        let d = u64::from_le_bytes(p.try_into().unwrap_or([0; 8]))
            ^ u64::from_le_bytes(q.try_into().unwrap_or([0; 8]));
        if d != 0 {
            return k + (d.trailing_zeros() / 8) as usize;
        }
        k += 8;
    }
    k + x[k..]
        .iter()
        .zip(&y[k..])
        .take_while(|(p, q)| p == q)
        .count()
}

/// Hash chains over the input: `head` holds each hash's newest position,
/// `prev` (a ring of [`RING`] links) the one before each position.
struct Chains {
    head: Vec<u32>,
    prev: Vec<u32>,
    /// Positions below this one are in the chains.
    inserted: usize,
}

impl Chains {
    /// Enters every position below `p` that starts a whole 3-byte string.
    fn insert_upto(&mut self, data: &[u8], p: usize) {
        let last = p
            .min(data.len().saturating_sub(MIN_MATCH - 1))
            .min(NONE as usize);
        while self.inserted < last {
            let i = self.inserted;
            let h = hash(data, i);
            self.prev[i % RING] = self.head[h];
            self.head[h] = i as u32;
            self.inserted += 1;
        }
        self.inserted = self.inserted.max(p);
    }

    /// The longest match for position `i` that is longer than `better`
    /// (0 when none is): `(length, distance)`. Candidates are visited
    /// newest first and the first of the longest wins; the search stops
    /// after [`MAX_CHAIN`] links (a quarter of them when `better` is at
    /// least [`GOOD_MATCH`]), at [`NICE_MATCH`], or past the window.
    /// Positions below `i` must be in the chains; `i` joins them here when
    /// it is next in line, so its hash is computed once.
    fn find(&mut self, data: &[u8], i: usize, better: usize) -> (usize, usize) {
        let chain_limit = if better >= GOOD_MATCH {
            MAX_CHAIN / 4
        } else {
            MAX_CHAIN
        };
        let n = data.len();
        if i + MIN_MATCH > n {
            return (0, 0);
        }
        let max = (n - i).min(MAX_MATCH);
        if better >= max {
            return (0, 0);
        }
        let mut best = (better, 0usize);
        let h = hash(data, i);
        let mut j = self.head[h];
        if self.inserted == i && i < NONE as usize {
            self.prev[i % RING] = j;
            self.head[h] = i as u32;
            self.inserted += 1;
        }
        let mut chain = 0;
        while j != NONE && chain < chain_limit {
            let ju = j as usize;
            let dist = i - ju;
            if dist > WINDOW {
                break;
            }
            // A longer match must agree at the current best length.
            if data[ju + best.0] == data[i + best.0] {
                let l = common(data, ju, i, max);
                if l > best.0 {
                    best = (l, dist);
                    if l >= max || l >= NICE_MATCH {
                        break;
                    }
                }
            }
            j = self.prev[ju % RING];
            chain += 1;
        }
        if best.1 == 0 {
            (0, 0)
        } else {
            best
        }
    }
}

/// Lazy LZ77 over hash chains, distances at most [`WINDOW`]: hands each
/// token to `emit`, and stops early (returning false) when `emit` does.
fn lz77(data: &[u8], mut emit: impl FnMut(Token) -> bool) -> bool {
    let n = data.len();
    let mut c = Chains {
        head: vec![NONE; 1 << HASH_BITS],
        prev: vec![NONE; RING],
        inserted: 0,
    };
    let literal = |b: u8| Token {
        len: u16::from(b),
        dist: 0,
    };
    let mut i = 0usize;
    // The match already found at `i` by the previous lazy step.
    let mut ahead: Option<(usize, usize)> = None;
    while i < n {
        c.insert_upto(data, i);
        let (l, d) = ahead.take().unwrap_or_else(|| c.find(data, i, 0));
        if l < MIN_MATCH {
            if !emit(literal(data[i])) {
                return false;
            }
            i += 1;
            continue;
        }
        if l < LAZY_MATCH && i + 1 < n {
            c.insert_upto(data, i + 1);
            let next = c.find(data, i + 1, l);
            if next.0 > l {
                if !emit(literal(data[i])) {
                    return false;
                }
                ahead = Some(next);
                i += 1;
                continue;
            }
        }
        if !emit(Token {
            len: l as u16,
            dist: d as u16,
        }) {
            return false;
        }
        i += l;
    }
    true
}

/// Huffman code lengths for `freqs`, none longer than `limit`.
fn code_lengths(freqs: &[u32], limit: u8) -> Vec<u8> {
    let mut f: Vec<u64> = freqs.iter().map(|&x| u64::from(x)).collect();
    loop {
        let lens = huffman(&f);
        if lens.iter().all(|&l| l <= limit) {
            return lens;
        }
        // Flatten the distribution and try again.
        for x in f.iter_mut().filter(|x| **x > 0) {
            *x = (*x >> 1).max(1);
        }
    }
}

fn huffman(f: &[u64]) -> Vec<u8> {
    let mut lens = vec![0u8; f.len()];
    let used: Vec<usize> = (0..f.len()).filter(|&i| f[i] > 0).collect();
    match used.len() {
        0 => return lens,
        1 => {
            lens[used[0]] = 1;
            return lens;
        }
        _ => {}
    }
    // Nodes: leaves first, then internal nodes with their two children.
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(k, &s)| Reverse((f[s], k)))
        .collect();
    while heap.len() > 1 {
        let (Some(Reverse((fa, a))), Some(Reverse((fb, b)))) = (heap.pop(), heap.pop()) else {
            break;
        };
        let id = parent.len();
        parent.push(usize::MAX);
        parent[a] = id;
        parent[b] = id;
        heap.push(Reverse((fa + fb, id)));
    }
    // Depth of each node, computed from the root down (parents have
    // higher ids than their children).
    let mut depth = vec![0u8; parent.len()];
    for id in (0..parent.len()).rev() {
        if parent[id] != usize::MAX {
            depth[id] = depth[parent[id]].saturating_add(1);
        }
    }
    for (k, &s) in used.iter().enumerate() {
        lens[s] = depth[k];
    }
    lens
}

/// Canonical codes (bit-reversed for LSB-first output) for `lens`.
fn canonical(lens: &[u8]) -> Vec<u16> {
    let mut count = [0u16; 16];
    for &l in lens {
        count[usize::from(l)] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for b in 1..16 {
        code = (code + count[b - 1]) << 1;
        next[b] = code;
    }
    lens.iter()
        .map(|&l| {
            if l == 0 {
                return 0;
            }
            let c = next[usize::from(l)];
            next[usize::from(l)] += 1;
            c.reverse_bits() >> (16 - l)
        })
        .collect()
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn bits(&mut self, v: u32, n: u8) {
        self.acc |= u64::from(v) << self.n;
        self.n += u32::from(n);
        if self.n >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.n -= 32;
        }
    }
    /// Bits written so far.
    fn bit_len(&self) -> u64 {
        self.out.len() as u64 * 8 + u64::from(self.n)
    }
    fn finish(mut self) -> Vec<u8> {
        while self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n = self.n.saturating_sub(8);
        }
        self.out
    }
}

/// Run-length codes (16, 17, 18) of a code length sequence: `(symbol,
/// extra value)`.
fn rle(lens: &[u8]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let l = lens[i];
        let run = lens[i..].iter().take_while(|&&x| x == l).count();
        if l == 0 && run >= 11 {
            let r = run.min(138);
            out.push((18, (r - 11) as u8));
            i += r;
        } else if l == 0 && run >= 3 {
            out.push((17, (run - 3) as u8));
            i += run;
        } else if l != 0 && run >= 4 {
            out.push((l, 0));
            let r = (run - 1).min(6);
            out.push((16, (r - 3) as u8));
            i += 1 + r;
        } else {
            out.push((l, 0));
            i += 1;
        }
    }
    out
}

/// Writes one dynamic Huffman block of `tokens` (the final one if `last`),
/// unless the stream would then need more than `limit` bytes: false, and
/// nothing written, in that case.
fn write_block(w: &mut BitWriter, tokens: &[Token], last: bool, limit: usize) -> bool {
    let mut lf = [0u32; 286];
    let mut df = [0u32; 30];
    for t in tokens {
        if t.dist == 0 {
            lf[usize::from(t.len)] += 1;
        } else {
            lf[257 + len_code(t.len)] += 1;
            df[dist_code(t.dist)] += 1;
        }
    }
    lf[256] += 1;
    let matches = df.iter().any(|&x| x != 0);
    if !matches {
        // One distance code must exist (a single code of length 1 is fine).
        df[0] = 1;
    }
    let ll = code_lengths(&lf, 15);
    let dl = code_lengths(&df, 15);
    let hlit = ll
        .iter()
        .rposition(|&l| l != 0)
        .map_or(257, |p| (p + 1).max(257));
    let hdist = dl.iter().rposition(|&l| l != 0).map_or(1, |p| p + 1);
    let mut seq = Vec::with_capacity(hlit + hdist);
    seq.extend_from_slice(&ll[..hlit]);
    seq.extend_from_slice(&dl[..hdist]);
    let runs = rle(&seq);
    let mut cf = [0u32; 19];
    for &(s, _) in &runs {
        cf[usize::from(s)] += 1;
    }
    let cl = code_lengths(&cf, 7);
    let hclen = CL_ORDER
        .iter()
        .rposition(|&s| cl[s] != 0)
        .map_or(4, |p| (p + 1).max(4));
    // The block's exact size in bits, before writing any of it.
    let extra = |s: u8| match s {
        16 => 2,
        17 => 3,
        18 => 7,
        _ => 0,
    };
    let mut bits = 3 + 5 + 5 + 4 + 3 * hclen as u64;
    bits += cf
        .iter()
        .zip(&cl)
        .map(|(&f, &l)| u64::from(f) * u64::from(l))
        .sum::<u64>();
    bits += runs.iter().map(|&(s, _)| extra(s)).sum::<u64>();
    bits += lf
        .iter()
        .zip(&ll)
        .map(|(&f, &l)| u64::from(f) * u64::from(l))
        .sum::<u64>();
    bits += (0..29)
        .map(|c| u64::from(lf[257 + c]) * u64::from(LEN_EXTRA[c]))
        .sum::<u64>();
    if matches {
        bits += (0..30)
            .map(|d| u64::from(df[d]) * (u64::from(dl[d]) + u64::from(DIST_EXTRA[d])))
            .sum::<u64>();
    }
    if (w.bit_len() + bits).div_ceil(8) > limit as u64 {
        return false;
    }
    let cc = canonical(&cl);
    w.bits(u32::from(last), 1);
    w.bits(2, 2);
    w.bits((hlit - 257) as u32, 5);
    w.bits((hdist - 1) as u32, 5);
    w.bits((hclen - 4) as u32, 4);
    for &s in &CL_ORDER[..hclen] {
        w.bits(u32::from(cl[s]), 3);
    }
    for &(s, x) in &runs {
        let su = usize::from(s);
        w.bits(u32::from(cc[su]), cl[su]);
        w.bits(u32::from(x), extra(s) as u8);
    }
    let lc = canonical(&ll);
    let dc = canonical(&dl);
    for t in tokens {
        if t.dist == 0 {
            let s = usize::from(t.len);
            w.bits(u32::from(lc[s]), ll[s]);
        } else {
            let c = len_code(t.len);
            w.bits(u32::from(lc[257 + c]), ll[257 + c]);
            w.bits(u32::from(t.len - LEN_BASE[c]), LEN_EXTRA[c]);
            let d = dist_code(t.dist);
            w.bits(u32::from(dc[d]), dl[d]);
            w.bits(u32::from(t.dist - DIST_BASE[d]), DIST_EXTRA[d]);
        }
    }
    w.bits(u32::from(lc[256]), ll[256]);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<Vec<u8>> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        let random: Vec<u8> = (0..65536).map(|_| rnd()).collect();
        // Repeats exactly every 5000 bytes: just out of the window.
        let far: Vec<u8> = (0..65536).map(|i| random[i % 5000]).collect();
        // Repeats every 4096 bytes: just inside it.
        let near: Vec<u8> = (0..65536).map(|i| random[i % 4096]).collect();
        let text: Vec<u8> = (0..(2 << 20))
            .map(|i: usize| b"the quick brown fox jumps over the lazy dog "[(i * 7 / 5) % 44])
            .collect();
        vec![Vec::new(), vec![7], vec![0; 65536], random, far, near, text]
    }

    #[test]
    fn tokens_rebuild_the_input_within_the_window() {
        for data in inputs() {
            let mut out: Vec<u8> = Vec::new();
            let mut tokens = Vec::new();
            assert!(lz77(&data, |t| {
                tokens.push(t);
                true
            }));
            for t in tokens {
                if t.dist == 0 {
                    out.push(t.len as u8);
                } else {
                    let d = usize::from(t.dist);
                    assert!(d <= WINDOW, "distance {d}");
                    assert!((3..=258).contains(&usize::from(t.len)));
                    for _ in 0..t.len {
                        out.push(out[out.len() - d]);
                    }
                }
            }
            assert!(out == data);
        }
    }

    #[test]
    fn streams_inflate_back() {
        for data in inputs() {
            let c = deflate(&data, usize::MAX).unwrap();
            let mut out = vec![0u8; data.len()];
            crate::decompress::inflate_raw(&c, &mut out).unwrap();
            assert!(out == data, "{} bytes", data.len());
        }
        // Repeats within the window compress; repeats beyond it cannot.
        let ins = inputs();
        assert!(deflate(&ins[5], usize::MAX).unwrap().len() < 6000);
        assert!(deflate(&ins[4], usize::MAX).unwrap().len() > 60000);
    }

    #[test]
    fn the_limit_is_exact() {
        // A stream of exactly `limit` bytes is kept; one byte less of room
        // gives up, whether the last block or an earlier one passes it.
        for data in inputs() {
            let full = deflate(&data, usize::MAX).unwrap();
            assert_eq!(deflate(&data, full.len()).as_ref(), Some(&full));
            if !full.is_empty() {
                assert_eq!(deflate(&data, full.len() - 1), None, "{} bytes", data.len());
            }
        }
        // Random bytes never fit in a cluster minus one byte (QEMU's rule).
        let random = &inputs()[3];
        assert_eq!(deflate(random, random.len() - 1), None);
        // Gives up early: 2 MiB of text cannot fit in 100 bytes.
        assert_eq!(deflate(&inputs()[6], 100), None);
    }

    #[test]
    fn code_tables_match_the_rfc_ranges() {
        for len in 3u16..=258 {
            let want = if len == 258 {
                28
            } else {
                LEN_BASE.iter().rposition(|&b| b <= len).unwrap()
            };
            assert_eq!(len_code(len), want, "length {len}");
            let c = len_code(len);
            assert!(len - LEN_BASE[c] < 1 << LEN_EXTRA[c] || (c == 28 && len == 258));
        }
        for dist in 1u16..=4096 {
            let want = DIST_BASE.iter().rposition(|&b| b <= dist).unwrap();
            assert_eq!(dist_code(dist), want, "distance {dist}");
        }
    }
}
