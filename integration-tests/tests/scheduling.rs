//! Placement on a cluster of hosts of its own (Docker containers, see
//! `shoal_integration_tests::hosts`): a head that runs no tasks and three
//! nodes of two CPUs, one of them labelled `zone=gpu` with `--num-gpus 2`
//! (no GPU needed: the devices are numbers handed to workers). A driver
//! uses each scheduling option and reports where its tasks ran (the
//! `scheduling` scenario).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::hosts::Hosts;
use shoal_integration_tests::poll_until;

const DEADLINE: Duration = Duration::from_secs(240);

/// The node on host `hostname`, as `shoal status --json` shows it.
fn node_on<'a>(status: &'a Value, hostname: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["hostname"] == hostname))
        .unwrap_or_else(|| panic!("no node on {hostname}: {status:#}"))
}

fn id(node: &Value) -> String {
    node["node_id"].as_str().expect("a node id").to_string()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn strategies_labels_gpus_and_locality_place_tasks_where_asked() {
    let hosts = Hosts::start(&["host-h", "host-a", "host-b", "host-g"]);
    hosts.start_head(0, &["--num-cpus", "0"]);
    hosts.start_node(1, &["--num-cpus", "2"]);
    hosts.start_node(2, &["--num-cpus", "2"]);
    hosts.start_node(
        3,
        &[
            "--num-cpus",
            "2",
            "--num-gpus",
            "2",
            "--labels",
            r#"{"zone": "gpu"}"#,
        ],
    );
    let status = poll_until(DEADLINE, "four nodes", || {
        let status = hosts.status();
        (status["nodes"].as_array().map_or(0, Vec::len) == 4).then_some(status)
    });
    let (a, b, g) = (
        id(node_on(&status, "host-a")),
        id(node_on(&status, "host-b")),
        id(node_on(&status, "host-g")),
    );
    let gpu_node = node_on(&status, "host-g");
    assert_eq!(gpu_node["labels"]["zone"], "gpu", "{gpu_node:#}");
    assert_eq!(gpu_node["labels"]["shoal.io/hostname"], "host-g");
    assert_eq!(gpu_node["labels"]["shoal.io/node-id"], g.as_str());
    assert_eq!(gpu_node["resources_total"]["GPU"], 2.0);
    assert!(node_on(&status, "host-a")["resources_total"]["GPU"].is_null());
    let human = hosts.shoal_ok(0, &["status"]);
    assert!(
        human.contains("GPU") && human.contains("zone=gpu"),
        "{human}"
    );

    let mut env = hosts.driver_env();
    env.push(("NODE_B", b.clone()));
    env.push(("NODE_G", g.clone()));
    let mut driver = hosts.driver(0, &["scheduling"], &env);
    let line = driver.wait_for("WAITING ", DEADLINE);
    let seen: Value = serde_json::from_str(&line).expect("WAITING json");

    // SPREAD: three tasks that run at once, one on each node (packing would
    // put two on the first). Only tasks that overlap say where spreading
    // put them: later ones go wherever a CPU frees first, or reuse a
    // leased worker.
    let spread: BTreeMap<String, u64> =
        serde_json::from_value(seen["spread"].clone()).expect("as the scenario prints it");
    let hosts_of = format!("(nodes: a {a}, b {b}, g {g})");
    assert_eq!(
        spread.len(),
        3,
        "spread over every node: {spread:?} {hosts_of}"
    );
    assert!(spread.values().all(|n| *n == 1), "{spread:?} {hosts_of}");
    assert_eq!(seen["spread_met"], true, "the three ran at once: {seen:#}");
    // A hard node affinity lands every task on its node.
    assert!(strings(&seen["pinned"]).iter().all(|n| *n == b), "{seen:#}");
    // Label selectors: only matching nodes.
    assert!(
        strings(&seen["zone_gpu"]).iter().all(|n| *n == g),
        "{seen:#}"
    );
    let not_gpu = strings(&seen["not_gpu"]);
    assert!(not_gpu.iter().all(|n| *n == a || *n == b), "{seen:#}");
    assert!(
        seen["bad_selector_refused"]
            .as_bool()
            .expect("as the scenario prints it"),
        "{seen:#}"
    );
    // Two 1-GPU tasks at once see different devices; two halves share one.
    let whole = seen["whole"].as_array().expect("as the scenario prints it");
    for (node, visible, ids) in whole.iter().map(|w| (&w[0], &w[1], &w[2])) {
        assert_eq!(node, &Value::from(g.as_str()));
        assert_eq!(
            visible.as_str().expect("as the scenario prints it"),
            ids[0].to_string(),
            "CUDA_VISIBLE_DEVICES and gpu_ids agree: {seen:#}"
        );
    }
    assert_ne!(whole[0][1], whole[1][1], "distinct devices: {seen:#}");
    let halves = seen["halves"]
        .as_array()
        .expect("as the scenario prints it");
    assert_eq!(halves[0][1], halves[1][1], "one shared device: {seen:#}");
    assert_eq!(
        halves[0][2]
            .as_array()
            .expect("as the scenario prints it")
            .len(),
        1
    );
    // A task with no GPU sees none on any node.
    let no_gpu = &seen["no_gpu"];
    assert!(
        no_gpu[2]
            .as_array()
            .expect("as the scenario prints it")
            .is_empty(),
        "{seen:#}"
    );
    if no_gpu[0] == g.as_str() {
        assert_eq!(no_gpu[1], "", "the GPU node hides its devices from it");
    }
    // Locality: a task runs where its 50 MB argument is.
    for near in seen["near"].as_array().expect("as the scenario prints it") {
        assert_eq!(near["used_on"], near["made_on"], "{seen:#}");
        assert_eq!(near["len"], 50u64 << 20);
    }

    // A selector no node matches: the task waits, listed as infeasible
    // with its shape and selector.
    let listed = poll_until(DEADLINE, "the infeasible task listed", || {
        let status = hosts.status();
        let infeasible = status["infeasible"].as_array()?.clone();
        infeasible.into_iter().find(|r| {
            r["placement"]
                .as_str()
                .is_some_and(|p| p.contains("zone=in(x,y)"))
        })
    });
    assert_eq!(listed["resources"]["CPU"], 1.0, "{listed:#}");
    let human = hosts.shoal_ok(0, &["status"]);
    assert!(
        human.contains("Infeasible") && human.contains("zone=in(x,y)"),
        "{human}"
    );
    driver.say("go");
    let done = driver.result(DEADLINE);
    assert_eq!(done["nowhere_waited"], true, "{done:#}");

    // Host A dies: a soft affinity to its node runs elsewhere, a hard one
    // fails with a typed error.
    hosts.stop(1);
    poll_until(DEADLINE, "host A's node declared dead", || {
        (node_on(&hosts.status(), "host-a")["state"] == "DEAD").then_some(())
    });
    let mut env = hosts.driver_env();
    env.push(("NODE_DEAD", a.clone()));
    let dead = hosts.scenario(0, &["scheduling-dead"], &env, DEADLINE);
    let soft = dead["soft_ran_on"]
        .as_str()
        .expect("as the scenario prints it");
    assert!(soft == b || soft == g, "{dead:#}");
    let hard = dead["hard"].as_str().expect("as the scenario prints it");
    assert!(
        hard.starts_with("unschedulable") && hard.contains(&a),
        "{dead:#}"
    );
    hosts.assert_no_panics();
}

#[test]
fn placement_groups_reserve_all_or_nothing_and_follow_a_dead_node() {
    let hosts = Hosts::start(&["host-h", "host-a", "host-b", "host-c"]);
    hosts.start_head(0, &["--num-cpus", "0"]);
    for i in 1..=3 {
        hosts.start_node(i, &["--num-cpus", "2"]);
    }
    poll_until(DEADLINE, "four nodes", || {
        (hosts.status()["nodes"].as_array().map_or(0, Vec::len) == 4).then_some(())
    });
    let mut driver = hosts.driver(0, &["placement-groups"], &hosts.driver_env());
    let line = driver.wait_for("WAITING ", DEADLINE);
    let ids: Value = serde_json::from_str(&line).expect("WAITING json");
    let four = ids["four"].as_str().expect("an id").to_string();

    // Four STRICT_SPREAD bundles on three nodes: pending, listed with its
    // shape, in status and in `shoal list placement-groups`.
    let status = hosts.status();
    let groups = status["placement_groups"]
        .as_array()
        .expect("groups listed");
    let listed = groups
        .iter()
        .find(|g| g["placement_group_id"] == four.as_str())
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(listed["state"], "PENDING", "{listed:#}");
    assert_eq!(listed["infeasible"], true, "{listed:#}");
    assert_eq!(listed["strategy"], "STRICT_SPREAD");
    let human = hosts.shoal_ok(0, &["status"]);
    assert!(
        human.contains("STRICT_SPREAD") && human.contains("PENDING"),
        "{human}"
    );
    assert!(
        human.contains(&format!("placement group {four}")),
        "{human}"
    );
    let list = hosts.shoal_ok(0, &["list", "placement-groups", "--json", "--detail"]);
    assert!(list.contains(&four) && list.contains("\"four\""), "{list}");
    let in_use = |status: &Value| -> f64 {
        status["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter(|n| n["state"] == "ALIVE")
            .map(|n| {
                let cpu = |k: &str| n[k]["CPU"].as_f64().unwrap_or(0.0);
                cpu("resources_total") - cpu("resources_available")
            })
            .sum()
    };
    assert!(
        in_use(&status) >= 3.0,
        "the three bundles hold 3 CPUs: {status:#}"
    );

    // Removed: every resource comes back.
    driver.say("go");
    let placed = driver.wait_for("PLACED ", DEADLINE);
    let placed: Value = serde_json::from_str(&placed).expect("PLACED json");
    let actor_node = placed["node"].as_str().expect("a node").to_string();
    // The two groups removed gave every CPU back: what is held now is the
    // one CPU of the third group's bundle (its actor draws on the bundle).
    let status = poll_until(DEADLINE, "only the new group's CPU held", || {
        let status = hosts.status();
        (in_use(&status) == 1.0).then_some(status)
    });
    assert!(
        !status["placement_groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["placement_group_id"] == four.as_str())),
        "removed groups are not listed as live: {status:#}"
    );
    // The node holding the actor's bundle dies.
    let host = (1..=3)
        .find(|&i| {
            node_on(&status, &format!("host-{}", ["a", "b", "c"][i - 1]))["node_id"]
                == actor_node.as_str()
        })
        .expect("the actor's host");
    hosts.stop(host);
    driver.say("go");
    let done = driver.result(DEADLINE);
    assert_eq!(done["three_ready"], true, "{done:#}");
    let bundle_nodes = strings(&done["bundle_nodes"]);
    let distinct: std::collections::BTreeSet<&String> = bundle_nodes.iter().collect();
    assert_eq!(distinct.len(), 3, "one node per bundle: {done:#}");
    assert_eq!(
        strings(&done["ran_on"]),
        bundle_nodes,
        "each task in its bundle: {done:#}"
    );
    assert_eq!(done["four_ready"], false, "{done:#}");
    assert_eq!(done["found_by_name"], true, "{done:#}");
    assert_eq!(done["queued_failed"], true, "{done:#}");
    assert_eq!(done["refused_after_removal"], true, "{done:#}");
    assert_eq!(done["kept_ready"], true, "{done:#}");
    let moved = done["actor_moved_to"].as_str().expect("a node");
    assert!(!moved.is_empty() && moved != actor_node, "{done:#}");
    assert_eq!(
        done["bundle_now_on"], moved,
        "the actor restarted in its bundle: {done:#}"
    );
    // Nothing is left held but by the live group once the job is gone.
    poll_until(DEADLINE, "every CPU free after the job", || {
        (in_use(&hosts.status()) == 0.0).then_some(())
    });
    hosts.assert_no_panics();
}
