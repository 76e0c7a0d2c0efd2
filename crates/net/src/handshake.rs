//! The `Hello` exchange that opens every connection.
//!
//! The client opens the first bidirectional stream, sends [`Hello`] and reads
//! [`HelloReply`]. The server reads nothing else from the connection until it
//! has checked, in order: the protocol version, the cluster id, that the role
//! may connect, and the token proof (compared in constant time by
//! `ring::hmac::verify`).
//!
//! Proofs are HMAC-SHA256 keyed by the token's secret over a side label and
//! 32 bytes of TLS keying material exported with the role as context
//! (RFC 5705), so a proof is bound to one TLS session and one role: it cannot be
//! replayed on another connection or relayed by a man in the middle.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;
use shoal_proto::codec::CodecLimits;
use shoal_proto::hello::PROOF_LEN;
use shoal_proto::{HandshakeRefusal, Hello, HelloReply, NodeId, Role, PROTOCOL_VERSION};

use crate::error::ConnectError;
use crate::identity::JoinToken;
use crate::rpc::{read_frame, write_frame, FrameReadError};
use crate::sync::RwLockExt;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-hello-v1";
pub(crate) const CLIENT_SIDE: &[u8] = b"shoal client proof";
pub(crate) const SERVER_SIDE: &[u8] = b"shoal server proof";

/// What a client proves in its `Hello`.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    /// The cluster's join token.
    pub token: JoinToken,
    /// What the client is.
    pub role: Role,
}

/// What a server checks in a `Hello`.
#[derive(Debug)]
pub struct ServerAuth {
    /// The cluster's join token.
    pub token: JoinToken,
    /// Roles that may connect.
    pub allowed_roles: Vec<Role>,
    /// The serving node, announced in the `Welcome`; a node daemon sets it
    /// at each registration with the head.
    pub node_id: std::sync::RwLock<Option<NodeId>>,
    /// Roles that must also present a client certificate (checked against
    /// the cluster CA by the TLS layer): node daemons talking to each other.
    pub certificate_required: Vec<Role>,
}

impl ServerAuth {
    /// Checks for `token`, admitting `allowed_roles`.
    pub fn new(token: JoinToken, allowed_roles: Vec<Role>) -> Self {
        Self {
            token,
            allowed_roles,
            node_id: std::sync::RwLock::new(None),
            certificate_required: Vec::new(),
        }
    }

    /// Sets the node id announced to peers.
    pub fn set_node_id(&self, node_id: NodeId) {
        *self.node_id.write_locked() = Some(node_id);
    }

    pub(crate) fn node_id(&self) -> Option<NodeId> {
        *self.node_id.read_locked()
    }
}

/// Counters a server keeps about its handshakes.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    /// Peers that completed the handshake.
    pub accepted: AtomicU64,
    /// Peers refused (bad token, foreign cluster, wrong version, garbage, ...).
    pub refused: AtomicU64,
    /// Peers asked to prove their address (a QUIC Retry) because the
    /// handshake slots were filling up.
    pub retried: AtomicU64,
}

fn exported(conn: &quinn::Connection, role: Role) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, &[role.tag()])
        .ok()?;
    Some(out)
}

pub(crate) fn proof(token: &JoinToken, side: &[u8], exported: &[u8; 32]) -> Vec<u8> {
    let mut ctx = hmac::Context::with_key(&token.hmac_key());
    ctx.update(side);
    ctx.update(exported);
    ctx.sign().as_ref().to_vec()
}

pub(crate) fn proof_matches(
    token: &JoinToken,
    side: &[u8],
    exported: &[u8; 32],
    claimed: &[u8],
) -> bool {
    let mut msg = Vec::with_capacity(side.len() + exported.len());
    msg.extend_from_slice(side);
    msg.extend_from_slice(exported);
    claimed.len() == PROOF_LEN && hmac::verify(&token.hmac_key(), &msg, claimed).is_ok()
}

/// Runs the client side of the handshake on a fresh connection. Returns the
/// node id the server announced, if it is a node.
pub async fn client_handshake(
    conn: &quinn::Connection,
    auth: &ClientAuth,
    addr: SocketAddr,
) -> Result<Option<NodeId>, ConnectError> {
    let failed = |reason: String| ConnectError::Handshake {
        addr: addr.to_string(),
        reason,
    };
    let exported = exported(conn, auth.role)
        .ok_or_else(|| failed("TLS keying material unavailable".into()))?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: auth.token.cluster_id,
        role: auth.role,
        token_proof: proof(&auth.token, CLIENT_SIDE, &exported),
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|source| ConnectError::Connection {
            addr: addr.to_string(),
            source,
        })?;
    write_frame(&mut send, &hello, &CodecLimits::HANDSHAKE)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let _ = send.finish();
    let reply: HelloReply = match read_frame(&mut recv, &CodecLimits::HANDSHAKE).await {
        Ok(reply) => reply,
        // A server that closes the connection instead of answering refused
        // us without saying why.
        Err(FrameReadError::Connection(source)) => {
            return Err(ConnectError::Connection {
                addr: addr.to_string(),
                source,
            })
        }
        Err(e) => return Err(failed(e.to_string())),
    };
    match reply {
        HelloReply::Welcome {
            server_proof,
            node_id,
        } => {
            if proof_matches(&auth.token, SERVER_SIDE, &exported, &server_proof) {
                Ok(node_id)
            } else {
                conn.close(
                    crate::close_code::HANDSHAKE_REFUSED.into(),
                    b"server proof invalid",
                );
                Err(ConnectError::ServerNotAuthenticated {
                    addr: addr.to_string(),
                })
            }
        }
        HelloReply::Refused(refusal) => {
            conn.close(crate::close_code::HANDSHAKE_REFUSED.into(), b"refused");
            Err(ConnectError::Refused {
                addr: addr.to_string(),
                refusal,
            })
        }
    }
}

/// Why the server side of a handshake did not accept the peer.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    /// The peer's `Hello` was refused; the peer was told why.
    #[error("refused: {0}")]
    Refused(HandshakeRefusal),
    /// The exchange broke off.
    #[error("handshake stream failed: {0}")]
    Stream(String),
}

/// Runs the server side of the handshake: reads and checks the peer's `Hello`
/// and answers it. On success returns the peer's role. On refusal the peer has
/// been sent the reason; the caller closes the connection.
pub async fn server_handshake(
    conn: &quinn::Connection,
    auth: &ServerAuth,
    stats: &HandshakeStats,
) -> Result<Role, HandshakeFailure> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
    let verdict = match read_frame::<Hello>(&mut recv, &CodecLimits::HANDSHAKE).await {
        Ok(hello) => check_hello(
            auth,
            &hello,
            conn.peer_identity().is_some(),
            exported(conn, hello.role),
        )
        .map(|()| hello.role),
        Err(FrameReadError::Decode(e)) => Err(HandshakeRefusal::Malformed(e.to_string())),
        Err(e) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(HandshakeFailure::Stream(e.to_string()));
        }
    };
    let reply = match &verdict {
        Ok(role) => {
            // The role was checked, so the exporter succeeds as it did in check_hello.
            let exported = exported(conn, *role).unwrap_or([0; 32]);
            HelloReply::Welcome {
                server_proof: proof(&auth.token, SERVER_SIDE, &exported),
                node_id: auth.node_id(),
            }
        }
        Err(refusal) => HelloReply::Refused(refusal.clone()),
    };
    let sent = write_frame(&mut send, &reply, &CodecLimits::HANDSHAKE).await;
    let _ = send.finish();
    match verdict {
        Ok(role) => {
            sent.map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(role)
        }
        Err(refusal) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            Err(HandshakeFailure::Refused(refusal))
        }
    }
}

/// Checks a `Hello`: version, cluster, role (and its certificate, if the
/// role needs one) and the token proof over `binding`, the bytes that tie
/// the proof to this one connection and role.
pub(crate) fn check_hello(
    auth: &ServerAuth,
    hello: &Hello,
    has_certificate: bool,
    binding: Option<[u8; 32]>,
) -> Result<(), HandshakeRefusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(HandshakeRefusal::ProtocolVersion {
            server: PROTOCOL_VERSION,
            client: hello.protocol_version,
        });
    }
    if hello.cluster_id != auth.token.cluster_id {
        return Err(HandshakeRefusal::ClusterMismatch);
    }
    if !auth.allowed_roles.contains(&hello.role)
        || (auth.certificate_required.contains(&hello.role) && !has_certificate)
    {
        return Err(HandshakeRefusal::RoleNotAllowed(hello.role));
    }
    let exported =
        binding.ok_or_else(|| HandshakeRefusal::Malformed("no TLS keying material".into()))?;
    if !proof_matches(&auth.token, CLIENT_SIDE, &exported, &hello.token_proof) {
        return Err(HandshakeRefusal::BadToken);
    }
    Ok(())
}
