//! Cancelling what runs here. Only cancelled tasks and calls are recorded
//! (a running one costs nothing until then: two atomic reads to ask), with
//! one notifier for all: a cancel wakes every waiter, each of which looks
//! for its own task. A cancel that comes before its task (it raced the
//! push, or an actor call waits for its turn) is kept for a while, so such
//! a task never starts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use shoal_proto::TaskId;
use tokio::sync::Notify;

/// Cancels are kept this long at most once their task is not running.
const KEPT: Duration = Duration::from_secs(120);
/// And this many at most (the oldest go first past it).
const KEPT_MAX: usize = 4096;

#[derive(Default)]
struct Inner {
    /// The cancelled tasks, and when.
    cancelled: DashMap<TaskId, Instant>,
    /// `cancelled`'s size: zero, nothing needs looking up.
    count: AtomicUsize,
    /// Woken by every cancel.
    changed: Notify,
}

/// The cancelled tasks and calls of this process.
#[derive(Clone, Default)]
pub(crate) struct Cancels {
    inner: Arc<Inner>,
}

/// One task's view of the cancels: whether it is cancelled, and a wait
/// for it. It forgets the task's cancel when dropped.
pub(crate) struct Watch {
    inner: Arc<Inner>,
    task: TaskId,
}

impl Cancels {
    /// `task` starts here.
    pub(crate) fn watch(&self, task: TaskId) -> Watch {
        Watch {
            inner: Arc::clone(&self.inner),
            task,
        }
    }

    /// Cancels `task`, running here or yet to come.
    pub(crate) fn cancel(&self, task: TaskId) {
        let inner = &self.inner;
        if inner.count.load(Ordering::Acquire) >= KEPT_MAX {
            self.forget_old();
        }
        if inner.cancelled.insert(task, Instant::now()).is_none() {
            inner.count.fetch_add(1, Ordering::AcqRel);
        }
        inner.changed.notify_waiters();
    }

    /// Whether `task` has been cancelled.
    pub(crate) fn is_cancelled(&self, task: TaskId) -> bool {
        is_cancelled(&self.inner, task)
    }

    /// Drops cancels past their time, or all when still too many.
    fn forget_old(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        inner.cancelled.retain(|_, at| now - *at <= KEPT);
        if inner.cancelled.len() >= KEPT_MAX {
            inner.cancelled.clear();
        }
        inner.count.store(inner.cancelled.len(), Ordering::Release);
    }
}

fn is_cancelled(inner: &Inner, task: TaskId) -> bool {
    inner.count.load(Ordering::Acquire) > 0 && inner.cancelled.contains_key(&task)
}

impl Watch {
    /// Whether the task has been cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        is_cancelled(&self.inner, self.task)
    }

    /// Resolves once the task is cancelled.
    pub(crate) async fn cancelled(&self) {
        crate::rt::notified_until(&self.inner.changed, || self.is_cancelled()).await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let inner = &self.inner;
        if inner.count.load(Ordering::Acquire) > 0 && inner.cancelled.remove(&self.task).is_some() {
            inner.count.fetch_sub(1, Ordering::AcqRel);
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
        cancels.cancel(task);
        let watch = cancels.watch(task);
        assert!(watch.is_cancelled());
        assert!(cancels.is_cancelled(task));
    }

    #[test]
    fn a_running_task_is_cancelled_and_its_cancel_goes_with_it() {
        let cancels = Cancels::default();
        let task = TaskId::fresh();
        {
            let watch = cancels.watch(task);
            assert!(!watch.is_cancelled());
            cancels.cancel(task);
            assert!(watch.is_cancelled());
        }
        assert!(!cancels.is_cancelled(task));
        assert_eq!(cancels.inner.count.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_waiter_wakes_for_its_own_task_only() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let cancels = Cancels::default();
            let (mine, other) = (TaskId::fresh(), TaskId::fresh());
            let watch = cancels.watch(mine);
            cancels.cancel(other);
            let early = tokio::time::timeout(Duration::from_millis(20), watch.cancelled()).await;
            assert!(early.is_err(), "another task's cancel");
            let wait = watch.cancelled();
            tokio::pin!(wait);
            assert!(futures_util::poll!(wait.as_mut()).is_pending());
            cancels.cancel(mine);
            wait.await;
        });
    }

    #[test]
    fn cancels_are_bounded() {
        let cancels = Cancels::default();
        let running = TaskId::fresh();
        let watch = cancels.watch(running);
        for _ in 0..KEPT_MAX * 2 {
            cancels.cancel(TaskId::fresh());
        }
        assert!(cancels.inner.cancelled.len() <= KEPT_MAX);
        cancels.cancel(running);
        assert!(watch.is_cancelled());
    }
}
