//! `cargo xtask uefi` builds the firmware reader; `cargo xtask uefi-test`
//! creates test images with qimg, boots OVMF under qemu-system-x86_64 with
//! them as virtio disks, and checks every hash the reader prints against
//! `qimg convert -O raw` of the same image.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::uefi_boot::serial::Until;
use crate::uefi_boot::{self, Machine};
use crate::{root, run};

/// The passphrase the test images are made with.
const PASSPHRASE: &str = "firmware-test-passphrase";

/// Builds the UEFI application; returns the path of the `.efi` file.
pub(crate) fn build() -> Result<PathBuf, String> {
    uefi_boot::build_efi("tests/uefi-reader", "uefi-reader")
}

/// Builds the UEFI boot program `qimg-efi`; returns the path of the
/// `.efi` file.
pub(crate) fn build_boot() -> Result<PathBuf, String> {
    uefi_boot::build_efi("qimg-efi", "qimg-efi")
}

/// One image the firmware must read.
struct TestImage {
    /// File name inside the work folder.
    name: &'static str,
    /// `qimg` arguments that create it (run in the work folder).
    create: Vec<String>,
    /// Extra arguments `qimg convert` needs to read it (secrets).
    read_args: Vec<String>,
    /// Seed of its source content (every image holds different data, so
    /// each hash the firmware prints matches exactly one image).
    seed: u64,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_string()).collect()
}

fn images() -> Vec<TestImage> {
    let secret = format!("secret,id=s0,data={PASSPHRASE}");
    let mut images = vec![
        TestImage {
            name: "plain.qcow2",
            create: args(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "source.raw",
                "plain.qcow2",
            ]),
            read_args: vec![],
            seed: 1,
        },
        TestImage {
            name: "compressed.qcow2",
            create: args(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "source.raw",
                "compressed.qcow2",
            ]),
            read_args: vec![],
            seed: 2,
        },
    ];
    let encrypted = [
        ("encrypted.qcow2", &uefi_boot::LUKS_QCOW2, 3),
        ("volume.luks", &uefi_boot::LUKS1, 4),
        ("volume2.luks", &uefi_boot::LUKS2, 5),
    ];
    images.extend(encrypted.map(|(name, enc, seed)| TestImage {
        name,
        create: enc.convert_args(&secret, "source.raw", name),
        read_args: args(&["--object", &secret]),
        seed,
    }));
    images
}

/// Runs the firmware test.
pub(crate) fn test() -> Result<(), String> {
    uefi_boot::require_ovmf()?;
    let efi = build()?;
    let qimg = uefi_boot::build_qimg()?;
    let work = root().join("target").join("uefi-test");
    let _ = std::fs::remove_dir_all(&work);
    let esp = work.join("esp");
    std::fs::create_dir_all(esp.join("EFI").join("BOOT")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(esp.join("qimg")).map_err(|e| e.to_string())?;
    std::fs::copy(&efi, esp.join("EFI").join("BOOT").join("BOOTX64.EFI"))
        .map_err(|e| format!("copy the app: {e}"))?;
    std::fs::write(esp.join("qimg").join("passphrase"), PASSPHRASE).map_err(|e| e.to_string())?;
    std::fs::write(
        esp.join("qimg").join("config.txt"),
        "read=all\npassphrase=\\qimg\\passphrase\n",
    )
    .map_err(|e| e.to_string())?;

    let mut expected = Vec::new();
    for img in images() {
        write_source(&work.join("source.raw"), img.seed)?;
        run(
            &format!("create {}", img.name),
            Command::new(&qimg).current_dir(&work).args(&img.create),
        )?;
        let raw = work.join(format!("{}.expected.raw", img.name));
        run(
            &format!("qimg convert {} -O raw", img.name),
            Command::new(&qimg)
                .current_dir(&work)
                .args(["convert", "-O", "raw"])
                .args(&img.read_args)
                .arg(img.name)
                .arg(&raw),
        )?;
        let bytes = std::fs::read(&raw).map_err(|e| format!("{}: {e}", raw.display()))?;
        let size = bytes.len() as u64;
        let hash = uefi_boot::sha256(&bytes)?;
        // Block devices are whole sectors: pad the image file.
        let path = work.join(img.name);
        let len = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
        let padded = len.div_ceil(512) * 512;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(padded))
            .map_err(|e| e.to_string())?;
        expected.push((img.name, size, hash));
    }

    let machine = Machine::OvmfFolder {
        esp,
        disks: expected.iter().map(|e| work.join(e.0)).collect(),
    };
    eprintln!("xtask: == boot OVMF with {} disks", expected.len());
    // The reader prints its QIMG- lines (shown as they arrive), goes on
    // after a failed disk, and shuts the machine down.
    let log = work.join("serial.log");
    let boot = uefi_boot::boot(&machine, &work, &[], &log, Until::Exit)?;
    eprintln!("xtask: boot took {:.1}s", boot.seconds);
    let results = boot.qimg_lines();
    let budget = results
        .iter()
        .find_map(|l| l.strip_prefix("QIMG-BUDGET "))
        .ok_or("the reader printed no memory budget")?;
    let mut failures = Vec::new();
    for (name, size, hash) in &expected {
        let want = format!("size={size} sha256={hash}");
        if !results.iter().any(|l| {
            l.starts_with("QIMG-RESULT ") && l.contains("layer=virtual") && l.contains(&want)
        }) {
            failures.push(format!("{name}: no QIMG-RESULT with layer=virtual {want}"));
        }
    }
    if let Some(e) = results.iter().find(|l| l.starts_with("QIMG-ERROR")) {
        failures.push(format!("the reader reported: {e}"));
    }
    if !failures.is_empty() {
        return Err(format!("uefi-test failed:\n  {}", failures.join("\n  ")));
    }
    println!(
        "uefi-test: {} images read correctly in firmware; memory budget {budget}",
        expected.len()
    );
    Ok(())
}

/// A 4 MiB source disk with a non-trivial pattern (a third of it zero, so
/// sparse and compressed paths are exercised) that depends on `seed`.
fn write_source(path: &Path, seed: u64) -> Result<(), String> {
    let mut data = vec![0u8; 4 << 20];
    let mut x = 0x1234_5678_9abc_def1u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (i / 512) % 3 != 0 {
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
    std::fs::write(path, &data).map_err(|e| format!("{}: {e}", path.display()))
}
