//! Shoal's wire protocol, with no I/O: everything two Shoal processes say to
//! each other is defined here, and so is the way it is framed on a stream.
//!
//! Modules:
//! - [`ids`]: typed identifiers (`NodeId`, `JobId`, `TaskId`, ...), newtypes over
//!   UUIDs so that one kind of id can never be passed where another is expected.
//! - [`hello`]: the handshake that opens every connection and binds it to a
//!   protocol version, a cluster and a role.
//! - [`head`]: the head service's request/reply pair.
//! - [`node`]: the node daemon service's request/reply pair.
//! - [`rpc`]: the envelopes that carry a request id and a deadline around every
//!   request and reply, and the typed error a service answers with.
//! - [`resources`]: resource sets (`CPU`, `GPU`, `memory`, custom names).
//! - [`placement`]: node labels, label selectors and scheduling strategies.
//! - [`task`]: task specifications, replies and failures.
//! - [`env`]: the environment variables a worker is started with.
//! - [`worker`]: the worker service (tasks pushed by owners) and object
//!   requests to an owner.
//! - [`codec`]: the frame codec: a length prefix checked against a configured
//!   maximum before anything is allocated, and a MessagePack body whose nesting
//!   depth and claimed lengths are checked before it is decoded.
//! - [`hex`]: the workspace's one hex encoder and decoder (content hashes,
//!   the host identity, the join token's secret, golden bytes).
//!
//! # Wire compatibility
//! Control messages are MessagePack maps with field names (`rmp_serde`'s named
//! encoding), so a field can be added later: new fields carry
//! `#[serde(default)]`, and variants are never renamed or removed. Golden-bytes
//! tests in [`codec`] pin the encoding; a change that breaks them breaks peers.
//! This crate must never depend on tokio or quinn: the stream loop lives in
//! `shoal-net`.

#![warn(missing_docs)]

pub mod chunk;
pub mod codec;
pub mod env;
pub mod head;
pub mod hello;
pub mod hex;
pub mod ids;
pub mod node;
pub mod placement;
pub mod resources;
pub mod roles;
pub mod rpc;
pub mod state;
pub mod task;
pub mod worker;

pub use chunk::{decode_shared, Chunk};
pub use codec::{CodecLimits, DecodeError, EncodeError, FrameError};
pub use env::EnvVars;
pub use head::{
    ActorInfo, ActorState, ClusterStatus, HeadReply, HeadRequest, NodeState, NodeStatus,
};
pub use hello::{HandshakeRefusal, Hello, HelloReply, Role, PROTOCOL_VERSION};
pub use ids::*;
pub use node::{NodeReply, NodeRequest, PullPriority};
pub use resources::ResourceSet;
pub use roles::{Rpc, HEAD_RPCS, NODE_RPCS, WORKER_RPCS};
pub use rpc::{ReplyEnvelope, RequestEnvelope, ServiceError, ServiceErrorKind};
pub use task::{
    Address, ArgSpec, FailureKind, FunctionId, StoredAt, TaskFailure, TaskOutcome, TaskReply,
    TaskSpec,
};
pub use worker::{ObjectValue, WorkerReply, WorkerRequest};
