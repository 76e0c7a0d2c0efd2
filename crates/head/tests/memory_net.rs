//! The head's real service on the in-process network behind the transport
//! seam: a node registers and heartbeats, is cut off from the head, is
//! declared dead, and when the cut heals is told it is fenced, with no
//! socket and no other process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_head::{Head, HeadConfig};
use shoal_net::handshake::ClientAuth;
use shoal_net::{ClusterIdentity, MemoryNet, NetLimits, RpcClient, Transport, HEAD_SERVER_NAME};
use shoal_proto::head::RegisterNode;
use shoal_proto::{HeadReply, HeadRequest, NodeId, NodeState, ResourceSet, Role};
use tokio_util::sync::CancellationToken;

type HeadClient = RpcClient<HeadRequest, HeadReply>;

const HEAD: &str = "198.18.0.1:7000";
const NODE_HOST: &str = "198.18.0.2";
const DRIVER_HOST: &str = "198.18.0.3";
const CALL: Duration = Duration::from_secs(5);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an ip")
}

async fn connect(
    net: &MemoryNet,
    host: &str,
    identity: &ClusterIdentity,
    role: Role,
) -> HeadClient {
    let auth = ClientAuth {
        token: identity.token().clone(),
        role,
    };
    Transport::memory(
        net.clone(),
        ip(host),
        HEAD_SERVER_NAME,
        auth,
        NetLimits::default(),
    )
    .connect(HEAD.parse().expect("addr"))
    .await
    .expect("connect to the head")
}

fn heartbeat(node_id: NodeId) -> HeadRequest {
    HeadRequest::idle_heartbeat(node_id, ResourceSet::default())
}

async fn node_state(driver: &HeadClient, node_id: NodeId) -> Option<NodeState> {
    match driver.call(&HeadRequest::GetClusterStatus, CALL).await {
        Ok(HeadReply::ClusterStatus(status)) => status
            .nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .map(|n| n.state),
        other => panic!("status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_head_is_declared_dead_and_fenced_when_the_cut_heals() {
    let net = MemoryNet::new(11);
    let identity = Arc::new(ClusterIdentity::generate().expect("identity"));
    let config = HeadConfig {
        heartbeat_interval: Duration::from_millis(50),
        // Long enough that no stall of a loaded machine declares it dead early.
        node_timeout: Duration::from_secs(2),
        ..HeadConfig::default()
    };
    let listener = net.listen(HEAD.parse().expect("addr")).expect("listen");
    let head = Head::on(listener.into(), config, Arc::clone(&identity), None);
    assert_eq!(
        head.local_addr().expect("addr"),
        HEAD.parse::<SocketAddr>().expect("addr")
    );
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(head.run(shutdown.clone()));

    let node = connect(&net, NODE_HOST, &identity, Role::Node).await;
    let register = HeadRequest::RegisterNode(RegisterNode {
        address: format!("{NODE_HOST}:7001"),
        pid: 1,
        hostname: "node".into(),
        host_id: "node".into(),
        resources_total: ResourceSet::default(),
        is_head_node: false,
        registration_key: 1,
        object_store_capacity_bytes: 0,
        metrics_address: None,
    });
    let node_id = match node.call(&register, CALL).await.expect("register") {
        HeadReply::NodeRegistered(registered) => registered.node_id,
        other => panic!("register: {other:?}"),
    };
    let ack = node
        .call(&heartbeat(node_id), CALL)
        .await
        .expect("heartbeat");
    assert!(matches!(ack, HeadReply::HeartbeatAck { .. }), "{ack:?}");

    let driver = connect(&net, DRIVER_HOST, &identity, Role::Client).await;
    assert_eq!(node_state(&driver, node_id).await, Some(NodeState::Alive));

    net.cut(
        ip(NODE_HOST),
        HEAD.parse::<SocketAddr>().expect("addr").ip(),
    );
    let lost = node
        .call(&heartbeat(node_id), Duration::from_millis(100))
        .await;
    assert!(lost.is_err(), "a heartbeat across the cut: {lost:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_state(&driver, node_id).await != Some(NodeState::Dead) {
        assert!(
            Instant::now() < deadline,
            "the node was never declared dead"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    net.heal(
        ip(NODE_HOST),
        HEAD.parse::<SocketAddr>().expect("addr").ip(),
    );
    let fenced = node
        .call(&heartbeat(node_id), CALL)
        .await
        .expect("heartbeat after the cut");
    assert_eq!(fenced, HeadReply::NodeFenced { node_id });

    shutdown.cancel();
    served.await.expect("the head stops");
}
