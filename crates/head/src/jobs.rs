//! Jobs and their executables.
//!
//! A driver registers a job with the content hash of its executable; workers
//! for the job are that executable re-run in worker mode. The head keeps each
//! executable once (content addressed), uploaded by the first driver that
//! runs it and fetched by nodes that lack it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use shoal_net::digest::{is_sha256_hex, sha256_hex};
use shoal_proto::head::RegisterJob;
use shoal_proto::{Address, JobId};

/// Largest executable accepted.
pub const BINARY_BYTES_MAX: u64 = 2 << 30;
/// Executables kept (least recently registered forgotten first).
const BINARIES_KEPT: usize = 16;
/// Finished jobs remembered.
const FINISHED_KEPT: usize = 1000;

/// A job.
#[derive(Clone, Debug)]
pub struct Job {
    /// The driver; `None` for a submitted job until its program connects.
    pub driver: Option<Address>,
    /// Hex SHA-256 of its executable.
    pub binary_hash: String,
    /// False once the job has finished: its leases are reclaimed and no
    /// task of it runs.
    pub running: bool,
    /// The driver's connection to the head: the job ends when it closes.
    /// `None` for a job a restarted head reloaded, until its driver
    /// connects again, and for a submitted job until its program does.
    pub connection_id: Option<u64>,
    /// When it was registered (microseconds since the Unix epoch).
    pub started_us: u64,
    /// When it finished, once it has.
    pub ended_us: Option<u64>,
    /// For a job that `shoal job submit` started: how its driver fares.
    pub submission: Option<Submission>,
    /// A submitted job reloaded by a restarted head, which no longer
    /// watches its driver.
    unsupervised: bool,
}

impl Job {
    /// A submitted job, not ended, whose driver a head before a restart
    /// started: this head does not watch it.
    pub fn is_unsupervised(&self) -> bool {
        self.unsupervised
            && self
                .submission
                .as_ref()
                .is_some_and(|s| !s.status.is_terminal())
    }
}

/// A job as the head's store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The driver.
    pub driver: Option<Address>,
    /// Hex SHA-256 of its executable.
    pub binary_hash: String,
    /// False once the job has finished.
    pub running: bool,
    /// When it was registered (microseconds since the Unix epoch).
    #[serde(default)]
    pub started_us: u64,
    /// When it finished, once it has.
    #[serde(default)]
    pub ended_us: Option<u64>,
    /// A submitted job's state.
    #[serde(default)]
    pub submission: Option<Submission>,
}

/// A submitted job: the program the head runs as its driver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// The program and its arguments, as submitted.
    pub entrypoint: String,
    /// Where its driver is.
    pub status: SubmissionStatus,
    /// The driver's exit code (128 + the signal for one killed by a
    /// signal).
    pub exit_code: Option<i32>,
    /// Why it failed or stopped.
    pub message: Option<String>,
    /// The driver's process id, once it started.
    pub driver_pid: Option<u32>,
}

/// The states of a submitted job, as Ray names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmissionStatus {
    /// Its program and working directory are being prepared.
    Pending,
    /// Its driver runs.
    Running,
    /// Its driver exited with code 0.
    Succeeded,
    /// Its driver could not start, exited with another code or was killed.
    Failed,
    /// Stopped by `shoal job stop` (or the head stopping).
    Stopped,
}

impl SubmissionStatus {
    /// The name the state API shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Stopped => "STOPPED",
        }
    }

    /// True once the driver has exited (or never will start).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Stopped)
    }
}

/// The job table.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: HashMap<JobId, Job>,
    finished: std::collections::VecDeque<JobId>,
    /// Jobs changed since [`Jobs::take_dirty`].
    dirty: HashSet<JobId>,
}

impl Jobs {
    /// Starts a job under a new id.
    pub fn register(&mut self, request: &RegisterJob, connection_id: u64) -> JobId {
        // A driver registers one job: a retried request (its reply lost),
        // or the driver connecting again to a restarted head, gets the job
        // the first one made, now ending with this connection.
        let known = self.jobs.iter_mut().find(|(_, j)| {
            j.running
                && j.driver
                    .as_ref()
                    .is_some_and(|d| d.worker_id == request.driver.worker_id)
        });
        if let Some((id, job)) = known {
            job.connection_id = Some(connection_id);
            return *id;
        }
        // The program of a submitted job takes that job (once: a process it
        // starts inherits the variable, and makes a job of its own).
        let submitted = request.job_id.and_then(|id| {
            let job = self.jobs.get_mut(&id)?;
            (job.running && job.submission.is_some() && job.driver.is_none()).then_some((id, job))
        });
        if let Some((id, job)) = submitted {
            job.driver = Some(request.driver.clone());
            job.binary_hash.clone_from(&request.binary_hash);
            job.connection_id = Some(connection_id);
            self.dirty.insert(id);
            return id;
        }
        let id = JobId::random();
        self.jobs.insert(
            id,
            Job {
                driver: Some(request.driver.clone()),
                binary_hash: request.binary_hash.clone(),
                running: true,
                connection_id: Some(connection_id),
                started_us: shoal_proto::state::unix_us(),
                ended_us: None,
                submission: None,
                unsupervised: false,
            },
        );
        self.dirty.insert(id);
        id
    }

    /// Records a submitted job, pending until the head starts its program;
    /// false if a job with this id exists (a retried submission).
    pub fn submit(&mut self, id: JobId, program_hash: &str, entrypoint: String) -> bool {
        if self.jobs.contains_key(&id) {
            return false;
        }
        self.jobs.insert(
            id,
            Job {
                driver: None,
                binary_hash: program_hash.to_string(),
                running: true,
                connection_id: None,
                started_us: shoal_proto::state::unix_us(),
                ended_us: None,
                submission: Some(Submission {
                    entrypoint,
                    status: SubmissionStatus::Pending,
                    exit_code: None,
                    message: None,
                    driver_pid: None,
                }),
                unsupervised: false,
            },
        );
        self.dirty.insert(id);
        true
    }

    /// Changes a submitted job's state; false if it is not one.
    pub fn update_submission(&mut self, id: JobId, change: impl FnOnce(&mut Submission)) -> bool {
        let Some(submission) = self.jobs.get_mut(&id).and_then(|j| j.submission.as_mut()) else {
            return false;
        };
        change(submission);
        self.dirty.insert(id);
        true
    }

    /// A job reloaded from the store, its driver not connected yet.
    pub fn restore(&mut self, id: JobId, mut record: JobRecord) {
        if !record.running {
            self.finished.push_back(id);
        }
        let unsupervised = record
            .submission
            .as_ref()
            .is_some_and(|s| !s.status.is_terminal());
        // A finished job whose driver was still running: nothing will end
        // it now.
        if unsupervised && !record.running {
            if let Some(s) = record.submission.as_mut() {
                unknown_exit(s);
                self.dirty.insert(id);
            }
        }
        self.jobs.insert(
            id,
            Job {
                driver: record.driver,
                binary_hash: record.binary_hash,
                running: record.running,
                connection_id: None,
                started_us: record.started_us,
                ended_us: record.ended_us,
                submission: record.submission,
                unsupervised,
            },
        );
    }

    /// The jobs changed since the last call, each with its record (`None`:
    /// forgotten).
    pub fn take_dirty(&mut self) -> Vec<(JobId, Option<JobRecord>)> {
        self.dirty
            .drain()
            .map(|id| {
                let record = self.jobs.get(&id).map(|j| JobRecord {
                    driver: j.driver.clone(),
                    binary_hash: j.binary_hash.clone(),
                    running: j.running,
                    started_us: j.started_us,
                    ended_us: j.ended_us,
                    submission: j.submission.clone(),
                });
                (id, record)
            })
            .collect()
    }

    /// Running jobs whose driver has not connected to this head.
    pub fn unattached(&self) -> Vec<JobId> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.running && j.connection_id.is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every job kept, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (JobId, &Job)> {
        self.jobs.iter().map(|(id, job)| (*id, job))
    }

    /// The job, if known.
    pub fn get(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// True while the job runs.
    pub fn is_running(&self, id: JobId) -> bool {
        self.jobs.get(&id).is_some_and(|j| j.running)
    }

    /// Marks a job finished; false if it was not running.
    pub fn finish(&mut self, id: JobId) -> bool {
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        if !job.running {
            return false;
        }
        job.running = false;
        job.ended_us = Some(shoal_proto::state::unix_us());
        // No head saw this driver exit: its outcome is unknown.
        if job.unsupervised {
            if let Some(s) = job.submission.as_mut() {
                unknown_exit(s);
            }
        }
        self.dirty.insert(id);
        self.finished.push_back(id);
        // The oldest finished jobs are forgotten, but not a submitted one
        // whose driver still runs (its exit is yet to be recorded).
        let mut looked = 0;
        while self.finished.len() > FINISHED_KEPT && looked < self.finished.len() {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            let ending = self
                .jobs
                .get(&old)
                .and_then(|j| j.submission.as_ref())
                .is_some_and(|s| !s.status.is_terminal());
            if ending {
                self.finished.push_back(old);
                looked += 1;
            } else {
                self.jobs.remove(&old);
                self.dirty.insert(old);
            }
        }
        true
    }

    /// Of `ids`, those that are not running (finished or forgotten).
    pub fn not_running(&self, ids: &[JobId]) -> Vec<JobId> {
        ids.iter()
            .filter(|id| !self.is_running(**id))
            .copied()
            .collect()
    }

    /// Running jobs registered over this connection.
    pub fn registered_on(&self, connection_id: u64) -> Vec<JobId> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.running && j.connection_id == Some(connection_id))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// A submitted job whose driver no head watches any more.
fn unknown_exit(s: &mut Submission) {
    if !s.status.is_terminal() {
        s.status = SubmissionStatus::Failed;
        s.message = Some("the head restarted while the job ran: its exit is unknown".into());
    }
}

/// Why an upload was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Larger than [`BINARY_BYTES_MAX`].
    #[error("executable of {0} bytes exceeds the {BINARY_BYTES_MAX} byte limit")]
    TooLarge(u64),
    /// Parts must arrive in order.
    #[error("expected the part at offset {expected}, got {got}")]
    OutOfOrder {
        /// The next offset expected.
        expected: u64,
        /// The offset sent.
        got: u64,
    },
    /// The part runs past the declared size, or the size changed.
    #[error("part does not fit the declared size {0}")]
    BadSize(u64),
    /// The whole upload does not hash to its name.
    #[error("upload does not match its hash {0}")]
    HashMismatch(String),
    /// The head could not keep it on disk.
    #[error("cannot keep the executable: {0}")]
    NotKept(String),
    /// The name is not a hex SHA-256.
    #[error("{0:?} is not a hex SHA-256")]
    BadHash(String),
}

/// Executables by content hash.
#[derive(Debug, Default)]
pub struct Binaries {
    complete: HashMap<String, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<String>,
    partial: HashMap<String, (u64, Vec<u8>)>,
    /// How complete executables outlive the head.
    keeping: Keeping,
    /// The store rows of executables stored (`Some(row)`) or forgotten
    /// since [`Binaries::take_dirty`].
    dirty: Vec<(String, Option<Vec<u8>>)>,
}

/// How a head with a store keeps its executables.
#[derive(Debug, Default)]
enum Keeping {
    /// In memory only (a head without a store).
    #[default]
    Memory,
    /// As files in this directory, their sizes in the store (an embedded
    /// store: the files sit beside it).
    Files(PathBuf),
    /// Whole, in the store's rows (a store on another machine, which a
    /// head taking over there reads).
    Rows,
}

/// An executable's row in the store.
#[derive(Debug, Serialize, Deserialize)]
struct BinaryRow {
    size: u64,
    /// The bytes, when the store keeps them (else they are a file).
    #[serde(with = "serde_bytes")]
    bytes: Option<Vec<u8>>,
}

/// Why a kept executable could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct FileError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

impl Binaries {
    /// Executables kept in memory and as files in `dir`.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self {
            keeping: Keeping::Files(dir),
            ..Self::default()
        }
    }

    /// Executables kept in memory and whole in the store's rows.
    pub fn in_rows() -> Self {
        Self {
            keeping: Keeping::Rows,
            ..Self::default()
        }
    }

    /// Reloads a kept executable from its store row (a restarted head). One
    /// whose file is gone or whose bytes do not match the hash is
    /// forgotten, and uploaded again by the next driver that runs it.
    pub fn restore(&mut self, hash: &str, row: &[u8]) -> Result<(), FileError> {
        if !is_sha256_hex(hash) {
            return Ok(());
        }
        let Some(row) = crate::store::decode::<BinaryRow>(crate::store::Table::Binaries, row)
        else {
            return Ok(());
        };
        let bytes = match (row.bytes, &self.keeping) {
            (Some(bytes), _) => bytes,
            (None, Keeping::Files(dir)) => {
                let path = dir.join(hash);
                std::fs::read(&path).map_err(|source| FileError {
                    what: "reading",
                    path: path.clone(),
                    source,
                })?
            }
            (None, _) => return Ok(()),
        };
        if sha256_hex(&bytes) != hash {
            self.dirty.push((hash.to_string(), None));
            return Ok(());
        }
        self.complete.insert(hash.to_string(), Arc::new(bytes));
        self.order.push_back(hash.to_string());
        Ok(())
    }

    /// The store rows of executables stored or forgotten since the last
    /// call.
    pub fn take_dirty(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut self.dirty)
    }

    /// Writes a complete executable to its file, synced before it is
    /// counted as stored.
    fn keep(dir: &Path, hash: &str, bytes: &[u8]) -> Result<(), FileError> {
        use std::io::Write as _;
        let path = dir.join(hash);
        let partial = dir.join(format!("{hash}.partial"));
        let err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| FileError { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(err("creating", dir))?;
        let mut file = std::fs::File::create(&partial).map_err(err("creating", &partial))?;
        file.write_all(bytes).map_err(err("writing", &partial))?;
        file.sync_all().map_err(err("syncing", &partial))?;
        std::fs::rename(&partial, &path).map_err(err("renaming", &partial))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("syncing", dir))
    }

    /// True if the executable is stored.
    pub fn has(&self, hash: &str) -> bool {
        self.complete.contains_key(hash)
    }

    /// A stored executable (or archive), whole.
    pub fn get(&self, hash: &str) -> Option<Arc<Vec<u8>>> {
        self.complete.get(hash).cloned()
    }

    /// Stores one part of an upload. Returns true once the whole executable
    /// is stored and its hash checked.
    pub fn upload(
        &mut self,
        hash: &str,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<bool, UploadError> {
        if !is_sha256_hex(hash) {
            return Err(UploadError::BadHash(hash.chars().take(80).collect()));
        }
        if self.has(hash) {
            return Ok(true);
        }
        if total > BINARY_BYTES_MAX {
            return Err(UploadError::TooLarge(total));
        }
        let (declared, buf) = self
            .partial
            .entry(hash.to_string())
            .or_insert_with(|| (total, Vec::new()));
        if *declared != total {
            return Err(UploadError::BadSize(*declared));
        }
        // The part received last, sent again (its reply was lost).
        if offset < buf.len() as u64 && offset + data.len() as u64 == buf.len() as u64 {
            return Ok(false);
        }
        if offset != buf.len() as u64 {
            return Err(UploadError::OutOfOrder {
                expected: buf.len() as u64,
                got: offset,
            });
        }
        if offset + data.len() as u64 > total {
            return Err(UploadError::BadSize(total));
        }
        buf.extend_from_slice(data);
        if (buf.len() as u64) < total {
            return Ok(false);
        }
        let (_, whole) = self.partial.remove(hash).unwrap_or_default();
        if sha256_hex(&whole) != hash {
            return Err(UploadError::HashMismatch(hash.to_string()));
        }
        let size = whole.len() as u64;
        match &self.keeping {
            Keeping::Memory => {}
            Keeping::Files(dir) => {
                Self::keep(dir, hash, &whole).map_err(|e| UploadError::NotKept(e.to_string()))?;
                let row = BinaryRow { size, bytes: None };
                self.dirty
                    .push((hash.to_string(), Some(crate::store::encode(&row))));
            }
            Keeping::Rows => {
                let row = BinaryRow {
                    size,
                    bytes: Some(whole.clone()),
                };
                self.dirty
                    .push((hash.to_string(), Some(crate::store::encode(&row))));
            }
        }
        self.complete.insert(hash.to_string(), Arc::new(whole));
        self.order.push_back(hash.to_string());
        while self.order.len() > BINARIES_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.complete.remove(&old);
                if let Keeping::Files(dir) = &self.keeping {
                    // A file left behind is only space.
                    let _ = std::fs::remove_file(dir.join(&old));
                }
                if !matches!(self.keeping, Keeping::Memory) {
                    self.dirty.push((old, None));
                }
            }
        }
        Ok(true)
    }

    /// A part of a stored executable: (total size, bytes).
    pub fn fetch(&self, hash: &str, offset: u64, len: u32) -> Option<(u64, Vec<u8>)> {
        let whole = self.complete.get(hash)?;
        let start = usize::try_from(offset).ok()?.min(whole.len());
        let end = start.saturating_add(len as usize).min(whole.len());
        Some((whole.len() as u64, whole[start..end].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted(status: SubmissionStatus, running: bool) -> JobRecord {
        JobRecord {
            driver: None,
            binary_hash: "ab".repeat(32),
            running,
            started_us: 1,
            ended_us: None,
            submission: Some(Submission {
                entrypoint: "prog".into(),
                status,
                exit_code: None,
                message: None,
                driver_pid: Some(7),
            }),
        }
    }

    #[test]
    fn a_reloaded_submission_no_head_watches_ends_failed_not_running_forever() {
        let mut jobs = Jobs::default();
        // Its driver had left the cluster but its program still ran.
        let left = JobId::random();
        jobs.restore(left, submitted(SubmissionStatus::Running, false));
        let status = |jobs: &Jobs, id| jobs.get(id).and_then(|j| j.submission.clone());
        assert_eq!(
            status(&jobs, left).map(|s| s.status),
            Some(SubmissionStatus::Failed)
        );
        assert!(
            jobs.take_dirty().iter().any(|(id, _)| *id == left),
            "written back"
        );
        // Still in the cluster: it fails once it ends, and cannot be
        // stopped through this head meanwhile.
        let attached = JobId::random();
        jobs.restore(attached, submitted(SubmissionStatus::Running, true));
        assert!(jobs.get(attached).is_some_and(Job::is_unsupervised));
        assert!(jobs.finish(attached));
        assert_eq!(
            status(&jobs, attached).map(|s| s.status),
            Some(SubmissionStatus::Failed)
        );
        // An ended one keeps its state.
        let done = JobId::random();
        jobs.restore(done, submitted(SubmissionStatus::Succeeded, false));
        assert_eq!(
            status(&jobs, done).map(|s| s.status),
            Some(SubmissionStatus::Succeeded)
        );
        assert!(!jobs.get(done).is_some_and(Job::is_unsupervised));
    }

    #[test]
    fn finished_jobs_are_forgotten_oldest_first_but_not_a_driver_still_running() {
        let mut jobs = Jobs::default();
        let long = JobId::random();
        assert!(jobs.submit(long, &"ab".repeat(32), "long".into()));
        assert!(jobs.finish(long), "its driver left; its program runs on");
        for _ in 0..FINISHED_KEPT + 5 {
            let id = JobId::random();
            jobs.submit(id, &"ab".repeat(32), "short".into());
            jobs.update_submission(id, |s| s.status = SubmissionStatus::Succeeded);
            jobs.finish(id);
        }
        assert!(jobs.get(long).is_some(), "kept until its exit is recorded");
        assert!(jobs.iter().count() <= FINISHED_KEPT + 1);
    }

    #[test]
    fn upload_in_parts_checks_the_hash() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let hash = sha256_hex(&data);
        let mut b = Binaries::default();
        assert_eq!(b.upload(&hash, 0, 10_000, &data[..4000]), Ok(false));
        assert_eq!(
            b.upload(&hash, 0, 10_000, &data[..4000]),
            Ok(false),
            "the last part again (its reply lost) is taken once"
        );
        assert_eq!(
            b.upload(&hash, 0, 10_000, &data[..10]),
            Err(UploadError::OutOfOrder {
                expected: 4000,
                got: 0
            })
        );
        assert_eq!(b.upload(&hash, 4000, 10_000, &data[4000..]), Ok(true));
        assert!(b.has(&hash));
        assert_eq!(
            b.fetch(&hash, 9_990, 100),
            Some((10_000, data[9_990..].to_vec()))
        );
        assert_eq!(b.fetch(&hash, 20_000, 100), Some((10_000, vec![])));
        let wrong = sha256_hex(b"other");
        assert_eq!(
            b.upload(&wrong, 0, 3, b"abc"),
            Err(UploadError::HashMismatch(wrong.clone()))
        );
        assert!(!b.has(&wrong));
        assert!(matches!(
            b.upload("../etc", 0, 1, b"x"),
            Err(UploadError::BadHash(_))
        ));
        assert_eq!(
            b.upload(&wrong, 0, BINARY_BYTES_MAX + 1, b"x"),
            Err(UploadError::TooLarge(BINARY_BYTES_MAX + 1))
        );
    }
}
