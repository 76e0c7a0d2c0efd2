//! The node daemon service, spoken between nodes (mutual TLS) and by clients.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::resources::ResourceSet;

/// A request to a node daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum NodeRequest {
    /// Liveness and identity check.
    Ping,
    /// The node's own view of itself.
    GetNodeInfo,
}

/// A reply from a node daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum NodeReply {
    /// Answer to [`NodeRequest::Ping`].
    Pong {
        /// The answering node.
        node_id: NodeId,
    },
    /// Answer to [`NodeRequest::GetNodeInfo`].
    NodeInfo {
        /// The node's id.
        node_id: NodeId,
        /// The node daemon's process id.
        pid: u32,
        /// Everything the node offers.
        resources_total: ResourceSet,
        /// What it has free.
        resources_available: ResourceSet,
    },
}
