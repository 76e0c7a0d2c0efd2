//! The chaos suite: real processes (and, for the partition, hosts of their
//! own) while nodes are killed, stopped and cut off. Each test takes its
//! seed from `SHOAL_CHAOS_SEED` (else the clock) and prints it, and prints a
//! summary line `CHAOS <test>: operations N, kills K, lost L, duplicates D,
//! reordered R, seed S`. `make chaos` runs them at full size
//! (`SHOAL_CHAOS=full`, minutes); `make test` runs the same tests as a short
//! smoke.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_integration_tests::history::{self, Op};
use shoal_integration_tests::hosts::{Hosts, FAST_CONFIG};
use shoal_integration_tests::{driver, poll_until, scenario_result, signal, Chaos, ProcessCluster};

/// A head that runs nothing, with fast failure detection.
fn head(cluster: &ProcessCluster) {
    let config = cluster.write_config("fast.toml", FAST_CONFIG);
    cluster.start_head(&[
        "--num-cpus",
        "0",
        "--config",
        config.to_str().expect("utf8 path"),
    ]);
}

/// Every live node's resources are all free again (while the job still
/// runs: its end would reclaim leaked leases and hide them).
fn ledger_back(cluster: &ProcessCluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cluster.status();
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        let busy: Vec<&Value> = nodes
            .iter()
            .filter(|n| n["state"] == "ALIVE")
            .filter(|n| n["resources_available"] != n["resources_total"])
            .collect();
        if busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "resources still held after the drain: {busy:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of the live node daemons other than the head's.
fn node_pids(cluster: &ProcessCluster, head_pid: u32) -> Vec<u32> {
    cluster.status()["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter(|n| n["state"] == "ALIVE")
                .filter_map(|n| n["pid"].as_u64())
                .map(|p| p as u32)
                .filter(|p| *p != head_pid)
                .collect()
        })
        .unwrap_or_default()
}

fn head_pid(cluster: &ProcessCluster) -> u32 {
    cluster.status()["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["is_head_node"] == true))
        .and_then(|n| n["pid"].as_u64())
        .expect("the head's node") as u32
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Kills `kills` node daemons other than `spared` at random times within
/// `window` of each other (each replaced by a new node started with
/// `node_args`); returns when each died (Unix ms).
fn kill_nodes(
    chaos: &mut Chaos,
    cluster: &ProcessCluster,
    kills: usize,
    window: Duration,
    node_args: &[&str],
    spared: &[u32],
) -> Vec<u64> {
    let head = head_pid(cluster);
    let mut times = Vec::new();
    let mut killed = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(chaos.between(window / 4, window));
        // A node killed a moment ago is still listed alive.
        let pids: Vec<u32> = node_pids(cluster, head)
            .into_iter()
            .filter(|p| !spared.contains(p) && !killed.contains(p))
            .collect();
        let victim = pids[chaos.pick(pids.len())];
        println!("killing node daemon {victim}");
        signal(victim, Signal::SIGKILL);
        killed.push(victim);
        times.push(unix_ms());
        cluster.start_node(node_args);
    }
    times
}

/// Runs per task id from the workers' logs in `dir` (one file per process).
fn runs(dir: &Path) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for file in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for line in std::fs::read_to_string(file.path())
            .unwrap_or_default()
            .lines()
        {
            *runs.entry(line.to_string()).or_default() += 1;
        }
    }
    runs
}

#[test]
fn ft1_a_nested_job_survives_node_daemons_killed_under_it() {
    let mut chaos = Chaos::from_env("FT-1");
    let (n, k, window) = if chaos.full {
        (1000u64, 9u64, Duration::from_secs(3))
    } else {
        (40, 4, Duration::from_secs(2))
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_path = dir.path().display().to_string();
    let cluster = ProcessCluster::with_daemon_env(&[("CHAOS_DIR", dir_path.as_str())]);
    head(&cluster);
    let node_args = ["--num-cpus", "2"];
    for _ in 0..3 {
        cluster.start_node(&node_args);
    }
    let mut env = cluster.driver_env();
    env.push(("CHAOS_DIR", dir_path.clone()));
    let (n_arg, k_arg) = (n.to_string(), k.to_string());
    let mut driver = driver(&["chaos-nested", &n_arg, &k_arg], &env);
    driver.wait_for("STARTED", Duration::from_secs(120));
    let kills = kill_nodes(&mut chaos, &cluster, 2, window, &node_args, &[]);
    let done_ms: u64 = driver
        .wait_for("DONE ", Duration::from_secs(900))
        .trim()
        .parse()
        .expect("the driver's time");
    ledger_back(&cluster);
    driver.say("go");
    let out = driver.result(Duration::from_secs(120));
    let outcomes: Vec<String> = serde_json::from_value(out["outcomes"].clone()).expect("outcomes");
    let lost: Vec<(usize, &String)> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| *o != "ok")
        .collect();
    let runs = runs(dir.path());
    let duplicates: usize = runs.values().map(|r| r.saturating_sub(1)).sum();
    let operations = n * (k + 1);
    println!(
        "CHAOS FT-1: operations {operations}, kills 2, lost {}, duplicates {duplicates}, reordered 0, seed {}, {:.1} s",
        lost.len(),
        chaos.seed,
        out["seconds"].as_f64().unwrap_or(0.0)
    );
    assert!(lost.is_empty(), "results lost or wrong: {lost:?}");
    let during = kills.iter().filter(|t| **t < done_ms).count();
    println!("FT-1: {during} of the 2 kills landed while the job ran");
    if chaos.full {
        assert_eq!(during, 2, "a full run kills while the job runs");
    }
    assert!(
        runs.len() as u64 >= operations,
        "every task ran: {} of {operations}",
        runs.len()
    );
    cluster.assert_no_panics();
}

#[test]
fn ft2_numbered_calls_through_restarting_actors_are_all_recorded_in_order() {
    let mut chaos = Chaos::from_env("FT-2");
    let (forwarders, calls, window) = if chaos.full {
        (4u32, 2000u32, Duration::from_secs(3))
    } else {
        (2, 100, Duration::from_secs(1))
    };
    let cluster = ProcessCluster::new();
    head(&cluster);
    cluster.start_node(&["--num-cpus", "2", "--resources", r#"{"stable": 1}"#]);
    let chaos_node = ["--num-cpus", "2", "--resources", r#"{"chaos": 8}"#];
    for _ in 0..2 {
        cluster.start_node(&chaos_node);
    }
    let stable = cluster.status()["nodes"]
        .as_array()
        .and_then(|nodes| {
            nodes
                .iter()
                .find(|n| n["resources_total"].get("stable").is_some())
        })
        .and_then(|n| n["pid"].as_u64())
        .expect("the stable node") as u32;
    let (f_arg, m_arg) = (forwarders.to_string(), calls.to_string());
    let mut driver = driver(&["chaos-actors", &f_arg, &m_arg], &cluster.driver_env());
    driver.wait_for("STARTED", Duration::from_secs(120));
    // Only the chaos nodes die: the recorder's node never does.
    let kills = kill_nodes(&mut chaos, &cluster, 2, window, &chaos_node, &[stable]);
    let out = driver.result(Duration::from_secs(900));
    let acks: Vec<Vec<bool>> = serde_json::from_value(out["acks"].clone()).expect("acks");
    let seen: Vec<(u32, Vec<u32>)> = serde_json::from_value(out["seen"].clone()).expect("seen");
    let ops: Vec<Op> = acks
        .iter()
        .enumerate()
        .flat_map(|(client, calls)| {
            calls.iter().enumerate().map(move |(seq, ok)| Op {
                client: client as u32,
                seq: seq as u32,
                acknowledged: *ok,
            })
        })
        .collect();
    let seen: Vec<(u32, u32)> = seen
        .into_iter()
        .flat_map(|(client, seqs)| seqs.into_iter().map(move |s| (client, s)))
        .collect();
    let report = history::check(&ops, &seen);
    println!("CHAOS FT-2: {report}, kills 2, seed {}", chaos.seed);
    let answered_ms = out["answered_ms"].as_u64().unwrap_or(0);
    let during = kills.iter().filter(|t| **t < answered_ms).count();
    println!("FT-2: {during} of the 2 kills landed while calls were open");
    if chaos.full {
        assert_eq!(during, 2, "a full run kills while calls are open");
    }
    assert_eq!(
        report.acknowledged,
        ops.len(),
        "every call answered: {}",
        out["errors"]
    );
    assert!(report.ok(), "{report}: {report:?}");
    cluster.assert_no_panics();
}

#[test]
fn ft3_an_actor_killed_mid_call_fails_the_call_and_ran_it_at_most_once() {
    let chaos = Chaos::from_env("FT-3");
    let cluster = ProcessCluster::three_process();
    let out = scenario_result(
        &["chaos-actor-death"],
        &cluster.driver_env(),
        Duration::from_secs(120),
    );
    println!(
        "CHAOS FT-3: operations 1, kills 1, lost 0, duplicates {}, reordered 0, seed {}, ActorDied after {:.2} s",
        out["body_runs"].as_u64().unwrap_or(0).saturating_sub(1),
        chaos.seed,
        out["seconds_to_error"].as_f64().unwrap_or(0.0)
    );
    assert_eq!(out["actor_died"], true, "{out}");
    assert_eq!(out["body_runs"], 1, "the body ran once, not again: {out}");
    // The method naps for 60 s: the error came from the death, not from
    // the call's end.
    assert!(
        out["seconds_to_error"].as_f64().unwrap_or(f64::MAX) < 60.0,
        "{out}"
    );
    cluster.assert_no_panics();
}

#[test]
fn ft11_a_node_cut_off_from_the_cluster_is_fenced_and_rejoins_as_a_new_node() {
    let chaos = Chaos::from_env("FT-11");
    let cut_for = if chaos.full {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(6)
    };
    // The head and the driver on host A; the actor's two possible homes on
    // B and C (one `spot` each).
    let hosts = Hosts::start(&["host-a", "host-b", "host-c"]);
    hosts.start_head(0, &["--num-cpus", "1"]);
    for i in 1..3 {
        hosts.start_node(i, &["--num-cpus", "1", "--resources", r#"{"spot": 1}"#]);
    }
    let mut driver = hosts.driver(0, &["fence"], &hosts.driver_env());
    let line = driver.wait_for("ACTOR ", Duration::from_secs(120));
    let old_node = line
        .split_whitespace()
        .next()
        .expect("the actor's node")
        .to_string();
    let status = hosts.status();
    let victim_host = status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["node_id"] == old_node.as_str()))
        .and_then(|n| n["hostname"].as_str())
        .expect("the actor's host")
        .to_string();
    let victim = if victim_host == "host-b" { 1 } else { 2 };
    // Workers run the job's executable from the node's cache.
    let workers = |i: usize| {
        hosts
            .processes(i)
            .into_iter()
            .filter(|p| p.contains("executables/"))
            .collect::<Vec<_>>()
    };
    assert!(
        !workers(victim).is_empty(),
        "the actor's worker runs on {victim_host}: {:?}",
        hosts.processes(victim)
    );
    let cut_at = Instant::now();
    hosts.cut(victim);
    let out = driver.result_line(Duration::from_secs(120));
    assert_ne!(
        out["new_node"], out["old_node"],
        "restarted elsewhere: {out}"
    );
    assert_eq!(
        out["slow_answered_by_new"], true,
        "the call in flight was answered by the new incarnation: {out}"
    );
    std::thread::sleep(cut_for.saturating_sub(cut_at.elapsed()));
    hosts.reconnect(victim);
    // Back on the network, the node finds itself fenced: its old worker is
    // stopped and it rejoins under a new id.
    poll_until(Duration::from_secs(60), "the fenced node to rejoin", || {
        let status = hosts.status();
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| {
                n["hostname"] == victim_host.as_str()
                    && n["state"] == "ALIVE"
                    && n["node_id"] != old_node.as_str()
            })
            .cloned()
    });
    poll_until(
        Duration::from_secs(30),
        "the old worker to be stopped",
        || workers(victim).is_empty().then_some(()),
    );
    let alive = hosts.status()["nodes"]
        .as_array()
        .map(|n| n.iter().filter(|n| n["state"] == "ALIVE").count())
        .unwrap_or(0);
    assert_eq!(alive, 3, "the fenced node is counted once");
    driver.say("go");
    println!(
        "CHAOS FT-11: operations 1, kills 0, cut {:?}, lost 0, duplicates 0, reordered 0, seed {}",
        cut_for, chaos.seed
    );
    hosts.assert_no_panics();
}

/// A process's resident memory in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn rl4_a_million_queued_no_op_tasks_all_complete_in_bounded_memory() {
    let chaos = Chaos::from_env("RL-4");
    let n: u64 = if chaos.full { 1_000_000 } else { 20_000 };
    let cluster = ProcessCluster::three_process();
    let head = head_pid(&cluster);
    let n_arg = n.to_string();
    let mut driver = driver(&["queued", &n_arg], &cluster.driver_env());
    // Its job registered and executable uploaded (kept by the head), no
    // task yet.
    driver.wait_for("READY", Duration::from_secs(120));
    let head_before = rss_kib(head);
    driver.say("go");
    driver.wait_for("QUEUED", Duration::from_secs(600));
    // Every task is submitted: the head holds lease requests, not tasks.
    let head_queued = rss_kib(head);
    let out = driver.result(Duration::from_secs(1800));
    println!(
        "CHAOS RL-4: tasks {n}, done {}, {:.0} tasks/s, driver {:.0} bytes per pending task ({} -> {} KiB), head {head_before} -> {head_queued} KiB while they were queued, seed {}",
        out["done"],
        out["tasks_per_second"].as_f64().unwrap_or(0.0),
        out["bytes_per_pending_task"].as_f64().unwrap_or(0.0),
        out["rss_before_kib"],
        out["rss_pending_kib"],
        chaos.seed
    );
    assert_eq!(out["done"], n, "every task completed: {out}");
    // The head keeps no per-task state: its memory does not grow with the
    // number of tasks queued (64 MiB is far below 64 bytes a task at 10^6).
    assert!(
        head_queued.saturating_sub(head_before) < 64 << 10,
        "the head grew from {head_before} to {head_queued} KiB with {n} tasks queued"
    );
    cluster.assert_no_panics();
}
