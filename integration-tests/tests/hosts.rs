//! The cluster across hosts of its own (Docker containers on a private
//! network, see `shoal_integration_tests::hosts`): the head on one, nodes
//! on others, each started as a user would on another machine, without
//! `--node-ip`; work pinned to a host with a resource only it offers;
//! drivers on any host.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::hosts::{Hosts, HEAD_PORT};
use shoal_integration_tests::poll_until;

const DEADLINE: Duration = Duration::from_secs(240);

/// A head on host 0 offering `hostA`, nodes on hosts 1 and 2 offering
/// `hostB` and `hostC`; two CPUs each.
fn three_hosts() -> Hosts {
    let hosts = Hosts::start(&["host-a", "host-b", "host-c"]);
    hosts.start_head(0, &["--num-cpus", "2", "--resources", r#"{"hostA": 1}"#]);
    hosts.start_node(1, &["--num-cpus", "2", "--resources", r#"{"hostB": 1}"#]);
    hosts.start_node(2, &["--num-cpus", "2", "--resources", r#"{"hostC": 1}"#]);
    hosts
}

fn nodes(status: &Value) -> Vec<Value> {
    status["nodes"].as_array().cloned().unwrap_or_default()
}

/// The env of a driver whose work is made on `maker` and used on `user`.
fn placed(hosts: &Hosts, maker: &str, user: &str) -> Vec<(&'static str, String)> {
    let mut env = hosts.driver_env();
    env.push(("PLACE", "1".into()));
    env.push(("MAKER_RESOURCE", maker.into()));
    env.push(("USER_RESOURCE", user.into()));
    env
}

#[test]
fn every_address_a_host_hands_out_is_its_own_ip_not_loopback() {
    let hosts = three_hosts();
    let head = hosts.head_address();
    assert_eq!(
        head,
        format!("{}:{HEAD_PORT}", hosts.host(0).ip),
        "a head started without --node-ip advertises its host's IP"
    );
    let status = hosts.status();
    let all = nodes(&status);
    assert_eq!(all.len(), 3, "{status:#}");
    let mut host_ids = BTreeSet::new();
    for (i, name) in ["host-a", "host-b", "host-c"].iter().enumerate() {
        let node = all
            .iter()
            .find(|n| n["hostname"] == *name)
            .unwrap_or_else(|| panic!("no node on {name}: {status:#}"));
        let address = node["address"].as_str().expect("an address");
        assert!(
            address.starts_with(&format!("{}:", hosts.host(i).ip)),
            "the node on {name} advertises {address}, not its host's IP {}",
            hosts.host(i).ip
        );
        assert_eq!(node["state"], "ALIVE");
        host_ids.insert(node["host_id"].as_str().expect("a host id").to_string());
    }
    assert_eq!(
        host_ids.len(),
        3,
        "each host has its own identity: {status:#}"
    );
    hosts.assert_no_panics();
}

#[test]
fn a_large_result_crosses_hosts_both_ways_and_reaches_a_driver_on_a_third() {
    let hosts = three_hosts();
    // Made on the head's host, used on B, read by a driver on C; then the
    // other way round, with the driver on the head's host.
    for (driver, maker, user) in [
        (2, "hostA", "hostB"),
        (0, "hostB", "hostA"),
        (1, "hostC", "hostA"),
    ] {
        let out = hosts.scenario(
            driver,
            &["big-object", "20"],
            &placed(&hosts, maker, user),
            DEADLINE,
        );
        assert_eq!(out["identical"], true, "{maker} -> {user}: {out}");
        assert_eq!(
            out["driver_copy_identical"], true,
            "the driver on host {driver} reads the result made on {maker}: {out}"
        );
        assert_eq!(out["len"], 20 << 20);
    }
    hosts.assert_no_panics();
}

#[test]
fn a_driver_on_another_host_creates_and_calls_an_actor_on_the_heads_host() {
    let hosts = three_hosts();
    let out = hosts.scenario(
        1,
        &["actor-placed"],
        &placed(&hosts, "hostA", "hostC"),
        DEADLINE,
    );
    assert_eq!(out["actor_host"], "host-a", "{out}");
    assert_eq!(out["task_host"], "host-c", "{out}");
    assert_eq!(out["driver_host"], "host-b", "{out}");
    assert_eq!(out["totals"], serde_json::json!([1, 11, 111]), "{out}");
    // A driver on the head's host that reaches the head on loopback still
    // hands out its host's IP: a worker on C gets it as the driver's
    // address, and the actor on B is reached.
    let mut env = placed(&hosts, "hostB", "hostC");
    env[0].1 = format!("127.0.0.1:{HEAD_PORT}");
    let out = hosts.scenario(0, &["actor-placed"], &env, DEADLINE);
    assert_eq!(out["actor_host"], "host-b", "{out}");
    assert_eq!(out["task_host"], "host-c", "{out}");
    assert_eq!(out["totals"], serde_json::json!([1, 11, 111]), "{out}");
    let driver = out["driver_address_seen_by_worker"]
        .as_str()
        .unwrap_or_default();
    assert!(
        driver.starts_with(&format!("{}:", hosts.host(0).ip)),
        "the driver advertised {driver}, not host-a's IP {}",
        hosts.host(0).ip
    );
    hosts.assert_no_panics();
}

#[test]
fn tasks_spread_over_the_hosts_and_nest() {
    let hosts = three_hosts();
    let env = hosts.driver_env();
    let out = hosts.scenario(2, &["many", "5000"], &env, DEADLINE);
    assert_eq!(out["count"], 5000, "{out}");
    assert_eq!(out["in_order"], true, "{out}");
    assert!(
        out["nodes"].as_u64() >= Some(2),
        "the tasks spread past the driver's host: {out}"
    );
    let nested = hosts.scenario(1, &["nested"], &env, DEADLINE);
    assert_eq!(nested["values"], serde_json::json!([102, 104, 106, 108]));
    // A 1 GiB-class pull made smaller: 64 MiB read by 4 tasks on another host.
    let out = hosts.scenario(
        0,
        &["transfer", "64", "4"],
        &placed(&hosts, "hostB", "hostC"),
        DEADLINE,
    );
    assert_eq!(out["identical"], true, "{out}");
    assert_eq!(out["driver_copy_identical"], true, "{out}");
    assert_eq!(
        out["listed_copies"], 2,
        "the copy on C is in the directory: {out}"
    );
    hosts.assert_no_panics();
}

#[test]
fn a_result_lost_with_its_host_is_rebuilt_on_another() {
    let hosts = Hosts::start(&["host-a", "host-b", "host-c"]);
    // The head's host runs no tasks: the results land on B or C.
    hosts.start_head(0, &["--num-cpus", "0"]);
    hosts.start_node(1, &["--num-cpus", "2"]);
    hosts.start_node(2, &["--num-cpus", "2"]);
    let mut driver = hosts.driver(0, &["lineage"], &hosts.driver_env());
    let victim = driver.wait_for("VICTIM ", DEADLINE);
    let status = hosts.status();
    let name = nodes(&status)
        .iter()
        .find(|n| n["node_id"] == victim.as_str())
        .and_then(|n| n["hostname"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no node {victim}: {status:#}"));
    let i = if name == "host-b" { 1 } else { 2 };
    hosts.stop(i);
    poll_until(
        Duration::from_secs(30),
        "the lost host's node to be DEAD",
        || {
            nodes(&hosts.status())
                .iter()
                .any(|n| n["node_id"] == victim.as_str() && n["state"] == "DEAD")
                .then_some(())
        },
    );
    driver.say("go");
    let out = driver.result(DEADLINE);
    assert_eq!(out["argument_rebuilt"], true, "{out}");
    assert_eq!(out["rebuilt_identical"], true, "{out}");
    assert_ne!(out["rebuilt_on"], out["victim"], "{out}");
    assert_eq!(
        out["lost"], true,
        "without retries the result is lost: {out}"
    );
    hosts.assert_no_panics();
}

#[test]
fn a_host_killed_frozen_or_cut_off_is_declared_dead_and_a_thawed_one_rejoins() {
    let hosts = Hosts::start(&["host-a", "host-b", "host-c", "host-d"]);
    hosts.start_head(0, &["--num-cpus", "1"]);
    for i in 1..4 {
        hosts.start_node(i, &["--num-cpus", "1"]);
    }
    let id_on = |name: &str| {
        nodes(&hosts.status())
            .iter()
            .find(|n| n["hostname"] == name && n["state"] == "ALIVE")
            .and_then(|n| n["node_id"].as_str().map(str::to_string))
    };
    let (b, c, d) = (
        id_on("host-b").expect("B alive"),
        id_on("host-c").expect("C alive"),
        id_on("host-d").expect("D alive"),
    );
    hosts.stop(1);
    hosts.freeze(2);
    hosts.cut(3);
    let dead = |id: &str| {
        nodes(&hosts.status())
            .iter()
            .any(|n| n["node_id"] == id && n["state"] == "DEAD")
    };
    poll_until(Duration::from_secs(30), "B, C and D to be DEAD", || {
        (dead(&b) && dead(&c) && dead(&d)).then_some(())
    });
    // A frozen host that wakes finds itself fenced and joins as a new node;
    // so does one whose network comes back.
    hosts.thaw(2);
    hosts.reconnect(3);
    poll_until(Duration::from_secs(60), "C and D back as new nodes", || {
        let (c2, d2) = (id_on("host-c")?, id_on("host-d")?);
        (c2 != c && d2 != d).then_some(())
    });
    hosts.assert_no_panics();
}

#[test]
fn fixed_ports_for_firewalls_are_the_ones_advertised() {
    let hosts = Hosts::start(&["host-a", "host-b"]);
    hosts.start_head(
        0,
        &[
            "--num-cpus",
            "1",
            "--resources",
            r#"{"hostA": 1}"#,
            "--node-port",
            "7200",
            "--worker-port-range",
            "7300-7309",
        ],
    );
    // B's ports from a cluster file, as cluster-config/firewalled.toml.
    let ports = hosts.write_file(
        1,
        "ports.toml",
        "[[nodes]]\nnode_port = 7201\nworker_port_range = \"7400-7409\"\n",
    );
    hosts.start_node(
        1,
        &[
            "--num-cpus",
            "1",
            "--resources",
            r#"{"hostB": 1}"#,
            "--config",
            &ports,
        ],
    );
    let status = hosts.status();
    let address_on = |name: &str| {
        nodes(&status)
            .iter()
            .find(|n| n["hostname"] == name)
            .and_then(|n| n["address"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no node on {name}: {status:#}"))
    };
    assert_eq!(address_on("host-a"), format!("{}:7200", hosts.host(0).ip));
    assert_eq!(address_on("host-b"), format!("{}:7201", hosts.host(1).ip));
    // A driver on B with a fixed port; the actor on A, the task on B.
    let mut env = placed(&hosts, "hostA", "hostB");
    env.push(("SHOAL_DRIVER_PORT", "7500".into()));
    let out = hosts.scenario(1, &["actor-placed"], &env, DEADLINE);
    let worker_on_b = hosts.scenario(
        1,
        &["actor-placed"],
        &placed(&hosts, "hostB", "hostA"),
        DEADLINE,
    );
    let port = |address: &Value| -> u16 {
        address
            .as_str()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("not an address: {address}"))
    };
    let actor = &out["actor_address"];
    assert!(
        actor
            .as_str()
            .is_some_and(|a| a.starts_with(&hosts.host(0).ip)),
        "the actor's worker is on A's IP: {out}"
    );
    assert!((7300..=7309).contains(&port(actor)), "{out}");
    assert!(
        (7400..=7409).contains(&port(&worker_on_b["actor_address"])),
        "B's workers take the file's range: {worker_on_b}"
    );
    assert_eq!(
        out["driver_address_seen_by_worker"],
        format!("{}:7500", hosts.host(1).ip),
        "{out}"
    );
    // A port the driver cannot have is a clear error, not a silent default.
    let mut bad = hosts.driver_env();
    bad.push(("SHOAL_DRIVER_PORT", "seventy".into()));
    let failed = hosts.exec(1, "/shoal/scenarios", &["many", "1"], &bad, DEADLINE);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("SHOAL_DRIVER_PORT"), "{stderr}");
    hosts.assert_no_panics();
}

#[test]
fn a_host_with_little_memory_and_shm_gets_a_store_that_fits_or_is_told_what_to_do() {
    let hosts = Hosts::start_with(&["small"], &["--memory", "3g", "--shm-size", "64m"]);
    hosts.start_head(0, &["--num-cpus", "1"]);
    let status = hosts.status();
    let node = &nodes(&status)[0];
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .expect("MemTotal");
    assert_eq!(
        node["resources_total"]["memory"].as_f64(),
        Some((3u64 << 30).min(machine) as f64),
        "memory is the container's limit: {node:#}"
    );
    let capacity = node["object_store_capacity_bytes"]
        .as_u64()
        .expect("capacity");
    assert!(
        capacity > 0 && capacity <= 64 << 20,
        "the default store fits in the 64 MiB /dev/shm: {capacity}"
    );
    // More than /dev/shm asked for: refused at start, saying what to do.
    let address = hosts.head_address();
    let out = hosts.shoal(
        0,
        &[
            "start",
            "--address",
            &address,
            "--object-store-memory",
            "1000000000",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("--shm-size"), "{text}");
    hosts.assert_no_panics();
}

#[test]
fn a_copy_on_another_host_serves_a_read_when_the_primarys_host_is_lost() {
    let hosts = three_hosts();
    // Made on B with no retries, pulled to C by a reader there; the owner
    // is a driver on the head's host.
    let env = placed(&hosts, "hostB", "hostC");
    let mut driver = hosts.driver(0, &["copy-survives", "24"], &env);
    let copies = driver.wait_for("READY ", DEADLINE);
    assert_eq!(
        copies, "2",
        "the directory lists the primary and the pulled copy"
    );
    hosts.stop(1);
    poll_until(Duration::from_secs(30), "B's node to be DEAD", || {
        nodes(&hosts.status())
            .iter()
            .any(|n| n["hostname"] == "host-b" && n["state"] == "DEAD")
            .then_some(())
    });
    driver.say("go");
    let out = driver.result(DEADLINE);
    assert_eq!(out["identical"], true, "read from the copy on C: {out}");
    hosts.assert_no_panics();
}
