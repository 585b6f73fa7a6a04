//! qimg-efi's config parser (`qimg-efi/src/config.rs`) on the host: every
//! key of `\qimg\qimg.cfg`, defaults, and errors that name the line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

extern crate alloc;

// The UEFI program's module, compiled here as it is there (no_std + alloc).
#[allow(dead_code, unreachable_pub)]
#[path = "../../qimg-efi/src/config.rs"]
mod config;

use config::{Check, Config, Image, DEFAULT_BOOT};

#[test]
fn empty_and_comment_only_configs_are_the_defaults() {
    for text in [
        "",
        "\n\n",
        "# nothing here\n   \n#image=scan\n",
        "\u{feff}# bom\n",
    ] {
        let c = Config::parse(text).unwrap();
        assert_eq!(c, Config::default(), "{text:?}");
        assert_eq!(c.image, Image::Default);
        assert_eq!(c.boot, DEFAULT_BOOT);
        assert!(c.passphrase_file.is_none() && c.options.is_none() && c.checks.is_empty());
    }
}

#[test]
fn every_key_is_read() {
    let hex = "AB".repeat(32);
    let text = format!(
        "# boot config\r\nimage=\\images\\system.qcow2\r\nheader=/qimg/hdr.img\n\
         passphrase-file=\\qimg\\passphrase\nboot=\\EFI\\debian\\grubx64.efi\n\
         options=initrd=\\initrd.img console=ttyS0\ncheck=0+8:{hex}\ncheck = 100+1 : {hex}\nspeed-mib=64\n"
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.image, Image::File("\\images\\system.qcow2".into()));
    assert_eq!(
        c.header.as_deref(),
        Some("\\qimg\\hdr.img"),
        "'/' becomes '\\'"
    );
    assert_eq!(c.passphrase_file.as_deref(), Some("\\qimg\\passphrase"));
    assert_eq!(c.boot, "\\EFI\\debian\\grubx64.efi");
    assert_eq!(
        c.options.as_deref(),
        Some("initrd=\\initrd.img console=ttyS0")
    );
    let want = |lba, count| Check {
        lba,
        count,
        sha256: "ab".repeat(32),
    };
    assert_eq!(c.checks, vec![want(0, 8), want(100, 1)]);
    assert_eq!(c.speed_mib, Some(64));
    let s = c.summary();
    assert!(
        s.contains("image=\\images\\system.qcow2") && s.contains("checks=2"),
        "{s}"
    );
    assert!(s.contains("speed-mib=64"), "{s}");
}

#[test]
fn image_scan_in_any_case() {
    for v in ["scan", "SCAN", "Scan"] {
        assert_eq!(
            Config::parse(&format!("image={v}")).unwrap().image,
            Image::Scan
        );
    }
}

/// The error of `text`, which must name `line`.
fn error_at(text: &str, line: usize) -> String {
    let e = Config::parse(text).expect_err(text);
    assert!(
        e.contains(&format!("\\qimg\\qimg.cfg line {line}:")),
        "{text:?} -> {e}"
    );
    e
}

#[test]
fn errors_name_the_line() {
    let e = error_at("image=scan\n# fine\nkernel=\\vmlinuz\n", 3);
    assert!(e.contains("unknown key `kernel`"), "{e}");
    let e = error_at("\n\njust words\n", 3);
    assert!(e.contains("not key=value"), "{e}");
    error_at("image=images\\relative.qcow2", 1);
    error_at("boot=EFI\\BOOT\\BOOTX64.EFI", 1);
    let hex = "0".repeat(64);
    error_at(&format!("check=0:{hex}"), 1);
    error_at(&format!("check=0+0:{hex}"), 1);
    error_at(&format!("check=x+1:{hex}"), 1);
    error_at("check=0+1:abc", 1);
    error_at(&format!("check=0+1:{}", "g".repeat(64)), 1);
    error_at("speed-mib=0", 1);
    error_at("speed-mib=lots", 1);
    error_at("speed-mib=-1", 1);
}

#[test]
fn a_detached_header_needs_an_image_file() {
    let e = Config::parse("image=scan\nheader=\\hdr.img\n").unwrap_err();
    assert!(e.contains("header="), "{e}");
    assert!(Config::parse("image=\\data.luks\nheader=\\hdr.img\n").is_ok());
}
