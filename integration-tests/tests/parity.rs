//! Ray's core API as Shoal offers it, from the user's side: the `scenarios`
//! driver's `parity` scenarios, in local mode and on a cluster of processes.

use std::time::Duration;

use std::io::{BufRead, BufReader, Write};

use serde_json::Value;
use shoal_integration_tests::{
    local_processes, poll_until, result_of, scenario_result, spawn_scenario, ProcessCluster,
};

const DEADLINE: Duration = Duration::from_secs(240);

fn check_env(out: &Value) {
    assert_eq!(out["seen"]["V1"], serde_json::json!(["V1", "job"]), "{out}");
    assert_eq!(out["seen"]["V2"], serde_json::json!(["V2", "job"]), "{out}");
    assert_eq!(
        out["seen"]["none"],
        serde_json::json!([null, "job"]),
        "{out}"
    );
    assert_eq!(
        out["shared_workers"], 0,
        "a worker served two environments: {out}"
    );
    assert_eq!(
        out["overridden"],
        serde_json::json!([null, "task"]),
        "{out}"
    );
    assert_eq!(
        out["nested"], "V3",
        "a nested task inherits its parent's: {out}"
    );
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

/// A cancelled reference answered `kind` within a second.
fn answered(out: &Value, key: &str, kind: &str) {
    assert_eq!(out[key]["kind"], kind, "{key}: {out:#}");
    let ms = out[key]["ms"].as_u64().expect("ms");
    assert!(ms < 1000, "{key} answered after {ms} ms: {out:#}");
}

fn check_cancel(out: &Value, processes: bool) {
    assert_eq!(out["started"], true, "{out:#}");
    answered(out, "sync", "cancelled");
    assert_eq!(
        out["saw"], true,
        "is_cancelled turned true in the task: {out:#}"
    );
    answered(out, "async", "cancelled");
    assert_eq!(out["dropped"], true, "the async task was dropped: {out:#}");
    answered(out, "never", "cancelled");
    assert_eq!(out["never_started"], true, "{out:#}");
    answered(out, "nested", "cancelled");
    assert_eq!(
        out["child_saw"], true,
        "the nested task was cancelled: {out:#}"
    );
    assert_eq!(out["cancelled_elsewhere"], true, "{out:#}");
    assert_eq!(out["remote"]["kind"], "cancelled", "{out:#}");
    // Tasks still waiting for a place: cancelled from a process that does
    // not own them, or with the task that submitted them.
    assert_eq!(out["queued_cancelled_elsewhere"], true, "{out:#}");
    answered(out, "queued_remote", "cancelled");
    answered(out, "queued_parent", "cancelled");
    assert_eq!(out["queued_child"], "cancelled", "{out:#}");
    assert_eq!(out["remote_saw"], true, "{out:#}");
    answered(out, "force", "cancelled");
    if processes {
        assert_eq!(out["own_process"], false, "{out:#}");
        assert_eq!(
            out["worker_stopped"], true,
            "a forced cancel stops the worker: {out:#}"
        );
    }
    // Measured from submission: 300 ms, then at most a second.
    assert_eq!(out["timeout"]["kind"], "timeout 300ms", "{out:#}");
    assert!(out["timeout"]["ms"].as_u64().expect("ms") < 1300, "{out:#}");
    assert_eq!(out["timed_saw"], true, "{out:#}");
    assert_eq!(out["value"], out["after_done"], "{out:#}");
    answered(out, "call_queued", "cancelled");
    answered(out, "call_running", "cancelled");
    assert_eq!(
        out["ran"],
        serde_json::json!(["block", "after"]),
        "the queued call never ran: {out:#}"
    );
    answered(out, "call_async", "cancelled");
    assert_eq!(out["method_dropped"], true, "{out:#}");
    assert_eq!(out["call_timeout"]["kind"], "timeout 300ms", "{out:#}");
    assert_eq!(out["timed_method_dropped"], true, "{out:#}");
}

#[test]
fn cancels_and_timeouts_in_local_mode() {
    check_cancel(&scenario_result(&["cancel"], &[], DEADLINE), false);
    check_cancel(
        &scenario_result(&["cancel"], &local_processes(), DEADLINE),
        true,
    );
}

#[test]
fn cancels_and_timeouts_on_a_cluster() {
    let cluster = ProcessCluster::three_process();
    check_cancel(
        &scenario_result(&["cancel"], &cluster.driver_env(), DEADLINE),
        true,
    );
    cluster.assert_no_panics();
}

/// Runs the `returns` scenario; `held` is given what it holds at its pause.
fn run_returns(env: &[(&str, String)], held: impl FnOnce(&Value)) -> Value {
    let mut child = spawn_scenario(&["returns"], env);
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let Some(line) = until_line(&mut lines, "HELD ") else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr =
            std::io::read_to_string(child.stderr.take().expect("stderr")).unwrap_or_default();
        panic!("the driver never paused:\n{stderr}");
    };
    let ids: Value = serde_json::from_str(&line).expect("HELD json");
    let go = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| held(&ids)));
    {
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "go").expect("go-ahead");
    }
    driver_result(&mut child, lines.collect(), go)
}

/// Reads the driver's output up to the line starting with `tag`.
fn until_line(lines: &mut impl Iterator<Item = String>, tag: &str) -> Option<String> {
    lines.find_map(|l| l.strip_prefix(tag).map(str::to_string))
}

/// A paused driver, let go: waits for it to end (so it leaves no process),
/// then re-raises what the test's checks meanwhile raised, then gives its
/// `RESULT`.
fn driver_result(
    child: &mut std::process::Child,
    rest: Vec<String>,
    checks: std::thread::Result<()>,
) -> Value {
    // A check that failed before its go-ahead leaves the driver paused: its
    // stdin closed, it reads the end and goes on.
    drop(child.stdin.take());
    let status = child.wait().expect("driver exit");
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    let stderr = std::io::read_to_string(child.stderr.take().expect("stderr")).unwrap_or_default();
    assert!(status.success(), "driver failed: {rest:?}\n{stderr}");
    result_of(&rest.join("\n"))
}

fn check_returns(out: &Value) {
    let n = out["n"].as_u64().expect("n");
    assert_eq!(out["text"], format!("{n} bytes"), "{out}");
    assert_eq!(
        out["sum"],
        n * 7,
        "the first return used as an argument: {out}"
    );
    assert_eq!(out["len"], n, "{out}");
    assert_eq!(
        out["still"], n,
        "dropping one return keeps the other: {out}"
    );
    assert_eq!(
        out["values"],
        serde_json::json!([1, "two", [3, 3, 3]]),
        "{out}"
    );
    assert_eq!(
        out["failed"],
        serde_json::json!([true, true, true]),
        "{out}"
    );
    assert_eq!(out["cancelled"], serde_json::json!([true, true]), "{out}");
}

#[test]
fn multiple_returns_in_local_mode() {
    check_returns(&run_returns(&[], |_| {}));
    check_returns(&run_returns(&local_processes(), |_| {}));
}

#[test]
fn multiple_returns_are_objects_of_their_own_on_a_cluster() {
    let cluster = ProcessCluster::three_process();
    let out = run_returns(&cluster.driver_env(), |ids| {
        // The large return is in a node's store, by its own size; the
        // small one is not (it lives inline with its owner).
        let listed = poll_until(
            Duration::from_secs(20),
            "the large return in the directory",
            || {
                let objects: Value =
                    serde_json::from_str(&cluster.shoal_ok(&["list", "objects", "--json"])).ok()?;
                let rows = objects.as_array()?.clone();
                rows.iter()
                    .any(|o| o["object_id"] == ids["big"])
                    .then_some(rows)
            },
        );
        let big = listed
            .iter()
            .find(|o| o["object_id"] == ids["big"])
            .expect("big");
        let size = big["size"].as_u64().expect("size");
        assert!((8 << 20..(8 << 20) + 4096).contains(&size), "{big}");
        assert!(
            listed.iter().all(|o| o["object_id"] != ids["small"]),
            "the small return is inline: {listed:?}"
        );
    });
    check_returns(&out);
    cluster.assert_no_panics();
}

fn check_groups(out: &Value) {
    assert_eq!(
        out["released"], true,
        "a call in the io group ran while the compute group was busy: {out}"
    );
    assert_eq!(out["io_max"], 2, "io = 2: two at once, no more: {out}");
    assert_eq!(out["compute_max"], 1, "compute = 1: one at a time: {out}");
}

#[test]
fn actor_concurrency_groups_in_local_mode_and_on_a_cluster() {
    check_groups(&scenario_result(&["groups"], &[], DEADLINE));
    let cluster = ProcessCluster::three_process();
    check_groups(&scenario_result(
        &["groups"],
        &cluster.driver_env(),
        DEADLINE,
    ));
    cluster.assert_no_panics();
}

fn check_stream(out: &Value, processes: bool) {
    assert_eq!(out["count"], out["n"], "{out}");
    assert_eq!(out["in_order"], true, "{out}");
    assert_eq!(
        out["stored_sizes"].as_array().map(Vec::len),
        Some(6),
        "{out}"
    );
    let ahead = out["most_ahead"].as_u64().expect("most_ahead");
    let backpressure = out["backpressure"].as_u64().expect("backpressure");
    assert!(
        ahead <= backpressure,
        "the producer ran {ahead} items ahead with a backpressure of {backpressure}: {out}"
    );
    assert_eq!(
        out["outcomes"],
        serde_json::json!([0, 1, 2, "panic"]),
        "{out}"
    );
    assert_eq!(out["first"], serde_json::json!([0, 1, 2]), "{out}");
    assert_eq!(
        out["stopped"], true,
        "dropping the generator stopped its producer: {out}"
    );
    let streamed: Vec<u64> = (0..20).map(|i| i * 10).collect();
    assert_eq!(out["streamed"], serde_json::json!(streamed), "{out}");
    if processes {
        assert_eq!(
            out["died"], true,
            "the first producer's worker exited: {out}"
        );
        let retried: Vec<u64> = (0..20).collect();
        assert_eq!(
            out["retried"],
            serde_json::json!(retried),
            "a retried producer hands each item once: {out}"
        );
    }
}

#[test]
fn streaming_generators_in_local_mode() {
    check_stream(&scenario_result(&["stream"], &[], DEADLINE), false);
    check_stream(
        &scenario_result(&["stream"], &local_processes(), DEADLINE),
        true,
    );
}

#[test]
fn streaming_generators_across_nodes() {
    let cluster = ProcessCluster::three_process();
    check_stream(
        &scenario_result(&["stream"], &cluster.driver_env(), DEADLINE),
        true,
    );
    // A producer panics on purpose (its worker's log says so); the
    // daemons must not.
    for (log, text) in cluster.daemon_logs() {
        let worker = log
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("worker-"));
        assert!(
            worker || !text.contains("panicked"),
            "{}:\n{text}",
            log.display()
        );
    }
}

/// The bytes in use in every node's object store together.
fn store_used(cluster: &ProcessCluster) -> u64 {
    cluster.status()["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["object_store_used_bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_detached_service_handed_a_thousand_10_mb_references_keeps_the_store_small() {
    let cluster = ProcessCluster::three_process();
    let mut child = spawn_scenario(&["borrow", "1000"], &cluster.driver_env());
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let mb = 1u64 << 20;
    // Sampled all along, as each node's heartbeat reports it.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (most, checked) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(store_used(&cluster));
            }
            most
        });
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let holding = until_line(&mut lines, "HOLDING ").expect("the driver pauses holding");
            assert!(holding.contains("\"held\":3"), "{holding}");
            // The three blocks the service holds stay; the others went.
            poll_until(
                Duration::from_secs(30),
                "the three held blocks alone in the store",
                || {
                    let used = store_used(&cluster);
                    (30 * mb..40 * mb).contains(&used).then_some(())
                },
            );
            let mut stdin = child.stdin.take().expect("stdin");
            writeln!(stdin, "go").expect("go-ahead");
            until_line(&mut lines, "RELEASED ").expect("the driver pauses after the release");
            // Let go by the service while the driver's job still runs: the
            // owner frees them (before, they stayed until the job ended).
            poll_until(Duration::from_secs(30), "the released blocks freed", || {
                (store_used(&cluster) < 10 * mb).then_some(())
            });
            writeln!(stdin, "go").expect("go-ahead");
        }));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (sampler.join().expect("sampler"), checked)
    });
    let out = driver_result(&mut child, lines.collect(), checked);
    assert_eq!(out["read"], out["expected"], "every block was read: {out}");
    assert_eq!(out["released"], 3, "{out}");
    assert!(
        most < 100 * mb,
        "the store held {} MB at most while 1 000 blocks of 10 MB went by",
        most / mb
    );
    cluster.assert_no_panics();
}
