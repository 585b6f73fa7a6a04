//! Hash selection by name, PBKDF2-HMAC and one-shot digests (for the AF
//! diffuse function and ESSIV).

use digest::Digest;

use crate::error::{name_from, PureError, Unsupported};

/// The longest digest of any supported hash (SHA-512, Whirlpool).
pub const MAX_DIGEST_LEN: usize = 64;

/// A hash named in a LUKS header's hash-spec or an ESSIV spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashAlg {
    /// SHA-1 (`sha1`).
    Sha1,
    /// SHA-224 (`sha224`).
    Sha224,
    /// SHA-256 (`sha256`).
    Sha256,
    /// SHA-384 (`sha384`).
    Sha384,
    /// SHA-512 (`sha512`).
    Sha512,
    /// RIPEMD-160 (`ripemd160`).
    Ripemd160,
    /// Whirlpool (`whirlpool`, `wp512`).
    Whirlpool,
    /// Whirlpool cut to 384 bits (`wp384`, the kernel's name).
    Wp384,
    /// Whirlpool cut to 256 bits (`wp256`, the kernel's name).
    Wp256,
}

impl HashAlg {
    /// Looks a hash up by its cryptsetup/kernel name (case-insensitive).
    pub fn from_name(name: &str) -> Result<Self, PureError> {
        let lower = |s: &str| name.eq_ignore_ascii_case(s);
        Ok(if lower("sha1") {
            Self::Sha1
        } else if lower("sha224") {
            Self::Sha224
        } else if lower("sha256") {
            Self::Sha256
        } else if lower("sha384") {
            Self::Sha384
        } else if lower("sha512") {
            Self::Sha512
        } else if lower("ripemd160") || lower("rmd160") {
            Self::Ripemd160
        } else if lower("whirlpool") || lower("wp512") {
            Self::Whirlpool
        } else if lower("wp384") {
            Self::Wp384
        } else if lower("wp256") {
            Self::Wp256
        } else {
            return Err(PureError::Unsupported(Unsupported::Hash(name_from(
                name.as_bytes(),
            ))));
        })
    }

    /// The name cryptsetup writes in the header.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha224 => "sha224",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
            Self::Ripemd160 => "ripemd160",
            Self::Whirlpool => "whirlpool",
            Self::Wp384 => "wp384",
            Self::Wp256 => "wp256",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 | Self::Ripemd160 => 20,
            Self::Sha224 => 28,
            Self::Sha256 | Self::Wp256 => 32,
            Self::Sha384 | Self::Wp384 => 48,
            Self::Sha512 | Self::Whirlpool => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    ///
    /// The truncated Whirlpool variants use full Whirlpool as the PRF
    /// (they exist only for ESSIV).
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            Self::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            Self::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            Self::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            Self::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            Self::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
            Self::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, iterations, out),
            Self::Whirlpool | Self::Wp384 | Self::Wp256 => {
                pbkdf2_hmac::<whirlpool::Whirlpool>(password, salt, iterations, out);
            }
        }
    }

    /// Hashes the concatenation of `parts` and writes the first
    /// `min(out.len(), digest_len)` bytes of the digest into `out`.
    /// Returns how many bytes were written.
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) -> usize {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) -> usize {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            let mut d = h.finalize();
            let n = out.len().min(d.len());
            out[..n].copy_from_slice(&d[..n]);
            zeroize::Zeroize::zeroize(d.as_mut_slice());
            n
        }
        let len = out.len().min(self.digest_len());
        let out = &mut out[..len];
        match self {
            Self::Sha1 => run::<sha1::Sha1>(parts, out),
            Self::Sha224 => run::<sha2::Sha224>(parts, out),
            Self::Sha256 => run::<sha2::Sha256>(parts, out),
            Self::Sha384 => run::<sha2::Sha384>(parts, out),
            Self::Sha512 => run::<sha2::Sha512>(parts, out),
            Self::Ripemd160 => run::<ripemd::Ripemd160>(parts, out),
            Self::Whirlpool | Self::Wp384 | Self::Wp256 => run::<whirlpool::Whirlpool>(parts, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> [u8; 64] {
        let mut out = [0u8; 64];
        for (i, b) in s.as_bytes().chunks(2).enumerate() {
            let v = u8::from_str_radix(core::str::from_utf8(b).unwrap(), 16).unwrap();
            out[i] = v;
        }
        out
    }

    #[test]
    fn rfc6070_pbkdf2_sha1() {
        let cases: [(&[u8], &[u8], u32, &str); 5] = [
            (
                b"password",
                b"salt",
                1,
                "0c60c80f961f0e71f3a9b524af6012062fe037a6",
            ),
            (
                b"password",
                b"salt",
                2,
                "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957",
            ),
            (
                b"password",
                b"salt",
                4096,
                "4b007901b765489abead49d926f721d065a429c1",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "56fa6aa75548099dcc37d7f03425e0c3",
            ),
        ];
        for (p, s, c, want) in cases {
            let n = want.len() / 2;
            let mut out = [0u8; 64];
            HashAlg::Sha1.pbkdf2(p, s, c, &mut out[..n]);
            assert_eq!(out[..n], unhex(want)[..n], "{c}");
        }
    }

    #[test]
    fn rfc7914_pbkdf2_sha256() {
        let mut out = [0u8; 64];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            out,
            unhex("55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783")
        );
        HashAlg::Sha256.pbkdf2(b"Password", b"NaCl", 80000, &mut out);
        assert_eq!(
            out,
            unhex("4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d")
        );
    }

    #[test]
    fn names_round_trip_and_truncation() {
        for h in [
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
            HashAlg::Ripemd160,
            HashAlg::Whirlpool,
            HashAlg::Wp384,
            HashAlg::Wp256,
        ] {
            assert_eq!(HashAlg::from_name(h.name()).unwrap(), h);
        }
        assert!(HashAlg::from_name("md5").is_err());
        let mut full = [0u8; 64];
        let mut short = [0u8; 64];
        assert_eq!(HashAlg::Whirlpool.digest_into(&[b"abc"], &mut full), 64);
        assert_eq!(HashAlg::Wp256.digest_into(&[b"a", b"bc"], &mut short), 32);
        assert_eq!(full[..32], short[..32]);
        assert_eq!(short[32..], [0u8; 32]);
    }
}
