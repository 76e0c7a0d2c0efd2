//! The head service: node membership, heartbeats and cluster status.

use serde::{Deserialize, Serialize};

use crate::ids::{ActorId, ClusterId, JobId, LeaseId, NodeId, ObjectId, WorkerId};
use crate::placement::{Labels, Placement};
use crate::resources::ResourceSet;
use crate::task::{Address, ArgSpec};

/// A request to the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum HeadRequest {
    /// A node daemon joins; the head answers [`HeadReply::NodeRegistered`].
    RegisterNode(RegisterNode),
    /// A node daemon is alive and has these resources free.
    Heartbeat {
        /// The node's id from its registration.
        node_id: NodeId,
        /// The resources the node has free now.
        resources_available: ResourceSet,
        /// Jobs with workers on this node: the head says which have finished.
        #[serde(default)]
        jobs: Vec<JobId>,
        /// Workers that died since the last heartbeat: their leases are reclaimed.
        #[serde(default)]
        dead_workers: Vec<WorkerId>,
        /// Bytes in use in the node's object store.
        #[serde(default)]
        object_store_used_bytes: u64,
        /// Copies of objects the node's store gained or lost since the last
        /// heartbeat, for the head's object directory.
        #[serde(default)]
        object_changes: Vec<ObjectCopyChange>,
        /// Objects the node has pulled from other nodes since it started.
        #[serde(default)]
        objects_pulled: u64,
        /// The `orders_seq` of the last acknowledgment the node acted on:
        /// the head sends orders again until they are acknowledged.
        #[serde(default)]
        orders_acked: u64,
        /// The key the node registered with, known only to it and the
        /// head: it binds a new connection (after a reconnect) to the node.
        /// A connection the node registered on needs none.
        #[serde(default)]
        registration_key: u64,
    },
    /// A node daemon leaves on purpose (graceful stop).
    UnregisterNode {
        /// The leaving node.
        node_id: NodeId,
        /// The key it registered with, for a connection that has not
        /// heartbeated yet (see `Heartbeat::registration_key`).
        #[serde(default)]
        registration_key: u64,
    },
    /// The node table and resource view.
    GetClusterStatus,
    /// A driver starts a job; the head answers [`HeadReply::JobRegistered`].
    RegisterJob(RegisterJob),
    /// A driver uploads part of its executable (content addressed).
    UploadBinary {
        /// Hex SHA-256 of the whole executable.
        hash: String,
        /// Where this part starts.
        offset: u64,
        /// The whole executable's size.
        total: u64,
        /// The part.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A node fetches part of a job's executable.
    FetchBinary {
        /// Hex SHA-256 of the executable.
        hash: String,
        /// Where the part starts.
        offset: u64,
        /// Most bytes wanted.
        len: u32,
    },
    /// An owner asks for a worker lease: resources on some node, held until
    /// returned. Answered when granted, or `LeasePending` after `wait_ms`.
    RequestLease(LeaseRequest),
    /// An owner gives a lease back.
    ReturnLease {
        /// The lease.
        lease_id: LeaseId,
    },
    /// A lease's worker is blocked (its resources lent back) or resumed
    /// (taken again, even past capacity for a while).
    LeaseBlocked {
        /// The lease.
        lease_id: LeaseId,
        /// Blocked or resumed.
        blocked: bool,
    },
    /// An owner created an actor: record where it lives (and reserve its
    /// name, refused if taken in its namespace). The spec is kept to run the
    /// constructor again when the actor may restart.
    RegisterActor {
        /// Where it lives, and its options.
        info: ActorInfo,
        /// How to create it again (boxed: the largest request).
        spec: Box<ActorSpec>,
    },
    /// The actor's record. With `known_incarnation`, the head holds the
    /// answer up to `wait_ms` while the actor is still that incarnation and
    /// not dead (a caller that saw its worker exit waits for the restart).
    GetActor {
        /// The actor.
        actor_id: ActorId,
        /// The incarnation the caller last used.
        #[serde(default)]
        known_incarnation: Option<u32>,
        /// How long to hold the answer.
        #[serde(default)]
        wait_ms: u64,
    },
    /// A node ran an actor's constructor again, as the head ordered (see
    /// [`HeadReply::HeartbeatAck`]), or failed to.
    ActorRestarted {
        /// The node reporting.
        node_id: NodeId,
        /// The actor.
        actor_id: ActorId,
        /// The incarnation the head ordered.
        incarnation: u32,
        /// The new worker, on success.
        worker: Option<Address>,
        /// Its process id.
        pid: u32,
        /// Why it failed, otherwise.
        failure: Option<String>,
    },
    /// The actor with this name in this namespace.
    GetNamedActor {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
    /// Ends an actor: its name is freed and its lease returned. The caller
    /// stops its worker through the node (the reply says where).
    KillActor {
        /// The actor.
        actor_id: ActorId,
        /// Forbid restarts: the actor ends for good. Otherwise an actor with
        /// restarts left comes back (the killed worker is reported dead).
        #[serde(default = "yes")]
        no_restart: bool,
    },
    /// Every actor the head knows.
    ListActors,
    /// Creates a placement group (idempotent per group id): answered at
    /// once with its record, `CREATED` if its bundles could be reserved
    /// now, else `PENDING` (it is placed when room appears).
    CreatePlacementGroup(Box<crate::placement::PlacementGroupSpec>),
    /// A placement group's record, once it is created or removed, or
    /// after `wait_ms`.
    WaitPlacementGroup {
        /// The group.
        group_id: crate::PlacementGroupId,
        /// How long the head may hold the request.
        wait_ms: u64,
    },
    /// Removes a placement group: what runs in its bundles is stopped and
    /// its resources freed. Removing a removed group changes nothing.
    RemovePlacementGroup {
        /// The group.
        group_id: crate::PlacementGroupId,
    },
    /// The live placement group with this name.
    GetNamedPlacementGroup {
        /// Its name.
        name: String,
    },
    /// Every object with a copy in some node's store.
    ListObjects,
    /// Task events from an owner; answered [`HeadReply::EventsTaken`].
    TaskEvents(Box<crate::state::EventBatch>),
    /// A listing of the state API (`shoal list`, `shoal get`); answered
    /// [`HeadReply::State`].
    ListState(crate::state::StateQuery),
    /// Counts by function (or class) and state (`shoal summary`);
    /// answered [`HeadReply::State`].
    Summarize(crate::state::StateKind),
    /// The live copies of one object, for a reader whose copy could not be
    /// reached; answered [`HeadReply::ObjectLocations`].
    LocateObject {
        /// The object.
        id: ObjectId,
    },
    /// `shoal job submit`: run a program as a job's driver on the head's
    /// machine. Answered [`HeadReply::JobSubmitted`]; when the head lacks
    /// the program or the working directory, nothing starts and the reply
    /// names what to upload ([`HeadRequest::UploadBinary`]) first.
    SubmitJob(Box<JobSubmission>),
    /// Part of a submitted job's output (its driver's stdout and stderr)
    /// from `offset`; answered [`HeadReply::JobLog`].
    JobLogs {
        /// The job.
        job_id: JobId,
        /// Where to start.
        offset: u64,
        /// Most bytes wanted (at most [`crate::node::LOG_CHUNK_MAX`]).
        len: u32,
    },
    /// Stops a submitted job: SIGTERM to its driver's process group, SIGKILL
    /// after a grace period. Answered [`HeadReply::JobStopping`].
    StopJob {
        /// The job.
        job_id: JobId,
    },
    /// A driver's job is over: its leases are reclaimed and workers stopped.
    FinishJob {
        /// The job.
        job_id: JobId,
    },
    /// A node that a restarted head asked to join again
    /// ([`HeadReply::RejoinAsked`]) says what it holds, and keeps its id.
    RejoinNode(Box<RejoinNode>),
    /// Sets a key of the internal key-value table (`overwrite: false`
    /// leaves an existing value); answered with [`HeadReply::KvWritten`].
    KvPut {
        /// The namespace.
        namespace: String,
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Replace an existing value.
        overwrite: bool,
    },
    /// A key's value ([`HeadReply::KvValue`]).
    KvGet {
        /// The namespace.
        namespace: String,
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Removes a key ([`HeadReply::KvWritten`], `true` if it was there).
    KvDelete {
        /// The namespace.
        namespace: String,
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// The keys of a namespace that start with `prefix`
    /// ([`HeadReply::KvKeys`]).
    KvKeys {
        /// The namespace.
        namespace: String,
        /// The prefix.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
    },
    /// The nodes declared dead after the `after`th death the head counted,
    /// held up to `wait_ms` while there is none: owners and callers stop
    /// using a dead node's workers (its late results are rejected), even
    /// when they can still reach it. Answered [`HeadReply::NodeDeaths`].
    WatchNodeDeaths {
        /// The newest death the caller knows (0: none).
        after: u64,
        /// How long the head may hold the request.
        wait_ms: u64,
    },
}

/// A change to the copies one node holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum ObjectCopyChange {
    /// A sealed copy is here.
    Added {
        /// The object.
        id: ObjectId,
        /// Its size.
        size: u64,
        /// The process that owns it, when known.
        owner: Option<WorkerId>,
        /// The owner's copy, not one pulled from elsewhere.
        primary: bool,
    },
    /// The copy moved to disk (`true`) or back to memory.
    Spilled {
        /// The object.
        id: ObjectId,
        /// On disk now.
        spilled: bool,
    },
    /// The copy is gone.
    Removed {
        /// The object.
        id: ObjectId,
    },
}

/// An object as the head's directory knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ObjectInfo {
    /// The object.
    pub id: ObjectId,
    /// Its size.
    pub size: u64,
    /// The process that owns it, when known.
    pub owner: Option<WorkerId>,
    /// Where its copies are.
    pub copies: Vec<ObjectCopy>,
}

/// One copy of an object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ObjectCopy {
    /// The node holding it.
    pub node_id: NodeId,
    /// The owner's copy, not one pulled from elsewhere.
    pub primary: bool,
    /// On disk rather than in shared memory.
    pub spilled: bool,
}

/// A driver's job registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct RegisterJob {
    /// The driver process's id.
    pub driver_pid: u32,
    /// Hex SHA-256 of the driver's executable, which workers run.
    pub binary_hash: String,
    /// Its size in bytes.
    pub binary_size: u64,
    /// Where the driver serves its owner requests.
    pub driver: Address,
    /// The submitted job this driver runs (`SHOAL_JOB_ID`, set by the head
    /// that started it): the driver takes that job's id instead of a new
    /// one.
    #[serde(default)]
    pub job_id: Option<JobId>,
}

/// A program to run as a job's driver (`shoal job submit`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct JobSubmission {
    /// The job's id, chosen by the submitter: a retried request starts
    /// nothing twice.
    pub job_id: JobId,
    /// The program's file name (no directory).
    pub program: String,
    /// Hex SHA-256 of the program, uploaded with
    /// [`HeadRequest::UploadBinary`].
    pub program_hash: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables set in its environment, besides those that lead it to the
    /// cluster.
    pub env: Vec<(String, String)>,
    /// Hex SHA-256 of the working directory as a tar archive, uploaded like
    /// the program; the driver runs in it, unpacked.
    pub working_dir_hash: Option<String>,
}

/// Most arguments and environment variables of a submitted job, together.
pub const SUBMIT_STRINGS_MAX: usize = 4096;
/// Most bytes of a submitted job's arguments and environment, together.
pub const SUBMIT_BYTES_MAX: usize = 1 << 20;

fn yes() -> bool {
    true
}

/// What the head needs to create an actor again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ActorSpec {
    /// The constructor's arguments.
    pub args: Vec<ArgSpec>,
    /// Calls that may run at once.
    pub max_concurrency: u32,
    /// The resources it holds.
    pub resources: ResourceSet,
    /// The process that created it (holds its lease).
    pub owner: WorkerId,
    /// Where it may be placed (again): strategy and label selectors.
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
    /// Variables set in its worker's environment.
    #[serde(default, skip_serializing_if = "crate::EnvVars::is_empty")]
    pub env: crate::EnvVars,
}

/// An order to a node: create this actor again in a new worker, under a
/// lease the head has granted, then report with
/// [`HeadRequest::ActorRestarted`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct RestartActor {
    /// The actor.
    pub actor_id: ActorId,
    /// Its new incarnation.
    pub incarnation: u32,
    /// Its class.
    pub class: String,
    /// How to create it.
    pub spec: ActorSpec,
    /// The lease on this node its worker holds.
    pub lease: Lease,
    /// The actor's job.
    pub job_id: JobId,
    /// The job's executable.
    pub binary_hash: String,
    /// The job's driver (which shows the worker's output).
    pub driver: Address,
    /// Outlives its job.
    pub detached: bool,
}

/// An actor as the head records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ActorInfo {
    /// The actor.
    pub actor_id: ActorId,
    /// Its class's registered name.
    pub class: String,
    /// Its name, if named.
    #[serde(default)]
    pub name: Option<String>,
    /// Its namespace (names are unique within one).
    #[serde(default)]
    pub namespace: String,
    /// Lives on after its creator's job ends, until killed.
    #[serde(default)]
    pub detached: bool,
    /// The job that created it.
    pub job_id: JobId,
    /// Its node.
    pub node_id: NodeId,
    /// Its node's address.
    pub node_address: String,
    /// Its worker.
    pub worker: Address,
    /// Its worker's process id.
    pub pid: u32,
    /// The lease holding its resources.
    pub lease_id: LeaseId,
    /// Alive, or dead (killed, or its worker or node died).
    pub state: ActorState,
    /// Calls a handle may have waiting (from its options).
    #[serde(default)]
    pub max_pending_calls: Option<u32>,
    /// Which life this is: 0 at creation, one more at each restart.
    #[serde(default)]
    pub incarnation: u32,
    /// Restarts allowed after its worker or node dies.
    #[serde(default)]
    pub max_restarts: u32,
    /// Restarts so far.
    #[serde(default)]
    pub num_restarts: u32,
    /// Times a call in flight when the actor died is sent again.
    #[serde(default)]
    pub max_task_retries: u32,
}

/// Whether an actor is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActorState {
    /// Running.
    Alive,
    /// Its worker died; its constructor is being run again.
    Restarting,
    /// Gone for good.
    Dead,
}

/// A request for a worker lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct LeaseRequest {
    /// The job the work belongs to.
    pub job_id: JobId,
    /// The process that will hold the lease.
    pub owner: WorkerId,
    /// The resources one task of this class holds.
    pub resources: ResourceSet,
    /// The node to prefer (the owner's own) when it fits.
    #[serde(default)]
    pub preferred_node: Option<NodeId>,
    /// How long the head may hold the request waiting for resources.
    pub wait_ms: u64,
    /// The same for every try of one request (0: none): a retry after a
    /// lost reply gets the lease the first try was granted, not a second.
    #[serde(default)]
    pub request_id: u64,
    /// The node hosting the owner, when the owner is a worker: if that
    /// node dies, the lease is reclaimed with it.
    #[serde(default)]
    pub owner_node: Option<NodeId>,
    /// The owner gives this request (`request_id`) up: its grant, if it
    /// has one, is answered (for the owner to return); if not, no try of
    /// the request still held or on its way is ever granted.
    #[serde(default)]
    pub abandon: bool,
    /// Where it may go beyond its resources: strategy, label selectors,
    /// locality.
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
}

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct Lease {
    /// The lease.
    pub lease_id: LeaseId,
    /// The node whose resources it holds.
    pub node_id: NodeId,
    /// That node's address.
    pub node_address: String,
    /// The resources held.
    pub resources: ResourceSet,
    /// Whether the cluster had room for another lease of this shape when
    /// this one was granted (else the holder queues work on the workers it
    /// has rather than waiting for more).
    #[serde(default)]
    pub room_for_another: bool,
}

/// What a node tells a restarted head when it joins it again: itself, and
/// the work and objects it kept through the head's outage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct RejoinNode {
    /// The id it had.
    pub node_id: NodeId,
    /// What it registered with.
    pub node: RegisterNode,
    /// The leases its workers hold.
    pub leases: Vec<HeldLease>,
    /// Its live workers.
    pub workers: Vec<WorkerId>,
    /// The sealed objects in its store (as `Added` changes).
    pub objects: Vec<ObjectCopyChange>,
}

/// A lease a node's worker holds, as the node reports it to a restarted head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct HeldLease {
    /// The lease.
    pub lease_id: LeaseId,
    /// Its job.
    pub job_id: JobId,
    /// The process it was granted to, when the node was told.
    pub owner: Option<WorkerId>,
    /// The node hosting that process, when it is a worker.
    pub owner_node: Option<NodeId>,
    /// What it holds.
    pub resources: ResourceSet,
    /// Its worker waits on other tasks (its resources lent back).
    pub blocked: bool,
    /// Its worker is a detached actor's (it outlives its job).
    pub detached: bool,
}

/// What a joining node says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct RegisterNode {
    /// The address the node serves its peers on (`host:port`).
    pub address: String,
    /// The node daemon's process id.
    pub pid: u32,
    /// The host's name, for humans.
    pub hostname: String,
    /// The host's identity (`shoal_net::host::host_id`): processes with the
    /// same one share loopback and shared memory with the node.
    #[serde(default)]
    pub host_id: String,
    /// Everything the node offers.
    pub resources_total: ResourceSet,
    /// True for the node daemon inside the head process.
    #[serde(default)]
    pub is_head_node: bool,
    /// Chosen by the node for this registration; a retried registration
    /// with the same key gets the same node id (the request is idempotent).
    #[serde(default)]
    pub registration_key: u64,
    /// The node's object store capacity in bytes.
    #[serde(default)]
    pub object_store_capacity_bytes: u64,
    /// Where the node serves its Prometheus metrics (`host:port`), if it
    /// does. Last, and left out when `None`: older peers read the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// Its labels (`--labels`, and `shoal.io/hostname`); the head adds
    /// `shoal.io/node-id`.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    #[cfg_attr(
        any(test, feature = "arbitrary"),
        proptest(strategy = "crate::placement::small_labels()")
    )]
    pub labels: Labels,
}

/// The part size of the uploads senders make ([`HeadRequest::upload_parts`]).
pub const UPLOAD_PART_BYTES: usize = 8 << 20;

impl HeadRequest {
    /// The [`HeadRequest::UploadBinary`] parts that carry `bytes`, whose hex
    /// SHA-256 is `hash`, in order.
    pub fn upload_parts<'a>(hash: &'a str, bytes: &'a [u8]) -> impl Iterator<Item = Self> + 'a {
        let total = bytes.len() as u64;
        bytes
            .chunks(UPLOAD_PART_BYTES)
            .enumerate()
            .map(move |(i, part)| Self::UploadBinary {
                hash: hash.to_string(),
                offset: (i * UPLOAD_PART_BYTES) as u64,
                total,
                data: part.to_vec(),
            })
    }

    /// A heartbeat with nothing to report but the resources free (a node
    /// with no jobs, workers or objects: tools and tests).
    pub fn idle_heartbeat(node_id: NodeId, resources_available: ResourceSet) -> Self {
        HeadRequest::Heartbeat {
            node_id,
            resources_available,
            jobs: Vec::new(),
            dead_workers: Vec::new(),
            object_store_used_bytes: 0,
            object_changes: Vec::new(),
            objects_pulled: 0,
            orders_acked: 0,
            registration_key: 0,
        }
    }
}

/// A reply from the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum HeadReply {
    /// The node is a member, under a new id.
    NodeRegistered(NodeRegistered),
    /// The heartbeat was recorded.
    HeartbeatAck {
        /// Of the jobs the node named, those that have finished: the node
        /// stops their workers.
        #[serde(default)]
        finished_jobs: Vec<JobId>,
        /// Actors to create again on this node.
        #[serde(default)]
        restart_actors: Vec<RestartActor>,
        /// Copies to delete: their primary copy is gone.
        #[serde(default)]
        delete_objects: Vec<ObjectId>,
        /// Leases whose owner died: the node stops their workers.
        #[serde(default)]
        release_leases: Vec<LeaseId>,
        /// The newest order's number: orders are sent with every
        /// acknowledgment until the node's `orders_acked` reaches it (a
        /// lost reply loses no order; the node acts on each once).
        #[serde(default)]
        orders_seq: u64,
    },
    /// The node is not (or no longer) a member: it was declared dead, or the
    /// head restarted. The node must register again, as a new node.
    NodeFenced {
        /// The id the head refused.
        node_id: NodeId,
    },
    /// The head restarted and remembers this node: it is to say what it
    /// holds ([`HeadRequest::RejoinNode`]) and keeps its id and work.
    RejoinAsked {
        /// The node.
        node_id: NodeId,
    },
    /// The node has left.
    NodeUnregistered,
    /// A key-value write: whether it changed the table.
    KvWritten {
        /// True if the value was set (or the key removed).
        changed: bool,
    },
    /// A key's value, if set.
    KvValue(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Keys.
    KvKeys(Vec<Vec<u8>>),
    /// The cluster's state.
    ClusterStatus(ClusterStatus),
    /// The job is registered.
    JobRegistered {
        /// The new job's id.
        job_id: JobId,
        /// Whether the head already has the driver's executable.
        binary_present: bool,
    },
    /// Part of an executable was stored.
    BinaryStored {
        /// True once the whole executable is stored and its hash checked.
        complete: bool,
    },
    /// Part of an executable.
    BinaryChunk {
        /// The whole executable's size.
        total: u64,
        /// The part.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A lease was granted.
    LeaseGranted(Lease),
    /// No lease yet: ask again. `infeasible` when no live node could ever
    /// fit the request (it is listed in the cluster status meanwhile).
    LeasePending {
        /// No live node has enough total resources.
        infeasible: bool,
    },
    /// The lease was returned (or was already gone).
    LeaseReturned,
    /// The request can never be granted as asked (a hard node affinity to
    /// a node that is not alive): its tasks fail with this reason.
    LeaseRefused {
        /// Why.
        reason: String,
    },
    /// An actor's record.
    Actor(ActorInfo),
    /// Every actor the head knows.
    Actors(Vec<ActorInfo>),
    /// A placement group's record.
    PlacementGroup(Box<crate::placement::PlacementGroupInfo>),
    /// Every object in the directory.
    Objects(Vec<ObjectInfo>),
    /// The task events were taken.
    EventsTaken,
    /// A listing or summary of the state API.
    #[cfg_attr(any(test, feature = "arbitrary"), proptest(skip))]
    State(Box<crate::state::StateRows>),
    /// A job was submitted (its driver is starting), unless `missing` names
    /// uploads the head needs first.
    JobSubmitted {
        /// The job.
        job_id: JobId,
        /// Hashes to upload before submitting again.
        missing: Vec<String>,
    },
    /// Part of a submitted job's output.
    JobLog {
        /// The bytes from the asked offset.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// The output's size now.
        size: u64,
        /// True once the driver has exited: the output grows no more.
        done: bool,
    },
    /// A stop was asked.
    JobStopping {
        /// False if the driver had already exited.
        running: bool,
    },
    /// Where an object's copies are, on live nodes: primary first.
    ObjectLocations(Vec<crate::task::StoredAt>),
    /// The job is over.
    JobFinished,
    /// Whether a node's restart report was taken: when not (the actor was
    /// killed meanwhile, or the report is stale), the node stops the worker.
    RestartAccepted {
        /// Taken.
        accepted: bool,
    },
    /// Nodes declared dead, oldest first.
    NodeDeaths {
        /// The newest death's number: the next request's `after`.
        seq: u64,
        /// The dead nodes after the request's `after` (the head keeps the
        /// most recent ones only; a caller far behind gets those).
        nodes: Vec<DeadNode>,
    },
}

/// A node the head declared dead (or that left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct DeadNode {
    /// Its id in the incarnation that died.
    pub node_id: NodeId,
    /// The address it served on.
    pub address: String,
}

/// The head's welcome to a new node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct NodeRegistered {
    /// The node's id for this incarnation.
    pub node_id: NodeId,
    /// How often the head expects a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The node's certificate for node-to-node mutual TLS (DER), signed by
    /// the cluster CA.
    #[serde(with = "serde_bytes")]
    pub node_cert_der: Vec<u8>,
    /// The private key of that certificate (PKCS#8 DER).
    #[serde(with = "serde_bytes")]
    pub node_key_der: Vec<u8>,
    /// The cluster CA certificate (DER), to verify peers with.
    #[serde(with = "serde_bytes")]
    pub ca_cert_der: Vec<u8>,
}

/// The cluster's node table and resource view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ClusterStatus {
    /// The cluster's id.
    pub cluster_id: ClusterId,
    /// Every node the head knows, alive or dead, in registration order.
    pub nodes: Vec<NodeStatus>,
    /// Handshakes the head has refused since it started.
    #[serde(default)]
    pub handshakes_refused: u64,
    /// Resource requests no live node can fit, waiting.
    #[serde(default)]
    pub infeasible: Vec<InfeasibleRequest>,
    /// Placement groups not removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement_groups: Vec<crate::placement::PlacementGroupInfo>,
}

/// A resource request that no live node can fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct InfeasibleRequest {
    /// The job asking.
    pub job_id: JobId,
    /// What it asks for.
    pub resources: ResourceSet,
    /// Where it asks for it (strategy and label selectors).
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
}

/// One node as the head sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: NodeId,
    /// The address the node serves peers on.
    pub address: String,
    /// Alive or dead.
    pub state: NodeState,
    /// The node daemon's process id.
    pub pid: u32,
    /// The host's name.
    pub hostname: String,
    /// The host's identity, as the node registered it.
    #[serde(default)]
    pub host_id: String,
    /// True for the node daemon inside the head process.
    pub is_head_node: bool,
    /// Everything the node offers.
    pub resources_total: ResourceSet,
    /// What it has free, as of its last heartbeat.
    pub resources_available: ResourceSet,
    /// Milliseconds since the head last heard from the node.
    pub last_heartbeat_ms_ago: u64,
    /// Bytes in use in its object store, as of its last heartbeat.
    #[serde(default)]
    pub object_store_used_bytes: u64,
    /// Its object store capacity.
    #[serde(default)]
    pub object_store_capacity_bytes: u64,
    /// Objects it has pulled from other nodes, as of its last heartbeat.
    #[serde(default)]
    pub objects_pulled: u64,
    /// Where it serves its Prometheus metrics (`host:port`), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// Its labels, the defaults included.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    #[cfg_attr(
        any(test, feature = "arbitrary"),
        proptest(strategy = "crate::placement::small_labels()")
    )]
    pub labels: Labels,
}

/// Whether a node is a live member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeState {
    /// Heartbeating within the timeout.
    Alive,
    /// Missed heartbeats past the timeout, or left. Never alive again: a
    /// restarted daemon joins as a new node.
    Dead,
}
