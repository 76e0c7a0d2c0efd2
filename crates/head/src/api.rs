//! The head service: answers [`HeadRequest`]s.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use shoal_net::digest::is_sha256_hex;
use shoal_net::handshake::HandshakeStats;
use shoal_net::sync::MutexExt;
use shoal_net::{ClusterIdentity, Peer, Service};
use shoal_proto::head::{
    JobSubmission, LeaseRequest, NodeRegistered, RegisterNode, RestartActor, SUBMIT_BYTES_MAX,
    SUBMIT_STRINGS_MAX,
};
use shoal_proto::node::LOG_CHUNK_MAX;
use shoal_proto::placement::{GroupState, PlacementGroupInfo, PlacementGroupSpec};
use shoal_proto::PlacementGroupId;
use shoal_proto::{
    ActorState, ClusterId, ClusterStatus, HeadReply, HeadRequest, JobId, NodeId, NodeState, Role,
    ServiceError, ServiceErrorKind,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::actors::{Actors, Died, Placed};
use crate::binaries::Binaries;
use crate::config::HeadConfig;
use crate::jobs::{Jobs, SubmissionStatus};
use crate::links::NodeLinks;
use crate::membership::{Fenced, Membership};
use crate::scheduler::{Decision, NodeView, Reservation, Scheduler};
use crate::store::{Store, Stored};
use crate::submit::{Event, JobRunner, Start, WORKING_DIR_BYTES_MAX};

/// Longest a lease request is held waiting for resources.
const LEASE_WAIT_MAX: Duration = Duration::from_secs(10);
/// Largest part of an executable sent in one reply.
const BINARY_CHUNK_MAX: u32 = 8 << 20;

/// The head's tables, under one lock so they change together.
pub(crate) struct State {
    pub(crate) membership: Membership,
    pub(crate) scheduler: Scheduler,
    pub(crate) jobs: Jobs,
    pub(crate) actors: Actors,
    pub(crate) objects: crate::objects::Objects,
    pub(crate) kv: crate::kv::Kv,
    pub(crate) groups: crate::groups::Groups,
    /// What each node is to do (restart actors, delete copies), handed
    /// over with its heartbeats' acknowledgments until it says it has them.
    pub(crate) orders: HashMap<NodeId, NodeOrders>,
    /// Nodes of the old head that have not joined this one again (a
    /// restarted head; see `crate::recovery`).
    pub(crate) rejoining: HashSet<NodeId>,
    /// Until when reloaded jobs wait for their drivers.
    pub(crate) drivers_until: Option<Instant>,
    /// This head's incarnation, and whether the store has it yet.
    pub(crate) incarnation: u64,
    pub(crate) incarnation_dirty: bool,
}

/// Orders for one node, numbered, kept until the node acknowledges them: a
/// lost heartbeat reply loses no order.
#[derive(Default)]
pub(crate) struct NodeOrders {
    /// The newest order's number.
    seq: u64,
    restarts: Vec<(u64, RestartActor)>,
    deletes: Vec<(u64, shoal_proto::ObjectId)>,
    releases: Vec<(u64, shoal_proto::LeaseId)>,
}

/// Deletions held for one node at most (past it, the copies stay until the
/// node frees them for room).
const DELETE_ORDERS_MAX: usize = 100_000;

impl NodeOrders {
    fn restart(&mut self, order: RestartActor) {
        self.seq += 1;
        self.restarts.push((self.seq, order));
    }

    pub(crate) fn delete(&mut self, id: shoal_proto::ObjectId) {
        if self.deletes.len() < DELETE_ORDERS_MAX {
            self.seq += 1;
            self.deletes.push((self.seq, id));
        }
    }

    pub(crate) fn release(&mut self, lease_id: shoal_proto::LeaseId) {
        self.seq += 1;
        self.releases.push((self.seq, lease_id));
    }

    /// Forgets the orders the node has acted on (numbered up to `acked`).
    fn acked(&mut self, acked: u64) {
        self.restarts.retain(|(seq, _)| *seq > acked);
        self.deletes.retain(|(seq, _)| *seq > acked);
        self.releases.retain(|(seq, _)| *seq > acked);
    }

    /// The orders not yet acknowledged, and the newest one's number.
    pub(crate) fn pending(&self) -> Pending {
        Pending {
            restarts: self.restarts.iter().map(|(_, o)| o.clone()).collect(),
            deletes: self.deletes.iter().map(|(_, id)| *id).collect(),
            releases: self.releases.iter().map(|(_, id)| *id).collect(),
            seq: self.seq,
        }
    }
}

/// A node's orders not yet acknowledged.
pub(crate) struct Pending {
    pub(crate) restarts: Vec<RestartActor>,
    pub(crate) deletes: Vec<shoal_proto::ObjectId>,
    pub(crate) releases: Vec<shoal_proto::LeaseId>,
    pub(crate) seq: u64,
}

impl State {
    /// Empty tables admitting up to `nodes_max` live nodes.
    pub(crate) fn new(nodes_max: usize, dead_nodes_kept: usize) -> Self {
        Self {
            membership: Membership::new(nodes_max, dead_nodes_kept),
            scheduler: Scheduler::new(),
            jobs: Jobs::default(),
            actors: Actors::default(),
            objects: crate::objects::Objects::default(),
            kv: crate::kv::Kv::default(),
            groups: crate::groups::Groups::default(),
            orders: HashMap::new(),
            rejoining: HashSet::new(),
            drivers_until: None,
            incarnation: 1,
            incarnation_dirty: false,
        }
    }

    /// Orders the nodes holding leases whose owner died to stop those
    /// workers: they work for no one now.
    ///
    /// An actor's lease is orphaned when its creator (a worker) died: with
    /// the creator's node (`owner_node_died`), the actor dies with it, as in
    /// Ray (never restarted: its owner is gone; detached actors' leases are
    /// never orphaned). A creator whose own exit its node reported (an idle
    /// worker reaped) leaves its actors running, as before.
    fn order_orphan_releases(&mut self, owner_node_died: bool) {
        for (node_id, lease_id) in self.scheduler.take_orphaned() {
            if let Some(actor_id) = self.actors.with_lease(lease_id) {
                if !owner_node_died {
                    continue;
                }
                if let Some((info, _)) = self.actors.kill(actor_id) {
                    info!(%actor_id, class = %info.class, "the actor's owner died with its node; the actor is dead");
                }
            }
            self.orders.entry(node_id).or_default().release(lease_id);
        }
    }

    /// Releases the leases of actors whose worker died; true if any was
    /// held.
    pub(crate) fn actors_died(&mut self, died: Vec<Died>) -> bool {
        let mut released = false;
        for actor in died {
            released |= self.scheduler.release(actor.lease_id);
            if actor.info.state == ActorState::Restarting {
                info!(actor_id = %actor.info.actor_id, class = %actor.info.class, incarnation = actor.info.incarnation, "actor's worker died; restarting it");
            } else {
                info!(actor_id = %actor.info.actor_id, class = %actor.info.class, "actor's worker died; the actor is dead");
            }
        }
        released
    }

    /// A node died or left: its leases are gone, its actors die or restart.
    pub(crate) fn node_gone(&mut self, node_id: NodeId) {
        self.rejoining.remove(&node_id);
        self.scheduler.node_died(node_id);
        self.order_orphan_releases(true);
        self.objects.node_died(node_id);
        self.orders.remove(&node_id);
        let died = self.actors.node_died(node_id);
        self.actors_died(died);
    }

    /// A placement group's record, with where its bundles are.
    pub(crate) fn group_info(&self, id: PlacementGroupId) -> Option<PlacementGroupInfo> {
        self.groups.info(id, self.scheduler.group(id))
    }

    /// Removes a group from the table and the ledger, and stops what ran
    /// in it: its leases' workers (their nodes are ordered to stop them)
    /// and its actors (dead, whatever restarts they had left, as in Ray).
    /// False if it was removed already, or is unknown.
    pub(crate) fn remove_group(&mut self, id: PlacementGroupId) -> bool {
        if !self.groups.remove(id) {
            return false;
        }
        let stopped = self.scheduler.remove_group(id).unwrap_or_default();
        for (node_id, lease_id) in stopped {
            if let Some(actor_id) = self.actors.with_lease(lease_id) {
                if let Some((info, _)) = self.actors.kill(actor_id) {
                    info!(%actor_id, class = %info.class, group = %id, "its placement group was removed; the actor is dead");
                }
            }
            self.orders.entry(node_id).or_default().release(lease_id);
        }
        // Restarts waiting for a bundle of it, or placed in one and not
        // yet reported: dead too.
        for actor_id in self.actors.in_group(id) {
            if let Some((info, _)) = self.actors.kill(actor_id) {
                info!(%actor_id, class = %info.class, group = %id, "its placement group was removed; the actor is dead");
            }
        }
        info!(group = %id, "placement group removed");
        true
    }

    /// Phase one for the groups `ids`: each has its unplaced bundles
    /// reserved on nodes, all or none. Returns those prepared, to commit
    /// once the store has what was decided.
    fn prepare_groups(&mut self, ids: Vec<PlacementGroupId>) -> Vec<PlacementGroupId> {
        if self.recovering() || ids.is_empty() {
            return Vec::new();
        }
        let live = self.live_nodes();
        let mut prepared = Vec::new();
        for id in ids {
            match self.scheduler.prepare_group(&live, id) {
                Reservation::Prepared => {
                    self.groups.set_infeasible(id, false);
                    prepared.push(id);
                }
                Reservation::Wait => self.groups.set_infeasible(id, false),
                Reservation::Infeasible => self.groups.set_infeasible(id, true),
                Reservation::Nothing | Reservation::Unknown => {}
            }
        }
        prepared
    }

    /// Leases nodes to the restarts waiting for one; each placed restart
    /// becomes an order to its node.
    pub(crate) fn place_restarts(&mut self) {
        let waiting = self.actors.waiting();
        // Not while the ledger may be missing leases.
        if waiting.is_empty() || self.recovering() {
            return;
        }
        let live = self.live_nodes();
        for (info, spec) in waiting {
            // A job that is forgotten (its executable may be too), or has
            // no driver, has no actor to restart.
            let Some((job, driver)) = self
                .jobs
                .get(info.job_id)
                .and_then(|j| Some((j.clone(), j.driver.clone()?)))
            else {
                self.actors.kill(info.actor_id);
                continue;
            };
            let request = LeaseRequest {
                job_id: info.job_id,
                owner: spec.owner,
                resources: spec.resources.clone(),
                preferred_node: None,
                wait_ms: 0,
                request_id: 0,
                owner_node: None,
                abandon: false,
                placement: spec.placement.clone(),
            };
            let lease = match self.scheduler.request(&live, &request) {
                Decision::Granted(lease) => lease,
                // It can never be placed as it asks (its node affinity's
                // node is gone, its group removed): it is dead, as a
                // restart that fails.
                Decision::Refused(why) => {
                    if let Some((info, _)) = self.actors.kill(info.actor_id) {
                        warn!(actor_id = %info.actor_id, class = %info.class, %why, "the actor cannot be restarted where it asks; it is dead");
                    }
                    continue;
                }
                _ => continue,
            };
            if info.detached {
                self.scheduler.detach(lease.lease_id);
            }
            self.actors.place(
                info.actor_id,
                Placed {
                    node_id: lease.node_id,
                    lease_id: lease.lease_id,
                },
            );
            self.orders
                .entry(lease.node_id)
                .or_default()
                .restart(RestartActor {
                    actor_id: info.actor_id,
                    incarnation: info.incarnation,
                    class: info.class,
                    spec,
                    lease,
                    job_id: info.job_id,
                    binary_hash: job.binary_hash,
                    driver,
                    detached: info.detached,
                });
        }
    }

    fn live_nodes(&self) -> Vec<NodeView> {
        self.membership
            .status(Instant::now())
            .into_iter()
            .filter(|n| n.state == NodeState::Alive)
            .map(|n| NodeView {
                node_id: n.node_id,
                address: n.address,
                total: n.resources_total,
                labels: n.labels,
            })
            .collect()
    }
}

/// The head's request handler and the state it serves.
pub struct HeadService {
    identity: Arc<ClusterIdentity>,
    state: Mutex<State>,
    binaries: Mutex<Binaries>,
    /// The node each connection speaks for (taken after `state`, never
    /// before it).
    links: Mutex<NodeLinks>,
    /// Woken when resources may have been freed or added.
    resources_changed: Notify,
    /// Woken when an actor's record changes (a restart ends, or it dies).
    actors_changed: Notify,
    /// Woken when a placement group is created, placed or removed.
    groups_changed: Notify,
    stats: Arc<HandshakeStats>,
    heartbeat_interval: Duration,
    node_timeout: Duration,
    /// Where the tables that outlive the head are written.
    store: Store,
    /// What owners report of their tasks (not kept across restarts).
    tasks: Mutex<crate::tasks::Tasks>,
    metrics: crate::metrics::HeadMetrics,
    /// Runs the drivers of submitted jobs, when the head has a session
    /// directory to run them in ([`HeadService::run_jobs`]).
    runner: OnceLock<Arc<JobRunner>>,
    /// This service, for what the runner reports later.
    me: OnceLock<Weak<HeadService>>,
}

fn bad_request(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ServiceErrorKind::BadRequest, message)
}

impl HeadService {
    /// A head whose tables are written to `stored`'s store, reloaded from
    /// its snapshot (empty for a new cluster); with `None`, a head that
    /// keeps nothing.
    pub fn new(
        identity: Arc<ClusterIdentity>,
        config: &HeadConfig,
        stats: Arc<HandshakeStats>,
        stored: Option<Stored>,
    ) -> Self {
        let mut state = State::new(config.nodes_max, config.dead_nodes_kept);
        let (store, mut binaries) = match stored {
            Some(Stored { store, snapshot }) => {
                // Beside an embedded store as files; whole in the rows of a
                // store on another machine.
                let mut binaries = match store.files() {
                    Some(dir) => Binaries::in_dir(dir.to_path_buf()),
                    None => Binaries::in_rows(),
                };
                let grace = config.limits.idle_timeout * 2;
                let restored = state.restore(&snapshot, &mut binaries, Instant::now(), grace);
                if restored.incarnation > 1 {
                    info!(
                        incarnation = restored.incarnation,
                        running_jobs = restored.running_jobs,
                        live_actors = restored.live_actors,
                        nodes_awaited = restored.nodes_awaited,
                        binaries = restored.binaries,
                        kv_entries = restored.kv_entries,
                        "head recovered its tables; waiting for the nodes to join again"
                    );
                }
                (store, binaries)
            }
            None => (Store::none(), Binaries::default()),
        };
        store.enqueue(state.journal(Some(&mut binaries)));
        Self {
            identity,
            state: Mutex::new(state),
            binaries: Mutex::new(binaries),
            resources_changed: Notify::new(),
            actors_changed: Notify::new(),
            groups_changed: Notify::new(),
            stats,
            heartbeat_interval: config.heartbeat_interval,
            node_timeout: config.node_timeout,
            store,
            tasks: Mutex::new(crate::tasks::Tasks::new()),
            metrics: crate::metrics::HeadMetrics::default(),
            runner: OnceLock::new(),
            me: OnceLock::new(),
            links: Mutex::default(),
        }
    }

    /// Lets this head run submitted jobs (`shoal job submit`) with
    /// `runner`; a head without one refuses them.
    pub fn run_jobs(self: &Arc<Self>, runner: JobRunner) {
        let _ = self.me.set(Arc::downgrade(self));
        let _ = self.runner.set(Arc::new(runner));
    }

    /// Stops the drivers of submitted jobs (the head is stopping).
    pub async fn stop_jobs(&self) {
        if let Some(runner) = self.runner.get() {
            runner.shutdown().await;
        }
    }

    fn submit_job(&self, submission: JobSubmission) -> Result<HeadReply, ServiceError> {
        check_submission(&submission)?;
        let (Some(runner), Some(me)) = (self.runner.get(), self.me.get()) else {
            return Err(ServiceError::new(
                ServiceErrorKind::Unavailable,
                "this head runs no submitted jobs (it was started without a session directory)",
            ));
        };
        let job_id = submission.job_id;
        let (program, working_dir) = {
            let binaries = self.binaries();
            let program = binaries.stored(&submission.program_hash);
            let working_dir = submission
                .working_dir_hash
                .as_ref()
                .map(|hash| (hash, binaries.stored(hash)));
            (program, working_dir)
        };
        // Read with the executables' lock let go.
        let program = program.and_then(|p| p.read());
        let working_dir =
            working_dir.map(|(hash, stored)| stored.and_then(|s| s.read()).ok_or(hash));
        let mut missing = Vec::new();
        if program.is_none() {
            missing.push(submission.program_hash.clone());
        }
        if let Some(Err(hash)) = &working_dir {
            missing.push((*hash).clone());
        }
        let (Some(program), None) = (program, missing.first()) else {
            return Ok(HeadReply::JobSubmitted { job_id, missing });
        };
        if let Some(Ok(archive)) = &working_dir {
            if archive.len() as u64 > WORKING_DIR_BYTES_MAX {
                return Err(bad_request(format!(
                    "working directory archive of {} bytes exceeds the {WORKING_DIR_BYTES_MAX} byte limit",
                    archive.len()
                )));
            }
        }
        let entrypoint = std::iter::once(submission.program.as_str())
            .chain(submission.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        if !self
            .state()
            .jobs
            .submit(job_id, &submission.program_hash, entrypoint)
        {
            // A retried submission: the first one started it.
            return Ok(HeadReply::JobSubmitted { job_id, missing });
        }
        info!(%job_id, program = %submission.program, "job submitted");
        let me = me.clone();
        runner.start(
            Start {
                job_id,
                program: submission.program,
                program_bytes: program,
                args: submission.args,
                env: submission.env,
                working_dir: working_dir.and_then(Result::ok),
            },
            move |job_id, event| {
                if let Some(service) = me.upgrade() {
                    service.job_event(job_id, event);
                }
            },
        );
        Ok(HeadReply::JobSubmitted { job_id, missing })
    }

    /// What the runner says of a submitted job's driver.
    fn job_event(&self, job_id: JobId, event: Event) {
        let exited = matches!(event, Event::Exited(_));
        self.state()
            .jobs
            .update_submission(job_id, |s| match event {
                Event::Started(pid) => {
                    s.status = SubmissionStatus::Running;
                    s.driver_pid = Some(pid);
                }
                Event::Exited(exit) => {
                    s.status = exit.status;
                    s.exit_code = exit.exit_code;
                    s.message = exit.message;
                }
            });
        // Its tasks and actors end with it.
        if exited {
            self.finish_job(job_id);
        }
        self.journal(&mut self.state(), false);
    }

    /// Part of a submitted job's output ([`HeadReply::JobLog`]).
    pub fn job_log(&self, job_id: JobId, offset: u64, len: u32) -> Result<HeadReply, ServiceError> {
        let Some(runner) = self.runner.get() else {
            return Err(not_submitted(job_id));
        };
        let done = match self.state().jobs.get(job_id).map(|j| j.submission.as_ref()) {
            Some(Some(s)) => s.status.is_terminal(),
            _ => return Err(not_submitted(job_id)),
        };
        // Read after the state: output is complete once the job is done.
        let (data, size) = runner
            .read_log(job_id, offset, len.min(LOG_CHUNK_MAX))
            .map_err(|e| {
                ServiceError::new(
                    ServiceErrorKind::Internal,
                    format!("reading the job's output: {e}"),
                )
            })?;
        Ok(HeadReply::JobLog { data, size, done })
    }

    fn stop_job(&self, job_id: JobId) -> Result<HeadReply, ServiceError> {
        let (submitted, unsupervised) = self.state().jobs.get(job_id).map_or((false, false), |j| {
            (j.submission.is_some(), j.is_unsupervised())
        });
        if unsupervised {
            return Err(ServiceError::new(
                ServiceErrorKind::Unavailable,
                format!(
                    "job {job_id}'s driver was started by the head before it restarted, which this one does not control; `shoal stop` on the head's machine ends it"
                ),
            ));
        }
        let runner = self.runner.get().filter(|_| submitted);
        let Some(runner) = runner else {
            return Err(not_submitted(job_id));
        };
        let running = runner.stop(job_id);
        if running {
            info!(%job_id, "stopping the job");
        }
        Ok(HeadReply::JobStopping { running })
    }

    /// What the head measures as it goes.
    pub(crate) fn metrics(&self) -> &crate::metrics::HeadMetrics {
        &self.metrics
    }

    /// Handshakes the head refused, and more.
    pub(crate) fn handshake_stats(&self) -> &HandshakeStats {
        &self.stats
    }

    /// This head's incarnation: 1 for a cluster's first head, one more
    /// for each restart on the same store.
    pub fn incarnation(&self) -> u64 {
        self.state().incarnation
    }

    /// Cancelled when the store fails: the head must stop serving.
    pub fn store_failed(&self) -> tokio_util::sync::CancellationToken {
        self.store.failed()
    }

    /// Hands what changed to the store (under the state lock, so in the
    /// order it changed); returns the number to wait for.
    /// With `uploaded` false, an upload writing an executable to disk (it
    /// holds the executables meanwhile) is not waited for under the state
    /// lock: an upload's own reply asks with `uploaded` and takes the row.
    fn journal(&self, state: &mut State, uploaded: bool) -> u64 {
        let mut binaries = if uploaded {
            Some(self.binaries())
        } else {
            match self.binaries.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        let writes = state.journal(binaries.as_deref_mut());
        self.store.enqueue(writes)
    }

    /// Waits until every change made so far is durable: a reply sent after
    /// it never acknowledges what a crash could lose.
    async fn durable(&self, uploaded: bool) -> Result<(), ServiceError> {
        let seq = self.journal(&mut self.state(), uploaded);
        self.store.durable(seq).await.map_err(|e| {
            ServiceError::new(ServiceErrorKind::Unavailable, format!("not written: {e}"))
        })
    }

    /// The cluster's id.
    pub fn cluster_id(&self) -> ClusterId {
        self.identity.cluster_id()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // Every method finishes its updates before returning, so a poisoned
        // lock's data is consistent.
        self.state.locked()
    }

    fn binaries(&self) -> MutexGuard<'_, Binaries> {
        self.binaries.locked()
    }

    fn links(&self) -> MutexGuard<'_, NodeLinks> {
        self.links.locked()
    }

    /// Declares silent nodes dead and reclaims their leases; places
    /// waiting actor restarts.
    pub fn sweep(&self) {
        let (dead, drivers_gone) = {
            let mut state = self.state();
            let now = Instant::now();
            let was_recovering = state.recovering();
            let dead = state.membership.sweep(now, self.node_timeout);
            for node_id in &dead {
                state.node_gone(*node_id);
            }
            self.recovery_step(was_recovering, &mut state);
            state.place_restarts();
            let drivers_gone = state.drivers_gone(now);
            self.journal(&mut state, false);
            (dead, drivers_gone)
        };
        for job_id in drivers_gone {
            warn!(%job_id, "the job's driver did not connect to the restarted head; the job ends");
            self.finish_job(job_id);
        }
        if !dead.is_empty() {
            self.actors_changed.notify_waiters();
        }
        for node_id in dead {
            warn!(%node_id, timeout = ?self.node_timeout, "node missed its heartbeats; declared dead");
        }
    }

    /// The actor's record; with `known`, held up to `wait` while the actor
    /// is still that incarnation and not dead.
    async fn get_actor(
        &self,
        actor_id: shoal_proto::ActorId,
        known: Option<u32>,
        wait: Duration,
    ) -> Result<HeadReply, ServiceError> {
        let deadline = tokio::time::Instant::now() + wait.min(LEASE_WAIT_MAX);
        loop {
            let notified = self.actors_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let info = self.state().actors.get(actor_id).cloned().ok_or_else(|| {
                ServiceError::new(ServiceErrorKind::NotFound, format!("no actor {actor_id}"))
            })?;
            let settled = match known {
                Some(k) => info.incarnation != k && info.state == ActorState::Alive,
                None => true,
            } || info.state == ActorState::Dead;
            if settled || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(HeadReply::Actor(info));
            }
        }
    }

    /// The cluster's node table and resource view.
    pub fn status(&self) -> ClusterStatus {
        let state = self.state();
        let mut nodes = state.membership.status(Instant::now());
        for node in &mut nodes {
            if node.state == NodeState::Alive {
                let view = NodeView {
                    node_id: node.node_id,
                    address: String::new(),
                    total: node.resources_total.clone(),
                    labels: Default::default(),
                };
                node.resources_available = state.scheduler.available(&view);
            }
        }
        ClusterStatus {
            cluster_id: self.cluster_id(),
            nodes,
            handshakes_refused: self.stats.refused.load(Ordering::Relaxed),
            infeasible: state.scheduler.infeasible().to_vec(),
            placement_groups: state
                .groups
                .ids()
                .into_iter()
                .filter_map(|id| state.group_info(id))
                .filter(|g| g.state != GroupState::Removed)
                .collect(),
        }
    }

    fn register_node(&self, peer: &Peer, info: RegisterNode) -> Result<HeadReply, ServiceError> {
        check_registration(&info)?;
        let address = info.address.clone();
        // One registration key, one node, however many times the request
        // is sent (a lost reply, or retries racing each other): the lookup,
        // the admission and the certificate for the admitted id happen under
        // one lock, so no reply ever carries an id that was not stored.
        let (node_id, cert) = {
            let mut state = self.state();
            let id = state
                .membership
                .registered_with(info.registration_key)
                .unwrap_or_else(NodeId::random);
            let node_id = state
                .membership
                .register(id, info, Instant::now())
                .map_err(|e| ServiceError::new(ServiceErrorKind::Unavailable, e.to_string()))?;
            let cert = self.node_cert(node_id)?;
            let live = state.live_nodes();
            state.scheduler.recheck_infeasible(&live);
            (node_id, cert)
        };
        self.links().bind(peer, node_id);
        self.resources_changed.notify_waiters();
        info!(%node_id, %address, remote = %peer.remote, "node registered");
        Ok(self.welcome(node_id, cert))
    }

    /// The certificate a node serves its peers with.
    fn node_cert(&self, node_id: NodeId) -> Result<shoal_net::IssuedCert, ServiceError> {
        self.identity.issue_node_cert(node_id).map_err(|e| {
            ServiceError::new(
                ServiceErrorKind::Internal,
                format!("issuing certificate: {e}"),
            )
        })
    }

    /// The answer to a node that joined (or joined again).
    fn welcome(&self, node_id: NodeId, cert: shoal_net::IssuedCert) -> HeadReply {
        HeadReply::NodeRegistered(NodeRegistered {
            node_id,
            heartbeat_interval_ms: millis(self.heartbeat_interval),
            node_cert_der: cert.cert_der,
            node_key_der: cert.key_der,
            ca_cert_der: self.identity.ca_cert_der(),
        })
    }

    async fn request_lease(&self, request: LeaseRequest) -> Result<HeadReply, ServiceError> {
        request
            .resources
            .validate()
            .map_err(|e| bad_request(e.to_string()))?;
        request
            .placement
            .check()
            .map_err(|e| bad_request(e.to_string()))?;
        let wait = Duration::from_millis(request.wait_ms).min(LEASE_WAIT_MAX);
        let arrived = tokio::time::Instant::now();
        let deadline = arrived + wait;
        loop {
            // Registered before looking, so a release between the look and
            // the wait still wakes us.
            let notified = self.resources_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decision = {
                let mut state = self.state();
                if !state.jobs.is_running(request.job_id) {
                    return Err(ServiceError::new(
                        ServiceErrorKind::NotFound,
                        format!("job {} is not running", request.job_id),
                    ));
                }
                if state.recovering() {
                    // The ledger is not whole yet: the nodes of the old
                    // head are still telling what they hold.
                    Decision::Wait
                } else {
                    let live = state.live_nodes();
                    state.scheduler.request(&live, &request)
                }
            };
            match decision {
                Decision::Granted(lease) => {
                    self.metrics
                        .lease_latency
                        .observe(arrived.elapsed().as_secs_f64());
                    self.metrics.leases_granted.inc();
                    return Ok(HeadReply::LeaseGranted(lease));
                }
                Decision::Infeasible => return Ok(HeadReply::LeasePending { infeasible: true }),
                Decision::Abandoned => return Ok(HeadReply::LeasePending { infeasible: false }),
                Decision::Refused(reason) => return Ok(HeadReply::LeaseRefused { reason }),
                Decision::OwnerGone => {
                    return Err(ServiceError::new(
                        ServiceErrorKind::NotFound,
                        format!(
                            "the owner {} was reported dead, or its node is not alive",
                            request.owner
                        ),
                    ))
                }
                Decision::Wait => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(HeadReply::LeasePending { infeasible: false });
            }
        }
    }

    async fn create_group(&self, spec: PlacementGroupSpec) -> Result<HeadReply, ServiceError> {
        spec.check().map_err(|e| bad_request(e.to_string()))?;
        let id = spec.group_id;
        {
            let mut state = self.state();
            if !state.jobs.is_running(spec.job_id) {
                return Err(ServiceError::new(
                    ServiceErrorKind::NotFound,
                    format!("job {} is not running", spec.job_id),
                ));
            }
            let added = state.groups.add(&spec).map_err(|e| {
                let kind = match e {
                    crate::groups::GroupError::NameTaken(_) => ServiceErrorKind::BadRequest,
                    crate::groups::GroupError::TooMany(_) => ServiceErrorKind::Unavailable,
                };
                ServiceError::new(kind, e.to_string())
            })?;
            if added {
                state.scheduler.add_group(&spec);
                info!(group = %id, strategy = %spec.strategy, bundles = spec.bundles.len(), name = ?spec.name, "placement group created");
            }
        }
        self.place_groups(Some(vec![id])).await?;
        let info = self.state().group_info(id);
        info.map(|i| HeadReply::PlacementGroup(Box::new(i)))
            .ok_or_else(|| {
                ServiceError::new(
                    ServiceErrorKind::NotFound,
                    format!("placement group {id} is gone"),
                )
            })
    }

    /// Reserves bundles for the groups `ids` (or for every group with a
    /// bundle to place), in two phases: each group's unplaced bundles are
    /// prepared on nodes together (or none are), the store is given what
    /// was decided, and once it is durable the prepared groups are
    /// committed, unless a node holding a prepared bundle died meanwhile
    /// (the reservation was aborted; it is tried again).
    pub(crate) async fn place_groups(
        &self,
        ids: Option<Vec<PlacementGroupId>>,
    ) -> Result<(), ServiceError> {
        let prepared = {
            let mut state = self.state();
            let ids = ids.unwrap_or_else(|| state.scheduler.groups_to_place());
            state.prepare_groups(ids)
        };
        if prepared.is_empty() {
            return Ok(());
        }
        let durable = self.durable(false).await;
        {
            let mut state = self.state();
            for id in prepared {
                if durable.is_ok() && state.scheduler.commit_group(id) {
                    info!(group = %id, "placement group's bundles reserved");
                } else {
                    // Not written, or a node holding one of its bundles
                    // died meanwhile: what was prepared goes back, and the
                    // placer prepares it again.
                    state.scheduler.abort_group(id);
                }
            }
            // Restarts waiting for a bundle may fit now.
            state.place_restarts();
        }
        self.groups_changed.notify_waiters();
        self.resources_changed.notify_waiters();
        durable
    }

    /// A group's record once it is created or removed, or after `wait_ms`.
    async fn wait_group(
        &self,
        id: PlacementGroupId,
        wait_ms: u64,
    ) -> Result<HeadReply, ServiceError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(wait_ms).min(LEASE_WAIT_MAX);
        loop {
            let notified = self.groups_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let info = self.state().group_info(id).ok_or_else(|| {
                ServiceError::new(
                    ServiceErrorKind::NotFound,
                    format!("no placement group {id}"),
                )
            })?;
            let settled = matches!(info.state, GroupState::Created | GroupState::Removed);
            if settled || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(HeadReply::PlacementGroup(Box::new(info)));
            }
        }
    }

    /// After a node of the old head joined again or was declared dead:
    /// once none is awaited, the ledger is whole and leases and restarts
    /// are placed again.
    fn recovery_step(&self, was_recovering: bool, state: &mut State) {
        if was_recovering && !state.recovering() {
            info!("every node of the old head has joined again or been declared dead; granting leases");
            state.place_restarts();
            self.resources_changed.notify_waiters();
        }
    }

    /// True if `peer`'s connection speaks for `node_id` already, or is
    /// bound to it now because `key` is the key that node registered with
    /// (known only to it and the head). False: the node is not a live
    /// member (it is to register again, as a new node); refused: it is,
    /// under another key.
    fn bind_by_key(
        &self,
        peer: &Peer,
        state: &State,
        node_id: NodeId,
        key: u64,
    ) -> Result<bool, ServiceError> {
        if self.links().speaks_for(peer, node_id) {
            return Ok(true);
        }
        if key != 0 && state.membership.registered_with(key) == Some(node_id) {
            self.links().bind(peer, node_id);
            return Ok(true);
        }
        if state.membership.state(node_id) != Some(NodeState::Alive) {
            return Ok(false);
        }
        self.links().require(peer, node_id).map(|()| true)
    }

    /// A node of the old head joins this one again (see `crate::recovery`).
    fn rejoin_node(
        &self,
        peer: &Peer,
        rejoin: shoal_proto::head::RejoinNode,
    ) -> Result<HeadReply, ServiceError> {
        let node_id = rejoin.node_id;
        let cert = {
            let mut state = self.state();
            // Only the node itself knows the key it registered with (kept
            // in the old head's tables): another node cannot take its id.
            if !self.bind_by_key(peer, &state, node_id, rejoin.node.registration_key)? {
                return Ok(HeadReply::NodeFenced { node_id });
            }
            let was_recovering = state.recovering();
            let died = match state.rejoin(rejoin, Instant::now()) {
                Ok(died) => died,
                Err(Fenced(node_id)) => return Ok(HeadReply::NodeFenced { node_id }),
            };
            state.actors_died(died);
            self.recovery_step(was_recovering, &mut state);
            self.node_cert(node_id)?
        };
        self.resources_changed.notify_waiters();
        self.actors_changed.notify_waiters();
        Ok(self.welcome(node_id, cert))
    }

    fn finish_job(&self, job_id: shoal_proto::JobId) {
        let reclaimed = {
            let mut state = self.state();
            if !state.jobs.finish(job_id) {
                return;
            }
            // Its groups go with it (not detached ones), and what ran in
            // them, whoever's it was.
            for group in state.groups.of_job(job_id) {
                state.remove_group(group);
            }
            for (_, leases) in state.actors.job_finished(job_id) {
                for lease in leases {
                    state.scheduler.release(lease);
                }
            }
            state.scheduler.job_finished(job_id)
        };
        self.resources_changed.notify_waiters();
        self.actors_changed.notify_waiters();
        info!(%job_id, leases_reclaimed = reclaimed, "job finished");
    }
}

/// The state API (see `crate::state_api`).
impl HeadService {
    fn task_events(
        &self,
        batch: shoal_proto::state::EventBatch,
    ) -> Result<HeadReply, ServiceError> {
        use shoal_proto::state::{EARLIER_MAX, EVENTS_PER_BATCH_MAX, EVENT_TEXT_MAX};
        let (events, names) = (&batch.events, &batch.names);
        if events.len() > EVENTS_PER_BATCH_MAX || names.len() > EVENTS_PER_BATCH_MAX {
            return Err(bad_request(format!(
                "{} task events and {} names in one batch; at most {EVENTS_PER_BATCH_MAX} of each",
                events.len(),
                names.len()
            )));
        }
        let too_long = names.iter().any(|n| n.len() > EVENT_TEXT_MAX)
            || events.iter().any(|e| {
                e.error.as_ref().is_some_and(|t| t.len() > EVENT_TEXT_MAX)
                    || e.earlier.len() > EARLIER_MAX
            });
        if too_long {
            return Err(bad_request(format!(
                "a task event's name or error is over {EVENT_TEXT_MAX} bytes, or it carries more than {EARLIER_MAX} earlier states"
            )));
        }
        let unnamed = events
            .iter()
            .filter_map(|e| e.info.as_ref())
            .any(|i| i.name as usize >= names.len());
        if unnamed {
            return Err(bad_request("a task event names none of its batch's names"));
        }
        for e in events {
            if let (true, Some((start, end))) = (e.state.is_final(), e.ran_us) {
                let seconds = end.saturating_sub(start) as f64 / 1e6;
                self.metrics.task_duration.observe(seconds);
            }
        }
        self.tasks.locked().record(batch);
        Ok(HeadReply::EventsTaken)
    }

    /// What `shoal list` and `shoal get` show (and the dashboard).
    pub fn list_state(
        &self,
        query: &shoal_proto::state::StateQuery,
    ) -> Result<HeadReply, ServiceError> {
        use crate::state_api::{self, Snapshot};
        use shoal_proto::state::StateKind;
        state_api::check(query).map_err(|e| bad_request(e.to_string()))?;
        let snapshot = match query.kind {
            StateKind::Tasks => {
                let rows = state_api::list_tasks(query, &self.tasks.locked());
                return Ok(HeadReply::State(Box::new(rows)));
            }
            StateKind::Nodes => Snapshot::Nodes(self.status().nodes),
            StateKind::Jobs => {
                let state = self.state();
                Snapshot::Jobs(state.jobs.iter().map(|(id, j)| (id, j.clone())).collect())
            }
            StateKind::Actors => Snapshot::Actors(self.state().actors.all()),
            StateKind::Workers => {
                let state = self.state();
                let rows = state
                    .scheduler
                    .leases()
                    .map(|l| {
                        let actor = state.actors.with_lease(l.lease_id);
                        state_api::worker_row(&l, actor)
                    })
                    .collect();
                Snapshot::Workers(rows)
            }
            StateKind::Objects => Snapshot::Objects(self.state().objects.list()),
            StateKind::PlacementGroups => {
                let state = self.state();
                let groups = state.groups.ids();
                Snapshot::PlacementGroups(
                    groups
                        .into_iter()
                        .filter_map(|id| state.group_info(id))
                        .collect(),
                )
            }
        };
        Ok(HeadReply::State(Box::new(state_api::list(query, snapshot))))
    }

    /// What `shoal summary` shows.
    pub fn summarize(
        &self,
        kind: shoal_proto::state::StateKind,
    ) -> Result<HeadReply, ServiceError> {
        use crate::state_api;
        use shoal_proto::state::StateKind;
        let rows = match kind {
            StateKind::Tasks => state_api::summarize_tasks(&self.tasks.locked()),
            StateKind::Actors => state_api::summarize_actors(&self.state().actors.all()),
            StateKind::Objects => state_api::summarize_objects(&self.state().objects.list()),
            other => {
                return Err(bad_request(format!(
                    "no summary of {}: summarize tasks, actors or objects",
                    other.name()
                )))
            }
        };
        Ok(HeadReply::State(Box::new(rows)))
    }

    /// How many kept tasks are in each state (for metrics).
    pub fn task_counts(&self) -> HashMap<shoal_proto::state::TaskState, u64> {
        self.tasks.locked().count_by_state()
    }

    /// Task events lost before the head kept them.
    pub fn task_events_lost(&self) -> u64 {
        self.tasks.locked().lost()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Longest address or hostname accepted (resource sets are bounded by
/// `ResourceSet::validate`).
const NAME_BYTES_MAX: usize = 256;

fn check_registration(info: &RegisterNode) -> Result<(), ServiceError> {
    if info.address.len() > NAME_BYTES_MAX
        || info
            .metrics_address
            .as_ref()
            .is_some_and(|a| a.len() > NAME_BYTES_MAX)
        || info.hostname.len() > NAME_BYTES_MAX
        || info.host_id.len() > NAME_BYTES_MAX
    {
        return Err(bad_request(format!(
            "addresses, hostname and host id are limited to {NAME_BYTES_MAX} bytes each"
        )));
    }
    shoal_proto::placement::check_labels(&info.labels).map_err(|e| bad_request(e.to_string()))?;
    info.resources_total
        .validate()
        .map_err(|e| bad_request(e.to_string()))
}

/// A reply the head owes a node (to a registration, rejoin or heartbeat)
/// while it waits for its store (see
/// [`crate::membership::Membership::owe_reply`]); settled when dropped,
/// sent or not.
struct OwedReply<'a> {
    service: &'a HeadService,
    node_id: NodeId,
}

impl<'a> OwedReply<'a> {
    fn new(service: &'a HeadService, node_id: NodeId) -> Self {
        service.state().membership.owe_reply(node_id);
        Self { service, node_id }
    }
}

impl Drop for OwedReply<'_> {
    fn drop(&mut self) {
        self.service
            .state()
            .membership
            .replied(self.node_id, Instant::now());
    }
}

impl Service for HeadService {
    type Request = HeadRequest;
    type Reply = HeadReply;

    async fn handle(&self, peer: &Peer, request: HeadRequest) -> Result<HeadReply, ServiceError> {
        // Who may send what: the one table, `shoal_proto::HEAD_RPCS`.
        peer.require(request.rpc().roles)?;
        // Task events change no table the store keeps: nothing to wait for.
        if matches!(request, HeadRequest::TaskEvents(_)) {
            return self.serve(peer, request).await;
        }
        let uploaded = matches!(request, HeadRequest::UploadBinary { .. });
        let beat_of = match &request {
            HeadRequest::Heartbeat { node_id, .. } => Some(*node_id),
            _ => None,
        };
        let reply = self.serve(peer, request).await;
        // A node waits for the reply to its registration, rejoin or
        // heartbeat before it heartbeats again: it is not silent while that
        // reply waits for the store (settled even if the reply is dropped).
        let owed_to = match (&reply, beat_of) {
            (Ok(HeadReply::HeartbeatAck { .. }), Some(node_id)) => Some(node_id),
            (Ok(HeadReply::NodeRegistered(registered)), _) => Some(registered.node_id),
            _ => None,
        };
        let _owed = owed_to.map(|node_id| OwedReply::new(self, node_id));
        // Whatever the answer, it goes out only once what it saw is
        // durable.
        self.durable(uploaded).await?;
        reply
    }

    /// A driver's jobs end with its connection.
    fn disconnected(&self, peer: &Peer) {
        self.links().forget(peer);
        if peer.role != Role::Driver {
            return;
        }
        let jobs = self.state().jobs.registered_on(peer.connection_id);
        for job in jobs {
            self.finish_job(job);
        }
    }
}

impl HeadService {
    async fn serve(&self, peer: &Peer, request: HeadRequest) -> Result<HeadReply, ServiceError> {
        match request {
            HeadRequest::RegisterNode(info) => self.register_node(peer, info),
            HeadRequest::Heartbeat {
                node_id,
                resources_available,
                jobs,
                dead_workers,
                object_store_used_bytes,
                object_changes,
                objects_pulled,
                orders_acked,
                registration_key,
            } => {
                self.metrics.heartbeats.inc();
                resources_available
                    .validate()
                    .map_err(|e| bad_request(e.to_string()))?;
                let mut state = self.state();
                if state.rejoining.contains(&node_id) {
                    return Ok(HeadReply::RejoinAsked { node_id });
                }
                // A connection that replaced a lost one: the node's key
                // binds it.
                if !self.bind_by_key(peer, &state, node_id, registration_key)? {
                    return Ok(HeadReply::NodeFenced { node_id });
                }
                match state.membership.heartbeat(
                    node_id,
                    resources_available,
                    object_store_used_bytes,
                    Instant::now(),
                ) {
                    Ok(()) => {
                        state.membership.set_objects_pulled(node_id, objects_pulled);
                        let orphans = state.objects.apply(
                            node_id,
                            &object_changes[..object_changes.len().min(100_000)],
                        );
                        for (holder, id) in orphans {
                            state.orders.entry(holder).or_default().delete(id);
                        }
                        let dead_workers = &dead_workers[..dead_workers.len().min(10_000)];
                        let mut reclaimed = 0;
                        for worker in dead_workers {
                            reclaimed += state.scheduler.owner_died_on(node_id, *worker);
                        }
                        state.order_orphan_releases(false);
                        let died = state.actors.workers_died(node_id, dead_workers);
                        let actors_died = !died.is_empty();
                        reclaimed += usize::from(state.actors_died(died));
                        if actors_died {
                            state.place_restarts();
                        }
                        let finished_jobs = state.jobs.not_running(&jobs[..jobs.len().min(10_000)]);
                        let orders = state.orders.entry(node_id).or_default();
                        orders.acked(orders_acked);
                        let pending = orders.pending();
                        drop(state);
                        if reclaimed > 0 {
                            self.resources_changed.notify_waiters();
                        }
                        if actors_died {
                            self.actors_changed.notify_waiters();
                        }
                        Ok(HeadReply::HeartbeatAck {
                            finished_jobs,
                            restart_actors: pending.restarts,
                            delete_objects: pending.deletes,
                            release_leases: pending.releases,
                            orders_seq: pending.seq,
                        })
                    }
                    Err(Fenced(node_id)) => Ok(HeadReply::NodeFenced { node_id }),
                }
            }
            HeadRequest::UnregisterNode {
                node_id,
                registration_key,
            } => {
                let left = {
                    let mut state = self.state();
                    if !self.bind_by_key(peer, &state, node_id, registration_key)? {
                        // Not a live member: nothing to leave.
                        return Ok(HeadReply::NodeUnregistered);
                    }
                    let left = state.membership.unregister(node_id);
                    state.node_gone(node_id);
                    left
                };
                if left {
                    info!(%node_id, "node left");
                    self.resources_changed.notify_waiters();
                    self.actors_changed.notify_waiters();
                }
                Ok(HeadReply::NodeUnregistered)
            }
            HeadRequest::GetClusterStatus => Ok(HeadReply::ClusterStatus(self.status())),
            HeadRequest::RegisterJob(job) => {
                if job.binary_size > crate::binaries::BINARY_BYTES_MAX {
                    return Err(bad_request("executable too large"));
                }
                let job_id = self.state().jobs.register(&job, peer.connection_id);
                let binary_present = self.binaries().has(&job.binary_hash);
                info!(%job_id, driver = %job.driver.address, pid = job.driver_pid, submitted = job.job_id.is_some(), "job started");
                Ok(HeadReply::JobRegistered {
                    job_id,
                    binary_present,
                })
            }
            HeadRequest::UploadBinary {
                hash,
                offset,
                total,
                data,
            } => {
                // Drivers upload their executable, `shoal job submit` a
                // program and a working directory.
                use crate::binaries::{Part, UploadError};
                let refused = |e: UploadError| match e {
                    UploadError::Busy { .. } => {
                        ServiceError::new(ServiceErrorKind::Unavailable, e.to_string())
                    }
                    e => bad_request(e.to_string()),
                };
                let part = self
                    .binaries()
                    .take_part(&hash, offset, total, &data)
                    .map_err(refused)?;
                let complete = match part {
                    Part::More => false,
                    Part::Stored => true,
                    Part::Whole(whole) => {
                        // Hashed and written with the lock let go, off the
                        // runtime's threads: heartbeats go on meanwhile.
                        let kept = tokio::task::spawn_blocking(move || whole.check_and_keep())
                            .await
                            .map_err(|e| {
                                ServiceError::new(ServiceErrorKind::Internal, e.to_string())
                            })?
                            .map_err(refused)?;
                        self.binaries().hold_kept(kept);
                        true
                    }
                };
                Ok(HeadReply::BinaryStored { complete })
            }
            HeadRequest::FetchBinary { hash, offset, len } => {
                // Read with the executables' lock let go.
                let stored = self.binaries().stored(&hash);
                let (total, data) = stored
                    .and_then(|s| s.read_at(offset, len.min(BINARY_CHUNK_MAX)))
                    .ok_or_else(|| {
                        ServiceError::new(
                            ServiceErrorKind::NotFound,
                            format!("no executable {hash}"),
                        )
                    })?;
                Ok(HeadReply::BinaryChunk { total, data })
            }
            HeadRequest::RequestLease(request) => self.request_lease(request).await,
            HeadRequest::ReturnLease { lease_id } => {
                if self.state().scheduler.release(lease_id) {
                    self.resources_changed.notify_waiters();
                }
                Ok(HeadReply::LeaseReturned)
            }
            HeadRequest::LeaseBlocked { lease_id, blocked } => {
                let mut state = self.state();
                // Only the node that runs the lease's worker says so.
                if let Some(node_id) = state.scheduler.lease_node(lease_id) {
                    self.links().require(peer, node_id)?;
                }
                let changed = state.scheduler.set_blocked(lease_id, blocked);
                drop(state);
                if changed && blocked {
                    self.resources_changed.notify_waiters();
                }
                Ok(HeadReply::LeaseReturned)
            }
            HeadRequest::RegisterActor { info, spec } => {
                if info.name.as_ref().is_some_and(|n| n.len() > NAME_BYTES_MAX)
                    || info.namespace.len() > NAME_BYTES_MAX
                {
                    return Err(bad_request(format!(
                        "actor names and namespaces are limited to {NAME_BYTES_MAX} bytes"
                    )));
                }
                spec.resources
                    .validate()
                    .map_err(|e| bad_request(e.to_string()))?;
                spec.env.check().map_err(bad_request)?;
                let mut state = self.state();
                if info.detached {
                    state.scheduler.detach(info.lease_id);
                }
                state
                    .actors
                    .register(info.clone(), *spec)
                    .map_err(|e| bad_request(e.to_string()))?;
                Ok(HeadReply::Actor(info))
            }
            HeadRequest::GetActor {
                actor_id,
                known_incarnation,
                wait_ms,
            } => {
                self.get_actor(actor_id, known_incarnation, Duration::from_millis(wait_ms))
                    .await
            }
            HeadRequest::ActorRestarted {
                node_id,
                actor_id,
                incarnation,
                worker,
                pid,
                failure,
            } => {
                self.links().require(peer, node_id)?;
                let (created, failed) = match (worker, failure) {
                    (Some(worker), None) => (Some((worker, pid)), None),
                    (_, failure) => (None, Some(failure.unwrap_or_else(|| "no worker".into()))),
                };
                let (info, release) = {
                    let mut state = self.state();
                    let address = state
                        .live_nodes()
                        .into_iter()
                        .find(|n| n.node_id == node_id)
                        .map(|n| n.address)
                        .unwrap_or_default();
                    let (info, release) =
                        state
                            .actors
                            .restarted(node_id, &address, actor_id, incarnation, created);
                    for lease in &release {
                        state.scheduler.release(*lease);
                    }
                    if let (Some(info), Some(why)) = (&info, failed) {
                        warn!(%actor_id, class = %info.class, %why, "actor restart failed; the actor is dead");
                    }
                    (info, release)
                };
                if !release.is_empty() {
                    self.resources_changed.notify_waiters();
                }
                let mut accepted = false;
                if let Some(info) = &info {
                    if info.state == ActorState::Alive {
                        accepted = true;
                        info!(%actor_id, class = %info.class, incarnation, node = %node_id, pid = info.pid, "actor restarted");
                    }
                    self.actors_changed.notify_waiters();
                }
                Ok(HeadReply::RestartAccepted { accepted })
            }
            HeadRequest::GetNamedActor { namespace, name } => {
                let state = self.state();
                let info = state
                    .actors
                    .named(&namespace, &name)
                    .cloned()
                    .ok_or_else(|| {
                        ServiceError::new(
                            ServiceErrorKind::NotFound,
                            format!("no live actor named {name:?} in namespace {namespace:?}"),
                        )
                    })?;
                Ok(HeadReply::Actor(info))
            }
            HeadRequest::CreatePlacementGroup(spec) => self.create_group(*spec).await,
            HeadRequest::WaitPlacementGroup { group_id, wait_ms } => {
                self.wait_group(group_id, wait_ms).await
            }
            HeadRequest::RemovePlacementGroup { group_id } => {
                let info = {
                    let mut state = self.state();
                    state.remove_group(group_id);
                    state.group_info(group_id)
                };
                let info = info.ok_or_else(|| {
                    ServiceError::new(
                        ServiceErrorKind::NotFound,
                        format!("no placement group {group_id}"),
                    )
                })?;
                self.groups_changed.notify_waiters();
                self.resources_changed.notify_waiters();
                self.actors_changed.notify_waiters();
                Ok(HeadReply::PlacementGroup(Box::new(info)))
            }
            HeadRequest::GetNamedPlacementGroup { name } => {
                let state = self.state();
                state
                    .groups
                    .named(&name)
                    .and_then(|id| state.group_info(id))
                    .map(|info| HeadReply::PlacementGroup(Box::new(info)))
                    .ok_or_else(|| {
                        ServiceError::new(
                            ServiceErrorKind::NotFound,
                            format!("no placement group named {name:?}"),
                        )
                    })
            }
            HeadRequest::KillActor {
                actor_id,
                no_restart,
            } => {
                let not_found = || {
                    ServiceError::new(
                        ServiceErrorKind::NotFound,
                        format!("no live actor {actor_id}"),
                    )
                };
                if !no_restart {
                    // The caller stops the worker; its death restarts the
                    // actor if it has restarts left.
                    let info = self
                        .state()
                        .actors
                        .get(actor_id)
                        .filter(|a| a.state != ActorState::Dead)
                        .cloned()
                        .ok_or_else(not_found)?;
                    info!(%actor_id, class = %info.class, "actor's worker killed (restart allowed)");
                    return Ok(HeadReply::Actor(info));
                }
                let killed = {
                    let mut state = self.state();
                    let killed = state.actors.kill(actor_id);
                    if let Some((_, leases)) = &killed {
                        for lease in leases {
                            state.scheduler.release(*lease);
                        }
                    }
                    killed
                };
                let Some((info, _)) = killed else {
                    // Killed already (a retried request whose reply was
                    // lost): the answer is the same.
                    let dead = self
                        .state()
                        .actors
                        .get(actor_id)
                        .filter(|a| a.state == ActorState::Dead)
                        .cloned()
                        .ok_or_else(not_found)?;
                    return Ok(HeadReply::Actor(dead));
                };
                self.resources_changed.notify_waiters();
                self.actors_changed.notify_waiters();
                info!(%actor_id, class = %info.class, "actor killed");
                Ok(HeadReply::Actor(info))
            }
            HeadRequest::ListActors => Ok(HeadReply::Actors(self.state().actors.list())),
            HeadRequest::ListState(query) => self.list_state(&query),
            HeadRequest::Summarize(kind) => self.summarize(kind),
            HeadRequest::TaskEvents(batch) => self.task_events(*batch),
            HeadRequest::ListObjects => Ok(HeadReply::Objects(self.state().objects.list())),
            HeadRequest::LocateObject { id } => {
                let state = self.state();
                let copies = state
                    .objects
                    .copies(id)
                    .into_iter()
                    .filter_map(|(node_id, size)| {
                        Some(shoal_proto::StoredAt {
                            node_id,
                            node_address: state.membership.address(node_id)?.to_string(),
                            size,
                        })
                    })
                    .collect();
                Ok(HeadReply::ObjectLocations(copies))
            }
            HeadRequest::WatchNodeDeaths { after, wait_ms } => {
                let wait = Duration::from_millis(wait_ms).min(LEASE_WAIT_MAX);
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    // Every node death wakes `actors_changed` (its actors die
                    // or restart); registered before looking.
                    let notified = self.actors_changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let (seq, nodes) = self.state().membership.deaths_after(after);
                    // `seq < after`: this head restarted since the caller's
                    // count; it moves to this head's.
                    if !nodes.is_empty()
                        || seq < after
                        || tokio::time::timeout_at(deadline, notified).await.is_err()
                    {
                        return Ok(HeadReply::NodeDeaths { seq, nodes });
                    }
                }
            }
            HeadRequest::RejoinNode(rejoin) => {
                check_registration(&rejoin.node)?;
                self.rejoin_node(peer, *rejoin)
            }
            HeadRequest::KvPut {
                namespace,
                key,
                value,
                overwrite,
            } => {
                let changed = self
                    .state()
                    .kv
                    .put(&namespace, &key, value, overwrite)
                    .map_err(|e| bad_request(e.to_string()))?;
                Ok(HeadReply::KvWritten { changed })
            }
            HeadRequest::KvGet { namespace, key } => {
                let value = self.state().kv.get(&namespace, &key).cloned();
                Ok(HeadReply::KvValue(value))
            }
            HeadRequest::KvDelete { namespace, key } => {
                let changed = self.state().kv.delete(&namespace, &key);
                Ok(HeadReply::KvWritten { changed })
            }
            HeadRequest::KvKeys { namespace, prefix } => {
                Ok(HeadReply::KvKeys(self.state().kv.keys(&namespace, &prefix)))
            }
            HeadRequest::FinishJob { job_id } => {
                self.finish_job(job_id);
                Ok(HeadReply::JobFinished)
            }
            HeadRequest::SubmitJob(submission) => self.submit_job(*submission),
            HeadRequest::JobLogs {
                job_id,
                offset,
                len,
            } => self.job_log(job_id, offset, len),
            HeadRequest::StopJob { job_id } => self.stop_job(job_id),
        }
    }
}

fn not_submitted(job_id: JobId) -> ServiceError {
    ServiceError::new(
        ServiceErrorKind::NotFound,
        format!("no submitted job {job_id} (only jobs started by `shoal job submit` have output and can be stopped)"),
    )
}

/// Refuses a submission the head could not run as given.
fn check_submission(s: &JobSubmission) -> Result<(), ServiceError> {
    // A file name, as Linux allows it.
    const PROGRAM_NAME_MAX: usize = 255;
    let name = &s.program;
    if name.is_empty()
        || name.len() > PROGRAM_NAME_MAX
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
    {
        return Err(bad_request(format!(
            "{name:?} is not a program file name (1 to {PROGRAM_NAME_MAX} bytes, no '/')"
        )));
    }
    let mut hashes = std::iter::once(&s.program_hash).chain(s.working_dir_hash.as_ref());
    if let Some(bad) = hashes.find(|h| !is_sha256_hex(h)) {
        return Err(bad_request(format!("{bad:?} is not a hex SHA-256")));
    }
    let strings = s.args.len() + s.env.len();
    let bytes: usize = s.args.iter().map(String::len).sum::<usize>()
        + s.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if strings > SUBMIT_STRINGS_MAX || bytes > SUBMIT_BYTES_MAX {
        return Err(bad_request(format!(
            "arguments and environment are limited to {SUBMIT_STRINGS_MAX} strings and {SUBMIT_BYTES_MAX} bytes"
        )));
    }
    if s.args.iter().any(|a| a.contains('\0')) {
        return Err(bad_request("an argument contains a NUL byte"));
    }
    if let Some((key, _)) = s
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(bad_request(format!(
            "environment variable {key:?}: names are not empty and hold no '=' or NUL, values no NUL"
        )));
    }
    Ok(())
}
