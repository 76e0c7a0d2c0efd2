//! The head's real service on the in-process network behind the transport
//! seam: a node registers and heartbeats, is cut off from the head, is
//! declared dead, and when the cut heals is told it is fenced, with no
//! socket and no other process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_head::store::{Backend, Snapshot, Store, StoreError, Stored, Write};
use shoal_head::{Head, HeadConfig};
use shoal_net::handshake::ClientAuth;
use shoal_net::{
    ClusterIdentity, ConnectError, JoinToken, MemoryNet, NetLimits, RpcClient, RpcError, Transport,
    HEAD_SERVER_NAME,
};
use shoal_proto::head::{LeaseRequest, RegisterJob, RegisterNode};
use shoal_proto::task::Address;
use shoal_proto::{
    ActorId, HandshakeRefusal, HeadReply, HeadRequest, NodeId, NodeState, ResourceSet, Role,
    ServiceErrorKind, WorkerId,
};
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
    connect_with(net, host, identity.token(), role)
        .await
        .expect("connect to the head")
}

async fn connect_with(
    net: &MemoryNet,
    host: &str,
    token: &JoinToken,
    role: Role,
) -> Result<HeadClient, ConnectError> {
    let auth = ClientAuth {
        token: token.clone(),
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
}

/// Registers a node with `registration_key` on `node`'s connection.
async fn register(node: &HeadClient, registration_key: u64) -> NodeId {
    let register = HeadRequest::RegisterNode(RegisterNode {
        address: format!("{NODE_HOST}:7001"),
        pid: 1,
        hostname: "node".into(),
        host_id: "node".into(),
        resources_total: ResourceSet::default(),
        is_head_node: false,
        registration_key,
        object_store_capacity_bytes: 0,
        metrics_address: None,
        labels: Default::default(),
    });
    match node.call(&register, CALL).await.expect("register") {
        HeadReply::NodeRegistered(registered) => registered.node_id,
        other => panic!("register: {other:?}"),
    }
}

/// A head with the default config, listening at [`HEAD`] on `net`.
fn head_on(net: &MemoryNet, identity: &Arc<ClusterIdentity>) -> Head {
    let listener = net.listen(HEAD.parse().expect("addr")).expect("listen");
    Head::on(
        listener.into(),
        HeadConfig::default(),
        Arc::clone(identity),
        None,
    )
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
    let node_id = register(&node, 1).await;
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

/// A head with the default config serving on its own network.
struct Serving {
    net: MemoryNet,
    identity: Arc<ClusterIdentity>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl Serving {
    fn start(seed: u64) -> Self {
        let net = MemoryNet::new(seed);
        let identity = Arc::new(ClusterIdentity::generate().expect("identity"));
        let head = head_on(&net, &identity);
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(head.run(shutdown.clone()));
        Self {
            net,
            identity,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.served.await.expect("the head stops");
    }
}

/// Finding 4 of the security review: the `Node` role and a request's node
/// id were the peer's own word. A driver token (what drivers, workers and
/// clients hold) cannot prove the `Node` role; a node's connection speaks
/// for the node that registered on it, or whose registration key it gives,
/// and for no other (heartbeats, leaving, actor restarts, a lease's
/// blocking).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_token_makes_no_node_and_a_node_speaks_only_for_itself() {
    let head = Serving::start(13);
    let (net, identity) = (head.net.clone(), Arc::clone(&head.identity));

    let driver_token = identity.token().driver_token();
    match connect_with(&net, DRIVER_HOST, &driver_token, Role::Node).await {
        Err(ConnectError::Refused {
            refusal: HandshakeRefusal::NotANode,
            ..
        }) => {}
        other => panic!("a driver token joined as a node: {:?}", other.map(|_| ())),
    }
    let driver = connect_with(&net, DRIVER_HOST, &driver_token, Role::Driver)
        .await
        .expect("a driver connects with the driver token");

    let a = connect(&net, NODE_HOST, &identity, Role::Node).await;
    let b = connect(&net, NODE_HOST, &identity, Role::Node).await;
    let (a_id, a_key) = (register(&a, 11).await, 11);
    let b_id = register(&b, 22).await;
    let denied = |reply: Result<HeadReply, RpcError>, what: &str| match reply {
        Err(RpcError::Service(e)) if e.kind == ServiceErrorKind::PermissionDenied => {}
        other => panic!("{what} was not refused: {other:?}"),
    };
    let keyed = |node_id: NodeId, key: u64| {
        let mut beat = heartbeat(node_id);
        if let HeadRequest::Heartbeat {
            registration_key, ..
        } = &mut beat
        {
            *registration_key = key;
        }
        beat
    };
    // B acts for A: refused, whatever it does.
    denied(
        b.call(&heartbeat(a_id), CALL).await,
        "a heartbeat for A on B",
    );
    denied(
        b.call(&keyed(a_id, 22), CALL).await,
        "a heartbeat for A with B's key",
    );
    denied(
        b.call(
            &HeadRequest::UnregisterNode {
                node_id: a_id,
                registration_key: 22,
            },
            CALL,
        )
        .await,
        "A unregistered by B",
    );
    let restarted = HeadRequest::ActorRestarted {
        node_id: a_id,
        actor_id: ActorId::random(),
        incarnation: 1,
        worker: None,
        pid: 0,
        failure: Some("made up".into()),
    };
    denied(
        b.call(&restarted, CALL).await,
        "an actor restart for A on B",
    );
    // A lease granted on one node: only that node says its worker is
    // blocked.
    let job = HeadRequest::RegisterJob(RegisterJob {
        driver_pid: 1,
        binary_hash: "0".repeat(64),
        binary_size: 0,
        driver: Address {
            worker_id: WorkerId::random(),
            address: format!("{DRIVER_HOST}:7002"),
        },
        job_id: None,
    });
    let job_id = match driver.call(&job, CALL).await.expect("a job") {
        HeadReply::JobRegistered { job_id, .. } => job_id,
        other => panic!("job: {other:?}"),
    };
    let lease = HeadRequest::RequestLease(LeaseRequest {
        job_id,
        owner: WorkerId::random(),
        resources: ResourceSet::default(),
        preferred_node: Some(a_id),
        wait_ms: 1_000,
        request_id: 1,
        owner_node: None,
        abandon: false,
        placement: Default::default(),
    });
    let lease = match driver.call(&lease, CALL).await.expect("a lease") {
        HeadReply::LeaseGranted(lease) => lease,
        other => panic!("lease: {other:?}"),
    };
    let (on_it, other) = if lease.node_id == a_id {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let blocked = HeadRequest::LeaseBlocked {
        lease_id: lease.lease_id,
        blocked: true,
    };
    denied(
        other.call(&blocked, CALL).await,
        "another node's lease blocked",
    );
    let told = on_it.call(&blocked, CALL).await.expect("its own lease");
    assert_eq!(told, HeadReply::LeaseReturned);
    assert_eq!(node_state(&driver, a_id).await, Some(NodeState::Alive));
    let ack = b.call(&heartbeat(b_id), CALL).await.expect("B's own");
    assert!(matches!(ack, HeadReply::HeartbeatAck { .. }), "{ack:?}");

    // A's connection replaced: its key binds the new one.
    a.close();
    let again = connect(&net, NODE_HOST, &identity, Role::Node).await;
    denied(
        again.call(&heartbeat(a_id), CALL).await,
        "a heartbeat for A without its key",
    );
    let ack = again
        .call(&keyed(a_id, a_key), CALL)
        .await
        .expect("A's key");
    assert!(matches!(ack, HeadReply::HeartbeatAck { .. }), "{ack:?}");
    // Leaving from a connection that has not heartbeated: with A's key
    // only.
    again.close();
    let leaving = connect(&net, NODE_HOST, &identity, Role::Node).await;
    let leave = |registration_key| HeadRequest::UnregisterNode {
        node_id: a_id,
        registration_key,
    };
    denied(leaving.call(&leave(22), CALL).await, "A left with B's key");
    assert_eq!(node_state(&driver, a_id).await, Some(NodeState::Alive));
    let left = leaving.call(&leave(a_key), CALL).await.expect("A leaves");
    assert_eq!(left, HeadReply::NodeUnregistered);
    assert_ne!(node_state(&driver, a_id).await, Some(NodeState::Alive));
    assert_eq!(node_state(&driver, b_id).await, Some(NodeState::Alive));

    head.stop().await;
}

/// Task events and the state API over the wire: bad batches, queries and
/// roles are refused with a typed error, and the head goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_task_events_and_queries_are_refused_and_good_ones_listed() {
    use shoal_proto::state::{
        EventBatch, StateKind, StateQuery, TaskEvent, TaskInfo, TaskKind, TaskState, EARLIER_MAX,
        EVENTS_PER_BATCH_MAX, EVENT_TEXT_MAX,
    };
    use shoal_proto::{JobId, ServiceErrorKind, TaskId, WorkerId};
    let head = Serving::start(12);
    let (net, identity) = (head.net.clone(), Arc::clone(&head.identity));
    let driver = connect(&net, DRIVER_HOST, &identity, Role::Driver).await;
    let client = connect(&net, NODE_HOST, &identity, Role::Client).await;

    // Each event names the batch's first name.
    let event = || TaskEvent {
        task_id: TaskId::fresh(),
        attempt: 0,
        state: TaskState::Finished,
        at_us: 2,
        info: Some(TaskInfo {
            name: 0,
            kind: TaskKind::Task,
            actor_id: None,
        }),
        placed: None,
        ran_us: None,
        error: None,
        earlier: vec![(TaskState::PendingLease, 1)],
    };
    let named = |name: &str, events: Vec<TaskEvent>| {
        HeadRequest::TaskEvents(Box::new(EventBatch {
            job_id: JobId::random(),
            owner: WorkerId::random(),
            names: vec![name.to_string()],
            events,
            dropped: 0,
        }))
    };
    let send = |events: Vec<TaskEvent>| named("f", events);
    let refused =
        |reply: Result<HeadReply, shoal_net::RpcError>, kind: ServiceErrorKind| match reply {
            Err(shoal_net::RpcError::Service(e)) => assert_eq!(e.kind, kind, "{e}"),
            other => panic!("expected {kind:?}, got {other:?}"),
        };
    let too_many = (0..=EVENTS_PER_BATCH_MAX).map(|_| event()).collect();
    refused(
        driver.call(&send(too_many), CALL).await,
        ServiceErrorKind::BadRequest,
    );
    refused(
        driver
            .call(&named(&"n".repeat(EVENT_TEXT_MAX + 1), vec![event()]), CALL)
            .await,
        ServiceErrorKind::BadRequest,
    );
    let mut folded = event();
    folded.earlier = vec![(TaskState::PendingLease, 1); EARLIER_MAX + 1];
    refused(
        driver.call(&send(vec![folded]), CALL).await,
        ServiceErrorKind::BadRequest,
    );
    let mut unnamed = event();
    unnamed.info = unnamed.info.map(|i| TaskInfo { name: 1, ..i });
    refused(
        driver.call(&send(vec![unnamed]), CALL).await,
        ServiceErrorKind::BadRequest,
    );
    // Only drivers and workers own tasks.
    refused(
        client.call(&send(vec![event()]), CALL).await,
        ServiceErrorKind::PermissionDenied,
    );
    let query = |filter: &str| {
        HeadRequest::ListState(StateQuery {
            kind: StateKind::Tasks,
            filters: vec![filter.parse().expect("filter")],
            limit: 10,
            detail: false,
        })
    };
    refused(
        client.call(&query("colour=red"), CALL).await,
        ServiceErrorKind::BadRequest,
    );
    refused(
        client
            .call(&HeadRequest::Summarize(StateKind::Nodes), CALL)
            .await,
        ServiceErrorKind::BadRequest,
    );

    // Still serving: a good batch is listed, and nothing of the bad ones.
    let reply = driver.call(&named("good", vec![event()]), CALL).await;
    assert_eq!(reply.expect("taken"), HeadReply::EventsTaken);
    match client
        .call(&query("state!=RUNNING"), CALL)
        .await
        .expect("listed")
    {
        HeadReply::State(rows) => {
            assert_eq!(rows.rows.len(), 1, "{rows:?}");
            let name = rows.rows[0].iter().find(|(k, _)| k == "name");
            assert_eq!(name.map(|(_, v)| v.as_text()), Some("good".into()));
        }
        other => panic!("list: {other:?}"),
    }
    head.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_jobs_are_checked_uploaded_run_and_their_output_kept() {
    use shoal_net::digest::sha256_hex;
    use shoal_proto::head::{JobSubmission, SUBMIT_STRINGS_MAX};
    use shoal_proto::state::{StateKind, StateQuery};
    use shoal_proto::{JobId, ServiceErrorKind};
    let net = MemoryNet::new(13);
    let identity = Arc::new(ClusterIdentity::generate().expect("identity"));
    let head = head_on(&net, &identity);
    let dir = tempfile::tempdir().expect("tempdir");
    head.service().run_jobs(shoal_head::submit::JobRunner::new(
        dir.path().join("jobs"),
        dir.path().join("logs"),
        vec![("SHOAL_ADDRESS".into(), HEAD.into())],
    ));
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(head.run(shutdown.clone()));
    let client = connect(&net, DRIVER_HOST, &identity, Role::Client).await;
    let node = connect(&net, NODE_HOST, &identity, Role::Node).await;
    let refused =
        |reply: Result<HeadReply, shoal_net::RpcError>, kind: ServiceErrorKind| match reply {
            Err(shoal_net::RpcError::Service(e)) => assert_eq!(e.kind, kind, "{e}"),
            other => panic!("expected {kind:?}, got {other:?}"),
        };

    let program = std::fs::read("/bin/sh").expect("/bin/sh");
    let good = JobSubmission {
        job_id: JobId::random(),
        program: "sh".into(),
        program_hash: sha256_hex(&program),
        args: vec!["-c".into(), "echo \"out $GREETING\"; echo err >&2".into()],
        env: vec![("GREETING".into(), "hi".into())],
        working_dir_hash: None,
    };
    let submit = |s: &JobSubmission| HeadRequest::SubmitJob(Box::new(s.clone()));
    // Refused as given, before anything is looked up.
    let bad = [
        JobSubmission {
            program: "../sh".into(),
            ..good.clone()
        },
        JobSubmission {
            program: String::new(),
            ..good.clone()
        },
        JobSubmission {
            program_hash: "not-a-hash".into(),
            ..good.clone()
        },
        JobSubmission {
            working_dir_hash: Some("zz".into()),
            ..good.clone()
        },
        JobSubmission {
            env: vec![("A=B".into(), "c".into())],
            ..good.clone()
        },
        JobSubmission {
            args: vec!["x".into(); SUBMIT_STRINGS_MAX + 1],
            ..good.clone()
        },
        JobSubmission {
            args: vec!["nul\0".into()],
            ..good.clone()
        },
    ];
    for bad in &bad {
        refused(
            client.call(&submit(bad), CALL).await,
            ServiceErrorKind::BadRequest,
        );
    }
    refused(
        node.call(&submit(&good), CALL).await,
        ServiceErrorKind::PermissionDenied,
    );

    // The head lacks the program: nothing starts until it is uploaded.
    match client.call(&submit(&good), CALL).await {
        Ok(HeadReply::JobSubmitted { missing, .. }) => {
            assert_eq!(missing, vec![good.program_hash.clone()]);
        }
        other => panic!("{other:?}"),
    }
    let upload = HeadRequest::UploadBinary {
        hash: good.program_hash.clone(),
        offset: 0,
        total: program.len() as u64,
        data: program.clone(),
    };
    client.call(&upload, CALL).await.expect("upload");
    for _ in 0..2 {
        // The second is a retry: it starts nothing more.
        match client.call(&submit(&good), CALL).await {
            Ok(HeadReply::JobSubmitted { job_id, missing }) => {
                assert_eq!((job_id, missing), (good.job_id, Vec::new()));
            }
            other => panic!("{other:?}"),
        }
    }
    let job_id = good.job_id;
    let deadline = Instant::now() + Duration::from_secs(30);
    let output = loop {
        let read = HeadRequest::JobLogs {
            job_id,
            offset: 0,
            len: 1 << 20,
        };
        match client.call(&read, CALL).await {
            Ok(HeadReply::JobLog {
                data,
                size,
                done: true,
            }) => {
                assert_eq!(data.len() as u64, size);
                break String::from_utf8(data).expect("utf-8");
            }
            Ok(HeadReply::JobLog { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the job did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(output, "out hi\nerr\n");
    let listed = client
        .call(
            &HeadRequest::ListState(StateQuery {
                kind: StateKind::Jobs,
                filters: Vec::new(),
                limit: 10,
                detail: true,
            }),
            CALL,
        )
        .await;
    let Ok(HeadReply::State(rows)) = listed else {
        panic!("{listed:?}")
    };
    let text = format!("{:?}", rows.rows);
    assert_eq!(rows.rows.len(), 1, "one job, not two: {text}");
    assert!(
        text.contains("SUCCEEDED") && text.contains("sh -c"),
        "{text}"
    );
    assert!(
        !dir.path().join("jobs").join(job_id.to_string()).exists(),
        "its directory is removed"
    );

    // Jobs nobody submitted have no output and cannot be stopped.
    let other = JobId::random();
    refused(
        client
            .call(
                &HeadRequest::JobLogs {
                    job_id: other,
                    offset: 0,
                    len: 10,
                },
                CALL,
            )
            .await,
        ServiceErrorKind::NotFound,
    );
    refused(
        client
            .call(&HeadRequest::StopJob { job_id: other }, CALL)
            .await,
        ServiceErrorKind::NotFound,
    );
    match client.call(&HeadRequest::StopJob { job_id }, CALL).await {
        Ok(HeadReply::JobStopping { running: false }) => {}
        other => panic!("an ended job is not running: {other:?}"),
    }
    shutdown.cancel();
    served.await.expect("head task");
}

/// Shut, it holds the store's commits (a slow disk, or a Redis taking a
/// large executable on a loaded machine) until opened.
#[derive(Clone, Default)]
struct Gate(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    fn set(&self, shut: bool) {
        let (lock, changed) = &*self.0;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = shut;
        changed.notify_all();
    }

    fn pass(&self) {
        let (lock, changed) = &*self.0;
        let mut shut = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *shut {
            shut = changed.wait(shut).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A store that keeps nothing, each commit passing `Gate` first.
struct Gated(Gate);

impl Backend for Gated {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::new())
    }

    fn commit(&mut self, _: &[Write]) -> Result<(), StoreError> {
        self.0.pass();
        Ok(())
    }
}

/// FT-17: the head's store slow for four node timeouts while a node
/// heartbeats as a node daemon does (each heartbeat after the last reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_holding_heartbeat_replies_does_not_get_the_nodes_declared_dead() {
    let net = MemoryNet::new(12);
    let identity = Arc::new(ClusterIdentity::generate().expect("identity"));
    let timeout = Duration::from_millis(500);
    let config = HeadConfig {
        heartbeat_interval: Duration::from_millis(50),
        node_timeout: timeout,
        ..HeadConfig::default()
    };
    let gate = Gate::default();
    let (store, snapshot) = Store::start(Box::new(Gated(gate.clone())), None).expect("a store");
    let listener = net.listen(HEAD.parse().expect("addr")).expect("listen");
    let stored = Stored { store, snapshot };
    let head = Head::on(listener.into(), config, Arc::clone(&identity), Some(stored));
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(head.run(shutdown.clone()));

    let node = connect(&net, NODE_HOST, &identity, Role::Node).await;
    let node_id = register(&node, 1).await;
    // As a node daemon does: a heartbeat, its reply, a pause, the next.
    let beating = CancellationToken::new();
    let beats = tokio::spawn({
        let beating = beating.clone();
        async move {
            let mut acked = 0;
            while !beating.is_cancelled() {
                match node.call(&heartbeat(node_id), CALL).await {
                    Ok(HeadReply::HeartbeatAck { .. }) => acked += 1,
                    other => return Err(format!("after {acked} acks: {other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(acked)
        }
    });

    // A write, while the store is slow: its reply waits for the store, and
    // so does every reply after it, the node's heartbeats' too.
    gate.set(true);
    let driver = connect(&net, DRIVER_HOST, &identity, Role::Client).await;
    let put = tokio::spawn(async move {
        let put = HeadRequest::KvPut {
            namespace: "slow".into(),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            overwrite: true,
        };
        driver.call(&put, CALL).await
    });
    // The store stays slow for four node timeouts (the length of the fault,
    // not a wait for a state).
    tokio::time::sleep(timeout * 4).await;
    gate.set(false);
    let written = put.await.expect("the put's task");
    assert!(
        matches!(written, Ok(HeadReply::KvWritten { .. })),
        "{written:?}"
    );

    // The node was never silent: the head held its replies.
    let observer = connect(&net, DRIVER_HOST, &identity, Role::Client).await;
    assert_eq!(node_state(&observer, node_id).await, Some(NodeState::Alive));
    beating.cancel();
    let acked = beats.await.expect("the heartbeats' task");
    assert!(
        acked.as_ref().is_ok_and(|n| *n > 0),
        "every heartbeat acknowledged: {acked:?}"
    );

    shutdown.cancel();
    served.await.expect("the head stops");
}
