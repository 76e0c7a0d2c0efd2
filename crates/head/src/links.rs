//! Which node each connection speaks for.
//!
//! The `Node` role proves that a peer holds the cluster token, not which
//! node it is; a request's own `node_id` is the peer's word. So a
//! connection speaks for one node: the one it registered (or rejoined a
//! restarted head) as, or the one whose registration key it gave in a
//! heartbeat, as a node does on the connection that replaces a lost one.
//! The key is known only to the node and the head. Requests that act for a
//! node (heartbeats, leaving, actor restarts, a lease's blocking) are
//! refused on any other connection.

use std::collections::HashMap;

use shoal_net::Peer;
use shoal_proto::NodeId;
use shoal_proto::{ServiceError, ServiceErrorKind};

/// The node each open connection speaks for.
#[derive(Debug, Default)]
pub(crate) struct NodeLinks {
    by_connection: HashMap<u64, NodeId>,
}

impl NodeLinks {
    /// `peer`'s connection now speaks for `node_id` (and no other node).
    pub(crate) fn bind(&mut self, peer: &Peer, node_id: NodeId) {
        self.by_connection.insert(peer.connection_id, node_id);
    }

    /// The connection has closed.
    pub(crate) fn forget(&mut self, peer: &Peer) {
        self.by_connection.remove(&peer.connection_id);
    }

    /// Whether `peer`'s connection speaks for `node_id`.
    pub(crate) fn speaks_for(&self, peer: &Peer, node_id: NodeId) -> bool {
        self.by_connection.get(&peer.connection_id) == Some(&node_id)
    }

    /// Refuses a request for `node_id` unless `peer`'s connection speaks
    /// for that node.
    pub(crate) fn require(&self, peer: &Peer, node_id: NodeId) -> Result<(), ServiceError> {
        if self.speaks_for(peer, node_id) {
            return Ok(());
        }
        Err(ServiceError::new(
            ServiceErrorKind::PermissionDenied,
            match self.by_connection.get(&peer.connection_id) {
                Some(own) => {
                    format!("this connection speaks for node {own}, not for node {node_id}")
                }
                None => format!(
                    "this connection speaks for no node: node {node_id} did not register on it \
                     or give its registration key"
                ),
            },
        ))
    }

    /// Connections bound to a node.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_connection.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::Role;

    fn peer(connection_id: u64) -> Peer {
        Peer {
            role: Role::Node,
            remote: ([127, 0, 0, 1], 1).into(),
            connection_id,
        }
    }

    #[test]
    fn a_connection_speaks_for_the_one_node_bound_to_it() {
        let (a, b) = (NodeId::random(), NodeId::random());
        let mut links = NodeLinks::default();
        assert!(links.require(&peer(1), a).is_err(), "unbound");
        links.bind(&peer(1), a);
        links.bind(&peer(2), b);
        assert!(links.require(&peer(1), a).is_ok());
        let err = links.require(&peer(1), b).expect_err("another node's");
        assert_eq!(err.kind, ServiceErrorKind::PermissionDenied);
        assert!(err.message.contains(&a.to_string()), "{}", err.message);
        // Bound again (a key given for another node): the old one goes.
        links.bind(&peer(1), b);
        assert!(!links.speaks_for(&peer(1), a));
        links.forget(&peer(1));
        links.forget(&peer(2));
        assert_eq!(links.len(), 0);
        assert!(links.require(&peer(2), b).is_err(), "closed");
    }
}
