//! Argument parsing and dispatch to the subcommands.

mod bench;
mod inspect;
mod merge;
mod report;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gradmerge::Error;

/// Merge safetensors checkpoints out-of-core: linear, task arithmetic, TIES, DARE,
/// breadcrumbs, slerp, Model Stock, Fisher averaging and uncertainty-based gradient
/// matching.
#[derive(Debug, Parser)]
#[command(name = "gradmerge", version, about, max_term_width = 100)]
pub struct Cli {
    /// More log output: -v shows one-time decisions, -vv per-tensor strategy.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// No progress bar and no summary; errors only.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Merge checkpoints from a mergekit-style YAML file or from flags.
    Merge(Box<merge::MergeArgs>),
    /// List a checkpoint's tensors, dtypes, shapes, sizes and shards (reads headers only).
    Inspect(inspect::InspectArgs),
    /// Generate synthetic model families and time merges of them.
    Bench(bench::BenchArgs),
}

/// Largest accepted `--threads`: more threads than this only add memory and start-up time.
const MAX_THREADS: usize = 1024;

/// Smallest accepted `--budget`, in bytes (1 MiB): below it the engine still needs one
/// tile per input and chunk, so a smaller number would not be honoured.
const MIN_BUDGET_BYTES: u64 = 1 << 20;

/// Checks `--threads` (`None` or 0 where 0 means one per core is allowed by the caller).
fn check_threads(threads: usize) -> anyhow::Result<usize> {
    if threads > MAX_THREADS {
        return Err(Error::InvalidParameter(format!(
            "--threads {threads} is more than the limit of {MAX_THREADS}; this machine has {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ))
        .into());
    }
    Ok(threads)
}

/// Parses `--budget`, or returns the default.
fn parse_budget(budget: Option<&str>) -> anyhow::Result<u64> {
    let Some(text) = budget else {
        return Ok(gradmerge::pipeline::DEFAULT_BUDGET_BYTES);
    };
    let bytes = gradmerge::units::parse_size(text)?;
    if bytes < MIN_BUDGET_BYTES {
        return Err(Error::InvalidParameter(format!(
            "--budget {text} is below the minimum of 1MiB (the default is 256MiB)"
        ))
        .into());
    }
    Ok(bytes)
}

/// Exit code for a failed merge or read.
const EXIT_FAILURE: u8 = 1;
/// Exit code for a usage error.
const EXIT_USAGE: u8 = 2;

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.quiet);
    if let Err(e) = ctrlc::set_handler(gradmerge::interrupt::on_signal) {
        log::warn!("cannot install the Ctrl-C handler: {e}");
    }
    let result = match &cli.command {
        Command::Merge(args) => merge::run(args, cli.quiet),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            let code = exit_code(&e);
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {e}");
            // Library errors already show their source, so print only causes not yet shown.
            let mut shown = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    let _ = writeln!(stderr, "  caused by: {text}");
                    shown.push_str(&text);
                }
                source = cause.source();
            }
            if let Some(hint) = hint(&e) {
                let _ = writeln!(stderr, "  hint: {hint}");
            }
            ExitCode::from(code)
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        // A rejected --out is the user's choice of flags, like a bad parameter.
        Some(Error::InvalidParameter(_) | Error::Destination { .. }) => EXIT_USAGE,
        Some(Error::Interrupted) => gradmerge::interrupt::FORCED_EXIT_CODE as u8,
        _ => EXIT_FAILURE,
    }
}

/// Returns advice for failures whose fix the error itself does not name.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    if let Some(Error::NotFound { path }) = e.downcast_ref::<Error>() {
        // `org/name` is how the Hugging Face Hub names models.
        if path.is_relative() && path.components().count() == 2 {
            return Some("gradmerge reads local folders only and never downloads; if this is a Hugging Face Hub id, download the model first (for example `huggingface-cli download ORG/NAME --local-dir NAME`) and pass that folder");
        }
        if path.is_relative() {
            return Some("relative model paths are resolved against the current directory, as in mergekit; run from the folder the paths start in, or use absolute paths");
        }
    }
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>())?;
    match io.raw_os_error() {
        Some(libc::ENOSPC) => Some("the disk is full: free space or write the output to another disk"),
        Some(libc::EFBIG) => Some("a file size limit was reached (ulimit -f or the filesystem's maximum file size): raise the limit or use a smaller --shard-size"),
        Some(libc::EDQUOT) => Some("the disk quota is exhausted: free space or write the output elsewhere"),
        _ => None,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().map(|io| io.kind()) == broken
            // JSON output wraps the write error.
            || c.downcast_ref::<serde_json::Error>().and_then(|j| j.io_error_kind()) == broken
    })
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => log::LevelFilter::Error,
        (false, 0) => log::LevelFilter::Warn,
        (false, 1) => log::LevelFilter::Info,
        (false, _) => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .format_target(false)
        .parse_env("GRADMERGE_LOG")
        .init();
}
