//! `Box<T>` forwards to `T`, so `Box<dyn BlockIo<Error = E>>` is a device.

extern crate alloc;

use alloc::boxed::Box;

use super::{forward_block_io, BlockIo};

forward_block_io!(Box<T>);
