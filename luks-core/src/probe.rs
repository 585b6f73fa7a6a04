//! Naming the format from a device's first bytes, with no feature needed:
//! a plaintext-only build can still tell a LUKS volume from anything else.

/// The LUKS magic at byte 0 of a LUKS1 header and of a LUKS2 primary header.
const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";

/// A LUKS header version found by [`probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LuksVersion {
    /// LUKS1 (version field 1): [`crate::luks1`] reads it (feature `luks1`).
    Luks1,
    /// LUKS2 (version field 2): [`crate::luks2`] reads it (feature `luks2`).
    Luks2,
}

impl LuksVersion {
    /// The header's version field: 1 or 2.
    pub fn number(self) -> u16 {
        match self {
            Self::Luks1 => 1,
            Self::Luks2 => 2,
        }
    }
}

/// Names the LUKS version from the first bytes of a device (at least 8:
/// the magic `LUKS\xba\xbe` and the big-endian version field), without
/// validating anything else. `None` for any other content, a version other
/// than 1 or 2, or fewer than 8 bytes.
///
/// ```
/// use luks_core::{probe, LuksVersion};
///
/// let mut sector = [0u8; 512];
/// sector[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x02");
/// assert_eq!(probe(&sector), Some(LuksVersion::Luks2));
/// assert_eq!(probe(b"QFI\xfb\x00\x00\x00\x03"), None);
/// ```
pub fn probe(first_bytes: &[u8]) -> Option<LuksVersion> {
    if first_bytes.get(..6)? != MAGIC {
        return None;
    }
    match first_bytes.get(6..8)? {
        [0, 1] => Some(LuksVersion::Luks1),
        [0, 2] => Some(LuksVersion::Luks2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(version: [u8; 2]) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[..6].copy_from_slice(&MAGIC);
        s[6..8].copy_from_slice(&version);
        s
    }

    #[test]
    fn names_both_versions() {
        assert_eq!(probe(&head([0, 1])), Some(LuksVersion::Luks1));
        assert_eq!(probe(&head([0, 2])), Some(LuksVersion::Luks2));
        assert_eq!(probe(&head([0, 1])[..8]), Some(LuksVersion::Luks1));
        assert_eq!(LuksVersion::Luks1.number(), 1);
        assert_eq!(LuksVersion::Luks2.number(), 2);
    }

    #[test]
    fn refuses_other_content() {
        assert_eq!(probe(&head([0, 3])), None);
        assert_eq!(probe(&head([1, 1])), None);
        assert_eq!(probe(&head([0, 0])), None);
        // The LUKS2 secondary header's magic is not at byte 0 of a volume.
        let mut skul = head([0, 2]);
        skul[..4].copy_from_slice(b"SKUL");
        assert_eq!(probe(&skul), None);
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03"), None);
        assert_eq!(probe(&[0u8; 512]), None);
        // Too short to hold the version field.
        assert_eq!(probe(&head([0, 1])[..7]), None);
        assert_eq!(probe(&[]), None);
    }

    #[cfg(feature = "luks2")]
    #[test]
    fn agrees_with_the_version_probes() {
        for v in [[0, 1], [0, 2], [0, 3], [2, 0]] {
            let h = head(v);
            assert_eq!(
                probe(&h).map(LuksVersion::number),
                crate::luks2::version(&h)
            );
            assert_eq!(
                probe(&h) == Some(LuksVersion::Luks1),
                crate::luks1::probe(&h)
            );
            assert_eq!(
                probe(&h) == Some(LuksVersion::Luks2),
                crate::luks2::probe(&h)
            );
        }
    }
}
