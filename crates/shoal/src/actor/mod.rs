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

//!
//! This module is the caller's side: handles, creating and finding actors
//! (`create`), calls (`call`) and a caller's open calls (`outbox`). The
//! host's side is `crate::worker::host`.

mod call;
mod create;
mod options;
mod outbox;

use shoal_net::sync::MutexExt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::head::Lease;
use shoal_proto::{ActorId, Address, HeadReply, HeadRequest, WorkerId};
use tokio_util::sync::CancellationToken;

pub(crate) use call::call;
use create::end_actor;
pub(crate) use create::{create, get_named, kill};
pub use options::{ActorOptions, NAME_BYTES_MAX};
use outbox::Outbox;

use crate::core::{self, Core};
use crate::error::Error;
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

    /// This handle's methods, with each call made through them cancelled
    /// past `after` (its reference then gives
    /// [`Error::Timeout`](crate::Error::Timeout); a call still waiting for
    /// its turn never runs, a running async method is dropped):
    /// `handle.timeout(Duration::from_secs(1)).method(x)`. The calls keep
    /// their place in this handle's order.
    pub fn timeout(&self, after: std::time::Duration) -> A::Methods {
        let mut raw = self.as_raw().clone();
        raw.call_timeout = Some(after);
        A::Methods::from(raw)
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
    _ctor_args: Mutex<Vec<crate::args::KeepAlive>>,
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
                crate::core::release_lease(&core2, &node, lease.lease_id, true).await;
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
type CallSlot = outbox::Slot<Arc<Route>>;

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
        self.outbox.locked()
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
    /// Calls made through this copy are cancelled past it
    /// ([`ActorHandle::timeout`]).
    call_timeout: Option<std::time::Duration>,
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
            call_timeout: None,
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
        Self::new(&crate::driver::ensure_core(), wire, lifetime)
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
                Err(crate::core::head::HeadCallError::Rpc(shoal_net::RpcError::Service(e)))
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
            Err(crate::core::head::HeadCallError::Rpc(shoal_net::RpcError::Service(e)))
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
            _ = tokio::time::sleep(crate::owner::calls::backoff(reach.tries)) => {}
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
