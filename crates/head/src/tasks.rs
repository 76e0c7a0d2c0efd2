//! The task table: what the head knows of every task and actor call, from
//! the events their owners send (see `shoal::core::events`).
//!
//! Bounded: past [`TASKS_KEPT`] tasks, the oldest is forgotten and counted.
//! It has its own lock, away from the head's tables: owners' batches never
//! wait behind a lease request, nor it behind them. A listing walks it
//! newest first and stops at its limit, so no listing sorts it.

use std::collections::{HashMap, VecDeque};

use shoal_proto::state::{Placed, TaskEvent, TaskInfo, TaskKind, TaskState};
use shoal_proto::{ActorId, JobId, TaskId, WorkerId};

/// Tasks kept (Ray keeps 100 000 by default too).
pub const TASKS_KEPT: usize = 100_000;
/// State changes kept per task (a task retried many times keeps its last).
const CHANGES_KEPT: usize = 32;

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
    pub name: String,
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
    /// Its state changes, oldest first (the last [`CHANGES_KEPT`]).
    pub changes: Vec<Change>,
    /// Its attempts' runs.
    pub runs: Vec<Run>,
}

impl Task {
    fn new(task_id: TaskId) -> Self {
        Self {
            task_id,
            job_id: None,
            name: String::new(),
            kind: TaskKind::Task,
            actor_id: None,
            owner: None,
            attempt: 0,
            state: TaskState::PendingArgs,
            placed: None,
            error: None,
            submitted_us: None,
            changes: Vec::new(),
            runs: Vec::new(),
        }
    }

    fn apply(&mut self, event: TaskEvent) {
        if let Some(info) = event.info {
            let TaskInfo {
                job_id,
                name,
                kind,
                actor_id,
                owner,
            } = *info;
            self.job_id = Some(job_id);
            self.name = name;
            self.kind = kind;
            self.actor_id = actor_id;
            self.owner = Some(owner);
            self.submitted_us = Some(event.at_us);
        }
        if self.changes.len() == CHANGES_KEPT {
            self.changes.remove(0);
        }
        self.changes.push(Change {
            attempt: event.attempt,
            state: event.state,
            at_us: event.at_us,
        });
        // An older attempt's news does not move the task back; a final
        // state is not undone by a late event of the same attempt.
        let newer = event.attempt > self.attempt;
        let same = event.attempt == self.attempt;
        let undoes_final = self.state.is_final() && !event.state.is_final();
        if newer || (same && !undoes_final) {
            if newer {
                self.placed = None;
            }
            self.attempt = event.attempt;
            self.state = event.state;
        }
        if let Some(placed) = event.placed {
            if event.attempt >= self.attempt {
                self.placed = Some(placed);
            }
            if let Some(ran_us) = event.ran_us {
                self.runs.retain(|r| r.attempt != event.attempt);
                self.runs.push(Run {
                    attempt: event.attempt,
                    placed,
                    ran_us,
                    failed: event.state == TaskState::Failed,
                });
            }
        }
        if event.state == TaskState::Failed {
            self.error = event.error;
        }
    }
}

/// Every task the head knows, oldest first.
#[derive(Debug, Default)]
pub struct Tasks {
    tasks: HashMap<TaskId, Task>,
    order: VecDeque<TaskId>,
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
    pub fn record(&mut self, events: Vec<TaskEvent>, dropped: u64) {
        self.dropped_at_owners = self.dropped_at_owners.saturating_add(dropped);
        for event in events {
            let id = event.task_id;
            if !self.tasks.contains_key(&id) {
                if self.tasks.len() >= self.kept {
                    if let Some(old) = self.order.pop_front() {
                        self.tasks.remove(&old);
                        self.forgotten += 1;
                    }
                }
                self.tasks.insert(id, Task::new(id));
                self.order.push_back(id);
            }
            if let Some(task) = self.tasks.get_mut(&id) {
                task.apply(event);
            }
        }
    }

    /// The task, if kept.
    pub fn get(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// The tasks, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Task> {
        self.order.iter().rev().filter_map(|id| self.tasks.get(id))
    }

    /// How many tasks are kept.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no task is kept.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Events lost before the head kept them: dropped by owners, or whose
    /// tasks were forgotten here.
    pub fn lost(&self) -> u64 {
        self.dropped_at_owners.saturating_add(self.forgotten)
    }

    /// How many kept tasks are in each state.
    pub fn count_by_state(&self) -> HashMap<TaskState, u64> {
        let mut counts = HashMap::new();
        for task in self.tasks.values() {
            *counts.entry(task.state).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::NodeId;

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
        }
    }

    #[test]
    fn a_retried_task_shows_its_newest_attempt_and_keeps_its_history() {
        let mut tasks = Tasks::new();
        let id = TaskId::fresh();
        let mut first = event(id, 0, TaskState::PendingArgs, 1);
        first.info = Some(Box::new(TaskInfo {
            job_id: JobId::random(),
            name: "f".into(),
            kind: TaskKind::Task,
            actor_id: None,
            owner: WorkerId::random(),
        }));
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
        tasks.record(
            vec![
                first,
                event(id, 0, TaskState::PendingLease, 2),
                running,
                lost,
                event(id, 1, TaskState::PendingLease, 5),
                done,
            ],
            0,
        );
        let task = tasks.get(id).expect("kept");
        assert_eq!((task.attempt, task.state), (1, TaskState::Finished));
        assert_eq!(task.name, "f");
        assert_eq!(task.error.as_deref(), Some("lost its worker"));
        assert_eq!(task.changes.len(), 6);
        assert_eq!(task.runs.len(), 1);
        assert_eq!(task.runs[0].ran_us, (6, 8));
        // A late event of the finished attempt does not move it back.
        tasks.record(vec![event(id, 1, TaskState::Running, 7)], 0);
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
        tasks.record(events, 5);
        assert_eq!(tasks.len(), 2);
        assert!(tasks.get(ids[0]).is_none());
        assert_eq!(tasks.lost(), 6, "5 dropped by owners, 1 forgotten");
        let newest: Vec<TaskId> = tasks.newest_first().map(|t| t.task_id).collect();
        assert_eq!(newest, vec![ids[2], ids[1]]);
    }
}
