//! Reading and poking the big-endian fields of an image's bytes, for the
//! tests that damage good images (`check_corpus`, `hostile`): raw field
//! access at file offsets, the qcow2 header fields by their
//! `qcow_core::header::field` ranges, and the L1/L2 walk to a guest
//! cluster's entry. Offsets are `u64` file offsets; everything panics on
//! an offset outside the bytes.

use std::ops::Range;

use qcow_core::entry::OFFSET_MASK;
use qcow_core::header::{field, HeaderRepr};

fn span(off: u64, len: usize) -> Range<usize> {
    let o = usize::try_from(off).unwrap();
    o..o + len
}

/// The big-endian `u16` at `off`.
pub fn get16(d: &[u8], off: u64) -> u16 {
    u16::from_be_bytes(d[span(off, 2)].try_into().unwrap())
}

/// The big-endian `u32` at `off`.
pub fn get32(d: &[u8], off: u64) -> u32 {
    u32::from_be_bytes(d[span(off, 4)].try_into().unwrap())
}

/// The big-endian `u64` at `off`.
pub fn get64(d: &[u8], off: u64) -> u64 {
    u64::from_be_bytes(d[span(off, 8)].try_into().unwrap())
}

/// Writes `v` big-endian at `off`.
pub fn put16(d: &mut [u8], off: u64, v: u16) {
    d[span(off, 2)].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` big-endian at `off`.
pub fn put32(d: &mut [u8], off: u64, v: u32) {
    d[span(off, 4)].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` big-endian at `off`.
pub fn put64(d: &mut [u8], off: u64, v: u64) {
    d[span(off, 8)].copy_from_slice(&v.to_be_bytes());
}

/// The value of the 4- or 8-byte header field `f` (a
/// `qcow_core::header::field` range).
pub fn get_field(d: &[u8], f: Range<usize>) -> u64 {
    match f.len() {
        4 => u64::from(u32::from_be_bytes(d[f].try_into().unwrap())),
        8 => u64::from_be_bytes(d[f].try_into().unwrap()),
        n => panic!("a header field of {n} bytes"),
    }
}

/// Writes `v` into the 4- or 8-byte header field `f` (a
/// `qcow_core::header::field` range); `v` must fit a 4-byte field.
pub fn put_field(d: &mut [u8], f: Range<usize>, v: u64) {
    match f.len() {
        4 => d[f].copy_from_slice(&u32::try_from(v).unwrap().to_be_bytes()),
        8 => d[f].copy_from_slice(&v.to_be_bytes()),
        n => panic!("a header field of {n} bytes"),
    }
}

/// The parsed qcow2 header of an image that is still good.
pub fn header(d: &[u8]) -> HeaderRepr {
    HeaderRepr::parse_bytes::<()>(&d[..512]).unwrap()
}

/// Byte offset of active L1 entry `i`, from the raw header field.
pub fn l1_pos(d: &[u8], i: u64) -> u64 {
    get_field(d, field::L1_TABLE_OFFSET) + i * 8
}

/// Offset of the L2 table active L1 entry `i` names (0: none).
pub fn l2_table(d: &[u8], i: u64) -> u64 {
    get64(d, l1_pos(d, i)) & OFFSET_MASK
}
