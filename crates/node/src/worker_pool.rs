//! The node's workers: processes (or, in local mode, threads) that run one
//! job's tasks.
//!
//! A lease holder asks for a worker ([`WorkerPool::grant`]); the pool hands
//! it an idle worker of the job or starts one, and waits for the new worker
//! to register. The head's ledger decides placement (at most one busy worker
//! per CPU slot, except just after a blocked task resumes); the node keeps
//! its own count for its heartbeats. Released workers go back to the idle list and are
//! stopped after `worker_idle_timeout`, or when their job finishes. A worker
//! that exits is removed, and reported to the head in the next heartbeat so
//! the leases it held as an owner are reclaimed.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shoal_net::sync::MutexExt;
use shoal_proto::{
    Address, EnvVars, JobId, LeaseId, ResourceSet, ServiceError, ServiceErrorKind, WorkerId,
};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::binaries::{BinaryCache, BinaryError};

/// Why a worker this node started never came to serve.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// The job's executable could not be had.
    #[error(transparent)]
    Executable(#[from] BinaryError),
    /// The launcher could not start it, in its words.
    #[error("{0}")]
    Launch(String),
    /// A launcher that starts workers ready gave an address the pool refused.
    #[error("registering it: {0}")]
    Register(#[source] ServiceError),
    /// It was removed (it exited, or was stopped) before it registered.
    #[error("the worker was removed before it registered")]
    Removed,
    /// Its process ended before it registered.
    #[error("the worker exited before registering")]
    Exited,
    /// It did not register in time.
    #[error("the worker did not register within {0:?}")]
    Timeout(Duration),
}

/// Who a granted worker serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tenancy {
    /// Tasks of its job, one lease after another (reused).
    Shared,
    /// One lease only (an actor): stopped when it ends.
    Dedicated,
    /// One lease, outliving its job (a detached actor).
    Detached,
}

/// Whose worker a grant asks for, started how.
#[derive(Clone, Debug)]
pub struct WorkerKind {
    /// The job.
    pub job_id: JobId,
    /// Hex SHA-256 of the job's executable.
    pub binary_hash: String,
    /// The job's driver, which is shown the worker's output.
    pub driver: Option<Address>,
    /// Variables set in the worker's environment: workers are only shared
    /// between leases asking for the same.
    pub env: EnvVars,
}

/// What a launcher needs to start one worker.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The job.
    pub job_id: JobId,
    /// The id the worker must register under.
    pub worker_id: WorkerId,
    /// The job's executable (`None` for launchers that run workers as threads).
    pub executable: Option<PathBuf>,
    /// Environment for the worker (`SHOAL_WORKER_*`, token, addresses, and
    /// `user_env`).
    pub env: Vec<(String, String)>,
    /// The variables the lease asked for (in `env` too): a launcher that
    /// cannot set a process environment (threads) must start a process.
    pub user_env: EnvVars,
    /// Where the worker's stdout and stderr go.
    pub log_path: Option<PathBuf>,
    /// The job's driver, which is shown the worker's output.
    pub driver: Option<Address>,
}

/// A started worker.
pub struct Launched {
    /// Its process id, for processes.
    pub pid: Option<u32>,
    /// Resolves, with a description, when the worker has exited.
    pub exited: Pin<Box<dyn Future<Output = String> + Send>>,
    /// Stops it at once.
    pub kill: Box<dyn Fn() + Send + Sync>,
    /// Where it already serves, for launchers that start workers ready
    /// (threads); `None` means the worker will register itself.
    pub address: Option<String>,
}

/// How a node starts workers.
pub trait WorkerLauncher: Send + Sync + 'static {
    /// True if workers need the job's executable on this node.
    fn needs_executable(&self) -> bool;
    /// Starts a worker; it must then register with the node.
    fn launch(&self, spec: LaunchSpec) -> Result<Launched, String>;
}

/// A line of worker output on its way to the job's driver.
pub type LogSink = tokio::sync::mpsc::Sender<(Address, shoal_proto::worker::LogLine)>;

/// Starts workers as processes of the job's executable. Their stdout and
/// stderr are written to the worker's log file and, line by line, to `logs`
/// for the job's driver.
#[derive(Debug, Default)]
pub struct ProcessLauncher {
    /// Where output lines go, with the node's id.
    pub logs: Option<(
        LogSink,
        tokio::sync::watch::Receiver<Option<shoal_proto::NodeId>>,
    )>,
    /// Workers write to this process's own stdout and stderr instead (no
    /// log file): local mode's thread workers do, and so do the processes
    /// it starts for leases that set environment variables.
    pub inherit_output: bool,
}

impl WorkerLauncher for ProcessLauncher {
    fn needs_executable(&self) -> bool {
        true
    }

    fn launch(&self, spec: LaunchSpec) -> Result<Launched, String> {
        let exe = spec
            .executable
            .ok_or("no executable for a process worker")?;
        let mut cmd = tokio::process::Command::new(&exe);
        let output = || {
            if self.inherit_output {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::piped()
            }
        };
        cmd.envs(spec.env)
            .stdin(std::process::Stdio::null())
            .stdout(output())
            .stderr(output())
            .kill_on_drop(true);
        let log_file = match &spec.log_path {
            Some(_) if self.inherit_output => None,
            Some(log) => Some(
                std::fs::File::create(log)
                    .map_err(|e| format!("creating {}: {e}", log.display()))?,
            ),
            None => None,
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", exe.display()))?;
        let pid = child.id();
        let log_file = log_file.map(|f| Arc::new(Mutex::new(f)));
        let sink = self.logs.as_ref().zip(spec.driver.clone());
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump_lines(
                out,
                false,
                pid.unwrap_or(0),
                log_file.clone(),
                sink.clone().map(|((s, n), d)| (s.clone(), n.clone(), d)),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump_lines(
                err,
                true,
                pid.unwrap_or(0),
                log_file,
                sink.map(|((s, n), d)| (s.clone(), n.clone(), d)),
            ));
        }
        let exited = Box::pin(async move {
            match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("unknown exit ({e})"),
            }
        });
        let kill = Box::new(move || {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Ok(Launched {
            pid,
            exited,
            kill,
            address: None,
        })
    }
}

/// Copies a worker's output, line by line, to its log file and to the
/// job's driver. Lines that would overflow the queue to the driver are
/// dropped (and counted in the log file), never blocking the worker.
async fn pump_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    stderr: bool,
    pid: u32,
    file: Option<Arc<Mutex<std::fs::File>>>,
    sink: Option<(
        LogSink,
        tokio::sync::watch::Receiver<Option<shoal_proto::NodeId>>,
        Address,
    )>,
) {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let mut dropped = 0u64;
    while let Ok(Some(text)) = lines.next_line().await {
        if let Some(file) = &file {
            let mut f = file.locked();
            let _ = writeln!(f, "{text}");
        }
        if let Some((sink, node_id, driver)) = &sink {
            let Some(node_id) = *node_id.borrow() else {
                continue;
            };
            let line = shoal_proto::worker::LogLine {
                pid,
                node_id,
                stderr,
                text,
            };
            if sink.try_send((driver.clone(), line)).is_err() {
                dropped += 1;
            }
        }
    }
    if dropped > 0 {
        if let Some(file) = &file {
            let mut f = file.locked();
            let _ = writeln!(
                f,
                "[shoal: {dropped} lines were not forwarded to the driver: its queue was full]"
            );
        }
    }
}

enum WorkerState {
    /// Started, not registered yet; these wait for its address.
    Starting(Vec<oneshot::Sender<Result<String, StartError>>>),
    Idle(Instant),
    Leased(LeaseId),
}

struct WorkerEntry {
    job_id: JobId,
    /// Serves one lease only (an actor): stopped when it ends, never reused.
    dedicated: bool,
    /// Outlives its job (a detached actor).
    detached: bool,
    state: WorkerState,
    address: Option<String>,
    pid: Option<u32>,
    kill: Option<Box<dyn Fn() + Send + Sync>>,
    /// The GPU devices in its environment: it serves only leases given
    /// exactly these.
    gpus: Vec<u32>,
    /// The variables asked for: it serves only leases asking the same.
    env: EnvVars,
    /// What it was started as: a spare of the same kind replaces it when
    /// it blocks.
    kind: WorkerKind,
}

impl WorkerEntry {
    /// A worker of `kind` being started, and the receiver told when it
    /// registers.
    fn starting(kind: &WorkerKind) -> (Self, oneshot::Receiver<Result<String, StartError>>) {
        let (tx, rx) = oneshot::channel();
        let env = kind.env.clone();
        let entry = WorkerEntry {
            job_id: kind.job_id,
            kind: kind.clone(),
            dedicated: false,
            detached: false,
            state: WorkerState::Starting(vec![tx]),
            address: None,
            pid: None,
            kill: None,
            gpus: Vec::new(),
            env,
        };
        (entry, rx)
    }
}

#[derive(Default)]
struct PoolState {
    workers: HashMap<WorkerId, WorkerEntry>,
    leases: HashMap<LeaseId, (WorkerId, ResourceSet)>,
    /// Leases whose worker is blocked: their resources are lent back.
    blocked: std::collections::HashSet<LeaseId>,
    /// Blocked leases a replacement worker was started for (one each, until
    /// the lease resumes or ends).
    replaced: std::collections::HashSet<LeaseId>,
    /// Who each lease was granted to, as the holder said (for a restarted
    /// head, which learns the leases from the nodes).
    owners: HashMap<LeaseId, (Option<WorkerId>, Option<shoal_proto::NodeId>)>,
    allocated: ResourceSet,
    dead: Vec<WorkerId>,
    /// The GPU devices, and the shares each lease holding some has.
    gpus: crate::gpus::Devices,
    gpu_shares: HashMap<LeaseId, Vec<crate::gpus::Share>>,
}

impl PoolState {
    /// The lease `worker_id` serves, if any.
    fn lease_of(&self, worker_id: WorkerId) -> Option<LeaseId> {
        self.leases
            .iter()
            .find_map(|(lease, (w, _))| (*w == worker_id).then_some(*lease))
    }

    /// The workers some lease holds (started already or not).
    fn leased_workers(&self) -> std::collections::HashSet<WorkerId> {
        self.leases.values().map(|(w, _)| *w).collect()
    }

    /// Ends a lease's hold on its node: its resources (unless lent back
    /// while blocked) and its GPU devices.
    fn end_lease(&mut self, lease_id: LeaseId) -> Option<WorkerId> {
        self.owners.remove(&lease_id);
        self.replaced.remove(&lease_id);
        let (worker_id, resources) = self.leases.remove(&lease_id)?;
        if !self.blocked.remove(&lease_id) {
            subtract(&mut self.allocated, &resources);
        }
        if let Some(shares) = self.gpu_shares.remove(&lease_id) {
            self.gpus.give_back(&shares);
        }
        Some(worker_id)
    }
}

/// Settings for the pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Everything the node offers.
    pub total: ResourceSet,
    /// Idle workers are stopped after this long.
    pub idle_timeout: Duration,
    /// A worker that has not registered within this is given up on.
    pub start_timeout: Duration,
    /// Where worker logs go.
    pub log_dir: Option<PathBuf>,
}

/// The worker pool.
pub struct WorkerPool {
    state: Mutex<PoolState>,
    /// Woken whenever a worker is removed (see [`WorkerPool::watch_any`]).
    any_gone: tokio::sync::Notify,
    launcher: Arc<dyn WorkerLauncher>,
    binaries: BinaryCache,
    config: PoolConfig,
    /// Environment every worker gets (node identity, addresses, token).
    env: Mutex<Vec<(String, String)>>,
    /// The workers this pool launched, newest last (at most
    /// [`LAUNCHED_KEPT`]): their log files are this node's.
    launched: Mutex<std::collections::VecDeque<WorkerId>>,
}

/// The name of a worker's log file in the pool's log directory.
pub fn worker_log_name(worker_id: WorkerId) -> String {
    format!("worker-{worker_id}.log")
}

/// Launched workers remembered for their logs.
const LAUNCHED_KEPT: usize = 10_000;

fn unavailable(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ServiceErrorKind::Unavailable, message)
}

fn fits(want: &ResourceSet, allocated: &ResourceSet, total: &ResourceSet) -> bool {
    want.iter()
        .all(|(name, qty)| allocated.get(name) + qty <= total.get(name) + 1e-9)
}

impl WorkerPool {
    /// An empty pool.
    pub fn new(
        launcher: Arc<dyn WorkerLauncher>,
        binaries: BinaryCache,
        config: PoolConfig,
    ) -> Self {
        let gpus = config.total.get(shoal_proto::resources::GPU).floor() as u32;
        Self {
            state: Mutex::new(PoolState {
                gpus: crate::gpus::Devices::new(gpus),
                ..PoolState::default()
            }),
            any_gone: tokio::sync::Notify::new(),
            launcher,
            binaries,
            config,
            env: Mutex::new(Vec::new()),
            launched: Mutex::default(),
        }
    }

    /// The directory of the workers' log files, if they have one.
    pub fn log_dir(&self) -> Option<&std::path::Path> {
        self.config.log_dir.as_deref()
    }

    /// The workers this pool launched (the last [`LAUNCHED_KEPT`]).
    pub fn launched(&self) -> Vec<WorkerId> {
        self.launched.locked().iter().copied().collect()
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.locked()
    }

    /// Sets the environment new workers get.
    pub fn set_env(&self, env: Vec<(String, String)>) {
        *self.env.locked() = env;
    }

    /// A worker of `kind` for `lease_id`, holding `resources`: an idle one,
    /// or a new one once it has registered. Idempotent per lease.
    pub async fn grant(
        self: &Arc<Self>,
        lease_id: LeaseId,
        kind: WorkerKind,
        resources: ResourceSet,
        tenancy: Tenancy,
    ) -> Result<Address, ServiceError> {
        let job_id = kind.job_id;
        let dedicated = tenancy != Tenancy::Shared;
        let detached = tenancy == Tenancy::Detached;
        // `retried`: the worker is being started for an earlier try of this
        // grant; this one only waits for it.
        let (worker_id, started, retried) = {
            let mut state = self.state();
            // A retried grant (its reply lost, or given up while the
            // worker started) gets the worker of the first, once it serves.
            if let Some((worker_id, _)) = state.leases.get(&lease_id) {
                let worker_id = *worker_id;
                match state.workers.get_mut(&worker_id) {
                    Some(WorkerEntry {
                        address: Some(address),
                        ..
                    }) => {
                        return Ok(Address {
                            worker_id,
                            address: address.clone(),
                        })
                    }
                    Some(WorkerEntry {
                        state: WorkerState::Starting(waiters),
                        ..
                    }) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        (worker_id, rx, true)
                    }
                    _ => return Err(unavailable("the worker for this lease is gone")),
                }
            } else {
                // The head's ledger places leases; the node trusts them (after a
                // blocked task resumes it may run past capacity for a while, as
                // the head allows) and refuses only what it could never hold.
                if !fits(&resources, &ResourceSet::new(), &self.config.total) {
                    return Err(ServiceError::new(
                        ServiceErrorKind::BadRequest,
                        format!(
                            "this node offers {:?}; a lease of {resources:?} cannot run here",
                            self.config.total
                        ),
                    ));
                }
                state.allocated.add(&resources);
                let shares = state
                    .gpus
                    .assign(resources.get(shoal_proto::resources::GPU));
                let gpus = crate::gpus::ids(&shares);
                if !shares.is_empty() {
                    state.gpu_shares.insert(lease_id, shares);
                }
                let idle = state.workers.iter().find_map(|(id, w)| {
                    (!dedicated
                        && w.job_id == job_id
                        && w.gpus == gpus
                        && w.env == kind.env
                        && matches!(w.state, WorkerState::Idle(_)))
                    .then_some(*id)
                });
                // Else a spare still starting (started for a worker that
                // blocked): this lease waits for it rather than for another.
                let starting = || {
                    let taken = state.leased_workers();
                    state.workers.iter().find_map(|(id, w)| {
                        (!dedicated
                            && !w.dedicated
                            && w.job_id == job_id
                            && w.gpus == gpus
                            && w.env == kind.env
                            && matches!(w.state, WorkerState::Starting(_))
                            && !taken.contains(id))
                        .then_some(*id)
                    })
                };
                let spare = if idle.is_none() { starting() } else { None };
                if let Some(worker_id) = spare {
                    state.leases.insert(lease_id, (worker_id, resources));
                    let entry = state
                        .workers
                        .get_mut(&worker_id)
                        .ok_or_else(|| unavailable("worker vanished"))?;
                    // Registered already (its starter has not marked it
                    // idle yet): it serves now.
                    if let Some(address) = entry.address.clone() {
                        entry.state = WorkerState::Leased(lease_id);
                        return Ok(Address { worker_id, address });
                    }
                    let (tx, rx) = oneshot::channel();
                    if let WorkerState::Starting(waiters) = &mut entry.state {
                        waiters.push(tx);
                    }
                    (worker_id, rx, true)
                } else {
                    match idle {
                        Some(worker_id) => {
                            state.leases.insert(lease_id, (worker_id, resources));
                            let entry = state
                                .workers
                                .get_mut(&worker_id)
                                .ok_or_else(|| unavailable("worker vanished"))?;
                            entry.state = WorkerState::Leased(lease_id);
                            let address = entry.address.clone().unwrap_or_default();
                            return Ok(Address { worker_id, address });
                        }
                        None => {
                            let worker_id = WorkerId::random();
                            let (mut entry, rx) = WorkerEntry::starting(&kind);
                            entry.dedicated = dedicated;
                            entry.detached = detached;
                            entry.gpus = gpus;
                            state.workers.insert(worker_id, entry);
                            state.leases.insert(lease_id, (worker_id, resources));
                            (worker_id, rx, false)
                        }
                    }
                }
            }
        };
        if retried {
            return self
                .registered(started)
                .await
                .map(|address| Address { worker_id, address })
                .map_err(|e| unavailable(format!("worker failed to start: {e}")));
        }
        match self.start(worker_id, &kind, started).await {
            Ok(address) => {
                let released = {
                    let mut state = self.state();
                    // The lease may have been released while the worker
                    // started (its holder gave up waiting): the worker is
                    // then idle, or stopped if it was to serve that lease
                    // alone, never left leased to nobody.
                    let still = state
                        .leases
                        .get(&lease_id)
                        .is_some_and(|(w, _)| *w == worker_id);
                    if let Some(entry) = state.workers.get_mut(&worker_id) {
                        entry.state = if still {
                            WorkerState::Leased(lease_id)
                        } else {
                            WorkerState::Idle(Instant::now())
                        };
                    }
                    !still
                };
                if released {
                    if dedicated {
                        self.remove_worker(worker_id);
                    }
                    return Err(unavailable(
                        "the lease was released while its worker started",
                    ));
                }
                if !dedicated {
                    self.prestart(kind, None);
                }
                Ok(Address { worker_id, address })
            }
            Err(e) => {
                warn!(%worker_id, %job_id, error = %e, "worker failed to start");
                self.remove_worker(worker_id);
                Err(unavailable(format!("worker failed to start: {e}")))
            }
        }
    }

    async fn start(
        self: &Arc<Self>,
        worker_id: WorkerId,
        kind: &WorkerKind,
        registered: oneshot::Receiver<Result<String, StartError>>,
    ) -> Result<String, StartError> {
        let WorkerKind {
            job_id,
            binary_hash,
            driver,
            env: user_env,
        } = kind;
        let executable = if self.launcher.needs_executable() {
            Some(self.binaries.path(binary_hash).await?)
        } else {
            None
        };
        // The lease's variables first: Shoal's own (set below) come last,
        // and `EnvVars::check` refuses their names anyway.
        let mut env: Vec<(String, String)> = user_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if !user_env.is_empty() {
            env.push((shoal_proto::env::WORKER_ENV_NAMES.into(), user_env.names()));
        }
        env.extend(self.env.locked().iter().cloned());
        {
            // On a node with GPUs, a worker sees exactly its devices.
            let state = self.state();
            if state.gpus.count() > 0 {
                let gpus = state.workers.get(&worker_id).map_or(&[][..], |w| &w.gpus);
                let visible = crate::gpus::visible_devices(gpus);
                env.push(("CUDA_VISIBLE_DEVICES".into(), visible.clone()));
                env.push(("SHOAL_GPU_IDS".into(), visible));
            }
        }
        env.push(("SHOAL_WORKER_ID".into(), worker_id.to_string()));
        env.push(("SHOAL_JOB_ID".into(), job_id.to_string()));
        env.push(("SHOAL_BINARY_HASH".into(), binary_hash.to_string()));
        if let Some(driver) = driver {
            env.push(("SHOAL_DRIVER_ADDRESS".into(), driver.address.clone()));
            env.push(("SHOAL_DRIVER_ID".into(), driver.worker_id.to_string()));
        }
        let log_path = self
            .config
            .log_dir
            .as_ref()
            .map(|d| d.join(worker_log_name(worker_id)));
        {
            let mut launched = self.launched.locked();
            if launched.len() == LAUNCHED_KEPT {
                launched.pop_front();
            }
            launched.push_back(worker_id);
        }
        let launched = self
            .launcher
            .launch(LaunchSpec {
                job_id: *job_id,
                worker_id,
                executable,
                env,
                user_env: user_env.clone(),
                log_path,
                driver: driver.clone(),
            })
            .map_err(StartError::Launch)?;
        {
            let mut state = self.state();
            let entry = state
                .workers
                .get_mut(&worker_id)
                .ok_or(StartError::Removed)?;
            entry.pid = launched.pid;
            entry.kill = Some(launched.kill);
        }
        if let Some(address) = launched.address {
            self.register(
                worker_id,
                address,
                launched.pid.unwrap_or_else(std::process::id),
            )
            .map_err(StartError::Register)?;
        }
        let pool = Arc::clone(self);
        let exited = launched.exited;
        tokio::spawn(async move {
            let how = exited.await;
            pool.worker_exited(worker_id, &how);
        });
        self.registered(registered).await
    }

    /// The address of a worker being started, once it registers (within
    /// `start_timeout`).
    async fn registered(
        &self,
        registered: oneshot::Receiver<Result<String, StartError>>,
    ) -> Result<String, StartError> {
        match tokio::time::timeout(self.config.start_timeout, registered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StartError::Exited),
            Err(_) => Err(StartError::Timeout(self.config.start_timeout)),
        }
    }

    /// Starts a spare idle worker for the job, so that its next lease here is
    /// served without waiting for a process to start. After a grant
    /// (`for_blocked` false): at most one spare, and no more running workers
    /// for the job than the node has CPUs. When a worker blocks in a `get`
    /// (`for_blocked`): its CPU goes to another lease, which will want a
    /// worker, so a replacement starts now: one per blocking of a lease
    /// (`for_blocked` names it), none while an untaken spare waits for each
    /// blocked worker, and at most as many starting at once as the node has
    /// CPUs.
    fn prestart(self: &Arc<Self>, kind: WorkerKind, for_blocked: Option<LeaseId>) {
        let worker_id = WorkerId::random();
        let registered = {
            let mut state = self.state();
            if let Some(lease) = for_blocked {
                if !state.blocked.contains(&lease) || state.replaced.contains(&lease) {
                    return;
                }
            }
            // A worker still starting that a lease has taken already runs
            // for it: it is no spare.
            let taken = state.leased_workers();
            let (mut count, mut spare, mut blocked) = (0usize, 0usize, 0usize);
            for (id, w) in &state.workers {
                if w.job_id != kind.job_id || w.env != kind.env || w.dedicated {
                    continue;
                }
                count += 1;
                match w.state {
                    WorkerState::Leased(lease) => {
                        blocked += usize::from(state.blocked.contains(&lease));
                    }
                    _ if taken.contains(id) => {}
                    _ => spare += 1,
                }
            }
            let cpus = self.config.total.get(shoal_proto::resources::CPU);
            let running = count - spare - blocked;
            let wanted = if for_blocked.is_some() {
                spare < blocked && (spare as f64) < cpus
            } else {
                spare == 0 && ((running + spare) as f64) < cpus
            };
            if !wanted {
                return;
            }
            if let Some(lease) = for_blocked {
                state.replaced.insert(lease);
            }
            let (entry, rx) = WorkerEntry::starting(&kind);
            state.workers.insert(worker_id, entry);
            rx
        };
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            match pool.start(worker_id, &kind, registered).await {
                Ok(_) => {
                    let mut state = pool.state();
                    // A lease may have taken it while it started.
                    let lease = state.lease_of(worker_id);
                    if let Some(entry) = state.workers.get_mut(&worker_id) {
                        entry.state = match lease {
                            Some(lease) => WorkerState::Leased(lease),
                            None => WorkerState::Idle(Instant::now()),
                        };
                    }
                }
                Err(e) => {
                    tracing::debug!(%worker_id, error = %e, "spare worker failed to start");
                    pool.remove_worker(worker_id);
                }
            }
        });
    }

    /// A worker the node started reports where it serves.
    pub fn register(
        &self,
        worker_id: WorkerId,
        address: String,
        pid: u32,
    ) -> Result<(), ServiceError> {
        let mut state = self.state();
        let entry = state.workers.get_mut(&worker_id).ok_or_else(|| {
            ServiceError::new(
                ServiceErrorKind::NotFound,
                format!("this node did not start worker {worker_id}"),
            )
        })?;
        let WorkerState::Starting(waiters) = &mut entry.state else {
            // The same registration again (its reply was lost) is fine.
            if entry.address.as_deref() == Some(address.as_str()) {
                return Ok(());
            }
            return Err(ServiceError::new(
                ServiceErrorKind::BadRequest,
                "worker already registered",
            ));
        };
        let waiters = std::mem::take(waiters);
        entry.address = Some(address.clone());
        entry.pid = entry.pid.or(Some(pid));
        for waiter in waiters {
            let _ = waiter.send(Ok(address.clone()));
        }
        info!(%worker_id, %address, pid, job_id = %entry.job_id, "worker registered");
        Ok(())
    }

    /// A replacement for a worker whose task just blocked, started now so
    /// the lease its lent CPU goes to finds a worker ready (see
    /// [`WorkerPool::prestart`]).
    pub fn replace_blocked(self: &Arc<Self>, worker_id: WorkerId) {
        let (kind, lease) = {
            let state = self.state();
            match (state.workers.get(&worker_id), state.lease_of(worker_id)) {
                (Some(w), Some(lease)) if !w.dedicated => (w.kind.clone(), lease),
                _ => return,
            }
        };
        self.prestart(kind, Some(lease));
    }

    /// The worker's task is blocked on other tasks (or resumed): lends its
    /// lease's resources back (or takes them again). Returns the lease if
    /// its state changed, for the head to be told.
    pub fn set_blocked(&self, worker_id: WorkerId, blocked: bool) -> Option<LeaseId> {
        let mut state = self.state();
        let lease_id = state.lease_of(worker_id)?;
        let resources = state.leases.get(&lease_id)?.1.clone();
        let changed = if blocked {
            state.blocked.insert(lease_id)
        } else {
            state.replaced.remove(&lease_id);
            state.blocked.remove(&lease_id)
        };
        if !changed {
            return None;
        }
        if blocked {
            subtract(&mut state.allocated, &resources);
        } else {
            state.allocated.add(&resources);
        }
        Some(lease_id)
    }

    /// Notes who holds `lease_id` (before its grant).
    pub fn set_owner(
        &self,
        lease_id: LeaseId,
        owner: Option<WorkerId>,
        owner_node: Option<shoal_proto::NodeId>,
    ) {
        self.state().owners.insert(lease_id, (owner, owner_node));
    }

    /// The leases held here and the live workers, for a restarted head.
    pub fn holdings(&self) -> (Vec<shoal_proto::head::HeldLease>, Vec<WorkerId>) {
        let state = self.state();
        let leases = state
            .leases
            .iter()
            .filter_map(|(lease_id, (worker_id, resources))| {
                let worker = state.workers.get(worker_id)?;
                let (owner, owner_node) = state.owners.get(lease_id).copied().unwrap_or_default();
                Some(shoal_proto::head::HeldLease {
                    lease_id: *lease_id,
                    job_id: worker.job_id,
                    owner,
                    owner_node,
                    resources: resources.clone(),
                    blocked: state.blocked.contains(lease_id),
                    detached: worker.detached,
                })
            })
            .collect();
        (leases, state.workers.keys().copied().collect())
    }

    /// A lease holder is done with its worker.
    pub fn release(&self, lease_id: LeaseId, kill: bool) {
        let mut state = self.state();
        let Some(worker_id) = state.end_lease(lease_id) else {
            return;
        };
        let kill = kill || state.workers.get(&worker_id).is_some_and(|w| w.dedicated);
        if kill {
            if let Some(entry) = state.workers.get(&worker_id) {
                if let Some(kill) = &entry.kill {
                    kill();
                }
            }
        } else if let Some(entry) = state.workers.get_mut(&worker_id) {
            if matches!(entry.state, WorkerState::Leased(id) if id == lease_id) {
                entry.state = WorkerState::Idle(Instant::now());
            }
        }
    }

    fn worker_exited(&self, worker_id: WorkerId, how: &str) {
        info!(%worker_id, exit = how, "worker exited");
        self.remove_worker(worker_id);
        self.state().dead.push(worker_id);
    }

    fn remove_worker(&self, worker_id: WorkerId) {
        let mut state = self.state();
        let Some(entry) = state.workers.remove(&worker_id) else {
            return;
        };
        if let Some(kill) = &entry.kill {
            kill();
        }
        self.any_gone.notify_waiters();
        if let WorkerState::Starting(waiters) = entry.state {
            for waiter in waiters {
                let _ = waiter.send(Err(StartError::Removed));
            }
        }
        let leases: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, (w, _))| *w == worker_id)
            .map(|(id, _)| *id)
            .collect();
        for lease in leases {
            state.end_lease(lease);
        }
    }

    /// Waits up to `wait` until any of `workers` is gone; returns those
    /// gone (none if all are still running when the wait ends).
    pub async fn watch_any(&self, workers: &[WorkerId], wait: Duration) -> Vec<WorkerId> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.any_gone.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let gone: Vec<WorkerId> = {
                let state = self.state();
                workers
                    .iter()
                    .filter(|w| !state.workers.contains_key(w))
                    .copied()
                    .collect()
            };
            if !gone.is_empty() {
                return gone;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Vec::new();
            }
        }
    }

    /// Stops a worker at once (an actor being killed).
    pub fn kill_worker(&self, worker_id: WorkerId) {
        self.remove_worker(worker_id);
    }

    /// Jobs with workers here (detached actors' jobs excluded: they outlive them).
    pub fn jobs(&self) -> Vec<JobId> {
        let mut jobs: Vec<JobId> = self
            .state()
            .workers
            .values()
            .filter(|w| !w.detached)
            .map(|w| w.job_id)
            .collect();
        jobs.sort();
        jobs.dedup();
        jobs
    }

    /// Workers that died since the last call.
    pub fn take_dead(&self) -> Vec<WorkerId> {
        std::mem::take(&mut self.state().dead)
    }

    /// Puts back dead-worker reports that did not reach the head.
    pub fn requeue_dead(&self, workers: Vec<WorkerId>) {
        self.state().dead.extend(workers);
    }

    /// Stops every worker of finished jobs.
    pub fn finish_jobs(&self, jobs: &[JobId]) {
        let doomed: Vec<WorkerId> = self
            .state()
            .workers
            .iter()
            .filter(|(_, w)| jobs.contains(&w.job_id) && !w.detached)
            .map(|(id, _)| *id)
            .collect();
        for worker_id in doomed {
            self.remove_worker(worker_id);
        }
    }

    /// Stops workers idle for longer than the idle timeout.
    pub fn reap_idle(&self) {
        let timeout = self.config.idle_timeout;
        let idle: Vec<WorkerId> = self
            .state()
            .workers
            .iter()
            .filter(
                |(_, w)| matches!(w.state, WorkerState::Idle(since) if since.elapsed() > timeout),
            )
            .map(|(id, _)| *id)
            .collect();
        for worker_id in idle {
            self.remove_worker(worker_id);
        }
    }

    /// Free resources by the node's own count.
    pub fn available(&self) -> ResourceSet {
        let state = self.state();
        self.config
            .total
            .iter()
            .map(|(name, qty)| (name.to_string(), (qty - state.allocated.get(name)).max(0.0)))
            .collect()
    }

    /// Stops every worker (node shutdown).
    pub fn stop_all(&self) {
        let all: Vec<WorkerId> = self.state().workers.keys().copied().collect();
        for worker_id in all {
            self.remove_worker(worker_id);
        }
    }

    /// Workers alive (starting, idle or leased).
    pub fn worker_count(&self) -> usize {
        self.state().workers.len()
    }

    /// Process ids of live workers.
    pub fn pids(&self) -> Vec<u32> {
        self.state()
            .workers
            .values()
            .filter_map(|w| w.pid)
            .collect()
    }
}

fn subtract(from: &mut ResourceSet, what: &ResourceSet) {
    for (name, qty) in what.iter() {
        let left = (from.get(name) - qty).max(0.0);
        from.set(name, left);
    }
}
