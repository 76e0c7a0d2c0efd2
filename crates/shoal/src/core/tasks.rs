//! Running tasks as their owner: the shell of `owner::tasks`. It resolves
//! arguments, takes places on leased workers, pushes tasks and waits for
//! their replies; whether to retry, rebuild or finish is the machine's.

use shoal_net::sync::MutexExt;
use std::sync::{Arc, Mutex};

use shoal_proto::placement::{self, Placement};
use shoal_proto::state::{Placed, TaskState};
use shoal_proto::{
    ArgSpec, FailureKind, FunctionId, NodeReply, NodeRequest, ObjectId, StoredAt, TaskFailure,
    TaskId, TaskOutcome, TaskSpec, WorkerReply, WorkerRequest,
};
use tracing::warn;

use super::cancel::Cancellable;
use super::events::failure_text;
use super::lease::TaskKind;
use super::objects::Lent;
use super::submit::FirstPlace;
use super::{Core, CONTROL_TIMEOUT, INLINE_BYTES_MAX, TASK_CALL_TIMEOUT};
use crate::args::{ArgValue, KeepAlive};
use crate::error::{Error, Result};
use crate::options::TaskOptions;
use crate::owner::leases::Shape;
use crate::owner::objects::{Borrows, ObjState};
use crate::owner::tasks::{Lineage, PlaceDone, Rebuild, Rebuilt, Rerun, TaskRun, Then, Tried};
use crate::registry::RemoteFunction;

impl Core {
    /// Runs a lost stored result's task again (after rebuilding its own
    /// lost arguments the same way); returns where the new copy is.
    pub(crate) async fn reconstruct(
        self: &Arc<Self>,
        id: ObjectId,
        lost_at: &StoredAt,
        why: String,
    ) -> Result<StoredAt> {
        let lost = |reason: String| Error::ObjectLost { id, reason };
        let slot = self.objects.owned(id).ok_or_else(|| lost(why.clone()))?;
        let lineage = slot.lineage().ok_or_else(|| {
            lost(format!(
                "{why}; it cannot be rebuilt (not a task result, or max_retries = 0)"
            ))
        })?;
        let mut rebuild = lineage.rebuild.lock().await;
        // Rebuilt by another reader meanwhile?
        if let ObjState::Stored(at) = slot.state() {
            if at.node_id != lost_at.node_id {
                return Ok(at);
            }
        }
        loop {
            let Rerun::Run { attempt } = rebuild.next_rerun() else {
                return Err(lost(format!("{why}; its task's retries are used up")));
            };
            warn!(%id, function = lineage.function.name, "a task's result was lost with its node; running the task again");
            let args = lineage.args.locked().clone();
            let run = TaskRun::new(
                (lineage.task_id, lineage.function.name),
                (
                    lineage.options.max_retries,
                    lineage.options.retry_exceptions,
                ),
                attempt,
                false,
            );
            let state = self
                .run_resolved(
                    run,
                    (lineage.function, &lineage.options),
                    &args,
                    lineage.borrows.as_deref(),
                )
                .await;
            match rebuild.ran(state) {
                Rebuilt::Done(at) => {
                    slot.set(ObjState::Stored(at.clone()));
                    return Ok(at);
                }
                Rebuilt::ArgsLost => {
                    // Rebuild the arguments this process owns, then retry.
                    let rebuilt = Box::pin(self.reconstruct_args(&args)).await;
                    *lineage.args.locked() = rebuilt;
                }
                Rebuilt::Failed(f) => return Err(Error::from_failure(f)),
                Rebuilt::Unexpected(other) => {
                    return Err(lost(format!(
                        "{why}; its task ran again but gave {other:?}"
                    )))
                }
            }
        }
    }

    /// The arguments with each stored one this process owns checked, and
    /// rebuilt if its copy is gone.
    async fn reconstruct_args(self: &Arc<Self>, args: &[ArgSpec]) -> Vec<ArgSpec> {
        let mut out = Vec::with_capacity(args.len());
        for arg in args {
            let ArgSpec::Stored { id, at } = arg else {
                out.push(arg.clone());
                continue;
            };
            let readable = self.read_stored_part(*id, at).await;
            let at = match readable {
                Ok(()) => at.clone(),
                Err(e) => match self.reconstruct(*id, at, e.to_string()).await {
                    Ok(at) => at,
                    Err(_) => at.clone(),
                },
            };
            out.push(ArgSpec::Stored { id: *id, at });
        }
        out
    }

    /// Checks that a stored object's copy can still be read (its first byte).
    async fn read_stored_part(&self, id: ObjectId, at: &StoredAt) -> Result<()> {
        let node = self.node(&at.node_address).await?;
        let read = NodeRequest::ReadObject {
            id,
            offset: 0,
            len: 1,
        };
        match node.call_idempotent(&read, CONTROL_TIMEOUT).await? {
            NodeReply::ObjectChunk { .. } => Ok(()),
            other => Err(Error::Protocol(format!(
                "{other:?} in answer to ReadObject"
            ))),
        }
    }

    /// Waits for reference arguments and turns every argument into what
    /// goes on the wire; returns the references to keep alive meanwhile
    /// (an actor's: references inside its argument values are kept for
    /// the job, as it may hold them for good). A failed argument fails the
    /// call the same way.
    pub(crate) async fn resolve_args(
        self: &Arc<Self>,
        function: &str,
        task_id: TaskId,
        args: Vec<ArgValue>,
    ) -> std::result::Result<(Vec<ArgSpec>, Vec<KeepAlive>), TaskFailure> {
        let (specs, mut keep_alive, lent) = self.resolve_lending(function, task_id, args).await?;
        if let Some(lent) = lent {
            lent.0.locked().keep_all();
            keep_alive.push(Box::new(lent));
        }
        Ok((specs, keep_alive))
    }

    /// [`Core::resolve_args`], with the references inside argument values
    /// lent to the task, if any (their borrows end when it is dropped).
    #[allow(clippy::type_complexity)]
    pub(crate) async fn resolve_lending(
        self: &Arc<Self>,
        function: &str,
        task_id: TaskId,
        args: Vec<ArgValue>,
    ) -> std::result::Result<(Vec<ArgSpec>, Vec<KeepAlive>, Option<Lent>), TaskFailure> {
        // Held from the start: a failure below returns them.
        let lent: Vec<ObjectId> = args
            .iter()
            .flat_map(|a| match a {
                ArgValue::Lending { lent, .. } => lent.as_slice(),
                _ => &[],
            })
            .copied()
            .collect();
        let lent = (!lent.is_empty()).then(|| Lent::new(lent));
        let failure = |kind, message: String| TaskFailure {
            kind,
            function: function.to_string(),
            task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts: 0,
            after_ms: None,
        };
        let mut spec_args = Vec::with_capacity(args.len());
        let mut keep_alive = Vec::new();
        for (index, arg) in args.into_iter().enumerate() {
            match arg {
                // A large value goes to the node store first (as Ray puts
                // large arguments in plasma): a message carries at most
                // 16 MiB, and the task's worker maps it from there.
                ArgValue::Bytes(bytes) | ArgValue::Lending { bytes, .. }
                    if bytes.len() > INLINE_BYTES_MAX =>
                {
                    let (id, at) = self.put_stored_at(&bytes).await.map_err(|e| {
                        failure(
                            FailureKind::BadArguments,
                            format!("argument {index} could not be stored: {e}"),
                        )
                    })?;
                    keep_alive.push(Box::new(StoredArg(Arc::clone(self), id)) as KeepAlive);
                    spec_args.push(ArgSpec::Stored { id, at });
                }
                ArgValue::Bytes(bytes) | ArgValue::Lending { bytes, .. } => {
                    spec_args.push(ArgSpec::Inline(bytes))
                }
                ArgValue::Bad(message) => {
                    return Err(failure(
                        FailureKind::BadArguments,
                        format!("argument {index} cannot be encoded: {message}"),
                    ))
                }
                ArgValue::Ref { id, owner, _keep } => {
                    keep_alive.push(_keep);
                    match self.wait_state(id, &owner, None).await {
                        Some(ObjState::Inline(bytes)) => {
                            spec_args.push(ArgSpec::Inline(bytes.to_vec()))
                        }
                        Some(ObjState::Stored(at)) => spec_args.push(ArgSpec::Stored { id, at }),
                        Some(ObjState::Failed(f)) => return Err(f),
                        Some(ObjState::Lost(why) | ObjState::OwnerDied(why)) => {
                            return Err(failure(
                                FailureKind::ArgumentLost,
                                format!("argument {index} (object {id}) is lost: {why}"),
                            ))
                        }
                        Some(ObjState::Pending) | None => {
                            return Err(failure(
                                FailureKind::ArgumentLost,
                                format!("argument {index} (object {id}) never became ready"),
                            ))
                        }
                    }
                }
            }
        }
        Ok((spec_args, keep_alive, lent))
    }

    /// Runs a task to its result; a stored result keeps its lineage when the
    /// task may be retried.
    pub(super) async fn run_task(
        self: &Arc<Self>,
        task_id: TaskId,
        (function, options, args): (&'static RemoteFunction, TaskOptions, Vec<ArgValue>),
        cancel: &Cancellable,
        first: Option<FirstPlace>,
    ) -> (ObjState, Option<Arc<Lineage>>) {
        // The references stay alive until the task is done: a stored
        // argument must not be freed while a worker may still read it.
        let resolved = tokio::select! {
            resolved = Box::pin(self.resolve_lending(function.name, task_id, args)) => resolved,
            _ = cancel.cancelled() => return (cancelled_state(cancel), None),
        };
        let (spec_args, mut keep_alive, lent) = match resolved {
            Ok(resolved) => resolved,
            Err(f) => {
                self.events.failed(task_id, 0, failure_text(&f));
                return (ObjState::Failed(f), None);
            }
        };
        if !keep_alive.is_empty() {
            // It waited for its reference arguments; now for a lease.
            self.events.state(task_id, 0, TaskState::PendingLease);
        }
        let borrows = lent.as_ref().map(|lent| Arc::clone(&lent.0));
        let stored_args = spec_args
            .iter()
            .any(|a| matches!(a, ArgSpec::Stored { .. }));
        let run = TaskRun::new(
            (task_id, function.name),
            (options.max_retries, options.retry_exceptions),
            0,
            stored_args,
        );
        let (state, spec_args) = self
            .run_to_end(
                run,
                (function, &options),
                spec_args,
                (borrows.as_deref(), cancel),
                first,
            )
            .await;
        // A rerun sends the same values: what they lend stays lent as long
        // as the lineage (else the borrows end here, with `lent`). A task
        // of several returns is not run again for a lost one.
        let rebuildable = options.max_retries > 0 && function.returns <= 1 && !function.streaming;
        let lineage = (matches!(state, ObjState::Stored(_)) && rebuildable).then(|| {
            keep_alive.extend(lent.map(|lent| Box::new(lent) as KeepAlive));
            Arc::new(Lineage {
                task_id,
                function,
                rebuild: tokio::sync::Mutex::new(Rebuild::new(options.max_retries)),
                options,
                args: Mutex::new(spec_args),
                borrows,
                _keep_alive: Mutex::new(keep_alive),
            })
        });
        (state, lineage)
    }

    /// Where a task of `asked` placement goes with these arguments: by
    /// default, near the node holding most of their stored bytes when that
    /// is not this process's node (locality; the class key then names that
    /// node, so its leases are asked of it).
    fn placement_for(&self, asked: &Placement, args: &[ArgSpec]) -> Placement {
        let mut placement = asked.clone();
        if asked.strategy == placement::Strategy::Default {
            placement.near = heaviest_node(args).filter(|n| *n != self.home.node_id);
        }
        placement
    }

    /// Runs a task whose arguments are resolved until the machine says it
    /// is done, rebuilding lost arguments when it says so; returns the
    /// final state and the arguments it last ran with. A queued task's
    /// first try has its place already (`first`).
    async fn run_to_end(
        self: &Arc<Self>,
        mut run: TaskRun,
        task: (&'static RemoteFunction, &TaskOptions),
        mut spec_args: Vec<ArgSpec>,
        (borrows, cancel): (Option<&Mutex<Borrows>>, &Cancellable),
        mut first: Option<FirstPlace>,
    ) -> (ObjState, Vec<ArgSpec>) {
        loop {
            if cancel.why().is_some() {
                return (cancelled_state(cancel), spec_args);
            }
            match self
                .try_once(
                    &mut run,
                    task,
                    &spec_args,
                    (borrows, Some(cancel)),
                    first.take(),
                )
                .await
            {
                Then::Finish(state) => return (state, spec_args),
                Then::Again => {}
                Then::RebuildArgs => {
                    // An argument's copy was lost with its node: rebuild
                    // the ones this process owns from their lineage.
                    let rebuilt = Box::pin(self.reconstruct_args(&spec_args)).await;
                    let changed = rebuilt != spec_args;
                    spec_args = rebuilt;
                    if let Then::Finish(state) = run.args_rebuilt(changed) {
                        return (state, spec_args);
                    }
                }
            }
        }
    }

    /// Runs a task whose arguments are resolved (a rerun for lineage:
    /// lost arguments are the caller's to rebuild).
    async fn run_resolved(
        self: &Arc<Self>,
        mut run: TaskRun,
        task: (&'static RemoteFunction, &TaskOptions),
        spec_args: &[ArgSpec],
        borrows: Option<&Mutex<Borrows>>,
    ) -> ObjState {
        loop {
            match self
                .try_once(&mut run, task, spec_args, (borrows, None), None)
                .await
            {
                Then::Finish(state) => return state,
                Then::Again => {}
                // A rerun does not rebuild here: the run ends as lost.
                Then::RebuildArgs => match run.args_rebuilt(false) {
                    Then::Finish(state) => return state,
                    Then::Again | Then::RebuildArgs => {}
                },
            }
        }
    }

    /// One try: a place on a leased worker (`first`, when the task got one
    /// while queued), the push, and the reply (or its loss), reported to
    /// the machines (the task's and its borrows'), whose verdict on the
    /// place is carried out here.
    async fn try_once(
        self: &Arc<Self>,
        run: &mut TaskRun,
        (function, options): (&'static RemoteFunction, &TaskOptions),
        spec_args: &[ArgSpec],
        (borrows, cancel): (Option<&Mutex<Borrows>>, Option<&Cancellable>),
        first: Option<FirstPlace>,
    ) -> Then {
        let kind = TaskKind::of(function.name);
        let (task_id, attempt) = (run.task_id(), run.attempt());
        if attempt > 0 {
            // A retry waits for a lease again (the first try's wait was
            // recorded with its arguments).
            self.events.state(task_id, attempt, TaskState::PendingLease);
        }
        if let Err(e) = options.scheduling.check() {
            self.events.failed(task_id, attempt, e.to_string());
            return run.cannot_run(FailureKind::InvalidOptions, e.to_string());
        }
        let acquired = match first {
            // Queued as its spec: it has its place, and its shape was
            // checked when it was queued.
            Some(first) => first.take(),
            None => {
                let shape = Shape {
                    resources: options.resources.clone(),
                    placement: self.placement_for(&options.scheduling.placement, spec_args),
                    env: self.env.merged(&options.env),
                };
                if let Err(e) = shape.env.check() {
                    let why = format!("env_var: {e}");
                    self.events.failed(task_id, attempt, why.clone());
                    return run.cannot_run(FailureKind::InvalidOptions, why);
                }
                let cancelled = async {
                    match cancel {
                        Some(cancel) => cancel.cancelled().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    acquired = self.leases.acquire(self, &shape, kind) => acquired,
                    // Not pushed yet: it never will be.
                    _ = cancelled => return Then::Finish(cancel.map(cancelled_state).unwrap_or(ObjState::Pending)),
                }
            }
        };
        let place = match acquired {
            Ok(place) => place,
            Err(Error::Unschedulable(why)) => {
                self.events.failed(task_id, attempt, why.clone());
                return run.cannot_run(FailureKind::Unschedulable, why);
            }
            Err(e) => {
                self.events.failed(task_id, attempt, e.to_string());
                return run.head_unavailable(e.to_string());
            }
        };
        // The push and its reply in a box: a task waiting for its place
        // (a million may) holds none of that state.
        Box::pin(self.push_placed(
            run,
            (function, options, kind),
            spec_args,
            (borrows, cancel),
            place,
        ))
        .await
    }

    /// The rest of a try once it has its place: the push, the reply, and
    /// the machines' verdict on the place, carried out.
    async fn push_placed(
        self: &Arc<Self>,
        run: &mut TaskRun,
        (function, options, kind): (&'static RemoteFunction, &TaskOptions, TaskKind),
        spec_args: &[ArgSpec],
        (borrows, cancel): (Option<&Mutex<Borrows>>, Option<&Cancellable>),
        place: super::lease::Place,
    ) -> Then {
        let (task_id, attempt) = (run.task_id(), run.attempt());
        let leased = &place.worker;
        let placed = Placed {
            node_id: leased.lease.node_id,
            worker_id: leased.worker_id,
        };
        self.events.running(task_id, attempt, Some(placed));
        let spec = TaskSpec {
            task_id,
            attempt,
            job_id: self.job_id,
            function: FunctionId {
                name: function.name.to_string(),
                signature: function.signature,
            },
            args: spec_args.to_vec(),
            resources: options.resources.clone(),
            owner: self.me.clone(),
            borrowed: borrows.map_or_else(Vec::new, |b| {
                let mut b = b.locked();
                b.sent();
                b.ids().to_vec()
            }),
        };
        let request = WorkerRequest::PushTask(spec);
        let push = leased.worker.call(&request, TASK_CALL_TIMEOUT);
        tokio::pin!(push);
        let mut told = cancel.is_none();
        let reply = loop {
            tokio::select! {
                reply = &mut push => break reply,
                // The node saw the worker exit: no need to wait for the
                // connection to time out.
                _ = leased.lost.cancelled() => break Err(shoal_net::RpcError::Stream("the worker exited".into())),
                // Cancelled while it runs: the worker is told (and stops it
                // and what it submitted), or, forced, its node stops the
                // worker; its answer is still awaited, for the place.
                _ = async { cancel.expect("told is false").cancelled().await }, if !told => {
                    told = true;
                    let force = cancel.and_then(Cancellable::why).is_some_and(|w| w.force);
                    self.stop_pushed(leased, task_id, force);
                }
            }
        };
        let mut kept = Vec::new();
        let tried = match reply {
            Ok(WorkerReply::TaskDone(done)) if self.watches.is_dead(done.node_id) => {
                let why = format!("answered from node {}, declared dead", done.node_id);
                self.events.failed(task_id, attempt, why);
                Tried::AnsweredFromDeadNode(done.node_id)
            }
            Ok(WorkerReply::TaskDone(done)) => {
                kind.ran_for(done.run_us);
                let error = match &done.outcome {
                    TaskOutcome::Failed(f) => Some(failure_text(f)),
                    _ => None,
                };
                self.events.answered(&done, attempt, error);
                kept = done.kept;
                if let Some(cancel) = cancel.filter(|_| !done.more_returns.is_empty()) {
                    *cancel.more_returns.locked() = done.more_returns;
                }
                Tried::Answered(done.outcome)
            }
            Ok(other) => {
                self.events.failed(task_id, attempt, "a bad reply".into());
                Tried::BadReply(format!("{other:?}"))
            }
            Err(e) => {
                warn!(%task_id, function = function.name, attempt, worker = %leased.worker_id, error = %e, "lost the worker running a task");
                self.events
                    .failed(task_id, attempt, format!("lost its worker: {e}"));
                Tried::Lost(e.to_string())
            }
        };
        if let Some(borrows) = borrows {
            let mut borrows = borrows.locked();
            match tried {
                Tried::Answered(_) => borrows.answered(&kept, leased.worker_id),
                _ => borrows.lost(),
            }
        }
        let (done, then) = run.tried(tried);
        match done {
            PlaceDone::Release => self.leases.release(self, &place),
            PlaceDone::Discard => self.leases.discard(self, &place),
        }
        then
    }
}

/// The states of a task's returns after the first, from its final state
/// (a failure fails them all) and what its worker answered for them.
pub(super) fn more_states(first: &ObjState, more: Vec<TaskOutcome>, returns: u32) -> Vec<ObjState> {
    let wanted = returns.saturating_sub(1) as usize;
    match first {
        ObjState::Failed(f) => vec![ObjState::Failed(f.clone()); wanted],
        ObjState::Lost(why) => vec![ObjState::Lost(why.clone()); wanted],
        _ if more.len() != wanted => {
            let why = format!(
                "its worker answered {} of its {returns} returns",
                more.len() + 1
            );
            vec![ObjState::Lost(why); wanted]
        }
        _ => more.into_iter().map(ObjState::from).collect(),
    }
}

/// What a cancelled task's reference says.
fn cancelled_state(cancel: &Cancellable) -> ObjState {
    let why = cancel.why().unwrap_or(super::cancel::Why {
        kind: FailureKind::Cancelled,
        force: false,
        after: None,
    });
    ObjState::Failed(cancel.failure(why))
}

impl Core {
    /// Tells the worker running `task_id` to stop it (and what it
    /// submitted); `force`: then has its node stop the worker.
    fn stop_pushed(&self, leased: &super::lease::LeasedWorker, task_id: TaskId, force: bool) {
        let (worker, node, worker_id) =
            (leased.worker.clone(), leased.node.clone(), leased.worker_id);
        self.handle.spawn(async move {
            let told = worker
                .call_idempotent(&WorkerRequest::CancelTask { task_id }, CONTROL_TIMEOUT)
                .await;
            if let Err(e) = told {
                tracing::debug!(%task_id, error = %e, "could not tell the worker to cancel");
            }
            if force {
                let kill = NodeRequest::KillWorker { worker_id };
                if let Err(e) = node.call_idempotent(&kill, CONTROL_TIMEOUT).await {
                    warn!(%task_id, %worker_id, error = %e, "could not stop a cancelled task's worker");
                }
            }
        });
    }
}

/// The node holding the most bytes of `args`' stored objects, if any is
/// stored (ties go to the first such argument's node).
fn heaviest_node(args: &[ArgSpec]) -> Option<shoal_proto::NodeId> {
    let mut bytes: Vec<(shoal_proto::NodeId, u64)> = Vec::new();
    for arg in args {
        if let ArgSpec::Stored { at, .. } = arg {
            match bytes.iter_mut().find(|(n, _)| *n == at.node_id) {
                Some((_, sum)) => *sum += at.size,
                None => bytes.push((at.node_id, at.size)),
            }
        }
    }
    let most = bytes.iter().map(|(_, b)| *b).max()?;
    bytes.iter().find(|(_, b)| *b == most).map(|(n, _)| *n)
}

/// A large argument value stored for a task, freed when the task is done
/// (its retries included).
struct StoredArg(Arc<Core>, ObjectId);

impl Drop for StoredArg {
    fn drop(&mut self) {
        self.0.release_ref(self.1);
    }
}

#[cfg(test)]
mod locality_tests {
    use super::*;

    fn stored(node: shoal_proto::NodeId, size: u64) -> ArgSpec {
        ArgSpec::Stored {
            id: ObjectId::random(),
            at: StoredAt {
                node_id: node,
                node_address: "198.18.0.2:1".into(),
                size,
            },
        }
    }

    #[test]
    fn the_node_with_most_argument_bytes_wins() {
        let (a, b) = (shoal_proto::NodeId::random(), shoal_proto::NodeId::random());
        let args = vec![
            stored(a, 30),
            ArgSpec::Inline(vec![0; 1000]),
            stored(b, 50),
            stored(a, 30),
        ];
        assert_eq!(
            heaviest_node(&args),
            Some(a),
            "60 bytes on A against 50 on B"
        );
        assert_eq!(heaviest_node(&args[1..3]), Some(b));
        assert_eq!(
            heaviest_node(&[ArgSpec::Inline(vec![1])]),
            None,
            "inline values are everywhere"
        );
    }
}
