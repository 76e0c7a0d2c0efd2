//! SEC-1 and SEC-4: peers with no token, a wrong token, a foreign cluster id,
//! a wrong protocol version, random bytes or a 4 GiB length prefix are refused
//! in the handshake with a typed error, and the head keeps serving its nodes.

use std::net::UdpSocket;
use std::time::Duration;

use shoal::{LocalCluster, LocalClusterExt, LocalConfig, NodeState};
use shoal_integration_tests::raw;
use shoal_net::handshake::ClientAuth;
use shoal_net::{ConnectError, JoinToken, NetLimits, RpcClient, Transport, HEAD_SERVER_NAME};
use shoal_proto::codec::{self, CodecLimits};
use shoal_proto::{
    ClusterId, HandshakeRefusal, HeadReply, HeadRequest, Hello, HelloReply, Role, PROTOCOL_VERSION,
};

fn config() -> LocalConfig {
    LocalConfig {
        head_node_cpus: 1.0,
        heartbeat_interval: Duration::from_millis(100),
        // Long enough that a node starved by the attacks would still show as
        // alive only if it keeps heartbeating through them.
        node_timeout: Duration::from_secs(2),
        ..LocalConfig::default()
    }
}

async fn connect_with(
    addr: std::net::SocketAddr,
    token: JoinToken,
) -> Result<RpcClient<HeadRequest, HeadReply>, ConnectError> {
    let transport = Transport::token_client(
        ClientAuth {
            token,
            role: Role::Node,
        },
        HEAD_SERVER_NAME,
        NetLimits::default(),
    )
    .expect("transport");
    transport.connect(addr).await
}

fn hello_frame(hello: &Hello) -> Vec<u8> {
    let mut frame = Vec::new();
    codec::encode_frame(hello, &CodecLimits::HANDSHAKE, &mut frame).expect("encodes");
    frame
}

fn refusal(reply: Result<HelloReply, String>) -> HandshakeRefusal {
    match reply {
        Ok(HelloReply::Refused(r)) => r,
        other => panic!("expected a typed refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_the_head_keeps_serving() {
    let mut cluster = LocalCluster::start(config()).await.expect("cluster");
    let mut r = shoal::ResourceSet::new();
    r.set("CPU", 1.0);
    cluster.add_node(r).await.expect("node");
    let addr = cluster.address();
    let cluster_id = cluster.token().cluster_id;

    // A wrong token for the right cluster.
    let wrong = JoinToken::from_parts(cluster_id, [7; 32]);
    match connect_with(addr, wrong).await {
        Err(ConnectError::Refused {
            refusal: HandshakeRefusal::BadToken,
            ..
        }) => {}
        other => panic!("wrong token: expected BadToken, got {other:?}"),
    }

    // A valid-looking token of another cluster.
    let foreign = JoinToken::generate(ClusterId::random()).expect("token");
    match connect_with(addr, foreign).await {
        Err(ConnectError::Refused {
            refusal: HandshakeRefusal::ClusterMismatch,
            ..
        }) => {}
        other => panic!("foreign cluster: expected ClusterMismatch, got {other:?}"),
    }

    // No token at all: an empty proof.
    let no_token = Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster_id,
        role: Role::Node,
        token_proof: vec![],
        node_proof: vec![],
    };
    assert_eq!(
        refusal(raw::send_handshake_bytes(addr, &hello_frame(&no_token)).await),
        HandshakeRefusal::BadToken
    );

    // Another protocol version.
    let future = Hello {
        protocol_version: PROTOCOL_VERSION + 99,
        ..no_token.clone()
    };
    assert_eq!(
        refusal(raw::send_handshake_bytes(addr, &hello_frame(&future)).await),
        HandshakeRefusal::ProtocolVersion {
            server: PROTOCOL_VERSION,
            client: PROTOCOL_VERSION + 99
        }
    );

    // A 4 GiB length prefix: refused before anything is allocated.
    match refusal(raw::send_handshake_bytes(addr, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await) {
        HandshakeRefusal::Malformed(why) => assert!(why.contains("exceeds the limit"), "{why}"),
        other => panic!("4 GiB prefix: expected Malformed, got {other:?}"),
    }

    // Random bytes as a frame body, and deep nesting.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        let mut body = Vec::new();
        for _ in 0..(16 + round * 7) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            body.push(seed as u8);
        }
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert!(
            matches!(
                refusal(raw::send_handshake_bytes(addr, &frame).await),
                HandshakeRefusal::Malformed(_)
            ),
            "random body {round}"
        );
    }
    let mut deep = vec![0x91u8; 3000];
    deep.push(0xc0);
    let mut frame = (deep.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&deep);
    assert!(matches!(
        refusal(raw::send_handshake_bytes(addr, &frame).await),
        HandshakeRefusal::Malformed(_)
    ));

    // Random datagrams that are not QUIC at all.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("udp");
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200u32)
            .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(17)) as u8)
            .collect();
        socket.send_to(&junk, addr).expect("send junk");
    }

    // The head still answers, counts what it refused, and its nodes stayed alive.
    let client = cluster
        .client()
        .await
        .expect("a real client still connects");
    let status = client.status().await.expect("status");
    assert_eq!(status.nodes.len(), 2);
    assert!(
        status.nodes.iter().all(|n| n.state == NodeState::Alive),
        "{status:?}"
    );
    assert!(
        status.handshakes_refused >= 26,
        "refusals counted: {}",
        status.handshakes_refused
    );
    client.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_not_act_as_a_node() {
    let cluster = LocalCluster::start(config()).await.expect("cluster");
    let transport = Transport::token_client(
        ClientAuth {
            token: cluster.token().clone(),
            role: Role::Client,
        },
        HEAD_SERVER_NAME,
        NetLimits::default(),
    )
    .expect("transport");
    let head: RpcClient<HeadRequest, HeadReply> =
        transport.connect(cluster.address()).await.expect("connect");
    let node_id = cluster.node_id(0).expect("head node");
    let err = head
        .call(
            &HeadRequest::UnregisterNode {
                node_id,
                registration_key: 0,
            },
            Duration::from_secs(5),
        )
        .await
        .expect_err("a status client cannot remove nodes");
    assert!(
        matches!(&err, shoal_net::RpcError::Service(e) if e.kind == shoal_proto::ServiceErrorKind::PermissionDenied),
        "{err:?}"
    );
    // Nor hold long polls for node deaths (those are for owners).
    let watch = HeadRequest::WatchNodeDeaths {
        after: 0,
        wait_ms: 1,
    };
    let err = head
        .call(&watch, Duration::from_secs(5))
        .await
        .expect_err("a status client cannot watch for deaths");
    assert!(
        matches!(&err, shoal_net::RpcError::Service(e) if e.kind == shoal_proto::ServiceErrorKind::PermissionDenied),
        "{err:?}"
    );
    // An owner's count past the head's (any u64) and a wait past any bound
    // get an answer at once, not a hang: the head counts from 0 again.
    let owner: RpcClient<HeadRequest, HeadReply> = Transport::token_client(
        ClientAuth {
            token: cluster.token().clone(),
            role: Role::Driver,
        },
        HEAD_SERVER_NAME,
        NetLimits::default(),
    )
    .expect("transport")
    .connect(cluster.address())
    .await
    .expect("connect");
    let far = HeadRequest::WatchNodeDeaths {
        after: u64::MAX,
        wait_ms: u64::MAX,
    };
    match owner.call(&far, Duration::from_secs(5)).await {
        Ok(HeadReply::NodeDeaths { seq: 0, nodes }) => assert!(nodes.is_empty()),
        other => panic!("expected the head's count at once, got {other:?}"),
    }
    let status = cluster
        .client()
        .await
        .expect("client")
        .status()
        .await
        .expect("status");
    assert_eq!(status.nodes[0].state, NodeState::Alive);
    cluster.shutdown().await;
}
