//! The worker service every Shoal process serves: tasks pushed to it (if
//! it is a worker), actor calls, objects it owns (for borrowers), and the
//! log lines of the job's workers (for the driver).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use shoal_net::{Peer, Service};
use shoal_proto::{
    FailureKind, ServiceError, ServiceErrorKind, TaskFailure, TaskOutcome, TaskReply, TaskSpec,
    WorkerReply, WorkerRequest,
};

use super::{exec, Executor, Process};

/// The service, for a process of type `P`.
pub(crate) struct WorkerService<P> {
    /// The worker this service runs tasks as (none in a driver).
    executor: Option<Executor>,
    _process: PhantomData<fn() -> P>,
}

impl<P: Process> WorkerService<P> {
    pub(crate) fn new(executor: Option<Executor>) -> Self {
        Self {
            executor,
            _process: PhantomData,
        }
    }

    fn executor(&self) -> Result<Executor, ServiceError> {
        self.executor.ok_or_else(|| {
            ServiceError::new(
                ServiceErrorKind::PermissionDenied,
                "this process runs no tasks or actors",
            )
        })
    }
}

/// Runs `work` on the process's runtime (whatever runtime serves the
/// request) and waits for it.
async fn on_process<P, T, F, Fut>(process: &Arc<P>, work: F) -> Result<T, ServiceError>
where
    P: Process,
    T: Send + 'static,
    F: FnOnce(Arc<P>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let work = work(Arc::clone(process));
    let runtime = process.runtime();
    // Already there (a worker process has one runtime): no hand-off.
    if tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == runtime.id()) {
        return Ok(work.await);
    }
    runtime
        .spawn(work)
        .await
        .map_err(|e| ServiceError::new(ServiceErrorKind::Internal, e.to_string()))
}

/// Runs a pushed task here (worker processes and threads), after the
/// tasks pushed to this worker before it.
pub(crate) async fn execute<P: Process>(
    process: &Arc<P>,
    spec: TaskSpec,
    executor: Executor,
) -> TaskReply {
    let cancel = process.cancels().watch(spec.task_id);
    // Looked up once: what it is, and how to call it.
    let entry = crate::registry::entry(&spec.function.name);
    let streaming = entry.is_some_and(|e| e.function.streaming).then(|| {
        let sink = super::stream::Sink {
            owner: spec.owner.clone(),
            attempt: spec.attempt,
            executor,
            function: spec.function.name.clone(),
        };
        process.sinks().start(spec.task_id, sink)
    });
    let fetched = process.fetch_args(&spec.args).await;
    // A task cancelled while it waits for its turn never starts.
    let turn = tokio::select! {
        turn = process.gates().gate(executor.worker_id).acquire_owned() => Some(turn),
        _ = cancel.cancelled() => None,
    };
    let started = std::time::Instant::now();
    let started_us = Some(shoal_proto::state::unix_us());
    let mut more_returns = Vec::new();
    let outcome = match fetched {
        _ if turn.is_none() || cancel.is_cancelled() => {
            TaskOutcome::Failed(exec::cancelled(&spec, executor))
        }
        Err(e) => TaskOutcome::Failed(TaskFailure {
            kind: FailureKind::ArgumentLost,
            function: spec.function.name.clone(),
            task_id: spec.task_id,
            node_id: Some(executor.node_id),
            message: e.to_string(),
            backtrace: None,
            attempts: spec.attempt + 1,
            after_ms: None,
        }),
        Ok(args) => match exec::invoke(&spec, entry, args, executor, &cancel).await {
            Ok(bytes) => {
                let made = (
                    spec.function.name.as_str(),
                    spec.task_id,
                    Some(spec.owner.worker_id),
                );
                let returns = entry.map_or(1, |e| e.function.returns);
                if returns <= 1 {
                    let id = spec.task_id.return_object(0);
                    process.store_result(id, bytes, made, executor).await
                } else {
                    // Each return is its own object, inline or stored by
                    // its own size.
                    match crate::registry::split_returns(&bytes, returns) {
                        Some(parts) => {
                            let mut outcomes = Vec::with_capacity(parts.len());
                            for (index, part) in (0u32..).zip(parts) {
                                let id = spec.task_id.return_object(index);
                                outcomes.push(process.store_result(id, part, made, executor).await);
                            }
                            more_returns = outcomes.split_off(1);
                            outcomes.pop().unwrap_or_else(|| {
                                TaskOutcome::Failed(exec::bad_returns(&spec, executor, returns))
                            })
                        }
                        None => TaskOutcome::Failed(exec::bad_returns(&spec, executor, returns)),
                    }
                }
            }
            Err(failure) => TaskOutcome::Failed(failure),
        },
    };
    drop(turn);
    drop(streaming);
    drop(cancel);
    let run_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    // The task's arguments are dropped by now: what is still referenced
    // here was kept (in a thread, an actor, a task still running), and is
    // borrowed from the task's owner until this process lets it go.
    let kept = spec
        .borrowed
        .iter()
        .copied()
        .filter(|id| process.keep_for(*id, &spec.owner))
        .collect();
    TaskReply {
        task_id: spec.task_id,
        attempt: spec.attempt,
        node_id: executor.node_id,
        worker_id: executor.worker_id,
        outcome,
        run_us,
        started_us,
        kept,
        more_returns,
    }
}

impl<P: Process> Service for WorkerService<P> {
    type Request = WorkerRequest;
    type Reply = WorkerReply;

    /// Tasks and actor methods run as long as they take: the owner judges
    /// them by this worker's process and node, not by a reply deadline.
    fn deadline_applies(&self, request: &WorkerRequest) -> bool {
        !matches!(
            request,
            WorkerRequest::PushTask(_)
                | WorkerRequest::ActorCall(_)
                | WorkerRequest::CreateActor { .. }
        )
    }

    async fn handle(
        &self,
        peer: &Peer,
        request: WorkerRequest,
    ) -> Result<WorkerReply, ServiceError> {
        // Who may send what: the one table, `shoal_proto::WORKER_RPCS`.
        peer.require(request.rpc().roles)?;
        let process = P::current().ok_or_else(|| {
            ServiceError::new(
                ServiceErrorKind::Unavailable,
                "this process is not initialised yet",
            )
        })?;
        match request {
            WorkerRequest::PushTask(spec) => {
                let executor = self.executor()?;
                let job_id = process.job_id();
                if spec.job_id != job_id {
                    return Err(ServiceError::new(
                        ServiceErrorKind::BadRequest,
                        format!(
                            "task of job {} pushed to a worker of job {job_id}",
                            spec.job_id
                        ),
                    ));
                }
                let span = tracing::debug_span!("run", job = %spec.job_id, task = %spec.task_id, function = %spec.function.name, attempt = spec.attempt);
                let reply = on_process(&process, move |process| {
                    let run = async move {
                        let reply = execute(&process, spec, executor).await;
                        tracing::debug!(
                            run_us = reply.run_us,
                            failed = matches!(reply.outcome, TaskOutcome::Failed(_)),
                            "ran"
                        );
                        reply
                    };
                    tracing::Instrument::instrument(run, span)
                })
                .await?;
                Ok(WorkerReply::TaskDone(reply))
            }
            WorkerRequest::CreateActor {
                actor_id,
                class,
                args,
                max_concurrency,
                incarnation,
            } => {
                let executor = self.executor()?;
                let failure = on_process(&process, move |process| async move {
                    let host = process.host();
                    host.create(
                        &process,
                        actor_id,
                        &class,
                        args,
                        (max_concurrency, incarnation),
                        executor,
                    )
                    .await
                })
                .await?;
                Ok(WorkerReply::ActorCreated {
                    failure,
                    pid: std::process::id(),
                })
            }
            WorkerRequest::ActorCall(call) => {
                let executor = self.executor()?;
                let span = tracing::debug_span!("actor_call", actor = %call.actor_id, task = %call.task_id, method = %call.method, seq = call.seq);
                let reply = on_process(&process, move |process| {
                    let run = async move {
                        tracing::debug!("called");
                        process.host().call(&process, call, executor).await
                    };
                    tracing::Instrument::instrument(run, span)
                })
                .await??;
                Ok(WorkerReply::TaskDone(reply))
            }
            WorkerRequest::Logs(lines) => {
                // As Ray does: each line with the worker's pid and node.
                for line in lines {
                    let node = line.node_id.to_string();
                    let prefix = format!("(pid={}, node={})", line.pid, &node[..8.min(node.len())]);
                    if line.stderr {
                        eprintln!("{prefix} {}", line.text);
                    } else {
                        println!("{prefix} {}", line.text);
                    }
                }
                Ok(WorkerReply::Ok)
            }
            WorkerRequest::CancelTask { task_id } => {
                self.executor()?;
                process.cancels().cancel(task_id);
                process.cancel_children(task_id);
                Ok(WorkerReply::Ok)
            }
            WorkerRequest::GeneratorItem {
                task_id,
                attempt: _,
                index,
                item,
            } => Ok(process.generator_item(task_id, index, item).await),
            WorkerRequest::ReleaseBorrow { id, borrower } => {
                process.release_borrower(id, borrower);
                Ok(WorkerReply::Ok)
            }
            WorkerRequest::CancelObject { id, force } => {
                process.cancel_owned(id, force);
                Ok(WorkerReply::Ok)
            }
            WorkerRequest::GetObject { id, wait_ms } => {
                let wait = Duration::from_millis(wait_ms).min(Duration::from_secs(30));
                Ok(WorkerReply::Object(process.object_value(id, wait).await))
            }
        }
    }
}
