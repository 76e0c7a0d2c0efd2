//! The task running on this thread or async task, and the worker running
//! it: what nested submissions, `get`s and `shoal::context()` look up.

use std::future::Future;

use shoal_proto::{NodeId, TaskId, WorkerId};

/// What this process is, for the worker service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Executor {
    pub node_id: NodeId,
    pub worker_id: WorkerId,
}

/// The task being run, and by which worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Running {
    pub task: TaskId,
    pub executor: Executor,
}

tokio::task_local! {
    static TASK_SCOPE: Running;
}

thread_local! {
    static TASK_THREAD: std::cell::Cell<Option<Running>> = const { std::cell::Cell::new(None) };
}

fn running() -> Option<Running> {
    TASK_SCOPE
        .try_with(|t| *t)
        .ok()
        .or_else(|| TASK_THREAD.with(|t| t.get()))
}

/// The task running on this thread or async task, if any.
pub(crate) fn current_task() -> Option<TaskId> {
    running().map(|r| r.task)
}

/// The worker running the current task, if any.
pub(crate) fn current_executor() -> Option<Executor> {
    running().map(|r| r.executor)
}

/// Runs `f` as `running` on this thread.
pub(crate) fn with_current_task<R>(running: Running, f: impl FnOnce() -> R) -> R {
    let previous = TASK_THREAD.with(|t| t.replace(Some(running)));
    let out = f();
    TASK_THREAD.with(|t| t.set(previous));
    out
}

/// Runs `fut` as `running`.
pub(crate) async fn scope_current_task<F: Future>(running: Running, fut: F) -> F::Output {
    TASK_SCOPE.scope(running, fut).await
}
