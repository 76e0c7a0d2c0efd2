//! The shell of `owner::leases`: it asks the head for leases, turns them
//! into workers through their nodes, gives them back, and keeps the
//! machine's timers. Every decision is the machine's.

use shoal_net::sync::MutexExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_proto::head::{Lease, LeaseRequest};
use shoal_proto::{HeadReply, HeadRequest, NodeReply, NodeRequest, WorkerId};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::submit::{FirstPlace, Queued};
use super::{Core, NodeClient, WorkerClient};
use crate::owner::leases::{self, Answer, Ask, Command, Leases, Shape, LEASE_WAIT};

/// A worker held under a lease.
pub(crate) struct LeasedWorker {
    pub(crate) lease: Lease,
    pub(crate) worker_id: WorkerId,
    pub(crate) worker: WorkerClient,
    pub(crate) node: NodeClient,
    /// Cancelled when the worker's node says it has exited (or the node is
    /// unreachable): a task pushed to it is retried at once.
    pub(crate) lost: CancellationToken,
}

/// How long an owner keeps asking to give a lease request up: past it
/// (the head unreachable that long), the job's end reclaims any grant.
const ABANDON_FOR: Duration = Duration::from_secs(60);

/// A task's place on a leased worker.
pub(crate) type Place = leases::Place<Arc<LeasedWorker>>;

type Machine = Leases<Arc<LeasedWorker>, Waiter>;
type Commands = Vec<Command<Arc<LeasedWorker>, Waiter>>;

/// A task waiting for a place.
pub(crate) enum Waiter {
    /// A runtime task, woken with a place or why there will never be one.
    Task {
        tx: oneshot::Sender<Result<Place, String>>,
        kind: TaskKind,
    },
    /// A task held as its spec, which becomes a runtime task only when it
    /// gets its place (or is told it never will).
    Queued(Box<Queued>),
}

impl leases::Waiting for Waiter {
    /// Asked when it takes its place: the function's runs that ended
    /// while it waited count.
    fn short(&self) -> bool {
        match self {
            Waiter::Task { kind, .. } => kind.short(),
            Waiter::Queued(queued) => queued.kind.short(),
        }
    }
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

/// The lease machine of this process, and the shell around it.
pub(crate) struct LeaseManager {
    machine: Mutex<Machine>,
    /// The options of the last task queued as its spec: the next ones,
    /// when equal, share them (a loop submits a million with the same).
    queued_options: Mutex<Option<Arc<crate::options::TaskOptions>>>,
    /// Whether the task failing queued specs while the head is away runs.
    watching_head: std::sync::atomic::AtomicBool,
}

impl LeaseManager {
    /// The leases of an owner; `nested` for one that is itself a task on a
    /// worker: it keeps no idle lease (see [`Machine::keep_no_idle`]).
    pub(crate) fn new(nested: bool) -> Self {
        let mut machine = Machine::default();
        if nested {
            machine.keep_no_idle();
        }
        Self {
            machine: Mutex::new(machine),
            queued_options: Mutex::new(None),
            watching_head: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `options`, shared with the last queued task's when they are equal.
    pub(crate) fn intern(
        &self,
        options: crate::options::TaskOptions,
    ) -> Arc<crate::options::TaskOptions> {
        let mut last = self.queued_options.locked();
        match &*last {
            Some(shared) if **shared == options => Arc::clone(shared),
            _ => {
                let shared = Arc::new(options);
                *last = Some(Arc::clone(&shared));
                shared
            }
        }
    }

    /// Queues a task as its spec in `shape`'s class; it runs (see
    /// [`Core::start_queued`]) when it gets a place, which may be now.
    pub(crate) fn enqueue(&self, core: &Arc<Core>, shape: &Shape, queued: Box<Queued>) {
        if !self
            .watching_head
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            core.handle
                .spawn(fail_queued_while_head_away(Arc::clone(core)));
        }
        let class = leases::class_key(shape);
        let short = queued.kind.short();
        let mut queued = Some(queued);
        let mut out = Vec::new();
        let placed = self.machine().acquire(
            &class,
            shape,
            short,
            || Waiter::Queued(queued.take().expect("taken once")),
            &mut out,
        );
        self.carry_out(core, out);
        if let (Some(place), Some(queued)) = (placed, queued) {
            core.start_queued(*queued, FirstPlace::given(core, place));
        }
    }

    /// Takes out the tasks queued as specs that `pick` chooses.
    pub(crate) fn take_queued(&self, mut pick: impl FnMut(&Queued) -> bool) -> Vec<Queued> {
        let taken = self.machine().take_waiters(|w| match w {
            Waiter::Queued(queued) => pick(queued),
            Waiter::Task { .. } => false,
        });
        taken
            .into_iter()
            .filter_map(|w| match w {
                Waiter::Queued(queued) => Some(*queued),
                Waiter::Task { .. } => None,
            })
            .collect()
    }

    /// A place given to a task that does not use it: the next task gets it.
    pub(crate) fn unplaced(&self, core: &Arc<Core>, place: &Place) {
        let mut out = Vec::new();
        self.machine().unplaced(place, &mut out);
        self.carry_out(core, out);
    }

    fn machine(&self) -> MutexGuard<'_, Machine> {
        self.machine.locked()
    }

    /// A new lease request's id (for requests made outside the machine,
    /// such as an actor's: one sequence, so they never collide).
    pub(crate) fn fresh_request_id(&self) -> u64 {
        self.machine().fresh_request_id()
    }

    /// A place on a worker for one task of `shape`'s class: the worker
    /// runs its tasks one at a time, this one after those pushed before it
    /// (only ever short ones). Hand it back with [`release`](Self::release)
    /// or [`discard`](Self::discard).
    pub(crate) async fn acquire(
        &self,
        core: &Arc<Core>,
        shape: &Shape,
        kind: TaskKind,
    ) -> Result<Place, crate::error::Error> {
        let class = leases::class_key(shape);
        let short = kind.short();
        loop {
            let mut out = Vec::new();
            let mut waiting = None;
            let placed = self.machine().acquire(
                &class,
                shape,
                short,
                || {
                    let (tx, rx) = oneshot::channel();
                    waiting = Some(rx);
                    Waiter::Task { tx, kind }
                },
                &mut out,
            );
            self.carry_out(core, out);
            if let Some(place) = placed {
                return Ok(place);
            }
            let Some(rx) = waiting else { continue };
            // A head away for longer than the bound grants nothing: the
            // task fails rather than waiting forever.
            tokio::select! {
                given = rx => match given {
                    Ok(Ok(place)) => return Ok(place),
                    Ok(Err(why)) => return Err(crate::error::Error::Unschedulable(why)),
                    Err(_) => {}
                },
                waited = core.head.unavailable() => {
                    return Err(core.head.unavailable_error(waited));
                }
            }
        }
    }

    /// A task's place is free again (its task was answered).
    pub(crate) fn release(&self, core: &Arc<Core>, place: &Place) {
        let mut out = Vec::new();
        self.machine().release(place, &mut out);
        self.carry_out(core, out);
    }

    /// Gives up a worker that failed: it is stopped and its lease returned
    /// (once, however many of its tasks report it).
    pub(crate) fn discard(&self, core: &Arc<Core>, place: &Place) {
        let mut out = Vec::new();
        self.machine()
            .discard(&place.class, place.lease_id, &mut out);
        self.carry_out(core, out);
    }

    /// Returns every idle lease and asks for no more (the job is ending);
    /// busy ones go back as their tasks are answered.
    pub(crate) async fn return_all(&self, core: &Arc<Core>) {
        let mut out = Vec::new();
        self.machine().stop(&mut out);
        for command in out {
            if let Command::Return { worker, kill, .. } = command {
                return_lease(core, &worker, kill).await;
            }
        }
    }

    /// Carries out the machine's commands.
    fn carry_out(&self, core: &Arc<Core>, out: Commands) {
        for command in out {
            match command {
                Command::Give(Waiter::Task { tx, .. }, place) => {
                    if let Err(Ok(place)) = tx.send(Ok(place)) {
                        // The task was dropped: the place goes to the next.
                        self.unplaced(core, &place);
                    }
                }
                Command::Give(Waiter::Queued(queued), place) => {
                    core.start_queued(*queued, FirstPlace::given(core, place));
                }
                Command::Ask(ask) => {
                    core.handle.spawn(ask_lease(Arc::clone(core), ask));
                }
                Command::WarnInfeasible(shape) => {
                    warn!(resources = ?shape.resources, placement = %shape.placement, "no node in the cluster can ever fit these resources (with these labels); the task waits (see `shoal status`)");
                }
                Command::Refuse(Waiter::Task { tx, .. }, why) => {
                    let _ = tx.send(Err(why));
                }
                Command::Refuse(Waiter::Queued(queued), why) => {
                    let refused = crate::error::Error::Unschedulable(why);
                    core.start_queued(*queued, FirstPlace::Failed(refused));
                }
                Command::Return { worker, kill, .. } => {
                    let core2 = Arc::clone(core);
                    core.handle
                        .spawn(async move { return_lease(&core2, &worker, kill).await });
                }
                Command::ArmIdle {
                    class,
                    lease_id,
                    epoch,
                } => {
                    let core2 = Arc::clone(core);
                    core.handle.spawn(async move {
                        tokio::time::sleep(leases::IDLE_RETURN).await;
                        let mut out = Vec::new();
                        core2
                            .leases
                            .machine()
                            .idle_expired(&class, lease_id, epoch, &mut out);
                        core2.leases.carry_out(&core2, out);
                    });
                }
                Command::Abandon(ask) => {
                    let core2 = Arc::clone(core);
                    core.handle.spawn(async move {
                        let request = lease_request(&core2, &ask.shape, ask.request_id, 0);
                        abandon_request(&core2, request).await;
                    });
                }
            }
        }
    }

    /// Reports to the machine and carries out what it says.
    fn report(&self, core: &Arc<Core>, event: impl FnOnce(&mut Machine, &mut Commands)) {
        let mut out = Vec::new();
        event(&mut self.machine(), &mut out);
        self.carry_out(core, out);
    }
}

/// Fails the tasks queued as specs once the head has been away longer than
/// the bound, as a task waiting for its place in a runtime task fails then
/// (polled again while the head stays away, for tasks queued meanwhile).
async fn fail_queued_while_head_away(core: Arc<Core>) {
    loop {
        let waited = tokio::select! {
            waited = core.head.unavailable() => waited,
            () = core.shutdown.cancelled() => return,
        };
        for queued in core.leases.take_queued(|_| true) {
            let failed = FirstPlace::Failed(core.head.unavailable_error(waited));
            core.start_queued(queued, failed);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = core.shutdown.cancelled() => return,
        }
    }
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

/// [`release_lease`] (with a kill) on the runtime, not awaited.
fn release_in_background(core: &Arc<Core>, node: NodeClient, lease_id: shoal_proto::LeaseId) {
    let core2 = Arc::clone(core);
    core.handle
        .spawn(async move { release_lease(&core2, &node, lease_id, true).await });
}

/// What a lease holder asks a lease's node for: a worker for the job.
pub(crate) fn grant_request(
    core: &Core,
    lease: &Lease,
    tenancy: (bool, bool),
    env: &shoal_proto::EnvVars,
) -> NodeRequest {
    let (dedicated, detached) = tenancy;
    NodeRequest::GrantWorker {
        lease_id: lease.lease_id,
        job_id: core.job_id,
        binary_hash: core.binary_hash.clone(),
        resources: lease.resources.clone(),
        driver: Some(core.driver.clone()),
        dedicated,
        detached,
        owner: Some(core.me.worker_id),
        owner_node: core.hosting_node,
        env: env.clone(),
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

/// A lease request from this process, as an owner.
pub(crate) fn lease_request(
    core: &Core,
    shape: &Shape,
    request_id: u64,
    wait_ms: u64,
) -> LeaseRequest {
    LeaseRequest {
        job_id: core.job_id,
        owner: core.me.worker_id,
        resources: shape.resources.clone(),
        placement: shape.placement.clone(),
        preferred_node: Some(core.home.node_id),
        wait_ms,
        request_id,
        owner_node: core.hosting_node,
        abandon: false,
    }
}

/// Gives up a request whose last try got no answer: the head may have
/// granted it (the reply lost). Asked again under its id without waiting
/// until the head answers (with backoff, for up to [`ABANDON_FOR`]): a
/// grant is returned, else nothing is held. A lease left granted to a
/// request nobody wants would hold its CPUs until the job ends (the
/// cluster simulation found a job that waited forever for it).
pub(crate) async fn abandon_request(core: &Core, mut request: LeaseRequest) {
    request.wait_ms = 0;
    // Also stops the head from granting a try of it that it still holds.
    request.abandon = true;
    let ask = HeadRequest::RequestLease(request);
    let mut backoff = Duration::from_millis(50);
    let give_up = tokio::time::Instant::now() + ABANDON_FOR;
    loop {
        match core.head.call(&ask, LEASE_WAIT).await {
            Ok(HeadReply::LeaseGranted(lease)) => {
                return_to_head(core, lease.lease_id).await;
                return;
            }
            Ok(_) => return,
            Err(e) if !(e.is_worth_retrying() || e.is_connection_lost()) => return,
            Err(e) => debug!(error = %e, "giving up a lease request; asking again"),
        }
        if tokio::time::Instant::now() + backoff > give_up {
            debug!("could not give a lease request up: the head did not answer; the job's end reclaims any grant");
            return;
        }
        tokio::select! {
            () = core.shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One try of a lease request: asks the head (after the machine's pause),
/// and for a grant gets the worker from the lease's node.
async fn ask_lease(core: Arc<Core>, ask: Ask) {
    if !ask.after.is_zero() {
        tokio::time::sleep(ask.after).await;
    }
    let mut wanted = false;
    core.leases
        .report(&core, |m, out| wanted = m.still_wanted(&ask, out));
    if !wanted {
        return;
    }
    let request = HeadRequest::RequestLease(lease_request(
        &core,
        &ask.shape,
        ask.request_id,
        LEASE_WAIT.as_millis() as u64,
    ));
    let asked = std::time::Instant::now();
    let answer = match core
        .head
        .call(&request, LEASE_WAIT + Duration::from_secs(10))
        .await
    {
        Ok(HeadReply::LeaseGranted(lease)) => {
            debug!(lease_id = %lease.lease_id, node = %lease.node_id, waited = ?asked.elapsed(), "lease granted");
            core.leases.report(&core, |m, out| {
                m.answered(ask.clone(), Answer::Granted, out)
            });
            let room = lease.room_for_another;
            match worker_for(&core, lease, &ask.shape.env).await {
                Ok(worker) => {
                    let lease_id = worker.lease.lease_id;
                    let worker = Arc::new(worker);
                    core.leases
                        .report(&core, |m, out| m.joined(ask, (worker, lease_id), room, out));
                }
                Err(e) => {
                    // Granted as this process stops (its endpoint closing):
                    // no failure to speak of, and the job's end releases
                    // the lease.
                    if core.stopping.is_cancelled() {
                        debug!(error = %e, "no worker for a lease granted while stopping");
                    } else {
                        warn!(resources = ?ask.shape.resources, error = %e, "could not lease a worker; retrying");
                    }
                    core.leases.report(&core, |m, out| m.grant_failed(ask, out));
                }
            }
            return;
        }
        Ok(HeadReply::LeasePending { infeasible }) => {
            debug!(infeasible, waited = ?asked.elapsed(), "no lease yet");
            Answer::Pending { infeasible }
        }
        Ok(HeadReply::LeaseRefused { reason }) => {
            warn!(resources = ?ask.shape.resources, placement = %ask.shape.placement, %reason, "the head refused the lease: its tasks fail");
            Answer::Refused(reason)
        }
        Ok(other) => {
            warn!(reply = ?other, "unexpected reply to a lease request; retrying");
            Answer::Failed
        }
        Err(e) => {
            if !core.stopping.is_cancelled() {
                warn!(resources = ?ask.shape.resources, error = %e, "lease request failed; retrying");
            }
            if e.is_worth_retrying() || e.is_connection_lost() {
                Answer::Lost
            } else {
                Answer::Failed
            }
        }
    };
    core.leases
        .report(&core, |m, out| m.answered(ask, answer, out));
}

/// The worker of a granted lease, from the lease's node (the lease is
/// returned if there is none).
async fn worker_for(
    core: &Arc<Core>,
    lease: Lease,
    env: &shoal_proto::EnvVars,
) -> Result<LeasedWorker, String> {
    let node = match core.node(&lease.node_address).await {
        Ok(node) => node,
        Err(e) => {
            return_to_head(core, lease.lease_id).await;
            return Err(format!("cannot reach node {}: {e}", lease.node_id));
        }
    };
    let grant = grant_request(core, &lease, (false, false), env);
    // Idempotent per lease: a retry gets the worker the first try got.
    let worker = match node.call_idempotent(&grant, Duration::from_secs(90)).await {
        Ok(NodeReply::WorkerGranted { worker }) => worker,
        other => {
            // The node may have granted a worker we never heard of: it is
            // released there too, not only the lease at the head (in the
            // background: the machine hears of the failed grant at once).
            release_in_background(core, node, lease.lease_id);
            return Err(format!("node {} gave no worker: {other:?}", lease.node_id));
        }
    };
    let client = match core.worker(&worker.address).await {
        Ok(c) => c,
        Err(e) => {
            release_in_background(core, node, lease.lease_id);
            return Err(format!("cannot reach worker {}: {e}", worker.worker_id));
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
    Ok(LeasedWorker {
        lease,
        worker_id: worker.worker_id,
        worker: client,
        node,
        lost,
    })
}
