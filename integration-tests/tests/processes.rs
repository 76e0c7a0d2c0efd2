//! The cluster as real processes: `shoal start --head`, two `shoal start
//! --address` daemons, `shoal status --json`, SIGKILL, `shoal stop`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_integration_tests::{driver, poll_until, process_alive, signal, ProcessCluster};

/// Fast failure detection so the tests take seconds.
const CONFIG: &str = r#"
[timeouts]
heartbeat_interval = "200ms"
node_timeout = "2s"
"#;
const NODE_TIMEOUT: Duration = Duration::from_secs(2);

fn cpu(node: &Value) -> f64 {
    node["resources_total"]["CPU"].as_f64().expect("CPU total")
}

#[test]
fn three_processes_form_a_cluster_whose_resources_sum() {
    let cluster = ProcessCluster::new();
    let config = cluster.write_config("fast.toml", CONFIG);
    let config = config.to_str().expect("utf8 path");
    cluster.start_head(&["--num-cpus", "1", "--config", config]);
    let a = cluster.start_node(&["--num-cpus", "2", "--num-gpus", "1"]);
    let b = cluster.start_node(&[
        "--num-cpus",
        "3",
        "--num-gpus",
        "2",
        "--resources",
        r#"{"disk": 0.5}"#,
    ]);
    let status = cluster.status();
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{status:#}");
    for node in nodes {
        assert_eq!(node["state"], "ALIVE", "{node:#}");
        assert!(node["node_id"].as_str().is_some_and(|s| s.len() == 32));
        assert!(node["address"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")));
        assert_eq!(
            node["resources_total"], node["resources_available"],
            "nothing runs yet"
        );
    }
    assert_eq!(status["cluster_id"].as_str().map(str::len), Some(32));
    assert_eq!(nodes.iter().map(cpu).sum::<f64>(), 6.0);
    let gpus: f64 = nodes
        .iter()
        .filter_map(|n| n["resources_total"]["GPU"].as_f64())
        .sum();
    assert_eq!(gpus, 3.0);
    assert!(ProcessCluster::node_by_pid(&status, a, "ALIVE").is_some());
    assert!(ProcessCluster::node_by_pid(&status, b, "ALIVE").is_some());
    // The pids are the daemons', and they are three processes.
    let pids = ProcessCluster::pids(&status);
    assert_eq!(
        pids.iter().collect::<std::collections::HashSet<_>>().len(),
        3
    );
    // The human form shows the same cluster.
    let human = cluster.shoal_ok(&["status"]);
    assert!(human.contains("3 node(s) alive"), "{human}");
    assert!(human.contains("CPU          0/6"), "{human}");
    cluster.shoal_ok(&["stop"]);
    cluster.assert_no_panics();
}

#[test]
fn sigkilled_node_is_dead_within_the_bound_and_rejoins_as_a_new_node() {
    let cluster = ProcessCluster::new();
    let config = cluster.write_config("fast.toml", CONFIG);
    let config = config.to_str().expect("utf8 path");
    cluster.start_head(&["--num-cpus", "0", "--config", config]);
    let victim = cluster.start_node(&["--num-cpus", "2"]);
    cluster.start_node(&["--num-cpus", "2"]);
    let before = cluster.status();
    let old_id = ProcessCluster::node_by_pid(&before, victim, "ALIVE").expect("victim alive")
        ["node_id"]
        .clone();

    signal(victim, Signal::SIGKILL);
    let killed_at = Instant::now();
    // Bound: the timeout, plus the detector's tick (a tenth of it), plus
    // slack for a loaded machine.
    let dead = poll_until(NODE_TIMEOUT * 4, "the killed node to be DEAD", || {
        ProcessCluster::node_by_pid(&cluster.status(), victim, "DEAD")
    });
    let took = killed_at.elapsed();
    assert!(
        took >= NODE_TIMEOUT.mul_f32(0.8),
        "declared dead too early: {took:?}"
    );
    assert_eq!(dead["node_id"], old_id);
    assert_eq!(
        dead["resources_available"].as_object().map(|m| m.len()),
        Some(0)
    );

    let again = cluster.start_node(&["--num-cpus", "2"]);
    let status = cluster.status();
    let new = ProcessCluster::node_by_pid(&status, again, "ALIVE").expect("restarted node alive");
    assert_ne!(
        new["node_id"], old_id,
        "a restarted daemon joins as a new node"
    );
    let alive = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["state"] == "ALIVE")
        .count();
    assert_eq!(alive, 3);
    cluster.shoal_ok(&["stop"]);
    cluster.assert_no_panics();
}

#[test]
fn stop_leaves_no_shoal_process_running() {
    let cluster = ProcessCluster::new();
    cluster.start_head(&["--num-cpus", "1"]);
    cluster.start_node(&["--num-cpus", "1"]);
    cluster.start_node(&["--num-cpus", "1"]);
    let pids = ProcessCluster::pids(&cluster.status());
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| process_alive(*p)));
    let out = cluster.shoal_ok(&["stop"]);
    assert!(out.contains("Stopped 3"), "{out}");
    for pid in &pids {
        assert!(
            !process_alive(*pid),
            "pid {pid} still running after shoal stop"
        );
    }
    // Stopping again finds nothing, and says so.
    let out = cluster.shoal_ok(&["stop"]);
    assert!(out.contains("No Shoal daemons"), "{out}");
    cluster.assert_no_panics();
}

#[test]
fn a_sigstopped_daemon_is_killed_by_stop_after_the_grace_period() {
    let cluster = ProcessCluster::new();
    cluster.start_head(&["--num-cpus", "1"]);
    let node = cluster.start_node(&["--num-cpus", "1"]);
    signal(node, Signal::SIGSTOP);
    let out = cluster.shoal(&["stop", "--grace", "500ms"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGKILL"));
    assert!(!process_alive(node));
}

#[test]
fn join_without_a_token_anywhere_fails_with_a_clear_message() {
    let cluster = ProcessCluster::new();
    // No head on this root: no session directory, no token.
    let out = cluster.shoal(&["start", "--address", "127.0.0.1:9", "--num-cpus", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no join token") || err.contains("token"),
        "{err}"
    );
}

/// The session directories under `root`, sorted.
fn sessions(root: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .expect("the session root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("session_") && n != "session_latest")
        .collect();
    names.sort();
    names
}

#[test]
fn a_failed_start_leaves_the_session_root_as_it_found_it() {
    // A node start that fails in a fresh root leaves no session behind.
    let fresh = ProcessCluster::new();
    let out = fresh.shoal(&["start", "--address", "127.0.0.1:9", "--num-cpus", "1"]);
    assert!(!out.status.success());
    assert_eq!(sessions(fresh.root()), Vec::<String>::new());
    assert!(!fresh.root().join("session_latest").exists());

    // A second head on the port in use fails, and the first cluster is
    // still the one the CLI finds.
    let cluster = ProcessCluster::new();
    let address = cluster.start_head(&["--num-cpus", "0"]);
    let before = sessions(cluster.root());
    let latest = std::fs::canonicalize(cluster.root().join("session_latest")).expect("latest");
    let port = address.rsplit_once(':').expect("host:port").1;
    let out = cluster.shoal(&["start", "--head", "--port", port, "--node-ip", "127.0.0.1"]);
    assert!(!out.status.success(), "the port is taken");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "it says why: {err}");
    assert_eq!(sessions(cluster.root()), before, "no session left behind");
    assert_eq!(
        std::fs::canonicalize(cluster.root().join("session_latest")).expect("latest"),
        latest,
        "session_latest still names the running cluster"
    );
    cluster.shoal_ok(&["list", "actors"]);
    cluster.shoal_ok(&["stop"]);
}

#[test]
fn a_node_with_a_wrong_token_is_refused_and_start_reports_it() {
    let cluster = ProcessCluster::new();
    cluster.start_head(&["--num-cpus", "1"]);
    let address = cluster.head_address();
    let mut wrong = cluster.token();
    let last = wrong.pop().expect("token not empty");
    wrong.push(if last == '0' { '1' } else { '0' });
    // The daemon keeps retrying (a head may come back), so `start` gives up
    // at its readiness deadline; use --block in a child we bound instead.
    let mut child = std::process::Command::new(shoal_integration_tests::shoal_bin())
        .args([
            "start",
            "--address",
            &address,
            "--token",
            &wrong,
            "--num-cpus",
            "1",
            "--block",
            "--session-dir",
        ])
        .arg(cluster.root())
        .env("SHOAL_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // What the daemon logs, read as it comes: the head counts the refusal
    // before the daemon has read why, so the daemon is stopped only once
    // it has said it (or the deadline has passed).
    let logged = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let logged = std::sync::Arc::clone(&logged);
        let mut stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut text) = logged.lock() {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        })
    };
    let said = |text: &std::sync::Mutex<String>| {
        text.lock()
            .map(|t| t.contains("bad join token"))
            .unwrap_or(false)
    };
    let status = poll_until(
        Duration::from_secs(20),
        "the head to count the refusal",
        || {
            let status = cluster.status();
            (status["handshakes_refused"].as_u64() >= Some(1)).then_some(status)
        },
    );
    assert_eq!(
        status["nodes"].as_array().map(Vec::len),
        Some(1),
        "the impostor never joined"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !said(&logged) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let err = logged.lock().map(|t| t.clone()).unwrap_or_default();
    assert!(err.contains("bad join token"), "the daemon says why: {err}");
    cluster.shoal_ok(&["stop"]);
}

#[test]
fn bad_flags_are_rejected_with_a_message() {
    let cluster = ProcessCluster::new();
    for (args, needle) in [
        (vec!["start"], "required"),
        (
            vec!["start", "--head", "--address", "1.2.3.4:5"],
            "cannot be used",
        ),
        (vec!["start", "--head", "--resources", "{not json"], "JSON"),
        (
            vec!["start", "--head", "--resources", r#"{"CPU": 4}"#],
            "--num-cpus",
        ),
        (
            vec!["start", "--head", "--resources", r#"{"disk": -1}"#],
            "negative",
        ),
        (
            vec!["start", "--head", "--resources", r#"{"GPU": 1}"#],
            "--num-gpus",
        ),
        (vec!["start", "--head", "--num-gpus", "5000"], "1024"),
        (
            vec!["start", "--head", "--labels", r#"{"zone": "a,b"}"#],
            "label value",
        ),
        (
            vec![
                "start",
                "--head",
                "--labels",
                r#"{"shoal.io/node-id": "x"}"#,
            ],
            "set by Shoal",
        ),
        (vec!["start", "--head", "--num-cpus", "-2"], "num-cpus"),
        (
            vec!["start", "--head", "--head-store", "http://127.0.0.1:6379"],
            "redis://",
        ),
        (
            vec!["start", "--head", "--head-store", "redis://nohost"],
            "HOST:PORT",
        ),
        (vec!["start", "--head", "--recover"], "no session"),
        (
            vec!["start", "--address", "1.2.3.4:5", "--recover"],
            "goes with --head",
        ),
        (
            vec!["start", "--address", "1.2.3.4:5", "--port", "7"],
            "goes with --head",
        ),
        (
            vec!["start", "--address", "1.2.3.4:5", "--dashboard-port", "80"],
            "goes with --head",
        ),
        (
            vec!["start", "--head", "--metrics-port", "70000"],
            "metrics-port",
        ),
        (vec!["list", "tasks", "--limit", "0"], "limit"),
        (vec!["list", "tasks", "--limit", "10001"], "limit"),
        (vec!["list", "tasks", "--filter", "state"], "key=value"),
        (vec!["list", "tasks", "--filter", "=x"], "no key"),
        (vec!["list", "spaceships"], "invalid value"),
        (vec!["summary", "nodes"], "invalid value"),
        (vec!["get", "task"], "required"),
        (vec!["timeline", "--limit", "0"], "limit"),
        (vec!["logs", "head.log"], "--node"),
        (
            vec!["logs", "--actor", "a", "--task", "b"],
            "cannot be used",
        ),
        (
            vec![
                "start",
                "--address",
                "127.0.0.1:1",
                "--token",
                "nonsense",
                "--block",
            ],
            "token",
        ),
        (
            vec![
                "status",
                "--address",
                "127.0.0.1:9",
                "--token",
                "shoal1.zz.zz",
            ],
            "token",
        ),
    ] {
        let out = cluster.shoal(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
    }
    let bad = cluster.write_config("bad.toml", "[head]\nprot = 1\n");
    let out = cluster.shoal(&["start", "--head", "--config", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prot"));
}

#[test]
fn a_real_head_refuses_bad_peers_and_keeps_its_nodes() {
    use shoal_integration_tests::raw;
    use shoal_proto::{HandshakeRefusal, HelloReply};
    let cluster = ProcessCluster::new();
    let config = cluster.write_config("fast.toml", CONFIG);
    cluster.start_head(&[
        "--num-cpus",
        "1",
        "--config",
        config.to_str().expect("utf8"),
    ]);
    cluster.start_node(&["--num-cpus", "1"]);
    cluster.start_node(&["--num-cpus", "1"]);
    let addr: std::net::SocketAddr = cluster.head_address().parse().expect("address");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let huge = raw::send_handshake_bytes(addr, &[0xff, 0xff, 0xff, 0xff, 0]).await;
        assert!(
            matches!(
                huge,
                Ok(HelloReply::Refused(HandshakeRefusal::Malformed(_)))
            ),
            "{huge:?}"
        );
        let junk = raw::send_handshake_bytes(addr, &[0, 0, 0, 8, 0xc1, 1, 2, 3, 4, 5, 6, 7]).await;
        assert!(
            matches!(
                junk,
                Ok(HelloReply::Refused(HandshakeRefusal::Malformed(_)))
            ),
            "{junk:?}"
        );
    });
    let wrong = format!("shoal1.{}.{}", "0".repeat(32), "ab".repeat(32));
    let out = cluster.shoal(&["status", "--address", &addr.to_string(), "--token", &wrong]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster id mismatch"), "{err}");
    // The driver token reads the cluster but cannot start a node (said
    // before any daemon starts; the head would refuse its handshake too).
    let driver: shoal_net::JoinToken = cluster.token().parse().expect("token");
    let driver = driver.driver_token().to_string();
    let addr = addr.to_string();
    cluster.shoal_ok(&["status", "--address", &addr, "--token", &driver]);
    let out = cluster.shoal(&["start", "--address", &addr, "--token", &driver]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("driver token"), "{err}");
    // Past several heartbeat timeouts' worth of attacks, the nodes are alive.
    let status = cluster.status();
    let states: Vec<_> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["state"].clone())
        .collect();
    assert_eq!(states, vec!["ALIVE", "ALIVE", "ALIVE"]);
    assert!(
        status["handshakes_refused"].as_u64() >= Some(3),
        "{status:#}"
    );
    cluster.shoal_ok(&["stop"]);
    cluster.assert_no_panics();
}

#[test]
fn the_local_cluster_example_runs() {
    let bin = shoal_integration_tests::shoal_bin().with_file_name("local_cluster");
    assert!(
        bin.exists(),
        "{} not built (cargo build --workspace)",
        bin.display()
    );
    let out = std::process::Command::new(bin)
        .output()
        .expect("run example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("declared dead after"), "{stdout}");
    assert!(stdout.contains("replacement joined as node"), "{stdout}");
    // Three live nodes and one dead in the final listing.
    let tail = stdout
        .rsplit("replacement joined")
        .next()
        .unwrap_or_default();
    assert_eq!(tail.matches("ALIVE").count(), 3, "{stdout}");
    assert_eq!(tail.matches("DEAD").count(), 1, "{stdout}");
}

#[test]
fn a_node_declared_dead_is_fenced_its_actor_lives_once_and_its_late_reply_is_rejected() {
    // FT-10 on one host. Two nodes offering one `spot` each; the actor takes
    // one, so its restart goes to the other node.
    let cluster = ProcessCluster::new();
    let config = cluster.write_config("fast.toml", CONFIG);
    let config = config.to_str().expect("utf8 path");
    cluster.start_head(&["--num-cpus", "0", "--config", config]);
    for _ in 0..2 {
        cluster.start_node(&["--num-cpus", "2", "--resources", r#"{"spot": 1}"#]);
    }
    let mut driver = driver(&["fence"], &cluster.driver_env());
    let line = driver.wait_for("ACTOR ", Duration::from_secs(120));
    let mut words = line.split_whitespace();
    let (node_id, old_pid) = (
        words.next().expect("node id").to_string(),
        words
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .expect("pid"),
    );
    let daemon = cluster.status()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node_id"] == node_id.as_str())
        .and_then(|n| n["pid"].as_u64())
        .unwrap_or_else(|| panic!("no node {node_id}")) as u32;
    // The daemon stops; its worker (the actor, busy with the slow call)
    // does not.
    signal(daemon, Signal::SIGSTOP);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        driver.result_line(Duration::from_secs(120))
    }));
    let out = result.unwrap_or_else(|e| {
        signal(daemon, Signal::SIGCONT);
        std::panic::resume_unwind(e)
    });
    assert_ne!(
        out["new_node"], out["old_node"],
        "restarted elsewhere: {out}"
    );
    assert_ne!(out["new_pid"], out["old_pid"], "{out}");
    assert_eq!(
        out["slow_answered_by_new"], true,
        "the call in flight was answered by the new incarnation, not the fenced one: {out}"
    );
    // Back from SIGSTOP while the job still runs, the daemon learns it was
    // declared dead: it stops the old actor's worker before it rejoins, as
    // a new node.
    assert!(process_alive(old_pid), "the old instance ran on meanwhile");
    signal(daemon, Signal::SIGCONT);
    poll_until(
        Duration::from_secs(30),
        "the fenced node's worker to be gone",
        || (!process_alive(old_pid)).then_some(()),
    );
    let rejoined = poll_until(Duration::from_secs(30), "the daemon to rejoin", || {
        ProcessCluster::node_by_pid(&cluster.status(), daemon, "ALIVE")
    });
    assert_ne!(rejoined["node_id"], node_id.as_str(), "a new node id");
    let status = cluster.status();
    let alive: Vec<&Value> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["state"] == "ALIVE")
        .collect();
    assert_eq!(alive.len(), 3, "the fenced node counted once: {status:#}");
    assert_eq!(alive.iter().map(|n| cpu(n)).sum::<f64>(), 4.0, "{status:#}");
    driver.say("go");
    cluster.assert_no_panics();
}
