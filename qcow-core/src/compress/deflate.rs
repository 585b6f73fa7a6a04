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

/// A literal (`dist == 0`, `len` = the byte) or a match.
#[derive(Clone, Copy)]
struct Token {
    len: u16,
    dist: u16,
}

fn len_code(len: u16) -> usize {
    if len >= 258 {
        return 28;
    }
    LEN_BASE.iter().rposition(|&b| b <= len).unwrap_or(0)
}

fn dist_code(dist: u16) -> usize {
    DIST_BASE.iter().rposition(|&b| b <= dist).unwrap_or(0)
}

/// Compresses `data` into one raw deflate stream.
pub(crate) fn deflate(data: &[u8]) -> Vec<u8> {
    let tokens = lz77(data);
    let mut w = BitWriter::default();
    let mut blocks = tokens.chunks(BLOCK_TOKENS).peekable();
    if blocks.peek().is_none() {
        write_block(&mut w, &[], true);
    }
    while let Some(b) = blocks.next() {
        write_block(&mut w, b, blocks.peek().is_none());
    }
    w.finish()
}

fn hash(d: &[u8], i: usize) -> usize {
    let v = u32::from(d[i]) << 16 | u32::from(d[i + 1]) << 8 | u32::from(d[i + 2]);
    (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
}

/// Lazy LZ77 over hash chains, distances at most [`WINDOW`].
fn lz77(data: &[u8]) -> Vec<Token> {
    let n = data.len();
    let mut head = vec![NONE; 1 << HASH_BITS];
    let mut prev = vec![NONE; n];
    let mut inserted = 0usize;
    let mut out = Vec::with_capacity(n / 4);
    let mut insert_upto = |p: usize, head: &mut Vec<u32>, prev: &mut Vec<u32>| {
        while inserted < p {
            if inserted + MIN_MATCH <= n && inserted < NONE as usize {
                let h = hash(data, inserted);
                prev[inserted] = head[h];
                head[h] = inserted as u32;
            }
            inserted += 1;
        }
    };
    let find = |i: usize, head: &[u32], prev: &[u32]| -> (usize, usize) {
        if i + MIN_MATCH > n {
            return (0, 0);
        }
        let max = (n - i).min(MAX_MATCH);
        let mut best = (0usize, 0usize);
        let mut j = head[hash(data, i)];
        let mut chain = 0;
        while j != NONE && chain < MAX_CHAIN {
            let ju = j as usize;
            if ju < i {
                let dist = i - ju;
                if dist > WINDOW {
                    break;
                }
                if data[ju + best.0.min(max - 1)] == data[i + best.0.min(max - 1)] {
                    let l = data[ju..ju + max]
                        .iter()
                        .zip(&data[i..i + max])
                        .take_while(|(a, b)| a == b)
                        .count();
                    if l > best.0 {
                        best = (l, dist);
                        if l >= max || l >= NICE_MATCH {
                            break;
                        }
                    }
                }
            }
            j = prev[ju];
            chain += 1;
        }
        best
    };
    let mut i = 0usize;
    while i < n {
        insert_upto(i, &mut head, &mut prev);
        let (l, d) = find(i, &head, &prev);
        if l < MIN_MATCH {
            out.push(Token {
                len: u16::from(data[i]),
                dist: 0,
            });
            i += 1;
            continue;
        }
        if l < LAZY_MATCH && i + 1 < n {
            insert_upto(i + 1, &mut head, &mut prev);
            let (l2, _) = find(i + 1, &head, &prev);
            if l2 > l {
                out.push(Token {
                    len: u16::from(data[i]),
                    dist: 0,
                });
                i += 1;
                continue;
            }
        }
        out.push(Token {
            len: l as u16,
            dist: d as u16,
        });
        i += l;
    }
    out
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
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
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

fn write_block(w: &mut BitWriter, tokens: &[Token], last: bool) {
    let mut lf = vec![0u32; 286];
    let mut df = vec![0u32; 30];
    for t in tokens {
        if t.dist == 0 {
            lf[usize::from(t.len)] += 1;
        } else {
            lf[257 + len_code(t.len)] += 1;
            df[dist_code(t.dist)] += 1;
        }
    }
    lf[256] += 1;
    if df.iter().all(|&x| x == 0) {
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
    let mut cf = vec![0u32; 19];
    for &(s, _) in &runs {
        cf[usize::from(s)] += 1;
    }
    let cl = code_lengths(&cf, 7);
    let cc = canonical(&cl);
    let hclen = CL_ORDER
        .iter()
        .rposition(|&s| cl[s] != 0)
        .map_or(4, |p| (p + 1).max(4));
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
        match s {
            16 => w.bits(u32::from(x), 2),
            17 => w.bits(u32::from(x), 3),
            18 => w.bits(u32::from(x), 7),
            _ => {}
        }
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
            for t in lz77(&data) {
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
            let c = deflate(&data);
            let mut out = vec![0u8; data.len()];
            crate::decompress::inflate_raw(&c, &mut out).unwrap();
            assert!(out == data, "{} bytes", data.len());
        }
        // Repeats within the window compress; repeats beyond it cannot.
        let ins = inputs();
        assert!(deflate(&ins[5]).len() < 6000);
        assert!(deflate(&ins[4]).len() > 60000);
    }
}
