//! The serial harness: runs QEMU with `-serial stdio`, reads its output on
//! a thread, answers passphrase prompts by typing, and stops on QEMU's exit,
//! a per-boot timeout, or (when asked) a few seconds after the program
//! reported failure.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one boot may take before it counts as hung.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// After `QIMG-FAIL`/`QIMG-ERROR` the firmware moves on to its next boot
/// option; the scenario has seen what it needs, QEMU is stopped this long
/// after (time for any wrongly printed line to show).
const AFTER_FAIL: Duration = Duration::from_secs(5);
/// Gap between typed characters (a person typing, and no UART overrun).
const KEY_GAP: Duration = Duration::from_millis(30);
/// The prompt text that makes the harness type the next passphrase.
const PROMPT: &str = "Passphrase for";

/// When a boot ends, besides QEMU's exit and the timeout.
#[derive(Clone, Copy)]
pub(crate) enum Until {
    /// Only then: the program shuts the machine down itself and goes on
    /// after a `QIMG-ERROR` (the firmware reader, disk after disk).
    Exit,
    /// Also [`AFTER_FAIL`] after `QIMG-FAIL`/`QIMG-ERROR`: qimg-efi then
    /// leaves the firmware to its next boot option.
    ExitOrFailure,
}

/// What one boot printed.
pub(crate) struct BootLog {
    /// The serial output, escape sequences and carriage returns removed.
    pub(crate) text: String,
    /// Seconds the boot took.
    pub(crate) seconds: f64,
}

impl BootLog {
    /// The lines that hold a `QIMG-` marker, from the marker on.
    pub(crate) fn qimg_lines(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter_map(|l| l.find("QIMG-").map(|i| &l[i..]))
            .collect()
    }
}

/// Boots `cmd` (a `qemu-system-x86_64` command without a `-serial` option),
/// typing one of `typed` (then Enter) at each passphrase prompt, until
/// `until`; keeps the whole serial log in `log`.
pub(super) fn boot(
    mut cmd: Command,
    typed: &[String],
    log: &Path,
    until: Until,
) -> Result<BootLog, String> {
    cmd.args(["-serial", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64 (install qemu-system-x86): {e}"))?;
    let mut stdout = child.stdout.take().ok_or("qemu has no stdout")?;
    let mut stdin = child.stdin.take().ok_or("qemu has no stdin")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut raw = Vec::new();
    let mut shown = 0; // bytes of `text` whose QIMG- lines are printed
    let mut answered = 0;
    let mut stop_at: Option<Instant> = None;
    let mut outcome = Ok(());
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => raw.extend_from_slice(&chunk),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let text = clean(&raw);
        // Print each finished QIMG- line once, as it arrives.
        if let Some(end) = text.rfind('\n') {
            if end + 1 > shown {
                for l in text[shown..end].lines() {
                    if let Some(i) = l.find("QIMG-") {
                        println!("    {}", &l[i..]);
                    }
                }
                shown = end + 1;
            }
        }
        let prompts = text.matches(PROMPT).count();
        if prompts > answered {
            answered += 1;
            match typed.get(answered - 1) {
                Some(pass) => {
                    println!("    (typing passphrase {answered}: {} chars)", pass.len());
                    for c in pass.bytes().chain(std::iter::once(b'\r')) {
                        std::thread::sleep(KEY_GAP);
                        if stdin.write_all(&[c]).and_then(|()| stdin.flush()).is_err() {
                            break;
                        }
                    }
                }
                None => println!("    (a passphrase prompt with nothing left to type)"),
            }
        }
        if matches!(until, Until::ExitOrFailure)
            && stop_at.is_none()
            && (text.contains("QIMG-FAIL") || text.contains("QIMG-ERROR"))
        {
            stop_at = Some(Instant::now() + AFTER_FAIL);
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            let _ = child.kill();
            break;
        }
        if started.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            outcome = Err(format!(
                "the boot hung for {}s (serial log: {})",
                BOOT_TIMEOUT.as_secs(),
                log.display()
            ));
            break;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            // Drain what is left in the pipe.
            while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
                raw.extend_from_slice(&chunk);
            }
            break;
        }
    }
    let _ = child.wait();
    drop(stdin);
    let _ = reader.join();
    std::fs::write(log, &raw).map_err(|e| format!("{}: {e}", log.display()))?;
    let text = clean(&raw);
    // The last line may have no newline (a prompt, or output cut short).
    if let Some(tail) = text.get(shown..) {
        for l in tail.lines() {
            if let Some(i) = l.find("QIMG-") {
                println!("    {}", &l[i..]);
            }
        }
    }
    outcome.map(|()| BootLog {
        text,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Serial bytes as text: ANSI escape sequences (the firmware's cursor and
/// colour commands) and carriage returns removed.
pub(super) fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters, then one final byte in '@'..='~'.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn escapes_and_carriage_returns_are_removed() {
        assert_eq!(
            clean(b"\x1b[0m\x1b[2J\x1b[01;01HQIMG-START x\r\nnext"),
            "QIMG-START x\nnext"
        );
    }
}
