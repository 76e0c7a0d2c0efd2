//! Cancelling what runs here: one token per task or actor call being run,
//! and the cancels that arrived before their task did (a cancel races the
//! push, or an actor call waits for its turn elsewhere), so that such a
//! task never starts.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use shoal_proto::TaskId;
use tokio_util::sync::CancellationToken;

/// Cancels that arrived first are kept this long at most.
const EARLY_KEPT: Duration = Duration::from_secs(120);
/// And this many at most (the oldest go first past it).
const EARLY_MAX: usize = 4096;

enum Entry {
    /// Running (or waiting for its turn) here.
    Running(CancellationToken),
    /// Cancelled before it came.
    Early(Instant),
}

/// The tasks and calls of this process that can be cancelled.
#[derive(Default)]
pub(crate) struct Cancels {
    entries: DashMap<TaskId, Entry>,
}

/// A task's hold on its token: it leaves the table when dropped.
pub(crate) struct Started<'a> {
    cancels: &'a Cancels,
    task: TaskId,
    pub token: CancellationToken,
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        self.cancels
            .entries
            .remove_if(&self.task, |_, e| matches!(e, Entry::Running(_)));
    }
}

impl Cancels {
    /// `task` starts here: its token, already cancelled if a cancel came
    /// first.
    pub(crate) fn start(&self, task: TaskId) -> Started<'_> {
        let token = CancellationToken::new();
        let previous = self.entries.insert(task, Entry::Running(token.clone()));
        match previous {
            // Cancelled before it came; or run again here while a first
            // run, cancelled, still goes.
            Some(Entry::Early(_)) => token.cancel(),
            Some(Entry::Running(first)) if first.is_cancelled() => token.cancel(),
            _ => {}
        }
        Started {
            cancels: self,
            task,
            token,
        }
    }

    /// Cancels `task`: true if it runs here now; otherwise it is
    /// remembered for a while, and never starts if it comes.
    pub(crate) fn cancel(&self, task: TaskId) -> bool {
        let running = match self.entries.get(&task).as_deref() {
            Some(Entry::Running(token)) => {
                token.cancel();
                true
            }
            _ => false,
        };
        if !running {
            if self.entries.len() >= EARLY_MAX {
                self.forget_early();
            }
            self.entries
                .entry(task)
                .and_modify(|e| {
                    if let Entry::Running(token) = e {
                        token.cancel();
                    }
                })
                .or_insert(Entry::Early(Instant::now()));
        }
        running
    }

    /// Whether `task`, running here, has been cancelled.
    pub(crate) fn is_cancelled(&self, task: TaskId) -> bool {
        match self.entries.get(&task).as_deref() {
            Some(Entry::Running(token)) => token.is_cancelled(),
            Some(Entry::Early(_)) => true,
            None => false,
        }
    }

    /// Drops early cancels past their time, or all of them when the table
    /// is still full.
    fn forget_early(&self) {
        let now = Instant::now();
        self.entries
            .retain(|_, e| !matches!(e, Entry::Early(at) if now - *at > EARLY_KEPT));
        if self.entries.len() >= EARLY_MAX {
            self.entries.retain(|_, e| matches!(e, Entry::Running(_)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_before_the_task_comes_cancels_it_when_it_does() {
        let cancels = Cancels::default();
        let task = TaskId::fresh();
        assert!(!cancels.cancel(task), "not running yet");
        let started = cancels.start(task);
        assert!(started.token.is_cancelled());
        assert!(cancels.is_cancelled(task));
    }

    #[test]
    fn a_running_task_is_cancelled_and_leaves_no_entry() {
        let cancels = Cancels::default();
        let task = TaskId::fresh();
        {
            let started = cancels.start(task);
            assert!(!cancels.is_cancelled(task));
            assert!(cancels.cancel(task));
            assert!(started.token.is_cancelled());
        }
        assert!(!cancels.is_cancelled(task));
        assert_eq!(cancels.entries.len(), 0);
    }

    #[test]
    fn early_cancels_are_bounded() {
        let cancels = Cancels::default();
        let running = TaskId::fresh();
        let _started = cancels.start(running);
        for _ in 0..EARLY_MAX * 2 {
            cancels.cancel(TaskId::fresh());
        }
        assert!(cancels.entries.len() <= EARLY_MAX);
        assert!(cancels.cancel(running), "running tasks are kept");
    }
}
