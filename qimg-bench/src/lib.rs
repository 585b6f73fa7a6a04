//! Shared fixtures for the criterion benchmarks in `benches/`.
//!
//! Every benchmark group measures qimg beside a baseline in the same run
//! (a plain copy, the raw AES bulk rate, ...) so results read as ratios.

/// Deterministic pseudo-random bytes (xorshift64*), so every run measures
/// the same input.
pub fn fixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        for b in v.to_le_bytes() {
            if out.len() < len {
                out.push(b);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn fixed_bytes_is_deterministic_and_sized() {
        assert_eq!(super::fixed_bytes(13, 7), super::fixed_bytes(13, 7));
        assert_ne!(super::fixed_bytes(64, 7), super::fixed_bytes(64, 8));
        assert_eq!(super::fixed_bytes(13, 7).len(), 13);
    }
}
