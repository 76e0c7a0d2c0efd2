//! Jobs and their executables.
//!
//! A driver registers a job with the content hash of its executable; workers
//! for the job are that executable re-run in worker mode. The head keeps each
//! executable once (content addressed), uploaded by the first driver that
//! runs it and fetched by nodes that lack it.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use shoal_proto::head::RegisterJob;
use shoal_proto::{Address, JobId};

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
}
