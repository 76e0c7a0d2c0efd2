//! The worker service (an owner pushes tasks to a leased worker) and the
//! owner service (anyone holding a reference asks the owner for the object).

use serde::{Deserialize, Serialize};

use crate::ids::{ActorId, NodeId, ObjectId, TaskId, WorkerId};
use crate::task::{ArgSpec, StoredAt, TaskFailure, TaskOutcome, TaskReply, TaskSpec};

/// A request to a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum WorkerRequest {
    /// Run this task and answer with its result.
    PushTask(TaskSpec),
    /// Construct an actor in this (dedicated) worker.
    CreateActor {
        /// The actor.
        actor_id: ActorId,
        /// The actor class's registered name.
        class: String,
        /// The constructor's arguments.
        args: Vec<ArgSpec>,
        /// Calls that may run at once (threads for `&self` methods, tasks
        /// for `async` ones); `&mut self` methods always run alone.
        max_concurrency: u32,
        /// Which life of the actor this is.
        #[serde(default)]
        incarnation: u32,
    },
    /// Call a method of an actor hosted here. Calls from one caller start in
    /// `seq` order (0, 1, 2, ...), whatever order they arrive in.
    ActorCall(ActorCall),
    /// Lines a job's workers printed, for its driver to show.
    Logs(Vec<LogLine>),
    /// Get an object this process owns: answered when it is ready, or with
    /// `NotReady` after `wait_ms`.
    GetObject {
        /// The object.
        id: ObjectId,
        /// How long to wait for it to become ready.
        wait_ms: u64,
    },
    /// Stop running a task or actor call here (or, not started yet, never
    /// start it): `shoal::is_cancelled()` turns true in it, an async one is
    /// dropped at its next await, and the tasks it submitted are cancelled
    /// too. Answered `Ok` at once.
    CancelTask {
        /// The task, or the actor call.
        task_id: TaskId,
    },
    /// A streaming generator's next item, from the worker running it to
    /// the generator's owner. Answered [`WorkerReply::GeneratorAck`] once
    /// the caller is fewer than its backpressure behind (or after a while:
    /// `again`, and the item is sent again), or at once with `stop` if the
    /// caller dropped the generator. An item already had (a retried
    /// producer) is acknowledged and not kept again.
    GeneratorItem {
        /// The generator's task.
        task_id: TaskId,
        /// Which try of it yields this.
        attempt: u32,
        /// The item's place in the stream, from 0 (its object is the
        /// task's return `index + 1`).
        index: u32,
        /// The item: inline, or stored where the worker runs.
        item: TaskOutcome,
    },
    /// A borrower lets go: the worker `borrower`, which kept a reference
    /// this process lent it (in a task's or actor call's arguments, named
    /// in its reply's `kept`), no longer holds it. Answered `Ok`.
    ReleaseBorrow {
        /// The object.
        id: ObjectId,
        /// The worker (process) that held it.
        borrower: WorkerId,
    },
    /// Cancel the task that makes an object this process owns (asked by a
    /// process holding a reference to it). Answered `Ok`.
    CancelObject {
        /// The task's result.
        id: ObjectId,
        /// Also stop the worker running it.
        force: bool,
    },
}

/// A reply from a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum WorkerReply {
    /// A task's result.
    TaskDone(TaskReply),
    /// An object's value.
    Object(ObjectValue),
    /// Done.
    Ok,
    /// A streaming generator's item was taken.
    GeneratorAck {
        /// The caller dropped the generator: stop producing.
        stop: bool,
        /// The caller is still too far behind: send the item again.
        again: bool,
    },
    /// The actor was constructed, or why not.
    ActorCreated {
        /// The constructor's failure, if it failed.
        #[serde(default)]
        failure: Option<TaskFailure>,
        /// The hosting worker's process id.
        #[serde(default)]
        pid: u32,
    },
}

/// One call of an actor method.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ActorCall {
    /// The actor.
    pub actor_id: ActorId,
    /// Identifies the caller (a handle in one process): calls are ordered
    /// per caller.
    pub caller: WorkerId,
    /// The actor's incarnation the caller addresses: a call meant for an
    /// earlier life is refused, never run twice.
    #[serde(default)]
    pub incarnation: u32,
    /// The call's place in the caller's order, counted from 0 in each
    /// incarnation. A resend of a call (its reply was lost) carries the
    /// same `seq`: the host answers it with the reply it kept, never runs it
    /// twice.
    pub seq: u64,
    /// The caller's lowest `seq` at this incarnation still unanswered: it
    /// has the reply of every call below, so the host may forget them.
    #[serde(default)]
    pub done_below: u64,
    /// The id of this call (as a task, for its result object).
    pub task_id: TaskId,
    /// The method's name.
    pub method: String,
    /// Its arguments; `None` when the call was abandoned before it was sent
    /// (an argument failed): the actor only advances past `seq`.
    #[serde(default)]
    pub args: Option<Vec<ArgSpec>>,
    /// Objects whose references travel inside the argument values: the
    /// reply's `kept` says which the actor still holds after the call (it
    /// then borrows them from `lender` until it tells it otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub borrowed: Vec<ObjectId>,
    /// The calling process, which lent `borrowed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lender: Option<crate::task::Address>,
}

/// One line a worker printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct LogLine {
    /// The worker's process id.
    pub pid: u32,
    /// Its node.
    pub node_id: NodeId,
    /// True for standard error.
    pub stderr: bool,
    /// The line, without its newline.
    pub text: String,
}

/// An object as its owner has it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum ObjectValue {
    /// Not computed yet.
    NotReady,
    /// The encoded value.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Stored on a node.
    Stored(StoredAt),
    /// The task that makes it failed.
    Failed(TaskFailure),
    /// The owner does not know it (freed, or never existed).
    Unknown,
}
