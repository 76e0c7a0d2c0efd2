//! Worker leases, per scheduling class (a resource shape).
//!
//! A task needs a worker holding its resources. The lease manager keeps, per
//! class, the leased workers (with the tasks in flight to each) and the tasks
//! waiting for one. When tasks wait and too few lease requests are in flight,
//! it asks the head for more (the head long-polls while the cluster is full);
//! a granted lease is turned into a worker by the lease's node, and the
//! worker then runs the class's tasks one after another, with no head on the
//! path. A task waits for an idle worker (so tasks spread over the CPUs),
//! with one exception: once the cluster is full (the head says so with the
//! grant, or by holding a request) a task may be pushed to a busy worker
//! whose tasks are all of functions whose last runs were short, up to
//! [`PIPELINE_DEPTH`], so the next task is there when one ends. Nothing
//! queues behind a task that may run long: it would wait while another
//! worker may be free (head-of-line blocking). A worker that dies fails (or
//! retries) every task in flight to it. Leases idle for a while are handed
//! back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shoal_proto::head::{Lease, LeaseRequest};
use shoal_proto::{HeadReply, HeadRequest, NodeReply, NodeRequest, ResourceSet, WorkerId};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::core::{Core, NodeClient, WorkerClient};

/// Lease requests in flight per class.
const REQUESTS_IN_FLIGHT_MAX: usize = 8;
/// Tasks pushed to one leased worker at once: it runs them one after
/// another, and the next is already there when one ends (no round trip
/// between tasks).
const PIPELINE_DEPTH: usize = 16;
/// A lease idle this long is returned.
/// Long enough to keep a lease across a submit-get-submit loop, short
/// enough that other owners (nested tasks) soon get the CPU back.
const IDLE_RETURN: Duration = Duration::from_millis(10);
/// How long the head may hold a lease request.
const LEASE_WAIT: Duration = Duration::from_secs(2);

/// A worker held under a lease.
pub(crate) struct LeasedWorker {
    pub(crate) lease: Lease,
    /// Its class's key (see [`class_key`]).
    class: String,
    pub(crate) worker_id: WorkerId,
    pub(crate) worker: WorkerClient,
    node: NodeClient,
    /// Cancelled when the worker's node says it has exited (or the node is
    /// unreachable): a task pushed to it is retried at once.
    pub(crate) lost: CancellationToken,
}

/// A leased worker as the lease manager holds it.
struct Held {
    worker: Arc<LeasedWorker>,
    /// Tasks pushed to it and not answered.
    in_flight: usize,
    /// Those of them whose function is not known to run short: nothing is
    /// queued behind such a task (it could run for hours while another
    /// worker is free).
    unsure: usize,
    /// When its last task was answered, while it has none.
    idle_since: Option<Instant>,
}

/// What kind of task takes a place: whether tasks may queue behind it.
#[derive(Clone, Copy)]
pub(crate) struct TaskKind(Option<&'static crate::registry::Entry>);

impl TaskKind {
    /// A task of the function registered under `name` (unknown functions
    /// are never short).
    pub(crate) fn of(name: &str) -> Self {
        TaskKind(crate::registry::entry(name))
    }

    /// Decided when the task takes its place, from the function's last runs.
    fn short(self) -> bool {
        self.0.is_some_and(|e| e.is_short())
    }

    /// Records how long a run took, as its worker reported (a worker that
    /// does not say teaches nothing).
    pub(crate) fn ran_for(self, run_us: Option<u64>) {
        if let (Some(entry), Some(run_us)) = (self.0, run_us) {
            entry.ran_for(run_us);
        }
    }
}

/// A task's place on a leased worker.
pub(crate) struct Place {
    pub(crate) worker: Arc<LeasedWorker>,
    /// Tasks may queue behind this one (see [`TaskKind`]).
    short: bool,
}

#[derive(Default)]
struct Class {
    workers: Vec<Held>,
    waiters: VecDeque<(oneshot::Sender<Place>, TaskKind)>,
    requesting: usize,
    infeasible_reported: bool,
    /// The cluster had no room for another worker of the class when last
    /// asked: short tasks queue on the workers held instead of waiting for
    /// one.
    saturated: bool,
    /// Leases granted by the head whose workers are still being started:
    /// no task is queued behind another until they have arrived.
    granting: usize,
}

impl Class {
    /// Tasks that would start sooner with another lease: the ones waiting
    /// for a worker and the ones queued behind another task on one. (A
    /// waiter whose task was dropped counts until a worker is offered to
    /// it: looking at each would make a million queued tasks quadratic.)
    fn backlog(&self) -> usize {
        let queued: usize = self
            .workers
            .iter()
            .map(|h| h.in_flight.saturating_sub(1))
            .sum();
        self.waiters.len() + queued
    }

    /// A place for the next task: an idle worker; or, when no other worker
    /// can be had (the cluster is full and none is being started), the
    /// least loaded worker whose tasks in flight are all short, up to
    /// [`PIPELINE_DEPTH`]. A task never queues behind one that may run
    /// long: it waits for a worker to be free instead, as in Ray, which
    /// dropped pipelining for this.
    fn find_place(&self) -> Option<usize> {
        if let Some(idle) = self.workers.iter().position(|h| h.in_flight == 0) {
            return Some(idle);
        }
        if !self.saturated || self.granting > 0 {
            return None;
        }
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, h)| h.unsure == 0 && h.in_flight < PIPELINE_DEPTH)
            .min_by_key(|(_, h)| h.in_flight)
            .map(|(at, _)| at)
    }

    /// Takes the place at `at` for a task of `kind`.
    fn take(&mut self, at: usize, kind: TaskKind) -> Place {
        let short = kind.short();
        let held = &mut self.workers[at];
        held.in_flight += 1;
        held.unsure += usize::from(!short);
        held.idle_since = None;
        Place {
            worker: Arc::clone(&held.worker),
            short,
        }
    }

    /// Takes a worker out of the class (to give its lease back): the
    /// cluster has room again, as far as this class knows.
    fn remove(&mut self, at: usize) -> Arc<LeasedWorker> {
        self.saturated = false;
        self.workers.swap_remove(at).worker
    }

    fn position(&self, lease_id: shoal_proto::LeaseId) -> Option<usize> {
        self.workers
            .iter()
            .position(|h| h.worker.lease.lease_id == lease_id)
    }

    fn held(&mut self, lease_id: shoal_proto::LeaseId) -> Option<&mut Held> {
        let at = self.position(lease_id)?;
        Some(&mut self.workers[at])
    }

    /// Hands places on the class's workers to waiting tasks, in order.
    fn serve_waiters(&mut self) {
        while !self.waiters.is_empty() {
            let Some(at) = self.find_place() else {
                return;
            };
            // The first waiter still there takes it (a dropped task's
            // waiter is skipped).
            while let Some((waiter, kind)) = self.waiters.pop_front() {
                let place = self.take(at, kind);
                match waiter.send(place) {
                    Ok(()) => break,
                    Err(place) => {
                        self.put_back(&place);
                    }
                }
            }
        }
    }

    /// Undoes [`take`](Self::take): the place is free again. False if its
    /// worker is no longer held.
    fn put_back(&mut self, place: &Place) -> bool {
        let Some(held) = self.held(place.worker.lease.lease_id) else {
            return false;
        };
        held.in_flight = held.in_flight.saturating_sub(1);
        held.unsure = held.unsure.saturating_sub(usize::from(!place.short));
        true
    }
}

/// The lease manager.
#[derive(Default)]
pub(crate) struct LeaseManager {
    classes: Mutex<HashMap<String, Class>>,
}

fn class_key(resources: &ResourceSet) -> String {
    resources.iter().map(|(k, v)| format!("{k}={v};")).collect()
}

impl LeaseManager {
    fn classes(&self) -> MutexGuard<'_, HashMap<String, Class>> {
        self.classes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place on a worker for one task of `resources`' class: the worker
    /// runs its tasks one at a time, this one after those pushed before it
    /// (only ever short ones). Hand it back with [`release`](Self::release)
    /// or [`discard`](Self::discard).
    pub(crate) async fn acquire(
        &self,
        core: &Arc<Core>,
        resources: &ResourceSet,
        kind: TaskKind,
    ) -> Place {
        loop {
            let rx = {
                let key = class_key(resources);
                let mut classes = self.classes();
                let class = classes.entry(key.clone()).or_default();
                let placed = match class.find_place() {
                    Some(at) => Ok(class.take(at, kind)),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        class.waiters.push_back((tx, kind));
                        Err(rx)
                    }
                };
                // Queued work asks for more workers (the head holds the
                // request while the cluster is full).
                if class.requesting < class.backlog().min(REQUESTS_IN_FLIGHT_MAX) {
                    class.requesting += 1;
                    let core = Arc::clone(core);
                    let resources = resources.clone();
                    core.handle
                        .clone()
                        .spawn(async move { request_leases(core, key, resources).await });
                }
                match placed {
                    Ok(place) => return place,
                    Err(rx) => rx,
                }
            };
            if let Ok(place) = rx.await {
                return place;
            }
        }
    }

    /// A newly leased worker joins its class.
    fn add(&self, core: &Arc<Core>, worker: LeasedWorker) {
        let lease_id = worker.lease.lease_id;
        let mut classes = self.classes();
        let class = classes.entry(worker.class.clone()).or_default();
        class.saturated = !worker.lease.room_for_another;
        class.granting = class.granting.saturating_sub(1);
        class.workers.push(Held {
            worker: Arc::new(worker),
            in_flight: 0,
            unsure: 0,
            idle_since: None,
        });
        class.serve_waiters();
        self.idle_check(core, class, lease_id);
    }

    /// A task's place is free again (its task was answered).
    pub(crate) fn release(&self, core: &Arc<Core>, place: &Place) {
        let lease_id = place.worker.lease.lease_id;
        let mut classes = self.classes();
        let Some(class) = classes.get_mut(&place.worker.class) else {
            return;
        };
        if !class.put_back(place) {
            return;
        }
        class.serve_waiters();
        self.idle_check(core, class, lease_id);
    }

    /// Starts the idle clock of a worker with nothing in flight: it is
    /// returned if no task takes it meanwhile (at once when stopping).
    fn idle_check(&self, core: &Arc<Core>, class: &mut Class, lease_id: shoal_proto::LeaseId) {
        let Some(at) = class
            .position(lease_id)
            .filter(|&at| class.workers[at].in_flight == 0)
        else {
            return;
        };
        if core.stopping.is_cancelled() {
            give_back(core, class.remove(at), false);
            return;
        }
        let held = &mut class.workers[at];
        let since = Instant::now();
        held.idle_since = Some(since);
        // Give the lease back if no task of the class takes it meanwhile.
        let core2 = Arc::clone(core);
        core.handle.spawn(async move {
            tokio::time::sleep(IDLE_RETURN).await;
            core2.leases.return_if_idle(&core2, lease_id, since);
        });
    }

    /// Counts a lease granted (`+1`) until its worker joins ([`add`]) or
    /// cannot be had (`-1`).
    ///
    /// [`add`]: Self::add
    fn granting(&self, key: &str, delta: isize) {
        let mut classes = self.classes();
        let class = classes.entry(key.to_string()).or_default();
        class.granting = class.granting.saturating_add_signed(delta);
        if delta < 0 {
            // Tasks held back for the worker that is not coming.
            class.serve_waiters();
        }
    }

    /// Gives up a worker that failed: it is stopped and its lease returned
    /// (once, however many of its tasks report it).
    pub(crate) fn discard(&self, core: &Arc<Core>, worker: &LeasedWorker) {
        let lease_id = worker.lease.lease_id;
        let removed = {
            let mut classes = self.classes();
            classes.get_mut(&worker.class).and_then(|class| {
                let at = class.position(lease_id)?;
                Some(class.remove(at))
            })
        };
        if let Some(worker) = removed {
            give_back(core, worker, true);
        }
    }

    /// Returns a lease still idle since `since`.
    fn return_if_idle(&self, core: &Arc<Core>, lease_id: shoal_proto::LeaseId, since: Instant) {
        let stale = {
            let mut classes = self.classes();
            classes.values_mut().find_map(|class| {
                let at = class.position(lease_id).filter(|&at| {
                    let held = &class.workers[at];
                    held.in_flight == 0 && held.idle_since == Some(since)
                })?;
                Some(class.remove(at))
            })
        };
        if let Some(worker) = stale {
            give_back(core, worker, false);
        }
    }

    /// Returns every idle lease (at shutdown).
    pub(crate) async fn return_all(&self, core: &Core) {
        let idle: Vec<Arc<LeasedWorker>> = {
            let mut classes = self.classes();
            classes
                .values_mut()
                .flat_map(|c| {
                    let (idle, busy) = std::mem::take(&mut c.workers)
                        .into_iter()
                        .partition::<Vec<_>, _>(|h| h.in_flight == 0);
                    c.workers = busy;
                    idle.into_iter().map(|h| h.worker)
                })
                .collect()
        };
        for worker in idle {
            return_lease(core, &worker, false).await;
        }
    }
}

fn give_back(core: &Arc<Core>, worker: Arc<LeasedWorker>, kill: bool) {
    let core2 = Arc::clone(core);
    core.handle
        .spawn(async move { return_lease(&core2, &worker, kill).await });
}

async fn return_lease(core: &Core, worker: &LeasedWorker, kill: bool) {
    // Ends the watcher too.
    worker.lost.cancel();
    release_lease(core, &worker.node, worker.lease.lease_id, kill).await;
}

/// Ends a lease: its node releases (or, with `kill`, stops) the worker, and
/// the head gets the resources back. Best effort: the head reclaims the
/// leases of finished jobs and dead nodes anyway.
pub(crate) async fn release_lease(
    core: &Core,
    node: &NodeClient,
    lease_id: shoal_proto::LeaseId,
    kill: bool,
) {
    let release = NodeRequest::ReleaseWorker { lease_id, kill };
    if let Err(e) = node.call_idempotent(&release, Duration::from_secs(5)).await {
        debug!(%lease_id, error = %e, "could not release the worker (its node may be gone)");
    }
    return_to_head(core, lease_id).await;
}

/// What a lease holder asks a lease's node for: a worker for the job.
pub(crate) fn grant_request(core: &Core, lease: &Lease, tenancy: (bool, bool)) -> NodeRequest {
    let (dedicated, detached) = tenancy;
    NodeRequest::GrantWorker {
        lease_id: lease.lease_id,
        job_id: core.job_id,
        binary_hash: core.binary_hash.clone(),
        resources: lease.resources.clone(),
        driver: Some(core.driver.clone()),
        dedicated,
        detached,
    }
}

/// Gives a lease back to the head (best effort: the head reclaims the
/// leases of finished jobs and dead nodes anyway).
pub(crate) async fn return_to_head(core: &Core, lease_id: shoal_proto::LeaseId) {
    let give_back = HeadRequest::ReturnLease { lease_id };
    if let Err(e) = core
        .head
        .call_idempotent(&give_back, Duration::from_secs(5))
        .await
    {
        debug!(%lease_id, error = %e, "could not return the lease");
    }
}

/// Asks the head for leases while tasks of the class wait.
async fn request_leases(core: Arc<Core>, key: String, resources: ResourceSet) {
    let mut backoff = Duration::from_millis(50);
    // One id per lease wanted, kept while tries of it fail: a retry after
    // a lost grant gets that grant, so no lease leaks.
    let mut request_id = fresh_request_id();
    let mut unanswered = false;
    loop {
        let waiting = {
            let classes = core.leases.classes();
            classes.get(&key).is_some_and(|c| c.backlog() > 0)
        };
        if !waiting || core.stopping.is_cancelled() {
            break;
        }
        let asked = lease_worker(&core, &key, &resources, request_id).await;
        unanswered = matches!(asked, Err(LeaseError::NoAnswer(_)));
        if !unanswered {
            request_id = fresh_request_id();
        }
        match asked {
            Ok(Some(worker)) => {
                backoff = Duration::from_millis(50);
                core.leases.add(&core, worker);
            }
            Ok(None) => {
                // The head held the request and the cluster stayed full.
                let mut classes = core.leases.classes();
                if let Some(class) = classes.get_mut(&key) {
                    class.saturated = true;
                    class.serve_waiters();
                }
            }
            Err(_) if core.stopping.is_cancelled() => break,
            Err(e) => {
                warn!(resources = ?resources, error = %e, "could not lease a worker; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    if unanswered {
        abandon_request(&core, lease_request(&core, &resources, request_id, 0)).await;
    }
    let mut classes = core.leases.classes();
    if let Some(class) = classes.get_mut(&key) {
        class.requesting = class.requesting.saturating_sub(1);
    }
}

/// A lease request from this process, as an owner.
pub(crate) fn lease_request(
    core: &Core,
    resources: &ResourceSet,
    request_id: u64,
    wait_ms: u64,
) -> LeaseRequest {
    LeaseRequest {
        job_id: core.job_id,
        owner: core.me.worker_id,
        resources: resources.clone(),
        preferred_node: Some(core.home.node_id),
        wait_ms,
        request_id,
        owner_node: core.hosting_node,
    }
}

/// Gives up a request whose last try got no answer: the head may have
/// granted it (the reply lost). Asked once more under its id without
/// waiting, the head answers with that grant, which is returned; else
/// nothing is held (best effort: the job's end reclaims the rest).
pub(crate) async fn abandon_request(core: &Core, mut request: LeaseRequest) {
    request.wait_ms = 0;
    let ask = HeadRequest::RequestLease(request);
    if let Ok(HeadReply::LeaseGranted(lease)) = core.head.call_idempotent(&ask, LEASE_WAIT).await {
        return_to_head(core, lease.lease_id).await;
    }
}

/// A new lease request's id (never 0, which means none).
pub(crate) fn fresh_request_id() -> u64 {
    shoal_proto::LeaseId::random().as_uuid().as_u64_pair().0 | 1
}

/// Why no worker came of a lease request.
#[derive(Debug)]
enum LeaseError {
    /// The head's answer did not arrive: ask again with the same request id.
    NoAnswer(String),
    /// Anything else (the lease, if one was granted, is given back).
    Failed(String),
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::NoAnswer(e) | LeaseError::Failed(e) => f.write_str(e),
        }
    }
}

/// One lease: granted by the head, turned into a worker by its node.
/// `Ok(None)` when the head had nothing yet.
async fn lease_worker(
    core: &Arc<Core>,
    key: &str,
    resources: &ResourceSet,
    request_id: u64,
) -> Result<Option<LeasedWorker>, LeaseError> {
    let request = HeadRequest::RequestLease(lease_request(
        core,
        resources,
        request_id,
        LEASE_WAIT.as_millis() as u64,
    ));
    let asked = std::time::Instant::now();
    let lease = match core
        .head
        .call(&request, LEASE_WAIT + Duration::from_secs(10))
        .await
    {
        Ok(HeadReply::LeaseGranted(lease)) => {
            debug!(lease_id = %lease.lease_id, node = %lease.node_id, waited = ?asked.elapsed(), "lease granted");
            core.leases.granting(key, 1);
            lease
        }
        Ok(HeadReply::LeasePending { infeasible }) => {
            debug!(infeasible, waited = ?asked.elapsed(), "no lease yet");
            if infeasible {
                let first = {
                    let mut classes = core.leases.classes();
                    let class = classes.entry(key.to_string()).or_default();
                    !std::mem::replace(&mut class.infeasible_reported, true)
                };
                if first {
                    warn!(resources = ?resources, "no node in the cluster can ever fit these resources; the task waits (see `shoal status`)");
                }
                tokio::time::sleep(LEASE_WAIT).await;
            }
            return Ok(None);
        }
        Ok(other) => {
            return Err(LeaseError::Failed(format!(
                "unexpected reply to a lease request: {other:?}"
            )))
        }
        Err(e) if e.is_worth_retrying() || e.is_connection_lost() => {
            return Err(LeaseError::NoAnswer(format!("lease request failed: {e}")))
        }
        Err(e) => return Err(LeaseError::Failed(format!("lease request failed: {e}"))),
    };
    let node = match core.node(&lease.node_address).await {
        Ok(node) => node,
        Err(e) => {
            core.leases.granting(key, -1);
            return_to_head(core, lease.lease_id).await;
            return Err(LeaseError::Failed(format!(
                "cannot reach node {}: {e}",
                lease.node_id
            )));
        }
    };
    let grant = grant_request(core, &lease, (false, false));
    // Idempotent per lease: a retry gets the worker the first try got.
    let worker = match node.call_idempotent(&grant, Duration::from_secs(90)).await {
        Ok(NodeReply::WorkerGranted { worker }) => worker,
        other => {
            // The node may have granted a worker we never heard of: it is
            // released there too, not only the lease at the head.
            core.leases.granting(key, -1);
            release_lease(core, &node, lease.lease_id, true).await;
            return Err(LeaseError::Failed(format!(
                "node {} gave no worker: {other:?}",
                lease.node_id
            )));
        }
    };
    let client = match core.worker(&worker.address).await {
        Ok(c) => c,
        Err(e) => {
            core.leases.granting(key, -1);
            release_lease(core, &node, lease.lease_id, true).await;
            return Err(LeaseError::Failed(format!(
                "cannot reach worker {}: {e}",
                worker.worker_id
            )));
        }
    };
    let lost = CancellationToken::new();
    core.watches.watch(
        core,
        &lease.node_address,
        Some(lease.node_id),
        worker.worker_id,
        lost.clone(),
    );
    Ok(Some(LeasedWorker {
        lease,
        class: key.to_string(),
        worker_id: worker.worker_id,
        worker: client,
        node,
        lost,
    }))
}
