//! What the simulated processes say to each other, and their timers.
//!
//! Messages carry the simulation's own numbers (node indexes, lease and
//! task numbers, node ids made from a counter), never random ids, so a
//! message's text is the same on every run of a seed.

/// A process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pid(pub u32);

/// A request's number, unique per run: its reply carries it back.
pub type Tag = u64;

pub const HEAD: Pid = Pid(0);
pub const DRIVER: Pid = Pid(1);

/// The node daemon of node `index`.
pub fn node_pid(index: usize) -> Pid {
    Pid(10 + index as u32)
}

/// Node ids are numbers here (the head's tables take them as `NodeId`s).
pub type NodeNo = u128;

#[derive(Clone, Debug)]
pub enum Msg {
    // Node daemons and the head.
    Register {
        node: usize,
    },
    Registered {
        node_id: NodeNo,
    },
    Heartbeat {
        node_id: NodeNo,
    },
    Fenced,
    /// Stop the worker of this lease (its owner died).
    KillLease {
        lease: u64,
    },
    /// A worker that owned tasks died on a live node.
    OwnerDied {
        owner: Pid,
    },

    // Owners and the head.
    RequestLease {
        tag: Tag,
        request_id: u64,
        owner_node: Option<NodeNo>,
        wait: bool,
    },
    LeaseGranted {
        tag: Tag,
        lease: u64,
        node: usize,
        node_id: NodeNo,
        room: bool,
    },
    LeasePending {
        tag: Tag,
    },
    ReturnLease {
        tag: Tag,
        lease: u64,
    },
    SetBlocked {
        tag: Tag,
        lease: u64,
        blocked: bool,
    },
    NodeDied {
        node_id: NodeNo,
    },

    // Owners and node daemons.
    GrantWorker {
        tag: Tag,
        lease: u64,
        owner: Pid,
    },
    WorkerGranted {
        tag: Tag,
        worker: Pid,
    },
    NoWorker {
        tag: Tag,
    },
    ReleaseWorker {
        tag: Tag,
        lease: u64,
        kill: bool,
    },
    /// The answer to an idempotent control request.
    Ack {
        tag: Tag,
    },

    // Owners and workers.
    Push {
        tag: Tag,
        task: u64,
        attempt: u32,
        arg: i64,
        fanout: u32,
        /// The driver's object whose reference the argument holds.
        lent: Option<u64>,
    },
    Done {
        tag: Tag,
        task: u64,
        value: Result<i64, String>,
        node_id: NodeNo,
        /// The worker still holds the reference it borrowed.
        kept: bool,
    },

    /// The connection a request went on failed: no reply will come.
    Lost {
        tag: Tag,
    },

    // Actors.
    GetActor {
        tag: Tag,
        known: Option<u32>,
    },
    ActorAt {
        tag: Tag,
        incarnation: u32,
        worker: Pid,
        node_id: NodeNo,
    },
    ActorNotYet {
        tag: Tag,
    },
    ActorGone {
        tag: Tag,
    },
    /// Orders go to one node id: a host that came back as a new node
    /// ignores its old self's.
    StartActor {
        incarnation: u32,
        node_id: NodeNo,
    },
    ActorStarted {
        incarnation: u32,
        worker: Pid,
        node_id: NodeNo,
    },
    ActorCall {
        tag: Tag,
        incarnation: u32,
        seq: u64,
    },
    ActorReply {
        tag: Tag,
        incarnation: u32,
        seq: u64,
        value: u64,
        node_id: NodeNo,
    },
}

impl Msg {
    /// The tag of a request that expects a reply.
    pub fn request_tag(&self) -> Option<Tag> {
        match self {
            Msg::RequestLease { tag, .. }
            | Msg::GrantWorker { tag, .. }
            | Msg::Push { tag, .. }
            | Msg::GetActor { tag, .. }
            | Msg::ActorCall { tag, .. }
            | Msg::ReturnLease { tag, .. }
            | Msg::SetBlocked { tag, .. }
            | Msg::ReleaseWorker { tag, .. } => Some(*tag),
            _ => None,
        }
    }

    /// The tag of a reply.
    pub fn reply_tag(&self) -> Option<Tag> {
        match self {
            Msg::LeaseGranted { tag, .. }
            | Msg::LeasePending { tag }
            | Msg::WorkerGranted { tag, .. }
            | Msg::NoWorker { tag }
            | Msg::Done { tag, .. }
            | Msg::ActorAt { tag, .. }
            | Msg::ActorNotYet { tag }
            | Msg::ActorGone { tag }
            | Msg::ActorReply { tag, .. }
            | Msg::Ack { tag } => Some(*tag),
            _ => None,
        }
    }

    /// The same request under another tag (a retry).
    pub fn with_tag(&self, new: Tag) -> Msg {
        let mut msg = self.clone();
        match &mut msg {
            Msg::ReturnLease { tag, .. }
            | Msg::SetBlocked { tag, .. }
            | Msg::ReleaseWorker { tag, .. } => *tag = new,
            _ => {}
        }
        msg
    }
}

#[derive(Clone, Debug)]
pub enum Timer {
    Heartbeat {
        boot: u64,
    },
    Sweep,
    /// A held lease request's wait is over.
    HoldExpired {
        tag: Tag,
    },
    /// A lease request is due (the machine's pause is over).
    Ask {
        key: u64,
    },
    /// Send an idempotent control request again.
    Retry {
        tag: Tag,
    },
    /// Ask again to give up a lease request.
    Abandon {
        request_id: u64,
    },
    /// A lease's idle clock ran out.
    Idle {
        lease: u64,
        epoch: u64,
    },
    /// The task running on this worker ends.
    TaskEnd,
    /// The driver submits its next task, or makes its next actor call.
    Submit {
        index: u64,
    },
    Call {
        index: u64,
    },
    /// Ask the head where the actor lives.
    Locate,
    /// Send an actor call again.
    Resend {
        seq: u64,
    },
    /// Faults.
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    Cut {
        node: usize,
    },
    Heal {
        node: usize,
    },
}
