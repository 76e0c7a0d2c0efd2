//! The committed seed corpus (`corpus/<target>/`): small valid inputs of
//! each target, made here from the same fixtures the targets use (a
//! `Hello` with the right proof, real request and reply envelopes, the
//! example cluster files).
//!
//! `SHOAL_FUZZ_SEEDS=write cargo test --manifest-path fuzz/Cargo.toml
//! --test seeds` writes them; without the variable the test checks that
//! the committed seeds are current and replays every file of the corpus
//! through its target's checks (on stable, without libFuzzer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shoal_fuzz::{
    server_auth, server_flags, tls_binding, token, CLUSTER, NODE, SERVER_NONCE, SOCKET_NAME,
};
use shoal_net::handshake::{self, Accepted, ClientAuth};
use shoal_proto::codec::{self, CodecLimits};
use shoal_proto::head::{
    ActorSpec, ClusterStatus, Lease, LeaseRequest, NodeState, NodeStatus, RegisterNode,
    RestartActor,
};
use shoal_proto::ids::Uuid;
use shoal_proto::placement::{
    LabelConstraint, Placement, PlacementGroupSpec, PlacementStrategy, Strategy,
};
use shoal_proto::state::{
    EventBatch, Filter, FilterOp, StateKind, StateQuery, StateRows, TaskEvent, TaskInfo, TaskKind,
    TaskState, Value,
};
use shoal_proto::task::{ArgSpec, FailureKind, TaskFailure, TaskOutcome, TaskReply};
use shoal_proto::worker::ActorCall;
use shoal_proto::{
    ActorId, Address, Chunk, EnvVars, FunctionId, HandshakeRefusal, HeadReply, HeadRequest, Hello,
    HelloReply, JobId, LeaseId, NodeReply, NodeRequest, ObjectId, ObjectValue, PlacementGroupId,
    ReplyEnvelope, RequestEnvelope, ResourceSet, Role, ServiceError, ServiceErrorKind, StoredAt,
    TaskId, TaskSpec, WorkerId, WorkerReply, WorkerRequest, PROTOCOL_VERSION,
};

type Seeds = Vec<(&'static str, Vec<u8>)>;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("frame", shoal_fuzz::frame),
    ("messages", shoal_fuzz::messages),
    ("handshake_server", shoal_fuzz::handshake_server),
    ("handshake_client", shoal_fuzz::handshake_client),
    ("cluster_file", shoal_fuzz::cluster_file),
];

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x5ea1_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn encoded<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    codec::encode(msg).expect("a seed encodes")
}

fn frame<T: serde::Serialize>(msg: &T, limits: &CodecLimits) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_frame(msg, limits, &mut out).expect("a seed encodes");
    out
}

fn request<T: serde::Serialize>(id: u64, body: T) -> Vec<u8> {
    encoded(&RequestEnvelope {
        id,
        timeout_ms: 5000,
        body,
    })
}

fn reply<T: serde::Serialize>(id: u64, result: Result<T, ServiceError>) -> Vec<u8> {
    encoded(&ReplyEnvelope { id, result })
}

fn cpus(n: f64) -> ResourceSet {
    let mut set = ResourceSet::new();
    set.set("CPU", n);
    set
}

fn labels() -> BTreeMap<String, String> {
    [("zone".to_string(), "a".to_string())]
        .into_iter()
        .collect()
}

fn address(n: u128) -> Address {
    Address {
        worker_id: WorkerId::from_uuid(id(n)),
        address: "127.0.0.1:7300".into(),
    }
}

fn placement() -> Placement {
    Placement {
        strategy: Strategy::node_affinity(NODE, true),
        labels: vec![LabelConstraint::parse("zone", "in(a,b)").expect("selector")],
        labels_soft: vec![LabelConstraint::parse("disk", "!hdd").expect("selector")],
        near: Some(NODE),
    }
}

fn env() -> EnvVars {
    let mut env = EnvVars::new();
    env.set("RUST_LOG", "info");
    env
}

fn actor_spec() -> ActorSpec {
    ActorSpec {
        args: vec![ArgSpec::Inline(vec![1, 2, 3])],
        max_concurrency: 1,
        resources: cpus(1.0),
        owner: WorkerId::from_uuid(id(3)),
        placement: placement(),
        env: env(),
    }
}

fn group_spec() -> PlacementGroupSpec {
    PlacementGroupSpec {
        group_id: PlacementGroupId::from_uuid(id(4)),
        job_id: JobId::from_uuid(id(5)),
        name: Some("g".into()),
        detached: false,
        strategy: PlacementStrategy::StrictSpread,
        bundles: vec![cpus(1.0), cpus(2.0)],
    }
}

fn registration() -> RegisterNode {
    RegisterNode {
        address: "127.0.0.1:7200".into(),
        pid: 42,
        hostname: "h".into(),
        host_id: "0123".into(),
        resources_total: cpus(4.0),
        is_head_node: false,
        registration_key: 9,
        object_store_capacity_bytes: 1 << 30,
        metrics_address: Some("127.0.0.1:9100".into()),
        labels: labels(),
    }
}

fn stored() -> StoredAt {
    StoredAt {
        node_id: NODE,
        node_address: "127.0.0.1:7200".into(),
        size: 1 << 20,
    }
}

fn failure() -> TaskFailure {
    TaskFailure {
        kind: FailureKind::Panic,
        function: "m::f".into(),
        task_id: TaskId::from_uuid(id(6)),
        node_id: Some(NODE),
        message: "boom".into(),
        backtrace: None,
        attempts: 1,
        after_ms: None,
    }
}

fn task_spec() -> TaskSpec {
    TaskSpec {
        task_id: TaskId::from_uuid(id(6)),
        attempt: 0,
        job_id: JobId::from_uuid(id(5)),
        function: FunctionId {
            name: "m::f".into(),
            signature: 7,
        },
        args: vec![
            ArgSpec::Inline(vec![0; 8]),
            ArgSpec::Stored {
                id: ObjectId::from_uuid(id(7)),
                at: stored(),
            },
        ],
        resources: cpus(1.0),
        owner: address(8),
        borrowed: vec![ObjectId::from_uuid(id(9))],
    }
}

fn frame_seeds() -> Seeds {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: CLUSTER,
        role: Role::Node,
        token_proof: vec![0xaa; 32],
        node_proof: vec![0xbb; 32],
    };
    let ping = RequestEnvelope {
        id: 1,
        timeout_ms: 1,
        body: NodeRequest::Ping,
    };
    let chunk = ReplyEnvelope::<NodeReply> {
        id: 1,
        result: Ok(NodeReply::ObjectChunk {
            total: 3,
            data: Chunk::from(vec![1, 2, 3]),
        }),
    };
    let mut two = frame(&ping, &CodecLimits::CONTROL);
    two.extend(frame(&chunk, &CodecLimits::CONTROL));
    // Arrays 8 deep, and a map: the depth walk.
    let nested = vec![
        0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x91, 0x81, 0xa1, b'k', 0xc0,
    ];
    let mut nested_frame = (nested.len() as u32).to_be_bytes().to_vec();
    nested_frame.extend(&nested);
    vec![
        ("hello", frame(&hello, &CodecLimits::HANDSHAKE)),
        ("two_frames", two),
        ("empty_body", vec![0; 4]),
        ("nested", nested_frame),
        ("too_large", vec![0xff, 0xff, 0xff, 0xff, 0x90]),
    ]
}

fn message_seeds() -> Seeds {
    let heartbeat = HeadRequest::Heartbeat {
        node_id: NODE,
        resources_available: cpus(2.0),
        jobs: vec![JobId::from_uuid(id(5))],
        dead_workers: vec![WorkerId::from_uuid(id(3))],
        object_store_used_bytes: 10,
        object_changes: vec![],
        objects_pulled: 1,
        orders_acked: 2,
        registration_key: 3,
    };
    let lease = LeaseRequest {
        job_id: JobId::from_uuid(id(5)),
        owner: WorkerId::from_uuid(id(3)),
        resources: cpus(1.0),
        preferred_node: Some(NODE),
        wait_ms: 100,
        request_id: 1,
        owner_node: None,
        abandon: false,
        placement: placement(),
    };
    let events = EventBatch {
        job_id: JobId::from_uuid(id(5)),
        owner: WorkerId::from_uuid(id(3)),
        names: vec!["m::f".into()],
        events: vec![TaskEvent {
            task_id: TaskId::from_uuid(id(6)),
            attempt: 0,
            state: TaskState::Failed,
            at_us: 1,
            info: Some(TaskInfo {
                name: 0,
                kind: TaskKind::Task,
                actor_id: None,
            }),
            placed: None,
            ran_us: Some((1, 2)),
            error: Some("boom".into()),
            earlier: vec![(TaskState::Running, 0)],
        }],
        dropped: 0,
    };
    let query = StateQuery {
        kind: StateKind::Tasks,
        filters: vec![Filter {
            key: "state".into(),
            op: FilterOp::Ne,
            value: "FINISHED".into(),
        }],
        limit: 100,
        detail: true,
    };
    let status = ClusterStatus {
        cluster_id: CLUSTER,
        nodes: vec![NodeStatus {
            node_id: NODE,
            address: "127.0.0.1:7200".into(),
            state: NodeState::Alive,
            pid: 42,
            hostname: "h".into(),
            host_id: "0123".into(),
            is_head_node: true,
            resources_total: cpus(4.0),
            resources_available: cpus(2.5),
            last_heartbeat_ms_ago: 10,
            object_store_used_bytes: 0,
            object_store_capacity_bytes: 1 << 30,
            objects_pulled: 0,
            metrics_address: None,
            labels: labels(),
        }],
        handshakes_refused: 1,
        infeasible: vec![],
        placement_groups: vec![],
    };
    let granted = Lease {
        lease_id: LeaseId::from_uuid(id(10)),
        node_id: NODE,
        node_address: "127.0.0.1:7200".into(),
        resources: cpus(1.0),
        room_for_another: true,
    };
    let restart = RestartActor {
        actor_id: ActorId::from_uuid(id(11)),
        incarnation: 1,
        class: "Counter".into(),
        spec: actor_spec(),
        lease: granted.clone(),
        job_id: JobId::from_uuid(id(5)),
        binary_hash: "ab".into(),
        driver: address(8),
        detached: false,
    };
    let rows = StateRows {
        rows: vec![vec![
            ("id".into(), Value::Str("x".into())),
            ("cpu".into(), Value::Float(0.5)),
            ("n".into(), Value::Int(-1)),
            (
                "copies".into(),
                Value::Rows(vec![vec![("ok".into(), Value::Bool(true))]]),
            ),
        ]],
        matched: 1,
        truncated: false,
        events_dropped: 0,
    };
    let call = ActorCall {
        actor_id: ActorId::from_uuid(id(11)),
        caller: WorkerId::from_uuid(id(3)),
        incarnation: 0,
        seq: 3,
        done_below: 2,
        task_id: TaskId::from_uuid(id(12)),
        method: "incr".into(),
        args: Some(vec![ArgSpec::Inline(vec![1])]),
        borrowed: vec![],
        lender: None,
    };
    let done = TaskReply {
        task_id: TaskId::from_uuid(id(6)),
        attempt: 0,
        node_id: NODE,
        worker_id: WorkerId::from_uuid(id(3)),
        outcome: TaskOutcome::Inline(vec![4, 2]),
        run_us: Some(5),
        started_us: Some(1),
        kept: vec![],
        more_returns: vec![TaskOutcome::Stored(stored())],
    };
    let refused = ServiceError::new(ServiceErrorKind::PermissionDenied, "no");
    vec![
        ("head_status", request(1, HeadRequest::GetClusterStatus)),
        ("head_heartbeat", request(2, heartbeat)),
        (
            "head_register",
            request(3, HeadRequest::RegisterNode(registration())),
        ),
        ("head_lease", request(4, HeadRequest::RequestLease(lease))),
        (
            "head_actor",
            request(
                5,
                HeadRequest::RegisterActor {
                    info: shoal_proto::ActorInfo {
                        actor_id: ActorId::from_uuid(id(11)),
                        class: "Counter".into(),
                        name: Some("c".into()),
                        namespace: "ns".into(),
                        detached: false,
                        job_id: JobId::from_uuid(id(5)),
                        node_id: NODE,
                        node_address: "127.0.0.1:7200".into(),
                        worker: address(3),
                        pid: 1,
                        lease_id: LeaseId::from_uuid(id(10)),
                        state: shoal_proto::ActorState::Alive,
                        max_pending_calls: None,
                        incarnation: 0,
                        max_restarts: 1,
                        num_restarts: 0,
                        max_task_retries: 0,
                    },
                    spec: Box::new(actor_spec()),
                },
            ),
        ),
        (
            "head_group",
            request(6, HeadRequest::CreatePlacementGroup(Box::new(group_spec()))),
        ),
        (
            "head_events",
            request(7, HeadRequest::TaskEvents(Box::new(events))),
        ),
        ("head_list", request(8, HeadRequest::ListState(query))),
        (
            "head_kv",
            request(
                9,
                HeadRequest::KvPut {
                    namespace: "n".into(),
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    overwrite: true,
                },
            ),
        ),
        (
            "reply_status",
            reply(1, Ok(HeadReply::ClusterStatus(status))),
        ),
        (
            "reply_granted",
            reply(4, Ok(HeadReply::LeaseGranted(granted))),
        ),
        (
            "reply_ack",
            reply(
                2,
                Ok(HeadReply::HeartbeatAck {
                    finished_jobs: vec![],
                    restart_actors: vec![restart],
                    delete_objects: vec![ObjectId::from_uuid(id(7))],
                    release_leases: vec![],
                    orders_seq: 3,
                }),
            ),
        ),
        ("reply_rows", reply(8, Ok(HeadReply::State(Box::new(rows))))),
        ("reply_refused", reply::<HeadReply>(9, Err(refused))),
        ("node_ping", request(1, NodeRequest::Ping)),
        (
            "node_grant",
            request(
                2,
                NodeRequest::GrantWorker {
                    lease_id: LeaseId::from_uuid(id(10)),
                    job_id: JobId::from_uuid(id(5)),
                    binary_hash: "ab".into(),
                    resources: cpus(1.0),
                    driver: Some(address(8)),
                    dedicated: true,
                    detached: false,
                    owner: Some(WorkerId::from_uuid(id(3))),
                    owner_node: None,
                    env: env(),
                },
            ),
        ),
        (
            "node_put",
            request(
                3,
                NodeRequest::PutObject {
                    id: ObjectId::from_uuid(id(7)),
                    offset: 0,
                    total: 4,
                    data: vec![1, 2, 3, 4],
                    owner: None,
                },
            ),
        ),
        (
            "node_log",
            request(
                4,
                NodeRequest::ReadLog {
                    name: "node.log".into(),
                    offset: 0,
                    len: 100,
                },
            ),
        ),
        (
            "node_chunk",
            reply(
                5,
                Ok(NodeReply::ObjectChunk {
                    total: 4,
                    data: Chunk::from(vec![1, 2, 3, 4]),
                }),
            ),
        ),
        (
            "node_info",
            reply(
                6,
                Ok(NodeReply::NodeInfo {
                    node_id: NODE,
                    pid: 1,
                    resources_total: cpus(4.0),
                    resources_available: cpus(1.0),
                    store_dir: "/dev/shm/x".into(),
                }),
            ),
        ),
        (
            "worker_push",
            request(1, WorkerRequest::PushTask(task_spec())),
        ),
        ("worker_call", request(2, WorkerRequest::ActorCall(call))),
        (
            "worker_item",
            request(
                3,
                WorkerRequest::GeneratorItem {
                    task_id: TaskId::from_uuid(id(6)),
                    attempt: 0,
                    index: 1,
                    item: TaskOutcome::Failed(failure()),
                },
            ),
        ),
        ("worker_done", reply(1, Ok(WorkerReply::TaskDone(done)))),
        (
            "worker_object",
            reply(2, Ok(WorkerReply::Object(ObjectValue::Stored(stored())))),
        ),
    ]
}

fn server_seeds() -> Seeds {
    let hello = |role: Role, binding: &[u8; 32]| {
        handshake::client_hello(
            &ClientAuth {
                token: token(),
                role,
            },
            binding,
        )
    };
    let quic = |flags: u8, hello: &Hello| {
        let mut out = vec![flags];
        out.extend(encoded(hello));
        out
    };
    let client_nonce = [0x33; 32];
    let same_host = |role: Role| {
        let binding = handshake::same_host_binding(SOCKET_NAME, &SERVER_NONCE, &client_nonce, role);
        let mut out = vec![server_flags::SAME_HOST];
        out.extend(client_nonce);
        out.extend(encoded(&hello(role, &binding)));
        out
    };
    let mut long_role = vec![0, 0x81, 0xa4];
    long_role.extend_from_slice(b"role");
    long_role.push(0xda);
    long_role.extend_from_slice(&4050u16.to_be_bytes());
    long_role.extend(std::iter::repeat_n(b'X', 4050));
    let driver = hello(Role::Driver, &tls_binding(Role::Driver));
    let mut old = driver.clone();
    old.protocol_version = 1;
    let mut foreign = driver.clone();
    foreign.cluster_id = shoal_proto::ClusterId::from_uuid(id(99));
    vec![
        ("driver", quic(0, &driver)),
        (
            "node_with_certificate",
            quic(
                server_flags::CERTIFICATE,
                &hello(Role::Node, &tls_binding(Role::Node)),
            ),
        ),
        (
            "node_without_certificate",
            quic(0, &hello(Role::Node, &tls_binding(Role::Node))),
        ),
        (
            "client_not_allowed",
            quic(0, &hello(Role::Client, &tls_binding(Role::Client))),
        ),
        ("old_version", quic(0, &old)),
        ("foreign_cluster", quic(0, &foreign)),
        (
            "no_keying_material",
            quic(server_flags::NO_KEYING_MATERIAL, &driver),
        ),
        ("wrong_proof", quic(0, &hello(Role::Worker, &[0; 32]))),
        (
            "node_with_driver_token",
            quic(
                server_flags::CERTIFICATE,
                &handshake::client_hello(
                    &ClientAuth {
                        token: token().driver_token(),
                        role: Role::Node,
                    },
                    &tls_binding(Role::Node),
                ),
            ),
        ),
        ("same_host_worker", same_host(Role::Worker)),
        // A role of 4 050 bytes: its refusal once quoted it whole and did
        // not fit a handshake frame (net's handshake tests).
        ("long_role", long_role),
    ]
}

fn client_seeds() -> Seeds {
    let binding = tls_binding(Role::Driver);
    let welcome = handshake::server_reply(
        server_auth(),
        &Ok(Accepted {
            role: Role::Driver,
            binding,
        }),
    );
    let forged = HelloReply::Welcome {
        server_proof: vec![0; 32],
        node_id: None,
    };
    let refused = |refusal: HandshakeRefusal| encoded(&HelloReply::Refused(refusal));
    vec![
        ("welcome", encoded(&welcome)),
        ("forged_welcome", encoded(&forged)),
        (
            "refused_version",
            refused(HandshakeRefusal::ProtocolVersion {
                server: PROTOCOL_VERSION,
                client: 1,
            }),
        ),
        (
            "refused_cluster",
            refused(HandshakeRefusal::ClusterMismatch),
        ),
        ("refused_token", refused(HandshakeRefusal::BadToken)),
        (
            "refused_role",
            refused(HandshakeRefusal::RoleNotAllowed(Role::Client)),
        ),
        (
            "refused_malformed",
            refused(HandshakeRefusal::Malformed("bad".into())),
        ),
    ]
}

fn cluster_file_seeds() -> Seeds {
    let mut seeds: Seeds = vec![
        ("empty", Vec::new()),
        (
            "nodes",
            b"[head]\nport = 6380\nnum_cpus = 0\nnode_ip = \"127.0.0.1\"\nnode_port = 7200\n\
              worker_port_range = \"7300-7399\"\nlabels = { zone = \"a\" }\n\
              resources = { disk = 1.5 }\n\n[timeouts]\nheartbeat_interval = \"500ms\"\n\
              node_timeout = \"5s\"\n\n[limits]\nframe_bytes_max = 1048576\n\
              handshake_timeout = \"2s\"\n\n[[nodes]]\nnum_cpus = 2\nnum_gpus = 1\n\
              labels = { zone = \"b\", \"shoal.io/rack\" = \"r1\" }\nmemory_bytes = 1073741824\n\n\
              [[nodes]]\nnode_ip = \"::1\"\nworker_port_range = \"8000-8000\"\n"
                .to_vec(),
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-config");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("cluster-config")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    for path in examples {
        let name = path
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        let name: &'static str = Box::leak(name.into_boxed_str());
        seeds.push((name, std::fs::read(&path).expect("readable")));
    }
    seeds
}

fn seeds() -> Vec<(&'static str, Seeds)> {
    vec![
        ("frame", frame_seeds()),
        ("messages", message_seeds()),
        ("handshake_server", server_seeds()),
        ("handshake_client", client_seeds()),
        ("cluster_file", cluster_file_seeds()),
    ]
}

/// The committed seeds are what this file makes (or are written, with
/// `SHOAL_FUZZ_SEEDS=write`).
#[test]
fn seeds_are_current() {
    let write = std::env::var("SHOAL_FUZZ_SEEDS").is_ok_and(|v| v == "write");
    for (target, seeds) in seeds() {
        let dir = corpus().join(target);
        if write {
            std::fs::create_dir_all(&dir).expect("corpus directory");
        }
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &bytes).expect("seed written");
            } else {
                let committed = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{}: {e} (SHOAL_FUZZ_SEEDS=write)", path.display()));
                assert!(
                    committed == bytes,
                    "{} is stale (SHOAL_FUZZ_SEEDS=write)",
                    path.display()
                );
            }
        }
    }
}

/// Every file of the corpus (seeds, and any input added since) passes its
/// target's checks.
#[test]
fn the_corpus_replays() {
    if std::env::var("SHOAL_FUZZ_SEEDS").is_ok_and(|v| v == "write") {
        return; // being written at the same time
    }
    for (target, run) in TARGETS {
        let dir = corpus().join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            run(&std::fs::read(&path).expect("readable"));
            n += 1;
        }
        assert!(n > 0, "no seeds for {target}");
    }
}

/// The seeds reach the paths they are for: the valid ones are accepted.
#[test]
fn the_valid_seeds_are_accepted() {
    let accepted = |body: &[u8]| {
        handshake::judge_hello(server_auth(), body, false, |role| Some(tls_binding(role)))
            .map(|a| a.role)
    };
    let server = server_seeds();
    let driver = &server[0].1;
    assert_eq!(accepted(&driver[1..]), Ok(Role::Driver));
    let client = client_seeds();
    assert_eq!(
        handshake::judge_hello_reply(&token(), &client[0].1, &tls_binding(Role::Driver)),
        Ok(Some(NODE))
    );
    for (name, body) in message_seeds() {
        let decodes = codec::decode::<RequestEnvelope<HeadRequest>>(&body, &CodecLimits::CONTROL)
            .is_ok()
            || codec::decode::<ReplyEnvelope<HeadReply>>(&body, &CodecLimits::CONTROL).is_ok()
            || codec::decode::<RequestEnvelope<NodeRequest>>(&body, &CodecLimits::CONTROL).is_ok()
            || codec::decode::<ReplyEnvelope<NodeReply>>(&body, &CodecLimits::CONTROL).is_ok()
            || codec::decode::<RequestEnvelope<WorkerRequest>>(&body, &CodecLimits::CONTROL)
                .is_ok()
            || codec::decode::<ReplyEnvelope<WorkerReply>>(&body, &CodecLimits::CONTROL).is_ok();
        assert!(decodes, "{name}");
    }
    for (name, text) in cluster_file_seeds() {
        let text = std::str::from_utf8(&text).expect("UTF-8");
        if let Err(e) = shoal_fuzz::cluster_file::ClusterFile::parse(text) {
            panic!("{name}: {e:#}");
        }
    }
}
