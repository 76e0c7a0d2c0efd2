//! Seeing the cluster: task events, the state API (`shoal list | get |
//! summary`) and `shoal timeline`, against a head and two node daemons as
//! processes. Task events are off by default (see `Config::task_events`):
//! the driver turns them on.

use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::{poll_until, ProcessCluster};

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn field<'a>(row: &'a Value, key: &str) -> &'a Value {
    &row[key]
}

#[test]
fn tasks_and_calls_are_listed_filtered_summarized_and_drawn() {
    let cluster = ProcessCluster::three_process();
    let out = cluster.run_observed_job(20);
    assert_eq!(out["failed_ok"], false, "{out}");
    assert_eq!(out["retried_value"], 7, "{out}");
    let failed_task = out["failed_task"].as_str().expect("id").to_string();
    let retried_task = out["retried_task"].as_str().expect("id").to_string();
    let call_task = out["call_task"].as_str().expect("id").to_string();

    // Events reach the head within about a second of happening (and the
    // driver sends what is left when it ends).
    let tasks = poll_until(Duration::from_secs(30), "every task to be listed", || {
        let listed =
            json(&cluster.shoal_ok(&["list", "tasks", "--json", "--detail", "--limit", "1000"]));
        let rows = listed.as_array()?.clone();
        let said = rows
            .iter()
            .filter(|t| t["name"] == "scenarios::say" && t["state"] == "FINISHED")
            .count();
        let calls = rows
            .iter()
            .filter(|t| t["type"] == "ACTOR_TASK" && t["state"] == "FINISHED")
            .count();
        (said == 20 && calls == 3).then_some(rows)
    });
    let by_id = |id: &str| {
        tasks
            .iter()
            .find(|t| t["task_id"] == id)
            .unwrap_or_else(|| panic!("task {id} is not listed: {tasks:#?}"))
    };
    // A finished task: where it ran, when, and its states in order (with
    // no reference among its arguments it waits for a lease at once).
    let said = tasks
        .iter()
        .find(|t| t["name"] == "scenarios::say")
        .expect("say");
    for key in ["node_id", "worker_id", "job_id", "owner_id"] {
        assert!(field(said, key).is_string(), "{key} of {said:#}");
    }
    let (start, end) = (said["start_time_us"].as_i64(), said["end_time_us"].as_i64());
    assert!(
        matches!((start, end), (Some(s), Some(e)) if s <= e),
        "{said:#}"
    );
    let states: Vec<&str> = said["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(states, ["PENDING_LEASE", "RUNNING", "FINISHED"], "{said:#}");
    // A failed task carries its error.
    let failed = by_id(&failed_task);
    assert_eq!(failed["state"], "FAILED", "{failed:#}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("on purpose")),
        "{failed:#}"
    );
    // A retried task: its first attempt failed with its worker, the second
    // finished.
    let retried = by_id(&retried_task);
    assert_eq!(retried["state"], "FINISHED", "{retried:#}");
    assert_eq!(retried["attempt"], 1, "{retried:#}");
    let attempts: Vec<(i64, &str)> = retried["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["attempt"].as_i64().unwrap_or(-1),
                e["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(attempts.contains(&(0, "FAILED")), "{retried:#}");
    assert!(attempts.contains(&(1, "FINISHED")), "{retried:#}");
    // An actor call: its actor and where it ran.
    let call = by_id(&call_task);
    assert_eq!(call["name"], "scenarios::Recorder::record", "{call:#}");
    assert!(
        call["actor_id"].is_string() && call["worker_id"].is_string(),
        "{call:#}"
    );

    // Filters (= and !=, any case), limits and the count of the rest.
    let failed_only =
        json(&cluster.shoal_ok(&["list", "tasks", "--json", "--filter", "state=failed"]));
    let failed_only = failed_only.as_array().expect("rows");
    assert!(!failed_only.is_empty());
    assert!(
        failed_only.iter().all(|t| t["state"] == "FAILED"),
        "{failed_only:#?}"
    );
    let limited = cluster.shoal(&[
        "list",
        "tasks",
        "--json",
        "-f",
        "name!=scenarios::say",
        "-f",
        "state=finished",
        "--limit",
        "2",
    ]);
    assert!(limited.status.success());
    let rows = json(&String::from_utf8_lossy(&limited.stdout));
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows:#}");
    assert!(rows
        .as_array()
        .expect("rows")
        .iter()
        .all(|t| t["name"] != "scenarios::say"));
    let note = String::from_utf8_lossy(&limited.stderr);
    assert!(note.contains("showing 2 of"), "{note}");
    // Without --detail, the main fields only.
    let brief = json(&cluster.shoal_ok(&["list", "tasks", "--json", "--limit", "1"]));
    assert!(
        brief[0].get("events").is_none() && brief[0].get("state").is_some(),
        "{brief:#}"
    );
    // A field that does not exist is refused, naming the ones that do.
    let bad = cluster.shoal(&["list", "tasks", "--filter", "colour=red"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("colour") && err.contains("task_id"), "{err}");
    let bad = cluster.shoal(&["list", "tasks", "--filter", "state"]);
    assert!(!bad.status.success(), "a filter without = is refused");

    // One task with every field.
    let got = cluster.shoal_ok(&["get", "task", &retried_task]);
    assert!(got.contains("FINISHED") && got.contains("events"), "{got}");
    let missing = cluster.shoal(&["get", "task", "00000000000000000000000000000000"]);
    assert!(!missing.status.success());

    // Counts by function and state.
    let summary = json(&cluster.shoal_ok(&["summary", "tasks", "--json"]));
    let say = summary
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == "scenarios::say"))
        .unwrap_or_else(|| panic!("{summary:#}"));
    assert_eq!(say["FINISHED"], 20, "{say:#}");

    // The other kinds.
    let nodes = json(&cluster.shoal_ok(&["list", "nodes", "--json"]));
    assert_eq!(nodes.as_array().map(Vec::len), Some(3), "{nodes:#}");
    assert!(nodes
        .as_array()
        .expect("nodes")
        .iter()
        .all(|n| n["state"] == "ALIVE"));
    let jobs = poll_until(
        Duration::from_secs(30),
        "the job to be listed finished",
        || {
            let jobs = json(&cluster.shoal_ok(&["list", "jobs", "--json"]));
            jobs.as_array()?
                .iter()
                .any(|j| j["state"] == "FINISHED")
                .then_some(jobs)
        },
    );
    assert!(jobs[0]["start_time_us"].is_i64(), "{jobs:#}");
    let actors = json(&cluster.shoal_ok(&[
        "list",
        "actors",
        "--json",
        "-f",
        "class=scenarios::Recorder",
    ]));
    assert!(
        actors.as_array().is_some_and(|a| !a.is_empty()),
        "{actors:#}"
    );
    cluster.shoal_ok(&["list", "workers"]);
    assert!(cluster
        .shoal_ok(&["list", "placement-groups"])
        .contains("(none)"));
    let summary = json(&cluster.shoal_ok(&["summary", "actors", "--json"]));
    assert!(
        summary.as_array().is_some_and(|a| !a.is_empty()),
        "{summary:#}"
    );

    // The timeline: Chrome trace JSON with a slice per task where it ran
    // and an arrow from its submitter.
    let file = cluster.root().join("timeline.json");
    cluster.shoal_ok(&["timeline", "-o", &file.display().to_string()]);
    let trace = json(&std::fs::read_to_string(&file).expect("the trace file"));
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    let slices: Vec<&Value> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] != "submit")
        .collect();
    assert!(slices.len() >= 24, "{} slices", slices.len());
    for slice in &slices {
        assert!(
            slice["ts"].is_i64() && slice["dur"].as_i64() > Some(0),
            "{slice}"
        );
        assert!(slice["pid"].is_u64() && slice["tid"].is_u64(), "{slice}");
    }
    let starts = events.iter().filter(|e| e["ph"] == "s").count();
    let ends = events.iter().filter(|e| e["ph"] == "f").count();
    assert!(
        starts >= 24 && starts == ends,
        "{starts} flows out, {ends} in"
    );
    let named = |what: &str| {
        events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == what)
            .count()
    };
    assert!(named("process_name") >= 2, "a node and the drivers");
    assert!(named("thread_name") >= 2);
    cluster.assert_no_panics();
}

#[test]
fn logs_are_listed_per_node_and_read_from_the_node_that_has_them() {
    let cluster = ProcessCluster::three_process();
    cluster.run_observed_job(4);

    // Every node, with its daemon's log and its workers'.
    let listing = cluster.shoal_ok(&["logs"]);
    assert_eq!(
        listing.matches("\nnode ").count() + usize::from(listing.starts_with("node ")),
        3,
        "{listing}"
    );
    assert!(
        listing.contains("head.log") && listing.contains("worker-"),
        "{listing}"
    );
    assert!(
        listing.contains(".log") && listing.contains(" node\n"),
        "{listing}"
    );

    // A task's log is its worker's: the lines it printed are there.
    let say = poll_until(
        Duration::from_secs(30),
        "a say task with its worker",
        || {
            let rows =
                json(&cluster.shoal_ok(&["list", "tasks", "--json", "-f", "name=scenarios::say"]));
            rows.as_array()?
                .iter()
                .find(|t| t["worker_id"].is_string())
                .and_then(|t| t["task_id"].as_str().map(str::to_string))
        },
    );
    let log = cluster.shoal_ok(&["logs", "--task", &say]);
    assert!(log.contains("hello from task"), "{log}");
    // The actor's and a worker's, by id.
    let actor = json(&cluster.shoal_ok(&["list", "actors", "--json", "--detail"]));
    let actor = &actor[0];
    cluster.shoal_ok(&["logs", "--actor", actor["actor_id"].as_str().expect("id")]);
    let by_worker =
        cluster.shoal_ok(&["logs", "--worker", actor["worker_id"].as_str().expect("id")]);
    let by_actor = cluster.shoal_ok(&["logs", "--actor", actor["actor_id"].as_str().expect("id")]);
    assert_eq!(by_worker, by_actor);

    // --tail N: the last N lines of a node's file.
    let head_node = cluster.status()["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["is_head_node"] == true).cloned())
        .expect("the head's node");
    let head_node = head_node["node_id"].as_str().expect("id").to_string();
    let last = cluster.shoal_ok(&["logs", "--node", &head_node, "head.log", "--tail", "2"]);
    assert_eq!(last.lines().count(), 2, "{last}");
    let whole = std::fs::read_to_string(cluster.root().join("session_latest/logs/head.log"))
        .expect("head.log");
    assert!(
        whole.ends_with(&last),
        "the tail is the file's end:\n{last}"
    );
    // A client holding the token may read a node's logs, nothing more.
    let head_address = cluster.status()["nodes"]
        .as_array()
        .and_then(|n| {
            n.iter()
                .find(|n| n["node_id"] == head_node.as_str())
                .cloned()
        })
        .and_then(|n| n["address"].as_str().map(str::to_string))
        .expect("the head node's address");
    let (listed, delete) = as_client(&cluster.token(), &head_address);
    assert!(
        matches!(listed, Ok(shoal_proto::NodeReply::Logs(ref f)) if !f.is_empty()),
        "{listed:?}"
    );
    match delete {
        Err(shoal_net::RpcError::Service(e)) => {
            assert_eq!(
                e.kind,
                shoal_proto::ServiceErrorKind::PermissionDenied,
                "{e}"
            )
        }
        other => panic!("a client deleted objects on a node: {other:?}"),
    }
    // Only listed files: no path out of the log directory.
    let escape = cluster.shoal(&["logs", "--node", &head_node, "../token"]);
    assert!(!escape.status.success());
    assert!(String::from_utf8_lossy(&escape.stderr).contains("no log file"));

    // --follow prints what is added: a node joining is logged by the head.
    let follow = std::process::Command::new(shoal_integration_tests::shoal_bin())
        .args([
            "logs", "--node", &head_node, "head.log", "--tail", "0", "--follow",
        ])
        .arg("--session-dir")
        .arg(cluster.root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("shoal logs --follow");
    // Killed when dropped.
    let mut follow = shoal_integration_tests::hosts::Driver::new(follow);
    cluster.start_node(&["--num-cpus", "0"]);
    follow.wait_containing("node registered", Duration::from_secs(30));
    drop(follow);

    // Log files carry no colour codes.
    for entry in std::fs::read_dir(cluster.root().join("session_latest/logs")).expect("logs") {
        let path = entry.expect("entry").path();
        let text = std::fs::read(&path).expect("a log");
        assert!(!text.contains(&0x1b), "{} has escape codes", path.display());
    }
}

type NodeAnswer = Result<shoal_proto::NodeReply, shoal_net::RpcError>;

/// A `ListLogs` and a `DeleteObjects` sent to the node at `address` as a
/// client holding `token`.
fn as_client(token: &str, address: &str) -> (NodeAnswer, NodeAnswer) {
    use shoal_proto::{NodeReply, NodeRequest, Role};
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let transport = shoal_net::Transport::token_client(
            shoal_net::handshake::ClientAuth {
                token: token.parse().expect("token"),
                role: Role::Client,
            },
            shoal_net::NODE_SERVER_NAME,
            shoal_net::NetLimits::default(),
        )
        .expect("transport");
        let node: shoal_net::RpcClient<NodeRequest, NodeReply> = transport
            .connect_named(address.parse().expect("addr"), shoal_net::NODE_SERVER_NAME)
            .await
            .expect("connect to the node");
        let wait = Duration::from_secs(10);
        let listed = node.call(&NodeRequest::ListLogs, wait).await;
        let delete = NodeRequest::DeleteObjects { ids: vec![] };
        let deleted = node.call(&delete, wait).await;
        node.close();
        transport.wait_idle().await;
        (listed, deleted)
    })
}
