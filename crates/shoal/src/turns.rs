//! Turns in sequence-number order: call `n` waits until every call before it
//! has passed its turn.
//!
//! A `watch` channel would wake every waiter on each advance (with 1000 calls
//! queued that is a million wake-ups for a thousand calls); here an advance
//! wakes only the waiters whose turn has come.

use shoal_net::sync::MutexExt;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Sequence numbers `0, 1, 2, ...` taking turns.
#[derive(Debug, Default)]
pub(crate) struct Turns {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every number below this has had its turn.
    next: u64,
    /// Waiters by the number they wait to reach.
    waiting: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Turns {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// Waits until every number below `seq` has passed its turn.
    pub(crate) async fn wait(&self, seq: u64) {
        loop {
            let rx = {
                let mut inner = self.inner();
                if inner.next >= seq {
                    return;
                }
                let (tx, rx) = oneshot::channel();
                inner.waiting.entry(seq).or_default().push(tx);
                rx
            };
            // A dropped sender only means "look again".
            let _ = rx.await;
        }
    }

    /// True when every number below `seq` has passed its turn.
    pub(crate) fn is_turn(&self, seq: u64) -> bool {
        self.inner().next >= seq
    }

    /// `seq` has had its turn: the numbers after it may go.
    pub(crate) fn pass(&self, seq: u64) {
        let mut inner = self.inner();
        inner.next = inner.next.max(seq + 1);
        let next = inner.next;
        while let Some(entry) = inner.waiting.first_entry() {
            if *entry.key() > next {
                break;
            }
            for tx in entry.remove() {
                let _ = tx.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn each_number_goes_only_after_every_earlier_one_passed() {
        let turns = Arc::new(Turns::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        // Started in reverse, so the order seen is the turns', not the spawns'.
        let tasks: Vec<_> = (0..50u64)
            .rev()
            .map(|seq| {
                let (turns, order) = (Arc::clone(&turns), Arc::clone(&order));
                tokio::spawn(async move {
                    turns.wait(seq).await;
                    order.lock().expect("order").push(seq);
                    turns.pass(seq);
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("a turn task");
        }
        assert_eq!(*order.lock().expect("order"), (0..50).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_number_already_passed_does_not_wait_and_passing_twice_is_harmless() {
        let turns = Turns::default();
        turns.pass(3);
        turns.pass(1);
        turns.wait(4).await;
        turns.wait(2).await;
    }
}
