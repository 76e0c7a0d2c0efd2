//! Streaming generators, on the worker: where the items of each generator
//! running here go (its owner), looked up by the task's id from inside
//! the function as it yields.

use dashmap::DashMap;
use shoal_proto::{Address, TaskId};

use super::Executor;

/// A generator running here: whom it yields to.
#[derive(Clone, Debug)]
pub(crate) struct Sink {
    pub owner: Address,
    pub attempt: u32,
    pub executor: Executor,
    pub function: String,
}

/// The generators running in this process.
#[derive(Default)]
pub(crate) struct Sinks {
    running: DashMap<TaskId, Sink>,
}

/// A generator's hold on its sink: it leaves the table when dropped.
pub(crate) struct Streaming<'a> {
    sinks: &'a Sinks,
    task: TaskId,
}

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        self.sinks.running.remove(&self.task);
    }
}

impl Sinks {
    /// `task`, a generator, starts here.
    pub(crate) fn start(&self, task: TaskId, sink: Sink) -> Streaming<'_> {
        self.running.insert(task, sink);
        Streaming { sinks: self, task }
    }

    /// Where `task`'s items go, if it is a generator running here.
    pub(crate) fn get(&self, task: TaskId) -> Option<Sink> {
        self.running.get(&task).map(|s| s.clone())
    }
}
