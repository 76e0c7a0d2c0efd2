//! Objects: freeing, spilling, zero-copy reads, and a full store.

use std::time::Duration;

use shoal_integration_tests::{local_processes, poll_until, scenario_result, ProcessCluster};

const STORE: &str = "104857600"; // 100 MiB per node

/// A 100 MiB store per node that never spills: what is kept fills it.
const NO_SPILL: [&str; 4] = ["--object-store-memory", STORE, "--object-spill-bytes", "0"];

#[test]
fn a_thousand_rounds_of_put_and_drop_keep_the_store_flat() {
    let cluster = ProcessCluster::three_process_with(&["--object-store-memory", STORE]);
    // 1000 x 10 MB is 100 times the store: only freeing lets this finish.
    let out = scenario_result(
        &["put-drop", "1000", "10"],
        &cluster.driver_env(),
        Duration::from_secs(600),
    );
    assert_eq!(out["rounds"], 1000);
    poll_until(Duration::from_secs(20), "every store to be empty", || {
        let status = cluster.status();
        let nodes = status["nodes"].as_array()?.clone();
        nodes
            .iter()
            .all(|n| n["object_store_used_bytes"] == 0)
            .then_some(())
    });
    let status = cluster.status();
    for node in status["nodes"].as_array().expect("nodes") {
        if node["is_head_node"] == false {
            assert_eq!(node["object_store_capacity_bytes"], 104_857_600, "{node}");
        }
    }
}

#[test]
fn an_object_passed_inside_task_arguments_is_freed_when_the_borrowing_task_is_done() {
    // No spilling: objects that are kept fill the 100 MiB store by round 10.
    let cluster = ProcessCluster::three_process_with(&NO_SPILL);
    let out = scenario_result(
        &["nested-drop", "20", "10"],
        &cluster.driver_env(),
        Duration::from_secs(300),
    );
    assert_eq!(out["rounds"], 20, "{out}");
    assert_eq!(
        out["read"],
        20 * (10 << 20),
        "every borrower read its object: {out}"
    );
    assert_eq!(out["kept"], 1, "{out}");
    assert_eq!(
        out["late_read"],
        10 << 20,
        "a borrower that kept the reference read it after its task: {out}"
    );
}

#[test]
fn three_times_the_store_in_live_objects_spills_and_reads_back_identical() {
    let cluster = ProcessCluster::three_process_with(&["--object-store-memory", STORE]);
    let out = scenario_result(
        &["spill", "30", "10"],
        &cluster.driver_env(),
        Duration::from_secs(600),
    );
    assert_eq!(out["kept"], 30, "{out}");
    assert_eq!(out["identical"], 30, "{out}");
}

#[test]
fn a_large_buffer_read_on_its_node_is_mapped_not_copied() {
    let cluster = ProcessCluster::three_process();
    for env in [cluster.driver_env(), vec![]] {
        let out = scenario_result(&["zero-copy", "200"], &env, Duration::from_secs(300));
        assert_eq!(out["mapped"], true, "{out}");
        assert_eq!(out["len"], 200 << 20, "{out}");
        assert_eq!(out["identical"], true, "{out}");
        let growth = out["anon_growth_kib"].as_u64().expect("growth");
        assert!(
            growth < 50 << 10,
            "reading 200 MiB grew private memory by {growth} KiB: {out}"
        );
    }
}

#[test]
fn a_mapped_buffer_outlives_its_object_being_freed_and_its_memory_reused() {
    let cluster = ProcessCluster::three_process_with(&["--object-store-memory", STORE]);
    for env in [cluster.driver_env(), vec![]] {
        let out = scenario_result(
            &["freed-while-mapped", "20"],
            &env,
            Duration::from_secs(120),
        );
        assert_eq!(out["mapped"], true, "{out}");
        assert_eq!(out["freed"], true, "{out}");
        assert_eq!(out["intact"], true, "{out}");
    }
}

#[test]
fn a_put_object_dies_with_its_owner() {
    let cluster = ProcessCluster::three_process();
    // Process workers only: a thread worker cannot be killed apart from us.
    for env in [cluster.driver_env(), local_processes()] {
        let out = scenario_result(&["owner-died"], &env, Duration::from_secs(120));
        assert_eq!(out["read_while_owner_lived"], true, "{out}");
        assert_eq!(out["owner_died"], true, "{out}");
    }
}

#[test]
fn a_full_store_refuses_put_with_a_typed_error_and_keeps_serving() {
    // No spilling: the store itself must fill.
    let cluster = ProcessCluster::three_process_with(&NO_SPILL);
    let out = scenario_result(
        &["fill", "10"],
        &cluster.driver_env(),
        Duration::from_secs(120),
    );
    assert_eq!(out["object_store_full"], true, "{out}");
    // Each object is 10 MiB plus 5 bytes of encoding: nine fit in 100 MiB.
    assert_eq!(out["kept"], 9, "{out}");
    // The driver exited: its objects are freed, and the daemons still serve.
    poll_until(
        Duration::from_secs(30),
        "the store to be emptied after the job",
        || {
            let status = cluster.status();
            let alive = status["nodes"]
                .as_array()?
                .iter()
                .all(|n| n["state"] == "ALIVE");
            alive.then_some(())
        },
    );
    let again = scenario_result(
        &["put-drop", "5", "10"],
        &cluster.driver_env(),
        Duration::from_secs(120),
    );
    assert_eq!(again["rounds"], 5);
}
