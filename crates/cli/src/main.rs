//! `shoal`: start, stop and inspect a Shoal cluster.
//!
//! A thin binary over the `shoal-head` and `shoal-node` libraries: it parses
//! flags, sets up logging, builds configs and calls their `run`.
//!
//! Modules:
//! - `cluster_file`: the TOML cluster file read by `--config`;
//! - `session`: the session directory (pid files, logs, token, addresses);
//! - `start`, `stop`, `status`, `list` (also `get` and `summary`),
//!   `logs`, `timeline`, `job`, `microbenchmark`: one per subcommand;
//! - `metrics`, `dashboard`: what the head and node processes serve over
//!   HTTP;
//! - `logging`: `tracing` set up from `SHOAL_LOG` or `RUST_LOG`.

mod cluster_file;
mod dashboard;
mod job;
mod list;
mod logging;
mod logs;
mod metrics;
mod microbenchmark;
mod session;
mod start;
mod status;
mod stop;
mod timeline;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Shoal: a Ray-style actor and task cluster for Rust.
///
/// Start a head with `shoal start --head`, join more machines with the command
/// it prints, inspect with `shoal status`, and stop everything started from
/// this machine with `shoal stop`.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a head node (--head) or a node that joins one (--address).
    Start(Box<start::StartArgs>),
    /// Stop every Shoal daemon started from this machine.
    Stop(stop::StopArgs),
    /// Show the cluster's nodes, their states and resources.
    Status(status::StatusArgs),
    /// List what the cluster holds: nodes, jobs, tasks, actors, workers,
    /// objects, placement groups (`--filter`, `--limit`, `--detail`,
    /// `--json`).
    List(list::ListArgs),
    /// List the log files per node, or print one (an actor's, a task's, a
    /// worker's, or a node's FILE), with --tail N and --follow.
    Logs(logs::LogsArgs),
    /// Show one task, actor, node or job with every field.
    Get(list::GetArgs),
    /// Count tasks, actors or objects by function (or class) and state.
    Summary(list::SummaryArgs),
    /// Write the tasks' timeline as Chrome trace JSON (open it in
    /// Perfetto): a track per worker, a slice per task, arrows from
    /// submitter to executor.
    Timeline(timeline::TimelineArgs),
    /// Submit a program to run as a job's driver on the head's machine,
    /// and follow, stop and list jobs.
    Job(job::JobArgs),
    /// Run Ray's microbenchmark metric set on a local cluster (worker
    /// processes); `SHOAL_BENCH_FILTER=substring` runs a subset.
    Microbenchmark(microbenchmark::MicrobenchmarkArgs),
}

/// Where session directories live unless `--session-dir` says otherwise.
pub const DEFAULT_SESSION_ROOT: &str = "/tmp/shoal";

/// The `--session-dir` flag shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// Root of the session directories: each `shoal start --head` makes
    /// `DIR/session_<time>_<pid>` and points `DIR/session_latest` at it.
    #[arg(long = "session-dir", value_name = "DIR", env = "SHOAL_SESSION_DIR", default_value = DEFAULT_SESSION_ROOT)]
    pub root: PathBuf,
}

fn main() -> ExitCode {
    // This binary carries the benchmark's remote functions and actors: run
    // as a worker by a node daemon, it serves them instead.
    shoal::__private::run_worker_if_worker();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Job(args) => match job::run(args) {
            // A submitted job's exit code is the command's.
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Start(args) => start::run(*args),
        Command::Stop(args) => stop::run(args),
        Command::Status(args) => status::run(args),
        Command::List(args) => list::run(args),
        Command::Get(args) => list::get(args),
        Command::Logs(args) => logs::run(args),
        Command::Summary(args) => list::summary(args),
        Command::Timeline(args) => timeline::run(args),
        Command::Microbenchmark(args) => microbenchmark::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
