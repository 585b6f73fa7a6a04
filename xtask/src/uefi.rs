//! `cargo xtask uefi` builds the firmware reader; `cargo xtask uefi-test`
//! creates test images with qimg, boots OVMF under qemu-system-x86_64 with
//! them as virtio disks, and checks every hash the reader prints against
//! `qimg convert -O raw` of the same image.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cargo, root, run};

/// Firmware code image (Debian `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Firmware variable store template.
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// How long one boot may take before it counts as hung.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// The passphrase the test images are made with.
const PASSPHRASE: &str = "firmware-test-passphrase";

/// Builds the UEFI application; returns the path of the `.efi` file.
pub(crate) fn build() -> Result<PathBuf, String> {
    let dir = root().join("tests").join("uefi-reader");
    run(
        "build the UEFI reader",
        cargo()
            .current_dir(&dir)
            .args(["build", "--release", "--target", "x86_64-unknown-uefi"]),
    )?;
    let efi = dir
        .join("target")
        .join("x86_64-unknown-uefi")
        .join("release")
        .join("uefi-reader.efi");
    if efi.is_file() {
        Ok(efi)
    } else {
        Err(format!("{} was not built", efi.display()))
    }
}

/// Builds the UEFI boot program `qimg-efi`; returns the path of the
/// `.efi` file.
pub(crate) fn build_boot() -> Result<PathBuf, String> {
    let dir = root().join("qimg-efi");
    run(
        "build the UEFI boot program",
        cargo()
            .current_dir(&dir)
            .args(["build", "--release", "--target", "x86_64-unknown-uefi"]),
    )?;
    let efi = dir.join("target/x86_64-unknown-uefi/release/qimg-efi.efi");
    if efi.is_file() {
        Ok(efi)
    } else {
        Err(format!("{} was not built", efi.display()))
    }
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
    vec![
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
        TestImage {
            name: "encrypted.qcow2",
            create: args(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "--object",
                &secret,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                "source.raw",
                "encrypted.qcow2",
            ]),
            read_args: args(&["--object", &secret]),
            seed: 3,
        },
        TestImage {
            name: "volume.luks",
            create: args(&[
                "convert",
                "-O",
                "luks",
                "--object",
                &secret,
                "-o",
                "key-secret=s0,iter-time=10",
                "source.raw",
                "volume.luks",
            ]),
            read_args: args(&["--object", &secret]),
            seed: 4,
        },
        TestImage {
            name: "volume2.luks",
            create: args(&[
                "convert",
                "-O",
                "luks",
                "--object",
                &secret,
                "-o",
                "luks-version=2,key-secret=s0,iter-time=10,pbkdf=argon2id,pbkdf-memory=16384,pbkdf-parallel=1,pbkdf-iterations=4,sector-size=4096",
                "source.raw",
                "volume2.luks",
            ]),
            read_args: args(&["--object", &secret]),
            seed: 5,
        },
    ]
}

/// Runs the firmware test.
pub(crate) fn test() -> Result<(), String> {
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).is_file() {
            return Err(format!(
                "{f} is missing: install Debian's `ovmf` (.ci/run does)"
            ));
        }
    }
    let efi = build()?;
    run(
        "build qimg",
        cargo().args(["build", "--release", "-p", "qimg-cli", "--bin", "qimg"]),
    )?;
    let qimg = root().join("target").join("release").join("qimg");
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
    std::fs::copy(OVMF_VARS, work.join("vars.fd")).map_err(|e| e.to_string())?;

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
        let size = std::fs::metadata(&raw).map_err(|e| e.to_string())?.len();
        let hash = sha256sum(&raw)?;
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

    let serial = boot(
        &work,
        &esp,
        &expected.iter().map(|e| work.join(e.0)).collect::<Vec<_>>(),
    )?;
    let results: Vec<&str> = serial.lines().filter(|l| l.starts_with("QIMG-")).collect();
    for l in &results {
        println!("  {l}");
    }
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

/// Boots OVMF with the ESP folder and the disks; returns the serial output.
fn boot(work: &Path, esp: &Path, disks: &[PathBuf]) -> Result<String, String> {
    let log = work.join("serial.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none",
    ])
    .args(["-no-reboot", "-monitor", "none"])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-drive")
    .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
    .arg("-drive")
    .arg(format!(
        "if=pflash,format=raw,file={}",
        work.join("vars.fd").display()
    ))
    .arg("-drive")
    .arg(format!("format=raw,file=fat:rw:{}", esp.display()));
    for (i, d) in disks.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!(
                "if=none,id=d{i},format=raw,readonly=on,file={}",
                d.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=d{i}"));
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    eprintln!("xtask: == boot OVMF with {} disks", disks.len());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64 (install qemu-system-x86): {e}"))?;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(_) => break,
            None if started.elapsed() > BOOT_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "firmware boot hung for {}s; serial so far:\n{text}",
                    BOOT_TIMEOUT.as_secs()
                ));
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    eprintln!("xtask: boot took {:.1}s", started.elapsed().as_secs_f64());
    let bytes = std::fs::read(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    Ok(String::from_utf8_lossy(&bytes).replace('\r', ""))
}

pub(crate) fn sha256sum(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("sha256sum printed nothing for {}", path.display()))
}
