//! FT-13: every control request of the head and the node, its first try
//! dropped before it is sent and its second try's reply dropped after the
//! server handled it (`SHOAL_TESTING_RPC_FAILURE`, in every process): each
//! operation still completes, and completes once (no double lease, no
//! leaked reservation, no double run, no phantom node).

use std::time::Duration;

use shoal_integration_tests::{driver, ProcessCluster};

/// The control requests: the head's and the node daemon's services.
const CONTROL_METHODS: &[&str] = &[
    // Head.
    "RegisterNode",
    "Heartbeat",
    "UnregisterNode",
    "GetClusterStatus",
    "RegisterJob",
    "UploadBinary",
    "FetchBinary",
    "RequestLease",
    "ReturnLease",
    "LeaseBlocked",
    "RegisterActor",
    "GetActor",
    "ActorRestarted",
    "GetNamedActor",
    "KillActor",
    "ListActors",
    "ListObjects",
    "LocateObject",
    "FinishJob",
    "WatchNodeDeaths",
    // Node.
    "Ping",
    "GetNodeInfo",
    "GrantWorker",
    "KillWorker",
    "ReleaseWorker",
    "RegisterWorker",
    "PutObject",
    "ReadObject",
    "CreateObject",
    "SealObject",
    "OpenObject",
    "PullObject",
    "DeleteObjects",
    "WatchWorkers",
    "WorkerBlocked",
];

fn spec() -> String {
    CONTROL_METHODS
        .iter()
        .map(|m| format!("{m}=req:1,rep:1"))
        .collect::<Vec<_>>()
        .join(";")
}

#[test]
fn every_control_request_survives_a_lost_request_and_a_lost_reply_once() {
    let spec = spec();
    let seed = std::env::var("SHOAL_TESTING_RPC_FAILURE_SEED").unwrap_or_else(|_| "13".into());
    println!("SHOAL_TESTING_RPC_FAILURE_SEED={seed}");
    let faults = [
        ("SHOAL_TESTING_RPC_FAILURE", spec.as_str()),
        ("SHOAL_TESTING_RPC_FAILURE_SEED", seed.as_str()),
    ];
    let cluster = ProcessCluster::with_daemon_env(&faults).started_three(&[]);
    let mut env = cluster.driver_env();
    env.push(("SHOAL_TESTING_RPC_FAILURE", spec.clone()));
    env.push(("SHOAL_TESTING_RPC_FAILURE_SEED", seed.clone()));
    let mut driver = driver(&["control-faults"], &env);
    driver.wait_for("IDLE", Duration::from_secs(240));
    // While the job still runs (its leases are not reclaimed by its end):
    // no phantom node from a retried registration, and every lease back.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster.status();
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        let alive: Vec<_> = nodes.iter().filter(|n| n["state"] == "ALIVE").collect();
        assert_eq!(alive.len(), 3, "a head node and two nodes: {status:#}");
        if alive
            .iter()
            .all(|n| n["resources_available"] == n["resources_total"])
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a lease was not returned within 30 s: {status:#}\nactors: {}",
            cluster.shoal_ok(&["list", "actors", "--json"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    driver.say("go");
    let out = driver.result(Duration::from_secs(60));
    assert_eq!(out["values_in_order"], true, "{out}");
    assert_eq!(out["tasks_ran_once"], true, "a task ran twice: {out}");
    assert_eq!(
        out["nested"],
        serde_json::json!([102, 104, 106, 108]),
        "{out}"
    );
    assert_eq!(out["put_intact"], true, "{out}");
    assert_eq!(out["made_len"], 24 << 20, "{out}");
    assert_eq!(out["through_name"], 5, "{out}");
    assert_eq!(out["restarted"], true, "{out}");
    assert_eq!(out["after_restart"], 1, "the restart's state is new: {out}");
    assert_eq!(
        out["constructor_runs"], 2,
        "created once and restarted once: {out}"
    );
    assert_eq!(out["ended"], true, "{out}");
    // The faults were on in the daemons (and said so with their seed).
    let logs = cluster.daemon_logs();
    let active = format!("seed {seed}");
    assert!(
        logs.iter()
            .filter(
                |(_, text)| text.contains("SHOAL_TESTING_RPC_FAILURE active")
                    && text.contains(&active)
            )
            .count()
            >= 3,
        "the head and both nodes run with injected faults: {:?}",
        logs.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    cluster.assert_no_panics();
}
