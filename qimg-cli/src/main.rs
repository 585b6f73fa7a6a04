//! `qimg`: read, write, check and convert qcow2 and LUKS images, with
//! qemu-img's verbs, options, JSON keys and exit codes.

mod check;
mod cli;
mod convert;
mod create;
mod dev;
mod human;
mod image;
mod info;
mod luks;
mod map;
mod opts;
mod qcow2;
mod rawfile;
mod resize;
mod secret;

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

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qimg: {e}");
            ExitCode::from(e.code)
        }
    }
}
