//! The head's Prometheus metrics (exposed by the `shoal` binary at
//! `/metrics`, with its node's): tasks, actors, nodes and jobs by state,
//! the lease latency and task duration histograms, heartbeats, refused
//! handshakes and lost task events.
//!
//! Counts are read from the tables when scraped; the histograms and
//! counters live here and are updated as things happen.

use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use shoal_proto::state::TaskState;
use shoal_proto::{ActorState, NodeState};

use crate::api::HeadService;
use crate::state_api::actor_state_name;

/// A metric's labels.
pub type Labels = Vec<(String, String)>;

/// What the head measures as it goes.
#[derive(Debug)]
pub struct HeadMetrics {
    /// From a lease request's arrival to its grant, seconds.
    pub lease_latency: Histogram,
    /// Tasks' run times as their workers measured them, seconds.
    pub task_duration: Histogram,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Lease requests answered with a grant.
    pub leases_granted: Counter,
}

impl Default for HeadMetrics {
    fn default() -> Self {
        Self {
            // 100 µs to about 1.6 s.
            lease_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            // 100 µs to about 55 min.
            task_duration: Histogram::new(exponential_buckets(0.0001, 3.0, 16)),
            heartbeats: Counter::default(),
            leases_granted: Counter::default(),
        }
    }
}

fn by_state<'a>(counts: impl IntoIterator<Item = (&'a str, u64)>) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    for (state, n) in counts {
        family
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    family
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

impl HeadService {
    /// Adds the head's metrics, as of now, to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let tasks = self.task_counts();
        let lost = self.task_events_lost();
        let task_counts = TaskState::ALL
            .iter()
            .map(|s| (s.name(), tasks.get(s).copied().unwrap_or(0)));
        registry.register(
            "shoal_tasks",
            "Tasks and actor calls the head keeps, by state (from task events)",
            by_state(task_counts),
        );
        let (actors, nodes, jobs) = {
            let state = self.state();
            let mut actors = [0u64; 3];
            for a in state.actors.iter() {
                let i = match a.state {
                    ActorState::Alive => 0,
                    ActorState::Restarting => 1,
                    ActorState::Dead => 2,
                };
                actors[i] += 1;
            }
            let mut nodes = [0u64; 2];
            for n in state.membership.status(std::time::Instant::now()) {
                nodes[usize::from(n.state == NodeState::Dead)] += 1;
            }
            let mut jobs = [0u64; 2];
            for (_, job) in state.jobs.iter() {
                jobs[usize::from(!job.running)] += 1;
            }
            (actors, nodes, jobs)
        };
        let actor_states = [ActorState::Alive, ActorState::Restarting, ActorState::Dead];
        registry.register(
            "shoal_actors",
            "Actors by state",
            by_state(
                actor_states
                    .iter()
                    .map(|s| actor_state_name(*s))
                    .zip(actors),
            ),
        );
        registry.register(
            "shoal_nodes",
            "Nodes by state",
            by_state([("ALIVE", nodes[0]), ("DEAD", nodes[1])]),
        );
        registry.register(
            "shoal_jobs",
            "Jobs by state",
            by_state([("RUNNING", jobs[0]), ("FINISHED", jobs[1])]),
        );
        let m = self.metrics();
        registry.register(
            "shoal_lease_latency_seconds",
            "From a lease request's arrival at the head to its grant",
            m.lease_latency.clone(),
        );
        registry.register(
            "shoal_task_duration_seconds",
            "Run time of finished and failed tasks and actor calls, as their workers measured it",
            m.task_duration.clone(),
        );
        registry.register(
            "shoal_head_heartbeats",
            "Node heartbeats the head received",
            m.heartbeats.clone(),
        );
        registry.register(
            "shoal_leases_granted",
            "Worker leases the head granted",
            m.leases_granted.clone(),
        );
        registry.register(
            "shoal_head_handshakes_refused",
            "Connections the head refused in the handshake (bad token, bad hello)",
            counter(self.handshakes_refused()),
        );
        registry.register(
            "shoal_head_handshakes_retried",
            "New peers asked to prove their address (a QUIC Retry) while the handshake slots filled",
            counter(self.handshake_stats().retried.load(Ordering::Relaxed)),
        );
        registry.register(
            "shoal_task_events_lost",
            "Task events dropped by full buffers at owners, and tasks the head forgot to stay bounded",
            counter(lost),
        );
    }

    fn handshakes_refused(&self) -> u64 {
        self.handshake_stats().refused.load(Ordering::Relaxed)
    }
}
