//! The in-process cluster: head and node daemons as tasks of this test,
//! talking QUIC on loopback.

use std::time::Duration;

use shoal::{LocalCluster, LocalClusterExt, LocalConfig, NodeState, ResourceSet};
use shoal_integration_tests::poll_until_async;

fn fast() -> LocalConfig {
    LocalConfig {
        head_node_cpus: 1.0,
        heartbeat_interval: Duration::from_millis(100),
        node_timeout: Duration::from_millis(1000),
        ..LocalConfig::default()
    }
}

fn cpus(n: f64) -> ResourceSet {
    let mut r = ResourceSet::new();
    r.set("CPU", n);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_and_resources_sum() {
    let mut cluster = LocalCluster::start(fast()).await.expect("cluster");
    let mut gpu = cpus(2.0);
    gpu.set("GPU", 1.0);
    cluster.add_node(gpu).await.expect("node 1");
    cluster.add_node(cpus(3.0)).await.expect("node 2");
    let client = cluster.client().await.expect("client");
    let status = client.status().await.expect("status");
    assert_eq!(status.cluster_id, cluster.token().cluster_id);
    assert_eq!(status.nodes.len(), 3);
    assert!(status.nodes.iter().all(|n| n.state == NodeState::Alive));
    assert_eq!(status.nodes.iter().filter(|n| n.is_head_node).count(), 1);
    let mut total = ResourceSet::new();
    for n in &status.nodes {
        total.add(&n.resources_total);
    }
    assert_eq!(total.get("CPU"), 6.0);
    assert_eq!(total.get("GPU"), 1.0);
    let ids: std::collections::HashSet<_> = status.nodes.iter().map(|n| n.node_id).collect();
    assert_eq!(ids.len(), 3, "every node has its own id");
    client.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_declared_dead_and_a_restart_is_a_new_node() {
    let config = fast();
    let timeout = config.node_timeout;
    let mut cluster = LocalCluster::start(config).await.expect("cluster");
    let index = cluster.add_node(cpus(2.0)).await.expect("node");
    let client = cluster.client().await.expect("client");
    let killed = cluster.kill_node(index).await.expect("kill");
    let started = std::time::Instant::now();
    poll_until_async(
        timeout * 5,
        "the killed node to be declared dead",
        || async {
            let status = client.status().await.ok()?;
            let node = status.nodes.iter().find(|n| n.node_id == killed)?;
            (node.state == NodeState::Dead).then_some(())
        },
    )
    .await;
    // Not before the timeout: a silent node gets the whole timeout.
    assert!(
        started.elapsed() >= timeout.mul_f32(0.8),
        "declared dead too early: {:?}",
        started.elapsed()
    );
    let again = cluster.add_node(cpus(2.0)).await.expect("restarted node");
    let new_id = cluster.node_id(again).expect("joined");
    assert_ne!(new_id, killed, "a restarted daemon is a new node");
    let status = client.status().await.expect("status");
    let alive: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Alive)
        .collect();
    assert_eq!(alive.len(), 2);
    assert_eq!(
        status
            .nodes
            .iter()
            .find(|n| n.node_id == killed)
            .map(|n| n.state),
        Some(NodeState::Dead)
    );
    client.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_rejoin_as_new_nodes_after_a_head_restart() {
    let mut cluster = LocalCluster::start(fast()).await.expect("cluster");
    let index = cluster.add_node(cpus(1.0)).await.expect("node");
    let before_head_node = cluster.node_id(0).expect("head node id");
    let before = cluster.node_id(index).expect("node id");
    cluster.restart_head().await.expect("restart");
    let after = tokio::time::timeout(
        Duration::from_secs(20),
        cluster.wait_node_rejoined(index, before),
    )
    .await
    .expect("node rejoined in time")
    .expect("node exists");
    assert_ne!(after, before);
    let after_head_node = tokio::time::timeout(
        Duration::from_secs(20),
        cluster.wait_node_rejoined(0, before_head_node),
    )
    .await
    .expect("head node rejoined in time")
    .expect("node exists");
    let client = cluster.client().await.expect("client");
    let status = client.status().await.expect("status");
    let ids: Vec<_> = status.nodes.iter().map(|n| n.node_id).collect();
    assert!(
        ids.contains(&after) && ids.contains(&after_head_node),
        "{ids:?}"
    );
    assert!(
        !ids.contains(&before),
        "the new head never heard of the old id"
    );
    client.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_node_stop_is_seen_at_once() {
    let mut cluster = LocalCluster::start(LocalConfig {
        // A long timeout: only the node's goodbye can make it dead quickly.
        node_timeout: Duration::from_secs(120),
        ..fast()
    })
    .await
    .expect("cluster");
    let index = cluster.add_node(cpus(1.0)).await.expect("node");
    let id = cluster.node_id(index).expect("id");
    cluster.stop_node(index).await.expect("stop");
    let client = cluster.client().await.expect("client");
    let status = client.status().await.expect("status");
    let node = status
        .nodes
        .iter()
        .find(|n| n.node_id == id)
        .expect("remembered");
    assert_eq!(
        node.state,
        NodeState::Dead,
        "a node that left is dead at once"
    );
    assert_eq!(node.resources_available.get("CPU"), 0.0);
    client.close().await;
    cluster.shutdown().await;
}

/// A task run twice (retried after its first attempt stored its result, or
/// rebuilt from its lineage while that result was only unreachable) stores
/// the same object id on the same node again: the node says it is stored,
/// instead of refusing it as "already sealed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storing_a_result_a_second_time_finds_it_stored() {
    use shoal_net::handshake::ClientAuth;
    use shoal_net::{NetLimits, RpcClient, Transport};
    use shoal_proto::{NodeReply, NodeRequest, ObjectId, Role, TaskId};

    let cluster = LocalCluster::start(fast()).await.expect("cluster");
    let auth = ClientAuth {
        token: cluster.token().clone(),
        role: Role::Worker,
    };
    let transport =
        Transport::token_client(auth, shoal_net::NODE_SERVER_NAME, NetLimits::default())
            .expect("transport");
    let node: RpcClient<NodeRequest, NodeReply> = transport
        .connect(cluster.node_address(0).expect("node 0"))
        .await
        .expect("connected to the node");
    let id: ObjectId = TaskId::fresh().return_object(0);
    let bytes = vec![7u8; 200 << 10];
    let create = NodeRequest::CreateObject {
        id,
        total: bytes.len() as u64,
        owner: None,
    };
    let t = Duration::from_secs(10);
    let Ok(NodeReply::ObjectFile { path, .. }) = node.call(&create, t).await else {
        panic!("a new object is a file to fill");
    };
    std::fs::write(&path, &bytes).expect("filled");
    node.call(&NodeRequest::SealObject { id }, t)
        .await
        .expect("sealed");
    // The second attempt's store.
    let again = node.call(&create, t).await;
    assert!(
        matches!(again, Ok(NodeReply::ObjectWritten { sealed: true })),
        "the second store of a sealed object: {again:?}"
    );
    assert_eq!(
        std::fs::read(&path).expect("read"),
        bytes,
        "the bytes are kept"
    );
    // The same over the network path (in parts) is done at once too.
    let put = NodeRequest::PutObject {
        id,
        offset: 0,
        total: bytes.len() as u64,
        data: bytes[..1024].to_vec(),
        owner: None,
    };
    let parts = node.call(&put, t).await;
    assert!(
        matches!(parts, Ok(NodeReply::ObjectWritten { sealed: true })),
        "{parts:?}"
    );
    node.close();
    cluster.shutdown().await;
}

/// A worker environment a peer sends is checked by the node like the
/// SDK's own options: a name Shoal sets itself, or one a process
/// environment cannot hold, is refused with a typed error before any
/// worker starts, and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_asking_for_a_bad_environment_is_refused() {
    use shoal_net::handshake::ClientAuth;
    use shoal_net::{NetLimits, RpcClient, RpcError, Transport};
    use shoal_proto::{EnvVars, JobId, LeaseId, NodeReply, NodeRequest, Role, ServiceErrorKind};

    let cluster = LocalCluster::start(fast()).await.expect("cluster");
    let auth = ClientAuth {
        token: cluster.token().clone(),
        role: Role::Driver,
    };
    let transport =
        Transport::token_client(auth, shoal_net::NODE_SERVER_NAME, NetLimits::default())
            .expect("transport");
    let node: RpcClient<NodeRequest, NodeReply> = transport
        .connect(cluster.node_address(0).expect("node 0"))
        .await
        .expect("connected to the node");
    let t = Duration::from_secs(10);
    for (name, value) in [("SHOAL_TOKEN", "x"), ("1BAD", "x"), ("A", "nul\0")] {
        let mut env = EnvVars::new();
        env.set(name, value);
        let grant = NodeRequest::GrantWorker {
            lease_id: LeaseId::random(),
            job_id: JobId::random(),
            binary_hash: "00".repeat(32),
            resources: cpus(1.0),
            driver: None,
            dedicated: false,
            detached: false,
            owner: None,
            owner_node: None,
            env,
        };
        match node.call(&grant, t).await {
            Err(RpcError::Service(e)) => {
                assert_eq!(e.kind, ServiceErrorKind::BadRequest, "{name}: {e:?}");
            }
            other => panic!("{name}={value:?}: expected a BadRequest, got {other:?}"),
        }
    }
    assert_eq!(cluster.worker_count(0), 0, "no worker was started");
    assert!(matches!(
        node.call(&NodeRequest::Ping, t).await,
        Ok(NodeReply::Pong { .. })
    ));
    cluster.shutdown().await;
}
