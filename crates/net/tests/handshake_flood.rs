//! Peers that finish the QUIC handshake and then never send their `Hello`
//! (the flood an unauthenticated attacker can make) must not lock a real
//! client out: one source address gets only its share of the handshake
//! slots, and once the slots fill, new peers prove their address with a
//! Retry before taking one.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::rpc::serve;
use shoal_net::{
    endpoint, tls, ClusterIdentity, NetLimits, Peer, Service, Transport, HEAD_SERVER_NAME,
};
use shoal_proto::{Role, ServiceError};
use tokio_util::sync::CancellationToken;

struct Echo;

impl Service for Echo {
    type Request = String;
    type Reply = String;

    async fn handle(&self, _peer: &Peer, request: String) -> Result<String, ServiceError> {
        Ok(request)
    }
}

const SLOTS: usize = 8;
const PER_SOURCE: usize = 4;
const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn stuck_handshakes_from_one_host_leave_room_for_a_real_client() {
    let limits = NetLimits {
        handshakes_max: SLOTS,
        handshakes_per_source_max: PER_SOURCE,
        // Longer than the test: the stuck peers keep their slots throughout.
        handshake_timeout: Duration::from_secs(60),
        same_host_sockets: false,
        ..NetLimits::default()
    };
    let identity = ClusterIdentity::generate().expect("identity");
    let cert = identity.issue_head_cert().expect("cert");
    let server_config = endpoint::server_config(tls::server_config(&cert).expect("tls"), &limits)
        .expect("server config");
    let server = endpoint::endpoint(([127, 0, 0, 1], 0).into(), Some(server_config), &limits)
        .expect("server endpoint");
    let addr = server.local_addr().expect("bound");
    let stats = Arc::new(HandshakeStats::default());
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(serve(
        server,
        Arc::new(Echo),
        Arc::new(ServerAuth::new(
            identity.token().clone(),
            vec![Role::Driver],
        )),
        limits.clone(),
        stats.clone(),
        shutdown.clone(),
    ));

    // The flood: from another loopback address, as from another host,
    // connections that finish TLS and never send a `Hello`.
    let attacker_at: SocketAddr = ([127, 0, 0, 2], 0).into();
    let attacker = endpoint::endpoint(attacker_at, None, &limits).expect("attacker endpoint");
    let config = endpoint::client_config(tls::token_client_config().expect("tls"), &limits)
        .expect("client config");
    let mut stuck = Vec::new();
    for _ in 0..3 * SLOTS {
        let connecting = attacker
            .connect_with(config.clone(), addr, HEAD_SERVER_NAME)
            .expect("connect");
        if let Ok(Ok(conn)) = tokio::time::timeout(T, connecting).await {
            stuck.push(conn);
        }
    }
    assert!(
        stuck.len() <= PER_SOURCE,
        "{} connections from one address hold handshake slots (at most {PER_SOURCE})",
        stuck.len()
    );
    assert!(!stuck.is_empty(), "the first peers are let in");
    assert!(
        stats.refused.load(Ordering::Relaxed) > 0,
        "the rest were refused"
    );

    // A real client, from another address, gets in and is served.
    let transport = Transport::token_client(
        ClientAuth {
            token: identity.token().clone(),
            role: Role::Driver,
        },
        HEAD_SERVER_NAME,
        limits.clone(),
    )
    .expect("client transport");
    let client: shoal_net::RpcClient<String, String> = transport
        .connect(addr)
        .await
        .expect("a real client connects while the flood holds its slots");
    assert_eq!(
        client.call(&"hi".to_string(), T).await.expect("served"),
        "hi"
    );
    assert!(
        stats.retried.load(Ordering::Relaxed) > 0,
        "past half the slots, new peers were asked to prove their address"
    );
    assert!(
        stuck.iter().all(|c| c.close_reason().is_none()),
        "the stuck peers are still there: the client did not get in by their leaving"
    );

    client.close();
    shutdown.cancel();
    serving.await.expect("server task");
}
