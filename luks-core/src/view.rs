//! The boilerplate of a binary header view, shared by the LUKS1 `phdr`
//! ([`crate::luks1::Header`]) and the LUKS2 binary header
//! ([`crate::luks2::Header`]).
//!
//! [`header_view!`] defines the view type `Header<T: AsRef<[u8]>>` with
//! `new_unchecked`, `new_checked`, `check_len` (a buffer shorter than the
//! header is [`crate::error::PureError::BufferTooSmall`] naming the
//! structure), `into_inner`, the `magic` and `version` getters both formats
//! have (the magic's bytes, a big-endian `u16`, at the offsets the caller's
//! `field` table gives), and the private byte accessors `b` / `m`. The
//! format's own getters and setters stay in its module.
//!
//! Contract: the magic and version ranges lie inside the header's length,
//! so once `check_len` passed, `magic` and `version` do not panic.

/// Defines `pub struct Header<T: AsRef<[u8]>>`, a view over a header of
/// `$len` bytes whose length errors name `$structure`, with the magic at
/// `$magic` and the big-endian version at `$version` (2-byte range);
/// `$what` completes the sentence "Checks the buffer holds the whole ...".
macro_rules! header_view {
    (
        $(#[$meta:meta])*
        len: $len:expr,
        structure: $structure:expr,
        magic: $magic:expr,
        version: $version:expr,
        what: $what:literal $(,)?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct Header<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> Header<T> {
            /// Wraps a buffer without checks.
            pub fn new_unchecked(buffer: T) -> Self {
                Self { buffer }
            }

            /// Wraps a buffer after [`Header::check_len`].
            pub fn new_checked(buffer: T) -> Result<Self, $crate::error::PureError> {
                let h = Self::new_unchecked(buffer);
                h.check_len()?;
                Ok(h)
            }

            #[doc = concat!("Checks the buffer holds the whole ", $what, ".")]
            pub fn check_len(&self) -> Result<(), $crate::error::PureError> {
                let given = self.buffer.as_ref().len();
                if given < $len {
                    return Err($crate::error::PureError::BufferTooSmall {
                        structure: $structure,
                        needed: $len,
                        given,
                    });
                }
                Ok(())
            }

            /// The buffer.
            pub fn into_inner(self) -> T {
                self.buffer
            }

            fn b(&self) -> &[u8] {
                self.buffer.as_ref()
            }

            /// Magic bytes.
            pub fn magic(&self) -> &[u8] {
                &self.b()[$magic]
            }

            /// Version.
            pub fn version(&self) -> u16 {
                let b = &self.b()[$version];
                u16::from_be_bytes([b[0], b[1]])
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
            fn m(&mut self) -> &mut [u8] {
                self.buffer.as_mut()
            }
        }
    };
}
