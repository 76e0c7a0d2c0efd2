//! Submitted jobs (`shoal job submit`): the head runs each one's program as
//! the job's driver on its own machine, keeps the program's output and
//! watches it exit.
//!
//! A job gets a directory `<jobs>/<id>/` while its driver runs: the program
//! as `bin/<name>`, and the working directory unpacked as `working_dir/`
//! (the driver's current directory; without one, the job's directory). The
//! driver's stdout and stderr go to `<logs>/job-<id>.log`, which outlives it;
//! the directory does not. The driver leads a process group of its own: a
//! stop signals the group, SIGTERM then SIGKILL after [`STOP_GRACE`], and
//! what is left of the group is killed when the driver exits (a process that
//! leaves the group, with `setsid`, is not followed). When the head
//! stops, so do the drivers it runs; while one runs, `<jobs>/<id>.pid`
//! holds its pid, for `shoal stop` to end a driver whose head was killed.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use shoal_net::sync::MutexExt;
use shoal_proto::JobId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::jobs::SubmissionStatus;

/// How long a stopped driver has between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Largest working directory accepted, as an archive.
pub const WORKING_DIR_BYTES_MAX: u64 = 512 << 20;
/// How long a head that stops waits for its drivers to exit, in all.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Runs the drivers of submitted jobs.
#[derive(Debug)]
pub struct JobRunner {
    jobs_dir: PathBuf,
    logs_dir: PathBuf,
    /// The variables that lead a driver to this cluster.
    cluster_env: Vec<(String, String)>,
    drivers: Mutex<HashMap<JobId, Driver>>,
    stopping: CancellationToken,
    tracker: TaskTracker,
}

/// A driver being prepared or running.
#[derive(Debug, Default)]
struct Driver {
    /// Its process group, once started.
    group: Option<Pid>,
    /// A stop was asked.
    stop_asked: bool,
    /// The driver has exited (and its pid may be reused): nothing to stop.
    exited: bool,
}

/// What to run.
#[derive(Debug)]
pub struct Start {
    /// The job.
    pub job_id: JobId,
    /// The program's file name.
    pub program: String,
    /// The program.
    pub program_bytes: Arc<Vec<u8>>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables set for it.
    pub env: Vec<(String, String)>,
    /// The working directory as a tar archive.
    pub working_dir: Option<Arc<Vec<u8>>>,
}

/// What the runner reports of a driver.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// It runs, as this process.
    Started(u32),
    /// It ended (or could not start).
    Exited(Exit),
}

/// How a driver ended.
#[derive(Debug, PartialEq)]
pub struct Exit {
    /// The job's state now.
    pub status: SubmissionStatus,
    /// Its exit code (128 + the signal that killed it).
    pub exit_code: Option<i32>,
    /// Why it failed or stopped.
    pub message: Option<String>,
}

impl Exit {
    fn failed(message: String) -> Self {
        Self {
            status: SubmissionStatus::Failed,
            exit_code: None,
            message: Some(message),
        }
    }
}

impl JobRunner {
    /// Jobs prepared under `jobs_dir`, their output in `logs_dir`; each
    /// driver gets `cluster_env` (`SHOAL_ADDRESS`, `SHOAL_TOKEN`).
    pub fn new(jobs_dir: PathBuf, logs_dir: PathBuf, cluster_env: Vec<(String, String)>) -> Self {
        Self {
            jobs_dir,
            logs_dir,
            cluster_env,
            drivers: Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Where a job's output is written.
    pub fn log_path(&self, job_id: JobId) -> PathBuf {
        self.logs_dir.join(format!("job-{job_id}.log"))
    }

    /// Prepares and runs a job's driver in the background; `report` hears
    /// when it starts and when it ends.
    pub fn start(
        self: &Arc<Self>,
        start: Start,
        report: impl Fn(JobId, Event) + Send + Sync + 'static,
    ) {
        self.drivers
            .locked()
            .insert(start.job_id, Driver::default());
        let runner = self.clone();
        self.tracker.spawn(async move {
            let job_id = start.job_id;
            let exit = runner.run(start, &report).await;
            runner.drivers.locked().remove(&job_id);
            info!(%job_id, status = exit.status.name(), code = ?exit.exit_code, "job's driver ended");
            report(job_id, Event::Exited(exit));
        });
    }

    /// Stops a job's driver: SIGTERM to its group, SIGKILL after
    /// [`STOP_GRACE`]. False if it is not running (or being prepared).
    pub fn stop(self: &Arc<Self>, job_id: JobId) -> bool {
        let group = {
            let mut drivers = self.drivers.locked();
            let Some(driver) = drivers.get_mut(&job_id).filter(|d| !d.exited) else {
                return false;
            };
            driver.stop_asked = true;
            driver.group
        };
        // One being prepared is not started.
        let Some(group) = group else {
            return true;
        };
        let _ = killpg(group, Signal::SIGTERM);
        // Not tracked: a head that stops waits for its drivers, not for
        // the timers of those that exited in time.
        let runner = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STOP_GRACE).await;
            runner.kill_if_running(job_id, group);
        });
        true
    }

    fn kill_if_running(&self, job_id: JobId, group: Pid) {
        let running = self
            .drivers
            .locked()
            .get(&job_id)
            .is_some_and(|d| d.group == Some(group) && !d.exited);
        if running {
            warn!(%job_id, "the job's driver outlived SIGTERM; killing it");
            let _ = killpg(group, Signal::SIGKILL);
        }
    }

    /// Reads `len` bytes of a job's output from `offset`, with the output's
    /// size; nothing before the driver writes any.
    pub fn read_log(
        &self,
        job_id: JobId,
        offset: u64,
        len: u32,
    ) -> std::io::Result<(Vec<u8>, u64)> {
        let mut file = match std::fs::File::open(self.log_path(job_id)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let size = file.metadata()?.len();
        let mut data = Vec::new();
        if offset < size {
            use std::io::Seek as _;
            file.seek(std::io::SeekFrom::Start(offset))?;
            file.take(u64::from(len).min(size - offset))
                .read_to_end(&mut data)?;
        }
        Ok((data, size))
    }

    /// Stops every driver and waits (boundedly) for them to exit: the head
    /// is stopping.
    pub async fn shutdown(&self) {
        self.stopping.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("drivers of submitted jobs did not all exit");
        }
    }

    async fn run(
        self: &Arc<Self>,
        start: Start,
        report: &(impl Fn(JobId, Event) + Send + Sync),
    ) -> Exit {
        let job_id = start.job_id;
        let dir = self.jobs_dir.join(job_id.to_string());
        let log = self.log_path(job_id);
        let prepared = {
            let (dir, log) = (dir.clone(), log.clone());
            let (program, bytes, archive) = (
                start.program.clone(),
                start.program_bytes.clone(),
                start.working_dir.clone(),
            );
            tokio::task::spawn_blocking(move || {
                prepare(
                    &dir,
                    &program,
                    &bytes,
                    archive.as_deref().map(Vec::as_slice),
                    &log,
                )
            })
            .await
            .unwrap_or_else(|e| Err(format!("preparing the job: {e}")))
        };
        let exit = match prepared {
            Err(message) => Exit::failed(message),
            Ok(prepared) => self.supervise(&start, prepared, report).await,
        };
        let _ = tokio::fs::remove_dir_all(&dir).await;
        exit
    }

    async fn supervise(
        self: &Arc<Self>,
        start: &Start,
        prepared: Prepared,
        report: &(impl Fn(JobId, Event) + Send + Sync),
    ) -> Exit {
        let job_id = start.job_id;
        if self.stop_asked(job_id) || self.stopping.is_cancelled() {
            return Exit {
                status: SubmissionStatus::Stopped,
                exit_code: None,
                message: Some("stopped before its driver started".into()),
            };
        }
        let mut command = tokio::process::Command::new(&prepared.program);
        command
            .args(&start.args)
            .current_dir(&prepared.cwd)
            .envs(start.env.iter().map(|(k, v)| (k, v)))
            .envs(self.cluster_env.iter().map(|(k, v)| (k, v)))
            .env("SHOAL_JOB_ID", job_id.to_string())
            .stdin(Stdio::null())
            .stdout(prepared.stdout)
            .stderr(prepared.stderr)
            .process_group(0);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => return Exit::failed(format!("cannot start {}: {e}", start.program)),
        };
        let pid = child.id().unwrap_or_default();
        let group = Pid::from_raw(i32::try_from(pid).unwrap_or_default());
        let stop_now = {
            let mut drivers = self.drivers.locked();
            let driver = drivers.entry(job_id).or_default();
            driver.group = Some(group);
            driver.stop_asked
        };
        let pid_file = self.jobs_dir.join(format!("{job_id}.pid"));
        if let Err(e) = std::fs::write(&pid_file, format!("{pid}\n")) {
            warn!(%job_id, "cannot write {}: {e}", pid_file.display());
        }
        info!(%job_id, pid, program = %start.program, "job's driver started");
        report(job_id, Event::Started(pid));
        // A stop asked while it was starting: SIGTERM now, SIGKILL later.
        if stop_now {
            self.stop(job_id);
        }
        let waited = tokio::select! {
            waited = child.wait() => waited,
            () = self.stopping.cancelled() => {
                // The head stops: so does the driver, as `shoal job stop`
                // would stop it.
                self.stop(job_id);
                child.wait().await
            }
        };
        // Whether it was stopped is settled now: a stop from here on finds
        // it exited.
        let stopped = {
            let mut drivers = self.drivers.locked();
            drivers.get_mut(&job_id).is_some_and(|d| {
                d.exited = true;
                d.stop_asked
            })
        };
        // Nothing the driver started in its process group outlives it.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = std::fs::remove_file(&pid_file);
        match waited {
            Err(e) => Exit::failed(format!("waiting for the driver: {e}")),
            Ok(status) => exit_of(status, stopped, self.stopping.is_cancelled()),
        }
    }

    fn stop_asked(&self, job_id: JobId) -> bool {
        self.drivers
            .locked()
            .get(&job_id)
            .is_some_and(|d| d.stop_asked)
    }
}

fn exit_of(status: std::process::ExitStatus, stopped: bool, head_stopping: bool) -> Exit {
    use std::os::unix::process::ExitStatusExt as _;
    let signal = status.signal();
    let exit_code = status.code().or(signal.map(|s| 128 + s));
    let how = match (status.code(), signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(s)) => format!(
            "was killed by {}",
            Signal::try_from(s).map_or_else(|_| format!("signal {s}"), |s| s.to_string())
        ),
        (None, None) => "ended".to_string(),
    };
    let (status, message) = if stopped {
        let why = if head_stopping {
            "the head stopped"
        } else {
            "stopped"
        };
        (
            SubmissionStatus::Stopped,
            Some(format!("{why}; the driver {how}")),
        )
    } else if status.success() {
        (SubmissionStatus::Succeeded, None)
    } else {
        (SubmissionStatus::Failed, Some(format!("the driver {how}")))
    };
    Exit {
        status,
        exit_code,
        message,
    }
}

/// A job ready to start.
#[derive(Debug)]
struct Prepared {
    program: PathBuf,
    cwd: PathBuf,
    stdout: std::fs::File,
    stderr: std::fs::File,
}

/// Writes the program, unpacks the working directory and opens the output.
fn prepare(
    dir: &Path,
    program: &str,
    bytes: &[u8],
    archive: Option<&[u8]>,
    log: &Path,
) -> Result<Prepared, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("creating {}: {e}", bin.display()))?;
    let path = bin.join(program);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    let cwd = match archive {
        None => dir.to_path_buf(),
        Some(archive) => {
            let cwd = dir.join("working_dir");
            unpack(archive, &cwd).map_err(|e| format!("unpacking the working directory: {e}"))?;
            cwd
        }
    };
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let stdout = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    Ok(Prepared {
        program: path,
        cwd,
        stdout,
        stderr,
    })
}

/// Why a working directory could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive is damaged.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An entry is neither a file, a directory nor a symbolic link.
    #[error("{path}: entries of type {kind:?} are not accepted")]
    Kind {
        /// The entry.
        path: String,
        /// Its type.
        kind: tar::EntryType,
    },
    /// An entry's path leaves the directory.
    #[error("{0}: the path leaves the working directory")]
    Escapes(String),
}

/// Unpacks a working directory archive into `dest`: files, directories and
/// symbolic links only, none outside `dest`.
pub fn unpack(archive: &[u8], dest: &Path) -> Result<(), UnpackError> {
    std::fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(archive);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let path = entry.path()?.display().to_string();
        if !matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink
        ) {
            return Err(UnpackError::Kind { path, kind });
        }
        if !entry.unpack_in(dest)? {
            return Err(UnpackError::Escapes(path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // `append_data` refuses `..`; write the name raw, as a hostile
            // archive would.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).expect("append");
        }
        builder.into_inner().expect("archive")
    }

    #[test]
    fn unpacks_files_and_refuses_paths_that_leave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("wd");
        unpack(&archive(&[("a/b.txt", b"hello")]), &dest).expect("unpack");
        assert_eq!(std::fs::read(dest.join("a/b.txt")).expect("read"), b"hello");

        let escaping = archive(&[("../outside.txt", b"x")]);
        let err = unpack(&escaping, &dest).expect_err("escapes");
        assert!(matches!(err, UnpackError::Escapes(_)), "{err}");
        assert!(!dir.path().join("outside.txt").exists());

        let garbage = vec![0x55u8; 1024];
        assert!(unpack(&garbage, &dest).is_err());
    }

    #[test]
    fn exit_codes_and_signals_read_as_ray_states() {
        use std::os::unix::process::ExitStatusExt as _;
        let ok = exit_of(std::process::ExitStatus::from_raw(0), false, false);
        assert_eq!(ok.status, SubmissionStatus::Succeeded);
        assert_eq!(ok.exit_code, Some(0));
        let failed = exit_of(std::process::ExitStatus::from_raw(3 << 8), false, false);
        assert_eq!(failed.status, SubmissionStatus::Failed);
        assert_eq!(failed.exit_code, Some(3));
        assert_eq!(
            failed.message.as_deref(),
            Some("the driver exited with code 3")
        );
        let stopped = exit_of(std::process::ExitStatus::from_raw(15), true, false);
        assert_eq!(stopped.status, SubmissionStatus::Stopped);
        assert_eq!(stopped.exit_code, Some(143));
        assert_eq!(
            stopped.message.as_deref(),
            Some("stopped; the driver was killed by SIGTERM")
        );
    }
}
