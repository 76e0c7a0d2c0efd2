//! `shoal job`: a program submitted to a head of real processes runs there
//! as its job's driver, with its working directory and environment; its
//! state, exit code and output outlive it; a stop ends it and everything it
//! started, and so does stopping the cluster.

use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::{poll_until, process_alive, result_of, sibling_bin, ProcessCluster};

const WAIT: Duration = Duration::from_secs(60);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn status(cluster: &ProcessCluster, job: &str) -> Value {
    json(&cluster.shoal_ok(&["job", "status", job, "--json"]))
}

/// The job's output so far.
fn logs(cluster: &ProcessCluster, job: &str) -> String {
    cluster.shoal_ok(&["job", "logs", job])
}

/// Submits without waiting; the job id printed.
fn submit_no_wait(cluster: &ProcessCluster, command: &[&str]) -> String {
    let mut args = vec!["job", "submit", "--no-wait", "--"];
    args.extend_from_slice(command);
    cluster.shoal_ok(&args).trim().to_string()
}

fn driver_pid(cluster: &ProcessCluster, job: &str) -> u32 {
    poll_until(WAIT, "the driver's pid", || {
        status(cluster, job)["driver_pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
    })
}

#[test]
fn a_submitted_program_is_its_jobs_driver_and_its_state_and_output_outlive_it() {
    let cluster = ProcessCluster::new();
    cluster.start_head(&[]);
    let dir = cluster.root().join("working-dir");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("input.txt"), "seven\n").expect("write");
    let scenarios = sibling_bin("scenarios");
    let out = cluster.shoal(&[
        "job",
        "submit",
        "--working-dir",
        &dir.display().to_string(),
        "--env",
        "GREETING=hello",
        "--env",
        "SHOAL_TASK_EVENTS=1",
        "--",
        &scenarios.display().to_string(),
        "submitted",
    ]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let result = result_of(&stdout(&out));
    assert_eq!(
        result["input"], "seven",
        "it ran in its working directory: {result}"
    );
    assert_eq!(
        result["greeting"], "hello",
        "with its environment: {result}"
    );
    assert_eq!(result["count"], 10, "{result}");
    let job = result["job_id"].as_str().expect("job id").to_string();
    assert!(
        stderr(&out).contains(&format!("job {job} submitted")),
        "the driver took the submitted job's id: {}",
        stderr(&out)
    );

    // Its state, output and tasks, after the driver has gone.
    let row = status(&cluster, &job);
    assert_eq!(row["state"], "SUCCEEDED", "{row:#}");
    assert_eq!(row["type"], "SUBMISSION", "{row:#}");
    assert_eq!(row["exit_code"], 0, "{row:#}");
    assert!(row["driver_address"].is_string(), "{row:#}");
    assert!(
        row["entrypoint"]
            .as_str()
            .is_some_and(|e| e.ends_with("scenarios submitted")),
        "{row:#}"
    );
    assert_eq!(
        result_of(&logs(&cluster, &job)),
        result,
        "the output is kept"
    );
    let listed = json(&cluster.shoal_ok(&["job", "list", "--json"]));
    assert!(
        listed
            .as_array()
            .is_some_and(|jobs| jobs.iter().any(|j| j["job_id"] == job.as_str())),
        "{listed:#}"
    );
    let filter = format!("job_id={job}");
    poll_until(WAIT, "the job's ten tasks, finished", || {
        let tasks = json(&cluster.shoal_ok(&["list", "tasks", "-f", &filter, "--json"]));
        let tasks = tasks.as_array().cloned().unwrap_or_default();
        (tasks.len() == 10 && tasks.iter().all(|t| t["state"] == "FINISHED")).then_some(())
    });
}

#[test]
fn failed_and_stopped_jobs_report_how_they_ended_and_leave_no_process() {
    let cluster = ProcessCluster::new();
    cluster.start_head(&[]);

    // A failure: its output streamed, its exit code the command's.
    let out = cluster.shoal(&[
        "job",
        "submit",
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("to-stdout\n") && stdout(&out).contains("to-stderr\n"));
    let job = stderr(&out)
        .split_whitespace()
        .nth(1)
        .expect("the job id on stderr")
        .to_string();
    let row = status(&cluster, &job);
    assert_eq!(row["state"], "FAILED", "{row:#}");
    assert_eq!(row["exit_code"], 7, "{row:#}");
    assert_eq!(row["message"], "the driver exited with code 7", "{row:#}");
    let again = cluster.shoal_ok(&["job", "stop", &job]);
    assert!(again.contains("had already ended: FAILED"), "{again}");

    // A stop: the driver and what it started in the background end.
    let job = submit_no_wait(
        &cluster,
        &["sh", "-c", "sleep 1000 & echo child $!; exec sleep 999"],
    );
    let child: u32 = poll_until(WAIT, "the background child's pid", || {
        logs(&cluster, &job)
            .strip_prefix("child ")
            .and_then(|rest| rest.trim().parse().ok())
    });
    let driver = driver_pid(&cluster, &job);
    assert_eq!(status(&cluster, &job)["state"], "RUNNING");
    let stopped = cluster.shoal_ok(&["job", "stop", &job]);
    assert!(stopped.contains("STOPPED"), "{stopped}");
    let row = status(&cluster, &job);
    assert_eq!(row["exit_code"], 143, "SIGTERM: {row:#}");
    poll_until(WAIT, "the driver and its child gone", || {
        (!process_alive(driver) && !process_alive(child)).then_some(())
    });
    // Following a job that has ended returns.
    let followed = cluster.shoal_ok(&["job", "logs", &job, "--follow"]);
    assert!(followed.starts_with("child "), "{followed}");

    // A driver that ignores SIGTERM is killed after the grace period.
    let job = submit_no_wait(
        &cluster,
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        ],
    );
    poll_until(WAIT, "the driver ready", || {
        logs(&cluster, &job).contains("ready").then_some(())
    });
    let stopped = cluster.shoal_ok(&["job", "stop", &job]);
    assert!(stopped.contains("STOPPED"), "{stopped}");
    assert_eq!(status(&cluster, &job)["exit_code"], 137, "SIGKILL");

    // Stopping the cluster stops the drivers it runs.
    let job = submit_no_wait(&cluster, &["sh", "-c", "echo up; exec sleep 1000"]);
    let driver = driver_pid(&cluster, &job);
    cluster.shoal_ok(&["stop"]);
    poll_until(WAIT, "the driver gone with its head", || {
        (!process_alive(driver)).then_some(())
    });

    // Bad input gets a clear refusal.
    let out = cluster.shoal(&["job", "submit", "--", "/nonexistent/program"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/program: no such file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_jobs_and_bad_arguments_are_refused_with_a_reason() {
    let cluster = ProcessCluster::new();
    cluster.start_head(&[]);
    let unknown = "00000000000000000000000000000001";
    for args in [
        vec!["job", "logs", unknown],
        vec!["job", "stop", unknown],
        vec!["job", "status", unknown],
    ] {
        let out = cluster.shoal(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(unknown), "{args:?}: {}", stderr(&out));
    }
    for args in [
        vec!["job", "logs", "not-an-id"],
        vec!["job", "submit", "--env", "NOVALUE", "--", "true"],
        vec![
            "job",
            "submit",
            "--working-dir",
            "/nonexistent",
            "--",
            "true",
        ],
        vec!["job", "submit"],
    ] {
        let out = cluster.shoal(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(!stderr(&out).is_empty(), "{args:?}");
        assert!(
            !stderr(&out).contains("panicked"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}
