//! Tests of the adapters and the byte helpers.

#![allow(clippy::cast_possible_truncation)] // test patterns wrap on purpose
#![allow(clippy::arithmetic_side_effects)] // test sizes and offsets are small constants

use super::*;

/// Every (offset, len) pair over a 4-sector device, through the bounce
/// helper, against a plain slice model.
#[test]
fn read_write_bytes_match_a_slice_model() {
    for ss in [1u32, 2, 8, 16] {
        let n = (ss * 4) as usize;
        let mut model = [0u8; 64];
        let mut backing = [0u8; 64];
        for (i, b) in model.iter_mut().enumerate().take(n) {
            *b = i as u8;
        }
        backing[..n].copy_from_slice(&model[..n]);
        let mut dev = MemDevice::new(&mut backing[..n])
            .with_sector_size(ss)
            .unwrap();
        let mut bounce = [0u8; 16];
        let mut stamp = 100u8;
        for off in 0..n {
            for len in 0..=(n - off) {
                let mut got = [0u8; 64];
                read_bytes(&mut dev, off as u64, &mut got[..len], &mut bounce).unwrap();
                assert_eq!(
                    &got[..len],
                    &model[off..off + len],
                    "read ss={ss} off={off} len={len}"
                );
                stamp = stamp.wrapping_add(1);
                let data = [stamp; 64];
                write_bytes(&mut dev, off as u64, &data[..len], &mut bounce).unwrap();
                model[off..off + len].copy_from_slice(&data[..len]);
                assert_eq!(
                    dev.bytes(),
                    &model[..n],
                    "write ss={ss} off={off} len={len}"
                );
            }
        }
    }
}

#[test]
fn bounce_must_hold_a_sector() {
    let mut backing = [0u8; 1024];
    let mut dev = MemDevice::new(&mut backing).with_sector_size(512).unwrap();
    let mut small = [0u8; 100];
    let mut buf = [0u8; 10];
    let err = read_bytes(&mut dev, 3, &mut buf, &mut small).unwrap_err();
    assert!(matches!(
        err,
        BytesError::BounceTooSmall {
            sector_size: 512,
            bounce_len: 100
        }
    ));
}

#[test]
fn byte_helpers_refuse_overflowing_ranges() {
    let mut backing = [0u8; 16];
    let mut dev = MemDevice::new(&mut backing);
    let mut bounce = [0u8; 1];
    let mut buf = [0u8; 4];
    let err = read_bytes(&mut dev, u64::MAX - 1, &mut buf, &mut bounce).unwrap_err();
    assert!(matches!(err, BytesError::RangeOverflow { .. }));
}

/// A request inside the last sector of the u64 range: the end of its head
/// sector is 2^64, which must not be computed (it was, and overflowed).
#[cfg(feature = "alloc")]
#[test]
fn byte_helpers_read_the_last_sector_of_the_offset_range() {
    let mut dev = VecDevice::new().with_sector_size(512).unwrap();
    let mut bounce = [0u8; 512];
    let mut buf = [1u8; 5];
    read_bytes(&mut dev, u64::MAX - 10, &mut buf, &mut bounce).unwrap();
    assert_eq!(buf, [0; 5]); // VecDevice reads zeroes past its end
}

#[test]
fn mem_device_checks_alignment_range_and_read_only() {
    let mut backing = [7u8; 1024];
    let mut dev = MemDevice::new(&mut backing).with_sector_size(512).unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        dev.read_at(1, &mut buf),
        Err(MemError::Unaligned { offset: 1, .. })
    ));
    assert!(matches!(
        dev.read_at(1024, &mut buf),
        Err(MemError::OutOfRange { offset: 1024, .. })
    ));
    assert!(matches!(
        dev.read_at(u64::MAX - 511, &mut buf),
        Err(MemError::Unaligned { .. }) | Err(MemError::OutOfRange { .. })
    ));
    dev.read_at(512, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 512]);
    dev.write_zeroes(0, 512).unwrap();
    assert_eq!(&dev.bytes()[..512], &[0u8; 512][..]);
    assert!(MemDevice::new(&mut [0u8; 4]).with_sector_size(3).is_none());

    let ro = [1u8; 8];
    let mut dev = MemDevice::read_only(&ro);
    assert_eq!(dev.write_at(0, &[0]), Err(MemError::ReadOnly { offset: 0 }));
    assert_eq!(dev.size(), Ok(8));
}

#[test]
fn default_write_zeroes_and_discard() {
    /// A device that only has the required methods.
    struct Plain([u8; 200_000]);
    impl BlockIo for Plain {
        type Error = MemError;
        fn sector_size(&self) -> u32 {
            1
        }
        fn size(&mut self) -> Result<u64, MemError> {
            Ok(self.0.len() as u64)
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
            MemDevice::new(&mut self.0).read_at(offset, buf)
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
            MemDevice::new(&mut self.0).write_at(offset, buf)
        }
        fn flush(&mut self) -> Result<(), MemError> {
            Ok(())
        }
    }
    let mut p = Plain([9; 200_000]);
    // Spans more than one chunk of the static zero buffer.
    p.write_zeroes(5, 150_000).unwrap();
    assert!(p.0[5..150_005].iter().all(|&b| b == 0));
    assert_eq!(p.0[4], 9);
    assert_eq!(p.0[150_005], 9);
    p.discard(0, 10).unwrap();
    assert_eq!(p.0[150_005], 9);
    assert_eq!(p.set_size(10), Ok(false));
    // Past the end is an error, not a panic.
    assert!(p.write_zeroes(199_999, 2).is_err());
}

#[cfg(feature = "alloc")]
mod with_alloc {
    use super::*;

    #[test]
    fn vec_device_grows_and_reads_zero_past_end() {
        let mut d = VecDevice::new();
        d.write_at(10, b"abc").unwrap();
        assert_eq!(d.size().unwrap(), 13);
        let mut buf = [1u8; 8];
        d.read_at(9, &mut buf).unwrap();
        assert_eq!(&buf, b"\0abc\0\0\0\0");
        d.write_zeroes(11, 10).unwrap();
        assert_eq!(d.size().unwrap(), 21);
        assert_eq!(&d.as_slice()[10..12], b"a\0");
        assert!(d.set_size(4).unwrap());
        assert_eq!(d.as_slice(), &[0u8; 4]);
        d.flush().unwrap();
        assert_eq!(d.flush_count(), 1);
        // Offsets no Vec can reach read as zero instead of panicking.
        d.read_at(u64::MAX - 2, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 8]);
    }

    #[test]
    fn faulty_device_logs_and_fails_once() {
        let mut d = FaultyDevice::new(VecDevice::new()).fail_write(1);
        d.write_at(0, b"aa").unwrap();
        assert_eq!(
            d.write_at(2, b"bb"),
            Err(FaultyError::Injected { index: 1 })
        );
        d.write_at(2, b"cc").unwrap();
        d.flush().unwrap();
        d.write_zeroes(0, 1).unwrap();
        let kinds: alloc::vec::Vec<_> = d.log().iter().map(|r| (r.index, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (0, WriteKind::Data),
                (2, WriteKind::Data),
                (3, WriteKind::Flush),
                (3, WriteKind::Zeroes)
            ]
        );
        assert_eq!(d.into_inner().as_slice(), b"\0acc");
    }

    extern crate alloc;

    #[test]
    fn power_cut_keeps_the_prefix() {
        let mut d = FaultyDevice::new(VecDevice::new()).cut_power_at(2);
        d.write_at(0, b"a").unwrap();
        d.write_at(1, b"b").unwrap();
        assert_eq!(
            d.write_at(2, b"c"),
            Err(FaultyError::PowerLost { index: 2 })
        );
        assert!(!d.powered());
        // Nothing works after the cut, reads included.
        assert!(d.read_at(0, &mut [0u8; 1]).is_err());
        assert!(d.flush().is_err());
        assert_eq!(d.into_inner().as_slice(), b"ab");
    }

    #[test]
    fn power_cut_can_drop_unflushed_writes() {
        let mut d = FaultyDevice::new(VecDevice::from_vec(b"xyz".to_vec()))
            .cut_power_at(4)
            .drop_unflushed(true);
        d.write_at(0, b"A").unwrap();
        d.flush().unwrap();
        d.write_at(1, b"B").unwrap();
        d.write_at(5, b"grow").unwrap();
        d.set_size(2).unwrap();
        assert!(matches!(
            d.write_at(0, b"Z"),
            Err(FaultyError::PowerLost { index: 4 })
        ));
        // The flushed write stays; the three after the flush are undone,
        // including the growth and the shrink.
        assert_eq!(d.into_inner().as_slice(), b"Ayz");
    }
}

#[cfg(feature = "std")]
mod with_std {
    use super::*;
    extern crate std;
    use std::io::Write;
    use std::string::ToString;

    #[test]
    fn file_device_round_trip() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&[5u8; 1000]).unwrap();
        let mut d = FileDevice::open_rw(tmp.path()).unwrap();
        assert_eq!(d.sector_size(), 512);
        assert_eq!(d.size().unwrap(), 1000);
        let mut buf = [1u8; 512];
        d.read_at(512, &mut buf).unwrap();
        // 488 bytes of file, then zeroes past the end.
        assert!(buf[..488].iter().all(|&b| b == 5));
        assert!(buf[488..].iter().all(|&b| b == 0));
        d.write_at(4096, b"tail").unwrap();
        assert_eq!(d.size().unwrap(), 4100);
        d.write_zeroes(2, 3).unwrap();
        d.write_zeroes(8192, 100).unwrap();
        assert_eq!(d.size().unwrap(), 8292);
        d.flush().unwrap();
        let mut head = [0u8; 6];
        d.read_at(0, &mut head).unwrap();
        assert_eq!(head, [5, 5, 0, 0, 0, 5]);
        assert!(d.set_size(10).unwrap());
        assert_eq!(d.size().unwrap(), 10);
        let ro = FileDevice::open(tmp.path()).unwrap();
        let mut ro = ro.with_sector_size(4096).unwrap();
        assert_eq!(ro.sector_size(), 4096);
        let err = ro.write_at(0, b"x").unwrap_err();
        assert_eq!(err.op, FileOp::Write);
        assert!(err.to_string().contains("write of 1 bytes at offset 0"));
    }

    /// A small deterministic generator for the direct-I/O model test.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % bound
        }
    }

    /// A device declared `O_DIRECT` (on /tmp, ext4 here) serves reads and
    /// writes at any offset, length and buffer address, exactly as a plain
    /// file does: unaligned writes become read-modify-write of whole blocks
    /// and never leave the file longer than a plain write would.
    #[cfg(target_os = "linux")]
    #[test]
    fn direct_device_matches_a_plain_file() {
        direct_model(false);
    }

    /// The same with [`FileDevice::set_block_cache`]: small writes held in
    /// memory are seen by reads, merged with the writes that follow, and
    /// reach the file on flush, before a cut or a hole, and on drop.
    #[cfg(target_os = "linux")]
    #[test]
    fn direct_device_with_block_cache_matches_a_plain_file() {
        direct_model(true);
    }

    #[cfg(target_os = "linux")]
    fn direct_model(cache: bool) {
        use std::vec;
        use std::vec::Vec;
        let tmp = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        let mut model: Vec<u8> = (0..10_001u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(tmp.path(), &model).unwrap();
        let mut d = FileDevice::open_rw(tmp.path()).unwrap();
        if let Err(e) = d.enable_direct(4096) {
            // A filesystem without O_DIRECT for the temporary directory:
            // nothing to test there, and the device is unchanged.
            assert_eq!(e.raw_os_error(), Some(22), "{e}");
            assert!(!d.is_direct());
            return;
        }
        assert!(d.is_direct());
        d.set_block_cache(cache).unwrap();
        let flags = nix::fcntl::fcntl(d.file(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(flags & nix::fcntl::OFlag::O_DIRECT.bits(), 0);
        let mut rng = Lcg(7);
        // A buffer one byte off alignment, to reach the bounce path even
        // for aligned offsets and lengths.
        let mut scratch = vec![0u8; (3 << 20) + 8192];
        for round in 0..300u32 {
            let big = rng.next(8) == 0;
            let len = if big {
                rng.next(3 << 20) as usize + 1
            } else if rng.next(3) == 0 {
                // Inside one block, mostly: what the block cache holds.
                rng.next(64) as usize + 1
            } else {
                rng.next(9000) as usize + 1
            };
            let len = if rng.next(4) == 0 {
                len.next_multiple_of(4096)
            } else {
                len
            };
            let off = rng.next(model.len() as u64 + 6000);
            let off = if rng.next(4) == 0 { off & !4095 } else { off };
            let shift = rng.next(2) as usize * (4096 - scratch.as_ptr().addr() % 4096 + 1) % 4096;
            let buf = &mut scratch[shift..shift + len];
            if rng.next(2) == 0 {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i as u32).wrapping_mul(31).wrapping_add(round) as u8;
                }
                d.write_at(off, buf).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(buf);
            } else {
                d.read_at(off, buf).unwrap();
                let want: Vec<u8> = (off as usize..off as usize + len)
                    .map(|i| model.get(i).copied().unwrap_or(0))
                    .collect();
                assert!(
                    buf[..] == want[..],
                    "read of {len} at {off} (round {round})"
                );
            }
            assert_eq!(d.size().unwrap(), model.len() as u64, "round {round}");
        }
        d.write_zeroes(5, 9000).unwrap();
        model[5..9005].fill(0);
        d.flush().unwrap();
        assert!(std::fs::read(tmp.path()).unwrap() == model);
        // A cut through a held block, then a hole over one: the file ends
        // as the model does, and the hole reads as zero.
        d.write_at(4100, b"held").unwrap();
        model[4100..4104].copy_from_slice(b"held");
        d.set_size(4102).unwrap();
        model.truncate(4102);
        assert!(std::fs::read(tmp.path()).unwrap() == model);
        d.set_size(3 << 20).unwrap();
        model.resize(3 << 20, 0);
        d.write_at(8200, b"gone").unwrap();
        d.discard(8192, 4096).unwrap();
        let mut back = [1u8; 8];
        d.read_at(8198, &mut back).unwrap();
        assert_eq!(back, [0; 8]);
        // Writes held at the end reach the file when the device is dropped.
        d.write_at(70_000, b"last").unwrap();
        model[70_000..70_004].copy_from_slice(b"last");
        drop(d);
        assert!(std::fs::read(tmp.path()).unwrap() == model);
    }

    /// `Never` makes `flush` a no-op that succeeds; the others sync.
    #[test]
    fn sync_policy_is_kept() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let mut d = FileDevice::open_rw(tmp.path()).unwrap();
        assert_eq!(d.sync_policy(), SyncPolicy::OnFlush);
        for p in [
            SyncPolicy::Never,
            SyncPolicy::EachWrite,
            SyncPolicy::OnFlush,
        ] {
            d.set_sync(p);
            assert_eq!(d.sync_policy(), p);
            d.write_at(3, b"abc").unwrap();
            d.write_zeroes(1, 1).unwrap();
            d.flush().unwrap();
        }
        assert_eq!(std::fs::read(tmp.path()).unwrap(), b"\0\0\0abc");
        assert!(d.set_direct(100).is_none() && d.set_direct(256).is_none());
        assert!(!d.is_direct());
    }
}
