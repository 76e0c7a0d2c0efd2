//! Worker leases per scheduling class (a resource shape and where it may
//! run), as a state machine with no I/O: events in, [`Command`]s out.
//!
//! A task needs a place on a worker holding its resources. Per class the
//! machine keeps the leased workers (with the tasks in flight to each), the
//! tasks waiting for a place, and the lease requests out. When tasks wait
//! and too few requests are out, it asks for more ([`Command::Ask`]); the
//! shell asks the head (which long-polls while the cluster is full), turns a
//! granted lease into a worker through the lease's node, and reports back.
//!
//! A task takes an idle worker (so tasks spread over the CPUs), with one
//! exception: once the cluster is full (the head says so with the grant, or
//! by holding a request) and no other worker is on its way, a task may
//! queue on a busy worker whose tasks in flight are all short (their
//! function's last runs were), up to [`PIPELINE_DEPTH`], so the next task
//! is there when one ends. Nothing queues behind a task that may run long:
//! it would wait while another worker may be free (head-of-line blocking;
//! Ray dropped pipelining for this). A worker idle for [`IDLE_RETURN`] is
//! handed back; at once when the cluster is full, as nested tasks make it:
//! a CPU held idle there is one another owner's task waits for.
//!
//! `W` is the shell's handle of a leased worker and `T` its handle of a
//! waiting task (a channel to wake it, in the shell; a number in tests),
//! which says whether the task runs short ([`Waiting`]) when it takes its
//! place: a task that waited while its function's first runs ended is
//! judged by those runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::placement::Placement;
use shoal_proto::{LeaseId, ResourceSet};

/// Lease requests out per class, at most.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 8;
/// Tasks pushed to one leased worker at once: it runs them one after
/// another, and the next is already there when one ends (no round trip
/// between tasks).
pub const PIPELINE_DEPTH: usize = 16;
/// A lease idle this long is returned: long enough to keep it across a
/// submit-get-submit loop, short enough that other owners (nested tasks)
/// soon get the CPU back.
pub const IDLE_RETURN: Duration = Duration::from_millis(10);
/// How long the head may hold a lease request.
pub const LEASE_WAIT: Duration = Duration::from_secs(2);
/// The first pause before asking again after a failed request; it doubles
/// up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A task waiting for a place.
pub trait Waiting {
    /// Whether tasks may queue behind this one (its function's last runs
    /// were short), asked when it takes its place.
    fn short(&self) -> bool;
}

/// A task handle with its shortness decided already.
impl<X> Waiting for (X, bool) {
    fn short(&self) -> bool {
        self.1
    }
}

/// A scheduling class: its shape, as text.
pub type ClassKey = Arc<str>;

/// What a lease is asked for: resources, and where they may be.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shape {
    pub resources: ResourceSet,
    pub placement: Placement,
    /// The variables its workers are started with.
    pub env: shoal_proto::EnvVars,
}

impl From<ResourceSet> for Shape {
    fn from(resources: ResourceSet) -> Self {
        Self {
            resources,
            placement: Placement::default(),
            env: Default::default(),
        }
    }
}

/// The class of `shape`.
pub fn class_key(shape: &Shape) -> ClassKey {
    let mut key: String = shape
        .resources
        .iter()
        .map(|(k, v)| format!("{k}={v};"))
        .collect();
    if !shape.placement.is_default() {
        key.push_str(&format!("{:?}", shape.placement));
    }
    if !shape.env.is_empty() {
        key.push_str(&format!("{:?}", shape.env));
    }
    key.into()
}

/// A task's place on a leased worker.
#[derive(Clone, Debug)]
pub struct Place<W> {
    pub worker: W,
    pub lease_id: LeaseId,
    pub class: ClassKey,
    /// Tasks may queue behind this one.
    short: bool,
}

/// One lease request being made: handed out with [`Command::Ask`] and
/// handed back with its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    pub class: ClassKey,
    pub shape: Arc<Shape>,
    /// The head keeps one grant per id: a retry after a lost answer gets
    /// the grant the first try got, so no lease leaks.
    pub request_id: u64,
    /// Wait this long before asking.
    pub after: Duration,
    /// The pause after the next failure.
    backoff: Duration,
    /// The last try got no answer (the head may hold a grant under this id).
    unanswered: bool,
}

/// The head's answer to one try of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A lease: the shell goes on to get its worker, then reports
    /// [`Leases::joined`] or [`Leases::grant_failed`].
    Granted,
    /// The head held the request and the cluster stayed full; `infeasible`
    /// when no node can ever fit the class.
    Pending { infeasible: bool },
    /// No answer arrived (timeout, lost connection): ask again under the
    /// same id.
    Lost,
    /// Anything else.
    Failed,
    /// The head can never grant it as asked: the class's tasks fail with
    /// this reason.
    Refused(String),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Command<W, T> {
    /// Give the waiting task `T` this place; if it is gone, report
    /// [`Leases::unplaced`].
    Give(T, Place<W>),
    /// Ask the head for a lease (after `ask.after`), then report
    /// [`Leases::answered`].
    Ask(Ask),
    /// Warn (once per class) that no node can ever fit this shape.
    WarnInfeasible(Arc<Shape>),
    /// Tell the waiting task `T` that it can never be placed, and why.
    Refuse(T, String),
    /// Give the lease back: its node releases the worker (stops it, with
    /// `kill`) and the head gets the resources back.
    Return { worker: W, kill: bool },
    /// After [`IDLE_RETURN`], report [`Leases::idle_expired`] with these.
    ArmIdle {
        class: ClassKey,
        lease_id: LeaseId,
        epoch: u64,
    },
    /// The request's last try got no answer and no more are wanted: ask
    /// once more under its id without waiting, and return what it grants.
    Abandon(Ask),
}

/// A leased worker as the machine holds it.
struct Held<W> {
    worker: W,
    lease_id: LeaseId,
    /// Tasks pushed to it and not answered.
    in_flight: usize,
    /// Those of them not known to run short: nothing queues behind such a
    /// task.
    unsure: usize,
    /// Set while it has nothing in flight: the idle clock started then.
    idle: Option<u64>,
}

struct Class<W, T> {
    shape: Arc<Shape>,
    workers: Vec<Held<W>>,
    waiters: VecDeque<T>,
    /// Requests out (each a chain of tries).
    requesting: usize,
    infeasible_reported: bool,
    /// The cluster had no room for another worker of the class when last
    /// asked: short tasks queue on the workers held instead of waiting.
    saturated: bool,
    /// Leases granted whose workers are still being started: no task
    /// queues behind another until they have arrived.
    granting: usize,
}

impl<W: Clone, T: Waiting> Class<W, T> {
    fn new(shape: Arc<Shape>) -> Self {
        Self {
            shape,
            workers: Vec::new(),
            waiters: VecDeque::new(),
            requesting: 0,
            infeasible_reported: false,
            saturated: false,
            granting: 0,
        }
    }

    /// Tasks that would start sooner with another lease: those waiting for
    /// a place and those queued behind another task. (A waiter whose task
    /// was dropped counts until a place is offered to it: looking at each
    /// would make a million queued tasks quadratic.)
    fn backlog(&self) -> usize {
        let queued: usize = self
            .workers
            .iter()
            .map(|h| h.in_flight.saturating_sub(1))
            .sum();
        self.waiters.len() + queued
    }

    /// A place for the next task: an idle worker; or, when no other worker
    /// can be had (the cluster is full and none is on its way), the least
    /// loaded worker whose tasks in flight are all short, up to
    /// [`PIPELINE_DEPTH`].
    fn find_place(&self) -> Option<usize> {
        if let Some(idle) = self.workers.iter().position(|h| h.in_flight == 0) {
            return Some(idle);
        }
        if !self.saturated || self.granting > 0 {
            return None;
        }
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, h)| h.unsure == 0 && h.in_flight < PIPELINE_DEPTH)
            .min_by_key(|(_, h)| h.in_flight)
            .map(|(at, _)| at)
    }

    fn take(&mut self, at: usize, class: &ClassKey, short: bool) -> Place<W> {
        let held = &mut self.workers[at];
        held.in_flight += 1;
        held.unsure += usize::from(!short);
        held.idle = None;
        Place {
            worker: held.worker.clone(),
            lease_id: held.lease_id,
            class: Arc::clone(class),
            short,
        }
    }

    /// Takes a worker out (to give its lease back): the cluster has room
    /// again, as far as this class knows.
    fn remove(&mut self, at: usize) -> Held<W> {
        self.saturated = false;
        self.workers.swap_remove(at)
    }

    fn position(&self, lease_id: LeaseId) -> Option<usize> {
        self.workers.iter().position(|h| h.lease_id == lease_id)
    }

    /// Undoes [`take`](Self::take); false if the worker is no longer held.
    fn put_back<X>(&mut self, place: &Place<X>) -> bool {
        let Some(at) = self.position(place.lease_id) else {
            return false;
        };
        let held = &mut self.workers[at];
        held.in_flight = held.in_flight.saturating_sub(1);
        held.unsure = held.unsure.saturating_sub(usize::from(!place.short));
        true
    }

    /// Hands places to waiting tasks, in order.
    fn serve_waiters(&mut self, class: &ClassKey, out: &mut Vec<Command<W, T>>) {
        while !self.waiters.is_empty() {
            let Some(at) = self.find_place() else {
                return;
            };
            if let Some(waiter) = self.waiters.pop_front() {
                let place = self.take(at, class, waiter.short());
                out.push(Command::Give(waiter, place));
            }
        }
    }
}

/// The lease state machine of one owner process.
pub struct Leases<W, T> {
    classes: BTreeMap<ClassKey, Class<W, T>>,
    /// The job is ending: no more requests, idle leases go back at once.
    stopping: bool,
    /// Idle leases go back at once (see [`Leases::keep_no_idle`]).
    no_idle: bool,
    /// Idle clocks started, for telling a stale one from the current.
    epoch: u64,
    /// The last request id handed out (ids count up from 1; the head keys
    /// them by owner).
    request_id: u64,
}

impl<W, T> Default for Leases<W, T> {
    fn default() -> Self {
        Self {
            classes: BTreeMap::new(),
            stopping: false,
            no_idle: false,
            epoch: 0,
            request_id: 0,
        }
    }
}

impl<W, T> Leases<W, T> {
    /// Keeps no idle lease: each goes back as soon as its worker has
    /// nothing in flight. For an owner that is itself a task (nested
    /// tasks): its children's CPUs are what its siblings and cousins wait
    /// for, and a task rarely loops submitting one task at a time (Ray's
    /// owners give an idle lease back at once too).
    pub fn keep_no_idle(&mut self) {
        self.no_idle = true;
    }
}

impl<W: Clone, T: Waiting> Leases<W, T> {
    /// A new lease request's id (never 0, which means none).
    pub fn fresh_request_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    /// A place for one task of class `class` (of `shape`): at once
    /// (`short` if tasks may queue behind it), or later through
    /// [`Command::Give`] to the waiter `waiter()` makes (asked then).
    pub fn acquire(
        &mut self,
        class: &ClassKey,
        shape: &Shape,
        short: bool,
        waiter: impl FnOnce() -> T,
        out: &mut Vec<Command<W, T>>,
    ) -> Option<Place<W>> {
        let entry = self
            .classes
            .entry(Arc::clone(class))
            .or_insert_with(|| Class::new(Arc::new(shape.clone())));
        let placed = match entry.find_place() {
            Some(at) => Some(entry.take(at, class, short)),
            None => {
                entry.waiters.push_back(waiter());
                None
            }
        };
        self.ask_for_more(class, out);
        placed
    }

    /// Starts another request if tasks wait and too few are out.
    fn ask_for_more(&mut self, class: &ClassKey, out: &mut Vec<Command<W, T>>) {
        if self.stopping {
            return;
        }
        let Some(entry) = self.classes.get_mut(class) else {
            return;
        };
        if entry.requesting < entry.backlog().min(REQUESTS_IN_FLIGHT_MAX) {
            entry.requesting += 1;
            let shape = Arc::clone(&entry.shape);
            let request_id = self.fresh_request_id();
            out.push(Command::Ask(Ask {
                class: Arc::clone(class),
                shape,
                request_id,
                after: Duration::ZERO,
                backoff: BACKOFF_FIRST,
                unanswered: false,
            }));
        }
    }

    /// The answer to one try of `ask`.
    pub fn answered(&mut self, mut ask: Ask, answer: Answer, out: &mut Vec<Command<W, T>>) {
        let Some(class) = self.classes.get_mut(&ask.class) else {
            return;
        };
        ask.unanswered = answer == Answer::Lost;
        match answer {
            Answer::Granted => {
                // The shell gets the worker; the request goes on from
                // `joined` or `grant_failed`.
                class.granting += 1;
                return;
            }
            Answer::Pending { infeasible } => {
                class.saturated = true;
                let key = Arc::clone(&ask.class);
                class.serve_waiters(&key, out);
                ask.after = Duration::ZERO;
                if infeasible {
                    if !std::mem::replace(&mut class.infeasible_reported, true) {
                        out.push(Command::WarnInfeasible(Arc::clone(&class.shape)));
                    }
                    ask.after = LEASE_WAIT;
                }
            }
            Answer::Lost | Answer::Failed => {
                ask.after = ask.backoff;
                ask.backoff = (ask.backoff * 2).min(BACKOFF_MAX);
            }
            Answer::Refused(why) => {
                // Every task waiting fails; the request ends (a later task
                // of the class asks again, and is refused in turn).
                class.requesting = class.requesting.saturating_sub(1);
                for waiter in class.waiters.drain(..) {
                    out.push(Command::Refuse(waiter, why.clone()));
                }
                return;
            }
        }
        self.again(ask, out);
    }

    /// The worker of a granted lease has joined: `room_for_another` is
    /// whether the cluster had room for one more of the class.
    pub fn joined(
        &mut self,
        mut ask: Ask,
        (worker, lease_id): (W, LeaseId),
        room_for_another: bool,
        out: &mut Vec<Command<W, T>>,
    ) {
        let key = Arc::clone(&ask.class);
        let Some(class) = self.classes.get_mut(&key) else {
            out.push(Command::Return {
                worker,
                kill: false,
            });
            return;
        };
        class.saturated = !room_for_another;
        class.granting = class.granting.saturating_sub(1);
        class.workers.push(Held {
            worker,
            lease_id,
            in_flight: 0,
            unsure: 0,
            idle: None,
        });
        class.serve_waiters(&key, out);
        self.idle_check(&key, lease_id, out);
        // This try was answered (granted): the next lease is a new request.
        ask.unanswered = false;
        ask.after = Duration::ZERO;
        ask.backoff = BACKOFF_FIRST;
        self.again(ask, out);
    }

    /// A granted lease gave no worker (the shell has returned it).
    pub fn grant_failed(&mut self, mut ask: Ask, out: &mut Vec<Command<W, T>>) {
        let key = Arc::clone(&ask.class);
        if let Some(class) = self.classes.get_mut(&key) {
            class.granting = class.granting.saturating_sub(1);
            // Tasks held back for the worker that is not coming.
            class.serve_waiters(&key, out);
        }
        ask.unanswered = false;
        ask.after = ask.backoff;
        ask.backoff = (ask.backoff * 2).min(BACKOFF_MAX);
        self.again(ask, out);
    }

    /// After a try: ask again while tasks wait, else end the request.
    fn again(&mut self, mut ask: Ask, out: &mut Vec<Command<W, T>>) {
        if !self.still_wanted(&ask, out) {
            return;
        }
        if !ask.unanswered {
            ask.request_id = self.fresh_request_id();
        }
        out.push(Command::Ask(ask));
    }

    /// Whether a request due now is still wanted (no more requests are out,
    /// this one among them, than tasks wait: a lease still becoming a
    /// worker counts); if not it ends here. Asking past that, leases of a
    /// cold cluster whose workers start slowly went to whichever workers
    /// joined first, and a spread class's tasks could miss a node.
    pub fn still_wanted(&mut self, ask: &Ask, out: &mut Vec<Command<W, T>>) -> bool {
        let stopping = self.stopping;
        let Some(class) = self.classes.get_mut(&ask.class) else {
            return false;
        };
        let backlog = class.backlog();
        if backlog > 0 && class.requesting <= backlog && !stopping {
            return true;
        }
        class.requesting = class.requesting.saturating_sub(1);
        if ask.unanswered {
            out.push(Command::Abandon(ask.clone()));
        }
        false
    }

    /// A task's place is free again (its task was answered).
    pub fn release(&mut self, place: &Place<W>, out: &mut Vec<Command<W, T>>) {
        let Some(class) = self.classes.get_mut(&place.class) else {
            return;
        };
        if !class.put_back(place) {
            return;
        }
        class.serve_waiters(&place.class, out);
        self.idle_check(&place.class, place.lease_id, out);
    }

    /// A place given to a task that was gone: it is free again.
    pub fn unplaced(&mut self, place: &Place<W>, out: &mut Vec<Command<W, T>>) {
        self.release(place, out);
    }

    /// Starts the idle clock of a worker with nothing in flight (or, when
    /// stopping or when the cluster is full, returns its lease at once).
    fn idle_check(&mut self, key: &ClassKey, lease_id: LeaseId, out: &mut Vec<Command<W, T>>) {
        let Some(class) = self.classes.get_mut(key) else {
            return;
        };
        let Some(at) = class
            .position(lease_id)
            .filter(|&at| class.workers[at].in_flight == 0)
        else {
            return;
        };
        // A full cluster has other work waiting for the CPU (nested tasks,
        // other owners): it goes back at once. Only while there is room is
        // it kept, for this owner's next task (a submit-get-submit loop).
        if self.stopping || self.no_idle || class.saturated {
            let held = class.remove(at);
            out.push(Command::Return {
                worker: held.worker,
                kill: false,
            });
            return;
        }
        self.epoch += 1;
        class.workers[at].idle = Some(self.epoch);
        out.push(Command::ArmIdle {
            class: Arc::clone(key),
            lease_id,
            epoch: self.epoch,
        });
    }

    /// An idle clock ran out: the lease goes back if its worker has stayed
    /// idle since.
    pub fn idle_expired(
        &mut self,
        key: &ClassKey,
        lease_id: LeaseId,
        epoch: u64,
        out: &mut Vec<Command<W, T>>,
    ) {
        let Some(class) = self.classes.get_mut(key) else {
            return;
        };
        let Some(at) = class.position(lease_id).filter(|&at| {
            let held = &class.workers[at];
            held.in_flight == 0 && held.idle == Some(epoch)
        }) else {
            return;
        };
        let held = class.remove(at);
        out.push(Command::Return {
            worker: held.worker,
            kill: false,
        });
    }

    /// A worker failed (its task's reply was lost with it): it is stopped
    /// and its lease returned, once however many of its tasks report it.
    /// Its other tasks in flight learn of it themselves.
    pub fn discard(&mut self, key: &ClassKey, lease_id: LeaseId, out: &mut Vec<Command<W, T>>) {
        let Some(class) = self.classes.get_mut(key) else {
            return;
        };
        if let Some(at) = class.position(lease_id) {
            let held = class.remove(at);
            out.push(Command::Return {
                worker: held.worker,
                kill: true,
            });
            // Tasks waiting for a place may now get one from a new lease.
            self.ask_for_more(key, out);
        }
    }

    /// The job is ending: no more requests; idle leases go back now, busy
    /// ones when their tasks are answered.
    pub fn stop(&mut self, out: &mut Vec<Command<W, T>>) {
        self.stopping = true;
        for class in self.classes.values_mut() {
            let (idle, busy): (Vec<_>, Vec<_>) = std::mem::take(&mut class.workers)
                .into_iter()
                .partition(|h| h.in_flight == 0);
            class.workers = busy;
            for held in idle {
                out.push(Command::Return {
                    worker: held.worker,
                    kill: false,
                });
            }
        }
    }

    /// Takes out the waiting tasks `pick` chooses, from every class, in
    /// their order (cancelled ones; those to fail while the head is away).
    /// One pass over the waiters of each class that holds one.
    pub fn take_waiters(&mut self, mut pick: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        for class in self.classes.values_mut() {
            if !class.waiters.iter().any(&mut pick) {
                continue;
            }
            let waiters = std::mem::take(&mut class.waiters);
            class.waiters = VecDeque::with_capacity(waiters.len());
            for waiter in waiters {
                if pick(&waiter) {
                    taken.push(waiter);
                } else {
                    class.waiters.push_back(waiter);
                }
            }
        }
        taken
    }

    /// Workers held and tasks waiting in `class` (for tests and status).
    #[cfg(test)]
    fn counts(&self, class: &ClassKey) -> (usize, usize, usize) {
        self.classes.get(class).map_or((0, 0, 0), |c| {
            (c.workers.len(), c.waiters.len(), c.requesting)
        })
    }
}

#[cfg(test)]
mod tests;
