//! The head service: node membership, heartbeats and cluster status.

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, NodeId};
use crate::resources::ResourceSet;

/// A request to the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum HeadRequest {
    /// A node daemon joins; the head answers [`HeadReply::NodeRegistered`].
    RegisterNode(RegisterNode),
    /// A node daemon is alive and has these resources free.
    Heartbeat {
        /// The node's id from its registration.
        node_id: NodeId,
        /// The resources the node has free now.
        resources_available: ResourceSet,
    },
    /// A node daemon leaves on purpose (graceful stop).
    UnregisterNode {
        /// The leaving node.
        node_id: NodeId,
    },
    /// The node table and resource view.
    GetClusterStatus,
}

/// What a joining node says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RegisterNode {
    /// The address the node serves its peers on (`host:port`).
    pub address: String,
    /// The node daemon's process id.
    pub pid: u32,
    /// The host's name, for humans.
    pub hostname: String,
    /// Everything the node offers.
    pub resources_total: ResourceSet,
    /// True for the node daemon inside the head process.
    #[serde(default)]
    pub is_head_node: bool,
}

/// A reply from the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum HeadReply {
    /// The node is a member, under a new id.
    NodeRegistered(NodeRegistered),
    /// The heartbeat was recorded.
    HeartbeatAck,
    /// The node is not (or no longer) a member: it was declared dead, or the
    /// head restarted. The node must register again, as a new node.
    NodeFenced {
        /// The id the head refused.
        node_id: NodeId,
    },
    /// The node has left.
    NodeUnregistered,
    /// The cluster's state.
    ClusterStatus(ClusterStatus),
}

/// The head's welcome to a new node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NodeRegistered {
    /// The node's id for this incarnation.
    pub node_id: NodeId,
    /// How often the head expects a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The node's certificate for node-to-node mutual TLS (DER), signed by
    /// the cluster CA.
    #[serde(with = "serde_bytes")]
    pub node_cert_der: Vec<u8>,
    /// The private key of that certificate (PKCS#8 DER).
    #[serde(with = "serde_bytes")]
    pub node_key_der: Vec<u8>,
    /// The cluster CA certificate (DER), to verify peers with.
    #[serde(with = "serde_bytes")]
    pub ca_cert_der: Vec<u8>,
}

/// The cluster's node table and resource view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ClusterStatus {
    /// The cluster's id.
    pub cluster_id: ClusterId,
    /// Every node the head knows, alive or dead, in registration order.
    pub nodes: Vec<NodeStatus>,
    /// Handshakes the head has refused since it started.
    #[serde(default)]
    pub handshakes_refused: u64,
}

/// One node as the head sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: NodeId,
    /// The address the node serves peers on.
    pub address: String,
    /// Alive or dead.
    pub state: NodeState,
    /// The node daemon's process id.
    pub pid: u32,
    /// The host's name.
    pub hostname: String,
    /// True for the node daemon inside the head process.
    pub is_head_node: bool,
    /// Everything the node offers.
    pub resources_total: ResourceSet,
    /// What it has free, as of its last heartbeat.
    pub resources_available: ResourceSet,
    /// Milliseconds since the head last heard from the node.
    pub last_heartbeat_ms_ago: u64,
}

/// Whether a node is a live member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeState {
    /// Heartbeating within the timeout.
    Alive,
    /// Missed heartbeats past the timeout, or left. Never alive again: a
    /// restarted daemon joins as a new node.
    Dead,
}
