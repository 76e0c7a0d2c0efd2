//! The node daemon: one per machine.
//!
//! It joins the head with the cluster's join token, reports the resources of
//! its machine (CPUs and memory detected, or set by configuration), heartbeats,
//! and serves its peers over mutual TLS with the certificate the head issued
//! it. If the head restarts or declares it dead, it joins again, as a new node.
//! Worker pools, the object store and dispatch arrive with later issues.
//!
//! Modules:
//! - [`config`]: [`NodeConfig`] and its defaults.
//! - [`machine`]: what this machine has (CPU count, memory).
//! - [`head_link`]: the join, heartbeat and reconnect loop.
//! - [`api`]: the node service its peers call.
//!
//! The entry point is [`Node::bind`] then [`Node::run`], or [`run`] for both.

pub mod api;
pub mod config;
pub mod head_link;
pub mod machine;

use std::net::SocketAddr;
use std::sync::Arc;

use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::{endpoint, ConnectError, JoinToken, QuicTransport, HEAD_SERVER_NAME};
use shoal_proto::{NodeId, ResourceSet, Role};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::NodeConfig;

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
}

/// A view of a running node daemon, for its embedder and tests.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    node_id: watch::Receiver<Option<NodeId>>,
    local_addr: SocketAddr,
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
}

/// A node daemon bound to its address, ready to [`run`](Node::run).
pub struct Node {
    config: NodeConfig,
    resources: ResourceSet,
    server: shoal_net::quinn::Endpoint,
    transport: QuicTransport,
    auth: Arc<ServerAuth>,
    node_id: watch::Sender<Option<NodeId>>,
    handle: NodeHandle,
}

impl Node {
    /// Binds the node's endpoints and detects its resources. Must be called
    /// inside a tokio runtime.
    pub fn bind(config: NodeConfig, token: JoinToken) -> Result<Self, NodeError> {
        let resources = machine::resources(&config);
        resources.validate()?;
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
        let transport = QuicTransport::token_client(
            ClientAuth {
                token: token.clone(),
                role: Role::Node,
            },
            HEAD_SERVER_NAME,
            config.limits.clone(),
        )?;
        let auth = Arc::new(ServerAuth::new(
            token,
            vec![Role::Node, Role::Driver, Role::Worker],
        ));
        let (node_id, rx) = watch::channel(None);
        let handle = NodeHandle {
            node_id: rx,
            local_addr,
        };
        Ok(Self {
            config,
            resources,
            server,
            transport,
            auth,
            node_id,
            handle,
        })
    }

    /// A handle to watch the node.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown` is cancelled; then leaves the cluster.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(addr = %self.handle.local_addr, head = %self.config.head_address, resources = ?self.resources, "node daemon starting");
        let service = Arc::new(api::NodeService::new(
            self.handle.node_id.clone(),
            self.resources.clone(),
        ));
        let stats = Arc::new(HandshakeStats::default());
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
            transport: &self.transport,
            resources: &self.resources,
            advertised: self.handle.local_addr,
            server: &self.server,
            auth: &self.auth,
            node_id: &self.node_id,
        };
        tokio::join!(server, link.run(shutdown));
        self.transport
            .endpoint()
            .close(shoal_net::close_code::SHUTDOWN.into(), b"node stopping");
        info!("node daemon stopped");
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
