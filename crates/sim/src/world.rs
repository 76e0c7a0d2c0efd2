//! The simulated world: time, the event queue, the network and its faults,
//! and the trace every run is hashed into.
//!
//! One thread, one queue ordered by (time, sequence number): nothing runs
//! but the event at the head of the queue, and every choice (a message's
//! delay, a drop, a partition, a crash) is drawn from one seeded generator,
//! so a seed replays the same run event for event. The trace hash covers
//! every delivered event; the same seed gives the same hash.

use std::collections::{BTreeMap, BTreeSet};

use crate::msg::{Msg, Pid, Tag};

/// Simulated time, in microseconds.
pub type Time = u64;

pub const MS: Time = 1_000;
pub const SECOND: Time = 1_000_000;

/// SplitMix64: small, fast and good enough to draw faults from.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5348_4f41_4c53_494d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// FNV-1a, 64 bits: the trace hash (stable across runs and builds).
#[derive(Clone, Debug)]
pub struct Trace(u64);

impl Default for Trace {
    fn default() -> Self {
        Trace(0xcbf2_9ce4_8422_2325)
    }
}

impl Trace {
    pub fn add(&mut self, text: &str) {
        for byte in text.bytes() {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

/// What happens at a point in time.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message arrives.
    Deliver { from: Pid, to: Pid, msg: Msg },
    /// A process's timer fires.
    Timer { pid: Pid, timer: crate::msg::Timer },
}

/// The faults of one run, drawn from its seed.
#[derive(Clone, Debug)]
pub struct Faults {
    /// A request is lost (the caller sees its connection fail): half the
    /// time after it was delivered (its reply is lost instead).
    pub drop_rate: f64,
    /// A message is held up this much more, this often (reorderings).
    pub spike_rate: f64,
    pub spike: (Time, Time),
    /// The normal one-way delay.
    pub latency: (Time, Time),
    /// How long a caller takes to see a lost connection.
    pub detect: (Time, Time),
}

/// The network: delays, drops and partitions.
#[derive(Debug, Default)]
pub struct Net {
    /// Hosts cut off from everyone (by node index); their processes too.
    pub cut: BTreeSet<usize>,
    /// Requests whose reply is to be lost (their caller was told so).
    pub lost_replies: BTreeSet<(Pid, Tag)>,
}

/// The queue and clock.
#[derive(Debug, Default)]
pub struct Queue {
    pub now: Time,
    seq: u64,
    events: BTreeMap<(Time, u64), Event>,
}

impl Queue {
    pub fn at(&mut self, time: Time, event: Event) {
        self.seq += 1;
        self.events.insert((time.max(self.now), self.seq), event);
    }

    pub fn pop(&mut self) -> Option<(Time, Event)> {
        let ((time, _), event) = self.events.pop_first()?;
        self.now = time;
        Some((time, event))
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}
