//! Task events: the state changes of the tasks and actor calls this process
//! owns, kept in a bounded buffer and sent to the head in batches (about
//! once a second, sooner when a batch fills), where the state API, `shoal
//! timeline` and the dashboard read them.
//!
//! The owner records every state: it submits the task, waits for its
//! arguments and its lease, pushes it and hears the reply. What only the
//! worker knows (when the function started and ended, on which node and
//! worker) comes back in the reply the worker sends anyway, and goes out
//! with the owner's final event: no second stream of messages per task.
//!
//! Recording costs a clock read and a short lock; a buffer that fills
//! (the head unreachable, a burst) drops its oldest events and counts them,
//! and the count goes to the head with the next batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_net::sync::MutexExt;
use shoal_proto::state::{
    unix_us, EventBatch, Placed, TaskEvent, TaskInfo, TaskKind, TaskState, EARLIER_MAX,
    EVENTS_PER_BATCH_MAX, EVENT_TEXT_MAX,
};
use shoal_proto::{ActorId, HeadRequest, IdHashState, JobId, TaskId, TaskReply, WorkerId};
use tokio::sync::Notify;

use super::Core;

/// Events kept waiting for the head at most; past it the oldest go.
pub(crate) const BUFFERED_MAX: usize = 100_000;
/// How often a batch goes out.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one batch may take to reach the head.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What a task is, as recorded (turned into a [`TaskInfo`] when sent).
struct Info {
    name: Name,
    kind: TaskKind,
    actor_id: Option<ActorId>,
}

/// A task's name, without building a string on the task's path.
enum Name {
    Function(&'static str),
    Method(String, &'static str),
}

/// An event as recorded.
struct Recorded {
    task_id: TaskId,
    attempt: u32,
    state: TaskState,
    at_us: u64,
    info: Option<Info>,
    placed: Option<Placed>,
    ran_us: Option<(u64, u64)>,
    error: Option<String>,
}

impl Recorded {
    fn new(task_id: TaskId, attempt: u32, state: TaskState) -> Self {
        Self {
            task_id,
            attempt,
            state,
            at_us: unix_us(),
            info: None,
            placed: None,
            ran_us: None,
            error: None,
        }
    }

    fn into_event(self, names: &mut NameTable) -> TaskEvent {
        TaskEvent {
            task_id: self.task_id,
            attempt: self.attempt,
            state: self.state,
            at_us: self.at_us,
            info: self.info.map(|info| TaskInfo {
                name: names.index(info.name),
                kind: info.kind,
                actor_id: info.actor_id,
            }),
            placed: self.placed,
            ran_us: self.ran_us,
            error: self.error.map(cut),
            earlier: Vec::new(),
        }
    }

    /// Folds this later event of the same attempt into `into`: one event
    /// per task and attempt goes to the head.
    fn fold_into(self, into: &mut TaskEvent) {
        if into.earlier.len() < EARLIER_MAX {
            into.earlier.push((into.state, into.at_us));
        }
        into.state = self.state;
        into.at_us = self.at_us;
        if self.placed.is_some() {
            into.placed = self.placed;
        }
        if self.ran_us.is_some() {
            into.ran_us = self.ran_us;
        }
        if let Some(error) = self.error {
            into.error = Some(cut(error));
        }
    }
}

/// The function names of one batch, each sent once.
#[derive(Default)]
struct NameTable {
    functions: HashMap<&'static str, u32>,
    methods: HashMap<String, u32>,
    names: Vec<String>,
}

impl NameTable {
    /// The name's index in the batch's names.
    fn index(&mut self, name: Name) -> u32 {
        let next = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        match name {
            Name::Function(function) => *self.functions.entry(function).or_insert_with(|| {
                self.names.push(cut(function.to_string()));
                next
            }),
            Name::Method(class, method) => {
                let name = format!("{class}::{method}");
                if let Some(&i) = self.methods.get(&name) {
                    return i;
                }
                self.names.push(cut(name.clone()));
                self.methods.insert(name, next);
                next
            }
        }
    }
}

/// A failure as an event tells it.
pub(crate) fn failure_text(f: &shoal_proto::TaskFailure) -> String {
    format!("{:?}: {}", f.kind, f.message)
}

/// `text` cut to [`EVENT_TEXT_MAX`] bytes, at a character boundary.
fn cut(mut text: String) -> String {
    if text.len() > EVENT_TEXT_MAX {
        let mut end = EVENT_TEXT_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[derive(Default)]
struct Buffer {
    events: VecDeque<Recorded>,
    dropped: u64,
}

/// This process's task events on their way to the head.
pub(crate) struct Events {
    on: bool,
    buffer: Mutex<Buffer>,
    /// The other buffer, empty: swapped in when a batch is taken.
    spare: Mutex<VecDeque<Recorded>>,
    /// Woken when a batch is full.
    full: Notify,
    max: usize,
}

impl Events {
    /// A recorder; `on` false records nothing (`SHOAL_TASK_EVENTS=0`).
    pub(crate) fn new(on: bool) -> Self {
        Self::bounded(on, BUFFERED_MAX)
    }

    fn bounded(on: bool, max: usize) -> Self {
        Self {
            on,
            buffer: Mutex::default(),
            spare: Mutex::default(),
            full: Notify::new(),
            max,
        }
    }

    fn push(&self, event: Recorded) {
        let mut buffer = self.buffer.locked();
        if buffer.events.len() >= self.max {
            buffer.events.pop_front();
            buffer.dropped += 1;
        }
        buffer.events.push_back(event);
        if buffer.events.len() == EVENTS_PER_BATCH_MAX {
            self.full.notify_one();
        }
    }

    /// A task was submitted: it waits for its arguments (`waits`: it has
    /// references among them), else for a lease.
    pub(crate) fn submitted(&self, task_id: TaskId, function: &'static str, waits: bool) {
        let state = if waits {
            TaskState::PendingArgs
        } else {
            TaskState::PendingLease
        };
        self.first(
            task_id,
            Name::Function(function),
            TaskKind::Task,
            None,
            state,
        );
    }

    /// An actor call was made.
    pub(crate) fn called(&self, task_id: TaskId, actor: (ActorId, &str), method: &'static str) {
        if !self.on {
            return;
        }
        let name = Name::Method(actor.1.to_string(), method);
        let state = TaskState::PendingArgs;
        self.first(task_id, name, TaskKind::ActorCall, Some(actor.0), state);
    }

    fn first(
        &self,
        task_id: TaskId,
        name: Name,
        kind: TaskKind,
        actor_id: Option<ActorId>,
        state: TaskState,
    ) {
        if !self.on {
            return;
        }
        let mut event = Recorded::new(task_id, 0, state);
        event.info = Some(Info {
            name,
            kind,
            actor_id,
        });
        self.push(event);
    }

    /// An attempt entered `state` (no more to say).
    pub(crate) fn state(&self, task_id: TaskId, attempt: u32, state: TaskState) {
        if self.on {
            self.push(Recorded::new(task_id, attempt, state));
        }
    }

    /// An attempt was pushed to a worker (`placed`, when known).
    pub(crate) fn running(&self, task_id: TaskId, attempt: u32, placed: Option<Placed>) {
        if self.on {
            let mut event = Recorded::new(task_id, attempt, TaskState::Running);
            event.placed = placed;
            self.push(event);
        }
    }

    /// A worker answered an attempt: it finished, or failed with `error`.
    pub(crate) fn answered(&self, reply: &TaskReply, attempt: u32, error: Option<String>) {
        if !self.on {
            return;
        }
        let state = if error.is_some() {
            TaskState::Failed
        } else {
            TaskState::Finished
        };
        let mut event = Recorded::new(reply.task_id, attempt, state);
        event.placed = Some(Placed {
            node_id: reply.node_id,
            worker_id: reply.worker_id,
        });
        // The worker's own measure of the run when it gives one (tasks);
        // else until the answer came (actor calls).
        event.ran_us = reply.started_us.map(|start| {
            let run = reply.run_us.unwrap_or(event.at_us.saturating_sub(start));
            (start, start.saturating_add(run))
        });
        event.error = error;
        self.push(event);
    }

    /// An attempt failed without an answer (its worker lost, its
    /// arguments failed).
    pub(crate) fn failed(&self, task_id: TaskId, attempt: u32, error: String) {
        if self.on {
            let mut event = Recorded::new(task_id, attempt, TaskState::Failed);
            event.error = Some(error);
            self.push(event);
        }
    }

    /// Up to a batch of events, one per task and attempt (the states it
    /// went through folded in, in order), and the count dropped since the
    /// last batch.
    fn take(&self, job_id: JobId, owner: WorkerId) -> EventBatch {
        // The buffer is swapped with the spare (both keep their memory):
        // no copy and no allocation under the lock recorders take.
        let mut taken = std::mem::take(&mut *self.spare.locked());
        let mut buffer = self.buffer.locked();
        let n = buffer.events.len().min(EVENTS_PER_BATCH_MAX);
        if n == buffer.events.len() {
            std::mem::swap(&mut buffer.events, &mut taken);
        } else {
            taken.extend(buffer.events.drain(..n));
        }
        let dropped = std::mem::take(&mut buffer.dropped);
        drop(buffer);
        let mut events: Vec<TaskEvent> = Vec::with_capacity(n);
        let mut at: HashMap<(TaskId, u32), usize, IdHashState> =
            HashMap::with_capacity_and_hasher(n, IdHashState::default());
        let mut names = NameTable::default();
        for e in taken.drain(..) {
            match at.get(&(e.task_id, e.attempt)) {
                Some(&i) if e.info.is_none() => e.fold_into(&mut events[i]),
                _ => {
                    at.insert((e.task_id, e.attempt), events.len());
                    events.push(e.into_event(&mut names));
                }
            }
        }
        // A burst's memory is not kept.
        taken.shrink_to(EVENTS_PER_BATCH_MAX);
        *self.spare.locked() = taken;
        EventBatch {
            job_id,
            owner,
            names: names.names,
            events,
            dropped,
        }
    }

    /// Sends what is buffered, a batch at a time; false if the head did
    /// not take a batch (its events count as dropped).
    pub(crate) async fn flush(&self, core: &Core) -> bool {
        loop {
            let batch = self.take(core.job_id, core.me.worker_id);
            if batch.events.is_empty() && batch.dropped == 0 {
                return true;
            }
            let lost = batch.events.len() as u64 + batch.dropped;
            let more = !self.buffer.locked().events.is_empty();
            let request = HeadRequest::TaskEvents(Box::new(batch));
            if let Err(e) = core.head.call(&request, SEND_TIMEOUT).await {
                tracing::debug!(error = %e, lost, "task events not sent");
                self.buffer.locked().dropped += lost;
                return false;
            }
            if !more {
                return true;
            }
        }
    }

    /// Sends batches until `core` shuts down.
    pub(crate) async fn run(core: Arc<Core>) {
        let events = &core.events;
        if !events.on {
            return;
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = events.full.notified() => {}
                () = core.stopping.cancelled() => return,
            }
            events.flush(&core).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_them() {
        let events = Events::bounded(true, 3);
        let ids: Vec<TaskId> = (0..5).map(|_| TaskId::fresh()).collect();
        for id in &ids {
            events.submitted(*id, "f", true);
        }
        let batch = events.take(JobId::random(), WorkerId::random());
        let (sent, dropped) = (&batch.events, batch.dropped);
        assert_eq!(dropped, 2);
        let kept: Vec<TaskId> = sent.iter().map(|e| e.task_id).collect();
        assert_eq!(
            kept,
            ids[2..].to_vec(),
            "the newest three are kept, in order"
        );
        assert_eq!(sent[0].info.map(|i| i.name), Some(0));
        assert_eq!(batch.names, vec!["f".to_string()], "each name is sent once");
        let again = events.take(JobId::random(), WorkerId::random());
        assert!(
            again.events.is_empty() && again.dropped == 0,
            "the count is sent once"
        );
    }

    #[test]
    fn a_tasks_states_go_as_one_event_per_attempt_in_order() {
        let events = Events::bounded(true, 100);
        let (a, b) = (TaskId::fresh(), TaskId::fresh());
        events.submitted(a, "f", true);
        events.submitted(b, "g", true);
        events.state(a, 0, TaskState::PendingLease);
        events.failed(a, 0, "lost".into());
        events.state(b, 0, TaskState::PendingLease);
        events.state(a, 1, TaskState::PendingLease);
        events.state(a, 1, TaskState::Running);
        let sent = events.take(JobId::random(), WorkerId::random()).events;
        let summary: Vec<(TaskId, u32, TaskState, Vec<TaskState>)> = sent
            .iter()
            .map(|e| {
                let earlier = e.earlier.iter().map(|(s, _)| *s).collect();
                (e.task_id, e.attempt, e.state, earlier)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    a,
                    0,
                    TaskState::Failed,
                    vec![TaskState::PendingArgs, TaskState::PendingLease]
                ),
                (b, 0, TaskState::PendingLease, vec![TaskState::PendingArgs]),
                (a, 1, TaskState::Running, vec![TaskState::PendingLease]),
            ]
        );
        assert_eq!(sent[0].error.as_deref(), Some("lost"));
        assert!(sent[0].info.is_some() && sent[2].info.is_none());
    }

    #[test]
    fn off_records_nothing() {
        let events = Events::bounded(false, 3);
        events.submitted(TaskId::fresh(), "f", false);
        events.state(TaskId::fresh(), 0, TaskState::PendingLease);
        assert!(events.buffer.locked().events.is_empty());
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let text = "é".repeat(EVENT_TEXT_MAX);
        let cut = cut(text);
        assert!(cut.len() <= EVENT_TEXT_MAX && cut.len() >= EVENT_TEXT_MAX - 1);
    }
}
