//! Task events and the state API: what owners tell the head about their
//! tasks, and the listings (`shoal list | get | summary`) the head serves.

use serde::{Deserialize, Serialize};

use crate::ids::{ActorId, JobId, NodeId, TaskId, WorkerId};

/// Where a task (or actor call) is in its life (a number on the wire:
/// its index in [`TaskState::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum TaskState {
    /// Submitted; waiting for its reference arguments.
    PendingArgs,
    /// Arguments ready; waiting for a leased worker.
    PendingLease,
    /// Pushed to a worker (it runs there, or waits its turn on it).
    Running,
    /// Answered with a value.
    Finished,
    /// Failed (the attempt, or the task for good once no retry follows).
    Failed,
}

impl TaskState {
    /// Every state, in order.
    pub const ALL: [TaskState; 5] = [
        TaskState::PendingArgs,
        TaskState::PendingLease,
        TaskState::Running,
        TaskState::Finished,
        TaskState::Failed,
    ];

    /// The name users see (`PENDING_ARGS`, ... as in Ray's state API).
    pub fn name(self) -> &'static str {
        match self {
            TaskState::PendingArgs => "PENDING_ARGS",
            TaskState::PendingLease => "PENDING_LEASE",
            TaskState::Running => "RUNNING",
            TaskState::Finished => "FINISHED",
            TaskState::Failed => "FAILED",
        }
    }

    /// True once nothing follows (for the attempt).
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed)
    }
}

/// What kind of work a task event is about (a number on the wire: 0 for a
/// task, 1 for an actor call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum TaskKind {
    /// A remote function.
    Task,
    /// A method call on an actor.
    ActorCall,
}

impl TaskKind {
    /// The name users see.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Task => "NORMAL_TASK",
            TaskKind::ActorCall => "ACTOR_TASK",
        }
    }
}

/// What a task is, sent with its first event (its job and owner are the
/// batch's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct TaskInfo {
    /// The function's name (`Class::method` for an actor call): its index
    /// in the batch's `names`.
    pub name: u32,
    /// Task or actor call.
    pub kind: TaskKind,
    /// The actor called, for an actor call.
    pub actor_id: Option<ActorId>,
}

/// One owner's task events, in the order they happened: what
/// [`crate::HeadRequest::TaskEvents`] carries. What all its tasks share
/// (job, owner, the few function names) is sent once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct EventBatch {
    /// The owner's job.
    pub job_id: JobId,
    /// The process that submitted the tasks (their owner).
    pub owner: WorkerId,
    /// The function names the events' [`TaskInfo::name`] index (at most
    /// [`EVENTS_PER_BATCH_MAX`]).
    pub names: Vec<String>,
    /// The events (at most [`EVENTS_PER_BATCH_MAX`]).
    pub events: Vec<TaskEvent>,
    /// Events the owner's full buffer lost since its last batch.
    pub dropped: u64,
}

/// Where an attempt was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct Placed {
    /// The node.
    pub node_id: NodeId,
    /// The worker.
    pub worker_id: WorkerId,
}

/// One state change of one attempt of a task.
///
/// Owners send tens of thousands a second: on the wire an event, its
/// [`TaskInfo`] and [`Placed`] are arrays (no field names) and states
/// numbers, unlike the other messages.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct TaskEvent {
    /// The task (an actor call has a task id too).
    pub task_id: TaskId,
    /// The attempt (0 first).
    pub attempt: u32,
    /// The state entered.
    pub state: TaskState,
    /// When, in microseconds since the Unix epoch (the owner's clock).
    pub at_us: u64,
    /// What the task is: on its first event.
    pub info: Option<TaskInfo>,
    /// Where the attempt went: with `Running`, and with the final state
    /// when the worker answered.
    pub placed: Option<Placed>,
    /// When the function started and ended on its worker (microseconds
    /// since the Unix epoch, the worker's clock), when the worker answered.
    pub ran_us: Option<(u64, u64)>,
    /// Why it failed, with `Failed`.
    pub error: Option<String>,
    /// The states this attempt entered before `state` since the owner's
    /// last batch, oldest first, with their times: an owner sends one
    /// event per task and attempt in a batch (at most
    /// [`EARLIER_MAX`]).
    pub earlier: Vec<(TaskState, u64)>,
}

impl Serialize for TaskState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let i = u8::deserialize(d)?;
        TaskState::ALL
            .get(usize::from(i))
            .copied()
            .ok_or_else(|| serde::de::Error::custom(format!("no task state {i}")))
    }
}

impl Serialize for TaskKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

impl<'de> Deserialize<'de> for TaskKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u8::deserialize(d)? {
            0 => Ok(TaskKind::Task),
            1 => Ok(TaskKind::ActorCall),
            i => Err(serde::de::Error::custom(format!("no task kind {i}"))),
        }
    }
}

impl Serialize for TaskInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.name, self.kind, &self.actor_id).serialize(s)
    }
}

impl<'de> Deserialize<'de> for TaskInfo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (name, kind, actor_id) = Deserialize::deserialize(d)?;
        Ok(Self {
            name,
            kind,
            actor_id,
        })
    }
}

impl Serialize for Placed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.node_id, &self.worker_id).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Placed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (node_id, worker_id) = Deserialize::deserialize(d)?;
        Ok(Self { node_id, worker_id })
    }
}

impl Serialize for TaskEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (
            &self.task_id,
            self.attempt,
            self.state,
            self.at_us,
            &self.info,
            &self.placed,
            &self.ran_us,
            &self.error,
            &self.earlier,
        )
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for TaskEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (task_id, attempt, state, at_us, info, placed, ran_us, error, earlier) =
            Deserialize::deserialize(d)?;
        Ok(Self {
            task_id,
            attempt,
            state,
            at_us,
            info,
            placed,
            ran_us,
            error,
            earlier,
        })
    }
}

/// Most earlier states one event carries.
pub const EARLIER_MAX: usize = 8;

/// Now, in microseconds since the Unix epoch (0 before it).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Most events in one [`crate::HeadRequest::TaskEvents`] batch.
pub const EVENTS_PER_BATCH_MAX: usize = 10_000;

/// Bytes of an event's text (name, error) kept; the rest is cut.
pub const EVENT_TEXT_MAX: usize = 4 << 10;

/// What the state API lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum StateKind {
    /// Nodes, live and dead.
    Nodes,
    /// Jobs.
    Jobs,
    /// Tasks and actor calls, from their events.
    Tasks,
    /// Actors.
    Actors,
    /// Leased workers.
    Workers,
    /// Objects with a copy in a node's store.
    Objects,
    /// Placement groups.
    PlacementGroups,
}

impl StateKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StateKind::Nodes => "nodes",
            StateKind::Jobs => "jobs",
            StateKind::Tasks => "tasks",
            StateKind::Actors => "actors",
            StateKind::Workers => "workers",
            StateKind::Objects => "objects",
            StateKind::PlacementGroups => "placement-groups",
        }
    }
}

impl std::str::FromStr for StateKind {
    type Err = String;

    /// A kind by its name on the command line (`nodes`, `tasks`, ...).
    fn from_str(text: &str) -> Result<Self, String> {
        let all = [
            StateKind::Nodes,
            StateKind::Jobs,
            StateKind::Tasks,
            StateKind::Actors,
            StateKind::Workers,
            StateKind::Objects,
            StateKind::PlacementGroups,
        ];
        all.into_iter().find(|k| k.name() == text).ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|k| k.name()).collect();
            format!("no such kind {text:?}; one of {}", names.join(", "))
        })
    }
}

/// How a filter compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum FilterOp {
    /// `key=value`.
    Eq,
    /// `key!=value`.
    Ne,
}

/// One `--filter`: a field compared with a value, as text (ids in their
/// printed form; states by name, any case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct Filter {
    /// The field.
    pub key: String,
    /// Equal or not.
    pub op: FilterOp,
    /// The value.
    pub value: String,
}

impl std::str::FromStr for Filter {
    type Err = String;

    /// `key=value` or `key!=value`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (key, op, value) = if let Some((k, v)) = text.split_once("!=") {
            (k, FilterOp::Ne, v)
        } else if let Some((k, v)) = text.split_once('=') {
            (k, FilterOp::Eq, v)
        } else {
            return Err(format!(
                "{text:?} is not a filter: write key=value or key!=value"
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{text:?} has no key before the = sign"));
        }
        Ok(Filter {
            key: key.to_string(),
            op,
            value: value.trim().to_string(),
        })
    }
}

/// Most rows one listing returns.
pub const LIST_LIMIT_MAX: u32 = 10_000;

/// Most filters one query carries.
pub const FILTERS_MAX: usize = 16;

/// A `shoal list` or `shoal get`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct StateQuery {
    /// What to list.
    pub kind: StateKind,
    /// All must hold.
    pub filters: Vec<Filter>,
    /// Most rows (at most [`LIST_LIMIT_MAX`]).
    pub limit: u32,
    /// Every field, not only the main ones.
    pub detail: bool,
}

/// A field's value in a listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// None.
    Null,
    /// A flag.
    Bool(bool),
    /// A count, size or time.
    Int(i64),
    /// A fraction or resource amount.
    Float(f64),
    /// Text: ids, names, states.
    Str(String),
    /// A list of texts.
    List(Vec<String>),
    /// Records within the record (an object's copies, a task's events).
    Rows(Vec<Row>),
}

impl Value {
    /// The value as a filter compares it.
    pub fn as_text(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => s.clone(),
            Value::List(items) => items.join(","),
            Value::Rows(rows) => format!("{} records", rows.len()),
        }
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<u64> for Value {
    fn from(i: u64) -> Self {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::Int(i64::from(i))
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// One record: named fields, in display order.
pub type Row = Vec<(String, Value)>;

/// A listing's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateRows {
    /// The records, newest first for tasks and jobs.
    pub rows: Vec<Row>,
    /// How many records matched (more than `rows` when cut at the limit).
    pub matched: u64,
    /// True when `rows` stopped short of `matched` (the limit, or the
    /// reply's size bound).
    pub truncated: bool,
    /// Task events lost before the head kept them (dropped by full
    /// buffers at owners, or tasks forgotten by the head's bounded
    /// table), when listing tasks.
    pub events_dropped: u64,
}
