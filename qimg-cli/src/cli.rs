//! The command line: the top-level `qimg` parser and a dispatch to the
//! verbs. Each verb's module owns its clap arguments; the argument groups
//! they share are in [`crate::args`]. No verb imports this module.

use clap::{Parser, Subcommand};

use crate::CliError;

/// qimg: read, write, check and convert qcow2 and LUKS disk images,
/// compatible with qemu-img and cryptsetup.
#[derive(Debug, Parser)]
#[command(name = "qimg", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the qimg(1) man page in roff, or with DIR write it and one
    /// page per verb (qimg-convert(1), ...) there (`cargo xtask man`).
    #[command(hide = true)]
    Man {
        /// Folder to write every page into.
        dir: Option<std::path::PathBuf>,
    },
    /// Show information about an image (qemu-img info).
    Info(crate::info::InfoCmd),
    /// Show how guest data maps to the image file (qemu-img map).
    Map(crate::map::MapCmd),
    /// Copy an image into a new one, changing format (qemu-img convert).
    Convert(crate::convert_cmd::ConvertCmd),
    /// Change key slots of an encrypted image (qemu-img amend).
    ///
    /// `-o encrypt.state=active|inactive,encrypt.keyslot=N,encrypt.new-secret=ID,encrypt.old-secret=ID,encrypt.iter-time=MS`
    /// for qcow2, the same names without `encrypt.` for raw LUKS.
    Amend(crate::amend::AmendCmd),
    /// LUKS volume tools with cryptsetup's meaning.
    #[command(subcommand)]
    Luks(crate::luks_cmd::LuksCommand),
    /// Change the virtual size of an image (qemu-img resize).
    Resize(crate::resize::ResizeCmd),
    /// Check an image for inconsistencies and optionally repair it
    /// (qemu-img check).
    Check(crate::check::CheckCmd),
    /// Compare the guest content of two images (qemu-img compare); exit 0
    /// identical, 1 different, 2 error.
    Compare(crate::compare::CompareCmd),
    /// Measure the size a new image (or a copy of FILE) would take
    /// (qemu-img measure).
    Measure(crate::measure::MeasureCmd),
    /// Copy part of an image into a new one, dd-style (qemu-img dd).
    Dd(crate::dd::DdCmd),
    /// List, create, apply or delete internal snapshots (qemu-img snapshot).
    Snapshot(crate::snapshot::SnapshotCmd),
    /// Change the backing file of a qcow2 image (qemu-img rebase).
    Rebase(crate::rebase::RebaseCmd),
    /// Write a qcow2 image's data into its backing file (qemu-img commit).
    Commit(crate::commit::CommitCmd),
    /// Create a new image (qemu-img create).
    Create(crate::create::CreateCmd),
}

/// Runs one command; returns the exit code.
pub(crate) fn run(cli: Cli) -> Result<u8, CliError> {
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "qimg", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { dir: Some(dir) } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &dir).map_err(|e| {
                CliError::io(
                    &dir.to_string_lossy(),
                    format!("cannot write the man pages: {e}"),
                )
            })?;
            Ok(0)
        }
        Command::Man { dir: None } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| CliError::usage(format!("cannot render the man page: {e}")))?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)
                .map_err(|e| CliError::usage(format!("cannot write the man page: {e}")))?;
            Ok(0)
        }
        Command::Info(c) => c.run(),
        Command::Map(c) => c.run(),
        Command::Convert(c) => c.run(),
        Command::Amend(c) => c.run(),
        Command::Luks(c) => c.run(),
        Command::Resize(c) => c.run(),
        Command::Check(c) => c.run(),
        Command::Compare(c) => c.run(),
        Command::Measure(c) => c.run(),
        Command::Dd(c) => c.run(),
        Command::Snapshot(c) => c.run(),
        Command::Rebase(c) => c.run(),
        Command::Commit(c) => c.run(),
        Command::Create(c) => c.run(),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// `--object` is parsed by clap into redacted, non-copying values: the
    /// parsed command line's `Debug` never shows a `data=` value, and a
    /// malformed object is no clap error (which would quote it).
    #[test]
    fn object_data_never_in_the_parsed_command_line() {
        use clap::Parser;
        for obj in [
            "secret,id=s,data=hunter2",
            "secret,id=s,data=hunter2,format=base64",
            "secret,data=hunter2",
            "secret,id=s,data=hun,,ter2,bogus",
        ] {
            let cli = Cli::try_parse_from(["qimg", "info", "--object", obj, "x.img"])
                .unwrap_or_else(|e| panic!("{obj}: {e}"));
            let d = format!("{cli:?}");
            assert!(!d.contains("hunter2") && !d.contains("ter2"), "{d}");
            assert!(d.contains("x.img"), "{d}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every verb says what it does and every argument what it means, in
    /// `qimg --help` and each verb's `--help`.
    #[test]
    fn every_verb_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(p.clone());
                }
                for a in sub.get_arguments() {
                    let id = a.get_id().as_str();
                    if id != "help" && id != "version" && a.get_help().is_none() {
                        missing.push(format!("{p} <{id}>"));
                    }
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "qimg", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
