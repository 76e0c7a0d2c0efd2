//! The actors this worker hosts: each caller's calls run in the order it
//! made them, once (a resend is answered with the kept reply), under the
//! actor's lock: `&mut self` methods alone, `&self` ones up to
//! `max_concurrency` at once.

use shoal_net::sync::MutexExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use shoal_proto::worker::ActorCall;
use shoal_proto::{
    ActorId, ArgSpec, FailureKind, TaskFailure, TaskId, TaskOutcome, TaskReply, WorkerId,
};
use tokio::sync::{RwLock, Semaphore};

use super::context::Running;
use super::exec::{await_caught, run_caught};
use super::lane::{Invoked, Lane, SyncCall, LANE_THREADS_MAX};
use super::replies::{KeptReplies, Seen};
use super::{Executor, Process};
use crate::error::Result;
use crate::registry::{self, ActorClass, ActorState, MethodInvoker};
use crate::turns::Turns;

/// An actor hosted by this worker.
pub(crate) struct Hosted {
    class: &'static ActorClass,
    incarnation: u32,
    state: Arc<RwLock<ActorState>>,
    permits: Arc<Semaphore>,
    /// The permits of each of the class's concurrency groups (a method in
    /// none takes `permits`).
    groups: Vec<Arc<Semaphore>>,
    /// Per caller: its turns and the replies kept for its resends.
    callers: Mutex<HashMap<WorkerId, Arc<CallerLine>>>,
    /// For an actor of sync methods: its own threads (`max_concurrency` of
    /// them), fed calls in order (the next call is queued while this one
    /// runs, so back-to-back calls cost no thread hand-offs).
    lane: Option<Lane>,
    /// Per method (in the class's order): its last run was quick (see
    /// [`super::exec::claim_inline`]).
    quick: Arc<[std::sync::atomic::AtomicBool]>,
}

/// One caller's calls at a hosted actor.
#[derive(Default)]
struct CallerLine {
    /// The next sequence number allowed to start.
    turns: Turns,
    /// The replies of calls that ran, for their resends.
    kept: Mutex<KeptReplies<TaskReply>>,
}

impl CallerLine {
    fn kept(&self) -> MutexGuard<'_, KeptReplies<TaskReply>> {
        self.kept.locked()
    }

    /// Whether some run of call `seq` has taken its turn.
    fn turn_passed(&self, seq: u64) -> bool {
        self.turns.is_turn(seq.saturating_add(1))
    }

    /// What the table says of call `seq` (it takes no place).
    fn seen(&self, seq: u64) -> Seen<TaskReply> {
        let mut kept = self.kept();
        kept.seen(seq, self.turn_passed(seq))
    }

    /// In `seq`'s turn: [`Seen::New`] when this copy is to run it (its run
    /// is then recorded as started), else how to answer it.
    fn begin(&self, seq: u64) -> Seen<TaskReply> {
        let mut kept = self.kept();
        let seen = kept.seen(seq, self.turn_passed(seq));
        if matches!(seen, Seen::New) {
            kept.start(seq);
        }
        seen
    }
}

/// A call's run: its reply is kept when it ends; dropped before that (its
/// handler abandoned), the copies waiting for it get an error.
struct CallRun {
    line: Arc<CallerLine>,
    seq: u64,
    ended: bool,
}

impl CallRun {
    fn finish(mut self, reply: TaskReply) {
        self.ended = true;
        self.line.kept().finish(self.seq, reply);
    }
}

impl Drop for CallRun {
    fn drop(&mut self) {
        if !self.ended {
            self.line.kept().abandon(self.seq);
        }
    }
}

/// The actors this worker hosts.
#[derive(Default)]
pub(crate) struct Host {
    actors: dashmap::DashMap<ActorId, Arc<Hosted>>,
}

fn failure(
    kind: FailureKind,
    function: &str,
    task_id: TaskId,
    executor: Executor,
    message: String,
) -> TaskFailure {
    TaskFailure {
        kind,
        function: function.to_string(),
        task_id,
        node_id: Some(executor.node_id),
        message,
        backtrace: None,
        attempts: 1,
        after_ms: None,
    }
}

impl Host {
    /// Runs the constructor and keeps the actor.
    pub(crate) async fn create<P: Process>(
        &self,
        process: &Arc<P>,
        actor_id: ActorId,
        class_name: &str,
        args: Vec<ArgSpec>,
        (max_concurrency, incarnation): (u32, u32),
        executor: Executor,
    ) -> Option<TaskFailure> {
        let fail = |kind, message| {
            Some(failure(
                kind,
                class_name,
                TaskId::fresh(),
                executor,
                message,
            ))
        };
        let Some(class) = registry::actor_class(class_name) else {
            return fail(
                FailureKind::FunctionNotFound,
                format!("no actor class named {class_name:?} in this executable"),
            );
        };
        let args = match process.fetch_args(&args).await {
            Ok(args) => args,
            Err(e) => return fail(FailureKind::ArgumentLost, e.to_string()),
        };
        let construct = class.construct;
        let built =
            tokio::task::spawn_blocking(move || super::exec::caught(|| construct(args))).await;
        let state = match built {
            Ok(Ok(Ok(state))) => state,
            Ok(Ok(Err(e))) => return fail(e.kind, e.message),
            Ok(Err((message, _))) => {
                return fail(
                    FailureKind::Panic,
                    format!("the constructor panicked: {message}"),
                );
            }
            Err(e) => {
                return fail(
                    FailureKind::Panic,
                    format!("the constructor's thread failed: {e}"),
                )
            }
        };
        let all_sync = class
            .methods
            .iter()
            .all(|(_, m)| matches!(m, MethodInvoker::Ref(_) | MethodInvoker::Mut(_)));
        let grouped = !class.concurrency_groups.is_empty();
        let lane = if max_concurrency <= LANE_THREADS_MAX && all_sync && !grouped {
            match Lane::start(class.name, max_concurrency) {
                Ok(lane) => Some(lane),
                Err(e) => {
                    return fail(
                        FailureKind::Panic,
                        format!("cannot start the actor's thread: {e}"),
                    )
                }
            }
        } else {
            None
        };
        let hosted = Hosted {
            class,
            incarnation,
            state: Arc::new(RwLock::new(state)),
            permits: Arc::new(Semaphore::new(max_concurrency.max(1) as usize)),
            groups: class
                .concurrency_groups
                .iter()
                .map(|(_, n)| Arc::new(Semaphore::new((*n).max(1) as usize)))
                .collect(),
            callers: Mutex::new(HashMap::new()),
            lane,
            quick: class.methods.iter().map(|_| Default::default()).collect(),
        };
        self.actors.insert(actor_id, Arc::new(hosted));
        None
    }

    /// Runs one call, in its caller's order, once: a call sent again (its
    /// reply was lost) is answered with the reply its run gave, or waits
    /// for that run to end, and is never run a second time.
    pub(crate) async fn call<P: Process>(
        &self,
        process: &Arc<P>,
        call: ActorCall,
        executor: Executor,
    ) -> std::result::Result<TaskReply, shoal_proto::ServiceError> {
        let hosted = self
            .actors
            .get(&call.actor_id)
            .map(|h| Arc::clone(&h))
            .filter(|h| h.incarnation == call.incarnation)
            .ok_or_else(|| {
                shoal_proto::ServiceError::new(
                    shoal_proto::ServiceErrorKind::NotFound,
                    format!(
                        "actor {} (incarnation {}) is not hosted here",
                        call.actor_id, call.incarnation
                    ),
                )
            })?;
        let line = hosted.line(call.caller);
        line.kept().forget_below(call.done_below);
        // Seen before (a resend): answered without fetching its arguments.
        let seen = line.seen(call.seq);
        if !matches!(seen, Seen::New) {
            return Ok(hosted.again(seen, &call, executor).await);
        }
        // Arguments are fetched before our turn: they need no ordering.
        let args = match &call.args {
            Some(args) => Some(process.fetch_args(args).await),
            None => None,
        };
        line.turns.wait(call.seq).await;
        // In its turn: the first copy of the call to get here runs it; a
        // copy that arrived meanwhile waits for that run's reply.
        let seen = line.begin(call.seq);
        if !matches!(seen, Seen::New) {
            return Ok(hosted.again(seen, &call, executor).await);
        }
        let running = CallRun {
            line: Arc::clone(&line),
            seq: call.seq,
            ended: false,
        };
        let cancel = process.cancels().watch(call.task_id);
        let mut reply = hosted
            .run(process, &call, args, executor, (&line.turns, cancel))
            .await;
        // The call's arguments are dropped by now: what the actor still
        // references it borrows from the caller until it lets it go.
        if let Some(lender) = &call.lender {
            reply.kept = call
                .borrowed
                .iter()
                .copied()
                .filter(|id| process.keep_for(*id, lender))
                .collect();
        }
        running.finish(reply.clone());
        Ok(reply)
    }
}

impl Hosted {
    /// The line of `caller`'s calls (made at its first call).
    fn line(&self, caller: WorkerId) -> Arc<CallerLine> {
        let mut callers = self.callers.locked();
        Arc::clone(callers.entry(caller).or_default())
    }

    /// The answer to a call that already ran or runs here.
    async fn again(
        &self,
        seen: Seen<TaskReply>,
        call: &ActorCall,
        executor: Executor,
    ) -> TaskReply {
        let function = format!("{}::{}", self.class.name, call.method);
        let dropped = |message: String| TaskReply {
            task_id: call.task_id,
            attempt: 0,
            node_id: executor.node_id,
            worker_id: executor.worker_id,
            outcome: TaskOutcome::Failed(failure(
                FailureKind::ReplyDropped,
                &function,
                call.task_id,
                executor,
                message,
            )),
            run_us: None,
            started_us: None,
            kept: Vec::new(),
            more_returns: Vec::new(),
        };
        match seen {
            Seen::Replay(reply) => reply,
            Seen::Wait(first) => first.await.unwrap_or_else(|_| {
                dropped(format!(
                    "call {} of this caller ended here without a reply; it is not run again",
                    call.seq
                ))
            }),
            Seen::Forgotten | Seen::New => dropped(format!(
                "call {} of this caller ran here, and its reply is no longer kept (the last {} are); it is not run again",
                call.seq,
                super::replies::KEPT_MAX
            )),
        }
    }

    /// Runs a call in its turn (`turn`, passed once the call has its place).
    async fn run<P: Process>(
        &self,
        process: &Arc<P>,
        call: &ActorCall,
        args: Option<Result<crate::shm::Args>>,
        executor: Executor,
        (turn, cancel): (&Turns, super::cancel::Watch),
    ) -> TaskReply {
        let hosted = self;
        let function = format!("{}::{}", hosted.class.name, call.method);
        // From here the call is the actor's: its turn, then its run.
        let started_us = Some(shoal_proto::state::unix_us());
        let reply = |outcome| TaskReply {
            task_id: call.task_id,
            attempt: 0,
            node_id: executor.node_id,
            worker_id: executor.worker_id,
            outcome,
            run_us: None,
            started_us,
            kept: Vec::new(),
            more_returns: Vec::new(),
        };
        let advance = || turn.pass(call.seq);
        // Cancelled before it runs (while it waited for its turn, a permit
        // or the lock), it never does; an async method is dropped at its
        // next await once cancelled.
        let cancelled = || {
            let f = failure(
                FailureKind::Cancelled,
                &function,
                call.task_id,
                executor,
                "cancelled".into(),
            );
            reply(TaskOutcome::Failed(f))
        };
        if cancel.is_cancelled() {
            advance();
            return cancelled();
        }
        let args = match args {
            None => {
                advance();
                let f = failure(
                    FailureKind::ArgumentLost,
                    &function,
                    call.task_id,
                    executor,
                    "abandoned by its caller".into(),
                );
                return reply(TaskOutcome::Failed(f));
            }
            Some(Err(e)) => {
                advance();
                let f = failure(
                    FailureKind::ArgumentLost,
                    &function,
                    call.task_id,
                    executor,
                    e.to_string(),
                );
                return reply(TaskOutcome::Failed(f));
            }
            Some(Ok(args)) => args,
        };
        let Some((index, (_, invoker))) = hosted
            .class
            .methods
            .iter()
            .enumerate()
            .find(|(_, (name, _))| *name == call.method)
        else {
            advance();
            let f = failure(
                FailureKind::FunctionNotFound,
                &function,
                call.task_id,
                executor,
                "no such method".into(),
            );
            return reply(TaskOutcome::Failed(f));
        };
        let state = Arc::clone(&hosted.state);
        let running = Running {
            task: call.task_id,
            executor,
        };
        // On the actor's own thread, the place in line is taken by queueing.
        if let Some(lane) = &hosted.lane {
            let method = match invoker {
                MethodInvoker::Ref(f) => SyncCall::Ref(*f, args),
                MethodInvoker::Mut(f) => SyncCall::Mut(*f, args),
                MethodInvoker::AsyncRef(_) | MethodInvoker::AsyncMut(_) => {
                    advance();
                    let f = failure(
                        FailureKind::Panic,
                        &function,
                        call.task_id,
                        executor,
                        "an async method on an actor run by its own thread".into(),
                    );
                    return reply(TaskOutcome::Failed(f));
                }
            };
            let outcome = match lane.run_here(&state) {
                // Nothing queued or running: run it on this thread now,
                // which spares the hand-off to the actor's thread and back.
                Some(mut guard) => {
                    advance();
                    let ran = if cancel.is_cancelled() {
                        Ok(Err(crate::registry::InvokeError::cancelled()))
                    } else {
                        Lane::run_claimed(&hosted.quick[index], || {
                            run_caught(running, || method.run_on(&mut guard))
                        })
                        .await
                    };
                    drop(guard);
                    lane.done();
                    ran
                }
                None => {
                    let exclusive = lane.threads == 1;
                    // Cancelled while queued behind others: not run.
                    let queued = lane.queue(running, move || {
                        method.run_locked(&state, exclusive, &cancel)
                    });
                    advance();
                    queued.await
                }
            };
            return reply(call_outcome(process, call, &function, executor, outcome).await);
        }
        // Our place is taken once we hold a permit and the lock; only then
        // may the caller's next call start competing. With concurrency
        // groups, calls keep their order within their group only (as in
        // Ray): a call waiting for a busy group does not hold up the
        // caller's calls to another.
        let permits = match hosted.class.method_groups.get(index).copied().flatten() {
            Some(group) => hosted.groups.get(group).unwrap_or(&hosted.permits),
            None => &hosted.permits,
        };
        if !hosted.groups.is_empty() {
            advance();
        }
        let permit = Arc::clone(permits).acquire_owned().await;
        let outcome = match invoker {
            MethodInvoker::Ref(f) => {
                let guard = state.read_owned().await;
                advance();
                if cancel.is_cancelled() {
                    return cancelled();
                }
                let f = *f;
                sync_call(&hosted.quick, index, running, move || f(&guard, args)).await
            }
            MethodInvoker::Mut(f) => {
                let mut guard = state.write_owned().await;
                advance();
                if cancel.is_cancelled() {
                    return cancelled();
                }
                let f = *f;
                sync_call(&hosted.quick, index, running, move || f(&mut guard, args)).await
            }
            MethodInvoker::AsyncRef(f) => {
                let guard = state.read_owned().await;
                advance();
                tokio::select! {
                    out = await_caught(running, f(guard, args)) => out,
                    _ = cancel.cancelled() => return cancelled(),
                }
            }
            MethodInvoker::AsyncMut(f) => {
                let guard = state.write_owned().await;
                advance();
                tokio::select! {
                    out = await_caught(running, f(guard, args)) => out,
                    _ = cancel.cancelled() => return cancelled(),
                }
            }
        };
        drop(permit);
        reply(call_outcome(process, call, &function, executor, outcome).await)
    }
}

/// What a call's invocation made of its result.
async fn call_outcome<P: Process>(
    process: &Arc<P>,
    call: &ActorCall,
    function: &str,
    executor: Executor,
    outcome: Invoked,
) -> TaskOutcome {
    match outcome {
        Ok(Ok(bytes)) => {
            process
                .store_result(
                    call.task_id.return_object(0),
                    bytes,
                    (function, call.task_id, None),
                    executor,
                )
                .await
        }
        Ok(Err(e)) => {
            TaskOutcome::Failed(failure(e.kind, function, call.task_id, executor, e.message))
        }
        Err((message, backtrace)) => {
            let mut f = failure(
                FailureKind::Panic,
                function,
                call.task_id,
                executor,
                message,
            );
            f.backtrace = Some(backtrace);
            TaskOutcome::Failed(f)
        }
    }
}

/// Runs a sync method on a blocking thread, catching panics.
/// Runs sync method `index` of an actor that also has async methods: on
/// this runtime thread if it was quick last time (see
/// [`super::exec::claim_inline`]), else on a blocking thread.
async fn sync_call(
    quick: &Arc<[std::sync::atomic::AtomicBool]>,
    index: usize,
    running: Running,
    f: impl FnOnce() -> crate::registry::Invocation + Send + 'static,
) -> Invoked {
    if let Some(_slot) = super::exec::claim_inline(&quick[index]).await {
        return super::exec::timed(&quick[index], || run_caught(running, f));
    }
    let quick = Arc::clone(quick);
    let joined = tokio::task::spawn_blocking(move || {
        super::exec::timed(&quick[index], || run_caught(running, f))
    })
    .await;
    match joined {
        Ok(result) => result,
        Err(e) => Err((format!("the method's thread failed: {e}"), String::new())),
    }
}
