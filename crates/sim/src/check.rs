//! The invariants, checked at every step and at the end of a run.
//!
//! - No lost result: every task the driver submitted ends, with the right
//!   value or a typed failure (its worker lost more times than it may be
//!   retried); every actor call ends, with a value or `ActorDied`.
//! - Never two live incarnations of the actor: at most one worker hosting
//!   it runs on a node the head lists alive, and the driver never accepts
//!   a reply from an incarnation older than one it accepted.
//! - The ledger balances: no node's allocation is ever negative, and once
//!   the work is over and the job's leases are reclaimed every node is back
//!   to exactly zero.
//! - Per-caller order: each incarnation runs the driver's calls once each,
//!   in the order of their numbers (checked as they run).
//! - No object is freed while a live worker may still read it (checked
//!   when it is freed: see [`borrow`](crate::borrow)).

use shoal_proto::resources::CPU;

use crate::cluster::node_id;
use crate::owner::expected;
use crate::sim::Sim;

pub fn every_step(sim: &mut Sim) {
    for (no, _) in sim.head.views.iter() {
        let allocated = sim.head.scheduler.allocated(node_id(*no)).get(CPU);
        if allocated < -1e-9 {
            let what = format!("node {no}'s ledger went negative: {allocated}");
            sim.violate(what);
            return;
        }
    }
    let live_hosts: Vec<_> = sim
        .workers
        .values()
        .filter(|w| w.alive && w.actor.is_some() && sim.head.views.contains_key(&w.node_id))
        .map(|w| (w.pid, w.node_id, w.actor.as_ref().map(|a| a.incarnation)))
        .collect();
    if live_hosts.len() > 1 {
        sim.violate(format!(
            "two live incarnations of the actor: {live_hosts:?}"
        ));
    }
}

pub fn at_end(sim: &mut Sim, finished: bool) {
    if !finished {
        let pending: Vec<u64> = (0..sim.config.tasks)
            .filter(|t| !sim.truth.results.contains_key(t))
            .collect();
        let calls: Vec<u64> = (0..sim.config.actor_calls)
            .filter(|c| !sim.truth.calls.contains_key(c))
            .collect();
        let ledger: Vec<String> = sim
            .head
            .views
            .iter()
            .map(|(no, (i, _))| {
                let a = sim.head.scheduler.allocated(node_id(*no)).get(CPU);
                format!("node {no} (host {i}): {a} CPU allocated")
            })
            .collect();
        let busy: Vec<String> = sim
            .workers
            .values()
            .filter(|w| w.alive)
            .map(|w| {
                format!(
                    "{:?} lease {} of {:?} on node {}",
                    w.pid, w.lease, w.owner, w.node_id
                )
            })
            .collect();
        sim.note(format!("ledger {ledger:?}; {} leases; live workers {busy:?}; leases by number {:?}; scheduler {:?}", sim.head.scheduler.lease_count(), sim.head.leases, sim.head.scheduler));
        sim.violate(format!(
            "a result was lost: by the time limit, tasks {pending:?} and actor calls {calls:?} had no result"
        ));
        return;
    }
    for (task, result) in sim.truth.results.clone() {
        let fanout = if task.is_multiple_of(4) {
            sim.config.fanout
        } else {
            0
        };
        let want = expected(task as i64, fanout);
        match result {
            Ok(value) if value != want => {
                sim.violate(format!("task {task} gave {value}, not {want}"));
                return;
            }
            Err(e) if !e.starts_with("WorkerCrashed") && !e.contains("WorkerCrashed") => {
                sim.violate(format!("task {task} failed untyped or wrongly: {e}"));
                return;
            }
            _ => {}
        }
    }
    for (call, result) in sim.truth.calls.clone() {
        if let Err(e) = result {
            if !e.starts_with("ActorDied") {
                sim.violate(format!("actor call {call} failed wrongly: {e}"));
                return;
            }
        }
    }
    // The job ends: the head reclaims what it still holds for the job (as
    // FinishJob does); then every live node's ledger is exactly empty.
    let job = shoal_proto::JobId::from_uuid(uuid::Uuid::from_u128(1));
    sim.head.scheduler.job_finished(job);
    for (no, _) in sim.head.views.clone() {
        let allocated = sim.head.scheduler.allocated(node_id(no));
        if allocated.iter().next().is_some() {
            sim.violate(format!(
                "node {no}'s ledger is not balanced after the job: {allocated:?} allocated"
            ));
            return;
        }
    }
    if sim.head.scheduler.lease_count() != 0 {
        let count = sim.head.scheduler.lease_count();
        sim.violate(format!("{count} leases left after the job ended"));
    }
}
