//! The node daemon service, spoken between nodes (mutual TLS) and by clients.

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, LeaseId, NodeId, ObjectId, WorkerId};
use crate::resources::ResourceSet;
use crate::task::Address;

/// A request to a node daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum NodeRequest {
    /// Liveness and identity check.
    Ping,
    /// The node's own view of itself.
    GetNodeInfo,
    /// A lease holder asks for a worker of its job to run its tasks on.
    GrantWorker {
        /// The lease the head granted on this node.
        lease_id: LeaseId,
        /// The job.
        job_id: JobId,
        /// Hex SHA-256 of the job's executable.
        binary_hash: String,
        /// The resources the lease holds.
        resources: ResourceSet,
        /// The job's driver, where the worker's output is streamed.
        #[serde(default)]
        driver: Option<Address>,
        /// A fresh worker for this lease alone (an actor), never reused and
        /// stopped when the lease ends.
        #[serde(default)]
        dedicated: bool,
        /// A dedicated worker that outlives its job (a detached actor).
        #[serde(default)]
        detached: bool,
        /// The process the lease was granted to, and the node hosting it
        /// when it is a worker: the node tells a restarted head.
        #[serde(default)]
        owner: Option<crate::WorkerId>,
        /// See `owner`.
        #[serde(default)]
        owner_node: Option<crate::NodeId>,
        /// Variables set in the worker's environment: a worker started
        /// with other variables is never handed out for this lease.
        #[serde(default, skip_serializing_if = "crate::EnvVars::is_empty")]
        env: crate::EnvVars,
    },
    /// Stops a worker of this node at once (an actor being killed).
    KillWorker {
        /// The worker.
        worker_id: WorkerId,
    },
    /// A lease holder is done with a worker.
    ReleaseWorker {
        /// The lease.
        lease_id: LeaseId,
        /// Stop the worker rather than keep it for reuse (it misbehaved).
        #[serde(default)]
        kill: bool,
    },
    /// A worker this node started says it is ready.
    RegisterWorker {
        /// The worker id the node gave it.
        worker_id: WorkerId,
        /// Where it serves.
        address: String,
        /// Its process id.
        pid: u32,
    },
    /// Write part of a large object into the node's store; the object is
    /// sealed (immutable, readable) once its last part is written.
    PutObject {
        /// The object.
        id: ObjectId,
        /// Where this part starts.
        offset: u64,
        /// The object's whole size.
        total: u64,
        /// The part.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// The process that owns the object.
        #[serde(default)]
        owner: Option<crate::ids::WorkerId>,
    },
    /// Read part of a sealed object.
    ReadObject {
        /// The object.
        id: ObjectId,
        /// Where the part starts.
        offset: u64,
        /// Most bytes wanted.
        len: u32,
    },
    /// A writer on this host starts an object: the node reserves room and
    /// creates its file in shared memory, which the writer fills and seals
    /// with [`NodeRequest::SealObject`].
    CreateObject {
        /// The object.
        id: ObjectId,
        /// Its size in bytes.
        total: u64,
        /// The process that owns the object.
        #[serde(default)]
        owner: Option<crate::ids::WorkerId>,
    },
    /// A local writer has filled the object's file.
    SealObject {
        /// The object.
        id: ObjectId,
    },
    /// A reader on this host asks for a sealed object's file in shared
    /// memory (brought back from disk if it was spilled), to map it.
    OpenObject {
        /// The object.
        id: ObjectId,
    },
    /// A process on this node's host needs an object stored on another
    /// node: this node pulls a copy (once, however many ask) and answers
    /// with its file, as [`NodeRequest::OpenObject`] does.
    PullObject {
        /// The object.
        id: ObjectId,
        /// Where its primary copy is.
        from: crate::task::StoredAt,
        /// What the asker needs it for: pulls start in this order.
        #[serde(default)]
        priority: PullPriority,
    },
    /// Free objects.
    DeleteObjects {
        /// The objects.
        ids: Vec<ObjectId>,
    },
    /// Answers as soon as any of the workers has exited (with those that
    /// have), or after `wait_ms` with none: one long poll for all of a
    /// process's workers on the node.
    WatchWorkers {
        /// The workers.
        worker_ids: Vec<WorkerId>,
        /// Longest wait.
        wait_ms: u64,
    },
    /// A worker's task is blocked waiting for other tasks' results (or has
    /// resumed): while blocked its lease's CPUs are lent back, so nested
    /// tasks cannot deadlock the cluster.
    WorkerBlocked {
        /// The worker.
        worker_id: WorkerId,
        /// True when it starts waiting, false when it resumes.
        blocked: bool,
    },
    /// The node's log files (its daemon's and its workers'): answered
    /// [`NodeReply::Logs`].
    ListLogs,
    /// Part of one of the node's log files: answered
    /// [`NodeReply::LogChunk`] (empty past the end).
    ReadLog {
        /// The file's name, as listed.
        name: String,
        /// Where to start.
        offset: u64,
        /// Most bytes (at most [`LOG_CHUNK_MAX`]).
        len: u32,
    },
}

/// Most bytes of a log file one [`NodeRequest::ReadLog`] returns.
pub const LOG_CHUNK_MAX: u32 = 1 << 20;

/// A log file on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct LogFile {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Whose it is: `head`, `node`, or `worker`.
    pub kind: String,
}

/// Why an object is pulled: when pulls queue, a `get` goes before a task's
/// arguments. (`wait` only checks readiness; it pulls nothing.)
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum PullPriority {
    /// A program waits in `get`.
    Get,
    /// A task's argument.
    #[default]
    Argument,
}

/// A reply from a node daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum NodeReply {
    /// Answer to [`NodeRequest::Ping`].
    Pong {
        /// The answering node.
        node_id: NodeId,
    },
    /// Answer to [`NodeRequest::GetNodeInfo`].
    NodeInfo {
        /// The node's id.
        node_id: NodeId,
        /// The node daemon's process id.
        pid: u32,
        /// Everything the node offers.
        resources_total: ResourceSet,
        /// What it has free.
        resources_available: ResourceSet,
        /// The directory of its object store's files: a process that sees
        /// it is on the node's host and may map objects directly.
        #[serde(default)]
        store_dir: String,
    },
    /// Of the watched workers, those that have exited (none: all alive).
    WorkersExited {
        /// The workers.
        worker_ids: Vec<WorkerId>,
    },
    /// A worker for the lease.
    WorkerGranted {
        /// Where the worker serves tasks.
        worker: Address,
    },
    /// Done.
    Ok,
    /// Whether the object is now sealed.
    ObjectWritten {
        /// True once the last part is written.
        sealed: bool,
    },
    /// An object's file in shared memory, and its size.
    ObjectFile {
        /// The file's path on the node's host.
        path: String,
        /// The object's size.
        size: u64,
    },
    /// The node's log files.
    Logs(Vec<LogFile>),
    /// Part of a log file.
    LogChunk {
        /// The file's size now.
        size: u64,
        /// The part.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Part of an object.
    ObjectChunk {
        /// The object's whole size.
        total: u64,
        /// The part (a slice of the reply's frame when read over QUIC).
        data: crate::Chunk,
    },
}
