//! Actors as real programs: the `scenarios` driver against a head and two
//! node daemons as processes, and in local mode.

use std::time::Duration;

use serde_json::{json, Value};
use shoal_integration_tests::{local_processes, scenario_result, ProcessCluster};

fn scenario(env: &[(&str, String)], args: &[&str]) -> Value {
    scenario_result(args, env, Duration::from_secs(300))
}

fn environments(cluster: &ProcessCluster) -> Vec<Vec<(&'static str, String)>> {
    vec![cluster.driver_env(), vec![], local_processes()]
}

#[test]
fn calls_from_one_caller_run_in_order_and_each_caller_keeps_its_own() {
    let cluster = ProcessCluster::three_process();
    for env in environments(&cluster) {
        let out = scenario(&env, &["actor-order", "10000"]);
        assert_eq!(out["one_caller_in_order"], true, "{out}");
        let orders = out["orders"].as_array().expect("orders");
        assert_eq!(orders.len(), 5, "{out}");
        for (caller, order) in orders.iter().enumerate() {
            let expected = if caller == 0 { 10_000 } else { 1000 };
            assert_eq!(order, &json!([caller, true, expected]), "{out}");
        }
    }
}

#[test]
fn concurrency_is_real_for_threaded_and_async_methods() {
    let cluster = ProcessCluster::three_process();
    for env in environments(&cluster) {
        let out = scenario(&env, &["actor-concurrency"]);
        assert_eq!(out["met_with_4"], true, "{out}");
        assert_eq!(out["met_async_with_4"], true, "{out}");
        assert_eq!(
            out["met_with_2"], false,
            "a barrier of 4 cannot be met two at a time: {out}"
        );
    }
}

/// A sync method that ran quickly runs next time on the runtime thread that
/// received the call; when two such methods turn slow at once, the runtime
/// must still have a thread for everything else (local mode with threads,
/// where actors share the driver's runtime).
#[test]
fn quick_methods_turned_slow_do_not_hold_up_the_whole_runtime() {
    let out = scenario(&[], &["held"]);
    assert_eq!(out["quick"], true, "{out}");
    assert_eq!(out["both_holding"], true, "{out}");
    assert_eq!(out["pinged"], true, "{out}");
    assert_eq!(out["released_by_the_ping"], true, "{out}");
}

/// A quick sync method that then waits for the caller's next call (an
/// actor with async methods too, two calls at once) must not hold the
/// thread that call was woken on; local threads and worker processes.
#[test]
fn a_quick_method_waiting_for_the_next_call_lets_it_run() {
    for env in [vec![], local_processes()] {
        let out = scenario(&env, &["flagged"]);
        assert_eq!(out["all_released"], true, "{out}");
    }
}

#[test]
fn a_panicking_method_is_a_task_error_and_the_actor_keeps_serving() {
    let cluster = ProcessCluster::three_process();
    for env in environments(&cluster) {
        let out = scenario(&env, &["actor-errors"]);
        assert!(
            out["panic_message"]
                .as_str()
                .is_some_and(|m| m.contains("exploded: on purpose")),
            "{out}"
        );
        assert_eq!(out["panicked"], true);
        assert!(
            out["constructor_error"]
                .as_str()
                .is_some_and(|m| m.contains("constructor refused on purpose")),
            "a constructor's panic message reaches the creator: {out}"
        );
        assert_eq!(out["function"], "scenarios::Recorder::explode");
        assert_eq!(out["still_serving"], true);
        assert_eq!(
            out["relayed"], true,
            "a handle passed to another actor is called from there: {out}"
        );
    }
}

#[test]
fn calls_past_max_pending_calls_fail_fast_with_a_typed_error() {
    let cluster = ProcessCluster::three_process();
    for env in environments(&cluster) {
        let out = scenario(&env, &["actor-pending"]);
        assert_eq!(out["other"], json!([]), "{out}");
        assert_eq!(out["ok"], 100, "the first 100 calls are accepted: {out}");
        assert_eq!(out["refused"], 900, "{out}");
        assert_eq!(out["accepts_again"], true);
    }
}

#[test]
fn calls_to_an_actor_whose_worker_was_killed_get_actor_died() {
    let cluster = ProcessCluster::three_process();
    // Process workers only: a thread worker cannot be killed apart from us.
    for env in [cluster.driver_env(), local_processes()] {
        let out = scenario(&env, &["actor-kill"]);
        assert_eq!(out["in_flight_died"], true, "{out}");
        assert_eq!(out["later_call_died"], true, "{out}");
    }
}

#[test]
fn a_killed_actor_with_restarts_left_comes_back_as_a_new_incarnation() {
    let cluster = ProcessCluster::three_process();
    // Process workers only: a thread worker cannot be killed apart from us.
    for env in [cluster.driver_env(), local_processes()] {
        let out = scenario(&env, &["actor-restart"]);
        assert_eq!(out["in_flight_died"], true, "{out}");
        assert_eq!(out["restarted_with_new_pid"], true, "{out}");
        assert_eq!(
            out["state_is_new"], true,
            "the constructor ran again: {out}"
        );
        assert_eq!(out["died_after_last_restart"], true, "{out}");
        assert_eq!(out["resent_call"], "Ok(1500)", "{out}");
        assert_eq!(out["resent_on_new_pid"], true, "{out}");
        assert_eq!(out["kill_restarts"], true, "{out}");
        assert_eq!(out["kill_no_restart_final"], true, "{out}");
    }
}

#[test]
fn a_detached_named_actor_outlives_its_driver_and_kill_frees_its_name() {
    let cluster = ProcessCluster::three_process();
    let env = cluster.driver_env();
    let created = scenario(&env, &["detached-create", "keeper"]);
    assert_eq!(created["name_taken"], true, "{created}");
    // The creating driver has exited; the actor is still listed and alive.
    let listed: Value =
        serde_json::from_str(&cluster.shoal_ok(&["list", "actors", "--json"])).expect("json");
    let keeper = listed
        .as_array()
        .expect("actors")
        .iter()
        .find(|a| a["name"] == "keeper")
        .cloned()
        .expect("keeper listed");
    assert_eq!(keeper["state"], "ALIVE", "{listed}");
    assert_eq!(keeper["detached"], true);
    let status = cluster.status();
    let hosting = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["actors_alive"].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(
        hosting, 1,
        "status counts the actor on its node: {status:#}"
    );
    // A second driver finds it by name, calls it, kills it.
    let used = scenario(&env, &["detached-use", "keeper"]);
    assert_eq!(used["id"], created["created"]);
    assert_eq!(
        used["orders"],
        json!([[0, true, 2]]),
        "both drivers' calls reached the same actor: {used}"
    );
    assert_eq!(used["wrong_class_refused"], true);
    assert_eq!(used["dead_after_kill"], true);
    assert_eq!(used["name_free_after_kill"], true);
    assert_eq!(used["name_reused"], true);
    let listed: Value =
        serde_json::from_str(&cluster.shoal_ok(&["list", "actors", "--json"])).expect("json");
    assert!(
        listed
            .as_array()
            .expect("actors")
            .iter()
            .all(|a| a["state"] == "DEAD"),
        "{listed}"
    );
    assert!(cluster.shoal_ok(&["list", "actors"]).contains("keeper"));
}

/// The fault injector discards a fifth of the actor calls' replies after
/// the actor ran the call: with no restarts and no call retries, every
/// call is still answered (sent again, answered by the actor's kept
/// reply) and ran exactly once, in its caller's order; three callers
/// (the driver and two tasks), local threads and local processes.
#[test]
fn lost_replies_are_sent_again_and_each_call_runs_once_in_order() {
    for (seed, processes) in [(7, false), (11, true)] {
        let mut env = vec![
            ("SHOAL_TESTING_RPC_FAILURE", "ActorCall=rep:0.2".to_string()),
            ("SHOAL_TESTING_RPC_FAILURE_SEED", seed.to_string()),
        ];
        if processes {
            env.extend(local_processes());
        }
        let n = 400;
        let out = scenario(&env, &["actor-replies-lost", &n.to_string()]);
        assert_eq!(out["errors"], json!([]), "{out}");
        assert_eq!(out["answered"], json!([n, n, n]), "{out}");
        assert_eq!(
            out["orders"],
            json!([[0, true, n], [1, true, n], [2, true, n]]),
            "each number recorded once, in order: {out}"
        );
    }
}

/// A forwarder with `max_restarts(1).max_task_retries(3)` is killed while
/// numbered calls from three callers are in flight and more are being
/// made: every call is answered, and the recorder it forwards to (not
/// killed) saw each caller's numbers in order, calls lost with the first
/// incarnation resent to the second ahead of later calls (at least once:
/// duplicates are counted, not refused). Once more with a fifth of the
/// actor calls' requests dropped and a fifth of their replies discarded.
#[test]
fn calls_lost_with_a_restarted_actor_are_resent_in_their_callers_order() {
    let cluster = ProcessCluster::three_process();
    let mut faulty = local_processes();
    faulty.extend([
        (
            "SHOAL_TESTING_RPC_FAILURE",
            "ActorCall=req:0.2,rep:0.2".to_string(),
        ),
        ("SHOAL_TESTING_RPC_FAILURE_SEED", "5".to_string()),
    ]);
    // Process workers only: a thread worker cannot be killed apart from us.
    for env in [cluster.driver_env(), local_processes(), faulty] {
        let n = 300;
        let out = scenario(&env, &["actor-restart-order", &n.to_string()]);
        assert_eq!(out["errors"], json!([]), "{out}");
        assert_eq!(out["answered"], json!([n, n, n]), "{out}");
        assert_eq!(out["restarted"], true, "{out}");
        let callers = out["callers"].as_array().expect("callers");
        assert_eq!(callers.len(), 3, "{out}");
        for caller in callers {
            assert_eq!(caller["in_order"], true, "{out}");
        }
        assert_eq!(out["out_of_order"], json!([]), "{out}");
    }
}

/// The driver's connections to workers are closed (a network blip) while
/// numbered calls are in flight to a live actor with `max_restarts(0)`:
/// a lost connection is not a death, so the calls are sent again on a new
/// connection and each is answered, run once, in order; the handle keeps
/// working. Local threads and local processes.
#[test]
fn a_lost_connection_to_a_live_actor_is_reopened_and_its_calls_sent_again() {
    for env in [vec![], local_processes()] {
        let n = 2000;
        let out = scenario(&env, &["actor-blip", &n.to_string()]);
        assert!(out["closed"].as_u64().is_some_and(|c| c >= 1), "{out}");
        assert_eq!(out["errors"], json!([]), "{out}");
        assert_eq!(out["answered"], n, "{out}");
        assert_eq!(out["after"], true, "{out}");
        assert_eq!(
            out["orders"],
            json!([[0, true, n], [1, true, 1]]),
            "each number recorded once, in order: {out}"
        );
    }
}
