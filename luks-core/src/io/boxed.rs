//! `Box<T>` forwards to `T`, so `Box<dyn BlockIo<Error = E>>` is a device.

extern crate alloc;

use alloc::boxed::Box;

use super::BlockIo;

impl<T: BlockIo + ?Sized> BlockIo for Box<T> {
    type Error = T::Error;
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn size(&mut self) -> Result<u64, Self::Error> {
        (**self).size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), Self::Error> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        (**self).flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        (**self).write_zeroes(offset, len)
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        (**self).discard(offset, len)
    }
    fn set_size(&mut self, size: u64) -> Result<bool, Self::Error> {
        (**self).set_size(size)
    }
}
