//! The worker service (an owner pushes tasks to a leased worker) and the
//! owner service (anyone holding a reference asks the owner for the object).

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, ObjectId};
use crate::task::{StoredAt, TaskFailure, TaskReply, TaskSpec};

/// A request to a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum WorkerRequest {
    /// Run this task and answer with its result.
    PushTask(TaskSpec),
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
}

/// A reply from a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum WorkerReply {
    /// A task's result.
    TaskDone(TaskReply),
    /// An object's value.
    Object(ObjectValue),
    /// Done.
    Ok,
}

/// One line a worker printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
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
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
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
