//! The Shoal SDK.
//!
//! Today it connects programs to a Shoal cluster and runs whole clusters
//! inside one process; remote functions, actors and objects build on it in
//! later versions.
//!
//! Modules:
//! - [`client`]: [`ClusterClient`], an authenticated connection to a cluster's
//!   head (cluster status today).
//! - [`local`]: [`LocalCluster`], a head and any number of node daemons inside
//!   this process, on loopback, with verbs to kill a node or restart the head
//!   (what Ray's `cluster_utils.Cluster` offers for testing).
//!
//! ```no_run
//! # async fn demo() -> shoal::Result<()> {
//! let cluster = shoal::LocalCluster::start(shoal::LocalConfig::default()).await?;
//! let status = cluster.client().await?.status().await?;
//! assert_eq!(status.nodes.len(), 1);
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod local;

pub use client::ClusterClient;
pub use local::{LocalCluster, LocalConfig};
pub use shoal_proto::{ClusterStatus, NodeId, NodeState, NodeStatus, ResourceSet};

/// What can go wrong talking to or running a cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the cluster could be made.
    #[error("cannot connect to the cluster: {0}")]
    Connect(#[from] shoal_net::ConnectError),
    /// A request to the cluster failed.
    #[error("request to the cluster failed: {0}")]
    Rpc(#[from] shoal_net::RpcError),
    /// The embedded head could not start.
    #[error("the local head could not start: {0}")]
    Head(#[from] shoal_head::HeadError),
    /// An embedded node daemon could not start.
    #[error("a local node could not start: {0}")]
    Node(#[from] shoal_node::NodeError),
    /// The cluster identity could not be made.
    #[error("cluster identity: {0}")]
    Identity(#[from] shoal_net::IdentityError),
    /// The cluster answered something this SDK does not expect.
    #[error("unexpected reply from the cluster: {0}")]
    Protocol(String),
    /// A local-cluster verb named something that does not exist.
    #[error("{0}")]
    NotFound(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
