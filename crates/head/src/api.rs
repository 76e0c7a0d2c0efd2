//! The head service: answers [`HeadRequest`]s.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shoal_net::handshake::HandshakeStats;
use shoal_net::{ClusterIdentity, Peer, Service};
use shoal_proto::head::NodeRegistered;
use shoal_proto::{
    ClusterId, ClusterStatus, HeadReply, HeadRequest, Role, ServiceError, ServiceErrorKind,
};
use tracing::{info, warn};

use crate::config::HeadConfig;
use crate::membership::{Fenced, Membership};

/// The head's request handler and the state it serves.
pub struct HeadService {
    identity: Arc<ClusterIdentity>,
    membership: Mutex<Membership>,
    stats: Arc<HandshakeStats>,
    heartbeat_interval: Duration,
    node_timeout: Duration,
}

impl HeadService {
    /// A head with an empty node table.
    pub fn new(
        identity: Arc<ClusterIdentity>,
        config: &HeadConfig,
        stats: Arc<HandshakeStats>,
    ) -> Self {
        Self {
            identity,
            membership: Mutex::new(Membership::new(config.nodes_max, config.dead_nodes_kept)),
            stats,
            heartbeat_interval: config.heartbeat_interval,
            node_timeout: config.node_timeout,
        }
    }

    /// The cluster's id.
    pub fn cluster_id(&self) -> ClusterId {
        self.identity.cluster_id()
    }

    fn membership(&self) -> MutexGuard<'_, Membership> {
        // The table stays consistent under panics: every method finishes its
        // updates before returning, so a poisoned lock's data is usable.
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declares silent nodes dead.
    pub fn sweep(&self) {
        let dead = self.membership().sweep(Instant::now(), self.node_timeout);
        for node_id in dead {
            warn!(%node_id, timeout = ?self.node_timeout, "node missed its heartbeats; declared dead");
        }
    }

    /// The cluster's node table and resource view.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            cluster_id: self.cluster_id(),
            nodes: self.membership().status(Instant::now()),
            handshakes_refused: self.stats.refused.load(Ordering::Relaxed),
        }
    }
}

fn only_nodes(peer: &Peer) -> Result<(), ServiceError> {
    if peer.role == Role::Node {
        Ok(())
    } else {
        Err(ServiceError::new(
            ServiceErrorKind::PermissionDenied,
            format!(
                "only node daemons may do this; this connection is a {:?}",
                peer.role
            ),
        ))
    }
}

impl Service for HeadService {
    type Request = HeadRequest;
    type Reply = HeadReply;

    async fn handle(&self, peer: &Peer, request: HeadRequest) -> Result<HeadReply, ServiceError> {
        match request {
            HeadRequest::RegisterNode(info) => {
                only_nodes(peer)?;
                info.resources_total
                    .validate()
                    .map_err(|e| ServiceError::new(ServiceErrorKind::BadRequest, e.to_string()))?;
                let address = info.address.clone();
                let node_id = self
                    .membership()
                    .register(info, Instant::now())
                    .map_err(|e| ServiceError::new(ServiceErrorKind::Unavailable, e.to_string()))?;
                let cert = self.identity.issue_node_cert(node_id).map_err(|e| {
                    ServiceError::new(
                        ServiceErrorKind::Internal,
                        format!("issuing certificate: {e}"),
                    )
                })?;
                info!(%node_id, %address, remote = %peer.remote, "node registered");
                Ok(HeadReply::NodeRegistered(NodeRegistered {
                    node_id,
                    heartbeat_interval_ms: u64::try_from(self.heartbeat_interval.as_millis())
                        .unwrap_or(u64::MAX),
                    node_cert_der: cert.cert_der,
                    node_key_der: cert.key_der,
                    ca_cert_der: self.identity.ca_cert_der(),
                }))
            }
            HeadRequest::Heartbeat {
                node_id,
                resources_available,
            } => {
                only_nodes(peer)?;
                resources_available
                    .validate()
                    .map_err(|e| ServiceError::new(ServiceErrorKind::BadRequest, e.to_string()))?;
                match self
                    .membership()
                    .heartbeat(node_id, resources_available, Instant::now())
                {
                    Ok(()) => Ok(HeadReply::HeartbeatAck),
                    Err(Fenced(node_id)) => Ok(HeadReply::NodeFenced { node_id }),
                }
            }
            HeadRequest::UnregisterNode { node_id } => {
                only_nodes(peer)?;
                if self.membership().unregister(node_id) {
                    info!(%node_id, "node left");
                }
                Ok(HeadReply::NodeUnregistered)
            }
            HeadRequest::GetClusterStatus => Ok(HeadReply::ClusterStatus(self.status())),
        }
    }
}
