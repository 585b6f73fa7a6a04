//! Where passphrases come from: a file on the boot volume (one try) or the
//! console prompt (three tries, no echo, Backspace edits, Enter ends).

use alloc::string::String;
use alloc::vec::Vec;

use uefi::proto::console::text::{Key, ScanCode};
use uefi::{boot, print, println, system, Char16};

/// How many passphrases the console prompt accepts.
pub const TRIES: u32 = 3;
/// The longest passphrase typed at the prompt (LUKS's own limit is 512).
const MAX_TYPED: usize = 512;

/// The passphrase source.
pub enum Secrets {
    /// Bytes read from `passphrase-file=` (trailing CR/LF stripped).
    File(Vec<u8>),
    /// Ask on the console.
    Prompt,
}

impl Secrets {
    /// The passphrase for try `n` (1-based) of `name`, or `None` when no
    /// further try is possible.
    pub fn get(&self, name: &str, n: u32) -> Result<Option<Vec<u8>>, String> {
        match self {
            Self::File(p) if n == 1 => Ok(Some(p.clone())),
            Self::File(_) => Ok(None),
            Self::Prompt if n <= TRIES => prompt(name).map(Some),
            Self::Prompt => Ok(None),
        }
    }
}

/// Strips trailing CR and LF bytes (a passphrase file's line end).
pub fn strip_line_end(mut p: Vec<u8>) -> Vec<u8> {
    while matches!(p.last(), Some(b'\r' | b'\n')) {
        p.pop();
    }
    p
}

/// Reads one passphrase from the console without echo.
fn prompt(name: &str) -> Result<Vec<u8>, String> {
    // The boot manager's 5-minute watchdog would reset the machine while
    // the user types; it is off during the prompt and re-armed after.
    let _ = boot::set_watchdog_timer(0, 0x10000, None);
    let typed = read_line(name);
    let _ = boot::set_watchdog_timer(WATCHDOG_SECONDS, 0x10000, None);
    typed
}

/// The watchdog the boot manager arms before starting a boot option.
const WATCHDOG_SECONDS: usize = 300;

fn read_line(name: &str) -> Result<Vec<u8>, String> {
    print!("Passphrase for {name}: ");
    let mut typed: Vec<u8> = Vec::new();
    let backspace = Char16::try_from('\u{8}').ok();
    let del = Char16::try_from('\u{7f}').ok();
    loop {
        let key = system::with_stdin(|stdin| -> Result<Option<Key>, String> {
            let event = stdin
                .wait_for_key_event()
                .map_err(|e| alloc::format!("console input has no key event: {:?}", e.status()))?;
            boot::wait_for_event(&[event])
                .map_err(|e| alloc::format!("waiting for a key failed: {:?}", e.status()))?;
            stdin
                .read_key()
                .map_err(|e| alloc::format!("reading a key failed: {:?}", e.status()))
        })?;
        match key {
            None => {}
            Some(Key::Printable(c)) => {
                let ch = char::from(c);
                if ch == '\r' || ch == '\n' {
                    break;
                } else if Some(c) == backspace || Some(c) == del {
                    // Remove one whole UTF-8 character.
                    while let Some(b) = typed.pop() {
                        if b & 0xc0 != 0x80 {
                            break;
                        }
                    }
                } else if ch != '\0' && typed.len() < MAX_TYPED {
                    let mut utf8 = [0u8; 4];
                    typed.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
                }
            }
            Some(Key::Special(ScanCode::ESCAPE)) => typed.clear(),
            Some(Key::Special(_)) => {}
        }
    }
    println!();
    Ok(typed)
}
