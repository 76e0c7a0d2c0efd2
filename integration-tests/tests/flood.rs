//! SEC-5: hundreds of handshakes that never finish, and slow ones that send
//! their `Hello` a byte at a time, sent from another process (and another
//! address, as from another host) at the head and every node of a
//! three-node cluster while it heartbeats and a driver runs tasks over
//! QUIC: no node is declared dead and the driver's job completes.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::{poll_until, scenario_result, sibling_bin, ProcessCluster};

/// Seconds the flood lasts: longer than the driver's job takes.
const FLOOD_SECONDS: u64 = 40;

/// The flood process, killed when dropped (pass or fail).
struct Flood(Child);

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_handshake_flood_from_another_host_leaves_the_cluster_working() {
    let cluster = ProcessCluster::three_process();
    let before = cluster.status();
    let pids = ProcessCluster::pids(&before);
    assert!(pids.len() >= 2, "{before}");
    let mut targets = vec![cluster.head_address()];
    targets.extend(
        before["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["address"].as_str().map(str::to_string)),
    );
    let refused_before = before["handshakes_refused"].as_u64().unwrap_or(0);

    // 150 silent and 50 slow connections kept up per target.
    let mut flood = Flood(
        Command::new(sibling_bin("flood"))
            .arg(FLOOD_SECONDS.to_string())
            .args(["150", "50"])
            .args(&targets)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the flood"),
    );
    // Under way once the head turns some of it away.
    poll_until(
        Duration::from_secs(20),
        "the head refusing the flood",
        || {
            let refused = cluster.status()["handshakes_refused"].as_u64()?;
            (refused > refused_before).then_some(())
        },
    );

    // A driver from "another machine": QUIC, not the same-host socket.
    let mut env = cluster.driver_env();
    env.push(("SHOAL_LOCAL_SOCKETS", "0".into()));
    let out = scenario_result(&["slow-many", "400", "40"], &env, Duration::from_secs(120));
    assert_eq!(out["count"], 400, "{out}");
    assert_eq!(out["correct"], true, "{out}");

    // Nobody was declared dead, and the flood was still on.
    let after = cluster.status();
    for pid in &pids {
        assert!(
            ProcessCluster::node_by_pid(&after, *pid, "ALIVE").is_some(),
            "node {pid} not alive after the flood: {after}"
        );
    }
    assert!(
        flood.0.try_wait().expect("the flood's state").is_none(),
        "the flood ended before the job did: make FLOOD_SECONDS longer"
    );

    // What the flood saw: it held connections and was refused more.
    let status = poll_until(
        Duration::from_secs(FLOOD_SECONDS + 20),
        "the flood to end",
        || flood.0.try_wait().ok().flatten(),
    );
    assert!(status.success(), "the flood failed: {status}");
    let mut report = String::new();
    flood
        .0
        .stdout
        .take()
        .expect("its output")
        .read_to_string(&mut report)
        .expect("read");
    let report: Value = serde_json::from_str(report.trim()).expect("the flood's JSON");
    eprintln!("the flood's connections: {report}");
    assert!(report["established"].as_u64() > Some(0), "{report}");
    assert!(report["refused"].as_u64() > Some(0), "{report}");
    cluster.assert_no_panics();
}
