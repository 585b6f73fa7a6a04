//! Twofish (Schneier, Kelsey, Whiting, Wagner, Hall, Ferguson, 1998) with
//! full key-dependent S-boxes: key setup folds the q-permutations, the key
//! S-box bytes and the MDS matrix into four 256-entry `u32` tables, so the
//! round function `g` is four table loads and three XORs.
//!
//! Written from the paper's definitions; the fixed tables (q0, q1 and the
//! MDS columns) are computed at compile time from the nibble permutations
//! and polynomials the paper gives.
//!
//! Plain arithmetic and narrowing casts are fine here: nothing comes from
//! disk except the key and the blocks, every index is bounded by
//! construction (byte values below 256, word positions below 40, key words
//! below 4), and the round arithmetic modulo 2^32 uses wrapping operations.

#![allow(clippy::arithmetic_side_effects, clippy::cast_possible_truncation)]

use zeroize::Zeroize;

/// The q0 and q1 nibble permutations t0..t3 (paper, section 4.3.5).
const QT: [[[u8; 16]; 4]; 2] = [
    [
        [
            0x8, 0x1, 0x7, 0xD, 0x6, 0xF, 0x3, 0x2, 0x0, 0xB, 0x5, 0x9, 0xE, 0xC, 0xA, 0x4,
        ],
        [
            0xE, 0xC, 0xB, 0x8, 0x1, 0x2, 0x3, 0x5, 0xF, 0x4, 0xA, 0x6, 0x7, 0x0, 0x9, 0xD,
        ],
        [
            0xB, 0xA, 0x5, 0xE, 0x6, 0xD, 0x9, 0x0, 0xC, 0x8, 0xF, 0x3, 0x2, 0x4, 0x7, 0x1,
        ],
        [
            0xD, 0x7, 0xF, 0x4, 0x1, 0x2, 0x6, 0xE, 0x9, 0xB, 0x3, 0x0, 0x8, 0x5, 0xC, 0xA,
        ],
    ],
    [
        [
            0x2, 0x8, 0xB, 0xD, 0xF, 0x7, 0x6, 0xE, 0x3, 0x1, 0x9, 0x4, 0x0, 0xA, 0xC, 0x5,
        ],
        [
            0x1, 0xE, 0x2, 0xB, 0x4, 0xC, 0x3, 0x7, 0x6, 0xD, 0xA, 0x5, 0xF, 0x9, 0x0, 0x8,
        ],
        [
            0x4, 0xC, 0x7, 0x5, 0x1, 0x6, 0x9, 0xA, 0x0, 0xE, 0xD, 0x8, 0x2, 0xB, 0x3, 0xF,
        ],
        [
            0xB, 0x9, 0x5, 0x1, 0xC, 0x3, 0xD, 0xE, 0x6, 0x4, 0x7, 0xF, 0x2, 0x0, 0x8, 0xA,
        ],
    ],
];

/// The reduction of the MDS field GF(2^8)/x^8+x^6+x^5+x^3+1, low byte.
const MDS_POLY: u8 = 0x69;
/// The reduction of the RS field GF(2^8)/x^8+x^6+x^3+x^2+1, low byte.
const RS_POLY: u8 = 0x4D;

/// The Reed-Solomon matrix that turns 8 key bytes into one S-box key word.
const RS: [[u8; 8]; 4] = [
    [0x01, 0xA4, 0x55, 0x87, 0x5A, 0x58, 0xDB, 0x9E],
    [0xA4, 0x56, 0x82, 0xF3, 0x1E, 0xC6, 0x68, 0xE5],
    [0x02, 0xA1, 0xFC, 0xC1, 0x47, 0xAE, 0x3D, 0x19],
    [0xA4, 0x55, 0x87, 0x5A, 0x58, 0xDB, 0x9E, 0x03],
];

/// The MDS matrix, row by row.
const MDS: [[u8; 4]; 4] = [
    [0x01, 0xEF, 0x5B, 0x5B],
    [0x5B, 0xEF, 0xEF, 0x01],
    [0xEF, 0x5B, 0x01, 0xEF],
    [0xEF, 0x01, 0xEF, 0x5B],
];

/// Multiplies in GF(2^8) reduced by `x^8 + poly`.
const fn gf_mul(mut a: u8, mut b: u8, poly: u8) -> u8 {
    let mut r = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            r ^= a;
        }
        let hi = a & 0x80;
        a <<= 1;
        if hi != 0 {
            a ^= poly;
        }
        b >>= 1;
    }
    r
}

/// Rotates a nibble right by one.
const fn ror4(x: u8) -> u8 {
    ((x >> 1) | (x << 3)) & 0xF
}

/// One q permutation of one byte from its nibble tables.
const fn q_byte(t: &[[u8; 16]; 4], x: u8) -> u8 {
    let a0 = x >> 4;
    let b0 = x & 0xF;
    let a1 = a0 ^ b0;
    let b1 = (a0 ^ ror4(b0) ^ (a0 << 3)) & 0xF;
    let a2 = t[0][a1 as usize];
    let b2 = t[1][b1 as usize];
    let a3 = a2 ^ b2;
    let b3 = (a2 ^ ror4(b2) ^ (a2 << 3)) & 0xF;
    let a4 = t[2][a3 as usize];
    let b4 = t[3][b3 as usize];
    (b4 << 4) | a4
}

/// q0 and q1 as full byte tables.
const Q: [[u8; 256]; 2] = {
    let mut q = [[0u8; 256]; 2];
    let mut i = 0;
    while i < 256 {
        q[0][i] = q_byte(&QT[0], i as u8);
        q[1][i] = q_byte(&QT[1], i as u8);
        i += 1;
    }
    q
};

/// `MDS_COL[j][y]`: column `j` of the MDS matrix times byte `y`, the four
/// products packed little-endian (row 0 in the low byte).
const MDS_COL: [[u32; 256]; 4] = {
    let mut t = [[0u32; 256]; 4];
    let mut j = 0;
    while j < 4 {
        let mut y = 0;
        while y < 256 {
            let mut w = 0u32;
            let mut i = 0;
            while i < 4 {
                w |= (gf_mul(MDS[i][j], y as u8, MDS_POLY) as u32) << (8 * i);
                i += 1;
            }
            t[j][y] = w;
            y += 1;
        }
        j += 1;
    }
    t
};

/// Which q (0 or 1) byte position `j` goes through at each stage `s` of
/// `h`. Stage `s >= 1` applies its q and then XORs key word `l[s-1]`; stage
/// 0 is the final q, with no key after it. A `k`-word key runs stages
/// `k, k-1, ..., 0` in that order (stage 4 only for 256-bit keys).
const QORD: [[usize; 5]; 4] = [
    [1, 0, 0, 1, 1],
    [0, 0, 1, 1, 0],
    [1, 1, 0, 0, 0],
    [0, 1, 1, 0, 1],
];

/// The function h of the paper for one byte position `j`: byte `x` through
/// the q chain with the key bytes `l[..][j]` of `k` words, before the MDS.
fn h_byte(x: u8, j: usize, l: &[[u8; 4]], k: usize) -> u8 {
    // Stages k..1 run from the input: stage s applies q then XORs l[s-1].
    let mut y = x;
    let mut s = k;
    while s > 0 {
        y = Q[QORD[j][s]][y as usize] ^ l[s - 1][j];
        s -= 1;
    }
    Q[QORD[j][0]][y as usize]
}

/// h(X, L) for a 32-bit `x` (the key schedule's use).
fn h_word(x: u32, l: &[[u8; 4]], k: usize) -> u32 {
    let b = x.to_le_bytes();
    let mut z = 0;
    for (j, &bj) in b.iter().enumerate() {
        z ^= MDS_COL[j][h_byte(bj, j, l, k) as usize];
    }
    z
}

/// A Twofish key schedule: 40 subkeys and the key-dependent g tables.
/// Both are zeroed on drop.
pub(crate) struct Twofish {
    k: [u32; 40],
    s: [[u32; 256]; 4],
}

impl Drop for Twofish {
    fn drop(&mut self) {
        self.k.zeroize();
        for t in &mut self.s {
            t.zeroize();
        }
    }
}

/// Reads word `i` of `b` little-endian.
#[inline(always)]
fn le(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

impl Twofish {
    /// Schedules a 16-, 24- or 32-byte key; `None` for any other length
    /// (the lengths the kernel and cryptsetup accept).
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        let k = match key.len() {
            16 => 2,
            24 => 3,
            32 => 4,
            _ => return None,
        };
        // M_i as bytes; Me = even words, Mo = odd words.
        let mut me = [[0u8; 4]; 4];
        let mut mo = [[0u8; 4]; 4];
        // S_i = RS . m[8i..8i+8]; the g key list is (S_{k-1}, ..., S_0).
        let mut sk = [[0u8; 4]; 4];
        for i in 0..k {
            let m = &key[8 * i..8 * i + 8];
            me[i].copy_from_slice(&m[..4]);
            mo[i].copy_from_slice(&m[4..]);
            let mut s = [0u8; 4];
            for (r, row) in RS.iter().enumerate() {
                s[r] = row
                    .iter()
                    .zip(m)
                    .fold(0, |acc, (&c, &v)| acc ^ gf_mul(c, v, RS_POLY));
            }
            sk[k - 1 - i] = s;
        }
        let mut tf = Self {
            k: [0; 40],
            s: [[0; 256]; 4],
        };
        const RHO: u32 = 0x0101_0101;
        for i in 0..20u32 {
            let a = h_word(2 * i * RHO, &me, k);
            let b = h_word((2 * i + 1) * RHO, &mo, k).rotate_left(8);
            let i = i as usize;
            tf.k[2 * i] = a.wrapping_add(b);
            tf.k[2 * i + 1] = a.wrapping_add(b.wrapping_mul(2)).rotate_left(9);
        }
        for (j, t) in tf.s.iter_mut().enumerate() {
            for (x, e) in t.iter_mut().enumerate() {
                *e = MDS_COL[j][h_byte(x as u8, j, &sk, k) as usize];
            }
        }
        me.zeroize();
        mo.zeroize();
        sk.zeroize();
        Some(tf)
    }

    /// g(X) = h(X, S) through the precomputed tables.
    #[inline(always)]
    fn g(&self, x: u32) -> u32 {
        let b = x.to_le_bytes();
        self.s[0][b[0] as usize]
            ^ self.s[1][b[1] as usize]
            ^ self.s[2][b[2] as usize]
            ^ self.s[3][b[3] as usize]
    }

    /// Encrypts one block in place.
    #[inline]
    pub(crate) fn encrypt(&self, blk: &mut [u8; 16]) {
        let k = &self.k;
        let mut a = le(blk, 0) ^ k[0];
        let mut b = le(blk, 1) ^ k[1];
        let mut c = le(blk, 2) ^ k[2];
        let mut d = le(blk, 3) ^ k[3];
        for r in 0..8 {
            let t0 = self.g(a);
            let t1 = self.g(b.rotate_left(8));
            c = (c ^ t0.wrapping_add(t1).wrapping_add(k[8 + 4 * r])).rotate_right(1);
            d = d.rotate_left(1)
                ^ t0.wrapping_add(t1.wrapping_mul(2))
                    .wrapping_add(k[9 + 4 * r]);
            let t0 = self.g(c);
            let t1 = self.g(d.rotate_left(8));
            a = (a ^ t0.wrapping_add(t1).wrapping_add(k[10 + 4 * r])).rotate_right(1);
            b = b.rotate_left(1)
                ^ t0.wrapping_add(t1.wrapping_mul(2))
                    .wrapping_add(k[11 + 4 * r]);
        }
        let out = [c ^ k[4], d ^ k[5], a ^ k[6], b ^ k[7]];
        for (dst, w) in blk.chunks_exact_mut(4).zip(out) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
    }

    /// Decrypts one block in place.
    #[inline]
    pub(crate) fn decrypt(&self, blk: &mut [u8; 16]) {
        let k = &self.k;
        let mut c = le(blk, 0) ^ k[4];
        let mut d = le(blk, 1) ^ k[5];
        let mut a = le(blk, 2) ^ k[6];
        let mut b = le(blk, 3) ^ k[7];
        for r in (0..8).rev() {
            let t0 = self.g(c);
            let t1 = self.g(d.rotate_left(8));
            a = a.rotate_left(1) ^ t0.wrapping_add(t1).wrapping_add(k[10 + 4 * r]);
            b = (b ^ t0
                .wrapping_add(t1.wrapping_mul(2))
                .wrapping_add(k[11 + 4 * r]))
            .rotate_right(1);
            let t0 = self.g(a);
            let t1 = self.g(b.rotate_left(8));
            c = c.rotate_left(1) ^ t0.wrapping_add(t1).wrapping_add(k[8 + 4 * r]);
            d = (d ^ t0
                .wrapping_add(t1.wrapping_mul(2))
                .wrapping_add(k[9 + 4 * r]))
            .rotate_right(1);
        }
        let out = [a ^ k[0], b ^ k[1], c ^ k[2], d ^ k[3]];
        for (dst, w) in blk.chunks_exact_mut(4).zip(out) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::Twofish;
    use cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        assert_eq!(s.len(), 2 * N, "{s}");
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// The paper's appendix vectors: plaintext zero under the three keys.
    #[test]
    fn paper_known_answers() {
        let cases: [(&[u8], &str); 3] = [
            (&[0u8; 16], "9F589F5CF6122C32B6BFEC2F2AE8C35A"),
            (
                &hex::<24>("0123456789ABCDEFFEDCBA98765432100011223344556677"),
                "CFD1D2E5A9BE9CDF501F13B892BD2248",
            ),
            (
                &hex::<32>("0123456789ABCDEFFEDCBA987654321000112233445566778899AABBCCDDEEFF"),
                "37527BE0052334B89F0CFCCAE87CFA20",
            ),
        ];
        for (key, ct) in cases {
            let tf = Twofish::new(key).unwrap();
            let mut b = [0u8; 16];
            tf.encrypt(&mut b);
            assert_eq!(b, hex::<16>(ct), "key of {} bytes", key.len());
            tf.decrypt(&mut b);
            assert_eq!(b, [0u8; 16]);
        }
    }

    /// The paper's intermediate values for the all-zero 128-bit key: the
    /// first and last subkeys.
    #[test]
    fn paper_subkeys_zero_key() {
        let tf = Twofish::new(&[0u8; 16]).unwrap();
        assert_eq!(
            &tf.k[..4],
            &[0x52C5_4DDE, 0x11F0_626D, 0x7CAC_9D4A, 0x4D1B_4AAA]
        );
        assert_eq!(&tf.k[38..], &[0xF298_311E, 0x696E_A672]);
    }

    /// ECB_TBL's chained vectors: from a zero key and block, each step's
    /// plaintext is the previous ciphertext and its key the previous
    /// plaintext followed by the head of the previous key. Step 49.
    #[test]
    fn paper_iterated_49() {
        for (len, want) in [
            (16, "5D9D4EEFFA9151575524F115815A12E0"),
            (24, "E75449212BEEF9F4A390BD860A640941"),
            (32, "37FE26FF1CF66175F5DDF4C33B97A205"),
        ] {
            let mut key = [0u8; 32];
            let mut pt = [0u8; 16];
            let mut ct = [0u8; 16];
            for _ in 0..49 {
                let tf = Twofish::new(&key[..len]).unwrap();
                ct = pt;
                tf.encrypt(&mut ct);
                let mut back = ct;
                tf.decrypt(&mut back);
                assert_eq!(back, pt);
                key.copy_within(0..len - 16, 16);
                key[..16].copy_from_slice(&pt);
                pt = ct;
            }
            assert_eq!(ct, hex::<16>(want), "key of {len} bytes");
        }
    }

    /// Against the `twofish` crate: many keys and blocks, both directions.
    #[test]
    fn differential_against_twofish_crate() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for round in 0..120 {
            let len = [16, 24, 32][round % 3];
            let mut buf = [0u8; 32];
            buf.iter_mut().for_each(|v| *v = next());
            let key = &buf[..len];
            let ours = Twofish::new(key).unwrap();
            let theirs = twofish::Twofish::new_from_slice(key).unwrap();
            for _ in 0..8 {
                let mut b = [0u8; 16];
                b.iter_mut().for_each(|v| *v = next());
                let mut a = b;
                let mut c = b;
                ours.encrypt(&mut a);
                theirs.encrypt_block((&mut c).into());
                assert_eq!(a, c, "encrypt, key {key:02x?}");
                ours.decrypt(&mut a);
                theirs.decrypt_block((&mut c).into());
                assert_eq!(a, b);
                assert_eq!(c, b);
                let mut d = b;
                let mut e = b;
                ours.decrypt(&mut d);
                theirs.decrypt_block((&mut e).into());
                assert_eq!(d, e, "decrypt, key {key:02x?}");
            }
        }
    }

    #[test]
    fn refuses_other_key_lengths() {
        for len in [0, 1, 8, 15, 17, 20, 23, 25, 31, 33, 64] {
            assert!(Twofish::new(&[0u8; 64][..len]).is_none(), "{len}");
        }
    }
}
