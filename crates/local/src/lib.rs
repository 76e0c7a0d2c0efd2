//! A whole cluster inside this process: one head and node daemons, each on
//! its own loopback port, talking QUIC exactly as separate processes do.
//!
//! The SDK's local mode (`shoal::init` with no address) runs one, with its
//! workers as threads of the driver; tests and examples use one to add,
//! kill and stop nodes and restart the head. The SDK re-exports it as
//! `shoal::LocalCluster` (its default `local` feature); this crate does not
//! depend on the SDK, so a program that only joins clusters builds without
//! the head and the node daemon.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_head::{Head, HeadConfig, HeadError};
use shoal_net::{ClusterIdentity, IdentityError, JoinToken, NetLimits};
use shoal_node::{Node, NodeConfig, NodeError, NodeHandle, WorkerLauncher};
use shoal_proto::{NodeId, ResourceSet};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why a local cluster could not start, or a verb on it failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The cluster's identity (its CA and join token) could not be made.
    #[error("cannot make the local cluster's identity: {0}")]
    Identity(#[from] IdentityError),
    /// The head could not start.
    #[error("the local head could not start: {0}")]
    Head(#[source] HeadError),
    /// The head, stopped by [`LocalCluster::restart_head`], could not start
    /// again on its address.
    #[error("the local head could not start again on {addr}: {source}")]
    HeadRestart {
        /// The head's address, kept across the restart.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: HeadError,
    },
    /// A node daemon could not start (node 0 is the head's node).
    #[error("local node {index} could not start: {source}")]
    Node {
        /// The node it would have been.
        index: usize,
        /// Why.
        #[source]
        source: NodeError,
    },
    /// A node daemon started but did not join the head in time; it is
    /// stopped with the cluster.
    #[error("local node {index} did not join within {timeout:?}")]
    JoinTimeout {
        /// The node.
        index: usize,
        /// How long it had.
        timeout: Duration,
    },
    /// A verb named a node index the cluster never had.
    #[error("no local node {0}")]
    NoNode(usize),
    /// A verb needs the node's id, and the node never joined.
    #[error("local node {0} never joined")]
    NeverJoined(usize),
}

/// `Result` with [`LocalError`].
pub type Result<T, E = LocalError> = std::result::Result<T, E>;

/// How the local cluster is laid out and timed.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// CPUs of the node daemon that runs beside the head.
    pub head_node_cpus: f64,
    /// How often nodes heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which the head declares a node dead.
    pub node_timeout: Duration,
    /// Transport limits for every daemon.
    pub limits: NetLimits,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            head_node_cpus: shoal_node::machine::detect_cpus() as f64,
            heartbeat_interval: shoal_head::config::defaults::HEARTBEAT_INTERVAL,
            node_timeout: shoal_head::config::defaults::NODE_TIMEOUT,
            limits: NetLimits::default(),
        }
    }
}

/// How long a new local node may take to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

struct LocalNode {
    handle: NodeHandle,
    running: Option<Running>,
}

/// A head and node daemons running in this process.
///
/// A client of its head connects to [`address`](Self::address) with
/// [`token`](Self::token) (the SDK's `LocalClusterExt::client` does that).
/// Dropped without [`shutdown`](Self::shutdown), it ends every task at once.
pub struct LocalCluster {
    config: LocalConfig,
    /// How nodes start workers; processes of the job's executable if unset.
    launcher: Option<Arc<dyn WorkerLauncher>>,
    identity: Arc<ClusterIdentity>,
    head_addr: SocketAddr,
    head: Option<Running>,
    nodes: Vec<LocalNode>,
}

impl LocalCluster {
    /// Starts a head on a free loopback port and its node daemon, and waits
    /// until that node has joined.
    pub async fn start(config: LocalConfig) -> Result<Self> {
        Self::start_with(config, None).await
    }

    /// Like [`start`](Self::start), its nodes starting workers with
    /// `launcher` (processes of the job's executable when `None`).
    pub async fn start_with(
        config: LocalConfig,
        launcher: Option<Arc<dyn WorkerLauncher>>,
    ) -> Result<Self> {
        let identity = Arc::new(ClusterIdentity::generate()?);
        let head_config = HeadConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            heartbeat_interval: config.heartbeat_interval,
            node_timeout: config.node_timeout,
            limits: config.limits.clone(),
            ..HeadConfig::default()
        };
        let head = Head::bind(head_config, identity.clone()).map_err(LocalError::Head)?;
        let head_addr = head.local_addr().map_err(|source| {
            LocalError::Head(HeadError::Bind {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                source,
            })
        })?;
        let mut cluster = Self {
            config,
            launcher,
            identity,
            head_addr,
            head: None,
            nodes: Vec::new(),
        };
        cluster.head = Some(spawn(|token| head.run(token)));
        let mut resources = ResourceSet::new();
        resources.set(shoal_proto::resources::CPU, cluster.config.head_node_cpus);
        cluster.add_node_with(resources, true).await?;
        Ok(cluster)
    }

    /// The head's address.
    pub fn address(&self) -> SocketAddr {
        self.head_addr
    }

    /// The join token.
    pub fn token(&self) -> &JoinToken {
        self.identity.token()
    }

    /// Adds a node daemon offering `resources` (CPU included) and waits until
    /// it has joined. Returns its index for the other verbs.
    pub async fn add_node(&mut self, resources: ResourceSet) -> Result<usize> {
        self.add_node_with(resources, false).await
    }

    async fn add_node_with(
        &mut self,
        mut resources: ResourceSet,
        is_head_node: bool,
    ) -> Result<usize> {
        let cpus = resources.0.remove(shoal_proto::resources::CPU);
        let config = NodeConfig {
            head_address: self.head_addr.to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            num_cpus: cpus,
            resources,
            is_head_node,
            reconnect_backoff_max: Duration::from_millis(500),
            limits: self.config.limits.clone(),
            ..NodeConfig::default()
        };
        let index = self.nodes.len();
        let node = match &self.launcher {
            Some(launcher) => {
                Node::bind_with_launcher(config, self.token().clone(), Arc::clone(launcher))
            }
            None => Node::bind(config, self.token().clone()),
        }
        .map_err(|source| LocalError::Node { index, source })?;
        let mut handle = node.handle();
        let running = spawn(|token| node.run(token));
        // Kept before waiting, so a node that never joins is still stopped
        // with the cluster.
        self.nodes.push(LocalNode {
            handle: handle.clone(),
            running: Some(running),
        });
        tokio::time::timeout(JOIN_TIMEOUT, handle.joined_other_than(None))
            .await
            .map_err(|_| LocalError::JoinTimeout {
                index,
                timeout: JOIN_TIMEOUT,
            })?;
        Ok(index)
    }

    /// The current id of node `index` (0 is the head's node), if it has one.
    pub fn node_id(&self, index: usize) -> Option<NodeId> {
        self.nodes.get(index).and_then(|n| n.handle.node_id())
    }

    /// The address node `index` serves on.
    pub fn node_address(&self, index: usize) -> Option<SocketAddr> {
        self.nodes.get(index).map(|n| n.handle.local_addr())
    }

    /// Live workers of node `index`.
    pub fn worker_count(&self, index: usize) -> usize {
        self.nodes.get(index).map_or(0, |n| n.handle.worker_count())
    }

    /// Waits until node `index` has an id other than `previous` (it joined
    /// again after the head restarted or fenced it).
    pub async fn wait_node_rejoined(&self, index: usize, previous: NodeId) -> Result<NodeId> {
        let node = self.node(index)?;
        Ok(node.handle.clone().joined_other_than(Some(previous)).await)
    }

    fn node(&self, index: usize) -> Result<&LocalNode> {
        self.nodes.get(index).ok_or(LocalError::NoNode(index))
    }

    /// Kills node `index` abruptly: its tasks are dropped mid-flight and it
    /// never says goodbye, as if its process had been SIGKILLed. The head
    /// notices only by its silence.
    pub async fn kill_node(&mut self, index: usize) -> Result<NodeId> {
        let node = self.nodes.get_mut(index).ok_or(LocalError::NoNode(index))?;
        let id = node
            .handle
            .node_id()
            .ok_or(LocalError::NeverJoined(index))?;
        if let Some(running) = node.running.take() {
            // Abort first and wait until the task is gone: the node must not
            // say goodbye. Cancelling while an abort is still pending lets a
            // poll already under way see the cancellation and send its
            // UnregisterNode. Then cancel, so the connection tasks it spawned
            // stop serving too.
            running.task.abort();
            let _ = running.task.await;
            running.shutdown.cancel();
        }
        Ok(id)
    }

    /// Stops node `index` gracefully: it tells the head it is leaving.
    pub async fn stop_node(&mut self, index: usize) -> Result<()> {
        let node = self.nodes.get_mut(index).ok_or(LocalError::NoNode(index))?;
        if let Some(running) = node.running.take() {
            running.stop().await;
        }
        Ok(())
    }

    /// Stops the head (gracefully) and starts a new one on the same address
    /// with the same identity: nodes reconnect and join again as new nodes.
    pub async fn restart_head(&mut self) -> Result<()> {
        if let Some(head) = self.head.take() {
            head.stop().await;
        }
        let config = HeadConfig {
            listen: self.head_addr,
            heartbeat_interval: self.config.heartbeat_interval,
            node_timeout: self.config.node_timeout,
            limits: self.config.limits.clone(),
            ..HeadConfig::default()
        };
        // The stopped head's socket is released by quinn's endpoint driver,
        // a task that ends a moment after the head does: poll the bind until
        // the port is free again, with a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let head = loop {
            match Head::bind(config.clone(), self.identity.clone()) {
                Err(HeadError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                bound => {
                    break bound.map_err(|source| LocalError::HeadRestart {
                        addr: self.head_addr,
                        source,
                    })?
                }
            }
        };
        self.head = Some(spawn(|token| head.run(token)));
        Ok(())
    }

    /// Stops every node, then the head.
    pub async fn shutdown(mut self) {
        for node in &mut self.nodes {
            if let Some(running) = node.running.take() {
                running.stop().await;
            }
        }
        if let Some(head) = self.head.take() {
            head.stop().await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Dropped without shutdown (a test that failed): end every task now.
        for node in &mut self.nodes {
            if let Some(running) = node.running.take() {
                running.shutdown.cancel();
                running.task.abort();
            }
        }
        if let Some(head) = self.head.take() {
            head.shutdown.cancel();
            head.task.abort();
        }
    }
}

fn spawn<F, Fut>(run: F) -> Running
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LocalConfig {
        LocalConfig {
            head_node_cpus: 1.0,
            heartbeat_interval: Duration::from_millis(100),
            node_timeout: Duration::from_secs(1),
            ..LocalConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verbs_name_the_node_they_cannot_find() {
        let mut cluster = LocalCluster::start(config()).await.expect("cluster");
        let head_node = cluster.node_id(0).expect("the head's node joined");
        assert!(cluster.node_address(0).is_some());
        assert_eq!(cluster.node_id(1), None);
        assert_eq!(cluster.worker_count(1), 0);
        let missing = cluster.kill_node(3).await.expect_err("no node 3");
        assert!(matches!(missing, LocalError::NoNode(3)), "{missing:?}");
        assert_eq!(missing.to_string(), "no local node 3");
        let missing = cluster.stop_node(2).await.expect_err("no node 2");
        assert!(matches!(missing, LocalError::NoNode(2)), "{missing:?}");
        let missing = cluster
            .wait_node_rejoined(1, head_node)
            .await
            .expect_err("no node 1");
        assert!(matches!(missing, LocalError::NoNode(1)), "{missing:?}");
        cluster.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_cannot_start_says_which_and_why() {
        let mut cluster = LocalCluster::start(config()).await.expect("cluster");
        let mut bad = ResourceSet::new();
        bad.set("GPU", -1.0);
        let err = cluster.add_node(bad).await.expect_err("a negative GPU");
        assert!(
            matches!(
                err,
                LocalError::Node {
                    index: 1,
                    source: NodeError::Resource(_)
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with("local node 1 could not start: invalid resource \"GPU\""),
            "{text}"
        );
        // The failed node took no index: the next one is node 1.
        let mut good = ResourceSet::new();
        good.set(shoal_proto::resources::CPU, 1.0);
        assert_eq!(cluster.add_node(good).await.expect("node 1"), 1);
        let id = cluster.node_id(1).expect("node 1 joined");
        assert_eq!(cluster.kill_node(1).await.expect("kill"), id);
        cluster.shutdown().await;
    }

    #[test]
    fn errors_keep_their_cause() {
        use std::error::Error as _;
        let err = LocalError::HeadRestart {
            addr: SocketAddr::from(([127, 0, 0, 1], 4000)),
            source: HeadError::Bind {
                addr: SocketAddr::from(([127, 0, 0, 1], 4000)),
                source: std::io::ErrorKind::AddrInUse.into(),
            },
        };
        assert!(
            err.to_string()
                .starts_with("the local head could not start again on 127.0.0.1:4000: cannot listen on 127.0.0.1:4000"),
            "{err}"
        );
        assert!(err.source().is_some_and(|s| s.is::<HeadError>()));
    }
}
