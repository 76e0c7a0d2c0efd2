//! What the fuzz targets run, one function each (`fuzz_targets/*.rs` only
//! call these), with the fixed token, bindings and auth they use. A library
//! so that the seed generator (`tests/seeds.rs`) builds valid inputs with
//! the same fixtures and replays the committed corpus through the same
//! checks.
//!
//! Every function takes bytes as a peer (or a cluster file) would present
//! them, runs the code Shoal runs on them, and checks what must hold of
//! the result. Nothing may panic, abort or allocate without bound.

use std::fmt::Debug;
use std::sync::OnceLock;

use bytes::Bytes;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use shoal_net::handshake::{self, Accepted, ClientAuth, ReplyRejected, ServerAuth};
use shoal_net::JoinToken;
use shoal_proto::codec::{self, CodecLimits, LEN_PREFIX};
use shoal_proto::head::{ActorSpec, RegisterNode};
use shoal_proto::placement::{self, LabelConstraint, Placement, PlacementGroupSpec};
use shoal_proto::state::{Row, StateKind, Value};
use shoal_proto::{
    ClusterId, FrameError, HeadReply, HeadRequest, Hello, HelloReply, NodeId, NodeReply,
    NodeRequest, ReplyEnvelope, RequestEnvelope, ResourceSet, Role, Rpc, WorkerReply,
    WorkerRequest, HEAD_RPCS, NODE_RPCS, PROTOCOL_VERSION, WORKER_RPCS,
};

/// The CLI's cluster-file parser, compiled from its own source (the CLI
/// crate is a binary, not a library).
#[path = "../../crates/cli/src/cluster_file.rs"]
pub mod cluster_file;

/// Every role.
pub const ROLES: [Role; 4] = [Role::Node, Role::Driver, Role::Worker, Role::Client];

/// The cluster of the fixed token.
pub const CLUSTER: ClusterId = ClusterId::from_uuid(shoal_proto::ids::Uuid::from_u128(
    0x5ea1_f022_0000_4000_8000_0000_0000_0001,
));

/// The node id a fuzzed server announces.
pub const NODE: NodeId = NodeId::from_uuid(shoal_proto::ids::Uuid::from_u128(
    0x5ea1_f022_0000_4000_8000_0000_0000_0002,
));

/// The same-host socket a fuzzed server bound.
pub const SOCKET_NAME: &str = "\0shoal/1/127.0.0.1:6380";

/// The nonce a fuzzed same-host server sent.
pub const SERVER_NONCE: [u8; 32] = [0x5e; 32];

/// The join token both sides hold.
pub fn token() -> JoinToken {
    JoinToken::from_parts(CLUSTER, [0x42; 32])
}

/// The fuzzed server's checks: nodes (with a certificate), drivers and
/// workers; clients may not connect.
pub fn server_auth() -> &'static ServerAuth {
    static AUTH: OnceLock<ServerAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let mut auth = ServerAuth::new(token(), vec![Role::Node, Role::Driver, Role::Worker]);
        auth.certificate_required = vec![Role::Node];
        auth.set_node_id(NODE);
        auth
    })
}

/// The stand-in for the TLS exporter value of a connection, for `role`.
pub fn tls_binding(role: Role) -> [u8; 32] {
    let mut out = [0x17; 32];
    out[0] = role.tag();
    out
}

/// Input layout of [`handshake_server`]: the first byte's flags.
pub mod server_flags {
    /// The peer showed a client certificate (QUIC only).
    pub const CERTIFICATE: u8 = 1;
    /// The same-host socket's handshake: 32 bytes of client nonce, then
    /// the body.
    pub const SAME_HOST: u8 = 2;
    /// No TLS keying material could be exported (QUIC only).
    pub const NO_KEYING_MATERIAL: u8 = 4;
}

/// The frame decoder on a byte stream: frames split off one after another
/// as a reader does, each body walked by `codec::validate` and decoded,
/// under the control and the handshake limits.
pub fn frame(data: &[u8]) {
    for limits in [CodecLimits::CONTROL, CodecLimits::HANDSHAKE] {
        let mut rest = data;
        loop {
            match codec::split_frame(rest, &limits) {
                Ok(Some((body, used))) => {
                    assert_eq!(used, LEN_PREFIX + body.len());
                    assert!(body.len() <= limits.frame_bytes_max as usize);
                    frame_body(body, &limits);
                    rest = &rest[used..];
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > u64::from(max));
                    break;
                }
                Err(e) => panic!("split_frame refuses only a length: {e}"),
            }
        }
        // A whole frame decodes exactly when it splits into one body that
        // is all of it, and that body decodes.
        let whole = codec::decode_frame::<IgnoredAny>(data, &limits);
        let split = match codec::split_frame(data, &limits) {
            Ok(Some((body, used))) if used == data.len() => {
                codec::decode::<IgnoredAny>(body, &limits).is_ok()
            }
            _ => false,
        };
        assert_eq!(whole.is_ok(), split, "{whole:?}");
        if let Err(e) = whole {
            let _ = e.to_string();
        }
    }
}

fn frame_body(body: &[u8], limits: &CodecLimits) {
    let valid = codec::validate(body, limits.depth_max);
    let any = codec::decode::<IgnoredAny>(body, limits);
    // What `validate` lets through, MessagePack decodes; what it stops
    // never reaches the decoder.
    match (&valid, &any) {
        (Ok(()), Ok(_)) | (Err(_), Err(_)) => {}
        _ => panic!("validate {valid:?}, decode {any:?}"),
    }
    let _ = codec::decode::<Hello>(body, limits);
    let _ = codec::decode::<HelloReply>(body, limits);
    // The shared decode (QUIC replies: chunks are slices of the frame)
    // agrees with the copying one.
    let _ = decoded::<ReplyEnvelope<NodeReply>>(body, limits);
}

/// Every request and reply: the bytes decoded as each service's request
/// envelope and reply envelope, as QUIC (shared) and same-host (copied)
/// readers decode them; what decodes is encoded again and must decode to
/// the same message, and goes through the checks the services make on it.
pub fn messages(data: &[u8]) {
    service(data, head_request, head_reply);
    service(data, node_request, node_reply);
    service(data, worker_request, |_: &WorkerReply| {});
}

/// One service's request and reply envelopes: each that decodes goes
/// through `request` or `reply`; an error reply is displayed.
fn service<Req, Rep>(data: &[u8], request: impl Fn(&Req), reply: impl Fn(&Rep))
where
    Req: Serialize + DeserializeOwned + PartialEq + Debug,
    Rep: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let limits = CodecLimits::CONTROL;
    if let Some(envelope) = decoded::<RequestEnvelope<Req>>(data, &limits) {
        request(&envelope.body);
    }
    if let Some(envelope) = decoded::<ReplyEnvelope<Rep>>(data, &limits) {
        match &envelope.result {
            Ok(answer) => reply(answer),
            Err(e) => drop(e.to_string()),
        }
    }
}

/// The server's side of the handshake: the body of a client's first frame
/// judged by `handshake::judge_hello` (QUIC) or `judge_same_host_hello`
/// (the same-host socket), as the servers judge it. The first byte holds
/// [`server_flags`]. An accepted `Hello` must carry the proof for its role
/// over the binding; every answer must fit a handshake frame and read, on
/// the client's side, as the server meant it.
pub fn handshake_server(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let auth = server_auth();
    let (verdict, body, certificate) = if flags & server_flags::SAME_HOST == 0 {
        let certificate = flags & server_flags::CERTIFICATE != 0;
        let keying = flags & server_flags::NO_KEYING_MATERIAL == 0;
        let verdict = handshake::judge_hello(auth, rest, certificate, |role| {
            keying.then(|| tls_binding(role))
        });
        (verdict, rest, certificate)
    } else {
        let Some((client_nonce, body)) = rest.split_first_chunk::<32>() else {
            return;
        };
        let verdict =
            handshake::judge_same_host_hello(auth, SOCKET_NAME, &SERVER_NONCE, client_nonce, body);
        (verdict, body, false)
    };
    if let Ok(accepted) = &verdict {
        let hello: Hello =
            codec::decode(body, &CodecLimits::HANDSHAKE).expect("an accepted Hello decodes");
        assert_eq!(hello.role, accepted.role);
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.cluster_id, CLUSTER);
        assert!(auth.allowed_roles.contains(&accepted.role));
        assert!(certificate || !auth.certificate_required.contains(&accepted.role));
        let proved = handshake::client_hello(
            &ClientAuth {
                token: token(),
                role: accepted.role,
            },
            &accepted.binding,
        );
        assert_eq!(
            hello.token_proof, proved.token_proof,
            "accepted without the proof"
        );
        if accepted.role == Role::Node {
            assert_eq!(
                hello.node_proof, proved.node_proof,
                "a node accepted without the cluster token's proof"
            );
        }
    }
    let reply = handshake::server_reply(auth, &verdict);
    let mut frame = Vec::new();
    if let Err(e) = codec::encode_frame(&reply, &CodecLimits::HANDSHAKE, &mut frame) {
        let reply: String = format!("{reply:?}").chars().take(300).collect();
        panic!("the answer to the Hello cannot be sent ({e}): {reply}");
    }
    let binding = verdict.as_ref().map_or([0; 32], |a| a.binding);
    let seen = handshake::judge_hello_reply(&token(), &frame[LEN_PREFIX..], &binding);
    match (&verdict, &seen) {
        (Ok(_), Ok(node_id)) => assert_eq!(*node_id, Some(NODE)),
        (Err(refusal), Err(ReplyRejected::Refused(seen))) => assert_eq!(refusal, seen),
        _ => panic!("the server said {verdict:?}, the client read {seen:?}"),
    }
}

/// The client's side of the handshake: the body of the server's answer
/// judged by `handshake::judge_hello_reply`, as both clients judge it. A
/// `Welcome` is taken only with the server's proof over the binding.
pub fn handshake_client(data: &[u8]) {
    let binding = tls_binding(Role::Driver);
    let verdict = handshake::judge_hello_reply(&token(), data, &binding);
    match &verdict {
        Ok(node_id) => {
            let reply: HelloReply =
                codec::decode(data, &CodecLimits::HANDSHAKE).expect("a taken reply decodes");
            let (server_proof, announced) = match reply {
                HelloReply::Welcome {
                    server_proof,
                    node_id,
                } => (server_proof, node_id),
                refused => panic!("took {refused:?}"),
            };
            assert_eq!(*node_id, announced);
            let accepted = Ok(Accepted {
                role: Role::Driver,
                binding,
            });
            let HelloReply::Welcome {
                server_proof: expected,
                ..
            } = handshake::server_reply(server_auth(), &accepted)
            else {
                panic!("a server's answer to an accepted Hello is a Welcome");
            };
            assert_eq!(server_proof, expected, "a Welcome taken without the proof");
        }
        Err(e) => drop(e.to_string()),
    }
}

/// The cluster file's text, parsed and checked as `shoal start --config`
/// does (`ClusterFile::load` reads the file as UTF-8, then this).
pub fn cluster_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match cluster_file::ClusterFile::parse(text) {
        Ok(file) => {
            assert!(file.timeouts.heartbeat_interval < file.timeouts.node_timeout);
            assert!(!file.timeouts.heartbeat_interval.is_zero());
            let head = &file.head;
            let sections = std::iter::once((&head.labels, &head.resources, head.worker_port_range))
                .chain(
                    file.nodes
                        .iter()
                        .map(|n| (&n.labels, &n.resources, n.worker_port_range)),
                );
            for (labels, resources, ports) in sections {
                assert!(placement::check_labels(labels).is_ok());
                assert!(!resources.contains_key(shoal_proto::resources::GPU));
                if let Some((lo, hi)) = ports {
                    assert!(lo >= 1 && lo <= hi);
                }
            }
            let _ = file.limits.codec();
        }
        Err(e) => drop(format!("{e:#}")),
    }
}

/// `body` decoded as a `T` as a same-host reader does (a copy) and as a
/// QUIC reader does (shared with the frame); both must agree. A message
/// that decodes must encode, and its encoding must decode to it.
fn decoded<T>(body: &[u8], limits: &CodecLimits) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let copied = codec::decode::<T>(body, limits);
    let shared = shoal_proto::decode_shared::<T>(Bytes::copy_from_slice(body), limits);
    match (copied, shared) {
        (Ok(copied), Ok(shared)) => {
            let once = round_trip(&copied);
            assert_eq!(once, codec::encode(&shared).expect("encodes"));
            Some(copied)
        }
        (Err(copied), Err(shared)) => {
            assert_eq!(copied, shared);
            let _ = copied.to_string();
            None
        }
        (copied, shared) => panic!("decode {copied:?}, decode_shared {shared:?}"),
    }
}

/// Encodes `msg`, decodes that and encodes it again: the same message and
/// the same bytes (quantities that are NaN are not equal to themselves, so
/// such a message is compared by its bytes only). Returns the encoding.
fn round_trip<T>(msg: &T) -> Vec<u8>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let once = codec::encode(msg).unwrap_or_else(|e| panic!("{msg:?} does not encode: {e}"));
    let back: T = codec::decode(&once, &CodecLimits::CONTROL)
        .unwrap_or_else(|e| panic!("{msg:?} encodes to bytes that do not decode: {e}"));
    let twice = codec::encode(&back).expect("encodes");
    assert_eq!(once, twice, "{msg:?} then {back:?}");
    #[allow(clippy::eq_op)]
    let reflexive = msg == msg;
    if reflexive {
        assert_eq!(msg, &back);
    }
    once
}

/// A request's row of its service's role table, asked for every role.
fn roles(rpc: Rpc, table: &[Rpc]) {
    assert!(table.contains(&rpc), "{rpc:?} not in its table");
    assert!(!rpc.roles.is_empty());
    for role in ROLES {
        let _ = rpc.allows(role);
    }
}

fn resources(set: &ResourceSet) {
    if set.validate().is_ok() {
        let mut sum = set.clone();
        sum.add(set);
        for (name, quantity) in set.iter() {
            assert!(quantity.is_finite() && quantity >= 0.0);
            assert!(sum.get(name) >= quantity);
        }
    }
}

fn placement(placement: &Placement) {
    let _ = placement.to_string();
    if placement.check().is_ok() {
        for constraint in placement.labels.iter().chain(&placement.labels_soft) {
            let _ = constraint.admits(&placement::Labels::new());
            // A well-formed constraint prints as `key=expression`; what
            // parses back of that is the constraint.
            let text = constraint.to_string();
            let (key, expression) = text.split_once('=').expect("key=expression");
            if let Ok(parsed) = LabelConstraint::parse(key, expression) {
                assert_eq!(&parsed, constraint, "{text}");
            }
        }
    }
}

fn group(spec: &PlacementGroupSpec) {
    let _ = spec.strategy.to_string();
    if spec.check().is_ok() {
        assert!(!spec.bundles.is_empty());
        spec.bundles.iter().for_each(resources);
    }
}

fn actor_spec(spec: &ActorSpec) {
    resources(&spec.resources);
    placement(&spec.placement);
    if spec.env.check().is_ok() {
        for (name, value) in spec.env.iter() {
            assert_eq!(spec.env.get(name), Some(value));
        }
        let _ = spec.env.names();
    }
}

fn registration(node: &RegisterNode) {
    let _ = placement::check_labels(&node.labels);
    resources(&node.resources_total);
}

fn state_kind(kind: StateKind) {
    assert_eq!(kind.name().parse::<StateKind>(), Ok(kind));
}

fn rows(rows: &[Row]) {
    for row in rows {
        for (_, value) in row {
            let _ = value.as_text();
            if let Value::Rows(inner) = value {
                self::rows(inner);
            }
        }
    }
}

fn head_request(request: &HeadRequest) {
    roles(request.rpc(), HEAD_RPCS);
    match request {
        HeadRequest::RegisterNode(node) => registration(node),
        HeadRequest::RejoinNode(rejoin) => {
            registration(&rejoin.node);
            for lease in &rejoin.leases {
                resources(&lease.resources);
            }
        }
        HeadRequest::Heartbeat {
            resources_available,
            ..
        } => resources(resources_available),
        HeadRequest::RequestLease(lease) => {
            resources(&lease.resources);
            placement(&lease.placement);
        }
        HeadRequest::RegisterActor { spec, .. } => actor_spec(spec),
        HeadRequest::CreatePlacementGroup(spec) => group(spec),
        HeadRequest::TaskEvents(batch) => {
            for event in &batch.events {
                let _ = (event.state.name(), event.state.is_final());
            }
        }
        HeadRequest::ListState(query) => state_kind(query.kind),
        HeadRequest::Summarize(kind) => state_kind(*kind),
        _ => {}
    }
}

fn head_reply(reply: &HeadReply) {
    match reply {
        HeadReply::ClusterStatus(status) => {
            for node in &status.nodes {
                resources(&node.resources_total);
                resources(&node.resources_available);
                let _ = placement::check_labels(&node.labels);
            }
            for request in &status.infeasible {
                resources(&request.resources);
                placement(&request.placement);
            }
            for info in &status.placement_groups {
                group(&info.spec);
                let _ = info.state.to_string();
            }
        }
        HeadReply::HeartbeatAck { restart_actors, .. } => {
            for restart in restart_actors {
                actor_spec(&restart.spec);
                resources(&restart.lease.resources);
            }
        }
        HeadReply::LeaseGranted(lease) => resources(&lease.resources),
        HeadReply::PlacementGroup(info) => {
            group(&info.spec);
            let _ = info.state.to_string();
        }
        HeadReply::State(state) => rows(&state.rows),
        _ => {}
    }
}

fn node_request(request: &NodeRequest) {
    roles(request.rpc(), NODE_RPCS);
    if let NodeRequest::GrantWorker {
        resources: r, env, ..
    } = request
    {
        let _ = env.check();
        resources(r);
    }
}

fn node_reply(reply: &NodeReply) {
    if let NodeReply::NodeInfo {
        resources_total,
        resources_available,
        ..
    } = reply
    {
        resources(resources_total);
        resources(resources_available);
    }
}

fn worker_request(request: &WorkerRequest) {
    roles(request.rpc(), WORKER_RPCS);
    if let WorkerRequest::PushTask(spec) = request {
        resources(&spec.resources);
    }
}
