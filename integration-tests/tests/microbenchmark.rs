//! `shoal microbenchmark` as a smoke run: every metric runs (no timing is
//! asserted; benchmarks measure, tests do not).

use std::time::Duration;

use shoal_integration_tests::{run_driver, shoal_bin};

const METRICS: &[&str] = &[
    "single client get calls (Plasma Store)",
    "single client put calls (Plasma Store)",
    "multi client put calls (Plasma Store)",
    "single client put gigabytes",
    "single client tasks and get batch",
    "multi client put gigabytes",
    "single client get object containing 10k refs",
    "single client wait 1k refs",
    "single client tasks sync",
    "single client tasks async",
    "multi client tasks async",
    "1:1 actor calls sync",
    "1:1 actor calls async",
    "1:1 actor calls concurrent",
    "1:n actor calls async",
    "n:n actor calls async",
    "n:n actor calls with arg async",
    "1:1 async-actor calls sync",
    "1:1 async-actor calls async",
    "1:1 async-actor calls with args async",
    "1:n async-actor calls async",
    "n:n async-actor calls async",
    "placement group create/removal",
];

#[test]
fn every_metric_runs_and_prints_in_rays_format() {
    let out = run_driver(
        &shoal_bin(),
        &[
            "microbenchmark",
            "--duration-scale",
            "0.01",
            "--batch-scale",
            "0.01",
        ],
        &[],
        Duration::from_secs(600),
    );
    for metric in METRICS {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{metric} per second ")))
            .unwrap_or_else(|| panic!("no line for {metric:?} in:\n{out}"));
        let figures: Vec<&str> = line[metric.len()..].split_whitespace().collect();
        assert!(
            matches!(figures.as_slice(), ["per", "second", mean, "+-", sd]
                if mean.parse::<f64>().is_ok_and(|m| m > 0.0) && sd.parse::<f64>().is_ok()),
            "{line}"
        );
    }
    assert!(!out.contains("skipped"), "{out}");
}

#[test]
fn the_filter_runs_a_subset_and_json_lists_it() {
    let out = run_driver(
        &shoal_bin(),
        &[
            "microbenchmark",
            "--json",
            "--duration-scale",
            "0.01",
            "--batch-scale",
            "0.01",
        ],
        &[("SHOAL_BENCH_FILTER", "tasks sync".to_string())],
        Duration::from_secs(300),
    );
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let names: Vec<&str> = json["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, vec!["single client tasks sync"], "{json}");
    assert!(json["metrics"][0]["per_second"]
        .as_f64()
        .is_some_and(|r| r > 0.0));
}

#[test]
fn bad_scales_and_a_filter_matching_nothing_are_refused_before_any_cluster_starts() {
    let run = |args: &[&str], filter: &str| {
        let out = std::process::Command::new(shoal_bin())
            .arg("microbenchmark")
            .args(args)
            .env("SHOAL_BENCH_FILTER", filter)
            .output()
            .expect("shoal runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &["--batch-scale", "2"][..],
        &["--batch-scale", "0"],
        &["--duration-scale", "nan"],
        &["--duration-scale", "-1"],
        &["--duration-scale", "fast"],
    ] {
        let (code, stderr) = run(args, "");
        assert_eq!(code, Some(2), "{args:?} accepted: {stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    let (code, stderr) = run(&[], "no such metric");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("matches no metric") && stderr.contains("1:1 actor calls sync"),
        "{stderr}"
    );
}
