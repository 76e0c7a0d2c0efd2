//! Submitting tasks. A task runs in a runtime task of its own from its
//! place on a worker to its end; before that, a task with nothing to wait
//! for but a place (its arguments are values, small enough to go inline)
//! waits as a compact spec in its class's queue in the lease machine
//! ([`Queued`]), so a million queued tasks hold no runtime task each. Its
//! run starts when the machine gives it a place, refuses it, or the head
//! has been away past the bound; the run goes on from there as any other.
//! Any other task (reference arguments to wait for, large values to store
//! first, several returns, a generator, a timeout) runs in its runtime
//! task from the start.

use std::borrow::Cow;
use std::sync::Arc;

use shoal_net::sync::MutexExt;
use shoal_proto::{ObjectId, TaskId};

use super::cancel::{Cancellable, Target};
use super::lease::{Place, TaskKind};
use super::{Core, INLINE_BYTES_MAX};
use crate::args::ArgValue;
use crate::error::Error;
use crate::options::TaskOptions;
use crate::owner::leases::Shape;
use crate::owner::objects::ObjState;
use crate::registry::RemoteFunction;

/// A task waiting for a place as its spec.
pub(crate) struct Queued {
    pub(crate) task_id: TaskId,
    pub(crate) function: &'static RemoteFunction,
    /// Shared with the tasks queued before it when equal
    /// ([`super::lease::LeaseManager::intern`]).
    options: Arc<TaskOptions>,
    /// The encoded argument values, each sent inline.
    args: InlineArgs,
    /// The task running here that submitted it: cancelling that task
    /// cancels it.
    pub(crate) parent: Option<TaskId>,
    pub(crate) kind: TaskKind,
}

/// A queued task's argument values: the common single one needs no list.
enum InlineArgs {
    One(Vec<u8>),
    Many(Vec<Vec<u8>>),
}

impl InlineArgs {
    fn new(args: Vec<ArgValue>) -> Self {
        let mut bytes = args.into_iter().filter_map(|a| match a {
            ArgValue::Bytes(bytes) => Some(bytes),
            _ => None,
        });
        match (bytes.next(), bytes.next()) {
            (Some(one), None) => InlineArgs::One(one),
            (first, second) => {
                // A list of its own, not the `ArgValue`s' (72 bytes each).
                let known = usize::from(first.is_some()) + usize::from(second.is_some());
                let mut many = Vec::with_capacity(known + bytes.size_hint().0);
                many.extend(first.into_iter().chain(second).chain(bytes));
                InlineArgs::Many(many)
            }
        }
    }

    fn values(self) -> Vec<ArgValue> {
        match self {
            InlineArgs::One(one) => vec![ArgValue::Bytes(one)],
            InlineArgs::Many(many) => many.into_iter().map(ArgValue::Bytes).collect(),
        }
    }
}

/// How a queued task's wait for a place ended.
pub(crate) enum FirstPlace {
    /// A place, handed back to the machine if the run ends before using it.
    Given(GivenPlace),
    /// Never one: the error its first try fails with.
    Failed(Error),
}

impl FirstPlace {
    pub(crate) fn given(core: &Arc<Core>, place: Place) -> Self {
        FirstPlace::Given(GivenPlace {
            core: Arc::clone(core),
            place: Some(place),
        })
    }

    /// The place, or the error, for the first try.
    pub(crate) fn take(self) -> Result<Place, Error> {
        match self {
            FirstPlace::Given(mut given) => given
                .place
                .take()
                .ok_or_else(|| Error::Protocol("a queued task's place was taken twice".into())),
            FirstPlace::Failed(e) => Err(e),
        }
    }
}

/// A place given to a queued task and not used yet.
pub(crate) struct GivenPlace {
    core: Arc<Core>,
    place: Option<Place>,
}

impl Drop for GivenPlace {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            self.core.leases.unplaced(&self.core, &place);
        }
    }
}

impl Core {
    /// Submits a task; returns the id of its (first) result, which this
    /// process owns (one reference is counted for the caller, for each of
    /// the function's returns: the others are `task_id().return_object(i)`).
    pub(crate) fn submit(
        self: &Arc<Self>,
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> ObjectId {
        self.submit_as(function, options, args, None)
    }

    /// Submits a streaming generator's task: the generator its items go
    /// to, and the id of its result (their count).
    pub(crate) fn submit_generator(
        self: &Arc<Self>,
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> (Arc<super::generator::Generator>, ObjectId) {
        let task_id = TaskId::fresh();
        let generator = self.new_generator(task_id, options.generator_backpressure);
        let id = self.submit_as(
            function,
            options,
            args,
            Some((task_id, Arc::clone(&generator))),
        );
        (generator, id)
    }

    fn submit_as(
        self: &Arc<Self>,
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
        generator: Option<(TaskId, Arc<super::generator::Generator>)>,
    ) -> ObjectId {
        let (task_id, generator) = match generator {
            Some((task_id, generator)) => (task_id, Some(generator)),
            None => (TaskId::fresh(), None),
        };
        let id = task_id.return_object(0);
        let returns = function.returns.max(1);
        for index in 0..returns {
            self.register_pending(task_id.return_object(index));
        }
        // A task with no reference to wait for waits for a lease at once.
        let waits = args.iter().any(|a| matches!(a, ArgValue::Ref { .. }));
        self.events.submitted(task_id, function.name, waits);
        if generator.is_none() && returns == 1 {
            if let Some(shape) = self.queue_shape(&options, &args) {
                self.queue_spec(task_id, function, (options, args), &shape);
                return id;
            }
        }
        let cancel = self.cancellable(
            id,
            (Cow::Borrowed(function.name), returns),
            Target::Task,
            crate::worker::context::current_task(),
        );
        if let Some(after) = options.timeout {
            self.time_out(id, &cancel, after);
        }
        self.spawn_run(task_id, (function, options, args), cancel, generator, None);
        id
    }

    /// The shape of the lease the task waits for, when that is all it
    /// waits for and it may be queued as its spec: its arguments are
    /// values to send inline, and its options neither fail its run nor
    /// cancel it on a timer.
    fn queue_shape(&self, options: &TaskOptions, args: &[ArgValue]) -> Option<Shape> {
        let inline = args
            .iter()
            .all(|a| matches!(a, ArgValue::Bytes(b) if b.len() <= INLINE_BYTES_MAX));
        if !inline || options.timeout.is_some() || options.scheduling.check().is_err() {
            return None;
        }
        let shape = Shape {
            resources: options.resources.clone(),
            placement: options.scheduling.placement.clone(),
            env: self.env.merged(&options.env),
        };
        shape.env.check().is_ok().then_some(shape)
    }

    /// Queues the task as its spec (see [`Core::queue_shape`]).
    fn queue_spec(
        self: &Arc<Self>,
        task_id: TaskId,
        function: &'static RemoteFunction,
        (options, args): (TaskOptions, Vec<ArgValue>),
        shape: &Shape,
    ) {
        let queued = Box::new(Queued {
            task_id,
            function,
            options: self.leases.intern(options),
            args: InlineArgs::new(args),
            parent: crate::worker::context::current_task(),
            kind: TaskKind::of(function.name),
        });
        self.leases.enqueue(self, shape, queued);
    }

    /// A queued task's wait is over: its run starts, with its first place
    /// (or why it has none).
    pub(crate) fn start_queued(self: &Arc<Self>, queued: Queued, first: FirstPlace) {
        let Queued {
            task_id,
            function,
            options,
            args,
            parent,
            ..
        } = queued;
        let id = task_id.return_object(0);
        let cancel = self.cancellable(id, (Cow::Borrowed(function.name), 1), Target::Task, parent);
        // Cancelled while it was being handed its place.
        self.cancel_if_asked(id, &cancel);
        let args = args.values();
        let options = Arc::unwrap_or_clone(options);
        self.spawn_run(
            task_id,
            (function, options, args),
            cancel,
            None,
            Some(first),
        );
    }

    /// Runs a task on the runtime, from its arguments (and, for a queued
    /// task, its first place) to its result.
    fn spawn_run(
        self: &Arc<Self>,
        task_id: TaskId,
        (function, options, args): (&'static RemoteFunction, TaskOptions, Vec<ArgValue>),
        cancel: Arc<Cancellable>,
        generator: Option<Arc<super::generator::Generator>>,
        first: Option<FirstPlace>,
    ) {
        let id = task_id.return_object(0);
        let returns = function.returns.max(1);
        let core = Arc::clone(self);
        // Every log line of the task's life on this side carries its ids
        // (debug: free when debug logging is off).
        let span = tracing::debug_span!("task", job = %self.job_id, task = %task_id, function = %function.name);
        let run = async move {
            tracing::debug!("submitted");
            let (outcome, lineage) = core
                .run_task(task_id, (function, options, args), &cancel, first)
                .await;
            core.run_ended(id);
            if let Some(lineage) = lineage {
                core.objects.set_lineage(id, lineage);
            }
            tracing::debug!(failed = matches!(outcome, ObjState::Failed(_)), "done");
            if let Some(generator) = generator {
                generator.finish(&outcome);
            }
            if returns > 1 {
                let more = std::mem::take(&mut *cancel.more_returns.locked());
                for (index, state) in
                    (1..returns).zip(super::tasks::more_states(&outcome, more, returns))
                {
                    core.complete_object(task_id.return_object(index), state);
                }
            }
            core.complete_object(id, outcome);
        };
        self.handle
            .spawn(tracing::Instrument::instrument(run, span));
    }
}
