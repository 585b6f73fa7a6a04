//! Daemons that hold an image open the way a running guest does, killed
//! (and waited for) when the guard drops.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A daemon that holds an image; killed on drop.
pub struct Holder {
    pid: i32,
}

impl Holder {
    /// `qemu-nbd --fork --persistent -f FMT IMG -k SOCK`, or `None` when
    /// qemu-nbd is missing (a failure under CI).
    pub fn nbd(img: &Path, fmt: &str, dir: &Path) -> Option<Self> {
        let nbd = crate::tool("qemu-nbd")?;
        let pidfile = dir.join("nbd.pid");
        let sock = dir.join("nbd.sock");
        let st = Command::new(nbd)
            .args(["--fork", "--persistent", "-f", fmt])
            .arg(img)
            .arg("-k")
            .arg(&sock)
            .arg("--pid-file")
            .arg(&pidfile)
            .status()
            .expect("run qemu-nbd");
        assert!(st.success(), "qemu-nbd failed: {st}");
        Some(Self::from_pidfile(&pidfile))
    }

    /// `qemu-system-x86_64 -machine none -display none -daemonize -drive
    /// file=IMG,if=none,id=d0`, or `None` when it is missing (a failure
    /// under CI).
    pub fn vm(img: &Path, dir: &Path) -> Option<Self> {
        let qemu = crate::tool("qemu-system-x86_64")?;
        let pidfile = dir.join("vm.pid");
        let st = Command::new(qemu)
            .args(["-machine", "none", "-display", "none", "-daemonize"])
            .arg("-drive")
            .arg(format!("file={},if=none,id=d0", img.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .status()
            .expect("run qemu-system-x86_64");
        assert!(st.success(), "qemu-system-x86_64 failed: {st}");
        Some(Self::from_pidfile(&pidfile))
    }

    fn from_pidfile(p: &PathBuf) -> Self {
        let text = std::fs::read_to_string(p).expect("daemon pid file");
        let pid = text.trim().parse().expect("a pid");
        Self { pid }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        // Wait until it is gone, so its locks are released.
        for _ in 0..200 {
            if !Path::new(&format!("/proc/{}", self.pid)).exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }
}
