//! Naming the format from an image's first bytes.

use crate::header::MAGIC;

/// A qcow2 header version found by [`probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qcow2Version {
    /// Version 2 (qemu-img's `compat=0.10`): the 72-byte header.
    V2,
    /// Version 3 (`compat=1.1`): feature bits, header length, extensions.
    V3,
}

impl Qcow2Version {
    /// The header's version field: 2 or 3.
    pub fn number(self) -> u32 {
        match self {
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }
}

/// Names the qcow2 version from the first bytes of an image (at least 8:
/// the magic `QFI\xfb` and the big-endian version field), without
/// validating anything else; [`crate::Qcow2::open`] does that. `None` for
/// any other content, fewer than 8 bytes, or a version this crate does not
/// read (1 is the older qcow format; 4 and up do not exist).
///
/// ```
/// use qcow_core::{probe, Qcow2Version};
///
/// let mut sector = [0u8; 512];
/// sector[..8].copy_from_slice(b"QFI\xfb\x00\x00\x00\x03");
/// assert_eq!(probe(&sector), Some(Qcow2Version::V3));
/// assert_eq!(probe(b"LUKS\xba\xbe\x00\x01"), None);
/// ```
pub fn probe(first_bytes: &[u8]) -> Option<Qcow2Version> {
    let word = |at: usize| -> Option<u32> {
        let b: [u8; 4] = first_bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_be_bytes(b))
    };
    if word(0)? != MAGIC {
        return None;
    }
    match word(4)? {
        2 => Some(Qcow2Version::V2),
        3 => Some(Qcow2Version::V3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(version: u32) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[..4].copy_from_slice(b"QFI\xfb");
        s[4..8].copy_from_slice(&version.to_be_bytes());
        s
    }

    #[test]
    fn names_both_versions() {
        assert_eq!(probe(&head(2)), Some(Qcow2Version::V2));
        assert_eq!(probe(&head(3)), Some(Qcow2Version::V3));
        assert_eq!(probe(&head(3)[..8]), Some(Qcow2Version::V3));
        assert_eq!(Qcow2Version::V2.number(), 2);
        assert_eq!(Qcow2Version::V3.number(), 3);
    }

    #[test]
    fn refuses_other_content() {
        for v in [0, 1, 4, 0x0300_0000, u32::MAX] {
            assert_eq!(probe(&head(v)), None, "version {v:#x}");
        }
        let mut other = head(3);
        other[3] = 0xfa;
        assert_eq!(probe(&other), None);
        assert_eq!(probe(b"LUKS\xba\xbe\0\x02"), None);
        assert_eq!(probe(&[0u8; 512]), None);
        assert_eq!(probe(&head(3)[..7]), None);
        assert_eq!(probe(&head(3)[..4]), None);
        assert_eq!(probe(&[]), None);
    }

    /// What `probe` names, the reader opens (and the header it writes is
    /// named by `probe`).
    #[test]
    fn agrees_with_the_header_parser() {
        use crate::header::{Header, HeaderRepr};
        for v in [2u32, 3] {
            let mut repr = HeaderRepr::parse_bytes::<()>(&minimal_v3()).expect("v3 header parses");
            repr.version = v;
            let mut buf = [0u8; 512];
            repr.emit(&mut Header::new_unchecked(&mut buf[..]));
            assert_eq!(probe(&buf).map(Qcow2Version::number), Some(v));
        }
    }

    fn minimal_v3() -> [u8; 512] {
        let mut b = head(3);
        b[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes()); // l1_size
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
        b[100..104].copy_from_slice(&104u32.to_be_bytes()); // header_length
        b
    }
}
