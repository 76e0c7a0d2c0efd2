//! The per-process runtime behind the SDK: one [`Core`] per driver or
//! worker process.
//!
//! It owns a tokio runtime, one QUIC endpoint (client to the head, nodes and
//! workers; server for the worker service), the table of objects this
//! process owns or has cached, their reference counts, and the lease manager
//! that finds workers for tasks. The owner of a task is the process that
//! submitted it: it resolves the arguments, leases a worker through the head,
//! pushes the task straight to the worker, and keeps the result.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use serde::de::DeserializeOwned;
use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::{endpoint, tls, JoinToken, NetLimits, Peer, RpcClient, Service};
use shoal_proto::{
    Address, ArgSpec, FailureKind, FunctionId, HeadReply, HeadRequest, JobId, NodeId, NodeReply,
    NodeRequest, ObjectId, ObjectValue, Role, ServiceError, ServiceErrorKind, StoredAt,
    TaskFailure, TaskId, TaskOutcome, TaskReply, TaskSpec, WorkerId, WorkerReply, WorkerRequest,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::exec;
use crate::lease::LeaseManager;
use crate::object_ref::{ArgValue, ObjectRef};
use crate::options::TaskOptions;
use crate::registry::RemoteFunction;

pub(crate) type HeadClient = RpcClient<HeadRequest, HeadReply>;
pub(crate) type NodeClient = RpcClient<NodeRequest, NodeReply>;
pub(crate) type WorkerClient = RpcClient<WorkerRequest, WorkerReply>;

/// Values up to this size travel inline; larger ones go to a node's store.
pub const INLINE_BYTES_MAX: usize = 100 << 10;
/// Bytes per part when moving large objects.
const CHUNK_BYTES: u32 = 8 << 20;
/// Pulls for a program waiting in `get` go first.
const GET: shoal_proto::PullPriority = shoal_proto::PullPriority::Get;
/// Longest a process waits for its node to pull an object from another.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// A pushed task may run this long before its caller gives up on the reply
/// (a dead worker is noticed much sooner, by the connection's idle timeout).
const TASK_CALL_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a `put` into a full store waits for room before failing.
const STORE_FULL_WAIT: Duration = Duration::from_secs(5);
/// Deadline of control requests.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// The TLS name of worker and driver endpoints.
pub(crate) const WORKER_SERVER_NAME: &str = "shoal-worker";

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static CORE: OnceLock<Arc<Core>> = OnceLock::new();

/// The process's runtime, started on first use.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal")
        .build()
        .map_err(|e| Error::NotInitialized(format!("cannot start the runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// The core, if initialised.
pub(crate) fn try_get() -> Option<&'static Arc<Core>> {
    CORE.get()
}

/// The core.
pub(crate) fn get() -> Result<Arc<Core>> {
    try_get()
        .cloned()
        .ok_or_else(|| Error::NotInitialized("call shoal::init first".into()))
}

/// Installs the core; false if one was already installed.
pub(crate) fn install(core: Arc<Core>) -> bool {
    CORE.set(core).is_ok()
}

/// The state of an object in this process.
#[derive(Clone, Debug)]
pub(crate) enum ObjState {
    Pending,
    Inline(Arc<Vec<u8>>),
    Stored(StoredAt),
    Failed(TaskFailure),
    Lost(String),
    /// A borrowed object whose owner is gone.
    OwnerDied(String),
}

/// How to make a task's stored result again if its copy is lost: the task
/// and its arguments (whose objects are kept alive meanwhile).
pub(crate) struct Lineage {
    task_id: TaskId,
    function: &'static RemoteFunction,
    options: TaskOptions,
    args: Mutex<Vec<ArgSpec>>,
    _keep_alive: Mutex<Vec<crate::object_ref::KeepAlive>>,
    /// Re-executions left (from the task's `max_retries`); held through a
    /// rebuild, so there is one at a time.
    left: tokio::sync::Mutex<u32>,
}

/// An object's state and the waiters for it.
pub(crate) struct Slot {
    state: Mutex<ObjState>,
    /// `state` is not `Pending` (read without the lock by `wait`'s scans).
    ready: std::sync::atomic::AtomicBool,
    notify: Notify,
    /// True if this process owns the object (else it is a cached borrow).
    owned: bool,
    /// For a stored task result this process owns: how to rebuild it.
    lineage: Mutex<Option<Arc<Lineage>>>,
}

impl Slot {
    fn new(state: ObjState, owned: bool) -> Arc<Self> {
        Arc::new(Self {
            ready: std::sync::atomic::AtomicBool::new(!matches!(state, ObjState::Pending)),
            state: Mutex::new(state),
            notify: Notify::new(),
            owned,
            lineage: Mutex::new(None),
        })
    }

    fn lineage(&self) -> Option<Arc<Lineage>> {
        self.lineage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn state(&self) -> ObjState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn is_pending(&self) -> bool {
        !self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self, state: ObjState) {
        let ready = !matches!(state, ObjState::Pending);
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *guard = state;
        self.ready
            .store(ready, std::sync::atomic::Ordering::Release);
        drop(guard);
        self.notify.notify_waiters();
    }

    /// Waits until the object is no longer pending; `None` on timeout.
    async fn ready(&self, deadline: Option<tokio::time::Instant>) -> Option<ObjState> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let state = self.state();
            if !matches!(state, ObjState::Pending) {
                return Some(state);
            }
            match deadline {
                Some(d) => tokio::time::timeout_at(d, notified).await.ok()?,
                None => notified.await,
            }
        }
    }
}

#[derive(Default)]
struct RefEntry {
    count: usize,
    escaped: bool,
}

/// Reference counts of the objects this process holds references to.
#[derive(Default)]
pub(crate) struct RefTable {
    entries: DashMap<ObjectId, RefEntry>,
}

impl RefTable {
    pub(crate) fn add_local(&self, id: ObjectId) {
        self.entries.entry(id).or_default().count += 1;
    }

    /// The reference left this process: keep the object for the job's life.
    pub(crate) fn mark_escaped(&self, id: ObjectId) {
        self.entries.entry(id).or_default().escaped = true;
    }

    /// Drops one reference; true if it was the last and never escaped.
    fn release(&self, id: ObjectId) -> bool {
        let mut free = false;
        self.entries.remove_if_mut(&id, |_, entry| {
            entry.count = entry.count.saturating_sub(1);
            free = entry.count == 0 && !entry.escaped;
            entry.count == 0
        });
        free
    }
}

/// The node this process puts large objects on and prefers for its tasks.
#[derive(Clone, Debug)]
pub(crate) struct HomeNode {
    pub node_id: NodeId,
    pub address: String,
    /// True when the node is on this process's host (same host identity):
    /// only then are its store files written and mapped directly.
    pub same_host: bool,
}

/// What [`Core::create_local`] found.
pub(crate) enum LocalFile {
    /// A new object's file to fill, then seal.
    Fill(std::path::PathBuf),
    /// The object is stored whole already.
    Sealed,
}

/// Which port this process's endpoint binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Ports {
    /// Any free port.
    #[default]
    Any,
    /// This one (a driver's `SHOAL_DRIVER_PORT`).
    Fixed(u16),
    /// The first free one of `lo..=hi` (a worker's `--worker-port-range`).
    Range(u16, u16),
}

impl Ports {
    /// `LO-HI`, as a node hands it to its workers.
    pub(crate) fn parse_range(text: &str) -> Option<Ports> {
        let (lo, hi) = shoal_node::config::parse_port_range(text).ok()?;
        Some(Ports::Range(lo, hi))
    }
}

/// What this process is, for the worker service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Executor {
    pub node_id: NodeId,
    pub worker_id: WorkerId,
}

/// The per-process runtime.
pub(crate) struct Core {
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) job_id: JobId,
    pub(crate) me: Address,
    /// The job's driver (this process, for a driver).
    pub(crate) driver: Address,
    pub(crate) home: HomeNode,
    /// The node hosting this process, for a worker (a driver has none): its
    /// leases go with that node when it dies.
    pub(crate) hosting_node: Option<NodeId>,
    /// The home node's store directory, when this process is on its host
    /// (asked once): objects there are written and mapped directly.
    local_store: tokio::sync::OnceCell<Option<std::path::PathBuf>>,
    /// Mappings of the store files this process wrote large objects into.
    write_maps: Arc<crate::shm::WriteMaps>,
    pub(crate) binary_hash: String,
    endpoint: shoal_net::quinn::Endpoint,
    client_config: shoal_net::quinn::ClientConfig,
    auth: ClientAuth,
    pub(crate) limits: NetLimits,
    pub(crate) head: HeadClient,
    nodes: DashMap<String, NodeClient>,
    workers: DashMap<String, WorkerClient>,
    /// Per address: held while a connection to it is being made.
    connecting: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    objects: DashMap<ObjectId, Arc<Slot>>,
    refs: RefTable,
    /// Woken whenever any owned object completes (for `wait`).
    pub(crate) changed: Notify,
    pub(crate) leases: LeaseManager,
    /// This process's watches of the workers it uses (one poll per node).
    pub(crate) watches: crate::watch::Watches,
    root_task: TaskId,
    put_counter: AtomicU32,
    /// The actors this worker hosts.
    pub(crate) actors: crate::actor::Host,
    /// Per worker running here: how many of its gets are waiting.
    blocked: DashMap<WorkerId, usize>,
    /// Per worker running here: one permit, held by the pushed task that
    /// runs (tasks pushed meanwhile queue for it); lent to the next task
    /// while the running one is blocked in a get.
    task_gates: DashMap<WorkerId, Arc<tokio::sync::Semaphore>>,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the job starts to end: no more lease requests.
    pub(crate) stopping: CancellationToken,
    /// Deletes of freed objects under way: shutdown waits for them.
    deletes: tokio_util::task::TaskTracker,
    /// Keeps the in-process cluster of local mode alive.
    pub(crate) local: Mutex<Option<crate::local::LocalCluster>>,
}

/// What [`Core::connect`] needs.
pub(crate) struct CoreSetup {
    pub head_address: SocketAddr,
    pub token: JoinToken,
    pub role: Role,
    pub job_id: Option<JobId>,
    pub worker_id: WorkerId,
    pub home: Option<HomeNode>,
    pub executor: Option<Executor>,
    pub upload_binary: bool,
    /// The job's driver, for workers (a driver is its own).
    pub driver: Option<Address>,
    /// The job executable's hash, when known (workers get it from the node).
    pub binary_hash: Option<String>,
    /// The IP to advertise, when given (`SHOAL_NODE_IP`, `Config::node_ip`;
    /// a node tells its workers its own).
    pub node_ip: Option<std::net::IpAddr>,
    /// The port to bind.
    pub ports: Ports,
}

impl Core {
    /// Binds this process's endpoint, serves the worker service on it,
    /// connects to the head and registers the job (drivers).
    pub(crate) async fn connect(setup: CoreSetup) -> Result<Arc<Core>> {
        exec::install_panic_hook();
        let limits = NetLimits::default();
        let cert = tls::self_signed(WORKER_SERVER_NAME)?;
        let server = endpoint::server_config(tls::server_config(&cert)?, &limits)?;
        // Reachable from other hosts unless this process was told it lives
        // on loopback (local mode, a single-host cluster on 127.0.0.1).
        let bind_ip: std::net::IpAddr = match setup.node_ip {
            Some(ip) if ip.is_loopback() => ip,
            _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        let ep = bind_endpoint(bind_ip, setup.ports, server, &limits)?;
        let port = ep
            .local_addr()
            .map_err(|e| Error::NotInitialized(e.to_string()))?
            .port();
        let client_config = endpoint::client_config(tls::token_client_config()?, &limits)?;
        let auth = ClientAuth {
            token: setup.token.clone(),
            role: setup.role,
        };
        let head: HeadClient = RpcClient::connect(
            &ep,
            client_config.clone(),
            setup.head_address,
            shoal_net::HEAD_SERVER_NAME,
            &auth,
            &limits,
        )
        .await?;
        let home = match setup.home {
            Some(home) => home,
            None => find_home(&head).await?,
        };
        // The host's advertised IP: given, else that of the cluster's node on
        // this host, else the route to the head, else the primary interface.
        let home_ip = home
            .same_host
            .then(|| home.address.parse::<SocketAddr>().ok().map(|a| a.ip()))
            .flatten()
            .filter(|ip| !ip.is_unspecified());
        let my_ip =
            shoal_net::host::advertised_ip(setup.node_ip.or(home_ip), Some(setup.head_address));
        let me = Address {
            worker_id: setup.worker_id,
            address: SocketAddr::new(my_ip, port).to_string(),
        };
        let binary_hash = match setup.binary_hash {
            Some(hash) => hash,
            None => executable_hash()?,
        };
        let job_id = match setup.job_id {
            Some(job) => job,
            None => register_job(&head, &me, &binary_hash, setup.upload_binary).await?,
        };
        let shutdown = CancellationToken::new();
        let core = Arc::new(Core {
            handle: tokio::runtime::Handle::current(),
            job_id,
            driver: setup.driver.unwrap_or_else(|| me.clone()),
            me,
            home,
            hosting_node: setup.executor.map(|e| e.node_id),
            local_store: tokio::sync::OnceCell::new(),
            write_maps: Arc::default(),
            binary_hash,
            endpoint: ep.clone(),
            client_config,
            auth,
            limits: limits.clone(),
            head,
            nodes: DashMap::new(),
            workers: DashMap::new(),
            connecting: DashMap::new(),
            objects: DashMap::new(),
            refs: RefTable::default(),
            changed: Notify::new(),
            leases: LeaseManager::default(),
            watches: Default::default(),
            root_task: TaskId::fresh(),
            put_counter: AtomicU32::new(0),
            blocked: DashMap::new(),
            task_gates: DashMap::new(),
            actors: crate::actor::Host::default(),
            shutdown: shutdown.clone(),
            stopping: CancellationToken::new(),
            deletes: tokio_util::task::TaskTracker::new(),
            local: Mutex::new(None),
        });
        let service = Arc::new(WorkerService {
            executor: setup.executor,
        });
        let server_auth = Arc::new(ServerAuth::new(
            setup.token,
            vec![Role::Driver, Role::Worker, Role::Node],
        ));
        tokio::spawn(shoal_net::rpc::serve(
            ep,
            service,
            server_auth,
            limits,
            Arc::new(HandshakeStats::default()),
            shutdown.clone(),
        ));
        Ok(core)
    }

    pub(crate) fn refs(&self) -> &RefTable {
        &self.refs
    }

    /// Runs `fut` on this runtime and blocks the calling thread for its
    /// result (see [`ObjectRef::get`] for the rules).
    pub(crate) fn block_on<T, F>(&self, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        if runtime_flavor() == Some(tokio::runtime::RuntimeFlavor::CurrentThread) {
            return Err(Error::BlockingGetInAsync);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        block_thread(move || rx.recv())?
            .map_err(|_| Error::NotInitialized("the runtime stopped".into()))?
    }

    /// Runs `fut` on this runtime and awaits it from any runtime.
    pub(crate) async fn spawn_and_wait<T, F>(&self, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .map_err(|e| Error::NotInitialized(format!("the runtime stopped: {e}")))?
    }

    async fn connect_to<Req, Rep>(
        &self,
        cache: &DashMap<String, RpcClient<Req, Rep>>,
        address: &str,
        server_name: &str,
    ) -> Result<RpcClient<Req, Rep>>
    where
        Req: serde::Serialize + Sync,
        Rep: DeserializeOwned,
    {
        if let Some(client) = cache.get(address) {
            if client.close_reason().is_none() {
                return Ok(client.clone());
            }
        }
        // One connection attempt per address at a time: a burst of calls to
        // a new peer shares one handshake instead of flooding it.
        let gate = Arc::clone(&self.connecting.entry(address.to_string()).or_default());
        let _one_at_a_time = gate.lock().await;
        if let Some(client) = cache.get(address) {
            if client.close_reason().is_none() {
                return Ok(client.clone());
            }
        }
        let addr: SocketAddr = tokio::net::lookup_host(address)
            .await
            .map_err(|e| Error::Protocol(format!("cannot resolve {address}: {e}")))?
            .next()
            .ok_or_else(|| Error::Protocol(format!("{address} resolves to nothing")))?;
        let client = RpcClient::connect(
            &self.endpoint,
            self.client_config.clone(),
            addr,
            server_name,
            &self.auth,
            &self.limits,
        )
        .await?;
        cache.insert(address.to_string(), client.clone());
        Ok(client)
    }

    pub(crate) async fn node(&self, address: &str) -> Result<NodeClient> {
        self.connect_to(&self.nodes, address, shoal_net::NODE_SERVER_NAME)
            .await
    }

    /// Closes this process's connections to workers, as a network blip
    /// would (requests in flight on them fail); returns how many. For tests
    /// of what callers do then.
    pub(crate) fn close_worker_connections(&self) -> usize {
        let mut closed = 0;
        for client in self.workers.iter() {
            if client.close_reason().is_none() {
                client.close();
                closed += 1;
            }
        }
        closed
    }

    /// The open connection to the worker at `address`, if there is one.
    pub(crate) fn cached_worker(&self, address: &str) -> Option<WorkerClient> {
        let client = self.workers.get(address)?;
        client.close_reason().is_none().then(|| client.clone())
    }

    pub(crate) async fn worker(&self, address: &str) -> Result<WorkerClient> {
        self.connect_to(&self.workers, address, WORKER_SERVER_NAME)
            .await
    }

    fn next_put_id(&self) -> ObjectId {
        let task = current_task().unwrap_or(self.root_task);
        task.put_object(self.put_counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Submits a task; the returned reference resolves to its result.
    pub(crate) fn submit<T>(
        self: &Arc<Self>,
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> ObjectRef<T> {
        let task_id = TaskId::fresh();
        let id = task_id.return_object(0);
        self.register_pending(id);
        let core = Arc::clone(self);
        self.handle.spawn(async move {
            let (outcome, lineage) = core.run_task(task_id, function, options, args).await;
            if let Some(lineage) = lineage {
                if let Some(slot) = core.objects.get(&id) {
                    *slot.lineage.lock().unwrap_or_else(|e| e.into_inner()) = Some(lineage);
                }
            }
            core.complete(id, outcome);
        });
        ObjectRef::adopt(id, self.me.clone())
    }

    /// Runs a lost stored result's task again (after rebuilding its own
    /// lost arguments the same way); returns where the new copy is.
    pub(crate) async fn reconstruct(
        self: &Arc<Self>,
        id: ObjectId,
        lost_at: &StoredAt,
        why: String,
    ) -> Result<StoredAt> {
        let lost = |reason: String| Error::ObjectLost { id, reason };
        let slot = self
            .objects
            .get(&id)
            .map(|s| Arc::clone(&s))
            .filter(|s| s.owned)
            .ok_or_else(|| lost(why.clone()))?;
        let lineage = slot.lineage().ok_or_else(|| {
            lost(format!(
                "{why}; it cannot be rebuilt (not a task result, or max_retries = 0)"
            ))
        })?;
        let mut left = lineage.left.lock().await;
        // Rebuilt by another reader meanwhile?
        if let ObjState::Stored(at) = slot.state() {
            if at.node_id != lost_at.node_id {
                return Ok(at);
            }
        }
        loop {
            if *left == 0 {
                return Err(lost(format!("{why}; its task's retries are used up")));
            }
            *left -= 1;
            warn!(%id, function = lineage.function.name, "a task's result was lost with its node; running the task again");
            let args = lineage
                .args
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let attempt = lineage.options.max_retries - *left;
            let state = self
                .run_resolved(
                    lineage.task_id,
                    lineage.function,
                    &lineage.options,
                    &args,
                    attempt,
                )
                .await;
            match state {
                ObjState::Stored(at) => {
                    slot.set(ObjState::Stored(at.clone()));
                    return Ok(at);
                }
                ObjState::Failed(f) if f.kind == FailureKind::ArgumentLost => {
                    // Rebuild the arguments this process owns, then retry.
                    let rebuilt = Box::pin(self.reconstruct_args(&args)).await;
                    *lineage.args.lock().unwrap_or_else(|e| e.into_inner()) = rebuilt;
                }
                ObjState::Failed(f) => return Err(Error::from_failure(f)),
                other => {
                    return Err(lost(format!(
                        "{why}; its task ran again but gave {other:?}"
                    )))
                }
            }
        }
    }

    /// The arguments with each stored one this process owns checked, and
    /// rebuilt if its copy is gone.
    async fn reconstruct_args(self: &Arc<Self>, args: &[ArgSpec]) -> Vec<ArgSpec> {
        let mut out = Vec::with_capacity(args.len());
        for arg in args {
            let ArgSpec::Stored { id, at } = arg else {
                out.push(arg.clone());
                continue;
            };
            let readable = self.read_stored_part(*id, at).await;
            let at = match readable {
                Ok(()) => at.clone(),
                Err(e) => match self.reconstruct(*id, at, e.to_string()).await {
                    Ok(at) => at,
                    Err(_) => at.clone(),
                },
            };
            out.push(ArgSpec::Stored { id: *id, at });
        }
        out
    }

    /// Checks that a stored object's copy can still be read (its first byte).
    async fn read_stored_part(&self, id: ObjectId, at: &StoredAt) -> Result<()> {
        let node = self.node(&at.node_address).await?;
        let read = NodeRequest::ReadObject {
            id,
            offset: 0,
            len: 1,
        };
        match node.call_idempotent(&read, CONTROL_TIMEOUT).await? {
            NodeReply::ObjectChunk { .. } => Ok(()),
            other => Err(Error::Protocol(format!(
                "{other:?} in answer to ReadObject"
            ))),
        }
    }

    /// Waits for reference arguments and turns every argument into what
    /// goes on the wire; returns the references to keep alive meanwhile. A
    /// failed argument fails the call the same way.
    pub(crate) async fn resolve_args(
        self: &Arc<Self>,
        function: &str,
        task_id: TaskId,
        args: Vec<ArgValue>,
    ) -> std::result::Result<(Vec<ArgSpec>, Vec<crate::object_ref::KeepAlive>), TaskFailure> {
        let failure = |kind, message: String| TaskFailure {
            kind,
            function: function.to_string(),
            task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts: 0,
        };
        let mut spec_args = Vec::with_capacity(args.len());
        let mut keep_alive = Vec::new();
        for (index, arg) in args.into_iter().enumerate() {
            match arg {
                ArgValue::Bytes(bytes) => spec_args.push(ArgSpec::Inline(bytes)),
                ArgValue::Bad(message) => {
                    return Err(failure(
                        FailureKind::BadArguments,
                        format!("argument {index} cannot be encoded: {message}"),
                    ))
                }
                ArgValue::Ref { id, owner, _keep } => {
                    keep_alive.push(_keep);
                    match self.wait_state(id, &owner, None).await {
                        Some(ObjState::Inline(bytes)) => {
                            spec_args.push(ArgSpec::Inline(bytes.to_vec()))
                        }
                        Some(ObjState::Stored(at)) => spec_args.push(ArgSpec::Stored { id, at }),
                        Some(ObjState::Failed(f)) => return Err(f),
                        Some(ObjState::Lost(why) | ObjState::OwnerDied(why)) => {
                            return Err(failure(
                                FailureKind::ArgumentLost,
                                format!("argument {index} (object {id}) is lost: {why}"),
                            ))
                        }
                        Some(ObjState::Pending) | None => {
                            return Err(failure(
                                FailureKind::ArgumentLost,
                                format!("argument {index} (object {id}) never became ready"),
                            ))
                        }
                    }
                }
            }
        }
        Ok((spec_args, keep_alive))
    }

    /// Runs a task to its result; a stored result keeps its lineage when the
    /// task may be retried.
    async fn run_task(
        self: &Arc<Self>,
        task_id: TaskId,
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> (ObjState, Option<Arc<Lineage>>) {
        // The references stay alive until the task is done: a stored
        // argument must not be freed while a worker may still read it.
        let (spec_args, keep_alive) = match self.resolve_args(function.name, task_id, args).await {
            Ok(resolved) => resolved,
            Err(f) => return (ObjState::Failed(f), None),
        };
        let mut spec_args = spec_args;
        let mut state = self
            .run_resolved(task_id, function, &options, &spec_args, 0)
            .await;
        // An argument's copy was lost with its node: rebuild the ones this
        // process owns from their lineage, and run once more.
        if matches!(&state, ObjState::Failed(f) if f.kind == FailureKind::ArgumentLost)
            && spec_args
                .iter()
                .any(|a| matches!(a, ArgSpec::Stored { .. }))
        {
            let rebuilt = self.reconstruct_args(&spec_args).await;
            if rebuilt != spec_args {
                spec_args = rebuilt;
                state = self
                    .run_resolved(task_id, function, &options, &spec_args, 1)
                    .await;
            }
        }
        let lineage =
            (matches!(state, ObjState::Stored(_)) && options.max_retries > 0).then(|| {
                Arc::new(Lineage {
                    task_id,
                    function,
                    left: tokio::sync::Mutex::new(options.max_retries),
                    options,
                    args: Mutex::new(spec_args),
                    _keep_alive: Mutex::new(keep_alive),
                })
            });
        (state, lineage)
    }

    /// Runs a task whose arguments are resolved, retrying as its options
    /// allow, counting attempts from `first_attempt`.
    async fn run_resolved(
        self: &Arc<Self>,
        task_id: TaskId,
        function: &'static RemoteFunction,
        options: &TaskOptions,
        spec_args: &[ArgSpec],
        first_attempt: u32,
    ) -> ObjState {
        let failure = |kind, message: String, attempts| TaskFailure {
            kind,
            function: function.name.to_string(),
            task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts,
        };
        let mut attempt = first_attempt;
        let kind = crate::lease::TaskKind::of(function.name);
        loop {
            let place = self.leases.acquire(self, &options.resources, kind).await;
            let leased = &place.worker;
            let spec = TaskSpec {
                task_id,
                attempt,
                job_id: self.job_id,
                function: FunctionId {
                    name: function.name.to_string(),
                    signature: function.signature,
                },
                args: spec_args.to_vec(),
                resources: options.resources.clone(),
                owner: self.me.clone(),
            };
            let request = WorkerRequest::PushTask(spec);
            let push = leased.worker.call(&request, TASK_CALL_TIMEOUT);
            let reply = tokio::select! {
                reply = push => reply,
                // The node saw the worker exit: no need to wait for the
                // connection to time out.
                _ = leased.lost.cancelled() => Err(shoal_net::RpcError::Stream("the worker exited".into())),
            };
            // A late result from a node the head declared dead counts as
            // lost with its worker: its task may be running again elsewhere.
            let reply = match reply {
                Ok(WorkerReply::TaskDone(done)) if self.watches.is_dead(done.node_id) => {
                    Err(shoal_net::RpcError::Stream(format!(
                        "its node {} was declared dead; its result is not used",
                        done.node_id
                    )))
                }
                reply => reply,
            };
            match reply {
                Ok(WorkerReply::TaskDone(reply)) => {
                    kind.ran_for(reply.run_us);
                    self.leases.release(self, &place);
                    let retryable = matches!(&reply.outcome, TaskOutcome::Failed(f)
                        if matches!(f.kind, FailureKind::Error | FailureKind::Panic));
                    if retryable && options.retry_exceptions && attempt < options.max_retries {
                        attempt += 1;
                        continue;
                    }
                    return outcome_state(reply);
                }
                Ok(other) => {
                    self.leases.discard(self, leased);
                    return ObjState::Failed(failure(
                        FailureKind::BadReturn,
                        format!("the worker answered {other:?}"),
                        attempt + 1,
                    ));
                }
                Err(e) => {
                    warn!(%task_id, function = function.name, attempt, worker = %leased.worker_id, error = %e, "lost the worker running a task");
                    self.leases.discard(self, leased);
                    if attempt >= options.max_retries {
                        return ObjState::Failed(failure(
                            FailureKind::WorkerCrashed,
                            format!("the worker died ({e})"),
                            attempt + 1,
                        ));
                    }
                    attempt += 1;
                }
            }
        }
    }

    fn complete(&self, id: ObjectId, state: ObjState) {
        match self.objects.get(&id).map(|s| Arc::clone(&s)) {
            Some(slot) => slot.set(state),
            // Nobody holds the reference any more: free a stored result now.
            None => {
                if let ObjState::Stored(at) = state {
                    self.delete_stored(id, at);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// The slot for `id`: owned, cached, or a new borrow fetched from its owner.
    pub(crate) fn slot(self: &Arc<Self>, id: ObjectId, owner: &Address) -> Option<Arc<Slot>> {
        if let Some(slot) = self.objects.get(&id) {
            return Some(Arc::clone(&slot));
        }
        if owner.worker_id == self.me.worker_id {
            return None;
        }
        let slot = Slot::new(ObjState::Pending, false);
        let slot = Arc::clone(&self.objects.entry(id).or_insert(slot));
        let core = Arc::clone(self);
        let owner = owner.clone();
        let fetching = Arc::clone(&slot);
        self.handle.spawn(async move {
            let state = core.fetch_from_owner(id, &owner).await;
            fetching.set(state);
            core.changed.notify_waiters();
        });
        Some(slot)
    }

    async fn fetch_from_owner(&self, id: ObjectId, owner: &Address) -> ObjState {
        loop {
            let owner_client = match self.worker(&owner.address).await {
                Ok(c) => c,
                Err(e) => {
                    return ObjState::OwnerDied(format!(
                        "its owner at {} is unreachable: {e}",
                        owner.address
                    ))
                }
            };
            let ask = WorkerRequest::GetObject {
                id,
                wait_ms: 10_000,
            };
            match owner_client
                .call_idempotent(&ask, Duration::from_secs(20))
                .await
            {
                Ok(WorkerReply::Object(ObjectValue::NotReady)) => continue,
                Ok(WorkerReply::Object(ObjectValue::Inline(bytes))) => {
                    return ObjState::Inline(Arc::new(bytes))
                }
                Ok(WorkerReply::Object(ObjectValue::Stored(at))) => return ObjState::Stored(at),
                Ok(WorkerReply::Object(ObjectValue::Failed(f))) => return ObjState::Failed(f),
                Ok(WorkerReply::Object(ObjectValue::Unknown)) => {
                    return ObjState::Lost("its owner no longer has it".into())
                }
                Ok(other) => return ObjState::Lost(format!("its owner answered {other:?}")),
                Err(e) if e.is_connection_lost() => {
                    return ObjState::OwnerDied(format!(
                        "its owner at {} is gone: {e}",
                        owner.address
                    ))
                }
                Err(e) => {
                    return ObjState::Lost(format!("its owner at {} failed: {e}", owner.address))
                }
            }
        }
    }

    /// Waits for an object's state; `None` if it is unknown or the deadline passed.
    pub(crate) async fn wait_state(
        self: &Arc<Self>,
        id: ObjectId,
        owner: &Address,
        timeout: Option<Duration>,
    ) -> Option<ObjState> {
        let slot = self.slot(id, owner)?;
        slot.ready(timeout.map(|t| tokio::time::Instant::now() + t))
            .await
    }

    /// Runs `fut`, a wait for other tasks' results, telling the node that
    /// the task running on `executor` (if any) is blocked meanwhile: its CPUs
    /// are lent back so the tasks it waits for can run (no nested deadlock).
    pub(crate) async fn while_blocked<F: Future>(
        &self,
        executor: Option<Executor>,
        fut: F,
    ) -> F::Output {
        let Some(executor) = executor else {
            return fut.await;
        };
        // Each waiting get lets one more task pushed to this worker start
        // (it may be the one waited for).
        let gate = self.task_gate(executor.worker_id);
        gate.add_permits(1);
        self.set_blocked(executor.worker_id, true).await;
        let out = fut.await;
        self.set_blocked(executor.worker_id, false).await;
        // Take the lent permit back; if the task it let in still runs, as
        // soon as one ends (this task goes on meanwhile).
        match gate.clone().try_acquire_owned() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.handle.spawn(async move {
                    if let Ok(permit) = gate.acquire_owned().await {
                        permit.forget();
                    }
                });
            }
        }
        out
    }

    async fn set_blocked(&self, worker_id: WorkerId, blocked: bool) {
        let transition = {
            let mut count = self.blocked.entry(worker_id).or_insert(0);
            if blocked {
                *count += 1;
                *count == 1
            } else {
                *count = count.saturating_sub(1);
                *count == 0
            }
        };
        if !transition {
            return;
        }
        let tell = NodeRequest::WorkerBlocked { worker_id, blocked };
        match self.node(&self.home.address).await {
            Ok(node) => {
                if let Err(e) = node.call_idempotent(&tell, CONTROL_TIMEOUT).await {
                    debug!(error = %e, "could not tell the node the worker is blocked");
                }
            }
            Err(e) => debug!(error = %e, "could not reach the node to say the worker is blocked"),
        }
    }

    /// The value of an object. `executor` is the worker whose task asks, if
    /// any (see [`Core::while_blocked`]).
    pub(crate) async fn get_value<T: DeserializeOwned>(
        self: &Arc<Self>,
        id: ObjectId,
        owner: &Address,
        timeout: Option<Duration>,
        executor: Option<Executor>,
    ) -> Result<T> {
        let Some(slot) = self.slot(id, owner) else {
            return Err(Error::ObjectLost {
                id,
                reason: "this process does not hold it".into(),
            });
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let ready = if slot.is_pending() {
            self.while_blocked(executor, slot.ready(deadline)).await
        } else {
            slot.ready(deadline).await
        };
        let Some(state) = ready else {
            return Err(Error::Timeout(timeout.unwrap_or_default()));
        };
        let bytes = match state {
            ObjState::Inline(bytes) => crate::shm::Blob::Owned(bytes),
            ObjState::Stored(at) => match self.fetch_stored(id, &at, GET).await {
                Ok(bytes) => bytes,
                // The copy is gone (its node died): a task result is made
                // again from its lineage.
                Err(Error::ObjectLost { reason, .. }) if slot.owned => {
                    let at = self.reconstruct(id, &at, reason).await?;
                    self.fetch_stored(id, &at, GET).await?
                }
                // A borrowed copy is gone: ask its owner again (it may have
                // rebuilt it, or be gone too).
                Err(Error::ObjectLost { reason, .. }) => {
                    match self.fetch_from_owner(id, owner).await {
                        ObjState::Stored(now) if now != at => {
                            slot.set(ObjState::Stored(now.clone()));
                            self.fetch_stored(id, &now, GET).await?
                        }
                        ObjState::OwnerDied(why) => {
                            slot.set(ObjState::OwnerDied(why.clone()));
                            return Err(Error::OwnerDied { id, reason: why });
                        }
                        _ => return Err(Error::ObjectLost { id, reason }),
                    }
                }
                Err(e) => return Err(e),
            },
            ObjState::Failed(f) => return Err(Error::from_failure(f)),
            ObjState::Lost(reason) => return Err(Error::ObjectLost { id, reason }),
            ObjState::OwnerDied(reason) => return Err(Error::OwnerDied { id, reason }),
            ObjState::Pending => return Err(Error::Timeout(timeout.unwrap_or_default())),
        };
        decode_object(id, &bytes)
    }

    /// Waits until `want` of `objects` are ready or the timeout passes;
    /// returns which are ready.
    pub(crate) async fn wait_many(
        self: &Arc<Self>,
        objects: &[(ObjectId, Address)],
        want: usize,
        timeout: Option<Duration>,
    ) -> Vec<bool> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let flags: Vec<bool> = objects
                .iter()
                .map(|(id, owner)| self.is_ready(*id, owner))
                .collect();
            if flags.iter().filter(|f| **f).count() >= want {
                return flags;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return objects
                            .iter()
                            .map(|(id, owner)| self.is_ready(*id, owner))
                            .collect();
                    }
                }
                None => notified.await,
            }
        }
    }

    /// True once the object is ready (or failed).
    pub(crate) fn is_ready(self: &Arc<Self>, id: ObjectId, owner: &Address) -> bool {
        if let Some(slot) = self.objects.get(&id) {
            return !slot.is_pending();
        }
        self.slot(id, owner).is_some_and(|s| !s.is_pending())
    }

    /// The home node's store directory, if this process is on its host.
    async fn local_store(&self) -> Option<&std::path::PathBuf> {
        self.local_store
            .get_or_init(|| async {
                if !self.home.same_host {
                    return None;
                }
                let node = self.node(&self.home.address).await.ok()?;
                match node
                    .call_idempotent(&NodeRequest::GetNodeInfo, CONTROL_TIMEOUT)
                    .await
                {
                    Ok(NodeReply::NodeInfo { store_dir, .. }) if !store_dir.is_empty() => {
                        let dir = std::path::PathBuf::from(store_dir);
                        dir.is_dir().then_some(dir)
                    }
                    _ => None,
                }
            })
            .await
            .as_ref()
    }

    /// Maps a large object from this process's home node store, on its
    /// host; an object stored elsewhere is pulled there first.
    async fn map_local(
        &self,
        id: ObjectId,
        at: &StoredAt,
        priority: shoal_proto::PullPriority,
    ) -> Option<crate::shm::Blob> {
        self.local_store().await?;
        let node = self.node(&self.home.address).await.ok()?;
        let ask = if at.node_id == self.home.node_id {
            NodeRequest::OpenObject { id }
        } else {
            NodeRequest::PullObject {
                id,
                from: at.clone(),
                priority,
            }
        };
        let (path, size) = match node.call_idempotent(&ask, PULL_TIMEOUT).await {
            Ok(NodeReply::ObjectFile { path, size }) => (path, size),
            Ok(other) => {
                tracing::debug!(%id, reply = ?other, "unexpected answer to an object request");
                return None;
            }
            Err(e) => {
                tracing::debug!(%id, error = %e, "the home node could not provide the object");
                return None;
            }
        };
        match crate::shm::Mapping::open(std::path::Path::new(&path), size) {
            Ok(mapping) => Some(crate::shm::Blob::Mapped(mapping)),
            Err(e) => {
                tracing::debug!(%id, error = %e, "cannot map the object; reading it over the network");
                None
            }
        }
    }

    /// A large object's bytes: mapped when it is on this process's home
    /// node, otherwise read from the node that stores it.
    pub(crate) async fn fetch_stored(
        &self,
        id: ObjectId,
        at: &StoredAt,
        priority: shoal_proto::PullPriority,
    ) -> Result<crate::shm::Blob> {
        let reason = match self.read_copy(id, at, priority).await {
            Ok(blob) => return Ok(blob),
            Err(Error::ObjectLost { reason, .. }) => reason,
            Err(e) => return Err(e),
        };
        // That copy cannot be read: another one may (a node that pulled
        // it), before the caller turns to lineage.
        let mut tried = Vec::new();
        for other in self.other_copies(id, at).await {
            match self.read_copy(id, &other, priority).await {
                Ok(blob) => {
                    self.moved(id, at, other);
                    return Ok(blob);
                }
                Err(e) => tried.push(e.to_string()),
            }
        }
        let reason = match tried.is_empty() {
            true => format!("{reason}; the head knows no other copy"),
            false => format!(
                "{reason}; no other copy could be read: {}",
                tried.join("; ")
            ),
        };
        Err(Error::ObjectLost { id, reason })
    }

    /// One copy's bytes: mapped when it is on (or pulled to) this process's
    /// home node, else read from the node that holds it.
    async fn read_copy(
        &self,
        id: ObjectId,
        at: &StoredAt,
        priority: shoal_proto::PullPriority,
    ) -> Result<crate::shm::Blob> {
        if let Some(mapped) = self.map_local(id, at, priority).await {
            return Ok(mapped);
        }
        self.read_stored(id, at).await.map(crate::shm::Blob::from)
    }

    /// An object this process owns was read from `to` because `from` could
    /// not be: later reads (and borrowers asking) go to `to`.
    fn moved(&self, id: ObjectId, from: &StoredAt, to: StoredAt) {
        if let Some(slot) = self.objects.get(&id) {
            if slot.owned && matches!(slot.state(), ObjState::Stored(at) if at == *from) {
                slot.set(ObjState::Stored(to));
            }
        }
    }

    /// The copies of `id` on live nodes other than `at`'s, as the head's
    /// object directory knows them.
    async fn other_copies(&self, id: ObjectId, at: &StoredAt) -> Vec<StoredAt> {
        match self
            .head
            .call_idempotent(&HeadRequest::LocateObject { id }, CONTROL_TIMEOUT)
            .await
        {
            Ok(HeadReply::ObjectLocations(copies)) => copies
                .into_iter()
                .filter(|c| c.node_id != at.node_id && c.size == at.size)
                .collect(),
            Ok(other) => {
                tracing::debug!(%id, reply = ?other, "unexpected answer to LocateObject");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(%id, error = %e, "could not ask the head for other copies");
                Vec::new()
            }
        }
    }

    /// Reads a large object from the node that stores it, in parts.
    async fn read_stored(&self, id: ObjectId, at: &StoredAt) -> Result<Vec<u8>> {
        let lost = |reason: String| Error::ObjectLost { id, reason };
        let node = self.node(&at.node_address).await.map_err(|e| {
            lost(format!(
                "its node {} at {} is unreachable: {e}",
                at.node_id, at.node_address
            ))
        })?;
        let capacity =
            usize::try_from(at.size).map_err(|_| lost("too large for this machine".into()))?;
        let mut bytes = Vec::with_capacity(capacity);
        while (bytes.len() as u64) < at.size {
            let read = NodeRequest::ReadObject {
                id,
                offset: bytes.len() as u64,
                len: CHUNK_BYTES,
            };
            match node.call_idempotent(&read, CONTROL_TIMEOUT).await {
                Ok(NodeReply::ObjectChunk { data, .. }) if !data.is_empty() => {
                    bytes.extend_from_slice(&data)
                }
                Ok(other) => return Err(lost(format!("its node answered {other:?}"))),
                Err(e) => {
                    return Err(lost(format!(
                        "reading it from node {} at {} failed: {e}",
                        at.node_id, at.node_address
                    )))
                }
            }
        }
        Ok(bytes)
    }

    /// Starts an object in the home node's store when this process is on
    /// its host: the path of the file to fill, then [`Core::seal_local`], or
    /// [`LocalFile::Sealed`] when it is stored already (a task run again
    /// stores the same id). `None` when the store is not local. Waits a
    /// little for room.
    pub(crate) async fn create_local(
        &self,
        id: ObjectId,
        total: u64,
        owner: Option<WorkerId>,
    ) -> Result<Option<LocalFile>> {
        if self.local_store().await.is_none() {
            return Ok(None);
        }
        let node = self.node(&self.home.address).await?;
        let mut room = RoomWait::default();
        loop {
            let create = NodeRequest::CreateObject { id, total, owner };
            match node.call_idempotent(&create, CONTROL_TIMEOUT).await {
                Ok(NodeReply::ObjectFile { path, .. }) => {
                    return Ok(Some(LocalFile::Fill(path.into())))
                }
                Ok(NodeReply::ObjectWritten { sealed: true }) => {
                    return Ok(Some(LocalFile::Sealed))
                }
                Err(shoal_net::RpcError::Service(e)) if e.kind == ServiceErrorKind::Unavailable => {
                    if room.again().await {
                        continue;
                    }
                    return Err(Error::ObjectStoreFull(e.message));
                }
                Ok(other) => {
                    return Err(Error::Protocol(format!("creating object {id}: {other:?}")))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Seals an object whose file this process filled.
    pub(crate) async fn seal_local(&self, id: ObjectId) -> Result<()> {
        let node = self.node(&self.home.address).await?;
        node.call_idempotent(&NodeRequest::SealObject { id }, CONTROL_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Puts a large value by encoding it straight into its file in the home
    /// node's store (no intermediate copy); `None` when the store is not on
    /// this host. Called off the runtime: it writes the file.
    pub(crate) fn put_streamed<T: serde::Serialize>(
        self: &Arc<Self>,
        value: &T,
        size: u64,
    ) -> Result<Option<ObjectId>> {
        let id = self.next_put_id();
        let owner = Some(self.me.worker_id);
        let core = Arc::clone(self);
        let path = match self.block_on(async move { core.create_local(id, size, owner).await })? {
            None => return Ok(None),
            Some(LocalFile::Fill(path)) => path,
            // A fresh put id is never stored yet; if it were, it is whole.
            Some(LocalFile::Sealed) => {
                self.own(id, ObjState::Stored(self.home_at(size)));
                return Ok(Some(id));
            }
        };
        let file = crate::shm::open_locked(&path, true).map_err(|e| e.to_string());
        let written = file.and_then(|file| {
            if size >= crate::shm::WRITE_MAP_MIN {
                let sweep = self
                    .write_maps
                    .write(&file, size, |out| exec::encode_into(out, value))?;
                if sweep {
                    self.sweep_write_maps();
                }
                return Ok(());
            }
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            exec::encode_into(&mut out, value)?;
            std::io::Write::flush(&mut out).map_err(|e| e.to_string())
        });
        if let Err(message) = written {
            self.delete_stored(id, self.home_at(size));
            return Err(Error::Encode {
                what: format!("put value into {}", path.display()),
                message,
            });
        }
        let core = Arc::clone(self);
        self.block_on(async move { core.seal_local(id).await })?;
        self.own(id, ObjState::Stored(self.home_at(size)));
        Ok(Some(id))
    }

    /// Drops, every second, the kept mappings of files the store removed
    /// (so they do not hold the memory), until none is kept.
    fn sweep_write_maps(&self) {
        let maps = Arc::clone(&self.write_maps);
        let shutdown = self.shutdown.clone();
        self.handle.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if !maps.sweep() {
                    return;
                }
            }
        });
    }

    /// Writes a large object into this process's home node store: into its
    /// file directly on the node's host, else in parts over the network.
    pub(crate) async fn store_on_node(
        &self,
        id: ObjectId,
        bytes: &[u8],
        owner: Option<WorkerId>,
    ) -> Result<StoredAt> {
        let node = self.node(&self.home.address).await?;
        let total = bytes.len() as u64;
        let stored = self.home_at(total);
        match self.create_local(id, total, owner).await? {
            Some(LocalFile::Sealed) => return Ok(stored),
            Some(LocalFile::Fill(path)) => return self.fill_local(id, &path, bytes, stored).await,
            None => {}
        }
        let mut offset = 0usize;
        let mut room = RoomWait::default();
        loop {
            let end = (offset + CHUNK_BYTES as usize).min(bytes.len());
            let put = NodeRequest::PutObject {
                owner,
                id,
                offset: offset as u64,
                total,
                data: bytes[offset..end].to_vec(),
            };
            match node.call_idempotent(&put, CONTROL_TIMEOUT).await {
                Ok(NodeReply::ObjectWritten { sealed: true }) => break,
                Ok(NodeReply::ObjectWritten { sealed: false }) => offset = end,
                Ok(other) => {
                    return Err(Error::Protocol(format!("storing object {id}: {other:?}")))
                }
                Err(shoal_net::RpcError::Service(e)) if e.kind == ServiceErrorKind::Unavailable => {
                    if offset == 0 && room.again().await {
                        continue;
                    }
                    return Err(Error::ObjectStoreFull(e.message));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(stored)
    }

    /// Writes `bytes` into the object's file on this host and seals it.
    async fn fill_local(
        &self,
        id: ObjectId,
        path: &std::path::Path,
        bytes: &[u8],
        stored: StoredAt,
    ) -> Result<StoredAt> {
        let written = crate::shm::open_locked(path, true)
            .and_then(|mut f| std::io::Write::write_all(&mut f, bytes));
        if let Err(e) = written {
            return Err(Error::Protocol(format!(
                "writing object {id} to {}: {e}",
                path.display()
            )));
        }
        self.seal_local(id).await?;
        Ok(stored)
    }

    fn delete_stored(&self, id: ObjectId, at: StoredAt) {
        let core = try_get().cloned();
        self.deletes.spawn_on(
            async move {
                let Some(core) = core else { return };
                if let Ok(node) = core.node(&at.node_address).await {
                    let _ = node
                        .call_idempotent(
                            &NodeRequest::DeleteObjects { ids: vec![id] },
                            CONTROL_TIMEOUT,
                        )
                        .await;
                }
            },
            &self.handle,
        );
    }

    /// Drops one local reference; frees the object when it was the last.
    pub(crate) fn release_ref(&self, id: ObjectId) {
        if !self.refs.release(id) {
            return;
        }
        let Some((_, slot)) = self.objects.remove(&id) else {
            return;
        };
        if slot.owned {
            if let ObjState::Stored(at) = slot.state() {
                self.delete_stored(id, at);
            }
        }
    }

    /// Keeps a small encoded value this process owns (no runtime involved).
    pub(crate) fn put_inline(&self, bytes: Vec<u8>) -> ObjectId {
        let id = self.next_put_id();
        self.own(id, ObjState::Inline(Arc::new(bytes)));
        id
    }

    /// The value of an object already here in memory (or its failure),
    /// without the runtime: `None` when it must be waited for or read
    /// from a store.
    pub(crate) fn try_get_here<T: DeserializeOwned>(&self, id: ObjectId) -> Option<Result<T>> {
        // A blocking get is refused inside a single-threaded runtime whether
        // or not the value is ready (block_on says so).
        if runtime_flavor() == Some(tokio::runtime::RuntimeFlavor::CurrentThread) {
            return None;
        }
        let state = {
            let slot = self.objects.get(&id)?;
            let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
            match &*state {
                ObjState::Inline(bytes) => Ok(Arc::clone(bytes)),
                ObjState::Failed(f) => Err(Error::from_failure(f.clone())),
                ObjState::Pending
                | ObjState::Stored(_)
                | ObjState::Lost(_)
                | ObjState::OwnerDied(_) => return None,
            }
        };
        Some(state.and_then(|bytes| decode_object(id, &crate::shm::Blob::Owned(bytes))))
    }

    /// [`Core::try_get_here`], parking this thread first (outside the
    /// runtime) while the object is pending.
    pub(crate) fn get_here<T: DeserializeOwned>(&self, id: ObjectId) -> Option<Result<T>> {
        self.try_get_here(id)
            .or_else(|| self.wait_here(id).then(|| self.try_get_here(id)).flatten())
    }

    /// Blocks this thread (outside any runtime and task) until an object
    /// this process already tracks is no longer pending; false when that
    /// cannot be done here (the caller then waits through the runtime).
    /// One wake-up from the completing thread, no runtime task in between.
    pub(crate) fn wait_here(&self, id: ObjectId) -> bool {
        if tokio::runtime::Handle::try_current().is_ok() || current_executor().is_some() {
            return false;
        }
        let Some(slot) = self.objects.get(&id).map(|s| Arc::clone(&s)) else {
            return false;
        };
        park_on(slot.ready(None));
        true
    }

    /// Stores a large encoded value this process owns in its home node's
    /// store (from a host other than the store's).
    pub(crate) async fn put_stored(self: &Arc<Self>, bytes: Vec<u8>) -> Result<ObjectId> {
        let id = self.next_put_id();
        let at = self
            .store_on_node(id, &bytes, Some(self.me.worker_id))
            .await?;
        self.own(id, ObjState::Stored(at));
        Ok(id)
    }

    /// The bytes of task arguments, stored ones fetched from their nodes.
    pub(crate) async fn fetch_args(&self, args: &[ArgSpec]) -> Result<crate::shm::Args> {
        let mut out = Vec::with_capacity(args.len());
        for arg in args {
            match arg {
                ArgSpec::Inline(bytes) => out.push(crate::shm::Blob::from(bytes.clone())),
                ArgSpec::Stored { id, at } => out.push(
                    self.fetch_stored(*id, at, shoal_proto::PullPriority::Argument)
                        .await?,
                ),
            }
        }
        Ok(out)
    }

    /// A result, inline or (when large) stored in this node's store.
    pub(crate) async fn outcome_of(
        &self,
        id: ObjectId,
        bytes: Vec<u8>,
        (function, task_id, owner): (&str, TaskId, Option<WorkerId>),
        executor: Executor,
    ) -> TaskOutcome {
        if bytes.len() <= INLINE_BYTES_MAX {
            return TaskOutcome::Inline(bytes);
        }
        match self.store_on_node(id, &bytes, owner).await {
            Ok(at) => TaskOutcome::Stored(at),
            Err(e) => TaskOutcome::Failed(TaskFailure {
                kind: FailureKind::BadReturn,
                function: function.to_string(),
                task_id,
                node_id: Some(executor.node_id),
                message: format!("the result could not be stored: {e}"),
                backtrace: None,
                attempts: 1,
            }),
        }
    }

    fn task_gate(&self, worker_id: WorkerId) -> Arc<tokio::sync::Semaphore> {
        Arc::clone(
            &self
                .task_gates
                .entry(worker_id)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1))),
        )
    }

    /// Runs a pushed task here (worker processes and threads), after the
    /// tasks pushed to this worker before it.
    pub(crate) async fn execute(self: &Arc<Self>, spec: TaskSpec, executor: Executor) -> TaskReply {
        let fetched = self.fetch_args(&spec.args).await;
        let _turn = self.task_gate(executor.worker_id).acquire_owned().await;
        let started = std::time::Instant::now();
        let outcome = match fetched {
            Err(e) => TaskOutcome::Failed(TaskFailure {
                kind: FailureKind::ArgumentLost,
                function: spec.function.name.clone(),
                task_id: spec.task_id,
                node_id: Some(executor.node_id),
                message: e.to_string(),
                backtrace: None,
                attempts: spec.attempt + 1,
            }),
            Ok(args) => match exec::invoke(&spec, args, executor).await {
                Ok(bytes) => {
                    let id = spec.task_id.return_object(0);
                    let made = (
                        spec.function.name.as_str(),
                        spec.task_id,
                        Some(spec.owner.worker_id),
                    );
                    self.outcome_of(id, bytes, made, executor).await
                }
                Err(failure) => TaskOutcome::Failed(failure),
            },
        };
        TaskReply {
            task_id: spec.task_id,
            attempt: spec.attempt,
            node_id: executor.node_id,
            worker_id: executor.worker_id,
            outcome,
            run_us: Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        }
    }

    /// A pending slot for an object this process will own.
    pub(crate) fn register_pending(&self, id: ObjectId) {
        self.own(id, ObjState::Pending);
    }

    /// Records an object this process owns, with one local reference.
    fn own(&self, id: ObjectId, state: ObjState) {
        self.objects.insert(id, Slot::new(state, true));
        self.refs.add_local(id);
    }

    /// Where an object of `size` bytes in the home node's store is.
    fn home_at(&self, size: u64) -> StoredAt {
        StoredAt {
            node_id: self.home.node_id,
            node_address: self.home.address.clone(),
            size,
        }
    }

    /// Sets an owned object's final state.
    pub(crate) fn complete_object(&self, id: ObjectId, state: ObjState) {
        self.complete(id, state);
    }

    /// An owned object's value for a borrower; waits up to `wait`.
    async fn object_value(&self, id: ObjectId, wait: Duration) -> ObjectValue {
        let Some(slot) = self
            .objects
            .get(&id)
            .map(|s| Arc::clone(&s))
            .filter(|s| s.owned)
        else {
            return ObjectValue::Unknown;
        };
        match slot.ready(Some(tokio::time::Instant::now() + wait)).await {
            None | Some(ObjState::Pending) => ObjectValue::NotReady,
            Some(ObjState::Inline(bytes)) => ObjectValue::Inline(bytes.to_vec()),
            Some(ObjState::Stored(at)) => ObjectValue::Stored(at),
            Some(ObjState::Failed(f)) => ObjectValue::Failed(f),
            Some(ObjState::Lost(_) | ObjState::OwnerDied(_)) => ObjectValue::Unknown,
        }
    }

    /// Ends the job: returns leases, tells the head, stops serving.
    pub(crate) async fn shut_down(&self) {
        // Objects freed just before exit must still be deleted from nodes.
        self.deletes.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.deletes.wait()).await;
        // Stop asking for leases first, then give back what is held; stop
        // serving (which closes the endpoint) last.
        self.stopping.cancel();
        self.leases.return_all(self).await;
        let _ = self
            .head
            .call_idempotent(
                &HeadRequest::FinishJob {
                    job_id: self.job_id,
                },
                Duration::from_secs(2),
            )
            .await;
        self.shutdown.cancel();
        self.head.close();
    }
}

fn outcome_state(reply: TaskReply) -> ObjState {
    match reply.outcome {
        TaskOutcome::Inline(bytes) => ObjState::Inline(Arc::new(bytes)),
        TaskOutcome::Stored(at) => ObjState::Stored(at),
        TaskOutcome::Failed(f) => ObjState::Failed(f),
    }
}

/// Waiting for room in a full store: freed objects are deleted
/// asynchronously, so a write refused for room is tried again for a while.
#[derive(Default)]
struct RoomWait {
    since: Option<std::time::Instant>,
}

impl RoomWait {
    /// Waits a moment and says yes while [`STORE_FULL_WAIT`] has not passed
    /// since the first refusal.
    async fn again(&mut self) -> bool {
        if self
            .since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            >= STORE_FULL_WAIT
        {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        true
    }
}

/// An object's bytes decoded as `T`.
fn decode_object<T: DeserializeOwned>(id: ObjectId, bytes: &crate::shm::Blob) -> Result<T> {
    crate::shm::decode(bytes).map_err(|message| Error::Decode {
        what: format!("object {id} as {}", std::any::type_name::<T>()),
        message,
    })
}

/// The flavor of the runtime this thread is in, if any.
pub(crate) fn runtime_flavor() -> Option<tokio::runtime::RuntimeFlavor> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|h| h.runtime_flavor())
}

/// Runs `wait`, which blocks this thread: inside a multi-threaded runtime
/// under `block_in_place` (its other tasks move to another thread); refused
/// inside a single-threaded one, which it would stall.
pub(crate) fn block_thread<R>(wait: impl FnOnce() -> R) -> Result<R> {
    match runtime_flavor() {
        Some(tokio::runtime::RuntimeFlavor::CurrentThread) => Err(Error::BlockingGetInAsync),
        Some(_) => Ok(tokio::task::block_in_place(wait)),
        None => Ok(wait()),
    }
}

/// Wakes a parked thread.
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on this thread, parking between polls (for futures that
/// need no runtime, such as a wait on a slot).
fn park_on<F: Future>(fut: F) -> F::Output {
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// The worker service every Shoal process serves: tasks pushed to it (if it
/// is a worker) and objects it owns, for borrowers.
pub(crate) struct WorkerService {
    pub(crate) executor: Option<Executor>,
}

impl WorkerService {
    fn executor(&self) -> std::result::Result<Executor, ServiceError> {
        self.executor.ok_or_else(|| {
            ServiceError::new(
                ServiceErrorKind::PermissionDenied,
                "this process runs no tasks or actors",
            )
        })
    }
}

/// Runs `work` on the core's runtime (whatever runtime serves the request)
/// and waits for it.
async fn on_core<T, F, Fut>(core: &Arc<Core>, work: F) -> std::result::Result<T, ServiceError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Core>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let work = work(Arc::clone(core));
    // Already there (a worker process has one runtime): no hand-off.
    if tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == core.handle.id()) {
        return Ok(work.await);
    }
    core.handle
        .spawn(work)
        .await
        .map_err(|e| ServiceError::new(ServiceErrorKind::Internal, e.to_string()))
}

impl Service for WorkerService {
    type Request = WorkerRequest;
    type Reply = WorkerReply;

    /// Tasks and actor methods run as long as they take: the owner judges
    /// them by this worker's process and node, not by a reply deadline.
    fn deadline_applies(&self, request: &WorkerRequest) -> bool {
        !matches!(
            request,
            WorkerRequest::PushTask(_)
                | WorkerRequest::ActorCall(_)
                | WorkerRequest::CreateActor { .. }
        )
    }

    async fn handle(
        &self,
        _peer: &Peer,
        request: WorkerRequest,
    ) -> std::result::Result<WorkerReply, ServiceError> {
        let core =
            get().map_err(|e| ServiceError::new(ServiceErrorKind::Unavailable, e.to_string()))?;
        match request {
            WorkerRequest::PushTask(spec) => {
                let executor = self.executor()?;
                if spec.job_id != core.job_id {
                    return Err(ServiceError::new(
                        ServiceErrorKind::BadRequest,
                        format!(
                            "task of job {} pushed to a worker of job {}",
                            spec.job_id, core.job_id
                        ),
                    ));
                }
                let reply = on_core(&core, move |core| async move {
                    core.execute(spec, executor).await
                })
                .await?;
                Ok(WorkerReply::TaskDone(reply))
            }
            WorkerRequest::CreateActor {
                actor_id,
                class,
                args,
                max_concurrency,
                incarnation,
            } => {
                let executor = self.executor()?;
                let failure = on_core(&core, move |core| async move {
                    core.actors
                        .create(
                            &core,
                            actor_id,
                            &class,
                            args,
                            (max_concurrency, incarnation),
                            executor,
                        )
                        .await
                })
                .await?;
                Ok(WorkerReply::ActorCreated {
                    failure,
                    pid: std::process::id(),
                })
            }
            WorkerRequest::ActorCall(call) => {
                let executor = self.executor()?;
                let reply = on_core(&core, move |core| async move {
                    core.actors.call(&core, call, executor).await
                })
                .await??;
                Ok(WorkerReply::TaskDone(reply))
            }
            WorkerRequest::Logs(lines) => {
                // As Ray does: each line with the worker's pid and node.
                for line in lines {
                    let node = line.node_id.to_string();
                    let prefix = format!("(pid={}, node={})", line.pid, &node[..8.min(node.len())]);
                    if line.stderr {
                        eprintln!("{prefix} {}", line.text);
                    } else {
                        println!("{prefix} {}", line.text);
                    }
                }
                Ok(WorkerReply::Ok)
            }
            WorkerRequest::GetObject { id, wait_ms } => {
                let wait = Duration::from_millis(wait_ms).min(Duration::from_secs(30));
                Ok(WorkerReply::Object(core.object_value(id, wait).await))
            }
        }
    }
}

/// The task being run, and by which worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Running {
    pub task: TaskId,
    pub executor: Executor,
}

tokio::task_local! {
    static TASK_SCOPE: Running;
}

thread_local! {
    static TASK_THREAD: std::cell::Cell<Option<Running>> = const { std::cell::Cell::new(None) };
}

fn running() -> Option<Running> {
    TASK_SCOPE
        .try_with(|t| *t)
        .ok()
        .or_else(|| TASK_THREAD.with(|t| t.get()))
}

/// The task running on this thread or async task, if any.
pub(crate) fn current_task() -> Option<TaskId> {
    running().map(|r| r.task)
}

/// The worker running the current task, if any.
pub(crate) fn current_executor() -> Option<Executor> {
    running().map(|r| r.executor)
}

/// Runs `f` as `running` on this thread.
pub(crate) fn with_current_task<R>(running: Running, f: impl FnOnce() -> R) -> R {
    let previous = TASK_THREAD.with(|t| t.replace(Some(running)));
    let out = f();
    TASK_THREAD.with(|t| t.set(previous));
    out
}

/// Runs `fut` as `running`.
pub(crate) async fn scope_current_task<F: Future>(running: Running, fut: F) -> F::Output {
    TASK_SCOPE.scope(running, fut).await
}

/// The local IP used to reach `peer` (no packet is sent).
/// This process's endpoint on `ip`, at the port `ports` asks for.
fn bind_endpoint(
    ip: std::net::IpAddr,
    ports: Ports,
    server: shoal_net::quinn::ServerConfig,
    limits: &NetLimits,
) -> Result<shoal_net::quinn::Endpoint> {
    let bind =
        |port: u16| endpoint::endpoint(SocketAddr::new(ip, port), Some(server.clone()), limits);
    match ports {
        Ports::Any => bind(0)
            .map_err(|e| Error::NotInitialized(format!("cannot bind an endpoint on {ip}: {e}"))),
        Ports::Fixed(port) => bind(port).map_err(|e| {
            Error::NotInitialized(format!(
                "cannot bind the driver port {ip}:{port} (SHOAL_DRIVER_PORT or Config::driver_port): {e}"
            ))
        }),
        Ports::Range(lo, hi) => {
            // Start at a point of the range picked by the pid, so workers
            // starting at once do not all race for its first port.
            let span = u32::from(hi - lo) + 1;
            let first = std::process::id() % span;
            let mut last = String::new();
            for i in 0..span {
                let port = lo + ((first + i) % span) as u16;
                match bind(port) {
                    Ok(ep) => return Ok(ep),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(Error::NotInitialized(format!(
                "no free port in the worker port range {lo}-{hi} on {ip} (last: {last})"
            )))
        }
    }
}

/// Hex SHA-256 of this process's executable.
fn executable_hash() -> Result<String> {
    let bytes = std::fs::read("/proc/self/exe")
        .map_err(|e| Error::NotInitialized(format!("cannot read this executable: {e}")))?;
    Ok(sha256_hex(&bytes))
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn register_job(head: &HeadClient, me: &Address, hash: &str, upload: bool) -> Result<JobId> {
    let size = std::fs::metadata("/proc/self/exe")
        .map(|m| m.len())
        .unwrap_or(0);
    let request = HeadRequest::RegisterJob(shoal_proto::head::RegisterJob {
        driver_pid: std::process::id(),
        binary_hash: hash.to_string(),
        binary_size: size,
        driver: me.clone(),
    });
    let (job_id, present) = match head.call_idempotent(&request, CONTROL_TIMEOUT).await? {
        HeadReply::JobRegistered {
            job_id,
            binary_present,
        } => (job_id, binary_present),
        other => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to RegisterJob"
            )))
        }
    };
    if upload && !present {
        let bytes = std::fs::read("/proc/self/exe")
            .map_err(|e| Error::NotInitialized(format!("cannot read this executable: {e}")))?;
        let total = bytes.len() as u64;
        for (i, part) in bytes.chunks(CHUNK_BYTES as usize).enumerate() {
            let upload = HeadRequest::UploadBinary {
                hash: hash.to_string(),
                offset: (i * CHUNK_BYTES as usize) as u64,
                total,
                data: part.to_vec(),
            };
            head.call_idempotent(&upload, CONTROL_TIMEOUT).await?;
        }
        debug!(bytes = total, "uploaded the executable");
    }
    Ok(job_id)
}

/// The node on this host to put objects on: a live node with CPUs on this
/// host, else any live node on it, else any live node.
async fn find_home(head: &HeadClient) -> Result<HomeNode> {
    let status = match head
        .call_idempotent(&HeadRequest::GetClusterStatus, CONTROL_TIMEOUT)
        .await?
    {
        HeadReply::ClusterStatus(s) => s,
        other => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to GetClusterStatus"
            )))
        }
    };
    // The node on this host (by host identity, not by name: containers and
    // namespaces share names), preferring one that runs tasks.
    let host = shoal_net::host::host_id();
    let live: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| n.state == shoal_proto::NodeState::Alive)
        .collect();
    let here = |n: &&&shoal_proto::NodeStatus| n.host_id == host;
    // Without one, a node this process reaches without leaving its network
    // namespace (a sidecar with a /dev/shm of its own), else any.
    let near = |n: &&&shoal_proto::NodeStatus| {
        n.address
            .parse::<SocketAddr>()
            .is_ok_and(|a| shoal_net::host::is_local_ip(a.ip()))
    };
    let pick = live
        .iter()
        .filter(here)
        .find(|n| n.resources_total.get(shoal_proto::resources::CPU) > 0.0)
        .or_else(|| live.iter().find(here))
        .or_else(|| live.iter().find(near))
        .or_else(|| live.first())
        .ok_or_else(|| Error::NotInitialized("the cluster has no live node".into()))?;
    Ok(HomeNode {
        node_id: pick.node_id,
        address: pick.address.clone(),
        same_host: pick.host_id == host,
    })
}
