//! Prometheus metrics on the head and every node: the text `promtool`
//! accepts, values that follow what the cluster did, ports that several
//! daemons on one host can share, and a real Prometheus scraping a live
//! cluster.

use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::prometheus::{http_get, http_raw, promtool_check, sample, Prometheus};
use shoal_integration_tests::{poll_until, ProcessCluster};

/// Each node's metrics address from `shoal status --json` (null if none).
fn metrics_addresses(cluster: &ProcessCluster) -> Vec<(bool, Option<String>)> {
    cluster.status()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["is_head_node"] == true,
                n["metrics_address"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("scraping");
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn every_daemon_serves_metrics_that_promtool_accepts_and_that_follow_the_cluster() {
    let cluster = ProcessCluster::three_process();
    let addresses = metrics_addresses(&cluster);
    assert_eq!(addresses.len(), 3);
    let head = addresses
        .iter()
        .find(|(head, _)| *head)
        .and_then(|(_, a)| a.clone())
        .expect("the head serves metrics");
    let mut all: Vec<String> = addresses.iter().filter_map(|(_, a)| a.clone()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "one address per daemon: {addresses:?}");

    // A node asked for the head's port (taken) serves on a free one; a
    // node with --metrics-port 0 serves none.
    let head_port = head.rsplit(':').next().expect("port").to_string();
    cluster.start_node(&["--num-cpus", "0", "--metrics-port", &head_port]);
    cluster.start_node(&["--num-cpus", "0", "--metrics-port", "0"]);
    let addresses = metrics_addresses(&cluster);
    assert_eq!(addresses.len(), 5);
    let served: Vec<&String> = addresses.iter().filter_map(|(_, a)| a.as_ref()).collect();
    assert_eq!(
        served.len(),
        4,
        "the node with port 0 serves none: {addresses:?}"
    );
    let mut unique = served.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        4,
        "the fallback took a free port: {addresses:?}"
    );

    // Work to count: tasks (one retried), actor calls, with task events on.
    cluster.run_observed_job(20);

    let text = poll_until(Duration::from_secs(30), "the head's task counts", || {
        let text = scrape(&head);
        let finished = sample(&text, r#"shoal_tasks{state="FINISHED"}"#)?;
        (finished >= 24.0).then_some(text)
    });
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool on the head's metrics: {e}\n{text}"));
    assert!(
        sample(&text, r#"shoal_tasks{state="FAILED"}"#) >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "shoal_task_duration_seconds_count") >= Some(24.0),
        "{text}"
    );
    assert!(
        sample(&text, "shoal_leases_granted_total") >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "shoal_lease_latency_seconds_count") >= Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"shoal_nodes{state="ALIVE"}"#),
        Some(5.0),
        "{text}"
    );
    // The job's actor: alive, or dead with its job by now.
    let actors = [
        r#"shoal_actors{state="ALIVE"}"#,
        r#"shoal_actors{state="DEAD"}"#,
    ]
    .iter()
    .filter_map(|s| sample(&text, s))
    .sum::<f64>();
    assert!(actors >= 1.0, "{text}");
    assert!(
        sample(&text, "shoal_head_heartbeats_total") > Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "shoal_head_handshakes_refused_total").is_some(),
        "{text}"
    );
    // The head's own node's metrics come with the head's.
    assert!(
        sample(&text, "shoal_object_store_capacity_bytes") > Some(0.0),
        "{text}"
    );

    for addr in served {
        let text = scrape(addr);
        promtool_check(&text).unwrap_or_else(|e| panic!("promtool on {addr}: {e}\n{text}"));
        for series in [
            "shoal_object_store_used_bytes",
            "shoal_object_spilled_bytes_total",
            "shoal_object_restored_bytes_total",
            "shoal_object_pulls_total",
            "shoal_object_pulled_bytes_total",
            "shoal_workers",
        ] {
            assert!(
                sample(&text, series).is_some(),
                "{series} on {addr}:\n{text}"
            );
        }
        assert!(
            sample(&text, "shoal_node_heartbeats_total") > Some(0.0),
            "{addr}:\n{text}"
        );
    }

    // Bad requests are refused and the endpoint goes on serving.
    let (status, _) = http_get(&head, "/nothing-here").expect("get");
    assert_eq!(status, 404);
    let (status, _) = http_raw(&head, b"\x16\x03\x01 not http\r\n\r\n").expect("raw");
    assert_eq!(status, 400);
    let (status, _) = http_raw(
        &head,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .expect("raw");
    assert_eq!(status, 405);
    scrape(&head);
    cluster.assert_no_panics();
}

#[test]
fn a_real_prometheus_scrapes_a_live_cluster() {
    let cluster = ProcessCluster::three_process();
    let targets: Vec<String> = metrics_addresses(&cluster)
        .into_iter()
        .filter_map(|(_, a)| a)
        .collect();
    assert_eq!(targets.len(), 3);
    let prometheus = Prometheus::start(&targets);
    // Every target is up, and the head's count of live nodes reads back.
    let up = poll_until(
        Duration::from_secs(60),
        "prometheus to scrape all three",
        || {
            let reply = prometheus.query("sum(up)");
            let value = reply["data"]["result"][0]["value"][1].as_str()?.to_string();
            (value == "3").then_some(reply)
        },
    );
    assert_eq!(up["status"], "success", "{up}");
    let nodes: Value = prometheus.query(r#"shoal_nodes{state="ALIVE"}"#);
    let result = nodes["data"]["result"].as_array().expect("result");
    assert_eq!(result.len(), 1, "one series, from the head: {nodes}");
    assert_eq!(result[0]["value"][1], "3", "{nodes}");
    let heartbeats = prometheus.query("shoal_node_heartbeats_total");
    assert_eq!(
        heartbeats["data"]["result"].as_array().map(Vec::len),
        Some(3),
        "a series per node daemon: {heartbeats}"
    );
}
