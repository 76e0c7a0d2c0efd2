//! A task's tries, as its owner decides them, with no I/O: how each try
//! ended goes in, what to do with the worker's place and what comes next
//! comes out.
//!
//! - A worker lost with the task (its process or node died, or the head
//!   declared its node dead and its late reply is not used) is discarded,
//!   and the task is tried again while `max_retries` allows, else it fails
//!   with [`FailureKind::WorkerCrashed`].
//! - A task that returned `Err` or panicked is tried again only with
//!   `retry_exceptions`, within the same count.
//! - A task whose stored argument's copy was lost (with its node) has the
//!   arguments its owner made rebuilt from their lineage, then runs once
//!   more ([`Then::RebuildArgs`]).
//! - A task's stored result lost later is made again by running the task
//!   ([`Rebuild`]), as often as its retries left allow, one rebuild at a
//!   time.

use std::sync::{Arc, Mutex};

use shoal_proto::{ArgSpec, FailureKind, NodeId, StoredAt, TaskFailure, TaskId, TaskOutcome};

use super::objects::{Borrows, ObjState};
use crate::args::KeepAlive;
use crate::options::TaskOptions;
use crate::registry::RemoteFunction;

/// How to make a task's stored result again if its copy is lost: the task
/// and its arguments (whose objects are kept alive meanwhile).
pub struct Lineage {
    pub task_id: TaskId,
    pub function: &'static RemoteFunction,
    pub options: TaskOptions,
    pub args: Mutex<Vec<ArgSpec>>,
    /// What the arguments lend (kept lent while the lineage lives).
    pub borrows: Option<Arc<Mutex<Borrows>>>,
    pub _keep_alive: Mutex<Vec<KeepAlive>>,
    /// Held through a rebuild, so there is one at a time.
    pub rebuild: tokio::sync::Mutex<Rebuild>,
}

/// How one try at a task ended, as the shell saw it.
#[derive(Debug)]
pub enum Tried {
    /// The worker answered with the task's outcome.
    Answered(TaskOutcome),
    /// An answer came from a node the head has declared dead: the task may
    /// be running again elsewhere, so it counts as lost with its worker.
    AnsweredFromDeadNode(NodeId),
    /// The worker answered something that is not a task's reply.
    BadReply(String),
    /// The worker, or the way to it, was lost before it answered.
    Lost(String),
}

/// What becomes of the place on the worker the try used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceDone {
    /// Free for the next task.
    Release,
    /// The worker failed: stop it and return its lease.
    Discard,
}

/// What the task does next.
#[derive(Debug)]
pub enum Then {
    /// Try again (as [`TaskRun::attempt`]).
    Again,
    /// Done: the result's final state.
    Finish(ObjState),
    /// Rebuild the lost stored arguments this process owns, then report
    /// [`TaskRun::args_rebuilt`].
    RebuildArgs,
}

/// One task's tries.
#[derive(Debug)]
pub struct TaskRun {
    task_id: TaskId,
    function: &'static str,
    attempt: u32,
    max_retries: u32,
    retry_exceptions: bool,
    /// Lost arguments may still be rebuilt (once, and only for a task with
    /// stored arguments).
    may_rebuild_args: bool,
    /// The failure the task ends with if its arguments cannot be rebuilt.
    args_lost: Option<TaskFailure>,
}

impl TaskRun {
    /// A task's tries from `first_attempt` (0 for a new task; a rebuild of
    /// a lost result counts on). `rebuild_args` when a lost stored argument
    /// may be rebuilt and the task run once more.
    pub fn new(
        (task_id, function): (TaskId, &'static str),
        (max_retries, retry_exceptions): (u32, bool),
        first_attempt: u32,
        rebuild_args: bool,
    ) -> Self {
        Self {
            task_id,
            function,
            attempt: first_attempt,
            max_retries,
            retry_exceptions,
            may_rebuild_args: rebuild_args,
            args_lost: None,
        }
    }

    /// The task.
    pub fn task_id(&self) -> TaskId {
        self.task_id
    }

    /// The number of the try to make now (from 0).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    fn failure(&self, kind: FailureKind, message: String) -> TaskFailure {
        TaskFailure {
            kind,
            function: self.function.to_string(),
            task_id: self.task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts: self.attempt + 1,
            after_ms: None,
        }
    }

    /// No try could be made: the head has been unreachable for longer
    /// than the bound (`message` says since when).
    pub fn head_unavailable(&self, message: String) -> Then {
        Then::Finish(ObjState::Failed(
            self.failure(FailureKind::HeadUnavailable, message),
        ))
    }

    /// No try can be made: the task's options cannot be used
    /// ([`FailureKind::InvalidOptions`]), or the scheduler refused its
    /// placement ([`FailureKind::Unschedulable`]).
    pub fn cannot_run(&self, kind: FailureKind, message: String) -> Then {
        Then::Finish(ObjState::Failed(self.failure(kind, message)))
    }

    /// A try ended as `tried`.
    pub fn tried(&mut self, tried: Tried) -> (PlaceDone, Then) {
        let lost = match tried {
            Tried::Answered(outcome) => return (PlaceDone::Release, self.answered(outcome)),
            Tried::BadReply(what) => {
                let f = self.failure(
                    FailureKind::BadReturn,
                    format!("the worker answered {what}"),
                );
                return (PlaceDone::Discard, Then::Finish(ObjState::Failed(f)));
            }
            Tried::AnsweredFromDeadNode(node) => {
                format!("its node {node} was declared dead; its result is not used")
            }
            Tried::Lost(why) => why,
        };
        if self.attempt >= self.max_retries {
            let f = self.failure(
                FailureKind::WorkerCrashed,
                format!("the worker died ({lost})"),
            );
            return (PlaceDone::Discard, Then::Finish(ObjState::Failed(f)));
        }
        self.attempt += 1;
        (PlaceDone::Discard, Then::Again)
    }

    fn answered(&mut self, outcome: TaskOutcome) -> Then {
        let failure = match outcome {
            TaskOutcome::Inline(bytes) => {
                return Then::Finish(ObjState::Inline(std::sync::Arc::new(bytes)))
            }
            TaskOutcome::Stored(at) => return Then::Finish(ObjState::Stored(at)),
            TaskOutcome::Failed(f) => f,
        };
        let app_error = matches!(failure.kind, FailureKind::Error | FailureKind::Panic);
        if app_error && self.retry_exceptions && self.attempt < self.max_retries {
            self.attempt += 1;
            return Then::Again;
        }
        if failure.kind == FailureKind::ArgumentLost && self.may_rebuild_args {
            self.may_rebuild_args = false;
            self.args_lost = Some(failure);
            return Then::RebuildArgs;
        }
        Then::Finish(ObjState::Failed(failure))
    }

    /// The lost arguments were looked at: `changed` if any was rebuilt (at
    /// a new place). The task then runs once more, as its second try.
    pub fn args_rebuilt(&mut self, changed: bool) -> Then {
        let lost = self.args_lost.take();
        match (changed, lost) {
            (true, _) => {
                self.attempt = 1;
                Then::Again
            }
            (false, Some(f)) => Then::Finish(ObjState::Failed(f)),
            (false, None) => Then::Finish(ObjState::Failed(
                self.failure(FailureKind::ArgumentLost, "an argument is lost".into()),
            )),
        }
    }
}

/// Making a lost stored result again from its lineage: one rerun of its
/// task per loss, within the task's retries.
#[derive(Debug)]
pub struct Rebuild {
    max_retries: u32,
    left: u32,
}

/// What a rebuild does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Rerun {
    /// Run the task again as this try.
    Run { attempt: u32 },
    /// No retries left: the object stays lost.
    UsedUp,
}

/// What a rerun gave.
#[derive(Debug)]
pub enum Rebuilt {
    /// The result is stored again, here.
    Done(StoredAt),
    /// Its own stored arguments are lost too: rebuild those, then rerun.
    ArgsLost,
    /// The task failed.
    Failed(TaskFailure),
    /// The task gave something other than a stored result.
    Unexpected(ObjState),
}

impl Rebuild {
    /// Rebuilds of a result whose task allows `max_retries`.
    pub fn new(max_retries: u32) -> Self {
        Self {
            max_retries,
            left: max_retries,
        }
    }

    /// The next rerun, if any is left.
    pub fn next_rerun(&mut self) -> Rerun {
        if self.left == 0 {
            return Rerun::UsedUp;
        }
        self.left -= 1;
        Rerun::Run {
            attempt: self.max_retries - self.left,
        }
    }

    /// A rerun ended in `state`.
    pub fn ran(&self, state: ObjState) -> Rebuilt {
        match state {
            ObjState::Stored(at) => Rebuilt::Done(at),
            ObjState::Failed(f) if f.kind == FailureKind::ArgumentLost => Rebuilt::ArgsLost,
            ObjState::Failed(f) => Rebuilt::Failed(f),
            other => Rebuilt::Unexpected(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max_retries: u32, retry_exceptions: bool) -> TaskRun {
        TaskRun::new(
            (TaskId::fresh(), "f"),
            (max_retries, retry_exceptions),
            0,
            true,
        )
    }

    fn failed(kind: FailureKind) -> TaskOutcome {
        TaskOutcome::Failed(TaskFailure {
            kind,
            function: "f".into(),
            task_id: TaskId::fresh(),
            node_id: None,
            message: "boom".into(),
            backtrace: None,
            attempts: 1,
            after_ms: None,
        })
    }

    fn finished_kind(then: Then) -> Option<FailureKind> {
        match then {
            Then::Finish(ObjState::Failed(f)) => Some(f.kind),
            _ => None,
        }
    }

    #[test]
    fn a_result_finishes_the_task_and_frees_the_place() {
        let mut t = run(3, false);
        let (place, then) = t.tried(Tried::Answered(TaskOutcome::Inline(vec![7])));
        assert_eq!(place, PlaceDone::Release);
        assert!(matches!(then, Then::Finish(ObjState::Inline(b)) if *b == vec![7]));
    }

    #[test]
    fn a_lost_worker_is_retried_up_to_max_retries_then_the_task_fails() {
        let mut t = run(2, false);
        for attempt in 1..=2 {
            let (place, then) = t.tried(Tried::Lost("connection lost".into()));
            assert_eq!(place, PlaceDone::Discard);
            assert!(matches!(then, Then::Again));
            assert_eq!(t.attempt(), attempt);
        }
        let (place, then) = t.tried(Tried::Lost("connection lost".into()));
        assert_eq!(place, PlaceDone::Discard);
        match then {
            Then::Finish(ObjState::Failed(f)) => {
                assert_eq!(f.kind, FailureKind::WorkerCrashed);
                assert_eq!(f.attempts, 3);
                assert!(f.message.contains("connection lost"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_late_reply_from_a_dead_node_counts_as_a_lost_worker() {
        let mut t = run(1, false);
        let node = NodeId::random();
        let (place, then) = t.tried(Tried::AnsweredFromDeadNode(node));
        assert_eq!(place, PlaceDone::Discard, "its worker is not used again");
        assert!(matches!(then, Then::Again));
        let (_, then) = t.tried(Tried::AnsweredFromDeadNode(node));
        match then {
            Then::Finish(ObjState::Failed(f)) => {
                assert_eq!(f.kind, FailureKind::WorkerCrashed);
                assert!(f.message.contains("declared dead"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_and_panics_are_retried_only_with_retry_exceptions() {
        let mut plain = run(3, false);
        let (place, then) = plain.tried(Tried::Answered(failed(FailureKind::Error)));
        assert_eq!(place, PlaceDone::Release, "the worker is fine");
        assert_eq!(finished_kind(then), Some(FailureKind::Error));

        let mut retried = run(1, true);
        let (_, then) = retried.tried(Tried::Answered(failed(FailureKind::Panic)));
        assert!(matches!(then, Then::Again));
        let (_, then) = retried.tried(Tried::Answered(failed(FailureKind::Panic)));
        assert_eq!(
            finished_kind(then),
            Some(FailureKind::Panic),
            "retries used up"
        );
        // Failures that are not the function's own are never retried so.
        let mut bad_args = run(3, true);
        let (_, then) = bad_args.tried(Tried::Answered(failed(FailureKind::BadArguments)));
        assert_eq!(finished_kind(then), Some(FailureKind::BadArguments));
    }

    #[test]
    fn a_reply_that_is_not_a_result_fails_the_task_and_drops_the_worker() {
        let mut t = run(3, false);
        let (place, then) = t.tried(Tried::BadReply("Ok".into()));
        assert_eq!(place, PlaceDone::Discard);
        assert_eq!(finished_kind(then), Some(FailureKind::BadReturn));
    }

    #[test]
    fn a_lost_argument_is_rebuilt_once_then_the_task_runs_again() {
        let mut t = run(0, false);
        let (_, then) = t.tried(Tried::Answered(failed(FailureKind::ArgumentLost)));
        assert!(matches!(then, Then::RebuildArgs));
        assert!(matches!(t.args_rebuilt(true), Then::Again));
        assert_eq!(t.attempt(), 1);
        // Lost again: not rebuilt a second time.
        let (_, then) = t.tried(Tried::Answered(failed(FailureKind::ArgumentLost)));
        assert_eq!(finished_kind(then), Some(FailureKind::ArgumentLost));
        // Nothing could be rebuilt: the task fails as it did.
        let mut u = run(0, false);
        u.tried(Tried::Answered(failed(FailureKind::ArgumentLost)));
        assert_eq!(
            finished_kind(u.args_rebuilt(false)),
            Some(FailureKind::ArgumentLost)
        );
        // A task with no stored argument has nothing to rebuild.
        let mut inline = TaskRun::new((TaskId::fresh(), "f"), (3, false), 0, false);
        let (_, then) = inline.tried(Tried::Answered(failed(FailureKind::ArgumentLost)));
        assert_eq!(finished_kind(then), Some(FailureKind::ArgumentLost));
    }

    #[test]
    fn a_lost_result_is_rebuilt_within_the_tasks_retries() {
        let mut r = Rebuild::new(2);
        assert_eq!(r.next_rerun(), Rerun::Run { attempt: 1 });
        assert!(matches!(
            r.ran(ObjState::Failed(TaskFailure {
                kind: FailureKind::ArgumentLost,
                function: "f".into(),
                task_id: TaskId::fresh(),
                node_id: None,
                message: String::new(),
                backtrace: None,
                attempts: 1,
                after_ms: None,
            })),
            Rebuilt::ArgsLost
        ));
        assert_eq!(r.next_rerun(), Rerun::Run { attempt: 2 });
        let at = StoredAt {
            node_id: NodeId::random(),
            node_address: "198.18.0.2:7000".into(),
            size: 1 << 20,
        };
        assert!(matches!(r.ran(ObjState::Stored(at.clone())), Rebuilt::Done(a) if a == at));
        assert_eq!(r.next_rerun(), Rerun::UsedUp);
        assert_eq!(Rebuild::new(0).next_rerun(), Rerun::UsedUp);
    }
}
