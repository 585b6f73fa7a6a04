//! `qimg`: read, write, check and convert qcow2 and LUKS images, with
//! qemu-img's verbs, options, JSON keys and exit codes.

mod args;
mod chain_lock;
mod check;
mod cli;
mod commit;
mod compare;
mod convert;
mod convert_cmd;
mod create;
mod dd;
mod dev;
mod file;
mod format;
mod human;
mod image;
mod image_info;
mod image_spec;
mod info;
mod keys;
mod keys2;
mod keys_io;
mod lock;
mod luks;
mod luks2;
mod luks_cmd;
mod luks_common;
mod map;
mod measure;
mod opts;
mod parallel;
mod progress;
mod qcow2;
mod rawfile;
mod rebase;
mod resize;
mod secret;
mod snapshot;

use std::fmt;
use std::process::ExitCode;

use clap::Parser;

/// A failure, already worded for the user, with the process exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit status (qemu-img uses 1 for most failures).
    pub code: u8,
    /// One line: the file, what was wrong, what to do.
    pub msg: String,
}

impl CliError {
    /// A mistake in how qimg was called.
    pub fn usage(msg: String) -> Self {
        Self { code: 1, msg }
    }

    /// A failure tied to a file.
    pub fn io(file: &str, msg: String) -> Self {
        Self {
            code: 1,
            msg: format!("{file}: {msg}"),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

/// JSON with qemu-img's four-space indentation.
pub fn pretty_json(v: &serde_json::Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serializing a Value into a Vec cannot fail.
    let _ = v.serialize(&mut ser);
    String::from_utf8(out).unwrap_or_default()
}

/// What the user sees if qimg panics: one line, no backtrace. A closed
/// standard output (`qimg info x | head -1`) ends qimg quietly, as SIGPIPE
/// ends qemu-img; anything else is a bug in qimg and says so.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if msg.contains("Broken pipe") || msg.contains("BrokenPipe") {
            std::process::exit(141);
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("qimg: internal error{at}: {msg}; please report it");
        std::process::exit(70);
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    let args = cli::Cli::parse();
    let result = cli::run(args);
    lock::test_pause_before_exit();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qimg: {e}");
            ExitCode::from(e.code)
        }
    }
}
