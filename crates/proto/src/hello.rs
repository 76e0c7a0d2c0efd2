//! The handshake that opens every connection.
//!
//! The client opens the first bidirectional stream and sends [`Hello`]; the
//! server answers [`HelloReply`] and, on refusal, closes the connection. Nothing
//! else on the connection is read before the server has accepted the `Hello`.
//!
//! The token proof is an HMAC-SHA256, keyed by the cluster's join token, over a
//! value exported from the connection's TLS session (RFC 5705 keying material)
//! and the role. Because the exported value differs per TLS session, a proof
//! captured on one connection is worthless on another, and a man in the middle
//! (who terminates two TLS sessions) cannot relay it. The server answers with
//! its own proof over the same value, so the client authenticates the server by
//! the token too. The key is the driver token, which every peer holds; a peer
//! claiming the `Node` role adds a second proof keyed by the cluster token,
//! which only node daemons and the head hold. The computation lives in
//! `shoal-net`, which has the TLS session; this module only carries the bytes.

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, NodeId};

/// The protocol version this build speaks. Peers must match exactly.
///
/// 2: variants a version-1 peer cannot decode (`WatchNodeDeaths`,
/// `NodeDeaths`, `FailureKind::ReplyDropped`); such a peer is refused at
/// the handshake instead of failing on them later.
///
/// 3: a node proves the cluster token in `Hello::node_proof`, and a
/// heartbeat carries the node's registration key.
pub const PROTOCOL_VERSION: u32 = 3;

/// Length in bytes of a token proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// What a connecting peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum Role {
    /// A node daemon joining or talking to the cluster.
    Node,
    /// A driver: a user program.
    Driver,
    /// A worker process started by a node daemon.
    Worker,
    /// A command-line client such as `shoal status`.
    Client,
}

impl Role {
    /// A stable one-byte tag, mixed into the token proof so that a proof made
    /// for one role cannot be presented for another.
    pub const fn tag(self) -> u8 {
        match self {
            Role::Node => 1,
            Role::Driver => 2,
            Role::Worker => 3,
            Role::Client => 4,
        }
    }
}

/// The first message on every connection, from the client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The cluster the client believes it is speaking to.
    pub cluster_id: ClusterId,
    /// What the client is.
    pub role: Role,
    /// HMAC-SHA256 of the TLS exporter value and the role, keyed by the
    /// driver token (which holders of the cluster token derive).
    #[serde(with = "serde_bytes")]
    pub token_proof: Vec<u8>,
    /// For the `Node` role: HMAC-SHA256 of the same value keyed by the
    /// cluster token, which drivers do not hold. Empty for other roles.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Vec::is_empty")]
    pub node_proof: Vec<u8>,
}

/// The server's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum HelloReply {
    /// Accepted: the connection now carries requests.
    Welcome {
        /// The server's own proof of the token over the same TLS session.
        #[serde(with = "serde_bytes")]
        server_proof: Vec<u8>,
        /// The serving node, when the server is a node daemon.
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// Refused; the server closes the connection after sending this.
    Refused(HandshakeRefusal),
}

/// Why a server refused a handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum HandshakeRefusal {
    /// The peers speak different protocol versions.
    #[error("protocol version mismatch: server speaks {server}, client spoke {client}")]
    ProtocolVersion {
        /// The server's version.
        server: u32,
        /// The client's version.
        client: u32,
    },
    /// The client named another cluster.
    #[error("cluster id mismatch: this server belongs to another cluster")]
    ClusterMismatch,
    /// The token proof is missing or wrong.
    #[error("bad join token")]
    BadToken,
    /// The role may not connect to this server.
    #[error("role {0:?} may not connect here")]
    RoleNotAllowed(Role),
    /// The peer claimed the `Node` role without proving the cluster token
    /// (it holds the driver token, or none).
    #[error(
        "not a node: nodes join with the cluster token (shoal1.…), not a driver token (shoal1d.…)"
    )]
    NotANode,
    /// The first frame was not a well-formed `Hello`.
    #[error("malformed hello: {0}")]
    Malformed(String),
}
