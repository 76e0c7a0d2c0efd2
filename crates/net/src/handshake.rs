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
//!
//! What each side makes of the bytes it receives is a pure function, used by
//! the QUIC and the same-host handshakes alike and fuzzed on its own
//! (`fuzz/`): [`judge_hello`] (and [`judge_same_host_hello`]) on the server,
//! [`judge_hello_reply`] on the client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;
use shoal_proto::codec::{self, CodecLimits};
use shoal_proto::hello::PROOF_LEN;
use shoal_proto::{
    DecodeError, HandshakeRefusal, Hello, HelloReply, NodeId, Role, PROTOCOL_VERSION,
};

use crate::error::ConnectError;
use crate::identity::JoinToken;
use crate::rpc::{read_frame_body, write_frame, FrameReadError};
use crate::sync::RwLockExt;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-hello-v1";
pub(crate) const CLIENT_SIDE: &[u8] = b"shoal client proof";
pub(crate) const SERVER_SIDE: &[u8] = b"shoal server proof";
pub(crate) const NODE_SIDE: &[u8] = b"shoal node proof";

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

fn keyed_proof(key: &hmac::Key, side: &[u8], exported: &[u8; 32]) -> Vec<u8> {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(side);
    ctx.update(exported);
    ctx.sign().as_ref().to_vec()
}

fn keyed_proof_matches(key: &hmac::Key, side: &[u8], exported: &[u8; 32], claimed: &[u8]) -> bool {
    let mut msg = Vec::with_capacity(side.len() + exported.len());
    msg.extend_from_slice(side);
    msg.extend_from_slice(exported);
    claimed.len() == PROOF_LEN && hmac::verify(key, &msg, claimed).is_ok()
}

/// A proof of the driver token (which either token holds) over `exported`.
pub(crate) fn proof(token: &JoinToken, side: &[u8], exported: &[u8; 32]) -> Vec<u8> {
    keyed_proof(&token.hmac_key(), side, exported)
}

pub(crate) fn proof_matches(
    token: &JoinToken,
    side: &[u8],
    exported: &[u8; 32],
    claimed: &[u8],
) -> bool {
    keyed_proof_matches(&token.hmac_key(), side, exported, claimed)
}

/// The `Hello` a client sends: its role and its proof of the token over
/// `binding` (the TLS exporter value, or a same-host socket's hash); for
/// the `Node` role, its proof of the cluster token too (none with a driver
/// token, which a server holding the cluster token then refuses).
pub fn client_hello(auth: &ClientAuth, binding: &[u8; 32]) -> Hello {
    let node_proof = match (auth.role, auth.token.node_key()) {
        (Role::Node, Some(key)) => keyed_proof(&key, NODE_SIDE, binding),
        _ => Vec::new(),
    };
    Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: auth.token.cluster_id,
        role: auth.role,
        token_proof: proof(&auth.token, CLIENT_SIDE, binding),
        node_proof,
    }
}

/// Why a client does not take the server's answer to its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyRejected {
    /// The answer is not a well-formed `HelloReply`.
    #[error(transparent)]
    Malformed(#[from] DecodeError),
    /// A `Welcome` whose proof of the token is wrong: not our cluster's
    /// server.
    #[error("server proof invalid")]
    NotAuthenticated,
    /// The server refused us, and said why.
    #[error("refused: {0}")]
    Refused(HandshakeRefusal),
}

/// The client's verdict on the body of the server's answer (read with the
/// handshake's limits): decoded with [`CodecLimits::HANDSHAKE`], and a
/// `Welcome` taken only with the server's proof of `token` over `binding`
/// (what the client's own proof covered). Returns the node id the server
/// announced.
pub fn judge_hello_reply(
    token: &JoinToken,
    body: &[u8],
    binding: &[u8; 32],
) -> Result<Option<NodeId>, ReplyRejected> {
    match codec::decode::<HelloReply>(body, &CodecLimits::HANDSHAKE)? {
        HelloReply::Welcome {
            server_proof,
            node_id,
        } if proof_matches(token, SERVER_SIDE, binding, &server_proof) => Ok(node_id),
        HelloReply::Welcome { .. } => Err(ReplyRejected::NotAuthenticated),
        HelloReply::Refused(refusal) => Err(ReplyRejected::Refused(refusal)),
    }
}

/// Runs the client side of the handshake on a fresh connection. Returns the
/// node id the server announced, if it is a node.
pub async fn client_handshake(
    conn: &quinn::Connection,
    auth: &ClientAuth,
    addr: SocketAddr,
) -> Result<Option<NodeId>, ConnectError> {
    let failed = |reason: String| ConnectError::handshake(addr, reason);
    let exported = exported(conn, auth.role)
        .ok_or_else(|| failed("TLS keying material unavailable".into()))?;
    let hello = client_hello(auth, &exported);
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
    let body = match read_frame_body(&mut recv, &CodecLimits::HANDSHAKE).await {
        Ok(body) => body,
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
    match judge_hello_reply(&auth.token, &body, &exported) {
        Ok(node_id) => Ok(node_id),
        Err(ReplyRejected::Malformed(e)) => Err(failed(e.to_string())),
        Err(ReplyRejected::NotAuthenticated) => {
            conn.close(
                crate::close_code::HANDSHAKE_REFUSED.into(),
                b"server proof invalid",
            );
            Err(ConnectError::ServerNotAuthenticated {
                addr: addr.to_string(),
            })
        }
        Err(ReplyRejected::Refused(refusal)) => {
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

/// A `Hello` the server accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The role the peer proved.
    pub role: Role,
    /// What its proof covered; the server's proof covers the same.
    pub binding: [u8; 32],
}

/// The server's verdict on the body of a client's first frame (read with
/// the handshake's limits): decoded with [`CodecLimits::HANDSHAKE`], then
/// checked by [`check_hello`] over `binding(role)`, the bytes that tie a
/// proof for that role to this connection (`None`: unavailable, refused).
/// `has_certificate`: the peer showed a client certificate.
pub fn judge_hello(
    auth: &ServerAuth,
    body: &[u8],
    has_certificate: bool,
    binding: impl FnOnce(Role) -> Option<[u8; 32]>,
) -> Result<Accepted, HandshakeRefusal> {
    let hello: Hello = codec::decode(body, &CodecLimits::HANDSHAKE).map_err(malformed)?;
    let bound = binding(hello.role);
    check_hello(auth, &hello, has_certificate, bound)?;
    // check_hello refuses a Hello without a binding.
    let binding = bound.ok_or_else(|| HandshakeRefusal::Malformed("no binding".into()))?;
    Ok(Accepted {
        role: hello.role,
        binding,
    })
}

/// Longest reason a `Malformed` refusal gives, in bytes.
pub const MALFORMED_REASON_MAX: usize = 256;

/// The refusal of a `Hello` that does not decode, saying why in at most
/// [`MALFORMED_REASON_MAX`] bytes: the decoder's account quotes what it
/// could not take (an unknown role, a string where a number belongs),
/// which may be most of a 4 KiB frame, and the refusal must still fit one.
pub(crate) fn malformed(why: impl std::fmt::Display) -> HandshakeRefusal {
    HandshakeRefusal::Malformed(cut(why.to_string(), MALFORMED_REASON_MAX))
}

/// `text` in at most `max` bytes (at least 4): cut between characters,
/// ending with `…` when cut.
pub(crate) fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// [`judge_hello`] on a same-host socket: the proof covers the socket's
/// name as the server bound it, both sides' nonces and the role (see
/// `unix.rs`); no certificate can be shown there.
pub fn judge_same_host_hello(
    auth: &ServerAuth,
    socket_name: &str,
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
    body: &[u8],
) -> Result<Accepted, HandshakeRefusal> {
    judge_hello(auth, body, false, |role| {
        Some(same_host_binding(
            socket_name,
            server_nonce,
            client_nonce,
            role,
        ))
    })
}

/// What both proofs cover on a same-host socket: SHA-256 of a label, the
/// socket's name, both nonces and the role.
pub fn same_host_binding(
    socket_name: &str,
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
    role: Role,
) -> [u8; 32] {
    crate::unix::binding(socket_name, server_nonce, client_nonce, role.tag())
}

/// The server's answer to a verdict: `Welcome` with its own proof over the
/// accepted binding, or `Refused` with the reason.
pub fn server_reply(auth: &ServerAuth, verdict: &Result<Accepted, HandshakeRefusal>) -> HelloReply {
    match verdict {
        Ok(accepted) => HelloReply::Welcome {
            server_proof: proof(&auth.token, SERVER_SIDE, &accepted.binding),
            node_id: auth.node_id(),
        },
        Err(refusal) => HelloReply::Refused(refusal.clone()),
    }
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
    let verdict = match read_frame_body(&mut recv, &CodecLimits::HANDSHAKE).await {
        Ok(body) => judge_hello(auth, &body, conn.peer_identity().is_some(), |role| {
            exported(conn, role)
        }),
        Err(FrameReadError::Decode(e)) => Err(malformed(e)),
        Err(e) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(HandshakeFailure::Stream(e.to_string()));
        }
    };
    let reply = server_reply(auth, &verdict);
    let sent = write_frame(&mut send, &reply, &CodecLimits::HANDSHAKE).await;
    let _ = send.finish();
    match verdict {
        Ok(accepted) => {
            sent.map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(accepted.role)
        }
        Err(refusal) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            Err(HandshakeFailure::Refused(refusal))
        }
    }
}

/// Checks a `Hello`: version, cluster, role (and its certificate, if the
/// role needs one) and the token proof over `binding`, the bytes that tie
/// the proof to this one connection and role. A server holding the cluster
/// token (the head, a node) takes the `Node` role only with the proof of
/// that token too: a driver token cannot make a node. A server holding
/// only the driver token (a driver's or worker's endpoint, which nodes
/// call to start actors and forward logs) cannot check it, and takes the
/// first proof alone.
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
    if let (Role::Node, Some(key)) = (hello.role, auth.token.node_key()) {
        if !keyed_proof_matches(&key, NODE_SIDE, &exported, &hello.node_proof) {
            return Err(HandshakeRefusal::NotANode);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::codec::encode_frame;
    use shoal_proto::ClusterId;

    fn auth() -> ServerAuth {
        let token = JoinToken::from_parts(ClusterId::random(), [7; 32]);
        ServerAuth::new(token, vec![Role::Driver])
    }

    /// A `Hello` whose role is a 4 050-byte string: the decoder's error
    /// quotes it, and the refusal once did too, making an answer larger
    /// than a handshake frame, which was never sent (the peer saw the
    /// stream end instead of its refusal). The `handshake_server` fuzz
    /// target's check that every answer fits fails on it (its seed
    /// `long_role`).
    #[test]
    fn a_hello_refused_for_a_long_bad_field_still_gets_its_answer() {
        let auth = auth();
        let mut body = vec![0x81, 0xa4];
        body.extend_from_slice(b"role");
        body.push(0xda);
        body.extend_from_slice(&4050u16.to_be_bytes());
        body.extend(std::iter::repeat_n(b'X', 4050));
        let verdict = judge_hello(&auth, &body, false, |_| Some([0; 32]));
        let mut frame = Vec::new();
        encode_frame(
            &server_reply(&auth, &verdict),
            &CodecLimits::HANDSHAKE,
            &mut frame,
        )
        .expect("the refusal fits a handshake frame");
        let Err(HandshakeRefusal::Malformed(reason)) = &verdict else {
            panic!("{verdict:?}");
        };
        assert!(reason.len() <= MALFORMED_REASON_MAX, "{}", reason.len());
        assert!(reason.contains("unknown variant"), "{reason}");
    }

    /// Cut at a character's boundary, never inside one.
    #[test]
    fn a_long_reason_is_cut_between_characters() {
        for pad in 0..4 {
            let why = format!("{}{}", "x".repeat(pad), "é".repeat(300));
            let HandshakeRefusal::Malformed(reason) = malformed(why) else {
                panic!("not malformed");
            };
            assert!(reason.len() <= MALFORMED_REASON_MAX);
            assert!(reason.ends_with('…'));
        }
        let HandshakeRefusal::Malformed(short) = malformed("short") else {
            panic!("not malformed");
        };
        assert_eq!(short, "short");
    }

    /// A `Node` proves the cluster token: the driver token (what drivers,
    /// workers and clients hold) is refused the role by a server holding
    /// the cluster token, and takes every other; a server holding only
    /// the driver token (a worker's endpoint, which nodes call) takes a
    /// node on the driver token's proof.
    #[test]
    fn only_the_cluster_token_proves_a_node() {
        let auth = ServerAuth::new(
            JoinToken::from_parts(ClusterId::random(), [7; 32]),
            vec![Role::Node, Role::Driver],
        );
        let binding = [9; 32];
        let hello = |token: &JoinToken, role| {
            let client = ClientAuth {
                token: token.clone(),
                role,
            };
            codec::encode(&client_hello(&client, &binding)).expect("encodes")
        };
        let judge = |auth: &ServerAuth, body: &[u8]| {
            judge_hello(auth, body, false, |_| Some(binding)).map(|a| a.role)
        };
        let cluster = auth.token.clone();
        let driver = cluster.driver_token();
        assert_eq!(judge(&auth, &hello(&cluster, Role::Node)), Ok(Role::Node));
        assert_eq!(
            judge(&auth, &hello(&driver, Role::Node)),
            Err(HandshakeRefusal::NotANode)
        );
        assert_eq!(
            judge(&auth, &hello(&driver, Role::Driver)),
            Ok(Role::Driver)
        );
        // Another cluster token's node proof, with this driver token's
        // proof: still no node.
        let mut forged: Hello =
            codec::decode(&hello(&driver, Role::Node), &CodecLimits::HANDSHAKE).expect("decodes");
        let other = JoinToken::from_parts(cluster.cluster_id, [8; 32]);
        forged.node_proof = keyed_proof(&other.node_key().expect("a key"), NODE_SIDE, &binding);
        let forged = codec::encode(&forged).expect("encodes");
        assert_eq!(judge(&auth, &forged), Err(HandshakeRefusal::NotANode));
        // A worker's endpoint.
        let worker = ServerAuth::new(driver.clone(), vec![Role::Node]);
        assert_eq!(judge(&worker, &hello(&cluster, Role::Node)), Ok(Role::Node));
        // Either token checks the server's answer.
        let welcome = codec::encode(&server_reply(
            &auth,
            &Ok(Accepted {
                role: Role::Driver,
                binding,
            }),
        ))
        .expect("encodes");
        assert_eq!(judge_hello_reply(&driver, &welcome, &binding), Ok(None));
        assert_eq!(judge_hello_reply(&cluster, &welcome, &binding), Ok(None));
    }

    /// What the fuzz targets rely on: a proved `Hello` is accepted, with
    /// its role and binding, and the `Welcome` answering it is taken by
    /// the client; a wrong proof is refused.
    #[test]
    fn the_judges_agree_with_each_other() {
        let auth = auth();
        let binding = [9; 32];
        let client = ClientAuth {
            token: auth.token.clone(),
            role: Role::Driver,
        };
        let body = codec::encode(&client_hello(&client, &binding)).expect("encodes");
        let verdict = judge_hello(&auth, &body, false, |_| Some(binding));
        assert_eq!(
            verdict,
            Ok(Accepted {
                role: Role::Driver,
                binding
            })
        );
        let reply = codec::encode(&server_reply(&auth, &verdict)).expect("encodes");
        assert_eq!(judge_hello_reply(&client.token, &reply, &binding), Ok(None));
        assert_eq!(
            judge_hello_reply(&client.token, &reply, &[8; 32]),
            Err(ReplyRejected::NotAuthenticated)
        );
        let wrong = judge_hello(&auth, &body, false, |_| Some([8; 32]));
        assert_eq!(wrong, Err(HandshakeRefusal::BadToken));
    }
}
