//! The shell of a Shoal process: one [`Core`] per driver or worker process.
//!
//! It owns the connections (one QUIC endpoint: client to the head, nodes
//! and workers; server for the worker service) and the runtime tasks, and
//! carries out what the owner's state machines (`crate::owner`) decide:
//! the owner of a task is the process that submitted it; it resolves the
//! arguments, leases a worker through the head, pushes the task straight to
//! the worker, and keeps the result.
//!
//! - `tasks`: submitting and running tasks, rebuilding lost results;
//! - `lease`: asking for leases, turning them into workers, returning them;
//! - `objects`: waiting for and reading objects, reference counts, `put`;
//! - `store`: large objects in node stores;
//! - `watch`: learning when the workers and nodes in use die.
//!
//! It serves the worker side (`crate::worker`) through
//! [`worker::Process`](crate::worker::Process).

pub(crate) mod cancel;
pub(crate) mod events;
pub(crate) mod generator;
pub(crate) mod head;
mod lease;
mod objects;
#[cfg(test)]
mod roles_tests;
mod store;
mod submit;
mod tasks;
mod watch;

pub(crate) use lease::{
    abandon_request, grant_request, lease_request, release_lease, return_to_head,
};
pub(crate) use objects::Lent;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use serde::de::DeserializeOwned;
use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::{endpoint, tls, JoinToken, NetLimits, RpcClient, Transport};
use shoal_proto::{
    Address, ArgSpec, HeadReply, HeadRequest, JobId, NodeId, NodeReply, NodeRequest, ObjectId,
    ObjectValue, Role, TaskId, TaskOutcome, WorkerId, WorkerReply, WorkerRequest,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::error::{Error, Result};
use crate::owner::objects::Objects;
use crate::rt::{block_thread, runtime_flavor};
use crate::worker::{self, Executor};
use lease::LeaseManager;

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

static CORE: OnceLock<Arc<Core>> = OnceLock::new();

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

/// The node this process puts large objects on and prefers for its tasks.
#[derive(Clone, Debug)]
pub(crate) struct HomeNode {
    pub node_id: NodeId,
    pub address: String,
    /// True when the node is on this process's host (same host identity):
    /// only then are its store files written and mapped directly.
    pub same_host: bool,
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
    /// `LO-HI` with `1 <= LO <= HI`, as a node hands it to its workers
    /// (what `shoal_node::config::parse_port_range` accepts; parsed here so
    /// the SDK builds without the node daemon).
    pub(crate) fn parse_range(text: &str) -> Option<Ports> {
        let (lo, hi) = text.split_once('-')?;
        let lo: u16 = lo.trim().parse().ok()?;
        let hi: u16 = hi.trim().parse().ok()?;
        (lo != 0 && lo <= hi).then_some(Ports::Range(lo, hi))
    }
}

/// The per-process runtime.
pub(crate) struct Core {
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) job_id: JobId,
    pub(crate) me: Address,
    /// `me`, shared by the references this process makes (one copy, not
    /// one per reference).
    pub(crate) me_shared: Arc<Address>,
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
    /// See [`CoreSetup::env`].
    pub(crate) env: shoal_proto::EnvVars,
    /// Every connection this process opens goes through it.
    transport: Transport,
    pub(crate) head: head::HeadLink,
    nodes: DashMap<String, NodeClient>,
    workers: DashMap<String, WorkerClient>,
    /// Per address: held while a connection to it is being made.
    connecting: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    pub(crate) objects: Objects,
    /// Woken whenever any owned object completes (for `wait`).
    pub(crate) changed: Notify,
    pub(crate) leases: LeaseManager,
    /// The state changes of the tasks this process owns, for the head.
    pub(crate) events: events::Events,
    /// This process's watches of the workers it uses (one poll per node).
    pub(crate) watches: watch::Watches,
    root_task: TaskId,
    put_counter: AtomicU32,
    /// The actors this worker hosts.
    pub(crate) actors: worker::host::Host,
    /// The task gates of the workers running here.
    pub(crate) gates: worker::gates::Gates,
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the job starts to end: no more lease requests.
    pub(crate) stopping: CancellationToken,
    /// The tasks and actor calls this process may cancel.
    submitted: cancel::Submitted,
    /// The tasks and calls running here that may be cancelled.
    cancels: worker::cancel::Cancels,
    /// The streaming generators this process owns.
    generators: generator::Generators,
    /// Where the generators running here yield to.
    sinks: worker::stream::Sinks,
    /// Deletes of freed objects under way: shutdown waits for them.
    deletes: tokio_util::task::TaskTracker,
    /// Keeps the in-process cluster of local mode alive.
    #[cfg(feature = "local")]
    pub(crate) local: std::sync::Mutex<Option<shoal_local::LocalCluster>>,
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
    /// How long calls to the head wait for it while it is unreachable
    /// (a restarting head) before they fail with `HeadUnavailable`.
    pub head_timeout: Duration,
    /// Whether to send task events to the head.
    pub task_events: bool,
    /// The environment the tasks and actors this process submits get by
    /// default (a driver's `Config::env_var`; a worker's own).
    pub env: shoal_proto::EnvVars,
}

impl Core {
    /// Binds this process's endpoint, serves the worker service on it,
    /// connects to the head and registers the job (drivers).
    pub(crate) async fn connect(setup: CoreSetup) -> Result<Arc<Core>> {
        worker::exec::install_panic_hook();
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
        let transport = Transport::quic(
            ep.clone(),
            client_config,
            shoal_net::HEAD_SERVER_NAME,
            auth,
            limits.clone(),
        );
        let head =
            head::HeadLink::connect(transport.clone(), setup.head_address, setup.head_timeout)
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
            me_shared: Arc::new(me.clone()),
            me,
            home,
            hosting_node: setup.executor.map(|e| e.node_id),
            local_store: tokio::sync::OnceCell::new(),
            write_maps: Arc::default(),
            binary_hash,
            env: setup.env,
            transport,
            head,
            nodes: DashMap::new(),
            workers: DashMap::new(),
            connecting: DashMap::new(),
            objects: Objects::default(),
            changed: Notify::new(),
            leases: LeaseManager::new(setup.executor.is_some()),
            events: events::Events::new(setup.task_events),
            watches: Default::default(),
            root_task: TaskId::fresh(),
            put_counter: AtomicU32::new(0),
            gates: Default::default(),
            actors: Default::default(),
            shutdown: shutdown.clone(),
            stopping: CancellationToken::new(),
            deletes: tokio_util::task::TaskTracker::new(),
            submitted: Default::default(),
            cancels: Default::default(),
            generators: Default::default(),
            sinks: Default::default(),
            #[cfg(feature = "local")]
            local: std::sync::Mutex::new(None),
        });
        let service = Arc::new(worker::service::WorkerService::<Core>::new(setup.executor));
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
        tokio::spawn(events::Events::run(Arc::clone(&core)));
        Ok(core)
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
        let client = self.transport.connect_named(addr, server_name).await?;
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

    /// Ends the job: returns leases, tells the head, stops serving.
    pub(crate) async fn shut_down(self: &Arc<Self>) {
        // Objects freed just before exit must still be deleted from nodes.
        self.deletes.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.deletes.wait()).await;
        // Stop asking for leases first, then give back what is held; stop
        // serving (which closes the endpoint) last.
        self.stopping.cancel();
        self.leases.return_all(self).await;
        // The last task events, if the head takes them soon.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.events.flush(self)).await;
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

/// The local IP used to reach `peer` (no packet is sent).
impl worker::Process for Core {
    fn current() -> Option<Arc<Self>> {
        try_get().cloned()
    }

    fn job_id(&self) -> JobId {
        self.job_id
    }

    fn runtime(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    fn host(&self) -> &worker::host::Host {
        &self.actors
    }

    fn gates(&self) -> &worker::gates::Gates {
        &self.gates
    }

    fn fetch_args(
        &self,
        args: &[ArgSpec],
    ) -> impl Future<Output = Result<crate::shm::Args>> + Send {
        Core::fetch_args(self, args)
    }

    fn store_result(
        &self,
        id: ObjectId,
        bytes: Vec<u8>,
        made: worker::MadeBy<'_>,
        executor: Executor,
    ) -> impl Future<Output = TaskOutcome> + Send {
        self.outcome_of(id, bytes, made, executor)
    }

    fn keep_for(&self, id: ObjectId, lender: &Address) -> bool {
        self.objects.keep_for(id, lender)
    }

    fn release_borrower(&self, id: ObjectId, worker: WorkerId) {
        Core::release_borrower(self, id, worker);
    }

    fn cancels(&self) -> &worker::cancel::Cancels {
        &self.cancels
    }

    fn sinks(&self) -> &worker::stream::Sinks {
        &self.sinks
    }

    fn generator_item(
        self: &Arc<Self>,
        task_id: TaskId,
        index: u32,
        item: TaskOutcome,
    ) -> impl Future<Output = shoal_proto::WorkerReply> + Send {
        let core = Arc::clone(self);
        async move { core.take_generator_item(task_id, index, item).await }
    }

    fn cancel_children(self: &Arc<Self>, task: TaskId) {
        Core::cancel_children(self, task);
    }

    fn cancel_owned(self: &Arc<Self>, id: ObjectId, force: bool) {
        let why = cancel::Why {
            kind: shoal_proto::FailureKind::Cancelled,
            force,
            after: None,
        };
        self.cancel_here(id, why);
    }

    fn object_value(
        &self,
        id: ObjectId,
        wait: Duration,
    ) -> impl Future<Output = ObjectValue> + Send {
        Core::object_value(self, id, wait)
    }
}

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
    Ok(shoal_net::digest::sha256_hex(&bytes))
}

async fn register_job(
    head: &head::HeadLink,
    me: &Address,
    hash: &str,
    upload: bool,
) -> Result<JobId> {
    let size = std::fs::metadata("/proc/self/exe")
        .map(|m| m.len())
        .unwrap_or(0);
    let job = shoal_proto::head::RegisterJob {
        driver_pid: std::process::id(),
        binary_hash: hash.to_string(),
        binary_size: size,
        driver: me.clone(),
        // A driver the head started for `shoal job submit` takes that job.
        job_id: std::env::var("SHOAL_JOB_ID")
            .ok()
            .and_then(|id| id.parse().ok()),
    };
    let request = HeadRequest::RegisterJob(job.clone());
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
    /// How long an upload waits for the head to take it (it takes a few
    /// at once).
    const UPLOAD_PATIENCE: Duration = Duration::from_secs(120);
    if upload && !present {
        let bytes = std::fs::read("/proc/self/exe")
            .map_err(|e| Error::NotInitialized(format!("cannot read this executable: {e}")))?;
        for upload in HeadRequest::upload_parts(hash, &bytes) {
            head.call_when_available(&upload, CONTROL_TIMEOUT, UPLOAD_PATIENCE)
                .await?;
        }
        debug!(bytes = bytes.len(), "uploaded the executable");
    }
    head.keep_job(job, job_id);
    Ok(job_id)
}

/// The node on this host to put objects on: a live node with CPUs on this
/// host, else any live node on it, else any live node.
async fn find_home(head: &head::HeadLink) -> Result<HomeNode> {
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

#[cfg(test)]
mod tests {
    use super::Ports;

    #[test]
    fn a_port_range_reads_as_the_node_writes_it() {
        assert_eq!(
            Ports::parse_range("10002-10999"),
            Some(Ports::Range(10002, 10999))
        );
        assert_eq!(
            Ports::parse_range("7000-7000"),
            Some(Ports::Range(7000, 7000))
        );
        for bad in ["", "7000", "0-10", "10-9", "1-65536", "a-b", "-5", "5-"] {
            assert_eq!(Ports::parse_range(bad), None, "{bad:?}");
        }
    }

    /// The node's own parser (which checks `--worker-port-range`) and this
    /// one agree.
    #[cfg(feature = "local")]
    #[test]
    fn the_port_range_parser_agrees_with_the_nodes() {
        for text in [
            "10002-10999",
            "7000-7000",
            " 1 - 2 ",
            "",
            "7000",
            "0-10",
            "10-9",
            "1-65536",
            "a-b",
            "-5",
            "5-",
            "1-2-3",
            "65535-65535",
        ] {
            let node = shoal_node::config::parse_port_range(text).ok();
            let ours = Ports::parse_range(text).map(|p| match p {
                Ports::Range(lo, hi) => (lo, hi),
                other => panic!("{other:?}"),
            });
            assert_eq!(ours, node, "{text:?}");
        }
    }
}
