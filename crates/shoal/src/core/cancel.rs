//! Cancelling, as an owner: `shoal::cancel`, `cancel_force` and timeouts.
//!
//! Every task and actor call this process submitted and that runs is in
//! [`Submitted`], which its run watches; a task still queued as its spec
//! (see `submit`) is in its class's queue, and a cancel takes it out.
//! A cancel fails its reference at once (a `get` returns
//! `Error::Cancelled` or `Error::Timeout` now, whatever the worker does)
//! and wakes the run:
//! a task not pushed yet never is, and a pushed one is told to stop
//! (`CancelTask` to its worker, which cancels what it submitted in turn);
//! a forced cancel also has the worker's node stop the worker. Whatever
//! the run ends with afterwards, the reference stays cancelled.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use shoal_net::sync::MutexExt;
use shoal_proto::{
    Address, FailureKind, ObjectId, TaskFailure, TaskId, WorkerReply, WorkerRequest,
};
use tokio::sync::Notify;
use tracing::debug;

use super::{Core, CONTROL_TIMEOUT};
use crate::error::{Error, Result};
use crate::owner::objects::ObjState;

/// Why a run was cancelled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Why {
    pub kind: FailureKind,
    /// Stop its worker too.
    pub force: bool,
    /// For a timeout: how long it was.
    pub after: Option<Duration>,
}

/// Where a cancel goes beyond this process.
pub(crate) enum Target {
    /// A task: its run (in this process) tells its worker.
    Task,
    /// An actor call: the address of the actor's worker, as it is now.
    Call(Box<dyn Fn() -> String + Send + Sync>),
}

/// A task or actor call this process submitted, until it ends.
pub(crate) struct Cancellable {
    pub task_id: TaskId,
    function: Cow<'static, str>,
    /// The task that submitted it, when one running here did: a cancel of
    /// that task reaches it.
    parent: Option<TaskId>,
    why: OnceLock<Why>,
    /// [`Submitted::changed`].
    changed: Arc<Notify>,
    target: Target,
    /// How many objects it returns.
    returns: u32,
    /// The returns after the first, as its worker answered them.
    pub more_returns: std::sync::Mutex<Vec<shoal_proto::TaskOutcome>>,
}

/// The failure a cancelled task's reference gives.
fn cancelled(task_id: TaskId, function: &str, why: Why) -> TaskFailure {
    let message = match (why.kind, why.after) {
        (FailureKind::Timeout, Some(after)) => format!("timed out after {after:?}"),
        _ if why.force => "cancelled (forced: its worker was stopped)".to_string(),
        _ => "cancelled".to_string(),
    };
    TaskFailure {
        kind: why.kind,
        function: function.to_string(),
        task_id,
        node_id: None,
        message,
        backtrace: None,
        attempts: 0,
        after_ms: why
            .after
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

impl Cancellable {
    /// Why it was cancelled, if it was.
    pub(crate) fn why(&self) -> Option<Why> {
        self.why.get().copied()
    }

    /// The failure its reference gives.
    pub(crate) fn failure(&self, why: Why) -> TaskFailure {
        cancelled(self.task_id, &self.function, why)
    }
}

/// The runs this process may cancel.
#[derive(Default)]
pub(crate) struct Submitted {
    runs: DashMap<ObjectId, Arc<Cancellable>>,
    /// Cancels of queued tasks that had just been given their place (out
    /// of the queue, not yet in `runs`): their runs apply them on joining.
    asked: std::sync::Mutex<std::collections::HashMap<TaskId, Why>>,
    /// Woken by every cancel (each run then looks at its own).
    changed: Arc<Notify>,
}

impl Cancellable {
    /// Resolves once the run is cancelled.
    pub(crate) async fn cancelled(&self) {
        crate::rt::notified_until(&self.changed, || self.why.get().is_some()).await;
    }
}

impl Core {
    /// Records a run that makes `id` (the first of `returns` objects),
    /// submitted by the task `parent` running here, if one did; it leaves
    /// with [`Core::run_ended`].
    pub(crate) fn cancellable(
        &self,
        id: ObjectId,
        (function, returns): (Cow<'static, str>, u32),
        target: Target,
        parent: Option<TaskId>,
    ) -> Arc<Cancellable> {
        let run = Arc::new(Cancellable {
            task_id: id.task_id(),
            function,
            parent,
            why: OnceLock::new(),
            changed: Arc::clone(&self.submitted.changed),
            target,
            returns,
            more_returns: Default::default(),
        });
        self.submitted.runs.insert(id, Arc::clone(&run));
        run
    }

    /// The run that makes `id` has ended.
    pub(crate) fn run_ended(&self, id: ObjectId) {
        self.submitted.runs.remove(&id);
    }

    /// Cancels `id` after `after` unless it ended by then.
    pub(crate) fn time_out(
        self: &Arc<Self>,
        id: ObjectId,
        run: &Arc<Cancellable>,
        after: Duration,
    ) {
        let run = Arc::downgrade(run);
        let core = Arc::downgrade(self);
        self.handle.spawn(async move {
            tokio::time::sleep(after).await;
            if let (Some(core), Some(run)) = (core.upgrade(), run.upgrade()) {
                let why = Why {
                    kind: FailureKind::Timeout,
                    force: false,
                    after: Some(after),
                };
                if let Some((address, task_id)) = core.cancel_run(id, &run, why) {
                    core.tell_cancel(&address, task_id).await;
                }
            }
        });
    }

    /// Cancels the object `id` (owned by `owner`): here if this process
    /// runs it, else by asking its owner. A run that ended is left as it is.
    pub(crate) async fn cancel(
        self: &Arc<Self>,
        id: ObjectId,
        owner: &Address,
        force: bool,
    ) -> Result<()> {
        // Any return of a task names its run (by the first).
        let id = id.task_id().return_object(0);
        let why = Why {
            kind: FailureKind::Cancelled,
            force,
            after: None,
        };
        if let Some(run) = self.submitted.runs.get(&id).map(|r| Arc::clone(&r)) {
            // An actor call's worker is told before this returns, so a
            // call queued there cannot run after a later cancel's effect.
            if let Some((address, task_id)) = self.cancel_run(id, &run, why) {
                self.tell_cancel(&address, task_id).await;
            }
            return Ok(());
        }
        if owner.worker_id == self.me.worker_id {
            self.cancel_unplaced(id, why);
            return Ok(());
        }
        let worker = self.worker(&owner.address).await?;
        match worker
            .call_idempotent(&WorkerRequest::CancelObject { id, force }, CONTROL_TIMEOUT)
            .await?
        {
            WorkerReply::Ok => Ok(()),
            other => Err(Error::Protocol(format!(
                "{other:?} in answer to CancelObject"
            ))),
        }
    }

    /// Cancels `id` if this process runs it; false if it does not (or no
    /// longer does).
    pub(crate) fn cancel_here(self: &Arc<Self>, id: ObjectId, why: Why) -> bool {
        let id = id.task_id().return_object(0);
        let Some(run) = self.submitted.runs.get(&id).map(|r| Arc::clone(&r)) else {
            return self.cancel_unplaced(id, why);
        };
        if let Some((address, task_id)) = self.cancel_run(id, &run, why) {
            let core = Arc::clone(self);
            self.handle.spawn(async move {
                core.tell_cancel(&address, task_id).await;
            });
        }
        true
    }

    /// Cancels the task making `id` that has no run yet: one still queued
    /// as its spec fails at once, and one just given its place is
    /// cancelled when its run joins. False if there is none.
    fn cancel_unplaced(self: &Arc<Self>, id: ObjectId, why: Why) -> bool {
        let task_id = id.task_id();
        if let Some(queued) = self.leases.take_queued(|q| q.task_id == task_id).pop() {
            debug!(%id, kind = ?why.kind, "cancelling a queued task");
            self.fail_queued(&queued, why);
            return true;
        }
        // Out of the queue and not yet in `runs`, or ended.
        if !self.objects.owned(id).is_some_and(|slot| slot.is_pending()) {
            return false;
        }
        self.submitted.asked.locked().insert(task_id, why);
        // It may have joined meanwhile, before the cancel was noted.
        if let Some(run) = self.submitted.runs.get(&id).map(|r| Arc::clone(&r)) {
            self.cancel_if_asked(id, &run);
        }
        true
    }

    /// Fails the reference of a task taken out of its queue, cancelled.
    fn fail_queued(&self, queued: &super::submit::Queued, why: Why) {
        let failure = cancelled(queued.task_id, queued.function.name, why);
        self.complete_object(queued.task_id.return_object(0), ObjState::Failed(failure));
    }

    /// Applies a cancel asked before `run` joined (see
    /// [`Core::cancel_unplaced`]).
    pub(crate) fn cancel_if_asked(&self, id: ObjectId, run: &Cancellable) {
        let asked = self.submitted.asked.locked().remove(&id.task_id());
        if let Some(why) = asked {
            self.cancel_run(id, run, why);
        }
    }

    /// Cancels `run` (once: a later cancel changes nothing); for an actor
    /// call, gives the worker to tell and the call.
    fn cancel_run(&self, id: ObjectId, run: &Cancellable, why: Why) -> Option<(String, TaskId)> {
        if run.why.set(why).is_err() {
            return None;
        }
        debug!(%id, kind = ?why.kind, force = why.force, "cancelling");
        for index in 0..run.returns.max(1) {
            self.fail_pending(id.task_id().return_object(index), run.failure(why));
        }
        run.changed.notify_waiters();
        match &run.target {
            // A forced cancel cannot stop an actor's worker (the actor
            // would go with it): an actor call is always stopped in place.
            Target::Call(address) => Some((address(), run.task_id)),
            Target::Task => None,
        }
    }

    /// Tells the worker at `address` to stop running `task_id`.
    pub(crate) async fn tell_cancel(&self, address: &str, task_id: TaskId) {
        let told = match self.worker(address).await {
            Ok(worker) => worker
                .call_idempotent(&WorkerRequest::CancelTask { task_id }, CONTROL_TIMEOUT)
                .await
                .map(drop)
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = told {
            debug!(%task_id, %address, error = %e, "could not tell a worker to cancel");
        }
    }

    /// Sets an owned object still pending to `failure`, and wakes `wait`.
    fn fail_pending(&self, id: ObjectId, failure: TaskFailure) {
        if let Some(slot) = self.objects.owned(id) {
            if slot.set_if_pending(ObjState::Failed(failure)) {
                self.changed.notify_waiters();
            }
        }
    }

    /// Cancels what `task`, which ran here, submitted (and recursively
    /// what those submitted, in their workers).
    pub(crate) fn cancel_children(self: &Arc<Self>, task: TaskId) {
        // Cancels are rare: the runs are looked through then, rather than
        // each submission recorded under its parent.
        let children: Vec<ObjectId> = self
            .submitted
            .runs
            .iter()
            .filter(|run| run.parent == Some(task))
            .map(|run| *run.key())
            .collect();
        let why = Why {
            kind: FailureKind::Cancelled,
            force: false,
            after: None,
        };
        for child in children {
            self.cancel_here(child, why);
        }
        for queued in self.leases.take_queued(|q| q.parent == Some(task)) {
            self.fail_queued(&queued, why);
        }
    }
}
