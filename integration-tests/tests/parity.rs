//! Ray's core API as Shoal offers it, from the user's side: the `scenarios`
//! driver's `parity` scenarios, in local mode and on a cluster of processes.

use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::{local_processes, scenario_result, ProcessCluster};

const DEADLINE: Duration = Duration::from_secs(240);

fn check_env(out: &Value) {
    assert_eq!(out["seen"]["V1"], serde_json::json!(["V1", "job"]), "{out}");
    assert_eq!(out["seen"]["V2"], serde_json::json!(["V2", "job"]), "{out}");
    assert_eq!(out["seen"]["none"], serde_json::json!([null, "job"]), "{out}");
    assert_eq!(out["shared_workers"], 0, "a worker served two environments: {out}");
    assert_eq!(out["overridden"], serde_json::json!([null, "task"]), "{out}");
    assert_eq!(out["nested"], "V3", "a nested task inherits its parent's: {out}");
    assert_eq!(out["actor"], "actor", "{out}");
    assert_eq!(out["actor_job"], "job", "{out}");
    for key in ["refused_shoal", "refused_digit"] {
        let m = out[key].as_str().unwrap_or_default();
        assert!(m.contains("env_var"), "{key}: {out}");
    }
    assert_eq!(out["actor_refused"], true, "{out}");
}

#[test]
fn worker_environments_in_local_mode_with_threads_and_processes() {
    // Threads cannot have variables of their own: such work gets processes.
    let out = scenario_result(&["env"], &[], DEADLINE);
    check_env(&out);
    let driver = out["driver_pid"].as_u64();
    for key in ["pids_v1", "pids_v2"] {
        let pids = out[key].as_array().expect("pids");
        assert!(
            pids.iter().all(|p| p.as_u64() != driver),
            "{key} ran in the driver's process: {out}"
        );
    }
    check_env(&scenario_result(&["env"], &local_processes(), DEADLINE));
}

#[test]
fn worker_environments_on_a_cluster() {
    let cluster = ProcessCluster::three_process();
    check_env(&scenario_result(&["env"], &cluster.driver_env(), DEADLINE));
    cluster.assert_no_panics();
}
