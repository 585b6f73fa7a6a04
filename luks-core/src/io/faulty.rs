//! A test device that records every write and can fail, or lose power, at
//! the Nth one. Used to prove that writers survive a crash at any point.

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::BlockIo;

/// What one recorded mutation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteKind {
    /// `write_at`.
    Data,
    /// `write_zeroes`.
    Zeroes,
    /// `discard`.
    Discard,
    /// `set_size` (the length is the new size).
    SetSize,
    /// `flush` (offset and length are 0).
    Flush,
}

/// One entry of the [`FaultyDevice`] log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRecord {
    /// Mutations before this one (flushes do not count; a flush carries the
    /// count of mutations before it).
    pub index: u64,
    /// What it was.
    pub kind: WriteKind,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (new size for `SetSize`).
    pub len: u64,
}

/// Why a [`FaultyDevice`] request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultyError<E> {
    /// The inner device failed.
    Inner(E),
    /// The injected one-off failure of mutation number `index`.
    Injected {
        /// The failed mutation's number.
        index: u64,
    },
    /// Power was cut at mutation number `index`; nothing works any more.
    PowerLost {
        /// The mutation at which the power went.
        index: u64,
    },
}

impl<E: fmt::Display> fmt::Display for FaultyError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inner(e) => e.fmt(f),
            Self::Injected { index } => write!(f, "injected failure of write #{index}"),
            Self::PowerLost { index } => write!(f, "power lost at write #{index}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for FaultyError<E> {}

/// Old content saved so that unflushed writes can be undone at power loss.
#[derive(Debug)]
struct Undo {
    offset: u64,
    old: Vec<u8>,
    old_size: u64,
}

/// Wraps a device, numbers every mutation (write, write-zeroes, discard,
/// resize) from 0, logs it, and on request fails one of them or cuts the
/// power at one of them.
///
/// At a power cut the mutation that hit it is not applied and every later
/// request fails. With [`drop_unflushed`](Self::drop_unflushed), the
/// mutations since the last flush are also rolled back, modelling a volatile
/// write cache that loses what was never flushed.
#[derive(Debug)]
pub struct FaultyDevice<D> {
    inner: D,
    log: Vec<WriteRecord>,
    next: u64,
    fail_at: Option<u64>,
    cut_at: Option<u64>,
    powered: bool,
    drop_unflushed: bool,
    undo: Vec<Undo>,
}

impl<D: BlockIo> FaultyDevice<D> {
    /// Wraps `inner`; nothing fails until asked.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            log: Vec::new(),
            next: 0,
            fail_at: None,
            cut_at: None,
            powered: true,
            drop_unflushed: false,
            undo: Vec::new(),
        }
    }

    /// Mutation number `index` fails once, without effect.
    pub fn fail_write(mut self, index: u64) -> Self {
        self.fail_at = Some(index);
        self
    }

    /// The power goes at mutation number `index`.
    pub fn cut_power_at(mut self, index: u64) -> Self {
        self.cut_at = Some(index);
        self
    }

    /// At the power cut, roll back the mutations since the last flush.
    pub fn drop_unflushed(mut self, yes: bool) -> Self {
        self.drop_unflushed = yes;
        self
    }

    /// Every mutation and flush so far, in order.
    pub fn log(&self) -> &[WriteRecord] {
        &self.log
    }

    /// How many mutations were applied.
    pub fn mutations(&self) -> u64 {
        self.next
    }

    /// Whether the power is still on.
    pub fn powered(&self) -> bool {
        self.powered
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Gives back the wrapped device, as the power cut left it.
    pub fn into_inner(self) -> D {
        self.inner
    }

    fn alive(&self) -> Result<(), FaultyError<D::Error>> {
        if self.powered {
            Ok(())
        } else {
            Err(FaultyError::PowerLost {
                index: self.cut_at.unwrap_or(self.next),
            })
        }
    }

    /// Gate for a mutation: counts it, applies the injected faults, saves
    /// undo data, and logs it. `Ok(())` means "go ahead".
    fn begin(
        &mut self,
        kind: WriteKind,
        offset: u64,
        len: u64,
    ) -> Result<(), FaultyError<D::Error>> {
        self.alive()?;
        let index = self.next;
        if self.cut_at == Some(index) {
            self.powered = false;
            if self.drop_unflushed {
                self.roll_back()?;
            }
            return Err(FaultyError::PowerLost { index });
        }
        if self.fail_at == Some(index) {
            self.fail_at = None;
            self.next = self.next.saturating_add(1);
            return Err(FaultyError::Injected { index });
        }
        if self.drop_unflushed {
            self.save_undo(kind, offset, len)?;
        }
        // A u64 count of mutations cannot reach its maximum.
        self.next = self.next.saturating_add(1);
        self.log.push(WriteRecord {
            index,
            kind,
            offset,
            len,
        });
        Ok(())
    }

    fn save_undo(
        &mut self,
        kind: WriteKind,
        offset: u64,
        len: u64,
    ) -> Result<(), FaultyError<D::Error>> {
        let old_size = self.inner.size().map_err(FaultyError::Inner)?;
        let (offset, len) = match kind {
            WriteKind::SetSize => (len.min(old_size), old_size.saturating_sub(len)),
            _ => (offset, len),
        };
        let keep = old_size.saturating_sub(offset).min(len);
        let mut old = vec![0u8; super::chunk_len(keep, usize::MAX)];
        if !old.is_empty() {
            self.inner
                .read_at(offset, &mut old)
                .map_err(FaultyError::Inner)?;
        }
        self.undo.push(Undo {
            offset,
            old,
            old_size,
        });
        Ok(())
    }

    fn roll_back(&mut self) -> Result<(), FaultyError<D::Error>> {
        while let Some(u) = self.undo.pop() {
            if !u.old.is_empty() {
                self.inner
                    .write_at(u.offset, &u.old)
                    .map_err(FaultyError::Inner)?;
            }
            self.inner
                .set_size(u.old_size)
                .map_err(FaultyError::Inner)?;
        }
        Ok(())
    }
}

impl<D: BlockIo> BlockIo for FaultyDevice<D> {
    type Error = FaultyError<D::Error>;

    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }

    fn size(&mut self) -> Result<u64, Self::Error> {
        self.alive()?;
        self.inner.size().map_err(FaultyError::Inner)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.alive()?;
        self.inner.read_at(offset, buf).map_err(FaultyError::Inner)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        self.begin(WriteKind::Data, offset, buf.len() as u64)?;
        self.inner.write_at(offset, buf).map_err(FaultyError::Inner)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.alive()?;
        self.inner.flush().map_err(FaultyError::Inner)?;
        self.undo.clear();
        self.log.push(WriteRecord {
            index: self.next,
            kind: WriteKind::Flush,
            offset: 0,
            len: 0,
        });
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        self.begin(WriteKind::Zeroes, offset, len)?;
        self.inner
            .write_zeroes(offset, len)
            .map_err(FaultyError::Inner)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        self.begin(WriteKind::Discard, offset, len)?;
        self.inner.discard(offset, len).map_err(FaultyError::Inner)
    }

    fn set_size(&mut self, size: u64) -> Result<bool, Self::Error> {
        self.begin(WriteKind::SetSize, 0, size)?;
        self.inner.set_size(size).map_err(FaultyError::Inner)
    }
}
