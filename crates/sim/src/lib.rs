//! A deterministic simulation of a whole Shoal cluster, in the manner of
//! FoundationDB's simulator and TigerBeetle's VOPR: the head (its real
//! `Membership` and `Scheduler`), node daemons, owners and workers run in
//! one thread on a simulated network, with simulated time. Owners decide
//! with the SDK's own state machines (`shoal::owner`): lease placement and
//! requests, task retries.
//!
//! Faults, all drawn from one seed: message delays and delay spikes (so
//! messages are reordered), lost requests and lost replies (the caller sees
//! its connection fail), hosts cut off from the network (long enough and
//! the head declares the node dead, and fences it when it is back), and
//! node crashes (the node comes back as a new node). The workload: tasks,
//! nested tasks (a worker owning children, lending its CPU back while it
//! waits) whose arguments hold references lent by their owner (see
//! [`borrow`]), and numbered calls to an actor that restarts when its node
//! dies.
//! The invariants are in [`check`](crate::check).
//!
//! The same seed gives the same trace (a hash over every event) on every
//! run.

pub mod actor;
pub mod borrow;
pub mod check;
pub mod cluster;
pub mod msg;
pub mod owner;
pub mod sim;
pub mod world;

use world::Time;

/// The shape of one run.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: usize,
    pub cpus: f64,
    /// Top-level tasks the driver submits (every fourth has children).
    pub tasks: u64,
    pub fanout: u32,
    pub max_retries: u32,
    pub actor_calls: u64,
    pub actor_restarts: u32,
    pub drop_rate: f64,
    pub crashes: u32,
    pub partitions: u32,
    /// Simulated time by which the work must be done.
    pub time_limit: Time,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 3,
            cpus: 2.0,
            tasks: 60,
            fanout: 3,
            max_retries: 3,
            actor_calls: 40,
            actor_restarts: 5,
            drop_rate: 0.02,
            crashes: 1,
            partitions: 1,
            time_limit: 120 * world::SECOND,
        }
    }
}

impl Config {
    /// The run's faults, drawn from its seed: how many crashes and cuts,
    /// and how often requests are lost.
    pub fn for_seed(seed: u64) -> Self {
        let mut rng = world::Rng::new(seed.wrapping_mul(31) ^ 0x636f_6e66);
        Config {
            nodes: rng.range(2, 5) as usize,
            cpus: rng.range(1, 4) as f64,
            tasks: rng.range(20, 150),
            fanout: rng.range(1, 5) as u32,
            actor_calls: rng.range(10, 80),
            actor_restarts: rng.range(0, 6) as u32,
            crashes: rng.range(0, 4) as u32,
            partitions: rng.range(0, 4) as u32,
            drop_rate: [0.0, 0.01, 0.03, 0.08, 0.15][rng.range(0, 5) as usize],
            ..Config::default()
        }
    }
}

/// A broken invariant: what, and at which step.
#[derive(Clone, Debug)]
pub struct Violation {
    pub step: u64,
    pub time: Time,
    pub what: String,
}

/// How a run went.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub hash: u64,
    pub events: u64,
    pub faults: usize,
    pub violation: Option<Violation>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: trace {:016x}, {} events",
            self.seed, self.hash, self.events
        )?;
        match &self.violation {
            None => write!(f, ", invariants ok"),
            Some(v) => write!(
                f,
                ", invariant broken at step {} ({} us): {}",
                v.step, v.time, v.what
            ),
        }
    }
}

/// Runs one seed.
pub fn run(seed: u64) -> Report {
    sim::Sim::new(seed, Config::for_seed(seed)).run(seed)
}
