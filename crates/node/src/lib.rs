//! The node daemon: one per machine.
//!
//! It joins the head with the cluster's join token, reports the resources of
//! its machine (CPUs and memory detected, or set by configuration), heartbeats,
//! serves its peers over mutual TLS with the certificate the head issued it,
//! hands workers to lease holders, and stores large objects. If the head
//! restarts or declares it dead, it joins again, as a new node.
//!
//! Modules:
//! - [`config`]: [`NodeConfig`] and its defaults.
//! - [`machine`]: what this machine has (CPU count, memory).
//! - [`head_link`]: the join, heartbeat and reconnect loop.
//! - [`worker_pool`]: the job's workers (processes, or threads in local
//!   mode): granted to lease holders, reused, reaped when idle.
//! - [`binaries`]: the content-addressed cache of job executables.
//! - [`object_store`]: large objects, written in parts and sealed.
//! - [`api`]: the node service its peers, lease holders and workers call.
//!
//! The entry point is [`Node::bind`] then [`Node::run`], or [`run`] for both.

pub mod api;
pub mod binaries;
pub mod config;
pub mod gpus;
pub mod head_link;
pub mod machine;
pub mod metrics;
pub mod object_store;
pub mod transfer;
pub mod worker_pool;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::sync::MutexExt;
use shoal_net::{endpoint, ConnectError, JoinToken, RpcClient, Transport, HEAD_SERVER_NAME};
use shoal_proto::{HeadReply, HeadRequest, NodeId, ResourceSet, Role};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::NodeConfig;
pub use worker_pool::{LaunchSpec, Launched, ProcessLauncher, WorkerKind, WorkerLauncher};

use binaries::BinaryCache;
use object_store::ObjectStore;
use worker_pool::{PoolConfig, WorkerPool};

type HeadClient = RpcClient<HeadRequest, HeadReply>;

/// The node daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The client endpoint toward the head could not be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A configured resource is invalid.
    #[error(transparent)]
    Resource(#[from] shoal_proto::resources::InvalidResource),
    /// A configured label is invalid.
    #[error(transparent)]
    Label(#[from] shoal_proto::placement::InvalidPlacement),
    /// The object store's directories could not be made.
    #[error("cannot set up the object store: {0}")]
    ObjectStore(#[from] object_store::StoreError),
    /// The object store asked for does not fit in its shared-memory file
    /// system.
    #[error(
        "--object-store-memory {asked} bytes does not fit in {dir} ({size} bytes free): give \
         this host a larger {dir} (docker run --shm-size=SIZE, or mount -o remount,size=SIZE \
         {dir}) or ask for at most {size} bytes"
    )]
    StoreTooLarge {
        /// The bytes asked for.
        asked: u64,
        /// The file system's directory.
        dir: String,
        /// Its size.
        size: u64,
    },
}

/// The object store's capacity: as configured, else 30% of the memory this
/// node may use (the cgroup's limit in a container). Past the free space of
/// the shared-memory file system the store lives on (objects are written
/// through mappings: a full tmpfs would fault the writer), a configured
/// size is refused with what to do, and the default is cut to it with a
/// warning (objects past 80% of it spill to disk).
fn store_size(configured: Option<u64>, root: &std::path::Path) -> Result<u64, NodeError> {
    let room = machine::file_system_free_bytes(root).filter(|_| root.starts_with("/dev/shm"));
    if let Some(asked) = configured {
        return match room {
            Some(size) if asked > size => Err(NodeError::StoreTooLarge {
                asked,
                dir: root.display().to_string(),
                size,
            }),
            _ => Ok(asked),
        };
    }
    let memory = machine::detect_memory_bytes().unwrap_or(4 << 30) as f64;
    let wanted = (memory * config::defaults::OBJECT_STORE_MEMORY_SHARE) as u64;
    match room {
        Some(size) if size < wanted => {
            tracing::warn!(
                dir = %root.display(),
                size,
                wanted,
                "the shared-memory file system is smaller than the default object store; \
                 the store is cut to its size and objects spill to disk sooner. Give this host \
                 a larger /dev/shm (docker run --shm-size=SIZE) for a larger store"
            );
            Ok(size)
        }
        _ => Ok(wanted),
    }
}

/// A view of a running node daemon, for its embedder and tests.
#[derive(Clone)]
pub struct NodeHandle {
    node_id: watch::Receiver<Option<NodeId>>,
    local_addr: SocketAddr,
    pool: Arc<WorkerPool>,
    store: Arc<Mutex<ObjectStore>>,
    store_capacity: u64,
    transfers: Arc<transfer::Transfers>,
    stats: Arc<HandshakeStats>,
    heartbeats: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeHandle({})", self.local_addr)
    }
}

impl NodeHandle {
    /// The node's current id: `None` until it has joined.
    pub fn node_id(&self) -> Option<NodeId> {
        *self.node_id.borrow()
    }

    /// Waits until the node has joined (or joined again) under an id other
    /// than `previous`.
    pub async fn joined_other_than(&mut self, previous: Option<NodeId>) -> NodeId {
        loop {
            if let Some(id) = *self.node_id.borrow_and_update() {
                if Some(id) != previous {
                    return id;
                }
            }
            if self.node_id.changed().await.is_err() {
                // The daemon is gone; its last id is all there will be.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The address the node serves its peers on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Process ids of the node's live workers.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.pool.pids()
    }

    /// Live workers.
    pub fn worker_count(&self) -> usize {
        self.pool.worker_count()
    }
}

/// A node daemon bound to its address, ready to [`run`](Node::run).
pub struct Node {
    config: NodeConfig,
    token: JoinToken,
    resources: ResourceSet,
    server: shoal_net::quinn::Endpoint,
    transport: Transport,
    auth: Arc<ServerAuth>,
    node_id: watch::Sender<Option<NodeId>>,
    head: watch::Sender<Option<HeadClient>>,
    pool: Arc<WorkerPool>,
    store: Arc<Mutex<ObjectStore>>,
    store_capacity: u64,
    /// The client configuration toward peer nodes (mutual TLS), once the
    /// head has issued this node its certificate.
    peer_config: watch::Sender<Option<shoal_net::quinn::ClientConfig>>,
    transfers: Arc<transfer::Transfers>,
    /// Worker output on its way to drivers (process workers only).
    logs: Mutex<
        Option<tokio::sync::mpsc::Receiver<(shoal_proto::Address, shoal_proto::worker::LogLine)>>,
    >,
    /// Keeps a temporary session directory alive as long as the node.
    _scratch: Option<tempfile::TempDir>,
    handle: NodeHandle,
}

impl Node {
    /// Binds the node's endpoints and detects its resources; workers are
    /// processes of the job's executable. Must be called inside a tokio
    /// runtime.
    pub fn bind(config: NodeConfig, token: JoinToken) -> Result<Self, NodeError> {
        Self::bind_inner(config, token, None)
    }

    /// Like [`bind`](Node::bind), starting workers with `launcher` (local
    /// mode runs them as threads).
    pub fn bind_with_launcher(
        config: NodeConfig,
        token: JoinToken,
        launcher: Arc<dyn WorkerLauncher>,
    ) -> Result<Self, NodeError> {
        Self::bind_inner(config, token, Some(launcher))
    }

    fn bind_inner(
        config: NodeConfig,
        token: JoinToken,
        launcher: Option<Arc<dyn WorkerLauncher>>,
    ) -> Result<Self, NodeError> {
        let resources = machine::resources(&config);
        resources.validate()?;
        if resources.get(shoal_proto::resources::GPU) > f64::from(gpus::DEVICES_MAX) {
            return Err(NodeError::Resource(
                shoal_proto::resources::InvalidResource {
                    name: shoal_proto::resources::GPU.into(),
                    reason: "a node offers at most 1024 GPU devices",
                },
            ));
        }
        shoal_proto::placement::check_labels(&config.labels)?;
        // No server configuration until the head issues a certificate: until
        // then quinn refuses every incoming connection.
        let server = endpoint::endpoint(config.listen, None, &config.limits).map_err(|source| {
            NodeError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = server.local_addr().map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        })?;
        let transport = Transport::token_client(
            ClientAuth {
                token: token.clone(),
                role: Role::Node,
            },
            HEAD_SERVER_NAME,
            config.limits.clone(),
        )?;
        let mut auth = ServerAuth::new(
            token.clone(),
            vec![Role::Node, Role::Driver, Role::Worker, Role::Client],
        );
        auth.certificate_required = vec![Role::Node];
        let (node_id, rx) = watch::channel(None);
        // Process workers' output is streamed to their job's driver.
        let (launcher, logs) = match launcher {
            Some(launcher) => (launcher, None),
            None => {
                let (tx, logs) = tokio::sync::mpsc::channel(LOG_LINES_QUEUED_MAX);
                let launcher: Arc<dyn WorkerLauncher> = Arc::new(ProcessLauncher {
                    logs: Some((tx, rx.clone())),
                    inherit_output: false,
                });
                (launcher, Some(logs))
            }
        };
        let (head, head_rx) = watch::channel(None);
        let (scratch, session_dir) = match &config.session_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("shoal-node-")
                    .tempdir()
                    .map_err(|source| NodeError::Bind {
                        addr: config.listen,
                        source,
                    })?;
                let path = dir.path().to_path_buf();
                (Some(dir), path)
            }
        };
        let binaries = BinaryCache::new(session_dir.join("executables"), head_rx);
        let pool = Arc::new(WorkerPool::new(
            launcher,
            binaries,
            PoolConfig {
                total: resources.clone(),
                idle_timeout: config.worker_idle_timeout,
                start_timeout: config.worker_start_timeout,
                log_dir: Some(session_dir.join("logs"))
                    .filter(|d| std::fs::create_dir_all(d).is_ok()),
            },
        ));
        let store_root = object_store::default_root(&session_dir);
        let store_bytes = store_size(config.object_store_bytes, &store_root)?;
        let store = ObjectStore::new(
            &store_root,
            &session_dir.join("spill"),
            store_bytes,
            config.object_spill_bytes,
        )?;
        let store = Arc::new(Mutex::new(store));
        let peer_config = watch::channel(None).0;
        let transfers = Arc::new(transfer::Transfers::new(
            store.clone(),
            transport.clone(),
            peer_config.subscribe(),
        ));
        let handle = NodeHandle {
            node_id: rx,
            local_addr,
            pool: pool.clone(),
            store: store.clone(),
            store_capacity: store_bytes,
            transfers: transfers.clone(),
            stats: Arc::new(HandshakeStats::default()),
            heartbeats: Arc::default(),
        };
        Ok(Self {
            config,
            token,
            resources,
            server,
            transport,
            auth: Arc::new(auth),
            node_id,
            head,
            pool,
            store,
            store_capacity: store_bytes,
            peer_config,
            transfers,
            logs: Mutex::new(logs),
            _scratch: scratch,
            handle,
        })
    }

    /// A handle to watch the node.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown` is cancelled; then stops its workers and leaves
    /// the cluster.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(addr = %self.handle.local_addr, head = %self.config.head_address, resources = ?self.resources, "node daemon starting");
        let service = Arc::new(
            api::NodeService::new(
                self.handle.node_id.clone(),
                self.head.subscribe(),
                self.resources.clone(),
                self.pool.clone(),
                self.store.clone(),
                self.transfers.clone(),
            )
            .with_daemon_log(if self.config.is_head_node {
                "head.log".to_string()
            } else {
                format!("node-{}.log", std::process::id())
            }),
        );
        let stats = Arc::clone(&self.handle.stats);
        let server = shoal_net::rpc::serve(
            self.server.clone(),
            service,
            self.auth.clone(),
            self.config.limits.clone(),
            stats,
            shutdown.clone(),
        );
        let link = head_link::HeadLink {
            config: &self.config,
            token: &self.token,
            transport: &self.transport,
            resources: &self.resources,
            advertised: self.handle.local_addr,
            server: &self.server,
            auth: &self.auth,
            node_id: &self.node_id,
            head: &self.head,
            pool: &self.pool,
            store: &self.store,
            store_capacity: self.store_capacity,
            peer_config: &self.peer_config,
            transfers: &self.transfers,
            heartbeats: &self.handle.heartbeats,
        };
        let logs = self.logs.locked().take();
        let forward = async {
            if let Some(logs) = logs {
                forward_logs(logs, &self.transport, shutdown.clone()).await;
            }
        };
        tokio::join!(server, link.run(shutdown.clone()), forward);
        self.pool.stop_all();
        self.store.locked().close();
        if let Some(endpoint) = self.transport.endpoint() {
            endpoint.close(shoal_net::close_code::SHUTDOWN.into(), b"node stopping");
        }
        info!("node daemon stopped");
    }
}
/// Output lines waiting to be sent to drivers; more are dropped (and counted
/// in the worker's log file).
const LOG_LINES_QUEUED_MAX: usize = 10_000;
/// Lines sent in one message.
const LOG_LINES_PER_BATCH: usize = 1_000;

type DriverClient = RpcClient<shoal_proto::WorkerRequest, shoal_proto::WorkerReply>;

/// Sends workers' output to their drivers, in batches.
async fn forward_logs(
    mut lines: tokio::sync::mpsc::Receiver<(shoal_proto::Address, shoal_proto::worker::LogLine)>,
    transport: &Transport,
    shutdown: CancellationToken,
) {
    let mut drivers: std::collections::HashMap<String, DriverClient> =
        std::collections::HashMap::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            line = lines.recv() => match line {
                Some(line) => line,
                None => return,
            },
        };
        let mut batches: std::collections::HashMap<String, Vec<shoal_proto::worker::LogLine>> =
            std::collections::HashMap::new();
        batches.entry(first.0.address).or_default().push(first.1);
        let mut taken = 1;
        while taken < LOG_LINES_PER_BATCH {
            let Ok((driver, line)) = lines.try_recv() else {
                break;
            };
            batches.entry(driver.address).or_default().push(line);
            taken += 1;
        }
        for (address, batch) in batches {
            let client = match drivers.get(&address) {
                Some(c) if c.close_reason().is_none() => c.clone(),
                _ => {
                    let Ok(addr) = address.parse::<SocketAddr>() else {
                        continue;
                    };
                    match transport
                        .connect::<shoal_proto::WorkerRequest, shoal_proto::WorkerReply>(addr)
                        .await
                    {
                        Ok(c) => {
                            drivers.insert(address.clone(), c.clone());
                            c
                        }
                        Err(e) => {
                            tracing::debug!(driver = %address, error = %e, "cannot reach the driver for worker output");
                            continue;
                        }
                    }
                }
            };
            let send = shoal_proto::WorkerRequest::Logs(batch);
            if let Err(e) = client.call(&send, std::time::Duration::from_secs(5)).await {
                tracing::debug!(driver = %address, error = %e, "worker output not delivered");
                drivers.remove(&address);
            }
        }
    }
}

/// Binds and runs a node daemon until `shutdown` is cancelled.
pub async fn run(
    config: NodeConfig,
    token: JoinToken,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    Node::bind(config, token)?.run(shutdown).await;
    Ok(())
}
