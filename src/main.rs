//! The `cairn` command: parses the command line and runs the subcommand.
//!
//! `cairn serve` (the plugin daemon), `cairn ls` and `cairn report` (what it knows),
//! `cairn mount SPEC MOUNTPOINT` (one volume, in the foreground), `cairn flush MOUNTPOINT` and
//! `cairn store check [SPEC]`.

mod check;
mod flush;
mod mount;
mod report;
mod serve;
mod snapshot;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Where cairn keeps its state when not told otherwise.
const DEFAULT_STATE_DIR: &str = "/var/lib/cairn";

/// Log filter when CAIRN_LOG is unset: warnings, but not the AWS SDK's own, whose failures
/// reach the user through cairn's messages anyway.
/// fuser's own warnings (an unmount of an already unmounted mountpoint) are noise too.
const QUIET_LOGS: &str = "warn,aws_config=error,aws_smithy_runtime=error,fuser=error";

#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about = "Docker volumes kept in S3 or a shared directory, with a local write-back cache"
)]
struct Cli {
    /// Directory for cairn's state; the embedded default store lives in its `store/` folder.
    #[arg(long, global = true, env = "CAIRN_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The Docker volume plugin: answer Docker on the plugin socket until SIGTERM.
    Serve(serve::ServeArgs),
    /// Work with stores directly.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Mount a store prefix on a directory, in the foreground, until SIGINT or SIGTERM.
    Mount(mount::MountArgs),
    /// Upload everything a mount holds now, and wait until the store has it.
    Flush(flush::FlushArgs),
    /// List the volumes the daemon knows (from every configured store).
    Ls(report::LsArgs),
    /// A block of facts per volume (Dokku style), one fact for a flag, or JSON.
    Report(report::ReportArgs),
    /// Point-in-time copies of a volume in its store, and volumes made from them.
    Snapshot(snapshot::SnapshotArgs),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Check that a store works: list, put, get and delete a small object, step by step.
    Check {
        /// s3://BUCKET[/PREFIX][?endpoint=URL&region=R&path_style=true&profile=P&secret_file=F],
        /// dir:///PATH, or memory:. Default: the embedded dir store under the state directory.
        spec: Option<String>,
    },
}

/// The AWS SDK's crates: at debug level they print the credentials' access key id, so they are
/// held at warnings whatever CAIRN_LOG asks.
const SDK_TARGETS: &[&str] = &[
    "aws_config",
    "aws_runtime",
    "aws_sdk_s3",
    "aws_sigv4",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
];

/// CAIRN_LOG (tracing's env-filter syntax), or the quiet default.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let Ok(mut filter) = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG") else {
        return tracing_subscriber::EnvFilter::new(QUIET_LOGS);
    };
    for target in SDK_TARGETS {
        let capped = format!("{target}=warn").parse().expect("a valid directive");
        filter = filter.add_directive(capped);
    }
    filter
}

/// Prints what a command made, or its error, and exits accordingly.
fn print_or_fail(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps the mount's memory bounded while megabytes-sized buffers (upload parts, fetched
/// chunks) come and go. By default glibc raises its mmap threshold after the first such buffer is
/// freed and keeps later ones in a heap per thread: a mount sat at 150-170 MiB resident after
/// writing 1 GiB. Here buffers of 8 MiB and more (upload parts) are mapped and unmapped; smaller
/// ones are reused from at most two heaps, which keep up to 32 MiB free rather than handing it
/// back and faulting it in again for the next chunk (benches/RESULTS.md has the numbers).
fn bound_allocator_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    bound_allocator_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Store(StoreCommand::Check { spec }) => {
            runtime.block_on(check::run(spec.as_deref(), &cli.state_dir))
        }
        Command::Serve(args) => runtime.block_on(serve::run(args, &cli.state_dir)),
        Command::Mount(args) => runtime.block_on(mount::run(args, &cli.state_dir)),
        Command::Flush(args) => flush::run(args, &runtime),
        Command::Ls(args) => print_or_fail(runtime.block_on(report::ls(&args))),
        Command::Report(args) => print_or_fail(runtime.block_on(report::report(&args))),
        Command::Snapshot(args) => {
            print_or_fail(runtime.block_on(snapshot::run(args, &cli.state_dir)))
        }
    }
}
