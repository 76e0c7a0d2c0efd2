//! SEC-2: every request of the head's and a node's services, sent by every
//! role their table (`shoal_proto::HEAD_RPCS`, `NODE_RPCS`) does not allow,
//! is refused with `PermissionDenied`; sent before any handshake, it is
//! refused too. The worker service's table is checked in the SDK's own
//! tests (`worker::service`), where its service runs without a process.
//!
//! One request of each kind is drawn from the messages' `Arbitrary`
//! values, so a request added to the protocol is covered once it has its
//! row (the table's match does not compile without one).

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use proptest::arbitrary::{any, Arbitrary};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal::{LocalCluster, LocalConfig};
use shoal_integration_tests::raw;
use shoal_net::handshake::ClientAuth;
use shoal_net::{ConnectError, JoinToken, NetLimits, RpcClient, RpcError, Transport};
use shoal_net::{HEAD_SERVER_NAME, NODE_SERVER_NAME};
use shoal_proto::codec::{self, CodecLimits};
use shoal_proto::{
    HandshakeRefusal, HeadReply, HeadRequest, HelloReply, NodeReply, NodeRequest, RequestEnvelope,
    Role, Rpc, ServiceErrorKind, HEAD_RPCS, NODE_RPCS,
};

const ROLES: [Role; 4] = [Role::Node, Role::Driver, Role::Worker, Role::Client];
const T: Duration = Duration::from_secs(10);

/// One request of every kind in `table`.
fn one_of_each<R: Arbitrary + Debug>(table: &[Rpc], rpc: impl Fn(&R) -> Rpc) -> Vec<R> {
    let mut runner = TestRunner::deterministic();
    let strategy = any::<R>();
    let mut found: HashMap<&'static str, R> = HashMap::new();
    for _ in 0..50_000 {
        if found.len() == table.len() {
            break;
        }
        let request = strategy.new_tree(&mut runner).expect("a value").current();
        found.entry(rpc(&request).name).or_insert(request);
    }
    let missing: Vec<&str> = table
        .iter()
        .map(|r| r.name)
        .filter(|name| !found.contains_key(name))
        .collect();
    assert!(missing.is_empty(), "no request drawn for {missing:?}");
    found.into_values().collect()
}

async fn connect<Req: Serialize + Sync, Rep: DeserializeOwned>(
    addr: SocketAddr,
    token: &JoinToken,
    role: Role,
    server_name: &'static str,
) -> Result<RpcClient<Req, Rep>, ConnectError> {
    let limits = NetLimits::default();
    let auth = ClientAuth {
        token: token.clone(),
        role,
    };
    Transport::token_client(auth, server_name, limits)?
        .connect(addr)
        .await
}

/// Sends every request a role may not send and expects each refused.
async fn refused_as_every_other_role<Req, Rep>(
    addr: SocketAddr,
    token: &JoinToken,
    server_name: &'static str,
    requests: &[Req],
    rpc: impl Fn(&Req) -> Rpc,
) -> usize
where
    Req: Serialize + Sync + Debug,
    Rep: DeserializeOwned + Debug,
{
    let mut refused = 0;
    for role in ROLES {
        let client: RpcClient<Req, Rep> = match connect(addr, token, role, server_name).await {
            Ok(client) => client,
            // A node server asks nodes for their certificate: a token alone
            // does not make a node there, and nothing can be sent at all.
            Err(ConnectError::Refused {
                refusal: HandshakeRefusal::RoleNotAllowed(Role::Node),
                ..
            }) if role == Role::Node => {
                refused += requests.iter().filter(|r| !rpc(r).allows(role)).count();
                continue;
            }
            Err(e) => panic!("{role:?} could not connect: {e}"),
        };
        for request in requests.iter().filter(|r| !rpc(r).allows(role)) {
            match client.call(request, T).await {
                Err(RpcError::Service(e)) if e.kind == ServiceErrorKind::PermissionDenied => {
                    refused += 1
                }
                other => panic!(
                    "{} sent as {role:?} was not refused: {other:?} ({request:?})",
                    rpc(request).name
                ),
            }
        }
        client.close();
    }
    refused
}

/// Sends each request as the first frame of a connection, in place of a
/// `Hello`: none is accepted.
async fn refused_without_a_handshake<Req: Serialize>(
    addr: SocketAddr,
    requests: &[Req],
    name: impl Fn(&Req) -> &'static str,
) {
    for request in requests {
        let envelope = RequestEnvelope {
            id: 1,
            timeout_ms: 1_000,
            body: request,
        };
        let mut frame = Vec::new();
        if codec::encode_frame(&envelope, &CodecLimits::CONTROL, &mut frame).is_err() {
            continue;
        }
        let answer = raw::send_handshake_bytes(addr, &frame).await;
        assert!(
            !matches!(answer, Ok(HelloReply::Welcome { .. })),
            "{} without a handshake was accepted",
            name(request)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_refused_to_every_role_its_table_does_not_allow() {
    let mut cluster = LocalCluster::start(LocalConfig {
        head_node_cpus: 1.0,
        ..LocalConfig::default()
    })
    .await
    .expect("cluster");
    let mut cpus = shoal::ResourceSet::new();
    cpus.set("CPU", 1.0);
    let node = cluster.add_node(cpus).await.expect("a node");
    let token = cluster.token().clone();
    let head = cluster.address();
    let node_addr = cluster.node_address(node).expect("node address");

    let head_requests = one_of_each::<HeadRequest>(HEAD_RPCS, HeadRequest::rpc);
    let refused = refused_as_every_other_role::<_, HeadReply>(
        head,
        &token,
        HEAD_SERVER_NAME,
        &head_requests,
        HeadRequest::rpc,
    )
    .await;
    let expected: usize = HEAD_RPCS.iter().map(|r| ROLES.len() - r.roles.len()).sum();
    assert_eq!(refused, expected, "head requests refused");

    let node_requests = one_of_each::<NodeRequest>(NODE_RPCS, NodeRequest::rpc);
    let refused = refused_as_every_other_role::<_, NodeReply>(
        node_addr,
        &token,
        NODE_SERVER_NAME,
        &node_requests,
        NodeRequest::rpc,
    )
    .await;
    let expected: usize = NODE_RPCS.iter().map(|r| ROLES.len() - r.roles.len()).sum();
    assert_eq!(refused, expected, "node requests refused");

    refused_without_a_handshake(head, &head_requests, |r| r.rpc().name).await;
    refused_without_a_handshake(node_addr, &node_requests, |r| r.rpc().name).await;

    // The daemons still serve their own.
    let status = connect::<HeadRequest, HeadReply>(head, &token, Role::Client, HEAD_SERVER_NAME)
        .await
        .expect("a client connects")
        .call(&HeadRequest::GetClusterStatus, T)
        .await;
    assert!(
        matches!(status, Ok(HeadReply::ClusterStatus(_))),
        "{status:?}"
    );
    cluster.shutdown().await;
}
