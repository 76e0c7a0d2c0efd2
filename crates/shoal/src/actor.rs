//! Actors: a struct living in its own worker process, called through a
//! typed handle.
//!
//! Creating an actor leases resources from the head, asks the lease's node
//! for a dedicated worker, and runs the constructor there. Method calls go
//! from the caller straight to that worker (the head is not on the path).
//! Each handle is a caller with its own sequence numbers: the host starts
//! one caller's calls in the order they were made. A call whose reply is
//! lost is sent again with the same number, and the host answers it with
//! the reply it kept (`replies`), never running it twice; calls lost with
//! a connection, or with an incarnation that restarted, are sent again in
//! the order they were made, ahead of later calls (`outbox`). Only the
//! node's or the head's word makes an incarnation dead. `&mut self` methods run
//! alone (a write lock); `&self` methods share a read lock, up to
//! `max_concurrency` at once, on threads, or interleaved on the runtime for
//! `async` ones. The borrow checker, through these locks, keeps the state
//! safe: an actor type must be `Send + Sync`.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::head::Lease;
use shoal_proto::worker::ActorCall;
use shoal_proto::{
    ActorId, Address, ArgSpec, FailureKind, HeadReply, HeadRequest, NodeReply, NodeRequest,
    ObjectId, ResourceSet, TaskFailure, TaskId, TaskOutcome, TaskReply, WorkerId, WorkerReply,
    WorkerRequest,
};
use std::future::Future;
use tokio::sync::{RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::core::{self, Core, Executor, ObjState};
use crate::error::{Error, Result};
use crate::exec::{await_caught, run_caught};
use crate::object_ref::{ArgValue, ObjectRef};
use crate::outbox::Outbox;
use crate::registry::{self, ActorClass, ActorState, MethodInvoker};
use crate::replies::{KeptReplies, Seen};
use crate::turns::Turns;

/// The namespace of actor names when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Calls a worker waits for a method; a dead actor is noticed sooner.
const CALL_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Implemented by `#[shoal::actor]` for an actor type.
pub trait Actor: Send + Sync + Sized + 'static {
    /// The generated type with one method per actor method, which an
    /// [`ActorHandle`] dereferences to.
    type Methods: From<RawActor> + AsRef<RawActor> + Send + Sync;
    /// The class's registered name.
    const CLASS: &'static str;
}

/// A typed handle to an actor: call its methods as `handle.method(args)`,
/// each returning an `ObjectRef` of the result. `Clone`, `Send` and
/// serializable: pass it to tasks and other actors, which call it directly.
pub struct ActorHandle<A: Actor> {
    methods: A::Methods,
    _type: PhantomData<fn() -> A>,
}

impl<A: Actor> ActorHandle<A> {
    pub(crate) fn new(raw: RawActor) -> Self {
        Self {
            methods: A::Methods::from(raw),
            _type: PhantomData,
        }
    }

    /// The actor's id.
    pub fn id(&self) -> ActorId {
        self.methods.as_ref().actor_id
    }

    pub(crate) fn as_raw(&self) -> &RawActor {
        self.methods.as_ref()
    }
}

impl<A: Actor> Deref for ActorHandle<A> {
    type Target = A::Methods;

    fn deref(&self) -> &A::Methods {
        &self.methods
    }
}

impl<A: Actor> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        Self::new(self.methods.as_ref().clone())
    }
}

impl<A: Actor> std::fmt::Debug for ActorHandle<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActorHandle<{}>({})", A::CLASS, self.id())
    }
}

impl<A: Actor> Serialize for ActorHandle<A> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let raw = self.methods.as_ref();
        // A handle that left its process keeps the actor for the job's life.
        raw.lifetime.escaped.store(true, Ordering::Relaxed);
        raw.wire().serialize(serializer)
    }
}

impl<'de, A: Actor> Deserialize<'de> for ActorHandle<A> {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let wire = WireActor::deserialize(deserializer)?;
        Ok(Self::new(RawActor::borrowed(wire)))
    }
}

/// A handle as it travels: the actor and where it lived last.
#[derive(Serialize, Deserialize)]
struct WireActor {
    actor_id: ActorId,
    class: String,
    worker: Address,
    node: String,
    max_pending_calls: Option<u32>,
    #[serde(default)]
    incarnation: u32,
    #[serde(default)]
    max_restarts: u32,
    #[serde(default)]
    max_task_retries: u32,
    /// The actor is between incarnations (its last worker is gone).
    #[serde(default)]
    restarting: bool,
    /// The node's id (of this incarnation): its death, and only its, ends
    /// the location (the same address may come back under a new id).
    #[serde(default)]
    node_id: Option<shoal_proto::NodeId>,
}

impl WireActor {
    fn from_info(info: shoal_proto::ActorInfo) -> Self {
        Self {
            actor_id: info.actor_id,
            class: info.class,
            restarting: info.state != shoal_proto::ActorState::Alive,
            worker: info.worker,
            node: info.node_address,
            max_pending_calls: info.max_pending_calls,
            incarnation: info.incarnation,
            max_restarts: info.max_restarts,
            max_task_retries: info.max_task_retries,
            node_id: Some(info.node_id),
        }
    }
}

/// Ends the actor when the creator's last handle is dropped (unless a
/// handle escaped to another process, or the actor is detached).
pub(crate) struct Lifetime {
    actor_id: ActorId,
    escaped: std::sync::atomic::AtomicBool,
    /// Set once the head knows the actor: from then on it is ended through
    /// the head (which stops its restarts), before only through its lease.
    registered: std::sync::atomic::AtomicBool,
    /// The lease and node holding the first worker (creator only).
    lease: Option<(Lease, String)>,
    /// The constructor's argument objects, kept while the actor may have to
    /// run its constructor again.
    _ctor_args: Mutex<Vec<crate::object_ref::KeepAlive>>,
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        if self.escaped.load(Ordering::Relaxed) {
            return;
        }
        let Some(core) = core::try_get() else {
            return;
        };
        let core2 = Arc::clone(core);
        if self.registered.load(Ordering::Relaxed) {
            let actor_id = self.actor_id;
            core.handle.spawn(async move {
                if let Err(e) = end_actor(&core2, actor_id).await {
                    tracing::debug!(%actor_id, error = %e, "could not end the actor");
                }
            });
            return;
        }
        let Some((lease, node)) = self.lease.take() else {
            return;
        };
        core.handle.spawn(async move {
            if let Ok(node) = core2.node(&node).await {
                crate::lease::release_lease(&core2, &node, lease.lease_id, true).await;
            }
        });
    }
}

/// Where one incarnation of the actor lives, as one caller uses it.
struct Location {
    incarnation: u32,
    worker: Address,
    /// The node hosting the worker, which says when it exits.
    node: String,
    /// That node's id, when known.
    node_id: Option<shoal_proto::NodeId>,
    /// Identifies the caller to this worker; calls are ordered per caller,
    /// numbered from 0 at each location (see [`Outbox`]).
    caller_id: WorkerId,
    /// Cancelled when this incarnation is gone: on the word of its node
    /// (the worker exited) or of the head, or by `kill`. A lost connection
    /// alone is not a death.
    dead: CancellationToken,
}

impl Location {
    fn new(
        core: &Arc<Core>,
        incarnation: u32,
        worker: Address,
        (node, node_id): (String, Option<shoal_proto::NodeId>),
    ) -> Arc<Self> {
        let location = Arc::new(Self {
            incarnation,
            worker,
            node,
            node_id,
            caller_id: WorkerId::random(),
            dead: CancellationToken::new(),
        });
        core.watches.watch(
            core,
            &location.node,
            location.node_id,
            location.worker.worker_id,
            location.dead.clone(),
        );
        location
    }

    /// The request of a call at `slot` here (`args` `None`: a skip, which
    /// only moves the host past the slot).
    fn request(
        &self,
        raw: &RawActor,
        order: &Order,
        slot: &CallSlot,
        args: Option<Vec<ArgSpec>>,
    ) -> WorkerRequest {
        WorkerRequest::ActorCall(ActorCall {
            actor_id: raw.actor_id,
            caller: self.caller_id,
            incarnation: self.incarnation,
            seq: slot.seq,
            done_below: slot.done_below,
            task_id: order.task_id,
            method: order.method.to_string(),
            args,
        })
    }
}

impl Drop for Location {
    /// Ends the watch of its worker.
    fn drop(&mut self) {
        self.dead.cancel();
    }
}

/// A caller's way to one incarnation over one connection: its requests
/// leave in position order (so a host's wait for a caller's earlier calls
/// always ends: it never waits on a request stuck behind the stream limit).
struct Route {
    location: Arc<Location>,
    /// Positions taking turns to send.
    sent: Turns,
    /// Cancelled when a new route replaces this one.
    superseded: CancellationToken,
}

impl Route {
    fn new(location: Arc<Location>) -> Arc<Self> {
        Arc::new(Self {
            location,
            sent: Turns::default(),
            superseded: CancellationToken::new(),
        })
    }

    /// A new route took this one's calls: those waiting their turn here,
    /// or a reply, go on there.
    fn supersede(&self) {
        self.superseded.cancel();
        self.sent.pass(u64::MAX - 1);
    }
}

/// A call's slot: its route, its seq there and its turn to send.
type CallSlot = crate::outbox::Slot<Arc<Route>>;

/// One caller of an actor: a handle and its clones in one process.
struct Caller {
    /// The calls made and not yet answered at their slot, and the route.
    outbox: Mutex<Outbox<Arc<Route>>>,
    /// One relocation (asking the head for the new incarnation) at a time.
    relocating: tokio::sync::Mutex<()>,
    /// Calls made and not yet answered.
    pending: AtomicU32,
    max_pending: Option<u32>,
    max_restarts: u32,
    max_task_retries: u32,
    /// Cancelled when the actor is dead for good.
    gone: CancellationToken,
}

impl Caller {
    fn outbox(&self) -> MutexGuard<'_, Outbox<Arc<Route>>> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn location(&self) -> Arc<Location> {
        Arc::clone(&self.outbox().route().location)
    }

    /// The actor is dead for good, as far as a new call can tell.
    fn known_dead(&self) -> bool {
        self.gone.is_cancelled() || (self.max_restarts == 0 && self.location().dead.is_cancelled())
    }

    /// The connection of route `from` was lost: unless another call did it
    /// already, every open call moves to a new route to the same
    /// incarnation, keeping its seq (the host answers again what it ran),
    /// to be sent again in the order the calls were made.
    fn reroute(&self, from: u64) {
        let mut outbox = self.outbox();
        if outbox.route_id() != from {
            return;
        }
        let location = Arc::clone(&outbox.route().location);
        let old = outbox.reroute(Route::new(location));
        drop(outbox);
        old.supersede();
    }
}

/// Longest a call waits for its actor to come back after its worker died.
const RESTART_WAIT: Duration = Duration::from_secs(120);

/// Longest a caller keeps trying to reach a worker the head says is alive
/// before it gives that incarnation up.
const REACH_WAIT: Duration = Duration::from_secs(120);

/// The untyped part of a handle (used by the generated code).
#[derive(Clone)]
pub struct RawActor {
    pub(crate) actor_id: ActorId,
    pub(crate) class: String,
    caller: Arc<Caller>,
    lifetime: Arc<Lifetime>,
}

impl RawActor {
    fn new(core: &Arc<Core>, wire: WireActor, lifetime: Arc<Lifetime>) -> Self {
        let location = Location::new(
            core,
            wire.incarnation,
            wire.worker,
            (wire.node, wire.node_id),
        );
        if wire.restarting {
            location.dead.cancel();
        }
        let caller = Arc::new(Caller {
            outbox: Mutex::new(Outbox::new(Route::new(location))),
            relocating: tokio::sync::Mutex::new(()),
            pending: AtomicU32::new(0),
            max_pending: wire.max_pending_calls,
            max_restarts: wire.max_restarts,
            max_task_retries: wire.max_task_retries,
            gone: CancellationToken::new(),
        });
        Self {
            actor_id: wire.actor_id,
            class: wire.class,
            caller,
            lifetime,
        }
    }

    fn borrowed(wire: WireActor) -> Self {
        let lifetime = Arc::new(Lifetime {
            actor_id: wire.actor_id,
            escaped: true.into(),
            registered: false.into(),
            lease: None,
            _ctor_args: Mutex::new(Vec::new()),
        });
        Self::new(&crate::ensure_core(), wire, lifetime)
    }

    fn wire(&self) -> WireActor {
        let location = self.caller.location();
        WireActor {
            actor_id: self.actor_id,
            class: self.class.clone(),
            worker: location.worker.clone(),
            node: location.node.clone(),
            max_pending_calls: self.caller.max_pending,
            incarnation: location.incarnation,
            max_restarts: self.caller.max_restarts,
            max_task_retries: self.caller.max_task_retries,
            restarting: location.dead.is_cancelled(),
            node_id: location.node_id,
        }
    }

    /// The incarnation of `from` is dead: asks the head for the next one
    /// (held until the restart ends) and moves every open call there, in
    /// the order the calls were made, ahead of later calls. Called by a
    /// call holding its turn on `from`'s route, so later calls wait
    /// meanwhile; a call that finds the move done already returns at once.
    async fn relocate(&self, core: &Arc<Core>, from: &CallSlot) -> std::result::Result<(), String> {
        let _one = self.caller.relocating.lock().await;
        if self.caller.outbox().route_id() != from.route_id {
            return Ok(());
        }
        let known = from.route.location.incarnation;
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        loop {
            if self.caller.gone.is_cancelled() {
                return Err("it is dead".into());
            }
            let ask = HeadRequest::GetActor {
                actor_id: self.actor_id,
                known_incarnation: Some(known),
                wait_ms: 5000,
            };
            match core
                .head
                .call_idempotent(&ask, Duration::from_secs(30))
                .await
            {
                Ok(HeadReply::Actor(info)) => match info.state {
                    shoal_proto::ActorState::Dead => {
                        self.caller.gone.cancel();
                        return Err("its worker exited and it has no restarts left".into());
                    }
                    shoal_proto::ActorState::Alive if info.incarnation != known => {
                        let location = Location::new(
                            core,
                            info.incarnation,
                            info.worker,
                            (info.node_address, Some(info.node_id)),
                        );
                        let old = self.caller.outbox().relocate(Route::new(location));
                        old.supersede();
                        return Ok(());
                    }
                    _ => {}
                },
                Ok(other) => return Err(format!("the head answered {other:?}")),
                Err(shoal_net::RpcError::Service(e))
                    if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
                {
                    self.caller.gone.cancel();
                    return Err(e.message);
                }
                Err(e) => {
                    tracing::debug!(actor_id = %self.actor_id, error = %e, "asking the head where the actor lives");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "its worker exited and it did not come back within {RESTART_WAIT:?}"
                ));
            }
        }
    }

    /// The worker of `location` could not be reached (`error`). A failed
    /// connection is not a death: the head says whether the incarnation
    /// lives. Returns when the call should look again: after a pause when
    /// the head lists it alive at that worker (for up to [`REACH_WAIT`]
    /// from `reach.since`, then this handle gives the incarnation up), at
    /// once when the head says it was restarted (the location is then
    /// dead) or is dead (the caller is then gone).
    async fn unreachable(
        &self,
        core: &Arc<Core>,
        location: &Location,
        error: Error,
        reach: &mut Reach,
    ) {
        let since = *reach.since.get_or_insert_with(tokio::time::Instant::now);
        reach.tries += 1;
        let ask = HeadRequest::GetActor {
            actor_id: self.actor_id,
            known_incarnation: None,
            wait_ms: 0,
        };
        match core.head.call(&ask, Duration::from_secs(30)).await {
            Ok(HeadReply::Actor(info)) => match info.state {
                shoal_proto::ActorState::Dead => {
                    self.caller.gone.cancel();
                    return;
                }
                shoal_proto::ActorState::Alive
                    if info.incarnation == location.incarnation
                        && info.worker.worker_id == location.worker.worker_id => {}
                // Restarting, or alive elsewhere: this incarnation is gone.
                _ => {
                    location.dead.cancel();
                    return;
                }
            },
            Err(shoal_net::RpcError::Service(e))
                if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
            {
                self.caller.gone.cancel();
                return;
            }
            Ok(other) => {
                tracing::debug!(actor_id = %self.actor_id, ?other, "unexpected answer to GetActor")
            }
            Err(e) => {
                tracing::debug!(actor_id = %self.actor_id, error = %e, "asking the head whether the actor lives")
            }
        }
        if since.elapsed() >= REACH_WAIT {
            tracing::warn!(actor_id = %self.actor_id, worker = %location.worker.address, %error,
                "the actor's worker could not be reached for {REACH_WAIT:?} although the head lists it alive; giving this incarnation up");
            location.dead.cancel();
            return;
        }
        tracing::debug!(actor_id = %self.actor_id, %error, "the actor's worker could not be reached; trying again");
        tokio::select! {
            _ = tokio::time::sleep(backoff(reach.tries)) => {}
            _ = location.dead.cancelled() => {}
        }
    }
}

/// Tries at reaching an actor's worker that did not answer a connection.
#[derive(Default)]
struct Reach {
    since: Option<tokio::time::Instant>,
    tries: u32,
}

/// The pause before try `n` (from 1) again: 10 ms doubling, at most 1 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << n.saturating_sub(1).min(7)))
        .min(Duration::from_secs(1))
}

/// Options of an actor's creation.
#[derive(Clone, Debug)]
pub struct ActorOptions {
    pub(crate) resources: ResourceSet,
    pub(crate) max_concurrency: Option<u32>,
    pub(crate) max_pending_calls: Option<u32>,
    pub(crate) name: Option<String>,
    pub(crate) namespace: String,
    pub(crate) detached: bool,
    pub(crate) max_restarts: u32,
    pub(crate) max_task_retries: u32,
}

impl Default for ActorOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ActorOptions {
    /// No CPUs held while the actor lives (as Ray's default), one call at a
    /// time for sync methods, 1000 for async ones.
    pub fn new() -> Self {
        Self {
            resources: ResourceSet::new(),
            max_concurrency: None,
            max_pending_calls: None,
            name: None,
            namespace: DEFAULT_NAMESPACE.to_string(),
            detached: false,
            max_restarts: 0,
            max_task_retries: 0,
        }
    }

    /// CPUs the actor holds for its life.
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.resources.set(shoal_proto::resources::CPU, n);
        self
    }

    /// A custom resource the actor holds for its life.
    pub fn resource(mut self, name: &str, quantity: f64) -> Self {
        self.resources.set(name, quantity);
        self
    }

    /// Calls that may run at once (`&self` methods on threads, `async`
    /// methods on the runtime); `&mut self` methods always run alone.
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = Some(n.max(1));
        self
    }

    /// A name, unique in the namespace, by which any driver can find the
    /// actor with `shoal::get_actor`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The namespace of the name (default `"default"`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The actor outlives its creator's job, until `shoal::kill`.
    pub fn lifetime_detached(mut self) -> Self {
        self.detached = true;
        self
    }

    /// Calls a handle may have unanswered; more fail at once with
    /// [`Error::PendingCallsExceeded`].
    pub fn max_pending_calls(mut self, n: u32) -> Self {
        self.max_pending_calls = Some(n);
        self
    }

    /// Times the actor is restarted (its constructor run again in a new
    /// worker, a new incarnation) when its worker or node dies. Default 0:
    /// the actor dies with its worker.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }

    /// Times a call in flight when the actor's worker died is sent again to
    /// the restarted actor (so it may run twice). Default 0: such calls fail
    /// with [`Error::ActorDied`].
    pub fn max_task_retries(mut self, n: u32) -> Self {
        self.max_task_retries = n;
        self
    }
}

/// Longest actor name or namespace, in bytes.
pub const NAME_BYTES_MAX: usize = 256;

impl ActorOptions {
    /// Refuses names the head would refuse, before any work is done.
    fn check(&self) -> Result<()> {
        let bad = |what: &str, value: &str| {
            Error::InvalidOptions(format!(
                "an actor {what} must be 1 to {NAME_BYTES_MAX} bytes (got {} bytes)",
                value.len()
            ))
        };
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() > NAME_BYTES_MAX {
                return Err(bad("name", name));
            }
        }
        if self.namespace.is_empty() || self.namespace.len() > NAME_BYTES_MAX {
            return Err(bad("namespace", &self.namespace));
        }
        Ok(())
    }
}

/// Creates an actor of `A` with constructor arguments `args`.
pub(crate) fn create<A: Actor>(
    options: ActorOptions,
    args: Vec<ArgValue>,
) -> Result<ActorHandle<A>> {
    options.check()?;
    let core = crate::ensure_core();
    let class = A::CLASS.to_string();
    let has_async = registry::actor_class(&class).is_some_and(|c| {
        c.methods
            .iter()
            .any(|(_, m)| matches!(m, MethodInvoker::AsyncRef(_) | MethodInvoker::AsyncMut(_)))
    });
    let max_concurrency = options
        .max_concurrency
        .unwrap_or(if has_async { 1000 } else { 1 });
    let core2 = Arc::clone(&core);
    let raw = core
        .block_on(async move { create_raw(&core2, class, options, max_concurrency, args).await })?;
    Ok(ActorHandle::new(raw))
}

async fn create_raw(
    core: &Arc<Core>,
    class: String,
    options: ActorOptions,
    max_concurrency: u32,
    args: Vec<ArgValue>,
) -> Result<RawActor> {
    let resources = options.resources;
    let actor_id = ActorId::random();
    let task_id = TaskId::fresh();
    // Kept until the constructor has run (its stored arguments must not be
    // freed before the worker reads them), or for the actor's life when it
    // may run the constructor again.
    let (args, keep_args) = core
        .resolve_args(&class, task_id, args)
        .await
        .map_err(Error::from_failure)?;
    // One request id for all tries: a retry after a lost grant gets that
    // grant, so no lease leaks.
    let request_id = crate::lease::fresh_request_id();
    let lease = loop {
        let request = crate::lease::lease_request(core, &resources, request_id, 2000);
        let asked = core
            .head
            .call_idempotent(
                &HeadRequest::RequestLease(request.clone()),
                Duration::from_secs(15),
            )
            .await;
        match asked {
            Ok(HeadReply::LeaseGranted(lease)) => break lease,
            Ok(HeadReply::LeasePending { infeasible: true }) => {
                tracing::warn!(%class, ?resources, "no node can ever fit this actor; it waits (see `shoal status`)");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(HeadReply::LeasePending { .. }) => {}
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "{other:?} in answer to a lease request"
                )))
            }
            Err(e) => {
                // The head may have granted it, its answer lost.
                if e.is_worth_retrying() || e.is_connection_lost() {
                    crate::lease::abandon_request(core, request).await;
                }
                return Err(e.into());
            }
        }
    };
    let node = match core.node(&lease.node_address).await {
        Ok(node) => node,
        Err(e) => {
            crate::lease::return_to_head(core, lease.lease_id).await;
            return Err(e);
        }
    };
    let detached = options.detached;
    let grant = crate::lease::grant_request(core, &lease, (true, detached));
    let worker = match node.call_idempotent(&grant, Duration::from_secs(90)).await {
        Ok(NodeReply::WorkerGranted { worker }) => worker,
        other => {
            // The node may have granted a worker we never heard of.
            crate::lease::release_lease(core, &node, lease.lease_id, true).await;
            return Err(match other {
                Err(e) => e.into(),
                Ok(other) => Error::Protocol(format!("{other:?} in answer to GrantWorker")),
            });
        }
    };
    let node_address = node_address(&node);
    let lease_id = lease.lease_id;
    let node_id = lease.node_id;
    let restartable = options.max_restarts > 0;
    // Until it is registered, dropping this ends the worker: a failed
    // creation leaves nothing behind.
    let (keep_args, ctor_args) = if restartable {
        (Vec::new(), keep_args)
    } else {
        (keep_args, Vec::new())
    };
    let lifetime = Arc::new(Lifetime {
        actor_id,
        escaped: false.into(),
        registered: false.into(),
        lease: Some((lease, node_address.clone())),
        _ctor_args: Mutex::new(ctor_args),
    });
    let client = core.worker(&worker.address).await?;
    let create = WorkerRequest::CreateActor {
        actor_id,
        class: class.clone(),
        args: args.clone(),
        max_concurrency,
        incarnation: 0,
    };
    let pid = match client.call(&create, Duration::from_secs(600)).await? {
        WorkerReply::ActorCreated { failure: None, pid } => pid,
        WorkerReply::ActorCreated {
            failure: Some(f), ..
        } => return Err(Error::from_failure(f)),
        other => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to CreateActor"
            )))
        }
    };
    drop(keep_args);
    let info = shoal_proto::ActorInfo {
        actor_id,
        class: class.clone(),
        name: options.name.clone(),
        namespace: options.namespace.clone(),
        detached,
        job_id: core.job_id,
        node_id,
        node_address: node_address.clone(),
        worker: worker.clone(),
        pid,
        lease_id,
        state: shoal_proto::ActorState::Alive,
        max_pending_calls: options.max_pending_calls,
        incarnation: 0,
        max_restarts: options.max_restarts,
        num_restarts: 0,
        max_task_retries: options.max_task_retries,
    };
    let spec = shoal_proto::head::ActorSpec {
        // Only a restartable actor's spec is kept.
        args: if restartable { args } else { Vec::new() },
        max_concurrency,
        resources,
        owner: core.me.worker_id,
    };
    match core
        .head
        .call_idempotent(
            &HeadRequest::RegisterActor {
                info: info.clone(),
                spec,
            },
            Duration::from_secs(30),
        )
        .await
    {
        Ok(_) => {}
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::BadRequest =>
        {
            return Err(Error::ActorNameTaken(e.message))
        }
        Err(e) => return Err(e.into()),
    }
    lifetime.registered.store(true, Ordering::Relaxed);
    // A detached actor is not ended by its creator's handles.
    lifetime.escaped.store(detached, Ordering::Relaxed);
    Ok(RawActor::new(core, WireActor::from_info(info), lifetime))
}

/// The actor named `name` in `namespace`, checked to be of class `A`.
pub(crate) fn get_named<A: Actor>(name: &str, namespace: &str) -> Result<ActorHandle<A>> {
    let core = crate::ensure_core();
    let ask = HeadRequest::GetNamedActor {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let core2 = Arc::clone(&core);
    let reply = core.block_on(async move {
        Ok(core2
            .head
            .call_idempotent(&ask, Duration::from_secs(30))
            .await)
    })?;
    let info = match reply {
        Ok(HeadReply::Actor(info)) => info,
        Ok(other) => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to GetNamedActor"
            )))
        }
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
        {
            return Err(Error::NotFound(e.message))
        }
        Err(e) => return Err(e.into()),
    };
    if info.class != A::CLASS {
        return Err(Error::NotFound(format!(
            "the actor named {name:?} in namespace {namespace:?} is a {}, not a {}",
            info.class,
            A::CLASS
        )));
    }
    Ok(ActorHandle::new(RawActor::borrowed(WireActor::from_info(
        info,
    ))))
}

/// Asks the head to end the actor (`no_restart`) or only its worker, then
/// stops the worker through its node.
async fn stop_actor(core: &Arc<Core>, actor_id: ActorId, no_restart: bool) -> Result<()> {
    let info = match core
        .head
        .call_idempotent(
            &HeadRequest::KillActor {
                actor_id,
                no_restart,
            },
            Duration::from_secs(30),
        )
        .await?
    {
        HeadReply::Actor(info) => info,
        other => return Err(Error::Protocol(format!("{other:?} in answer to KillActor"))),
    };
    let node = core.node(&info.node_address).await?;
    node.call_idempotent(
        &NodeRequest::KillWorker {
            worker_id: info.worker.worker_id,
        },
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

/// Ends the actor for good (its creator's last handle is gone).
async fn end_actor(core: &Arc<Core>, actor_id: ActorId) -> Result<()> {
    stop_actor(core, actor_id, true).await
}

/// Ends an actor now: the head forgets it (its name is free again) and its
/// node stops its worker; calls in flight and later get `Error::ActorDied`.
/// Without `no_restart`, only its worker is stopped: an actor with restarts
/// left comes back, as after a crash.
pub(crate) fn kill(raw: &RawActor, no_restart: bool) -> Result<()> {
    let core = crate::ensure_core();
    let core2 = Arc::clone(&core);
    let actor_id = raw.actor_id;
    core.block_on(async move { stop_actor(&core2, actor_id, no_restart).await })?;
    if no_restart {
        raw.caller.gone.cancel();
    }
    raw.caller.location().dead.cancel();
    Ok(())
}

fn node_address(node: &crate::core::NodeClient) -> String {
    node.remote_address().to_string()
}

/// Calls `method` on the actor; the reference resolves to its result.
pub(crate) fn call<T>(raw: &RawActor, method: &'static str, args: Vec<ArgValue>) -> ObjectRef<T> {
    let core = crate::ensure_core();
    let task_id = TaskId::fresh();
    let id = task_id.return_object(0);
    core.register_pending(id);
    let refused = |kind, message: String| {
        let f = TaskFailure {
            kind,
            function: format!("{}::{method}", raw.class),
            task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts: 0,
        };
        core.complete_object(id, ObjState::Failed(f));
        ObjectRef::adopt(id, core.me.clone())
    };
    if raw.caller.known_dead() {
        return refused(
            FailureKind::ActorDied,
            format!("actor {}: its worker has exited", raw.actor_id),
        );
    }
    let pending = raw.caller.pending.fetch_add(1, Ordering::SeqCst);
    if raw.caller.max_pending.is_some_and(|max| pending >= max) {
        raw.caller.pending.fetch_sub(1, Ordering::SeqCst);
        let max = raw.caller.max_pending.unwrap_or_default();
        return refused(
            FailureKind::PendingCallsExceeded,
            format!("{max} calls are already waiting on this handle (max_pending_calls)"),
        );
    }
    let (turn, slot) = raw.caller.outbox().open();
    let order = Order {
        turn,
        task_id,
        method,
        id,
    };
    // A handle with no other call in flight (a call, then its get) sends
    // from this thread when it can.
    let args = if pending == 0 {
        match call_now(&core, raw, order, &slot, args) {
            Ok(()) => return ObjectRef::adopt(id, core.me.clone()),
            Err(args) => args,
        }
    } else {
        args
    };
    drop(slot);
    let raw = raw.clone();
    let core2 = Arc::clone(&core);
    core.handle.spawn(async move {
        call_raw(&core2, &raw, order, args).await;
    });
    ObjectRef::adopt(id, core.me.clone())
}

/// A call is answered (or failed for good): its reference resolves.
fn finish_call(core: &Arc<Core>, raw: &RawActor, id: ObjectId, state: ObjState) {
    raw.caller.pending.fetch_sub(1, Ordering::SeqCst);
    core.complete_object(id, state);
}

/// One call: its place in the caller's order, and what it resolves.
#[derive(Clone, Copy)]
struct Order {
    /// Its turn in the caller's [`Outbox`].
    turn: u64,
    task_id: TaskId,
    method: &'static str,
    /// The reference of its result.
    id: ObjectId,
}

/// Arguments this big at most are sent from the caller's thread (a copy is
/// kept for a resend).
const CALL_NOW_ARGS_MAX: usize = 4 << 10;

/// Sends a call from the caller's thread, when its turn has come, its
/// arguments are small plain values and the actor's worker is reached over
/// a same-host socket already open; the reply completes the reference on
/// the connection's reading task. A call and its `get` then wake no task of
/// the runtime but that reader (the task path costs a hand-off to the
/// runtime: a thread wake-up, tens of microseconds on these machines).
/// Gives the arguments back when the call must take the task path.
fn call_now(
    core: &Arc<Core>,
    raw: &RawActor,
    order: Order,
    slot: &CallSlot,
    args: Vec<ArgValue>,
) -> std::result::Result<(), Vec<ArgValue>> {
    // Their total size, when all are plain values.
    let plain: Option<usize> = args
        .iter()
        .map(|a| match a {
            ArgValue::Bytes(b) => Some(b.len()),
            _ => None,
        })
        .sum();
    if plain.is_none_or(|size| size > CALL_NOW_ARGS_MAX) || !slot.route.sent.is_turn(slot.pos) {
        return Err(args);
    }
    let location = &slot.route.location;
    if location.dead.is_cancelled() || raw.caller.gone.is_cancelled() {
        return Err(args);
    }
    let Some(client) = core.cached_worker(&location.worker.address) else {
        return Err(args);
    };
    if !client.is_same_host() {
        return Err(args);
    }
    let specs: Vec<ArgSpec> = args
        .into_iter()
        .filter_map(|a| match a {
            ArgValue::Bytes(b) => Some(ArgSpec::Inline(b)),
            _ => None,
        })
        .collect();
    let request = location.request(raw, &order, slot, Some(specs.clone()));
    let sent = Sent {
        route: Arc::clone(&slot.route),
        route_id: slot.route_id,
        seq: slot.seq,
    };
    let answered = {
        let (core, raw) = (Arc::clone(core), raw.clone());
        move |reply: std::result::Result<WorkerReply, shoal_net::RpcError>| match reply {
            // Answered at the slot it was sent to (and not by a node the
            // head declared dead): done, with no task.
            Ok(WorkerReply::TaskDone(done))
                if !core.watches.is_dead(done.node_id)
                    && raw.caller.outbox().close_on(order.turn, sent.route_id) =>
            {
                finish_call(&core, &raw, order.id, outcome_state(done.outcome));
            }
            // Lost (or moved meanwhile): the task path goes on.
            reply => {
                let mut drive = Drive::new(&core, &raw, order, Some(specs));
                drive.tried = Some(Arc::clone(&sent.route.location));
                core.handle
                    .spawn(drive.run(Step::Reply(sent, Box::new(reply))));
            }
        }
    };
    // Not sent: the callback is dropped, the request gives the arguments
    // back, and the call, still holding its turn, takes the task path.
    match client.send_then(&request, CALL_TIMEOUT, answered) {
        Some(Ok(())) => slot.route.sent.pass(slot.pos),
        Some(Err(_)) | None => {
            let WorkerRequest::ActorCall(call) = request else {
                unreachable!("Location::request makes an ActorCall")
            };
            let drive = Drive::new(core, raw, order, call.args);
            core.handle.spawn(drive.run(Step::Send));
        }
    }
    Ok(())
}

/// What a worker's reply to a call says its result is.
fn outcome_state(outcome: TaskOutcome) -> ObjState {
    match outcome {
        TaskOutcome::Inline(bytes) => ObjState::Inline(Arc::new(bytes)),
        TaskOutcome::Stored(at) => ObjState::Stored(at),
        TaskOutcome::Failed(f) => ObjState::Failed(f),
    }
}

/// Resolves the call's arguments, then drives it to its answer.
async fn call_raw(core: &Arc<Core>, raw: &RawActor, order: Order, args: Vec<ArgValue>) {
    let function = format!("{}::{}", raw.class, order.method);
    // The argument references stay alive until the call is answered: a
    // stored argument must not be freed before the actor has read it.
    let (args, failed, _keep_alive) = match core.resolve_args(&function, order.task_id, args).await
    {
        Ok((args, keep)) => (Some(args), None, keep),
        Err(f) => (None, Some(f), Vec::new()),
    };
    let mut drive = Drive::new(core, raw, order, args);
    if let Some(f) = failed {
        // Its slot is filled even so (a skip), so the actor moves past it.
        drive.answer(ObjState::Failed(f));
    }
    drive.run(Step::Send).await;
}

/// A request that went out: on which route, as which seq.
struct Sent {
    route: Arc<Route>,
    route_id: u64,
    seq: u64,
}

/// Where a call's drive goes on from.
enum Step {
    /// Send at the call's current slot, in its turn there (a slot whose
    /// turn has passed sends again at once: the host answers a call it ran
    /// with its kept reply).
    Send,
    /// The reply, or its loss, to the request sent as [`Sent`] (boxed: a
    /// reply is large, and a step is moved from turn to turn).
    Reply(
        Sent,
        Box<std::result::Result<WorkerReply, shoal_net::RpcError>>,
    ),
}

/// What a reply (or its loss) means for a call.
enum Judged {
    /// Answered.
    Done(ObjState),
    /// Answered with something that is not a call's reply: failed.
    Failed(String),
    /// Lost on a live connection to a live worker: send again, same slot.
    Again(String),
    /// The connection was lost: every open call goes to a new one.
    Reconnect(String),
    /// The incarnation is gone (its location is now dead).
    Dead(String),
}

/// Times a call is sent again at one slot (its replies lost on a live
/// connection) before it fails.
const RESENDS_MAX: u32 = 100;

/// One call on its way to an answer, after its first attempt if that was
/// made from the caller's thread: sent in its turn; sent again (same slot)
/// when a reply is lost on a live worker; moved with the other open calls
/// to a new connection or, after a restart, a new incarnation (resent
/// there within `max_task_retries`, else answered `ActorDied`); and once
/// its result is known, its slot there filled with a skip, so later calls
/// are not held.
struct Drive {
    core: Arc<Core>,
    raw: RawActor,
    order: Order,
    args: Option<Vec<ArgSpec>>,
    /// The reference is resolved.
    answered: bool,
    /// The incarnation the call was last sent to with its arguments (it
    /// may have run there).
    tried: Option<Arc<Location>>,
    /// Times it was sent again to a new incarnation.
    retries: u32,
    /// Times it was sent again at one slot.
    resends: u32,
    reach: Reach,
}

impl Drive {
    fn new(core: &Arc<Core>, raw: &RawActor, order: Order, args: Option<Vec<ArgSpec>>) -> Self {
        Self {
            core: Arc::clone(core),
            raw: raw.clone(),
            order,
            args,
            answered: false,
            tried: None,
            retries: 0,
            resends: 0,
            reach: Reach::default(),
        }
    }

    /// Resolves the call's reference, once.
    fn answer(&mut self, state: ObjState) {
        if !self.answered {
            self.answered = true;
            finish_call(&self.core, &self.raw, self.order.id, state);
        }
    }

    fn died(&self, message: &str) -> ObjState {
        ObjState::Failed(TaskFailure {
            kind: FailureKind::ActorDied,
            function: self.raw.class.clone(),
            task_id: self.order.task_id,
            node_id: None,
            message: format!("actor {}: {message}", self.raw.actor_id),
            backtrace: None,
            attempts: self.retries + 1,
        })
    }

    /// Until the call has left the outbox.
    async fn run(mut self, mut step: Step) {
        loop {
            let next = match step {
                Step::Send => self.send().await,
                Step::Reply(sent, reply) => self.on_reply(sent, *reply).await,
            };
            match next {
                Some(next) => step = next,
                None => break,
            }
        }
        // Left without an answer only if another path closed it.
        let died = self.died("the call was abandoned");
        self.answer(died);
    }

    /// Fails the call, leaves the outbox and passes its turn on `slot`.
    fn fail(&mut self, slot: &CallSlot, message: &str) -> Option<Step> {
        let died = self.died(message);
        self.answer(died);
        self.raw.caller.outbox().close(self.order.turn);
        slot.route.sent.pass(slot.pos);
        None
    }

    /// Sends the call (or its skip) at its current slot, in its turn.
    async fn send(&mut self) -> Option<Step> {
        let caller = Arc::clone(&self.raw.caller);
        let slot = caller.outbox().slot(self.order.turn)?;
        slot.route.sent.wait(slot.pos).await;
        // Moved while it waited (the old route let its waiters go).
        if caller.outbox().route_id() != slot.route_id {
            return Some(Step::Send);
        }
        // The call holds its turn from here: each path passes it, or goes
        // round again holding it (a new route lets it go).
        let location = Arc::clone(&slot.route.location);
        if caller.gone.is_cancelled() {
            return self.fail(&slot, "it is dead");
        }
        if location.dead.is_cancelled() {
            if caller.max_restarts == 0 {
                return self.fail(&slot, "its worker has exited");
            }
            return match self.raw.relocate(&self.core, &slot).await {
                Ok(()) => Some(Step::Send),
                Err(message) => self.fail(&slot, &message),
            };
        }
        // Sent with its arguments to an incarnation that died since, the
        // call may have run there: sending it here is a retry (counted
        // once it is sent).
        let retry = !self.answered
            && self
                .tried
                .as_ref()
                .is_some_and(|tried| !Arc::ptr_eq(tried, &location));
        if retry && self.retries >= caller.max_task_retries {
            let died = self.died("its worker exited with the call in flight");
            self.answer(died);
        }
        // Once answered, only a skip: the host moves past the slot.
        let args = if self.answered {
            None
        } else {
            self.args.clone()
        };
        let with_args = args.is_some();
        let request = location.request(&self.raw, &self.order, &slot, args);
        let client = tokio::select! {
            client = self.core.worker(&location.worker.address) => client,
            _ = location.dead.cancelled() => return Some(Step::Send),
        };
        let client = match client {
            Ok(client) => {
                self.reach = Reach::default();
                client
            }
            Err(e) => {
                self.raw
                    .unreachable(&self.core, &location, e, &mut self.reach)
                    .await;
                return Some(Step::Send);
            }
        };
        match client.send(&request, CALL_TIMEOUT).await {
            Ok(in_flight) => {
                slot.route.sent.pass(slot.pos);
                if with_args {
                    if retry {
                        self.retries += 1;
                        tracing::debug!(actor_id = %self.raw.actor_id, method = self.order.method, retries = self.retries, "resent a call lost with the actor's worker");
                    }
                    self.tried = Some(Arc::clone(&location));
                }
                let reply = tokio::select! {
                    reply = in_flight.reply() => reply,
                    // The node saw the worker exit: no need to wait for
                    // the connection to time out.
                    _ = location.dead.cancelled() => Err(shoal_net::RpcError::Stream("the actor's worker exited".into())),
                    // The calls moved on (to a new connection or
                    // incarnation): so does this one, from its new slot.
                    _ = slot.route.superseded.cancelled() => return Some(Step::Send),
                };
                let sent = Sent {
                    route: slot.route,
                    route_id: slot.route_id,
                    seq: slot.seq,
                };
                Some(Step::Reply(sent, Box::new(reply)))
            }
            // Not sent: the call keeps its turn and tries again.
            Err(e) if e.is_connection_lost() => {
                caller.reroute(slot.route_id);
                Some(Step::Send)
            }
            Err(e) => self.again(&e.to_string(), Some(&slot)).await,
        }
    }

    /// Pauses before sending again at the same slot (`holding` its turn
    /// there, when the request could not be sent); fails the call past
    /// [`RESENDS_MAX`].
    async fn again(&mut self, why: &str, holding: Option<&CallSlot>) -> Option<Step> {
        self.resends += 1;
        if self.resends > RESENDS_MAX {
            let message = format!("{RESENDS_MAX} attempts at the call were lost; the last: {why}");
            return match holding {
                Some(slot) => self.fail(slot, &message),
                None => {
                    let died = self.died(&message);
                    self.answer(died);
                    self.raw.caller.outbox().close(self.order.turn);
                    None
                }
            };
        }
        tracing::debug!(actor_id = %self.raw.actor_id, method = self.order.method, %why, "sending an actor call again");
        let location = self.raw.caller.location();
        tokio::select! {
            _ = tokio::time::sleep(backoff(self.resends)) => {}
            _ = location.dead.cancelled() => {}
        }
        Some(Step::Send)
    }

    /// Acts on the reply (or its loss) to the request sent as `sent`.
    async fn on_reply(
        &mut self,
        sent: Sent,
        reply: std::result::Result<WorkerReply, shoal_net::RpcError>,
    ) -> Option<Step> {
        let location = Arc::clone(&sent.route.location);
        match judge(reply, &location) {
            Judged::Done(state) => {
                self.answer(state);
                self.leave(&sent).await
            }
            Judged::Again(why) => self.again(&why, None).await,
            Judged::Failed(why) => {
                let died = self.died(&why);
                self.answer(died);
                self.leave(&sent).await
            }
            Judged::Reconnect(why) => {
                tracing::debug!(actor_id = %self.raw.actor_id, %why, "the connection to the actor's worker was lost; sending its open calls again");
                self.raw.caller.reroute(sent.route_id);
                Some(Step::Send)
            }
            Judged::Dead(why) => {
                tracing::debug!(actor_id = %self.raw.actor_id, %why, "the actor's incarnation is gone");
                location.dead.cancel();
                Some(Step::Send)
            }
        }
    }

    /// The host of `sent` answered: the call leaves the outbox, unless it
    /// has moved since to a new incarnation, where its slot gets a skip.
    async fn leave(&mut self, sent: &Sent) -> Option<Step> {
        let turn = self.order.turn;
        let slot = {
            let mut outbox = self.raw.caller.outbox();
            if outbox.close_on(turn, sent.route_id) {
                return None;
            }
            let slot = outbox.slot(turn)?;
            if !Arc::ptr_eq(&slot.route.location, &sent.route.location) || slot.seq != sent.seq {
                return Some(Step::Send);
            }
            // Moved to a new connection to the same incarnation, same seq:
            // that host has answered; only its turn there is owed.
            outbox.close(turn);
            slot
        };
        slot.route.sent.wait(slot.pos).await;
        slot.route.sent.pass(slot.pos);
        None
    }
}

/// What the actor's worker answered to a call (or how it was lost).
fn judge(
    reply: std::result::Result<WorkerReply, shoal_net::RpcError>,
    location: &Location,
) -> Judged {
    let refused = Judged::Failed;
    match reply {
        // A late answer from a node the head declared dead: the actor lives
        // on elsewhere (or is dead), and this instance is fenced.
        Ok(WorkerReply::TaskDone(reply))
            if crate::core::try_get().is_some_and(|core| core.watches.is_dead(reply.node_id)) =>
        {
            location.dead.cancel();
            Judged::Dead(format!(
                "its node {} was declared dead; its answer is not used",
                reply.node_id
            ))
        }
        Ok(WorkerReply::TaskDone(reply)) => Judged::Done(outcome_state(reply.outcome)),
        Ok(other) => refused(format!("its worker answered {other:?}")),
        Err(e) if location.dead.is_cancelled() => Judged::Dead(e.to_string()),
        // The worker's word that it does not host this incarnation.
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
        {
            Judged::Dead(e.message)
        }
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::Unavailable =>
        {
            Judged::Again(e.to_string())
        }
        Err(shoal_net::RpcError::Service(e)) => {
            refused(format!("its worker refused the call: {e}"))
        }
        Err(e @ (shoal_net::RpcError::Connection(_) | shoal_net::RpcError::Stream(_))) => {
            Judged::Reconnect(e.to_string())
        }
        // The request reached the worker (a discarded reply), or may have:
        // the host answers a resend with the reply of the call's one run.
        Err(e @ (shoal_net::RpcError::Injected(_) | shoal_net::RpcError::Timeout(_))) => {
            Judged::Again(e.to_string())
        }
        Err(e) => refused(format!("the call failed: {e}")),
    }
}

/// An actor hosted by this worker.
pub(crate) struct Hosted {
    class: &'static ActorClass,
    incarnation: u32,
    state: Arc<RwLock<ActorState>>,
    permits: Arc<Semaphore>,
    /// Per caller: its turns and the replies kept for its resends.
    callers: Mutex<HashMap<WorkerId, Arc<CallerLine>>>,
    /// For an actor of sync methods: its own threads (`max_concurrency` of
    /// them), fed calls in order (the next call is queued while this one
    /// runs, so back-to-back calls cost no thread hand-offs).
    lane: Option<Lane>,
    /// Per method (in the class's order): its last run was quick (see
    /// [`crate::exec::claim_inline`]).
    quick: Arc<[std::sync::atomic::AtomicBool]>,
}

/// One caller's calls at a hosted actor.
#[derive(Default)]
struct CallerLine {
    /// The next sequence number allowed to start.
    turns: Turns,
    /// The replies of calls that ran, for their resends.
    kept: Mutex<KeptReplies<TaskReply>>,
}

impl CallerLine {
    fn kept(&self) -> MutexGuard<'_, KeptReplies<TaskReply>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether some run of call `seq` has taken its turn.
    fn turn_passed(&self, seq: u64) -> bool {
        self.turns.is_turn(seq.saturating_add(1))
    }

    /// What the table says of call `seq` (it takes no place).
    fn seen(&self, seq: u64) -> Seen<TaskReply> {
        let mut kept = self.kept();
        kept.seen(seq, self.turn_passed(seq))
    }

    /// In `seq`'s turn: [`Seen::New`] when this copy is to run it (its run
    /// is then recorded as started), else how to answer it.
    fn begin(&self, seq: u64) -> Seen<TaskReply> {
        let mut kept = self.kept();
        let seen = kept.seen(seq, self.turn_passed(seq));
        if matches!(seen, Seen::New) {
            kept.start(seq);
        }
        seen
    }
}

/// A call's run: its reply is kept when it ends; dropped before that (its
/// handler abandoned), the copies waiting for it get an error.
struct Running {
    line: Arc<CallerLine>,
    seq: u64,
    ended: bool,
}

impl Running {
    fn finish(mut self, reply: TaskReply) {
        self.ended = true;
        self.line.kept().finish(self.seq, reply);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.ended {
            self.line.kept().abandon(self.seq);
        }
    }
}

/// Most threads of an actor's own (past this, its calls run on the
/// runtime's blocking threads).
const LANE_THREADS_MAX: u32 = 64;

/// A call queued on an actor's own thread.
type LaneJob = Box<dyn FnOnce() + Send>;

/// An actor's own thread; it ends when the actor is dropped.
struct Lane {
    jobs: std::sync::mpsc::Sender<LaneJob>,
    threads: u32,
    /// Calls queued or running.
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

/// A sync method and its arguments.
enum SyncCall {
    Ref(
        fn(&ActorState, crate::shm::Args) -> crate::registry::Invocation,
        crate::shm::Args,
    ),
    Mut(
        fn(&mut ActorState, crate::shm::Args) -> crate::registry::Invocation,
        crate::shm::Args,
    ),
}

impl SyncCall {
    /// Runs under the state's lock: `&self` methods share it unless
    /// `exclusive` (an actor running one call at a time).
    fn run_locked(
        self,
        state: &RwLock<ActorState>,
        exclusive: bool,
    ) -> crate::registry::Invocation {
        match self {
            SyncCall::Ref(f, args) if !exclusive => f(&state.blocking_read(), args),
            SyncCall::Ref(f, args) => f(&state.blocking_write(), args),
            SyncCall::Mut(f, args) => f(&mut state.blocking_write(), args),
        }
    }

    fn run_on(self, state: &mut ActorState) -> crate::registry::Invocation {
        match self {
            SyncCall::Ref(f, args) => f(state, args),
            SyncCall::Mut(f, args) => f(state, args),
        }
    }
}

impl Lane {
    /// `threads` threads taking calls from one queue, in order.
    fn start(class: &str, threads: u32) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<LaneJob>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!(
                    "actor {}",
                    class.rsplit("::").next().unwrap_or(class)
                ))
                .spawn(move || loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Self {
            jobs,
            threads: threads.max(1),
            busy: Arc::default(),
        })
    }

    /// For an actor running one call at a time with nothing queued or
    /// running: claims the actor and its state for a call run by the
    /// caller's thread (release with [`Lane::done`]).
    fn run_here(
        &self,
        state: &Arc<RwLock<ActorState>>,
    ) -> Option<tokio::sync::OwnedRwLockWriteGuard<ActorState>> {
        let multi_thread =
            core::runtime_flavor() == Some(tokio::runtime::RuntimeFlavor::MultiThread);
        if self.threads != 1 || !multi_thread {
            return None;
        }
        self.busy
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        match Arc::clone(state).try_write_owned() {
            Ok(guard) => Some(guard),
            Err(_) => {
                self.done();
                None
            }
        }
    }

    /// A call claimed or queued has ended.
    fn done(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Runs a call claimed with [`Lane::run_here`] on this runtime thread:
    /// directly if the method was `quick` last time (see
    /// [`crate::exec::claim_inline`]), else with the thread's other work handed
    /// away first.
    async fn run_claimed(
        quick: &std::sync::atomic::AtomicBool,
        run: impl FnOnce() -> Invoked,
    ) -> Invoked {
        match crate::exec::claim_inline(quick).await {
            Some(_slot) => crate::exec::timed(quick, run),
            None => tokio::task::block_in_place(|| crate::exec::timed(quick, run)),
        }
    }

    /// Queues `f` on the actor's thread, after the calls queued before it
    /// (the queueing is done when this returns); the future is its result.
    fn queue(
        &self,
        running: core::Running,
        f: impl FnOnce() -> crate::registry::Invocation + Send + 'static,
    ) -> impl Future<Output = Invoked> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let busy = Arc::clone(&self.busy);
        let job: LaneJob = Box::new(move || {
            let out = run_caught(running, f);
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(out);
        });
        let stopped = || Err(("the actor's thread has stopped".into(), String::new()));
        self.busy.fetch_add(1, Ordering::SeqCst);
        let sent = self.jobs.send(job).is_ok();
        if !sent {
            self.done();
        }
        async move {
            if !sent {
                return stopped();
            }
            rx.await.unwrap_or_else(|_| stopped())
        }
    }
}

/// The actors this worker hosts.
#[derive(Default)]
pub(crate) struct Host {
    actors: dashmap::DashMap<ActorId, Arc<Hosted>>,
}

fn failure(
    kind: FailureKind,
    function: &str,
    task_id: TaskId,
    executor: Executor,
    message: String,
) -> TaskFailure {
    TaskFailure {
        kind,
        function: function.to_string(),
        task_id,
        node_id: Some(executor.node_id),
        message,
        backtrace: None,
        attempts: 1,
    }
}

impl Host {
    /// Runs the constructor and keeps the actor.
    pub(crate) async fn create(
        &self,
        core: &Arc<Core>,
        actor_id: ActorId,
        class_name: &str,
        args: Vec<ArgSpec>,
        (max_concurrency, incarnation): (u32, u32),
        executor: Executor,
    ) -> Option<TaskFailure> {
        let fail = |kind, message| {
            Some(failure(
                kind,
                class_name,
                TaskId::fresh(),
                executor,
                message,
            ))
        };
        let Some(class) = registry::actor_class(class_name) else {
            return fail(
                FailureKind::FunctionNotFound,
                format!("no actor class named {class_name:?} in this executable"),
            );
        };
        let args = match core.fetch_args(&args).await {
            Ok(args) => args,
            Err(e) => return fail(FailureKind::ArgumentLost, e.to_string()),
        };
        let construct = class.construct;
        let built =
            tokio::task::spawn_blocking(move || crate::exec::caught(|| construct(args))).await;
        let state = match built {
            Ok(Ok(Ok(state))) => state,
            Ok(Ok(Err(e))) => return fail(e.kind, e.message),
            Ok(Err((message, _))) => {
                return fail(
                    FailureKind::Panic,
                    format!("the constructor panicked: {message}"),
                );
            }
            Err(e) => {
                return fail(
                    FailureKind::Panic,
                    format!("the constructor's thread failed: {e}"),
                )
            }
        };
        let all_sync = class
            .methods
            .iter()
            .all(|(_, m)| matches!(m, MethodInvoker::Ref(_) | MethodInvoker::Mut(_)));
        let lane = if max_concurrency <= LANE_THREADS_MAX && all_sync {
            match Lane::start(class.name, max_concurrency) {
                Ok(lane) => Some(lane),
                Err(e) => {
                    return fail(
                        FailureKind::Panic,
                        format!("cannot start the actor's thread: {e}"),
                    )
                }
            }
        } else {
            None
        };
        let hosted = Hosted {
            class,
            incarnation,
            state: Arc::new(RwLock::new(state)),
            permits: Arc::new(Semaphore::new(max_concurrency.max(1) as usize)),
            callers: Mutex::new(HashMap::new()),
            lane,
            quick: class.methods.iter().map(|_| Default::default()).collect(),
        };
        self.actors.insert(actor_id, Arc::new(hosted));
        None
    }

    /// Runs one call, in its caller's order, once: a call sent again (its
    /// reply was lost) is answered with the reply its run gave, or waits
    /// for that run to end, and is never run a second time.
    pub(crate) async fn call(
        &self,
        core: &Arc<Core>,
        call: ActorCall,
        executor: Executor,
    ) -> std::result::Result<TaskReply, shoal_proto::ServiceError> {
        let hosted = self
            .actors
            .get(&call.actor_id)
            .map(|h| Arc::clone(&h))
            .filter(|h| h.incarnation == call.incarnation)
            .ok_or_else(|| {
                shoal_proto::ServiceError::new(
                    shoal_proto::ServiceErrorKind::NotFound,
                    format!(
                        "actor {} (incarnation {}) is not hosted here",
                        call.actor_id, call.incarnation
                    ),
                )
            })?;
        let line = hosted.line(call.caller);
        line.kept().forget_below(call.done_below);
        // Seen before (a resend): answered without fetching its arguments.
        let seen = line.seen(call.seq);
        if !matches!(seen, Seen::New) {
            return Ok(hosted.again(seen, &call, executor).await);
        }
        // Arguments are fetched before our turn: they need no ordering.
        let args = match &call.args {
            Some(args) => Some(core.fetch_args(args).await),
            None => None,
        };
        line.turns.wait(call.seq).await;
        // In its turn: the first copy of the call to get here runs it; a
        // copy that arrived meanwhile waits for that run's reply.
        let seen = line.begin(call.seq);
        if !matches!(seen, Seen::New) {
            return Ok(hosted.again(seen, &call, executor).await);
        }
        let running = Running {
            line: Arc::clone(&line),
            seq: call.seq,
            ended: false,
        };
        let reply = hosted.run(core, &call, args, executor, &line.turns).await;
        running.finish(reply.clone());
        Ok(reply)
    }
}

impl Hosted {
    /// The line of `caller`'s calls (made at its first call).
    fn line(&self, caller: WorkerId) -> Arc<CallerLine> {
        let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(callers.entry(caller).or_default())
    }

    /// The answer to a call that already ran or runs here.
    async fn again(
        &self,
        seen: Seen<TaskReply>,
        call: &ActorCall,
        executor: Executor,
    ) -> TaskReply {
        let function = format!("{}::{}", self.class.name, call.method);
        let dropped = |message: String| TaskReply {
            task_id: call.task_id,
            attempt: 0,
            node_id: executor.node_id,
            worker_id: executor.worker_id,
            outcome: TaskOutcome::Failed(failure(
                FailureKind::ReplyDropped,
                &function,
                call.task_id,
                executor,
                message,
            )),
            run_us: None,
        };
        match seen {
            Seen::Replay(reply) => reply,
            Seen::Wait(first) => first.await.unwrap_or_else(|_| {
                dropped(format!(
                    "call {} of this caller ended here without a reply; it is not run again",
                    call.seq
                ))
            }),
            Seen::Forgotten | Seen::New => dropped(format!(
                "call {} of this caller ran here, and its reply is no longer kept (the last {} are); it is not run again",
                call.seq,
                crate::replies::KEPT_MAX
            )),
        }
    }

    /// Runs a call in its turn (`turn`, passed once the call has its place).
    async fn run(
        &self,
        core: &Arc<Core>,
        call: &ActorCall,
        args: Option<Result<crate::shm::Args>>,
        executor: Executor,
        turn: &Turns,
    ) -> TaskReply {
        let hosted = self;
        let function = format!("{}::{}", hosted.class.name, call.method);
        let reply = |outcome| TaskReply {
            task_id: call.task_id,
            attempt: 0,
            node_id: executor.node_id,
            worker_id: executor.worker_id,
            outcome,
            run_us: None,
        };
        let advance = || turn.pass(call.seq);
        let args = match args {
            None => {
                advance();
                let f = failure(
                    FailureKind::ArgumentLost,
                    &function,
                    call.task_id,
                    executor,
                    "abandoned by its caller".into(),
                );
                return reply(TaskOutcome::Failed(f));
            }
            Some(Err(e)) => {
                advance();
                let f = failure(
                    FailureKind::ArgumentLost,
                    &function,
                    call.task_id,
                    executor,
                    e.to_string(),
                );
                return reply(TaskOutcome::Failed(f));
            }
            Some(Ok(args)) => args,
        };
        let Some((index, (_, invoker))) = hosted
            .class
            .methods
            .iter()
            .enumerate()
            .find(|(_, (name, _))| *name == call.method)
        else {
            advance();
            let f = failure(
                FailureKind::FunctionNotFound,
                &function,
                call.task_id,
                executor,
                "no such method".into(),
            );
            return reply(TaskOutcome::Failed(f));
        };
        let state = Arc::clone(&hosted.state);
        let running = core::Running {
            task: call.task_id,
            executor,
        };
        // On the actor's own thread, the place in line is taken by queueing.
        if let Some(lane) = &hosted.lane {
            let method = match invoker {
                MethodInvoker::Ref(f) => SyncCall::Ref(*f, args),
                MethodInvoker::Mut(f) => SyncCall::Mut(*f, args),
                MethodInvoker::AsyncRef(_) | MethodInvoker::AsyncMut(_) => {
                    advance();
                    let f = failure(
                        FailureKind::Panic,
                        &function,
                        call.task_id,
                        executor,
                        "an async method on an actor run by its own thread".into(),
                    );
                    return reply(TaskOutcome::Failed(f));
                }
            };
            let outcome = match lane.run_here(&state) {
                // Nothing queued or running: run it on this thread now,
                // which spares the hand-off to the actor's thread and back.
                Some(mut guard) => {
                    advance();
                    let ran = Lane::run_claimed(&hosted.quick[index], || {
                        run_caught(running, || method.run_on(&mut guard))
                    })
                    .await;
                    drop(guard);
                    lane.done();
                    ran
                }
                None => {
                    let exclusive = lane.threads == 1;
                    let queued = lane.queue(running, move || method.run_locked(&state, exclusive));
                    advance();
                    queued.await
                }
            };
            return reply(call_outcome(core, call, &function, executor, outcome).await);
        }
        // Our place is taken once we hold a permit and the lock; only then
        // may the caller's next call start competing.
        let permit = Arc::clone(&hosted.permits).acquire_owned().await;
        let outcome = match invoker {
            MethodInvoker::Ref(f) => {
                let guard = state.read_owned().await;
                advance();
                let f = *f;
                sync_call(&hosted.quick, index, running, move || f(&guard, args)).await
            }
            MethodInvoker::Mut(f) => {
                let mut guard = state.write_owned().await;
                advance();
                let f = *f;
                sync_call(&hosted.quick, index, running, move || f(&mut guard, args)).await
            }
            MethodInvoker::AsyncRef(f) => {
                let guard = state.read_owned().await;
                advance();
                await_caught(running, f(guard, args)).await
            }
            MethodInvoker::AsyncMut(f) => {
                let guard = state.write_owned().await;
                advance();
                await_caught(running, f(guard, args)).await
            }
        };
        drop(permit);
        reply(call_outcome(core, call, &function, executor, outcome).await)
    }
}

/// What a call's invocation made of its result.
async fn call_outcome(
    core: &Arc<Core>,
    call: &ActorCall,
    function: &str,
    executor: Executor,
    outcome: Invoked,
) -> TaskOutcome {
    match outcome {
        Ok(Ok(bytes)) => {
            core.outcome_of(
                call.task_id.return_object(0),
                bytes,
                (function, call.task_id, None),
                executor,
            )
            .await
        }
        Ok(Err(e)) => {
            TaskOutcome::Failed(failure(e.kind, function, call.task_id, executor, e.message))
        }
        Err((message, backtrace)) => {
            let mut f = failure(
                FailureKind::Panic,
                function,
                call.task_id,
                executor,
                message,
            );
            f.backtrace = Some(backtrace);
            TaskOutcome::Failed(f)
        }
    }
}

type Invoked = std::result::Result<crate::registry::Invocation, crate::exec::Caught>;

/// Runs a sync method on a blocking thread, catching panics.
/// Runs sync method `index` of an actor that also has async methods: on
/// this runtime thread if it was quick last time (see
/// [`crate::exec::claim_inline`]), else on a blocking thread.
async fn sync_call(
    quick: &Arc<[std::sync::atomic::AtomicBool]>,
    index: usize,
    running: core::Running,
    f: impl FnOnce() -> crate::registry::Invocation + Send + 'static,
) -> Invoked {
    if let Some(_slot) = crate::exec::claim_inline(&quick[index]).await {
        return crate::exec::timed(&quick[index], || run_caught(running, f));
    }
    let quick = Arc::clone(quick);
    let joined = tokio::task::spawn_blocking(move || {
        crate::exec::timed(&quick[index], || run_caught(running, f))
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(e) => Err((format!("the method's thread failed: {e}"), String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_namespaces_past_the_limit_are_refused_before_any_work() {
        let at_limit = "n".repeat(NAME_BYTES_MAX);
        assert!(ActorOptions::new().name(at_limit.clone()).check().is_ok());
        assert!(ActorOptions::new().namespace(at_limit).check().is_ok());
        let long = "n".repeat(NAME_BYTES_MAX + 1);
        for options in [
            ActorOptions::new().name(long.clone()),
            ActorOptions::new().namespace(long),
            ActorOptions::new().name(""),
        ] {
            assert!(
                matches!(options.check(), Err(Error::InvalidOptions(ref m)) if m.contains("bytes")),
                "{options:?}"
            );
        }
    }
}
