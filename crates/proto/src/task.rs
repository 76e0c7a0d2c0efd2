//! Tasks: what an owner sends to a worker, and what comes back.

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, NodeId, ObjectId, TaskId, WorkerId};
use crate::resources::ResourceSet;

/// Names a registered remote function: its path (`module_path!()::name`) and
/// a hash of its signature, so that a worker built from other code refuses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct FunctionId {
    /// `module_path!()` and the function's name, joined by `::`.
    pub name: String,
    /// A hash of the function's signature as written.
    pub signature: u64,
}

/// Where a process that serves requests can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct Address {
    /// The worker (or driver) id of the process.
    pub worker_id: WorkerId,
    /// `host:port` of its QUIC endpoint.
    pub address: String,
}

/// Where a large object is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct StoredAt {
    /// The node holding it.
    pub node_id: NodeId,
    /// That node's address.
    pub node_address: String,
    /// Its size in bytes.
    pub size: u64,
}

/// One argument of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum ArgSpec {
    /// The encoded value itself.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A large object the executing worker fetches from a node store.
    Stored {
        /// The object.
        id: ObjectId,
        /// Where it is.
        at: StoredAt,
    },
}

/// A task, as its owner submits it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct TaskSpec {
    /// The task.
    pub task_id: TaskId,
    /// Which attempt this is (0 first).
    pub attempt: u32,
    /// The job it belongs to.
    pub job_id: JobId,
    /// The function to run.
    pub function: FunctionId,
    /// Its arguments, in order.
    pub args: Vec<ArgSpec>,
    /// Resources it holds while it runs.
    pub resources: ResourceSet,
    /// The process that submitted it and owns its result.
    pub owner: Address,
    /// Objects whose references travel inside the argument values (not
    /// as arguments themselves): the worker borrows them from the owner
    /// and says in its reply which it still holds when the task is done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub borrowed: Vec<ObjectId>,
}

/// What a task produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum TaskOutcome {
    /// The encoded return value.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A large return value, sealed in a node store.
    Stored(StoredAt),
    /// The function failed.
    Failed(TaskFailure),
}

/// The reply to a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct TaskReply {
    /// The task.
    pub task_id: TaskId,
    /// The attempt answered.
    pub attempt: u32,
    /// The node it ran on.
    pub node_id: NodeId,
    /// The worker it ran on.
    pub worker_id: WorkerId,
    /// Its result.
    pub outcome: TaskOutcome,
    /// How long the function ran, in microseconds (its wait for the
    /// worker's turn not included), when the worker says: the owner queues
    /// tasks behind a function's runs only while they are short.
    #[serde(default)]
    pub run_us: Option<u64>,
    /// When the function started, in microseconds since the Unix epoch on
    /// the worker's clock (for task events and the timeline).
    #[serde(default)]
    pub started_us: Option<u64>,
    /// Of the task's `borrowed` objects, those this worker still holds
    /// references to (or passed on) after the task: their owner keeps
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<ObjectId>,
    /// A function with several returns (`num_returns`): the second and
    /// later ones, each inline or stored by its own size (`outcome` is the
    /// first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_returns: Vec<TaskOutcome>,
}

/// Why a task failed, as its caller will see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct TaskFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The function's name.
    pub function: String,
    /// The task.
    pub task_id: TaskId,
    /// The node it ran on.
    pub node_id: Option<NodeId>,
    /// The error's text, or the panic message.
    pub message: String,
    /// The remote backtrace, for panics.
    #[serde(default)]
    pub backtrace: Option<String>,
    /// Attempts made (for `WorkerCrashed`).
    #[serde(default)]
    pub attempts: u32,
    /// For [`FailureKind::Timeout`]: the task's timeout, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
}

/// The kinds of [`TaskFailure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum FailureKind {
    /// The function returned `Err`.
    Error,
    /// The function panicked.
    Panic,
    /// The worker does not have this function (other code, or a bad id).
    FunctionNotFound,
    /// The arguments did not decode as the function's parameter types.
    BadArguments,
    /// The return value could not be encoded.
    BadReturn,
    /// An argument object could not be fetched.
    ArgumentLost,
    /// The worker (or its node) died on every attempt.
    WorkerCrashed,
    /// The actor is gone (its process or node died, or it was killed).
    ActorDied,
    /// The actor handle already has `max_pending_calls` calls waiting.
    PendingCallsExceeded,
    /// An actor call was resent after the actor had run it and dropped its
    /// kept reply (past the bound of replies kept per caller): it is not
    /// run again, and its result is lost.
    ReplyDropped,
    /// The task waited for a worker while the head could not be reached,
    /// for longer than its owner's bound.
    HeadUnavailable,
    /// The task can never be placed as asked (a hard node affinity to a
    /// node that is not alive).
    Unschedulable,
    /// The task's options cannot be used (a malformed label selector, a
    /// GPU count that is neither a fraction nor whole).
    InvalidOptions,
    /// The task was cancelled (`shoal::cancel`), or a task it was submitted
    /// from was.
    Cancelled,
    /// The task ran past its timeout and was cancelled.
    Timeout,
}
