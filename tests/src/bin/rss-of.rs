//! `rss-of PROGRAM ARGS...`: runs PROGRAM, passes its output through, exits
//! with its status, and prints its peak resident set size as the last line
//! of standard error (`rss-of: N KiB`). Tests use it to bound the memory of
//! one qimg run without counting anything else their process started.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, ExitCode};

use nix::sys::resource::{getrusage, UsageWho};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let prog = args.next().expect("usage: rss-of PROGRAM ARGS...");
    let status = Command::new(&prog)
        .args(args)
        .status()
        .expect("cannot start the program");
    let ru = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    eprintln!("rss-of: {} KiB", ru.max_rss());
    ExitCode::from(u8::try_from(status.code().unwrap_or(255)).unwrap_or(255))
}
