//! Every example program, in local mode and against a head and two node
//! daemons as processes. Each example checks its own result and fails
//! otherwise; these tests also check what it prints.

use std::time::Duration;

use shoal_integration_tests::{run_driver, sibling_bin, ProcessCluster};

const DEADLINE: Duration = Duration::from_secs(300);

fn run(name: &str, args: &[&str], env: &[(&str, String)]) -> String {
    run_driver(&sibling_bin(name), args, env, DEADLINE)
}

fn check(name: &str, out: &str) {
    let expect = match name {
        "pi" => "pi ≈ 3.1",
        "wordcount" => "matches the sequential count",
        "fanout" => "64 leaves, 85 tasks",
        "hybrid" => "all results check out",
        "quickstart" => "fetch(0) failed as expected",
        "counter" => "final value 115",
        "parameter_server" => "loss below 0.01",
        "pipeline" => "pipeline result matches",
        other => panic!("no expectation for {other}"),
    };
    assert!(out.contains(expect), "{name} printed:\n{out}");
}

const EXAMPLES: &[(&str, &[&str])] = &[
    ("pi", &["50", "100000"]),
    ("wordcount", &["--mappers", "8", "--reducers", "3"]),
    ("fanout", &["3", "4"]),
    ("hybrid", &[]),
    ("quickstart", &[]),
    ("counter", &[]),
    ("parameter_server", &["4", "40"]),
    ("pipeline", &["30"]),
];

#[test]
fn every_example_runs_in_local_mode() {
    for (name, args) in EXAMPLES {
        check(name, &run(name, args, &[]));
    }
}

#[test]
fn every_example_runs_in_local_mode_with_worker_processes() {
    let env = [("SHOAL_WORKER_PROCESSES", "1".to_string())];
    for (name, args) in EXAMPLES {
        check(name, &run(name, args, &env));
    }
}

#[test]
fn every_example_runs_on_a_three_process_cluster() {
    let cluster = ProcessCluster::three_process();
    for (name, args) in EXAMPLES {
        check(name, &run(name, args, &cluster.driver_env()));
    }
    cluster.assert_no_panics();
}

/// The measuring programs refuse arguments they cannot read, saying how to
/// call them, instead of running with a default in their place.
#[test]
fn bench_programs_refuse_arguments_they_cannot_read() {
    for (name, args) in [
        ("bench_actors", &["proccesses"][..]),
        ("bench_actors", &["threads", "1e4"][..]),
        ("bench_heartbeats", &["ten"][..]),
    ] {
        let out = std::process::Command::new(sibling_bin(name))
            .args(args)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} {args:?} ran: {stderr}");
        assert!(stderr.contains("usage: "), "{name} {args:?}: {stderr}");
    }
}
