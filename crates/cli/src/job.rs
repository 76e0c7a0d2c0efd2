//! `shoal job`: run a program as a job's driver on the head's machine
//! (`submit`), and follow, stop and list jobs.
//!
//! `submit` uploads the program, and the working directory as a tar archive,
//! by content hash: the head says which of the two it lacks, and only those
//! travel (a progress bar shows a large upload on a terminal). The head runs
//! the program with `SHOAL_ADDRESS`, `SHOAL_TOKEN` and `SHOAL_JOB_ID` set, so
//! the `shoal` SDK in it joins the cluster as that job's driver; its output
//! is kept on the head, where `shoal job logs` reads it, during the run and
//! after.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_net::digest::sha256_hex;
use shoal_proto::head::{JobSubmission, UPLOAD_PART_BYTES};
use shoal_proto::node::LOG_CHUNK_MAX;
use shoal_proto::state::{StateKind, StateQuery};
use shoal_proto::{HeadReply, HeadRequest, JobId};

use crate::list::{int, one, print_rows, query, row_json, text};
use crate::status::{ask, HeadArgs, HeadConnection, HeadTarget};

#[derive(Debug, clap::Args)]
pub struct JobArgs {
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Debug, clap::Subcommand)]
enum JobCommand {
    /// Upload PROGRAM (and --working-dir) to the head and run it there as
    /// a job's driver: prints the job id, then its output until it exits
    /// (unless --no-wait), and exits with its exit code.
    Submit(SubmitArgs),
    /// A job's state, exit code and message.
    Status(StatusArgs),
    /// A submitted job's output (its driver's stdout and stderr).
    Logs(LogsArgs),
    /// Stop a submitted job: SIGTERM to its driver's process group,
    /// SIGKILL 5 s later; waits until it has stopped.
    Stop(StopArgs),
    /// Every job the head remembers, newest first.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// A directory to upload with the program: the driver runs in it.
    #[arg(long, value_name = "DIR")]
    working_dir: Option<PathBuf>,
    /// Set a variable in the driver's environment (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Print the job id and return; follow with `shoal job logs --follow`.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    head: HeadArgs,
    /// The program (a path, or a name looked up in PATH) and its
    /// arguments, after `--`.
    #[arg(required = true, trailing_var_arg = true, value_name = "PROGRAM")]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The job.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    head: HeadArgs,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The job.
    id: String,
    /// Keep printing its output until it exits.
    #[arg(long, short)]
    follow: bool,
    #[command(flatten)]
    head: HeadArgs,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The job.
    id: String,
    /// Return once the stop is asked, without waiting for the driver to
    /// exit.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    head: HeadArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    head: HeadArgs,
}

/// Largest working directory uploaded (the head's limit too).
const WORKING_DIR_BYTES_MAX: u64 = shoal_head::submit::WORKING_DIR_BYTES_MAX;
/// Uploads at least this large show a progress bar.
const PROGRESS_FROM: usize = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);
/// How often output is polled while a job runs.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// How long `stop` waits for the driver (its grace, and some).
const STOP_WAIT: Duration = Duration::from_secs(30);

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Runs a `shoal job` command; the exit code is the job's for `submit`.
pub fn run(args: JobArgs) -> Result<ExitCode> {
    crate::logging::init("warn");
    match args.command {
        JobCommand::Submit(args) => submit(args),
        JobCommand::Status(args) => status(&args).map(|()| ExitCode::SUCCESS),
        JobCommand::Logs(args) => logs(&args).map(|()| ExitCode::SUCCESS),
        JobCommand::Stop(args) => stop(&args).map(|()| ExitCode::SUCCESS),
        JobCommand::List(args) => list(&args).map(|()| ExitCode::SUCCESS),
    }
}

/// What a submission uploads.
struct Upload {
    hash: String,
    bytes: Vec<u8>,
    what: String,
}

fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let target = HeadTarget::from_args(&args.head)?;
    let (program_arg, program_args) = args.command.split_first().context("no PROGRAM given")?;
    let path = find_program(program_arg)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?
        .to_string();
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let program = Upload {
        hash: sha256_hex(&bytes),
        bytes,
        what: name.clone(),
    };
    let working_dir = match &args.working_dir {
        Some(dir) => {
            let bytes = pack(dir)?;
            Some(Upload {
                hash: sha256_hex(&bytes),
                bytes,
                what: format!("{} (working directory)", dir.display()),
            })
        }
        None => None,
    };
    let submission = JobSubmission {
        job_id: JobId::random(),
        program: name,
        program_hash: program.hash.clone(),
        args: program_args.to_vec(),
        env: args.env,
        working_dir_hash: working_dir.as_ref().map(|w| w.hash.clone()),
    };
    let job_id = submission.job_id;
    let uploads: Vec<Upload> = std::iter::once(program).chain(working_dir).collect();
    runtime()?.block_on(async {
        let head = HeadConnection::open(&target.address, &target.token, TIMEOUT).await?;
        let result = async {
            send_submission(&head, &submission, &uploads).await?;
            if args.no_wait {
                println!("{job_id}");
                return Ok(());
            }
            eprintln!(
                "job {job_id} submitted; its output follows (`shoal job stop {job_id}` stops it)"
            );
            follow_output(&head, job_id, true).await
        }
        .await;
        head.close().await;
        result
    })?;
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let row = one(&target, StateKind::Jobs, "job_id", &job_id.to_string())?;
    let state = text(&row, "state").unwrap_or("?");
    if state == "SUCCEEDED" {
        return Ok(ExitCode::SUCCESS);
    }
    let message = text(&row, "message").unwrap_or("");
    eprintln!("job {job_id} {state}: {message}");
    let code = int(&row, "exit_code").map_or(1, |c| u8::try_from(c).unwrap_or(1).max(1));
    Ok(ExitCode::from(code))
}

/// Submits, uploading first what the head says it lacks.
async fn send_submission(
    head: &HeadConnection,
    submission: &JobSubmission,
    uploads: &[Upload],
) -> Result<()> {
    let request = HeadRequest::SubmitJob(Box::new(submission.clone()));
    for attempt in 0..2 {
        let missing = match head.client.call_idempotent(&request, TIMEOUT).await? {
            HeadReply::JobSubmitted { missing, .. } => missing,
            other => bail!("unexpected reply from the head: {other:?}"),
        };
        if missing.is_empty() {
            return Ok(());
        }
        if attempt > 0 {
            bail!("the head lost the uploads before the job started; submit again");
        }
        for upload in uploads.iter().filter(|u| missing.contains(&u.hash)) {
            send(head, upload).await?;
        }
    }
    Ok(())
}

/// Uploads one file by its hash, in parts.
async fn send(head: &HeadConnection, upload: &Upload) -> Result<()> {
    let total = upload.bytes.len();
    let bar = (total >= PROGRESS_FROM).then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(format!("uploading {}", upload.what));
        bar
    });
    for (i, request) in HeadRequest::upload_parts(&upload.hash, &upload.bytes).enumerate() {
        // The head takes a few uploads at once; others wait their turn.
        head.client
            .call_when_available(&request, TIMEOUT, Duration::from_secs(120))
            .await
            .with_context(|| format!("uploading {}", upload.what))?;
        if let Some(bar) = &bar {
            bar.set_position(((i + 1) * UPLOAD_PART_BYTES).min(total) as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// Prints a job's output from the start: what there is now, or (with
/// `follow`) until the driver has exited.
async fn follow_output(head: &HeadConnection, job_id: JobId, follow: bool) -> Result<()> {
    let mut offset = 0;
    let mut stdout = std::io::stdout().lock();
    loop {
        let request = HeadRequest::JobLogs {
            job_id,
            offset,
            len: LOG_CHUNK_MAX,
        };
        let (data, size, done) = match head.client.call_idempotent(&request, TIMEOUT).await? {
            HeadReply::JobLog { data, size, done } => (data, size, done),
            other => bail!("unexpected reply from the head: {other:?}"),
        };
        offset += data.len() as u64;
        stdout.write_all(&data)?;
        stdout.flush()?;
        if offset >= size && (done || !follow) {
            return Ok(());
        }
        if data.is_empty() {
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

fn status(args: &StatusArgs) -> Result<()> {
    let target = HeadTarget::from_args(&args.head)?;
    let row = one(&target, StateKind::Jobs, "job_id", &args.id)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&row_json(&row))?);
        return Ok(());
    }
    let state = text(&row, "state").unwrap_or("?");
    println!("job {}: {state}", args.id);
    if let Some(code) = int(&row, "exit_code") {
        println!("exit code: {code}");
    }
    if let Some(message) = text(&row, "message") {
        println!("message: {message}");
    }
    if let Some(entrypoint) = text(&row, "entrypoint") {
        println!("entrypoint: {entrypoint}");
    }
    Ok(())
}

fn logs(args: &LogsArgs) -> Result<()> {
    let target = HeadTarget::from_args(&args.head)?;
    let job_id = parse_job_id(&args.id)?;
    runtime()?.block_on(async {
        let head = HeadConnection::open(&target.address, &target.token, TIMEOUT).await?;
        let result = follow_output(&head, job_id, args.follow).await;
        head.close().await;
        result
    })
}

fn stop(args: &StopArgs) -> Result<()> {
    let target = HeadTarget::from_args(&args.head)?;
    let job_id = parse_job_id(&args.id)?;
    let running = match ask(
        &target.address,
        &target.token,
        HeadRequest::StopJob { job_id },
        TIMEOUT,
    )? {
        HeadReply::JobStopping { running } => running,
        other => bail!("unexpected reply from the head: {other:?}"),
    };
    if !running {
        let row = one(&target, StateKind::Jobs, "job_id", &args.id)?;
        println!(
            "job {job_id} had already ended: {}",
            text(&row, "state").unwrap_or("?")
        );
        return Ok(());
    }
    if args.no_wait {
        println!("job {job_id}: stop asked");
        return Ok(());
    }
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        let row = one(&target, StateKind::Jobs, "job_id", &args.id)?;
        let state = text(&row, "state").unwrap_or("?");
        if matches!(state, "STOPPED" | "SUCCEEDED" | "FAILED") {
            println!("job {job_id}: {state}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("job {job_id} is still {state} after {STOP_WAIT:?}");
        }
        std::thread::sleep(POLL_EVERY);
    }
}

fn list(args: &ListArgs) -> Result<()> {
    let target = HeadTarget::from_args(&args.head)?;
    let rows = query(
        &target,
        HeadRequest::ListState(StateQuery {
            kind: StateKind::Jobs,
            filters: Vec::new(),
            limit: shoal_proto::state::LIST_LIMIT_MAX,
            detail: false,
        }),
    )?;
    print_rows(&rows.rows, args.json)
}

fn parse_job_id(text: &str) -> Result<JobId> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("{text:?} is not a job id: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")
}

/// The program's file: a path as given, or a bare name looked up in PATH
/// (as a shell would).
fn find_program(program: &str) -> Result<PathBuf> {
    let is_file = |p: &Path| p.metadata().is_ok_and(|m| m.is_file());
    if program.contains('/') {
        let path = PathBuf::from(program);
        anyhow::ensure!(is_file(&path), "{program}: no such file");
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_file(p))
        .with_context(|| format!("{program}: not found in PATH"))
}

/// The directory as a tar archive: its files, directories and symbolic
/// links in name order, with modes but no owners or times (the same tree
/// packs to the same bytes, so it is uploaded once).
fn pack(dir: &Path) -> Result<Vec<u8>> {
    anyhow::ensure!(
        dir.is_dir(),
        "--working-dir {}: not a directory",
        dir.display()
    );
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut size = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(&relative))
            .with_context(|| format!("reading {}", dir.join(&relative).display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        // Depth first, in name order.
        for entry in entries.into_iter().rev() {
            let path = relative.join(entry.file_name());
            let full = entry.path();
            let meta = std::fs::symlink_metadata(&full)
                .with_context(|| format!("reading {}", full.display()))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
            if meta.is_dir() {
                builder.append_data(&mut header, &path, std::io::empty())?;
                stack.push(path);
            } else if meta.is_symlink() {
                let link = std::fs::read_link(&full)?;
                builder.append_link(&mut header, &path, link)?;
            } else if meta.is_file() {
                // Each entry also takes a header and padding (512 bytes
                // each at most), as the head counts them.
                size += meta.len() + 1024;
                anyhow::ensure!(
                    size <= WORKING_DIR_BYTES_MAX,
                    "--working-dir {} holds more than {} MiB: upload a smaller directory",
                    dir.display(),
                    WORKING_DIR_BYTES_MAX >> 20
                );
                let file = std::fs::File::open(&full)
                    .with_context(|| format!("reading {}", full.display()))?;
                builder.append_data(&mut header, &path, file)?;
            }
            // Sockets, devices and pipes are left out.
        }
    }
    builder
        .into_inner()
        .context("packing the working directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_packs_to_the_same_bytes_and_unpacks_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("data/deep")).expect("mkdir");
        std::fs::write(src.join("data/deep/input.txt"), "42\n").expect("write");
        std::fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").expect("write");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        std::os::unix::fs::symlink("data/deep/input.txt", src.join("link")).expect("symlink");
        let first = pack(&src).expect("pack");
        assert_eq!(first, pack(&src).expect("pack again"), "deterministic");

        let dest = dir.path().join("dest");
        shoal_head::submit::unpack(&first, &dest).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(dest.join("data/deep/input.txt")).expect("read"),
            "42\n"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("link")).expect("read link"),
            "42\n"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dest.join("run.sh"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "stays executable");
    }

    #[test]
    fn env_pairs_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }
}
