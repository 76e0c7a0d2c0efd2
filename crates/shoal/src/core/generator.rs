//! Streaming generators: the owner's record of each (items received,
//! items the caller took, how it ended) and the producer's side of the
//! item exchange.
//!
//! The worker running a generator stores each item as the task's return
//! `index + 1` (inline, or in its node's store) and sends it to the owner
//! (`GeneratorItem`), then waits for the answer before it goes on: the
//! owner answers once fewer than `backpressure` items up to that one wait
//! for the caller (long-polled, up to [`ACK_WAIT`] a round), or at once with
//! `stop` when the caller dropped the generator. A retried producer sends
//! its items from the first again: those the owner has are acknowledged
//! and not kept twice. The task's own result is the item count.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use shoal_net::sync::MutexExt;
use shoal_proto::{
    FailureKind, ObjectId, TaskFailure, TaskId, TaskOutcome, WorkerReply, WorkerRequest,
};
use tokio::sync::Notify;

use super::Core;
use crate::error::{Error, Result};
use crate::owner::objects::ObjState;

/// How long the owner holds an item's answer while the caller is behind.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Most items one generator yields: item `i` is the task's return `i + 1`,
/// and return indices stay below the bit that marks `put` objects.
pub(crate) const ITEMS_MAX: u32 = (1 << 31) - 2;

/// A generator, as its owner keeps it.
pub(crate) struct Generator {
    pub task_id: TaskId,
    backpressure: u32,
    inner: Mutex<Inner>,
    /// Woken by every change: an item in, one taken, the end, the drop.
    changed: Notify,
}

#[derive(Default)]
struct Inner {
    /// Items received (their objects are owned here from then on).
    received: u32,
    /// Items the caller took.
    taken: u32,
    /// How the task ended: the item count, or its failure.
    end: Option<std::result::Result<u32, TaskFailure>>,
    /// The failure was handed to the caller.
    failure_taken: bool,
    /// The caller dropped the generator.
    dropped: bool,
}

/// What the caller gets next.
pub(crate) enum Next {
    /// The item's object (one reference counted for the caller).
    Item(ObjectId),
    /// The producer failed (given once).
    Failed(Error),
    /// No more items.
    End,
}

/// The generators this process owns, by task.
#[derive(Default)]
pub(crate) struct Generators {
    by_task: DashMap<TaskId, Arc<Generator>>,
}

impl Generator {
    /// The item's object id.
    fn item_id(&self, index: u32) -> ObjectId {
        self.task_id.return_object(index + 1)
    }

    /// The next item, or the end, once there is one.
    pub(crate) async fn next(&self) -> Next {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut inner = self.inner.locked();
                if inner.taken < inner.received {
                    let id = self.item_id(inner.taken);
                    inner.taken += 1;
                    drop(inner);
                    self.changed.notify_waiters();
                    return Next::Item(id);
                }
                match &inner.end {
                    Some(Err(f)) if !inner.failure_taken => {
                        let f = f.clone();
                        inner.failure_taken = true;
                        return Next::Failed(Error::from_failure(f));
                    }
                    Some(_) => return Next::End,
                    None => {}
                }
            }
            changed.await;
        }
    }

    /// The task ended with `state` (its result: the item count).
    pub(crate) fn finish(&self, state: &ObjState) {
        let end = match state {
            ObjState::Inline(bytes) => match crate::codec::decode::<u32>(bytes) {
                Ok(count) => Ok(count),
                Err(e) => Err(self.failure(format!("its item count did not decode: {e}"))),
            },
            ObjState::Failed(f) => Err(f.clone()),
            other => Err(self.failure(format!("it ended as {other:?}"))),
        };
        let mut inner = self.inner.locked();
        let end = match end {
            // Every item is answered before the next is made: a count
            // past those received means some were lost on the way.
            Ok(count) if count > inner.received => Err(self.failure(format!(
                "it yielded {count} items, of which {} arrived",
                inner.received
            ))),
            other => other,
        };
        inner.end = Some(end);
        drop(inner);
        self.changed.notify_waiters();
    }

    fn failure(&self, message: String) -> TaskFailure {
        TaskFailure {
            kind: FailureKind::WorkerCrashed,
            function: "a streaming generator".into(),
            task_id: self.task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts: 0,
            after_ms: None,
        }
    }
}

impl Core {
    /// Records a generator this process submitted.
    pub(crate) fn new_generator(&self, task_id: TaskId, backpressure: u32) -> Arc<Generator> {
        let generator = Arc::new(Generator {
            task_id,
            backpressure: backpressure.max(1),
            inner: Mutex::default(),
            changed: Notify::new(),
        });
        self.generators
            .by_task
            .insert(task_id, Arc::clone(&generator));
        generator
    }

    /// The caller dropped `generator`: its producer is told to stop, its
    /// task cancelled, and the items it never took freed.
    pub(crate) fn drop_generator(self: &Arc<Self>, generator: &Generator) {
        let (taken, received) = {
            let mut inner = generator.inner.locked();
            inner.dropped = true;
            (inner.taken, inner.received)
        };
        generator.changed.notify_waiters();
        self.generators.by_task.remove(&generator.task_id);
        let why = super::cancel::Why {
            kind: FailureKind::Cancelled,
            force: false,
            after: None,
        };
        self.cancel_here(generator.task_id.return_object(0), why);
        for index in taken..received {
            self.release_ref(generator.item_id(index));
        }
    }

    /// An item from the worker running one of this process's generators.
    pub(crate) async fn take_generator_item(
        &self,
        task_id: TaskId,
        index: u32,
        item: TaskOutcome,
    ) -> WorkerReply {
        let stop = WorkerReply::GeneratorAck {
            stop: true,
            again: false,
        };
        let Some(generator) = self
            .generators
            .by_task
            .get(&task_id)
            .map(|g| Arc::clone(&g))
        else {
            // Dropped (or never this process's): no one wants more.
            return stop;
        };
        {
            let mut inner = generator.inner.locked();
            if inner.dropped {
                return stop;
            }
            if index > ITEMS_MAX {
                tracing::warn!(%task_id, index, "a generator item past the most a generator yields; stopping its producer");
                return stop;
            }
            if index == inner.received {
                self.own(generator.item_id(index), ObjState::from(item));
                inner.received += 1;
            } else if index > inner.received {
                // Items are sent one at a time, each answered first: a gap
                // is a producer that lost its place. It stops.
                tracing::warn!(%task_id, index, received = inner.received, "a generator item came out of order; stopping its producer");
                return stop;
            }
            // Below `received`: a retried producer sending again what is
            // had already.
        }
        generator.changed.notify_waiters();
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        loop {
            let changed = generator.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let inner = generator.inner.locked();
                if inner.dropped {
                    return stop;
                }
                // It goes on while fewer than `backpressure` items (this
                // one included) wait for the caller, as Ray's producer
                // does.
                if u64::from(index) + 1 < u64::from(inner.taken) + u64::from(generator.backpressure)
                {
                    return WorkerReply::GeneratorAck {
                        stop: false,
                        again: false,
                    };
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return WorkerReply::GeneratorAck {
                    stop: false,
                    again: true,
                };
            }
        }
    }

    /// Yields item `index` of the generator `task_id` running here: stores
    /// it, sends it to the owner and waits for the answer. True when the
    /// caller wants no more.
    pub(crate) async fn yield_item(
        self: Arc<Self>,
        task_id: TaskId,
        index: u32,
        bytes: Vec<u8>,
    ) -> Result<bool> {
        let sink = self.sinks.get(task_id).ok_or_else(|| {
            Error::Protocol(format!("task {task_id} is not a generator running here"))
        })?;
        if index > ITEMS_MAX {
            return Err(Error::InvalidOptions(format!(
                "a generator yields at most {ITEMS_MAX} items"
            )));
        }
        let id = task_id.return_object(index + 1);
        let made = (sink.function.as_str(), task_id, Some(sink.owner.worker_id));
        let item = self.outcome_of(id, bytes, made, sink.executor).await;
        let request = WorkerRequest::GeneratorItem {
            task_id,
            attempt: sink.attempt,
            index,
            item,
        };
        let mut failures = 0u32;
        loop {
            let owner = self.worker(&sink.owner.address).await;
            let answer = match owner {
                Ok(owner) => owner
                    .call(&request, ACK_WAIT + Duration::from_secs(20))
                    .await
                    .map_err(Error::from),
                Err(e) => Err(e),
            };
            match answer {
                Ok(WorkerReply::GeneratorAck { stop, again: false }) => return Ok(stop),
                Ok(WorkerReply::GeneratorAck { again: true, .. }) => failures = 0,
                Ok(other) => {
                    return Err(Error::Protocol(format!(
                        "{other:?} in answer to a generator item"
                    )))
                }
                // The owner may be unreachable for a moment; gone for good,
                // the task ends (and its owner with it).
                Err(e) if failures < 20 => {
                    failures += 1;
                    tracing::debug!(%task_id, index, error = %e, "could not hand a generator item to its owner; trying again");
                    tokio::time::sleep(Duration::from_millis(50 << failures.min(5))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
