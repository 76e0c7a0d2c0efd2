//! Every example program, in local mode and against a head and two node
//! daemons as processes. Each example checks its own result and fails
//! otherwise; these tests also check what it prints.

use std::time::Duration;

use shoal_integration_tests::{run_driver, run_driver_logged, sibling_bin, ProcessCluster};

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

/// A job that ran cleanly in local mode logs no warning, its exit
/// included (the local head stopping is no lost connection).
#[test]
fn a_clean_local_run_logs_no_warning() {
    for (name, args) in [("fanout", &["3", "4"][..]), ("counter", &[][..])] {
        let (out, logged) = run_driver_logged(&sibling_bin(name), args, &[], DEADLINE);
        check(name, &out);
        assert!(
            !logged.contains(" WARN "),
            "{name} logged a warning:\n{logged}"
        );
    }
}

/// The measuring programs refuse arguments they cannot read, saying how to
/// call them, instead of running with a default in their place.
#[test]
fn bench_programs_refuse_arguments_they_cannot_read() {
    for (name, args) in [
        ("bench_actors", &["proccesses"][..]),
        ("bench_actors", &["threads", "1e4"][..]),
        ("bench_heartbeats", &["ten"][..]),
        ("bench_shapes", &["--fib", "x"][..]),
        ("bench_wordcount", &["--mb"][..]),
        ("bench_wordcount", &["--mappers", "4", "--bogus", "1"][..]),
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

/// The job-shape benchmarks, small: nested tasks and a fan-out, and the
/// word count (which checks its job's counts against its sequential loop
/// and fails otherwise), with threads, worker processes and on a cluster.
#[test]
fn the_job_shape_benchmarks_run_small_in_every_mode() {
    let cluster = ProcessCluster::three_process();
    let modes = [
        Vec::new(),
        vec![("SHOAL_WORKER_PROCESSES", "1".to_string())],
        cluster.driver_env(),
    ];
    for env in &modes {
        let out = run(
            "bench_shapes",
            &["--fib", "6", "--fanout", "200", "--runs", "1"],
            env,
        );
        assert!(out.contains("fib(6): median"), "{out}");
        assert!(out.contains("fan-out of 200: median"), "{out}");
        let out = run(
            "bench_wordcount",
            &[
                "--mb",
                "2",
                "--mappers",
                "4",
                "--reducers",
                "2",
                "--repeat",
                "1",
            ],
            env,
        );
        let words: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split("\"words\": ").nth(1))
            .collect();
        assert_eq!(words.len(), 2, "a sequential and a Shoal line: {out}");
        assert_eq!(words[0], words[1], "{out}");
        assert!(out.contains("\"system\": \"shoal ("), "{out}");
    }
    cluster.assert_no_panics();
}
