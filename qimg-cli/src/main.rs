//! `qimg`: read, write, check and convert qcow2 and LUKS images, with
//! qemu-img's verbs, options, JSON keys and exit codes.

mod amend;
mod args;
mod cache;
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
mod header_job;
mod human;
mod image;
mod image_info;
mod image_spec;
mod info;
mod keyslots;
mod lock;
mod luks;
mod luks2;
mod luks_cmd;
mod luks_common;
mod map;
mod measure;
mod opts;
mod opts_help;
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

use clap::{CommandFactory, FromArgMatches};

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

/// The C library's text for an I/O error (what QEMU prints), without
/// Rust's " (os error N)".
pub fn os_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
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

/// The qemu-img release whose command line, output and exit codes qimg
/// follows. `--version` names it first, as `qemu-img version X.Y.Z`, the
/// pattern OpenStack Nova and Cinder match (`qemu-img version ([0-9.]*)`)
/// to learn which qemu-img features they may use.
pub const QEMU_IMG_VERSION: &str = "10.0.2";

/// What `--version` and `-V` print: qemu-img's two-line banner, with qimg's
/// own version where qemu-img names its build and qimg's own notice where
/// qemu-img names its copyright holders.
fn version_banner() -> String {
    format!(
        "qemu-img version {QEMU_IMG_VERSION} (qimg {})\n\
         qimg is not QEMU: a qcow2 and LUKS tool with qemu-img {QEMU_IMG_VERSION}'s \
         command line ({})\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_LICENSE"),
    )
}

/// The name errors start with: `qemu-img` when qimg was installed or linked
/// under that name, else `qimg`.
fn program_name() -> &'static str {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let base = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base == "qemu-img" {
        "qemu-img"
    } else {
        "qimg"
    }
}

/// Parses the command line. `--version`/`-V` first print the banner; help
/// exits 0; every other mistake in the command line exits 1, as qemu-img's
/// usage errors do (clap's own default is 2, which callers of qemu-img
/// would read as something else: `compare` uses 2 for "could not compare").
fn parse_args() -> Result<cli::Cli, ExitCode> {
    let first = std::env::args_os().nth(1);
    if first
        .as_deref()
        .is_some_and(|a| a == "--version" || a == "-V")
    {
        print!("{}", version_banner());
        return Err(ExitCode::SUCCESS);
    }
    // Usage lines name the program as it was called (`qemu-img convert ...`).
    let cmd = cli::Cli::command().bin_name(program_name());
    let parsed = cmd
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m));
    parsed.map_err(|e| {
        use clap::error::ErrorKind;
        let code = match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
            _ => 1,
        };
        // Printing help or an error to a closed pipe is no further error.
        let _ = e.print();
        ExitCode::from(code)
    })
}

fn main() -> ExitCode {
    install_panic_hook();
    let args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let result = cli::run(args);
    lock::test_pause_before_exit();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}: {e}", program_name());
            ExitCode::from(e.code)
        }
    }
}
