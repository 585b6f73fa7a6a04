#![allow(
    clippy::arithmetic_side_effects,
    clippy::cast_possible_truncation,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)] // test code

extern crate alloc;

use super::*;
use crate::create::{create, CreateOptions};
use crate::error::Unsupported;
use alloc::format;
use alloc::string::ToString;
use luks_core::io::VecDevice;

/// A 4 MiB image with 512-byte clusters and three written clusters.
fn image() -> Vec<u8> {
    let o = CreateOptions {
        size: 4 << 20,
        cluster_size: 512,
        ..CreateOptions::default()
    };
    let mut w = create(VecDevice::new(), &o).unwrap();
    w.write(0, &[0x11; 1024]).unwrap();
    w.write(1 << 20, &[0x22; 512]).unwrap();
    w.close().unwrap().into_vec()
}

fn run(v: &mut Vec<u8>, r: Repair) -> CheckOutcome {
    let mut d = VecDevice::from_vec(core::mem::take(v));
    let o = check(&mut d, r).unwrap();
    *v = d.into_vec();
    o
}

fn hdr(d: &[u8]) -> HeaderRepr {
    HeaderRepr::parse_bytes::<()>(&d[..512]).unwrap()
}

fn u64_at(d: &[u8], off: u64) -> u64 {
    crate::table::word(d, off as usize).unwrap()
}

fn first_refblock(d: &[u8]) -> u64 {
    u64_at(d, hdr(d).refcount_table_offset)
}

fn set_refcount(d: &mut [u8], cluster: u64, v: u16) {
    let rb = first_refblock(d);
    let at = (rb + cluster * 2) as usize;
    d[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn first_data(d: &[u8]) -> u64 {
    let h = hdr(d);
    let l2 = u64_at(d, h.l1_table_offset) & OFFSET_MASK;
    u64_at(d, l2) & OFFSET_MASK
}

#[test]
fn clean_image_is_clean() {
    let mut d = image();
    let o = run(&mut d, Repair::None);
    let r = o.result();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.frag.allocated_clusters, 3);
    assert_eq!(r.frag.total_clusters, 8192);
    assert_eq!(r.image_end_offset, d.len() as u64);
}

#[test]
fn leak_is_found_and_freed_by_repair_leaks() {
    let mut d = image();
    let nb = d.len() as u64 / 512;
    d.resize((nb as usize + 2) * 512, 0);
    set_refcount(&mut d, nb, 1);
    let o = run(&mut d, Repair::None);
    assert_eq!((o.first.leaks, o.first.corruptions), (1, 0));
    assert_eq!(
        o.first.findings[0].to_string(),
        format!("Leaked cluster {nb} refcount=1 reference=0")
    );
    let o = run(&mut d, Repair::Leaks);
    assert_eq!(o.leaks_fixed, 1);
    let r = o.result();
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{:?}", r.findings);
}

#[test]
fn zero_refcount_in_use_is_rebuilt_by_repair_all() {
    let mut d = image();
    let data = first_data(&d);
    set_refcount(&mut d, data / 512, 0);
    let before = d[data as usize..data as usize + 512].to_vec();
    let o = run(&mut d, Repair::None);
    assert_eq!(o.first.corruptions, 2, "{:?}", o.first.findings);
    // -r leaks does not touch corruptions.
    let o = run(&mut d, Repair::Leaks);
    assert_eq!(o.result().corruptions, 2);
    let o = run(&mut d, Repair::All);
    let r = o.result();
    assert_eq!(
        (r.leaks, r.corruptions, r.check_errors),
        (0, 0, 0),
        "{:?}",
        r.findings
    );
    assert!(o.corruptions_fixed >= 1);
    assert_eq!(&d[data as usize..data as usize + 512], &before[..]);
}

#[test]
fn copied_flag_is_reported_and_fixed() {
    let mut d = image();
    let h = hdr(&d);
    let l2 = u64_at(&d, h.l1_table_offset) & OFFSET_MASK;
    let e = u64_at(&d, l2) & !COPIED;
    d[l2 as usize..l2 as usize + 8].copy_from_slice(&e.to_be_bytes());
    let o = run(&mut d, Repair::None);
    assert_eq!(o.first.corruptions, 1);
    assert_eq!(
        o.first.findings[0].to_string(),
        format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount=1")
    );
    let o = run(&mut d, Repair::All);
    assert_eq!(o.result().corruptions, 0, "{:?}", o.result().findings);
}

#[test]
fn refblock_past_end_is_rebuilt() {
    let mut d = image();
    let rt = hdr(&d).refcount_table_offset as usize;
    d[rt..rt + 8].copy_from_slice(&(1u64 << 32).to_be_bytes());
    let o = run(&mut d, Repair::None);
    assert!(o.first.corruptions > 1);
    assert_eq!(
        o.first.findings[0].to_string(),
        "ERROR refcount block 0 is outside image"
    );
    let o = run(&mut d, Repair::All);
    let r = o.result();
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{:?}", r.findings);
}

#[test]
fn reference_past_end_of_file() {
    let mut d = image();
    let h = hdr(&d);
    let l2 = u64_at(&d, h.l1_table_offset) & OFFSET_MASK;
    let e = COPIED | (1 << 30);
    d[l2 as usize..l2 as usize + 8].copy_from_slice(&e.to_be_bytes());
    let o = run(&mut d, Repair::None);
    assert!(o.first.findings.contains(&Finding::PastEnd {
        offset: 1 << 30,
        size: 512
    }));
}

#[test]
fn garbage_never_panics() {
    let base = image();
    let len = base.len();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..200 {
        let mut d = base.clone();
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 104 + (x as usize % (len - 104));
            d[at] = (x >> 32) as u8;
        }
        let mut dev = VecDevice::from_vec(d);
        let _ = check(&mut dev, Repair::None);
        let _ = check(&mut dev, Repair::All);
    }
}

/// Damage that needs every repair step: a data cluster with refcount 0
/// (refcount rebuild), a leaked cluster, and a missing COPIED flag.
fn damaged() -> Vec<u8> {
    let mut d = image();
    let nb = d.len() as u64 / 512;
    d.resize((nb as usize + 2) * 512, 0);
    set_refcount(&mut d, nb + 1, 1);
    let data = first_data(&d);
    set_refcount(&mut d, data / 512, 0);
    let h = hdr(&d);
    let l2 = u64_at(&d, h.l1_table_offset) & OFFSET_MASK;
    let e = u64_at(&d, l2 + 8) & !COPIED;
    d[l2 as usize + 8..l2 as usize + 16].copy_from_slice(&e.to_be_bytes());
    d
}

/// The guest data of the damaged image's written clusters.
fn guest(d: &[u8]) -> Vec<u8> {
    let h = hdr(d);
    let l2 = u64_at(d, h.l1_table_offset) & OFFSET_MASK;
    let mut out = Vec::new();
    for i in 0..2 {
        let host = (u64_at(d, l2 + i * 8) & OFFSET_MASK) as usize;
        out.extend_from_slice(&d[host..host + 512]);
    }
    out
}

#[test]
fn repair_survives_a_power_cut_anywhere() {
    use luks_core::io::FaultyDevice;
    let base = damaged();
    let before = run(&mut base.clone(), Repair::None).first;
    assert!(before.corruptions >= 2 && before.leaks == 1, "{before:?}");
    let data = guest(&base);
    let mut dev = FaultyDevice::new(VecDevice::from_vec(base.clone()));
    check(&mut dev, Repair::All).unwrap();
    let total = dev.mutations();
    assert!(total > 3, "repair made {total} writes");
    for drop in [false, true] {
        for cut in 0..total {
            let mut dev = FaultyDevice::new(VecDevice::from_vec(base.clone()))
                .cut_power_at(cut)
                .drop_unflushed(drop);
            assert!(check(&mut dev, Repair::All).is_err());
            let mut img = dev.into_inner().into_vec();
            let r = run(&mut img, Repair::None).first;
            // Never worse than before the repair started; data untouched.
            assert!(
                r.corruptions <= before.corruptions && r.check_errors == 0,
                "cut {cut} (drop {drop}): {:?}",
                r.findings
            );
            assert_eq!(guest(&img), data, "cut {cut}");
            // And a repair after the crash finishes the job.
            let r = run(&mut img, Repair::All);
            let r = r.result();
            assert_eq!(
                (r.corruptions, r.leaks),
                (0, 0),
                "cut {cut}: {:?}",
                r.findings
            );
            assert_eq!(guest(&img), data);
        }
    }
}

#[test]
fn repair_never_writes_into_other_metadata_through_a_bogus_l2_table() {
    let mut d = image();
    let h = hdr(&d);
    let at = h.l1_table_offset as usize;
    // L1 entry 1 names the L1 table's own cluster as an L2 table: fixing
    // "COPIED flags" in it would rewrite L1 entries.
    let bogus = COPIED | h.l1_table_offset;
    d[at + 8..at + 16].copy_from_slice(&bogus.to_be_bytes());
    let l1_before = d[at..at + 512].to_vec();
    run(&mut d, Repair::All);
    assert_eq!(&d[at..at + 512], &l1_before[..]);
    assert_eq!(hdr(&d).l1_table_offset, h.l1_table_offset);
}

#[test]
fn repair_leaks_leaves_a_damaged_refcount_structure_alone() {
    let mut d = image();
    let nb = d.len() as u64 / 512;
    d.resize((nb as usize + 2) * 512, 0);
    set_refcount(&mut d, nb + 1, 1);
    // The refcount table's second entry names a data cluster.
    let data = first_data(&d);
    let rt = hdr(&d).refcount_table_offset as usize;
    d[rt + 8..rt + 16].copy_from_slice(&data.to_be_bytes());
    let before = d[data as usize..data as usize + 512].to_vec();
    let o = run(&mut d, Repair::Leaks);
    assert_eq!(o.leaks_fixed, 0);
    assert_eq!(&d[data as usize..data as usize + 512], &before[..]);
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    let mut d = image();
    d[72..80].copy_from_slice(&(1u64 << 20).to_be_bytes());
    let mut dev = VecDevice::from_vec(d);
    assert!(matches!(
        check(&mut dev, Repair::All),
        Err(Error::Unsupported(Unsupported::IncompatibleFeature {
            bit: 20,
            ..
        }))
    ));
}

#[test]
fn shared_l2_table_is_repaired_in_place() {
    // L1 entry 1 names the same L2 table as entry 0: the table and its
    // data clusters have two references but refcount 1. As qemu-img does,
    // -r all raises the refcounts in place (no rebuild, the file keeps its
    // length) and clears COPIED in the L1 entries and in the shared table.
    let mut d = image();
    let h = hdr(&d);
    let at = h.l1_table_offset as usize;
    let e0 = u64_at(&d, h.l1_table_offset);
    d[at + 8..at + 16].copy_from_slice(&e0.to_be_bytes());
    let len = d.len();
    let o = run(&mut d, Repair::None);
    assert!(o.first.corruptions >= 3, "{:?}", o.first.findings);
    let o = run(&mut d, Repair::All);
    let r = o.result();
    assert_eq!(
        (r.leaks, r.corruptions, r.check_errors),
        (0, 0, 0),
        "{:?}",
        r.findings
    );
    assert!(!o.first.findings.contains(&Finding::Rebuilding));
    assert_eq!(d.len(), len);
    let l2 = e0 & OFFSET_MASK;
    assert_eq!(u64_at(&d, h.l1_table_offset) & COPIED, 0);
    assert_eq!(u64_at(&d, h.l1_table_offset + 8) & COPIED, 0);
    assert_eq!(u64_at(&d, l2) & COPIED, 0);
    // A second check finds nothing left.
    let o = run(&mut d, Repair::None);
    assert_eq!(o.first.corruptions, 0, "{:?}", o.first.findings);
}
