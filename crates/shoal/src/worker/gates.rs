//! Per worker running in this process: one task at a time.
//!
//! A pushed task holds its worker's gate while it runs; tasks pushed
//! meanwhile queue for it. A task blocked in a `get` lends its permit to
//! the next task (which may be the one it waits for), and takes it back
//! when the get returns.

use std::sync::Arc;

use dashmap::DashMap;
use shoal_proto::WorkerId;
use tokio::sync::{watch, Semaphore};

/// The gates and blocked counts of the workers running here.
#[derive(Default)]
pub(crate) struct Gates {
    gates: DashMap<WorkerId, Arc<Semaphore>>,
    /// Per worker: how many of its gets are waiting.
    blocked: DashMap<WorkerId, usize>,
    /// Per worker: whether it is blocked now, for the task that tells its
    /// node (in order, the latest state only: the task never waits for it).
    tellers: DashMap<WorkerId, watch::Sender<bool>>,
}

impl Gates {
    /// The gate of `worker_id` (one permit).
    pub(crate) fn gate(&self, worker_id: WorkerId) -> Arc<Semaphore> {
        Arc::clone(
            &self
                .gates
                .entry(worker_id)
                .or_insert_with(|| Arc::new(Semaphore::new(1))),
        )
    }

    /// One more (or one fewer) get of `worker_id` waits; true when that
    /// changes whether the worker is blocked (the node is then told).
    pub(crate) fn set_blocked(&self, worker_id: WorkerId, blocked: bool) -> bool {
        let mut count = self.blocked.entry(worker_id).or_insert(0);
        if blocked {
            *count += 1;
            *count == 1
        } else {
            *count = count.saturating_sub(1);
            *count == 0
        }
    }

    /// Records that `worker_id` is now blocked (or not) for the task that
    /// tells its node; the first time, returns that task's end of the
    /// channel (the caller starts it). The node is first told of a change,
    /// and assumes a worker not blocked.
    pub(crate) fn tell_blocked(
        &self,
        worker_id: WorkerId,
        blocked: bool,
    ) -> Option<watch::Receiver<bool>> {
        match self.tellers.entry(worker_id) {
            dashmap::Entry::Occupied(told) => {
                told.get().send_replace(blocked);
                None
            }
            dashmap::Entry::Vacant(none) => {
                let (tx, rx) = watch::channel(false);
                tx.send_replace(blocked);
                none.insert(tx);
                Some(rx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_and_last_of_nested_gets_change_the_blocked_state() {
        let gates = Gates::default();
        let w = WorkerId::random();
        assert!(gates.set_blocked(w, true));
        assert!(!gates.set_blocked(w, true));
        assert!(!gates.set_blocked(w, false));
        assert!(gates.set_blocked(w, false));
        assert_eq!(gates.gate(w).available_permits(), 1);
    }

    #[test]
    fn the_teller_sees_the_latest_blocked_state() {
        let gates = Gates::default();
        let w = WorkerId::random();
        let mut rx = gates
            .tell_blocked(w, true)
            .expect("the first starts a teller");
        assert!(rx.has_changed().expect("open"));
        assert!(*rx.borrow_and_update());
        assert!(gates.tell_blocked(w, false).is_none());
        assert!(gates.tell_blocked(w, true).is_none());
        assert!(gates.tell_blocked(w, false).is_none());
        assert!(rx.has_changed().expect("open"));
        assert!(!*rx.borrow_and_update(), "only the latest state is told");
    }
}
