//! The task table: what the head knows of every task and actor call, from
//! the events their owners send (see `shoal::core::events`).
//!
//! Bounded: past [`TASKS_KEPT`] tasks, the oldest is forgotten and counted.
//! It has its own lock, away from the head's tables: owners' batches never
//! wait behind a lease request, nor it behind them. A listing walks it
//! newest first and stops at its limit, so no listing sorts it.
//!
//! Made for tens of thousands of tasks a second: the tasks sit in a ring in
//! arrival order (the index maps an id to its place, so a table that grows
//! moves ids, not tasks), a task keeps its state changes inline, and names
//! are shared between the tasks of one function.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use shoal_proto::state::{EventBatch, Placed, TaskEvent, TaskInfo, TaskKind, TaskState};
use shoal_proto::{ActorId, IdHashState, JobId, TaskId, WorkerId};

/// Tasks kept (Ray keeps 100 000 by default too).
pub const TASKS_KEPT: usize = 100_000;
/// State changes kept per task (a task retried many times keeps its last).
const CHANGES_KEPT: usize = 8;
/// Distinct names kept shared; past it, names are not shared.
const NAMES_KEPT: usize = 10_000;

/// One state change, as kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The attempt.
    pub attempt: u32,
    /// The state entered.
    pub state: TaskState,
    /// When (microseconds since the Unix epoch).
    pub at_us: u64,
}

/// One attempt's run on a worker, as its owner reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The attempt.
    pub attempt: u32,
    /// Where.
    pub placed: Placed,
    /// Start and end (the worker's clock).
    pub ran_us: (u64, u64),
    /// Whether it failed.
    pub failed: bool,
}

/// A task as the head knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// The task.
    pub task_id: TaskId,
    /// Its job, once known.
    pub job_id: Option<JobId>,
    /// The function, or `Class::method`.
    pub name: Arc<str>,
    /// Task or actor call.
    pub kind: TaskKind,
    /// The actor called.
    pub actor_id: Option<ActorId>,
    /// Its owner.
    pub owner: Option<WorkerId>,
    /// The newest attempt.
    pub attempt: u32,
    /// That attempt's state.
    pub state: TaskState,
    /// Where the newest attempt went.
    pub placed: Option<Placed>,
    /// Why the newest failure happened.
    pub error: Option<String>,
    /// When it was submitted.
    pub submitted_us: Option<u64>,
    /// Its state changes (the last [`CHANGES_KEPT`]): see [`Task::changes`].
    changes: [Change; CHANGES_KEPT],
    /// How many changes it has had.
    changed: usize,
    /// The newest attempt's run, once its worker answered.
    pub run: Option<Run>,
}

impl Task {
    fn new(task_id: TaskId) -> Self {
        Self {
            task_id,
            job_id: None,
            name: Arc::from(""),
            kind: TaskKind::Task,
            actor_id: None,
            owner: None,
            attempt: 0,
            state: TaskState::PendingArgs,
            placed: None,
            error: None,
            submitted_us: None,
            changes: [Change {
                attempt: 0,
                state: TaskState::PendingArgs,
                at_us: 0,
            }; CHANGES_KEPT],
            changed: 0,
            run: None,
        }
    }

    /// Its state changes, oldest first (the last [`CHANGES_KEPT`]).
    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        let kept = self.changed.min(CHANGES_KEPT);
        (self.changed - kept..self.changed).map(|i| &self.changes[i % CHANGES_KEPT])
    }

    /// The attempt entered `state` at `at_us`.
    fn enter(&mut self, attempt: u32, state: TaskState, at_us: u64) {
        self.changes[self.changed % CHANGES_KEPT] = Change {
            attempt,
            state,
            at_us,
        };
        self.changed += 1;
        // An older attempt's news does not move the task back; a final
        // state is not undone by a late event of the same attempt.
        let newer = attempt > self.attempt;
        let same = attempt == self.attempt;
        let undoes_final = self.state.is_final() && !state.is_final();
        if newer || (same && !undoes_final) {
            if newer {
                self.placed = None;
            }
            self.attempt = attempt;
            self.state = state;
        }
    }

    /// Applies one event of `batch`, whose names are `names`.
    fn apply(&mut self, event: TaskEvent, batch: (JobId, WorkerId), names: &[Arc<str>]) {
        if let Some(info) = event.info {
            let TaskInfo {
                name,
                kind,
                actor_id,
            } = info;
            self.job_id = Some(batch.0);
            if let Some(name) = names.get(name as usize) {
                self.name = Arc::clone(name);
            }
            self.kind = kind;
            self.actor_id = actor_id;
            self.owner = Some(batch.1);
            let first = event.earlier.first().map_or(event.at_us, |(_, at)| *at);
            self.submitted_us = Some(first);
        }
        for (state, at_us) in &event.earlier {
            self.enter(event.attempt, *state, *at_us);
        }
        self.enter(event.attempt, event.state, event.at_us);
        if let Some(placed) = event.placed {
            if event.attempt >= self.attempt {
                self.placed = Some(placed);
            }
            if let Some(ran_us) = event.ran_us {
                if event.attempt >= self.run.map_or(0, |r| r.attempt) {
                    self.run = Some(Run {
                        attempt: event.attempt,
                        placed,
                        ran_us,
                        failed: event.state == TaskState::Failed,
                    });
                }
            }
        }
        if event.state == TaskState::Failed {
            self.error = event.error;
        }
    }
}

/// Names shared between tasks.
#[derive(Debug, Default)]
struct Names(HashMap<Arc<str>, ()>);

impl Names {
    fn share(&mut self, name: String) -> Arc<str> {
        if let Some((shared, ())) = self.0.get_key_value(name.as_str()) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(name);
        if self.0.len() < NAMES_KEPT {
            self.0.insert(Arc::clone(&shared), ());
        }
        shared
    }
}

/// Every task the head knows, oldest first.
#[derive(Debug, Default)]
pub struct Tasks {
    /// The tasks in arrival order; the first is number `first`.
    ring: VecDeque<Task>,
    first: u64,
    /// Each task's number.
    index: HashMap<TaskId, u64, IdHashState>,
    names: Names,
    /// Events owners dropped before sending them.
    dropped_at_owners: u64,
    /// Tasks forgotten to stay within the bound.
    forgotten: u64,
    kept: usize,
}

impl Tasks {
    /// A table of up to [`TASKS_KEPT`] tasks.
    pub fn new() -> Self {
        Self::bounded(TASKS_KEPT)
    }

    /// A table of up to `kept` tasks.
    pub fn bounded(kept: usize) -> Self {
        Self {
            kept: kept.max(1),
            ..Self::default()
        }
    }

    /// Takes one owner's batch (its events in order).
    pub fn record(&mut self, batch: EventBatch) {
        let EventBatch {
            job_id,
            owner,
            names,
            events,
            dropped,
        } = batch;
        self.dropped_at_owners = self.dropped_at_owners.saturating_add(dropped);
        let names: Vec<Arc<str>> = names.into_iter().map(|n| self.names.share(n)).collect();
        for event in events {
            let id = event.task_id;
            let number = match self.index.get(&id) {
                Some(n) => *n,
                None => {
                    if self.ring.len() >= self.kept {
                        if let Some(old) = self.ring.pop_front() {
                            self.index.remove(&old.task_id);
                            self.first += 1;
                            self.forgotten += 1;
                        }
                    }
                    let n = self.first + self.ring.len() as u64;
                    self.ring.push_back(Task::new(id));
                    self.index.insert(id, n);
                    n
                }
            };
            if let Some(task) = self.ring.get_mut((number - self.first) as usize) {
                task.apply(event, (job_id, owner), &names);
            }
        }
    }

    /// The task, if kept.
    pub fn get(&self, id: TaskId) -> Option<&Task> {
        let n = self.index.get(&id)?;
        self.ring.get((n - self.first) as usize)
    }

    /// The tasks, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Task> {
        self.ring.iter().rev()
    }

    /// How many tasks are kept.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// True when no task is kept.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Events lost before the head kept them: dropped by owners, or whose
    /// tasks were forgotten here.
    pub fn lost(&self) -> u64 {
        self.dropped_at_owners.saturating_add(self.forgotten)
    }

    /// How many kept tasks are in each state.
    pub fn count_by_state(&self) -> HashMap<TaskState, u64> {
        let mut counts = HashMap::new();
        for task in &self.ring {
            *counts.entry(task.state).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::NodeId;

    /// A batch of one owner's events, its one name `f`.
    fn batch(events: Vec<TaskEvent>, dropped: u64) -> EventBatch {
        EventBatch {
            job_id: JobId::random(),
            owner: WorkerId::random(),
            names: vec!["f".into()],
            events,
            dropped,
        }
    }

    fn event(task_id: TaskId, attempt: u32, state: TaskState, at_us: u64) -> TaskEvent {
        TaskEvent {
            task_id,
            attempt,
            state,
            at_us,
            info: None,
            placed: None,
            ran_us: None,
            error: None,
            earlier: Vec::new(),
        }
    }

    #[test]
    fn a_retried_task_shows_its_newest_attempt_and_keeps_its_history() {
        let mut tasks = Tasks::new();
        let id = TaskId::fresh();
        let mut first = event(id, 0, TaskState::PendingArgs, 1);
        first.info = Some(TaskInfo {
            name: 0,
            kind: TaskKind::Task,
            actor_id: None,
        });
        let placed = Placed {
            node_id: NodeId::random(),
            worker_id: WorkerId::random(),
        };
        let mut running = event(id, 0, TaskState::Running, 3);
        running.placed = Some(placed);
        let mut lost = event(id, 0, TaskState::Failed, 4);
        lost.error = Some("lost its worker".into());
        let mut done = event(id, 1, TaskState::Finished, 9);
        done.placed = Some(placed);
        done.ran_us = Some((6, 8));
        tasks.record(batch(
            vec![
                first,
                event(id, 0, TaskState::PendingLease, 2),
                running,
                lost,
                event(id, 1, TaskState::PendingLease, 5),
                done,
            ],
            0,
        ));
        let task = tasks.get(id).expect("kept");
        assert_eq!((task.attempt, task.state), (1, TaskState::Finished));
        assert_eq!(&*task.name, "f");
        assert_eq!(task.error.as_deref(), Some("lost its worker"));
        let states: Vec<(u32, TaskState)> = task.changes().map(|c| (c.attempt, c.state)).collect();
        assert_eq!(states.len(), 6);
        assert_eq!(states[3], (0, TaskState::Failed));
        assert_eq!(states[5], (1, TaskState::Finished));
        assert_eq!(task.run.map(|r| (r.attempt, r.ran_us)), Some((1, (6, 8))));
        // A late event of the finished attempt does not move it back.
        tasks.record(batch(vec![event(id, 1, TaskState::Running, 7)], 0));
        assert_eq!(tasks.get(id).map(|t| t.state), Some(TaskState::Finished));
    }

    #[test]
    fn past_the_bound_the_oldest_task_is_forgotten_and_counted() {
        let mut tasks = Tasks::bounded(2);
        let ids: Vec<TaskId> = (0..3).map(|_| TaskId::fresh()).collect();
        let events = ids
            .iter()
            .map(|id| event(*id, 0, TaskState::PendingArgs, 1))
            .collect();
        tasks.record(batch(events, 5));
        assert_eq!(tasks.len(), 2);
        assert!(tasks.get(ids[0]).is_none());
        assert_eq!(tasks.lost(), 6, "5 dropped by owners, 1 forgotten");
        let newest: Vec<TaskId> = tasks.newest_first().map(|t| t.task_id).collect();
        assert_eq!(newest, vec![ids[2], ids[1]]);
        // A kept task is found by id after others were forgotten.
        assert_eq!(tasks.get(ids[1]).map(|t| t.task_id), Some(ids[1]));
        assert_eq!(tasks.get(ids[2]).map(|t| t.task_id), Some(ids[2]));
    }

    #[test]
    fn an_event_with_earlier_states_enters_each_in_order() {
        let mut tasks = Tasks::new();
        let id = TaskId::fresh();
        let mut e = event(id, 0, TaskState::Finished, 30);
        e.earlier = vec![
            (TaskState::PendingArgs, 10),
            (TaskState::PendingLease, 11),
            (TaskState::Running, 12),
        ];
        e.info = Some(TaskInfo {
            name: 0,
            kind: TaskKind::Task,
            actor_id: None,
        });
        tasks.record(batch(vec![e], 0));
        let task = tasks.get(id).expect("kept");
        assert_eq!(task.state, TaskState::Finished);
        assert_eq!(task.submitted_us, Some(10));
        let times: Vec<u64> = task.changes().map(|c| c.at_us).collect();
        assert_eq!(times, vec![10, 11, 12, 30]);
    }

    #[test]
    fn only_the_last_changes_are_kept_in_order() {
        let mut tasks = Tasks::new();
        let id = TaskId::fresh();
        let events = (0..20)
            .map(|i| event(id, i, TaskState::PendingLease, u64::from(i)))
            .collect();
        tasks.record(batch(events, 0));
        let task = tasks.get(id).expect("kept");
        let times: Vec<u64> = task.changes().map(|c| c.at_us).collect();
        assert_eq!(times, (12..20).collect::<Vec<u64>>());
    }
}
