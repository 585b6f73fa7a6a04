//! The command line: clap definitions and one handler per verb.

use std::path::Path;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::convert::{self, CopyOptions};
use crate::dev::{erased, AnyDev};
use crate::image::{self, Format, OpenOptions};
use crate::opts::{parse_size, OptionMap};
use crate::secret::{ObjectArg, Secrets};
use crate::CliError;

/// qimg: read, write, check and convert qcow2 and LUKS disk images,
/// compatible with qemu-img and cryptsetup.
#[derive(Debug, Parser)]
#[command(name = "qimg", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum Output {
    /// Text for people, laid out like qemu-img's.
    #[default]
    Human,
    /// JSON with qemu-img's keys, for scripts.
    Json,
}

/// Image formats on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FormatArg {
    /// qcow2 (v2 compat=0.10 or v3 compat=1.1).
    Qcow2,
    /// A plain disk image.
    Raw,
    /// A LUKS volume (LUKS1 or LUKS2).
    Luks,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Qcow2 => Format::Qcow2,
            FormatArg::Raw => Format::Raw,
            FormatArg::Luks => Format::Luks,
        }
    }
}

/// How secrets reach qimg.
#[derive(Debug, Args, Default, Clone)]
pub(crate) struct SecretArgs {
    /// Define a secret: `secret,id=ID,data=STRING|file=PATH[,format=base64]`
    /// (refer to it with `key-secret=ID` or `encrypt.key-secret=ID`).
    #[arg(long = "object", value_name = "OBJECT", value_parser = ObjectArg::parse)]
    pub(crate) object: Vec<ObjectArg>,
    /// Read the passphrase from PATH, byte for byte as cryptsetup does
    /// (`-` for standard input).
    #[arg(long = "key-file", value_name = "PATH")]
    pub(crate) key_file: Option<String>,
    /// Which `--object` secret unlocks the source (qemu-img's
    /// `key-secret`); with a single secret object it is used by default.
    #[arg(long = "key-secret", value_name = "ID")]
    pub(crate) key_secret: Option<String>,
    /// A detached LUKS header for a LUKS source.
    #[arg(long = "header", value_name = "PATH")]
    pub(crate) header: Option<String>,
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
    Info {
        /// Image format; detected from the file when absent.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Show every image of the backing chain.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Open without taking QEMU's shared locks, so an image another
        /// process writes can be read (its content may be inconsistent).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        secrets: SecretArgs,
        /// The image file.
        filename: String,
    },
    /// Show how guest data maps to the image file (qemu-img map).
    Map {
        /// Image format; detected from the file when absent.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Open without taking QEMU's shared locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        secrets: SecretArgs,
        /// The image file.
        filename: String,
    },
    /// Copy an image into a new one, changing format (qemu-img convert).
    Convert {
        /// Source format; detected from the file when absent.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Destination format.
        #[arg(short = 'O', value_enum, default_value = "raw")]
        output_format: FormatArg,
        /// Destination options (`-o key=value,...`).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Read the source as of an internal snapshot
        /// (`NAME`, `snapshot.name=NAME` or `snapshot.id=ID`).
        #[arg(short = 'l', value_name = "SNAPSHOT")]
        snapshot: Option<String>,
        /// Minimum run of zero bytes left as a hole in the destination
        /// (default 4k; 0 writes everything).
        #[arg(short = 'S', value_name = "SIZE", default_value = "4k")]
        sparse_size: String,
        /// Skip creating the destination; it must exist and be large enough.
        #[arg(short = 'n')]
        no_create: bool,
        /// Compress the destination (qcow2): every cluster that shrinks is
        /// stored compressed.
        #[arg(short = 'c')]
        compress: bool,
        /// Backing file of the new qcow2 destination.
        #[arg(short = 'B', value_name = "BACKING")]
        backing: Option<String>,
        /// The existing destination already reads as zero (with -n).
        #[arg(long = "target-is-zero")]
        target_is_zero: bool,
        /// Quiet (accepted for compatibility).
        #[arg(short = 'q')]
        quiet: bool,
        /// Show a progress bar on standard error (only when it is a
        /// terminal).
        #[arg(short = 'p')]
        progress: bool,
        /// Threads (qemu-img's `-m`): with 2 or more, one thread writes
        /// while the others read and do the decryption or encryption, and
        /// `-c` compresses on all of them. The default is 2 on machines
        /// with two cores or more. The output is byte-identical whatever
        /// the count.
        #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: Option<u16>,
        /// Allow out-of-order writes (qemu-img's `-W`). Accepted: qimg
        /// keeps writes in order, which `-W` permits, so the destination's
        /// layout stays the same with or without it.
        #[arg(short = 'W')]
        out_of_order: bool,
        /// Read the source without taking QEMU's shared locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        secrets: SecretArgs,
        /// Source image.
        source: String,
        /// Destination image.
        destination: String,
    },
    /// Change key slots of an encrypted image (qemu-img amend).
    ///
    /// `-o encrypt.state=active|inactive,encrypt.keyslot=N,encrypt.new-secret=ID,encrypt.old-secret=ID,encrypt.iter-time=MS`
    /// for qcow2, the same names without `encrypt.` for raw LUKS.
    Amend {
        /// Image format; detected from the file when absent.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Key slot options (`-o key=value,...`).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Overwrite an active key slot, or erase the last active one.
        #[arg(long)]
        force: bool,
        /// FILENAME is qemu-img's option list
        /// (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`).
        #[arg(long = "image-opts")]
        image_opts: bool,
        /// Quiet (accepted for compatibility).
        #[arg(short = 'q')]
        quiet: bool,
        #[command(flatten)]
        secrets: SecretArgs,
        /// The image.
        filename: String,
    },
    /// LUKS volume tools with cryptsetup's meaning.
    #[command(subcommand)]
    Luks(LuksCommand),
    /// Change the virtual size of an image (qemu-img resize).
    Resize {
        /// Image format; detected from the file when absent.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Allow making the image smaller (data past the new end is lost).
        #[arg(long)]
        shrink: bool,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image.
        filename: String,
        /// New size, or `+SIZE` / `-SIZE` relative to the current one.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Check an image for inconsistencies and optionally repair it
    /// (qemu-img check).
    Check {
        /// Image format; detected from the file when absent.
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Repair: `leaks` frees leaked clusters, `all` fixes every error.
        #[arg(short = 'r', value_enum)]
        repair: Option<crate::check::RepairArg>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Quiet: no summary.
        #[arg(short = 'q')]
        quiet: bool,
        /// Read without taking QEMU's shared locks (not with -r).
        #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
        force_share: bool,
        /// Accepted for compatibility: the metadata of encrypted images is
        /// plaintext, so checking needs no key.
        #[command(flatten)]
        secrets: SecretArgs,
        /// The image file.
        filename: String,
    },
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
    Create {
        /// Image format.
        #[arg(short = 'f', long = "format", value_enum, default_value = "raw")]
        format: FormatArg,
        /// Format options (`-o key=value,...`). LUKS: qemu-img's names
        /// (key-secret, cipher-alg, cipher-mode, ivgen-alg, hash-alg,
        /// iter-time) plus luks-version=1|2; for LUKS2 also
        /// pbkdf=argon2id|argon2i|pbkdf2, pbkdf-memory=KiB,
        /// pbkdf-parallel=N, pbkdf-iterations=N (fixed PBKDF2 iterations
        /// or Argon2 passes instead of timing iter-time),
        /// sector-size=512..4096, metadata-size=16k..4M, label=TEXT,
        /// detached-header=on (the file holds only the header; the size is
        /// ignored and the payload is any file read with --header).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Quiet: print nothing on success.
        #[arg(short = 'q')]
        quiet: bool,
        /// Backing file (qcow2 only); the size defaults to its size.
        #[arg(short = 'b', value_name = "BACKING")]
        backing: Option<String>,
        /// Format of the backing file.
        #[arg(short = 'F', value_name = "FMT")]
        backing_fmt: Option<String>,
        #[command(flatten)]
        secrets: SecretArgs,
        /// The new image file.
        filename: String,
        /// Virtual size, with an optional k, M, G, T suffix.
        size: Option<String>,
    },
}

/// `qimg luks ...`.
#[derive(Debug, Subcommand)]
enum LuksCommand {
    /// Print the LUKS header and key slots (cryptsetup luksDump).
    Dump {
        /// JSON instead of cryptsetup's layout.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// The volume, or a detached header file.
        filename: String,
    },
    /// Add a key to a free key slot (cryptsetup luksAddKey).
    AddKey(crate::keys::KeyVerbArgs),
    /// Erase the key slot a key opens (cryptsetup luksRemoveKey).
    RemoveKey(crate::keys::KeyVerbArgs),
    /// Replace a key with a new one (cryptsetup luksChangeKey).
    ChangeKey(crate::keys::KeyVerbArgs),
    /// Save the header and key material area to a file (cryptsetup
    /// luksHeaderBackup).
    HeaderBackup(crate::keys::HeaderFileArgs),
    /// Write a header backup over the volume's header (cryptsetup
    /// luksHeaderRestore).
    HeaderRestore(crate::keys::HeaderFileArgs),
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
        Command::Info {
            format,
            output,
            backing_chain,
            force_share,
            secrets,
            filename,
        } => {
            crate::lock::set_force_share(force_share);
            crate::lock::set_reads_without_io(true);
            crate::info::run(
                &filename,
                format.map(Into::into),
                output,
                backing_chain,
                &secrets,
            )
        }
        Command::Map {
            format,
            output,
            force_share,
            secrets,
            filename,
        } => {
            crate::lock::set_force_share(force_share);
            crate::map::run(&filename, format.map(Into::into), output, &secrets)
        }
        Command::Convert {
            format,
            output_format,
            options,
            snapshot,
            sparse_size,
            no_create,
            compress,
            backing,
            target_is_zero,
            quiet,
            progress,
            workers,
            out_of_order: _,
            force_share,
            secrets,
            source,
            destination,
        } => {
            crate::lock::set_force_share(force_share);
            convert_cmd(ConvertArgs {
                progress: progress && !quiet,
                workers: workers.map_or_else(crate::parallel::default_workers, usize::from),
                compress,
                backing,
                format: format.map(Into::into),
                output_format: output_format.into(),
                options,
                snapshot,
                sparse_size: parse_size(&sparse_size)
                    .map_err(|e| CliError::usage(format!("-S: {e}")))?,
                no_create,
                target_is_zero,
                secrets,
                source,
                destination,
            })
        }
        Command::Resize {
            format,
            shrink,
            quiet,
            filename,
            size,
        } => crate::resize::run(&filename, format.map(Into::into), shrink, quiet, &size),
        Command::Check {
            format,
            repair,
            output,
            quiet,
            force_share,
            secrets: _,
            filename,
        } => {
            crate::lock::set_force_share(force_share);
            crate::check::run(&crate::check::CheckArgs {
                format: format.map(Into::into),
                repair,
                json: output == Output::Json,
                quiet,
                filename: &filename,
            })
        }
        Command::Luks(LuksCommand::Dump { output, filename }) => {
            crate::luks::dump(&filename, output == Output::Json)
        }
        Command::Amend {
            format,
            options,
            force,
            image_opts,
            quiet: _,
            secrets,
            filename,
        } => crate::keys::amend(&crate::keys::AmendArgs {
            format: format.map(Into::into),
            options: &options,
            force,
            image_opts,
            secrets: &secrets,
            filename: &filename,
        }),
        Command::Luks(LuksCommand::AddKey(a)) => {
            crate::keys::run_key_verb(crate::keys::KeyVerb::Add, &a)
        }
        Command::Luks(LuksCommand::RemoveKey(a)) => {
            crate::keys::run_key_verb(crate::keys::KeyVerb::Remove, &a)
        }
        Command::Luks(LuksCommand::ChangeKey(a)) => {
            crate::keys::run_key_verb(crate::keys::KeyVerb::Change, &a)
        }
        Command::Luks(LuksCommand::HeaderBackup(a)) => crate::keys::run_header_verb(false, &a),
        Command::Luks(LuksCommand::HeaderRestore(a)) => crate::keys::run_header_verb(true, &a),
        Command::Compare(c) => c.run(),
        Command::Measure(c) => c.run(),
        Command::Dd(c) => c.run(),
        Command::Snapshot(c) => c.run(),
        Command::Rebase(c) => c.run(),
        Command::Commit(c) => c.run(),
        Command::Create {
            format,
            options,
            quiet,
            backing,
            backing_fmt,
            secrets,
            filename,
            size,
        } => crate::create::run(crate::create::CreateArgs {
            format,
            options: &options,
            quiet,
            secrets: &secrets,
            filename: &filename,
            size: size.as_deref(),
            backing: backing.as_deref(),
            backing_fmt: backing_fmt.as_deref(),
        }),
    }
}

struct ConvertArgs {
    progress: bool,
    workers: usize,
    compress: bool,
    backing: Option<String>,
    format: Option<Format>,
    output_format: Format,
    options: Vec<String>,
    snapshot: Option<String>,
    sparse_size: u64,
    no_create: bool,
    target_is_zero: bool,
    secrets: SecretArgs,
    source: String,
    destination: String,
}

fn convert_cmd(a: ConvertArgs) -> Result<u8, CliError> {
    crate::parallel::set_workers(a.workers);
    crate::lock::creating_for(&format!("error while converting {}: ", a.output_format));
    let secrets = Secrets::parse(&a.secrets.object)?;
    let mut src = image::open(
        &a.source,
        &OpenOptions {
            format: a.format,
            snapshot: a.snapshot.clone(),
            ..OpenOptions::from_args(&a.secrets)
        },
        &secrets,
    )?;
    crate::lock::refuse_self_overwrite(
        &a.destination,
        &src.files,
        "the source image or a file of its backing chain",
    )?;
    if let Some(b) = &a.backing {
        // `-B` naming the destination itself (or a chain back to it).
        let full = image::resolve_backing(&a.destination, b);
        crate::lock::refuse_backing_loop(&a.destination, &full.to_string_lossy(), Format::Qcow2)?;
    }
    // LUKS payloads are whole sectors: a raw source of odd length is padded
    // with zeroes (reads past the end of a file are zero).
    let len = if a.output_format == Format::Luks {
        src.virtual_size.next_multiple_of(512)
    } else {
        src.virtual_size
    };
    let opts = OptionMap::parse(&a.options).map_err(|e| CliError::usage(format!("-o: {e}")))?;
    if let Some(df) = opts.get("data_file") {
        let full = image::resolve_backing(&a.destination, df);
        crate::lock::refuse_self_overwrite(
            &full.to_string_lossy(),
            &src.files,
            "the source image or a file of its backing chain",
        )?;
    }
    let mut dst: AnyDev = match a.output_format {
        Format::Raw => {
            opts.reject_unused("raw")
                .map_err(|e| CliError::usage(e.to_string()))?;
            let path = Path::new(&a.destination);
            if a.no_create {
                image::warn_if_raw_looks_formatted(&a.destination);
            }
            let file = if a.no_create {
                luks_core::io::FileDevice::open_rw(path)
                    .map_err(|e| {
                        CliError::io(&a.destination, format!("cannot open for writing: {e}"))
                    })
                    .and_then(|d| {
                        crate::lock::lock_dev(d, &a.destination, crate::lock::Access::Write)
                    })?
            } else {
                crate::lock::create_locked(&a.destination)?
            };
            let mut dev = erased(file);
            // Sized first, as qemu-img does: a size the filesystem cannot
            // hold ("File too large") fails before any copying.
            if !a.no_create {
                dev.set_size(len).map_err(|e| {
                    CliError::io(&a.destination, format!("cannot size the output: {e}"))
                })?;
            }
            dev
        }
        Format::Qcow2 => {
            return convert_to_qcow2(&a, src.dev.as_mut(), len, &opts, &secrets);
        }
        Format::Luks => {
            if a.no_create {
                return Err(CliError::usage(
                    "-n with -O luks is not supported: qimg creates the LUKS volume".into(),
                ));
            }
            crate::luks::create_for_convert(&a.destination, &opts, &secrets, len)?
        }
    };
    // A new LUKS payload reads as noise, not zeroes: write every sector.
    let dst_zeroed = a.output_format != Format::Luks;
    let copy_opts = CopyOptions {
        sparse_size: a.sparse_size,
        target_is_zero: (dst_zeroed && !a.no_create) || a.target_is_zero,
        pipelined: crate::parallel::pipelined(),
    };
    let bar = crate::progress::Bar::new(a.progress, len);
    convert::copy(src.dev.as_mut(), &mut dst, len, copy_opts, &mut |done| {
        bar.set(done)
    })
    .map_err(|e| copy_err(&a, e))?;
    bar.finish();
    if !a.no_create {
        dst.set_size(len)
            .map_err(|e| CliError::io(&a.destination, e.to_string()))?;
    }
    dst.flush()
        .map_err(|e| CliError::io(&a.destination, e.to_string()))?;
    Ok(0)
}

/// `convert -O qcow2 [-c]`: a new (or, with `-n`, existing) qcow2 image
/// written without barriers and flushed once at the end.
fn convert_to_qcow2(
    a: &ConvertArgs,
    src: &mut dyn crate::dev::Source,
    len: u64,
    opts: &OptionMap,
    secrets: &Secrets,
) -> Result<u8, CliError> {
    let dst = &a.destination;
    if a.compress && opts.get("encrypt.format").is_some() {
        return Err(CliError::usage(
            "Compression can't be used with encryption".into(),
        ));
    }
    if a.compress && opts.get("data_file").is_some() {
        return Err(CliError::usage(
            "Compression can't be used with an external data file".into(),
        ));
    }
    let mut w = if a.no_create {
        // An encrypted destination's passphrase: `-o encrypt.key-secret=ID`
        // (qemu-img takes it in --target-image-opts), else the only
        // secret given, else a prompt.
        let keys = crate::luks::KeySource {
            key_file: None,
            key_secret: opts.get("encrypt.key-secret").map(str::to_string),
        };
        opts.reject_unused("qcow2")
            .map_err(|e| CliError::usage(e.to_string()))?;
        crate::create::open_qcow2_writer_keyed(dst, Some((&keys, secrets)))?
    } else {
        let c = crate::create::Qcow2Create::parse(opts, a.backing.as_deref(), None)?;
        c.create(dst, len, secrets)?
    };
    w.set_write_barriers(false);
    let workers = crate::parallel::workers();
    let cipher_workers = crate::parallel::cipher_workers();
    if cipher_workers > 1 {
        w.set_sector_crypt(Box::new(crate::parallel::ParallelEncrypt::new(
            cipher_workers,
        )));
    }
    if a.compress && w.header().crypt_method != 0 {
        return Err(CliError::usage(
            "Compression can't be used with encryption".into(),
        ));
    }
    if a.compress && w.header().has_data_file() {
        return Err(CliError::usage(
            "Compression can't be used with an external data file".into(),
        ));
    }
    let io_dst = |e: qcow_core::Error<luks_core::io::FileError>| CliError::io(dst, e.to_string());
    // What the copy leaves out would read from the backing file: zero the
    // range first, so the image reads as the source.
    let backed = w.header().backing_file_offset != 0 && !a.target_is_zero;
    if backed {
        w.write_zeroes(0, len).map_err(io_dst)?;
    }
    let cluster = w.header().cluster_size();
    let bar = crate::progress::Bar::new(a.progress, len);
    if a.compress {
        let ctype = w.header().compression_type;
        convert::copy_clusters(
            src,
            len,
            cluster,
            crate::parallel::compress_window(workers, cluster),
            &mut |batch| {
                let packed = crate::parallel::compress_all(ctype, batch, workers);
                for ((idx, data), p) in batch.iter().zip(packed) {
                    w.write_precompressed(*idx, data, p.as_deref())
                        .map_err(|e| dev_err(dst, e))?;
                }
                Ok(())
            },
            &mut |done| bar.set(done),
        )
        .map_err(|e| copy_err(a, e))?;
        w.close().map_err(io_dst)?;
    } else {
        let mut dev: AnyDev = erased(w);
        let copy_opts = CopyOptions {
            sparse_size: a.sparse_size,
            target_is_zero: !a.no_create || a.target_is_zero || backed,
            pipelined: crate::parallel::pipelined(),
        };
        convert::copy(src, &mut dev, len, copy_opts, &mut |done| bar.set(done))
            .map_err(|e| copy_err(a, e))?;
        dev.flush().map_err(|e| CliError::io(dst, e.to_string()))?;
    }
    bar.finish();
    Ok(0)
}

fn dev_err(file: &str, e: impl std::fmt::Display) -> crate::dev::DevError {
    crate::dev::DevError(format!("{file}: {e}"))
}

fn copy_err(a: &ConvertArgs, e: convert::CopyError) -> CliError {
    match e {
        convert::CopyError::Read(e) => CliError::io(&a.source, e.to_string()),
        convert::CopyError::Write(e) => CliError::io(&a.destination, e.to_string()),
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
