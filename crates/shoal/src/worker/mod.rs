//! The worker side of a Shoal process: the service every process serves
//! (tasks pushed to a worker, actor calls, objects asked of their owner),
//! running tasks, the running task's context, and the actor host.
//!
//! It depends on proto types and on its process only through [`Process`],
//! a narrow handle: reading arguments and storing results go through it,
//! so this module knows nothing of connections, leases or the owner's
//! tables.

pub(crate) mod cancel;
pub(crate) mod context;
pub(crate) mod exec;
pub(crate) mod gates;
pub(crate) mod host;
mod lane;
pub(crate) mod replies;
pub(crate) mod service;
pub(crate) mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{ArgSpec, JobId, ObjectId, ObjectValue, TaskId, TaskOutcome, WorkerId};

pub(crate) use context::Executor;

use crate::error::Result;

/// Who made a task's result: its function, the task, and the owner (the
/// store records the owner of a stored result).
pub(crate) type MadeBy<'a> = (&'a str, TaskId, Option<WorkerId>);

/// What the worker side needs of the process it runs in.
pub(crate) trait Process: Send + Sync + Sized + 'static {
    /// The process, once initialised.
    fn current() -> Option<Arc<Self>>;

    /// The job this process belongs to.
    fn job_id(&self) -> JobId;

    /// The runtime the process's own work runs on.
    fn runtime(&self) -> &tokio::runtime::Handle;

    /// The actors this process hosts.
    fn host(&self) -> &host::Host;

    /// The task gates of the workers running here.
    fn gates(&self) -> &gates::Gates;

    /// The bytes of task arguments, stored ones read from their nodes.
    fn fetch_args(&self, args: &[ArgSpec])
        -> impl Future<Output = Result<crate::shm::Args>> + Send;

    /// A result: inline when small, else stored in this node's store.
    fn store_result(
        &self,
        id: ObjectId,
        bytes: Vec<u8>,
        made: MadeBy<'_>,
        executor: Executor,
    ) -> impl Future<Output = TaskOutcome> + Send;

    /// Whether this process still holds a reference `lender` lent it
    /// (see `owner::objects::Objects::keep_for`); if so, `lender` is told
    /// when it no longer does.
    fn keep_for(&self, id: ObjectId, lender: &shoal_proto::Address) -> bool;

    /// A worker this process lent `id` to no longer holds it.
    fn release_borrower(&self, id: ObjectId, worker: WorkerId);

    /// The tasks and actor calls running here that may be cancelled.
    fn cancels(&self) -> &cancel::Cancels;

    /// Where the generators running here yield to.
    fn sinks(&self) -> &stream::Sinks;

    /// An item of a generator this process owns, from its worker (see
    /// `WorkerRequest::GeneratorItem`).
    fn generator_item(
        self: &Arc<Self>,
        task_id: TaskId,
        index: u32,
        item: TaskOutcome,
    ) -> impl Future<Output = shoal_proto::WorkerReply> + Send;

    /// Cancels what `task`, run here, submitted (recursively).
    fn cancel_children(self: &Arc<Self>, task: TaskId);

    /// Cancels the run making `id`, an object this process owns (asked by
    /// a process that holds a reference to it).
    fn cancel_owned(self: &Arc<Self>, id: ObjectId, force: bool);

    /// An object this process owns, for a borrower: waits up to `wait`.
    fn object_value(
        &self,
        id: ObjectId,
        wait: Duration,
    ) -> impl Future<Output = ObjectValue> + Send;
}
