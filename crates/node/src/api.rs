//! The node service its peers call.

use shoal_net::{Peer, Service};
use shoal_proto::{NodeId, NodeReply, NodeRequest, ResourceSet, ServiceError, ServiceErrorKind};
use tokio::sync::watch;

/// Answers [`NodeRequest`]s.
pub struct NodeService {
    node_id: watch::Receiver<Option<NodeId>>,
    resources: ResourceSet,
}

impl NodeService {
    /// A service for the node whose id `node_id` follows.
    pub fn new(node_id: watch::Receiver<Option<NodeId>>, resources: ResourceSet) -> Self {
        Self { node_id, resources }
    }

    fn node_id(&self) -> Result<NodeId, ServiceError> {
        (*self.node_id.borrow())
            .ok_or_else(|| ServiceError::new(ServiceErrorKind::Unavailable, "node has not joined"))
    }
}

impl Service for NodeService {
    type Request = NodeRequest;
    type Reply = NodeReply;

    async fn handle(&self, _peer: &Peer, request: NodeRequest) -> Result<NodeReply, ServiceError> {
        let node_id = self.node_id()?;
        Ok(match request {
            NodeRequest::Ping => NodeReply::Pong { node_id },
            NodeRequest::GetNodeInfo => NodeReply::NodeInfo {
                node_id,
                pid: std::process::id(),
                resources_total: self.resources.clone(),
                // No work runs on nodes yet: everything is free.
                resources_available: self.resources.clone(),
            },
        })
    }
}
