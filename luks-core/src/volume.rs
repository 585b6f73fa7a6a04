//! An unlocked LUKS volume over a device: itself a [`BlockIo`] with the
//! cipher's sector size (512 for LUKS1, 512..4096 for LUKS2), the size of
//! the payload, encrypting and decrypting on the way through. IVs count
//! 512-byte units whatever the sector size.

use core::fmt;

use crate::cipher::SectorCipher;
use crate::error::{BadParameter, Error, PureError, Structure};
use crate::io::{chunk_len, BlockIo};

/// Scratch for encryption on write (no allocation).
const SCRATCH: usize = 4096;

/// With `alloc`, scratch for a larger write: one encryption and one
/// device write per MiB instead of one per 4 KiB (a 2 MiB `convert`
/// chunk was 512 writes).
#[cfg(feature = "alloc")]
const BIG_SCRATCH: usize = 1 << 20;

#[cfg(feature = "alloc")]
extern crate alloc;

/// An unlocked volume: payload at `payload_offset` bytes of `dev` up to
/// its end, IV of volume sector `n` = `iv_offset + n`.
pub struct LuksVolume<D: BlockIo> {
    dev: D,
    payload: PayloadCipher,
}

impl<D: BlockIo> fmt::Debug for LuksVolume<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LuksVolume")
            .field("payload_offset", &self.payload.payload_offset)
            .field("size", &self.payload.size)
            .finish_non_exhaustive()
    }
}

/// The cipher half of an unlocked volume ([`LuksVolume::into_parts`]):
/// where the payload lies on the device, its size, and the sector cipher
/// with the volume's IVs. It encrypts and decrypts payload sectors in place
/// through `&self`, so one thread can encrypt the next request while
/// another writes the last one to the device (at
/// [`Self::device_offset`]); the bytes are exactly those
/// [`LuksVolume::write_at`] would write.
pub struct PayloadCipher {
    cipher: SectorCipher,
    payload_offset: u64,
    size: u64,
    iv_offset: u64,
}

impl fmt::Debug for PayloadCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadCipher")
            .field("payload_offset", &self.payload_offset)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl PayloadCipher {
    /// The payload's sector size (the cipher's).
    pub fn sector_size(&self) -> u32 {
        self.cipher.sector_size()
    }

    /// The payload's size in bytes (whole sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The device offset of payload offset 0.
    pub fn payload_offset(&self) -> u64 {
        self.payload_offset
    }

    /// Checks that `len` bytes at payload offset `offset` are whole
    /// sectors inside the payload, and returns their device offset.
    pub fn device_offset(&self, offset: u64, len: usize) -> Result<u64, PureError> {
        let len64 = len as u64;
        let ss = u64::from(self.cipher.sector_size());
        if !offset.is_multiple_of(ss) || !len64.is_multiple_of(ss) {
            return Err(Error::BadParameter(BadParameter::Unaligned {
                offset,
                len: len64,
            }));
        }
        let out = || {
            Error::BadParameter(BadParameter::OutOfRange {
                offset,
                len: len64,
                size: self.size,
            })
        };
        match offset.checked_add(len64) {
            Some(end) if end <= self.size => {}
            _ => return Err(out()),
        }
        self.payload_offset.checked_add(offset).ok_or_else(out)
    }

    /// Encrypts `buf` in place: whole sectors bound for payload offset
    /// `offset` (checked as [`Self::device_offset`]).
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), PureError> {
        self.device_offset(offset, buf.len())?;
        self.cipher.encrypt_sectors(self.iv(offset), buf)
    }

    /// Decrypts `buf` in place: whole sectors read from payload offset
    /// `offset` (checked as [`Self::device_offset`]).
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), PureError> {
        self.device_offset(offset, buf.len())?;
        self.cipher.decrypt_sectors(self.iv(offset), buf)
    }

    fn iv(&self, offset: u64) -> u64 {
        self.iv_offset.wrapping_add(offset / 512)
    }
}

impl<D: BlockIo> LuksVolume<D> {
    /// Opens the payload of `dev` starting at `payload_offset` bytes (a
    /// multiple of 512) to the end of the device, in sectors of the
    /// cipher's size.
    ///
    /// `iv_offset` is added to every sector number (in 512-byte units) to
    /// form the IV: 0 for a raw LUKS volume (IVs count from the start of the
    /// payload), `payload_offset / 512` for containers whose IVs count from
    /// the start of the device.
    pub fn new(
        mut dev: D,
        cipher: SectorCipher,
        payload_offset: u64,
        iv_offset: u64,
    ) -> Result<Self, Error<D::Error>> {
        let dev_size = dev.size().map_err(|source| Error::Io {
            source,
            structure: Structure::Device,
            offset: 0,
        })?;
        if !payload_offset.is_multiple_of(512) {
            return Err(Error::BadParameter(BadParameter::Unaligned {
                offset: payload_offset,
                len: 0,
            }));
        }
        let size = dev_size
            .checked_sub(payload_offset)
            .ok_or(Error::TooSmall {
                structure: Structure::Payload,
                needed: payload_offset,
                size: dev_size,
            })?;
        // A trailing partial sector is not part of the volume.
        let ss = u64::from(cipher.sector_size());
        let size = size.saturating_sub(size.checked_rem(ss).unwrap_or(0));
        Ok(Self {
            dev,
            payload: PayloadCipher {
                cipher,
                payload_offset,
                size,
                iv_offset,
            },
        })
    }

    /// Limits the volume to `len` bytes (a LUKS2 segment with a fixed
    /// size); a device shorter than that keeps its own size.
    pub fn with_len(mut self, len: u64) -> Self {
        self.payload.size = self.payload.size.min(len);
        self
    }

    /// Opens a raw LUKS2 volume: the data segment of `h` on `dev` (the
    /// header device itself, or the data device of a detached header),
    /// IVs from the segment's `iv_tweak` in 512-byte units.
    #[cfg(feature = "luks2")]
    pub fn open_luks2(
        dev: D,
        h: &crate::luks2::Luks2Header,
        key: &crate::luks1::VolumeKey,
    ) -> Result<Self, Error<D::Error>> {
        let seg = h.meta.data_segment().ok_or(Error::corrupt(
            Structure::Luks2Json,
            0,
            crate::error::Problem::Luks2(crate::error::Luks2Problem::Missing("segments")),
        ))?;
        crate::luks2::check_requirements(&h.meta)?;
        let cipher = crate::luks2::data_cipher(&h.meta, key)?;
        let vol = Self::new(dev, cipher, seg.offset, seg.iv_tweak)?;
        Ok(match seg.size {
            Some(len) => vol.with_len(len),
            None => vol,
        })
    }

    /// Unlocks the LUKS volume on `dev` (header and data on the same
    /// device), LUKS1 or LUKS2 as its header says, and opens its payload.
    /// `json` receives LUKS2 JSON text (see
    /// [`crate::luks2::MAX_JSON_LEN`]), `mem` is the Argon2 memory for
    /// LUKS2 key slots that use it; LUKS1 uses neither.
    #[cfg(feature = "luks2")]
    pub fn unlock(
        mut dev: D,
        passphrase: &[u8],
        json: &mut [u8],
        mem: &mut [crate::luks2::Argon2Block],
    ) -> Result<Self, Error<D::Error>> {
        let mut head = [0u8; 8];
        crate::luks1::read(&mut dev, Structure::Luks1Header, 0, &mut head)?;
        match crate::luks2::version(&head) {
            Some(2) => {
                let h = crate::luks2::read_header(&mut dev, json)?;
                let (key, _) = crate::luks2::unlock(&mut dev, &h, passphrase, None, mem)?;
                Self::open_luks2(dev, &h, &key)
            }
            _ => {
                let hdr = crate::luks1::read_header(&mut dev)?;
                let (key, _) = crate::luks1::unlock(&mut dev, &hdr, passphrase, None)?;
                Self::open_luks1(dev, &hdr, &key)
            }
        }
    }

    /// Opens a raw LUKS1 volume: payload at the header's payload offset,
    /// IVs from the start of the payload. For a detached header, pass the
    /// data device and the header parsed from the header device.
    pub fn open_luks1(
        dev: D,
        hdr: &crate::luks1::HeaderRepr,
        key: &crate::luks1::VolumeKey,
    ) -> Result<Self, Error<D::Error>> {
        let cipher = crate::luks1::data_cipher(hdr, key)?;
        Self::new(
            dev,
            cipher,
            u64::from(hdr.payload_offset).saturating_mul(512),
            0,
        )
    }

    /// The device underneath.
    pub fn into_inner(self) -> D {
        self.dev
    }

    /// The device underneath.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// The device and the cipher half, apart: see [`PayloadCipher`].
    pub fn into_parts(self) -> (D, PayloadCipher) {
        (self.dev, self.payload)
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64, Error<D::Error>> {
        self.payload
            .device_offset(offset, len)
            .map_err(PureError::widen)
    }
}

impl<D: BlockIo> BlockIo for LuksVolume<D> {
    type Error = Error<D::Error>;

    fn sector_size(&self) -> u32 {
        self.payload.sector_size()
    }

    fn size(&mut self) -> Result<u64, Self::Error> {
        Ok(self.payload.size)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        let at = self.check(offset, buf.len())?;
        self.dev.read_at(at, buf).map_err(|source| Error::Io {
            source,
            structure: Structure::Payload,
            offset: at,
        })?;
        self.payload
            .cipher
            .decrypt_sectors(self.payload.iv(offset), buf)
            .map_err(PureError::widen)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        self.check(offset, buf.len())?;
        let mut small = [0u8; SCRATCH];
        #[cfg(feature = "alloc")]
        let mut big = alloc::vec::Vec::new();
        #[cfg(feature = "alloc")]
        let scratch: &mut [u8] = if buf.len() > SCRATCH {
            big.resize(buf.len().min(BIG_SCRATCH), 0u8);
            &mut big
        } else {
            &mut small
        };
        #[cfg(not(feature = "alloc"))]
        let scratch: &mut [u8] = &mut small;
        let mut done = 0usize;
        while done < buf.len() {
            let n = chunk_len((buf.len().saturating_sub(done)) as u64, scratch.len());
            let off = offset.saturating_add(done as u64);
            let chunk = &mut scratch[..n];
            chunk.copy_from_slice(&buf[done..done.saturating_add(n)]);
            self.payload
                .cipher
                .encrypt_sectors(self.payload.iv(off), chunk)
                .map_err(PureError::widen)?;
            let at = self.payload.payload_offset.saturating_add(off);
            self.dev.write_at(at, chunk).map_err(|source| Error::Io {
                source,
                structure: Structure::Payload,
                offset: at,
            })?;
            done = done.saturating_add(n);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.dev.flush().map_err(|source| Error::Io {
            source,
            structure: Structure::Device,
            offset: 0,
        })
    }
}
