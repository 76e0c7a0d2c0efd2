//! The errors users see.

use std::fmt;
use std::time::Duration;

use shoal_proto::{FailureKind, NodeId, ObjectId, TaskFailure, TaskId};

/// A task that failed: which function, which task, where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskError {
    /// The function's registered name.
    pub function: String,
    /// The task.
    pub task_id: TaskId,
    /// The node it ran on, if it ran.
    pub node_id: Option<NodeId>,
    /// The error's text, or the panic message.
    pub message: String,
    /// For panics: the backtrace on the worker.
    pub backtrace: Option<String>,
    /// True if the function panicked (rather than returned `Err`).
    pub panicked: bool,
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.panicked { "panicked" } else { "failed" };
        write!(f, "task {} ({}) {what}", self.task_id, self.function)?;
        if let Some(node) = self.node_id {
            write!(f, " on node {node}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What can go wrong in Shoal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A remote function returned `Err` or panicked.
    #[error("{0}")]
    Task(Box<TaskError>),
    /// The worker running a task died on every attempt (`max_retries` + 1).
    #[error("task {task_id} ({function}) lost its worker {attempts} time(s): {message}")]
    WorkerCrashed {
        /// The function.
        function: String,
        /// The task.
        task_id: TaskId,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// The actor is gone: its process or node died, or it was killed.
    #[error("actor of class {class} died: {message}")]
    ActorDied {
        /// The actor's class.
        class: String,
        /// What happened, with the actor's id.
        message: String,
    },
    /// An actor call's reply was lost and, when it was asked for again, the
    /// actor had already dropped it (it keeps 4096 per caller): the call ran
    /// once and is not run again, but its result is gone.
    #[error("{function}: {message}")]
    ReplyDropped {
        /// The method called.
        function: String,
        /// Details.
        message: String,
    },
    /// Another live actor has this name in its namespace.
    #[error("{0}")]
    ActorNameTaken(String),
    /// An actor handle already has `max_pending_calls` calls waiting.
    #[error("{function}: {message}")]
    PendingCallsExceeded {
        /// The method called.
        function: String,
        /// Details.
        message: String,
    },
    /// The worker does not have the function (another build of the program,
    /// or an unknown id).
    #[error("function {function} is not registered in the worker on node {node_id:?}: {message}")]
    FunctionNotFound {
        /// The function asked for.
        function: String,
        /// Where.
        node_id: Option<NodeId>,
        /// Details.
        message: String,
    },
    /// An object can no longer be read.
    #[error("object {id} is lost: {reason}")]
    ObjectLost {
        /// The object.
        id: ObjectId,
        /// Why.
        reason: String,
    },
    /// A borrowed object's owner (the process that made or put it) died,
    /// so the object cannot be read (as in Ray, a `put` object dies with
    /// its owner).
    #[error("object {id} is lost with its owner: {reason}")]
    OwnerDied {
        /// The object.
        id: ObjectId,
        /// Why.
        reason: String,
    },
    /// A value did not decode as the expected type.
    #[error("cannot decode {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why.
        message: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why.
        message: String,
    },
    /// `wait` or a `get` with a deadline ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A blocking `get` was called on a single-threaded async runtime, where
    /// it would deadlock.
    #[error("blocking get() inside a single-threaded async runtime would deadlock; use `object_ref.await` instead")]
    BlockingGetInAsync,
    /// Shoal is not initialised, or failed to.
    #[error("shoal is not initialised: {0}")]
    NotInitialized(String),
    /// The object store has no room (the message says how full it is).
    #[error("{0}")]
    ObjectStoreFull(String),
    /// No connection to the cluster could be made.
    #[error("cannot connect to the cluster: {0}")]
    Connect(#[from] shoal_net::ConnectError),
    /// A request to the cluster failed.
    #[error("request to the cluster failed: {0}")]
    Rpc(#[from] shoal_net::RpcError),
    /// The head could not be reached for longer than
    /// `Config::head_timeout` (it died and was not restarted in time):
    /// a call to it, or a task waiting for a worker, gave up.
    #[error("{0}; restart it with `shoal start --head --recover`")]
    HeadUnavailable(String),
    /// The in-process cluster of local mode could not start, or a verb on a
    /// `shoal::LocalCluster` failed. The cause is a
    /// `shoal::LocalError` (`err.downcast_ref::<shoal::LocalError>()`);
    /// it is boxed so this enum is the same with and without the `local`
    /// feature.
    #[error("local cluster: {0}")]
    LocalCluster(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The cluster identity could not be made.
    #[error("cluster identity: {0}")]
    Identity(#[from] shoal_net::IdentityError),
    /// The cluster answered something this SDK does not expect.
    #[error("unexpected reply from the cluster: {0}")]
    Protocol(String),
    /// Something named does not exist (an actor looked up by name).
    #[error("{0}")]
    NotFound(String),
    /// Options that cannot be used, and why.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The task or actor can never be placed as asked: a hard node
    /// affinity to a node that is not alive (or could never fit it).
    #[error("cannot be scheduled: {0}")]
    Unschedulable(String),
    /// The task or actor call was cancelled (`shoal::cancel`), or a task it
    /// was submitted from was.
    #[error("task {task_id} ({function}) was cancelled: {message}")]
    Cancelled {
        /// The function or method.
        function: String,
        /// The task or call.
        task_id: TaskId,
        /// Details (forced or not).
        message: String,
    },
}

impl Error {
    /// The error a failed task's caller sees.
    pub(crate) fn from_failure(f: TaskFailure) -> Self {
        match f.kind {
            FailureKind::FunctionNotFound => Error::FunctionNotFound {
                function: f.function,
                node_id: f.node_id,
                message: f.message,
            },
            FailureKind::ActorDied => Error::ActorDied {
                class: f.function,
                message: f.message,
            },
            FailureKind::ReplyDropped => Error::ReplyDropped {
                function: f.function,
                message: f.message,
            },
            FailureKind::PendingCallsExceeded => Error::PendingCallsExceeded {
                function: f.function,
                message: f.message,
            },
            FailureKind::HeadUnavailable => Error::HeadUnavailable(f.message),
            FailureKind::Unschedulable => Error::Unschedulable(f.message),
            FailureKind::InvalidOptions => Error::InvalidOptions(f.message),
            FailureKind::Cancelled => Error::Cancelled {
                function: f.function,
                task_id: f.task_id,
                message: f.message,
            },
            FailureKind::Timeout => {
                Error::Timeout(Duration::from_millis(f.after_ms.unwrap_or_default()))
            }
            FailureKind::WorkerCrashed => Error::WorkerCrashed {
                function: f.function,
                task_id: f.task_id,
                attempts: f.attempts,
                message: f.message,
            },
            kind => Error::Task(Box::new(TaskError {
                function: f.function,
                task_id: f.task_id,
                node_id: f.node_id,
                message: f.message,
                backtrace: f.backtrace,
                panicked: kind == FailureKind::Panic,
            })),
        }
    }
}

#[cfg(feature = "local")]
impl From<shoal_local::LocalError> for Error {
    fn from(e: shoal_local::LocalError) -> Self {
        Error::LocalCluster(Box::new(e))
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(all(test, feature = "local"))]
mod tests {
    use super::*;

    #[test]
    fn a_local_cluster_error_keeps_its_type_and_says_where_it_comes_from() {
        let err = Error::from(shoal_local::LocalError::NoNode(3));
        assert_eq!(err.to_string(), "local cluster: no local node 3");
        let Error::LocalCluster(cause) = &err else {
            panic!("{err:?}");
        };
        assert!(matches!(
            cause.downcast_ref::<shoal_local::LocalError>(),
            Some(shoal_local::LocalError::NoNode(3))
        ));
        assert!(std::error::Error::source(&err).is_some());
    }
}
