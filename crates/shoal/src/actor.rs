//! Actors: a struct living in its own worker process, called through a
//! typed handle.
//!
//! Creating an actor leases resources from the head, asks the lease's node
//! for a dedicated worker, and runs the constructor there. Method calls go
//! from the caller straight to that worker (the head is not on the path).
//! Each handle is a caller with its own sequence numbers: the host starts
//! one caller's calls in the order they were made. `&mut self` methods run
//! alone (a write lock); `&self` methods share a read lock, up to
//! `max_concurrency` at once, on threads, or interleaved on the runtime for
//! `async` ones. The borrow checker, through these locks, keeps the state
//! safe: an actor type must be `Send + Sync`.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use shoal_proto::head::{Lease, LeaseRequest};
use shoal_proto::worker::ActorCall;
use shoal_proto::{
    ActorId, Address, ArgSpec, FailureKind, HeadReply, HeadRequest, NodeReply, NodeRequest,
    ResourceSet, TaskFailure, TaskId, TaskOutcome, TaskReply, WorkerId, WorkerReply, WorkerRequest,
};
use tokio::sync::{watch, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::core::{self, Core, Executor, ObjState};
use crate::error::{Error, Result};
use crate::object_ref::{ArgValue, ObjectRef};
use crate::registry::{self, ActorClass, ActorState, MethodInvoker};

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
        WireActor {
            actor_id: raw.actor_id,
            class: raw.class.clone(),
            worker: raw.worker.clone(),
            node: raw.node.clone(),
            max_pending_calls: raw.caller.max_pending,
        }
        .serialize(serializer)
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

#[derive(Serialize, Deserialize)]
struct WireActor {
    actor_id: ActorId,
    class: String,
    worker: Address,
    node: String,
    max_pending_calls: Option<u32>,
}

/// Ends the actor when the creator's last handle is dropped (unless a
/// handle escaped to another process).
pub(crate) struct Lifetime {
    escaped: std::sync::atomic::AtomicBool,
    /// The lease and node holding the actor's worker (creator only).
    lease: Option<(Lease, String)>,
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        if self.escaped.load(Ordering::Relaxed) {
            return;
        }
        let (Some((lease, node)), Some(core)) = (self.lease.take(), core::try_get()) else {
            return;
        };
        let core2 = Arc::clone(core);
        core.handle.spawn(async move {
            if let Ok(node) = core2.node(&node).await {
                crate::lease::release_lease(&core2, &node, lease.lease_id, true).await;
            }
        });
    }
}

/// One caller of an actor: a handle and its clones in one process.
struct Caller {
    id: WorkerId,
    /// The next sequence number to hand out.
    seq: AtomicU64,
    /// The next sequence number whose request may go out: requests leave in
    /// order, so the host's wait for a caller's earlier calls always ends
    /// (it never waits on a request stuck behind the stream limit).
    sent: watch::Sender<u64>,
    /// Calls made and not yet answered.
    pending: AtomicU32,
    max_pending: Option<u32>,
    /// Cancelled when the actor's worker is gone.
    dead: CancellationToken,
}

impl Caller {
    /// Waits until the request of call `seq` may go out.
    async fn wait_turn(&self, seq: u64) {
        let _ = self.sent.subscribe().wait_for(|next| *next >= seq).await;
    }

    /// Lets the request of the call after `seq` go out.
    fn pass_turn(&self, seq: u64) {
        self.sent.send_modify(|next| *next = (*next).max(seq + 1));
    }
}

/// The untyped part of a handle (used by the generated code).
#[derive(Clone)]
pub struct RawActor {
    pub(crate) actor_id: ActorId,
    pub(crate) class: String,
    pub(crate) worker: Address,
    /// The node hosting the worker, which says when it exits.
    node: String,
    caller: Arc<Caller>,
    lifetime: Arc<Lifetime>,
}

impl RawActor {
    fn new(core: &Arc<Core>, wire: WireActor, lifetime: Arc<Lifetime>) -> Self {
        let caller = Arc::new(Caller {
            id: WorkerId::random(),
            seq: AtomicU64::new(0),
            sent: watch::channel(0).0,
            pending: AtomicU32::new(0),
            max_pending: wire.max_pending_calls,
            dead: CancellationToken::new(),
        });
        watch_actor(
            core,
            wire.node.clone(),
            wire.worker.worker_id,
            Arc::downgrade(&caller),
        );
        Self {
            actor_id: wire.actor_id,
            class: wire.class,
            worker: wire.worker,
            node: wire.node,
            caller,
            lifetime,
        }
    }

    fn borrowed(wire: WireActor) -> Self {
        let lifetime = Arc::new(Lifetime {
            escaped: true.into(),
            lease: None,
        });
        Self::new(&crate::ensure_core(), wire, lifetime)
    }
}

/// Watches the actor's worker through its node while any handle of this
/// caller lives; marks the caller's actor dead when the worker exits.
fn watch_actor(
    core: &Arc<Core>,
    node: String,
    worker_id: WorkerId,
    caller: std::sync::Weak<Caller>,
) {
    let core2 = Arc::clone(core);
    core.handle.spawn(async move {
        let watch = NodeRequest::WatchWorker {
            worker_id,
            wait_ms: 20_000,
        };
        loop {
            if caller.strong_count() == 0 {
                return;
            }
            let alive = match core2.node(&node).await {
                Ok(client) => matches!(
                    client.call(&watch, Duration::from_secs(30)).await,
                    Ok(NodeReply::WorkerStatus { alive: true })
                ),
                Err(_) => false,
            };
            if !alive {
                if let Some(caller) = caller.upgrade() {
                    caller.dead.cancel();
                }
                return;
            }
        }
    });
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
}

/// Creates an actor of `A` with constructor arguments `args`.
pub(crate) fn create<A: Actor>(
    options: ActorOptions,
    args: Vec<ArgValue>,
) -> Result<ActorHandle<A>> {
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
    // Kept until the constructor has run: its stored arguments must not be
    // freed before the worker reads them.
    let (args, _keep_alive) = core
        .resolve_args(&class, task_id, args)
        .await
        .map_err(Error::from_failure)?;
    let lease = loop {
        let request = HeadRequest::RequestLease(LeaseRequest {
            job_id: core.job_id,
            owner: core.me.worker_id,
            resources: resources.clone(),
            preferred_node: Some(core.home.node_id),
            wait_ms: 2000,
        });
        match core.head.call(&request, Duration::from_secs(15)).await? {
            HeadReply::LeaseGranted(lease) => break lease,
            HeadReply::LeasePending { infeasible: true } => {
                tracing::warn!(%class, ?resources, "no node can ever fit this actor; it waits (see `shoal status`)");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            HeadReply::LeasePending { .. } => {}
            other => {
                return Err(Error::Protocol(format!(
                    "{other:?} in answer to a lease request"
                )))
            }
        }
    };
    let node = core.node(&lease.node_address).await?;
    let detached = options.detached;
    let grant = crate::lease::grant_request(core, &lease, (true, detached));
    let worker = match node.call(&grant, Duration::from_secs(90)).await? {
        NodeReply::WorkerGranted { worker } => worker,
        other => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to GrantWorker"
            )))
        }
    };
    let node_address = node_address(&node);
    let lease_id = lease.lease_id;
    let node_id = lease.node_id;
    // Until it is registered, dropping this ends the worker: a failed
    // creation leaves nothing behind.
    let lifetime = Arc::new(Lifetime {
        escaped: false.into(),
        lease: Some((lease, node_address.clone())),
    });
    let client = core.worker(&worker.address).await?;
    let create = WorkerRequest::CreateActor {
        actor_id,
        class: class.clone(),
        args,
        max_concurrency,
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
    };
    match core
        .head
        .call(&HeadRequest::RegisterActor(info), Duration::from_secs(30))
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
    // A detached actor is not ended by its creator's handles.
    lifetime.escaped.store(detached, Ordering::Relaxed);
    let wire = WireActor {
        actor_id,
        class,
        worker,
        node: node_address,
        max_pending_calls: options.max_pending_calls,
    };
    Ok(RawActor::new(core, wire, lifetime))
}

/// The actor named `name` in `namespace`, checked to be of class `A`.
pub(crate) fn get_named<A: Actor>(name: &str, namespace: &str) -> Result<ActorHandle<A>> {
    let core = crate::ensure_core();
    let ask = HeadRequest::GetNamedActor {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let core2 = Arc::clone(&core);
    let reply =
        core.block_on(async move { Ok(core2.head.call(&ask, Duration::from_secs(30)).await) })?;
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
    let wire = WireActor {
        actor_id: info.actor_id,
        class: info.class,
        worker: info.worker,
        node: info.node_address,
        max_pending_calls: info.max_pending_calls,
    };
    Ok(ActorHandle::new(RawActor::borrowed(wire)))
}

/// Ends an actor now: the head forgets it (its name is free again) and its
/// node stops its worker. Calls in flight and later get `Error::ActorDied`.
pub(crate) fn kill(raw: &RawActor) -> Result<()> {
    let core = crate::ensure_core();
    let core2 = Arc::clone(&core);
    let actor_id = raw.actor_id;
    let info = core.block_on(async move {
        match core2
            .head
            .call(
                &HeadRequest::KillActor { actor_id },
                Duration::from_secs(30),
            )
            .await?
        {
            HeadReply::Actor(info) => Ok(info),
            other => Err(Error::Protocol(format!("{other:?} in answer to KillActor"))),
        }
    })?;
    raw.caller.dead.cancel();
    let core2 = Arc::clone(&core);
    core.block_on(async move {
        let node = core2.node(&info.node_address).await?;
        node.call(
            &NodeRequest::KillWorker {
                worker_id: info.worker.worker_id,
            },
            Duration::from_secs(10),
        )
        .await?;
        Ok(())
    })
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
    if raw.caller.dead.is_cancelled() {
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
    let seq = raw.caller.seq.fetch_add(1, Ordering::SeqCst);

    let raw = raw.clone();
    let core2 = Arc::clone(&core);
    core.handle.spawn(async move {
        let state = call_raw(&core2, &raw, seq, task_id, method, args).await;
        raw.caller.pending.fetch_sub(1, Ordering::SeqCst);
        core2.complete_object(id, state);
        // The handle (and its lifetime) lives until the call is answered.
        drop(raw);
    });
    ObjectRef::adopt(id, core.me.clone())
}

async fn call_raw(
    core: &Arc<Core>,
    raw: &RawActor,
    seq: u64,
    task_id: TaskId,
    method: &'static str,
    args: Vec<ArgValue>,
) -> ObjState {
    let function = format!("{}::{method}", raw.class);
    // The argument references stay alive until the call is answered: a
    // stored argument must not be freed before the actor has read it.
    let (args, failed, _keep_alive) = match core.resolve_args(&function, task_id, args).await {
        Ok((args, keep)) => (Some(args), None, keep),
        Err(f) => (None, Some(f), Vec::new()),
    };
    let died = |message: String| {
        ObjState::Failed(TaskFailure {
            kind: FailureKind::ActorDied,
            function: raw.class.clone(),
            task_id,
            node_id: None,
            message: format!("actor {}: {message}", raw.actor_id),
            backtrace: None,
            attempts: 1,
        })
    };
    let client = match core.worker(&raw.worker.address).await {
        Ok(c) => c,
        Err(e) => {
            // Later calls must not wait for this one to be sent.
            raw.caller.wait_turn(seq).await;
            raw.caller.pass_turn(seq);
            return died(format!("its worker is unreachable ({e})"));
        }
    };
    // Sent even when an argument failed, so the actor moves past `seq`.
    let request = WorkerRequest::ActorCall(ActorCall {
        actor_id: raw.actor_id,
        caller: raw.caller.id,
        seq,
        task_id,
        method: method.to_string(),
        args,
    });
    raw.caller.wait_turn(seq).await;
    let in_flight = client.send(&request, CALL_TIMEOUT).await;
    raw.caller.pass_turn(seq);
    let reply = match in_flight {
        Ok(in_flight) => tokio::select! {
            reply = in_flight.reply() => reply,
            // The node saw the worker exit: no need to wait for the
            // connection to time out.
            _ = raw.caller.dead.cancelled() => Err(shoal_net::RpcError::Stream("the actor's worker exited".into())),
        },
        Err(e) => Err(e),
    };
    if let Some(f) = failed {
        return ObjState::Failed(f);
    }
    match reply {
        Ok(WorkerReply::TaskDone(reply)) => match reply.outcome {
            TaskOutcome::Inline(bytes) => ObjState::Inline(Arc::new(bytes)),
            TaskOutcome::Stored(at) => ObjState::Stored(at),
            TaskOutcome::Failed(f) => ObjState::Failed(f),
        },
        Ok(other) => died(format!("its worker answered {other:?}")),
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
        {
            died(e.message)
        }
        Err(e) => died(format!("the call was lost ({e})")),
    }
}

/// An actor hosted by this worker.
pub(crate) struct Hosted {
    class: &'static ActorClass,
    state: Arc<RwLock<ActorState>>,
    permits: Arc<Semaphore>,
    /// Per caller: the next sequence number allowed to start.
    callers: Mutex<HashMap<WorkerId, watch::Sender<u64>>>,
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
        max_concurrency: u32,
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
        let built = tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(AssertUnwindSafe(|| construct(args)))
        })
        .await;
        let state = match built {
            Ok(Ok(Ok(state))) => state,
            Ok(Ok(Err(e))) => return fail(e.kind, e.message),
            Ok(Err(_)) => {
                let (message, _) = crate::exec::take_panic();
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
        let hosted = Hosted {
            class,
            state: Arc::new(RwLock::new(state)),
            permits: Arc::new(Semaphore::new(max_concurrency.max(1) as usize)),
            callers: Mutex::new(HashMap::new()),
        };
        self.actors.insert(actor_id, Arc::new(hosted));
        None
    }

    /// Runs one call, in its caller's order.
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
            .ok_or_else(|| {
                shoal_proto::ServiceError::new(
                    shoal_proto::ServiceErrorKind::NotFound,
                    format!("actor {} is not hosted here", call.actor_id),
                )
            })?;
        let function = format!("{}::{}", hosted.class.name, call.method);
        let reply = |outcome| TaskReply {
            task_id: call.task_id,
            attempt: 0,
            node_id: executor.node_id,
            worker_id: executor.worker_id,
            outcome,
        };
        // Arguments are fetched before our turn: they need no ordering.
        let args = match &call.args {
            Some(args) => Some(core.fetch_args(args).await),
            None => None,
        };
        let turn = {
            let mut callers = hosted.callers.lock().unwrap_or_else(|e| e.into_inner());
            callers
                .entry(call.caller)
                .or_insert_with(|| watch::channel(0).0)
                .clone()
        };
        let mut turn_rx = turn.subscribe();
        let _ = turn_rx.wait_for(|next| *next >= call.seq).await;
        let advance = || turn.send_modify(|next| *next = (*next).max(call.seq + 1));
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
                return Ok(reply(TaskOutcome::Failed(f)));
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
                return Ok(reply(TaskOutcome::Failed(f)));
            }
            Some(Ok(args)) => args,
        };
        let Some((_, invoker)) = hosted
            .class
            .methods
            .iter()
            .find(|(name, _)| *name == call.method)
        else {
            advance();
            let f = failure(
                FailureKind::FunctionNotFound,
                &function,
                call.task_id,
                executor,
                "no such method".into(),
            );
            return Ok(reply(TaskOutcome::Failed(f)));
        };
        // Our place is taken once we hold a permit and the lock; only then
        // may the caller's next call start competing.
        let permit = Arc::clone(&hosted.permits).acquire_owned().await;
        let state = Arc::clone(&hosted.state);
        let running = core::Running {
            task: call.task_id,
            executor,
        };
        let outcome = match invoker {
            MethodInvoker::Ref(f) => {
                let guard = state.read_owned().await;
                advance();
                let f = *f;
                blocking(running, move || f(&guard, args)).await
            }
            MethodInvoker::Mut(f) => {
                let mut guard = state.write_owned().await;
                advance();
                let f = *f;
                blocking(running, move || f(&mut guard, args)).await
            }
            MethodInvoker::AsyncRef(f) => {
                let guard = state.read_owned().await;
                advance();
                in_task(running, f(guard, args)).await
            }
            MethodInvoker::AsyncMut(f) => {
                let guard = state.write_owned().await;
                advance();
                in_task(running, f(guard, args)).await
            }
        };
        drop(permit);
        let outcome = match outcome {
            Ok(Ok(bytes)) => {
                core.outcome_of(
                    call.task_id.return_object(0),
                    bytes,
                    &function,
                    call.task_id,
                    executor,
                )
                .await
            }
            Ok(Err(e)) => TaskOutcome::Failed(failure(
                e.kind,
                &function,
                call.task_id,
                executor,
                e.message,
            )),
            Err((message, backtrace)) => {
                let mut f = failure(
                    FailureKind::Panic,
                    &function,
                    call.task_id,
                    executor,
                    message,
                );
                f.backtrace = Some(backtrace);
                TaskOutcome::Failed(f)
            }
        };
        Ok(reply(outcome))
    }
}

type Invoked = std::result::Result<crate::registry::Invocation, (String, String)>;

/// Runs an async method as the current task, catching panics.
async fn in_task(
    running: core::Running,
    method: crate::registry::BoxFuture<crate::registry::Invocation>,
) -> Invoked {
    core::scope_current_task(running, AssertUnwindSafe(method).catch_unwind())
        .await
        .map_err(|_| crate::exec::take_panic())
}

/// Runs a sync method on a blocking thread, catching panics.
async fn blocking(
    running: core::Running,
    f: impl FnOnce() -> crate::registry::Invocation + Send + 'static,
) -> Invoked {
    let joined = tokio::task::spawn_blocking(move || {
        core::with_current_task(running, || {
            std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| crate::exec::take_panic())
        })
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(e) => Err((format!("the method's thread failed: {e}"), String::new())),
    }
}
