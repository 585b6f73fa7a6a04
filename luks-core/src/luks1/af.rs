//! The LUKS anti-forensic splitter: streaming merge and split, one stripe
//! at a time, never the whole key material in memory.

use zeroize::Zeroize;

use crate::cipher::MAX_KEY_BYTES;
use crate::hash::{HashAlg, MAX_DIGEST_LEN};

/// The LUKS diffuse function over `d` in place: each digest-sized block
/// `j` becomes `H(be32(j) || block)`, a short last block takes the
/// digest's first bytes.
pub(crate) fn diffuse(hash: HashAlg, d: &mut [u8]) {
    let ds = hash.digest_len();
    let mut out = [0u8; MAX_DIGEST_LEN];
    for (j, block) in d.chunks_mut(ds).enumerate() {
        let iv = u32::try_from(j).unwrap_or(u32::MAX).to_be_bytes();
        let n = hash.digest_into(&[&iv, block], &mut out[..block.len()]);
        block[..n].copy_from_slice(&out[..n]);
    }
    out.zeroize();
}

/// Streaming AF state shared by merge and split.
pub(crate) struct AfState {
    hash: HashAlg,
    key_len: usize,
    stripes: u32,
    /// Stripes consumed or produced so far.
    index: u32,
    /// The running diffused XOR.
    d: [u8; MAX_KEY_BYTES],
    /// A partly filled stripe (merge only).
    cur: [u8; MAX_KEY_BYTES],
    filled: usize,
    /// The merged key, once every stripe went in.
    key: [u8; MAX_KEY_BYTES],
    done: bool,
}

impl Drop for AfState {
    fn drop(&mut self) {
        self.d.zeroize();
        self.cur.zeroize();
        self.key.zeroize();
    }
}

impl AfState {
    /// `key_len <= MAX_KEY_BYTES` and `stripes >= 1` (the caller checked).
    pub(crate) fn new(hash: HashAlg, key_len: usize, stripes: u32) -> Self {
        Self {
            hash,
            key_len: key_len.min(MAX_KEY_BYTES),
            stripes,
            index: 0,
            d: [0; MAX_KEY_BYTES],
            cur: [0; MAX_KEY_BYTES],
            filled: 0,
            key: [0; MAX_KEY_BYTES],
            done: false,
        }
    }

    /// Bytes of one stripe: the key length.
    pub(crate) fn key_len(&self) -> usize {
        self.key_len
    }

    /// Whether every stripe was produced (split) or consumed (merge).
    pub(crate) fn all_stripes(&self) -> bool {
        self.index >= self.stripes
    }

    /// Total bytes of split material (without sector padding).
    pub(crate) fn material_len(&self) -> u64 {
        (self.key_len as u64).saturating_mul(u64::from(self.stripes))
    }

    fn take_stripe(&mut self) {
        let k = self.key_len;
        if self.index.saturating_add(1) < self.stripes {
            for (a, b) in self.d[..k].iter_mut().zip(&self.cur[..k]) {
                *a ^= b;
            }
            diffuse(self.hash, &mut self.d[..k]);
        } else if !self.done {
            for i in 0..k {
                self.key[i] = self.d[i] ^ self.cur[i];
            }
            self.done = true;
        }
        self.index = self.index.saturating_add(1);
    }

    /// Merge: feeds decrypted key material; bytes after the last stripe
    /// (sector padding) are ignored.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            let want = self.key_len.saturating_sub(self.filled);
            let n = want.min(data.len());
            self.cur[self.filled..self.filled.saturating_add(n)].copy_from_slice(&data[..n]);
            self.filled = self.filled.saturating_add(n);
            data = &data[n..];
            if self.filled == self.key_len {
                self.take_stripe();
                self.filled = 0;
            }
        }
    }

    /// The merged key, once every stripe went in.
    pub(crate) fn merged(&self) -> Option<&[u8]> {
        self.done.then_some(&self.key[..self.key_len])
    }

    /// Split: writes the next stripe into `out` (`key_len` bytes). Random
    /// stripes come from `random`; the last one is `d ^ key`.
    pub(crate) fn next_stripe(
        &mut self,
        key: &[u8],
        out: &mut [u8],
        random: impl FnOnce(&mut [u8]) -> bool,
    ) -> bool {
        let k = self.key_len;
        if self.index.saturating_add(1) < self.stripes {
            if !random(&mut out[..k]) {
                return false;
            }
            self.cur[..k].copy_from_slice(&out[..k]);
            self.take_stripe();
        } else {
            for i in 0..k {
                out[i] = self.d[i] ^ key[i];
            }
            self.index = self.index.saturating_add(1);
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_round_trips() {
        for (hash, len, stripes) in [
            (HashAlg::Sha1, 16usize, 4000u32),
            (HashAlg::Sha256, 64, 7),
            (HashAlg::Sha512, 48, 3),
            (HashAlg::Whirlpool, 32, 1),
        ] {
            let key: [u8; 64] = core::array::from_fn(|i| (i * 7 + 3) as u8);
            let mut split = AfState::new(hash, len, stripes);
            let mut merge = AfState::new(hash, len, stripes);
            let mut ctr = 0u8;
            let mut all = [0u8; 64];
            for _ in 0..stripes {
                assert!(split.next_stripe(&key[..len], &mut all[..len], |b| {
                    for x in b.iter_mut() {
                        ctr = ctr.wrapping_mul(31).wrapping_add(17);
                        *x = ctr;
                    }
                    true
                }));
                // Feed in odd pieces to exercise the carry.
                let (a, b) = all[..len].split_at(5);
                merge.feed(a);
                merge.feed(b);
            }
            merge.feed(&[0xAA; 100]);
            assert_eq!(merge.merged().unwrap(), &key[..len]);
        }
    }

    #[test]
    fn diffuse_changes_every_block_and_short_tail() {
        let mut d = [0u8; 50];
        diffuse(HashAlg::Sha1, &mut d);
        // Block 0 = SHA1(00000000 || 20 zero bytes), block 2 is a 10-byte tail.
        let mut want = [0u8; 20];
        HashAlg::Sha1.digest_into(&[&[0, 0, 0, 0], &[0u8; 20]], &mut want);
        assert_eq!(d[..20], want);
        HashAlg::Sha1.digest_into(&[&[0, 0, 0, 2], &[0u8; 10]], &mut want);
        assert_eq!(d[40..], want[..10]);
    }
}
