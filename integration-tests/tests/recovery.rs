//! The head restarts without losing work (RELIABILITY.md FT-8, FT-16): real
//! `shoal` daemons, the head SIGKILLed and recovered with
//! `shoal start --head --recover` on the same session directory.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_integration_tests::redis::RedisServer;
use shoal_integration_tests::{driver, poll_until, scenario_result, signal, ProcessCluster};

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `text` without its terminal colour codes (`ESC [ ... m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The pid of the session's head daemon.
fn head_pid(cluster: &ProcessCluster) -> u32 {
    let path = cluster.root().join("session_latest/pids/head.pid");
    std::fs::read_to_string(&path)
        .expect("head pid file")
        .trim()
        .parse()
        .expect("a pid")
}

/// The ids of the live nodes that are not the head's own.
fn worker_node_ids(status: &Value) -> Vec<String> {
    let mut ids: Vec<String> = status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["state"] == "ALIVE" && n["is_head_node"] != true)
        .filter_map(|n| n["node_id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// Kills the head with SIGKILL and waits until it is gone.
fn kill_head(cluster: &ProcessCluster) -> u32 {
    let pid = head_pid(cluster);
    signal(pid, Signal::SIGKILL);
    poll_until(Duration::from_secs(10), "the head to exit", || {
        (!shoal_integration_tests::process_alive(pid)).then_some(())
    });
    pid
}

/// `shoal start --head --recover` with the cluster's fast timeouts and
/// `extra` flags.
fn recover_head(cluster: &ProcessCluster, extra: &[&str]) -> String {
    let config = cluster.root().join("fast.toml");
    let mut args = vec![
        "start",
        "--head",
        "--recover",
        "--num-cpus",
        "0",
        "--node-ip",
        "127.0.0.1",
        "--config",
        config.to_str().expect("utf8 path"),
    ];
    args.extend_from_slice(extra);
    cluster.shoal_ok(&args)
}

/// SIGKILLs a process when dropped, unless it is gone already: a head the
/// cluster's pid files no longer name is not left behind.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if shoal_integration_tests::process_alive(self.0) {
            signal(self.0, Signal::SIGKILL);
        }
    }
}

/// FT-8 on `cluster` (a head that runs no tasks, two nodes): a job of
/// `tasks` short tasks in waves and a named detached actor; the head is
/// SIGKILLed mid-job and recovered with `--recover` and `extra` flags. The
/// job finishes right, the actor keeps its state, the nodes their ids, and
/// a new driver finds the actor and runs new work. Returns the outage in
/// seconds and the tasks completed during it.
fn kill_and_recover_mid_job(
    cluster: &ProcessCluster,
    name: &str,
    tasks: u32,
    extra: &[&str],
) -> (f64, usize) {
    let nodes_before = worker_node_ids(&cluster.status());
    assert_eq!(nodes_before.len(), 2, "{}", cluster.status());
    let address = cluster.head_address();

    let mut job = driver(
        &["recover-job", name, &tasks.to_string()],
        &cluster.driver_env(),
    );
    job.wait_for("PROGRESS", Duration::from_secs(120));
    kill_head(cluster);
    let killed_at = unix_ms();
    let out = recover_head(cluster, extra);
    let up_at = unix_ms();
    assert!(out.contains("Recovered the Shoal head"), "{out}");
    assert_eq!(cluster.head_address(), address, "same address");

    let result = job.result(Duration::from_secs(180));
    assert_eq!(result["count"], tasks, "{result}");
    assert_eq!(result["correct"], true, "every result right: {result}");
    // The actor's state from before the crash: caller 7 recorded 0..10.
    assert_eq!(
        result["orders"],
        serde_json::json!([[7, true, 10]]),
        "{result}"
    );
    let during: usize = result["wave_done_ms"]
        .as_array()
        .expect("waves")
        .iter()
        .filter_map(Value::as_u64)
        .filter(|t| (killed_at..=up_at).contains(t))
        .count()
        * 50;

    // The same nodes, alive under the same ids.
    poll_until(Duration::from_secs(30), "the same nodes ALIVE", || {
        (worker_node_ids(&cluster.status()) == nodes_before).then_some(())
    });

    // A new driver finds the actor by name with its state; new work runs.
    let used = scenario_result(
        &["recover-use", name],
        &cluster.driver_env(),
        Duration::from_secs(120),
    );
    assert_eq!(used["orders"], serde_json::json!([[7, true, 11]]), "{used}");
    assert_eq!(used["sum"], (0..100).sum::<u32>(), "{used}");
    ((up_at - killed_at) as f64 / 1000.0, during)
}

#[test]
fn ft8_a_killed_head_recovers_and_the_job_the_detached_actor_and_the_nodes_carry_on() {
    let cluster = ProcessCluster::three_process();
    let (outage, during) = kill_and_recover_mid_job(&cluster, "ft8", 2000, &[]);
    eprintln!(
        "FT-8: head down {outage:.2} s (SIGKILL to `start --recover` answering); {during} tasks completed meanwhile"
    );
    cluster.assert_no_panics();
}

#[test]
fn a_head_that_stays_down_fails_new_work_with_head_unavailable_not_a_hang() {
    let cluster = ProcessCluster::three_process();
    let mut env = cluster.driver_env();
    env.push(("SHOAL_HEAD_TIMEOUT", "3".into()));
    let mut job = driver(&["head-gone"], &env);
    job.wait_for("READY", Duration::from_secs(60));
    kill_head(&cluster);
    job.say("go");
    let result = job.result(Duration::from_secs(90));
    eprintln!("head gone: {result}");
    assert_eq!(result["task"], "HeadUnavailable", "{result}");
    assert_eq!(result["lookup"], "HeadUnavailable", "{result}");
}

#[test]
fn the_head_killed_between_a_write_and_its_reply_loses_nothing_acknowledged() {
    // The head exits right after the 50th commit of a key-value write,
    // before replying to it; the driver's puts wait for the recovered head.
    let mut cluster =
        ProcessCluster::with_daemon_env(&[("SHOAL_TESTING_HEAD_EXIT_AFTER_COMMITS", "kv:50")])
            .started_three(&[]);
    let job = driver(&["kv-many", "200"], &cluster.driver_env());
    let pid = head_pid(&cluster);
    poll_until(
        Duration::from_secs(60),
        "the head to exit after its commit",
        || (!shoal_integration_tests::process_alive(pid)).then_some(()),
    );
    cluster.clear_daemon_env();
    recover_head(&cluster, &[]);
    let result = job.result(Duration::from_secs(120));
    // The crash came mid-stream: the recovered head reloaded some of the
    // puts, not none and not all.
    let reloaded = cluster
        .daemon_logs()
        .iter()
        .flat_map(|(_, text)| text.lines().map(str::to_string).collect::<Vec<_>>())
        .find(|line| line.contains("head recovered its tables"))
        .map(|line| without_colours(&line))
        .and_then(|line| {
            let at = line.find("kv_entries")?;
            let digits: String = line[at..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u32>().ok()
        })
        .expect("the recovered head logs what it reloaded");
    assert!(
        (1..200).contains(&reloaded),
        "the head died mid-stream; it reloaded {reloaded} puts"
    );
    eprintln!("the head died after its 50th key-value commit; {reloaded} puts were durable, the rest were sent again");
    assert_eq!(result["acked"], 200, "{result}");
    assert_eq!(result["keys"], 200, "{result}");
    assert_eq!(result["values_ok"], true, "{result}");
    assert_eq!(result["bad_input_refused"], true, "{result}");
}

#[test]
fn ft8_with_the_tables_in_redis_another_head_takes_over_and_one_that_lost_the_store_stops() {
    let redis = RedisServer::start();
    let url = redis.url();
    let cluster = ProcessCluster::new();
    let config = cluster.write_config("fast.toml", shoal_integration_tests::hosts::FAST_CONFIG);
    let config = config.to_str().expect("utf8 path");
    cluster.start_head(&["--num-cpus", "0", "--config", config, "--head-store", &url]);
    cluster.start_node(&["--num-cpus", "2"]);
    cluster.start_node(&["--num-cpus", "2"]);

    // The first head dies mid-job; a second takes the store over once the
    // first's lease has lapsed, and everything carries on.
    let (outage, _) =
        kill_and_recover_mid_job(&cluster, "ft8-redis", 1000, &["--head-store", &url]);
    eprintln!(
        "FT-8 (Redis): head down {outage:.2} s, the second head waiting for the first's lease"
    );

    // The second head is paused past its lease; a third takes the store
    // (on another port: the paused one still holds its socket). Resumed,
    // the second finds its lease gone and stops: never two heads.
    let second = KillOnDrop(head_pid(&cluster));
    signal(second.0, Signal::SIGSTOP);
    let out = recover_head(&cluster, &["--head-store", &url, "--port", "0"]);
    assert!(out.contains("Recovered the Shoal head"), "{out}");
    signal(second.0, Signal::SIGCONT);
    poll_until(Duration::from_secs(30), "the resumed head to stop", || {
        (!shoal_integration_tests::process_alive(second.0)).then_some(())
    });
    let third = cluster.status();
    assert_eq!(third["nodes"].as_array().map(Vec::is_empty), Some(false));
    let logs: String = cluster
        .daemon_logs()
        .into_iter()
        .map(|(_, text)| text)
        .collect();
    assert!(
        logs.contains("the head store failed; the head stops"),
        "the resumed head says why it stopped"
    );
}
