//! Calling an actor: each call takes its turn in its caller's order, is
//! sent (from the caller's thread when it can), sent again when its reply
//! is lost, and moved with the caller's other open calls to a new
//! connection or incarnation.

use shoal_net::sync::MutexExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shoal_proto::state::Placed;
use shoal_proto::worker::ActorCall;
use shoal_proto::{
    ArgSpec, FailureKind, ObjectId, TaskFailure, TaskId, TaskOutcome, WorkerReply, WorkerRequest,
};

use super::{CallSlot, Location, RawActor, Reach, Route, CALL_TIMEOUT};
use crate::args::ArgValue;
use crate::core::Core;
use crate::object_ref::ObjectRef;
use crate::owner::calls::{AfterReply, AtTurn, CallTries, Heard};
use crate::owner::objects::ObjState;

/// An incarnation's location, as the call machine compares them: the same
/// one, not an equal one.
struct At(Arc<Location>);

impl std::fmt::Debug for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "incarnation {} at {}",
            self.0.incarnation, self.0.worker.address
        )
    }
}

impl PartialEq for At {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Location {
    /// Where a call sent here runs, for its events.
    fn placed(&self) -> Option<Placed> {
        self.node_id.map(|node_id| Placed {
            node_id,
            worker_id: self.worker.worker_id,
        })
    }

    /// The request of a call at `slot` here (`args` `None`: a skip, which
    /// only moves the host past the slot), lending `borrowed` (the objects
    /// whose references its argument values carry) from `lender`.
    fn request(
        &self,
        raw: &RawActor,
        order: &Order,
        slot: &CallSlot,
        (args, borrowed, lender): (
            Option<Vec<ArgSpec>>,
            Vec<ObjectId>,
            Option<shoal_proto::Address>,
        ),
    ) -> WorkerRequest {
        WorkerRequest::ActorCall(ActorCall {
            borrowed,
            lender,
            actor_id: raw.actor_id,
            caller: self.caller_id,
            incarnation: self.incarnation,
            seq: slot.seq,
            done_below: slot.done_below,
            task_id: order.task_id,
            method: order.method.to_string(),
            args,
        })
    }
}

/// Calls `method` on the actor; the reference resolves to its result.
pub(crate) fn call<T>(raw: &RawActor, method: &'static str, args: Vec<ArgValue>) -> ObjectRef<T> {
    let core = crate::driver::ensure_core();
    let task_id = TaskId::fresh();
    let id = task_id.return_object(0);
    core.register_pending(id);
    core.events
        .called(task_id, (raw.actor_id, &raw.class), method);
    let refused = |kind, message: String| {
        core.events.failed(task_id, 0, message.clone());
        let f = TaskFailure {
            kind,
            function: format!("{}::{method}", raw.class),
            task_id,
            node_id: None,
            message,
            backtrace: None,
            attempts: 0,
            after_ms: None,
        };
        core.complete_object(id, ObjState::Failed(f));
        ObjectRef::adopt(id, Arc::clone(&core.me_shared))
    };
    if raw.caller.known_dead() {
        return refused(
            FailureKind::ActorDied,
            format!("actor {}: its worker has exited", raw.actor_id),
        );
    }
    let pending = raw.caller.pending.fetch_add(1, Ordering::SeqCst);
    if raw.caller.max_pending.is_some_and(|max| pending >= max) {
        raw.caller.pending.fetch_sub(1, Ordering::SeqCst);
        let max = raw.caller.max_pending.unwrap_or_default();
        return refused(
            FailureKind::PendingCallsExceeded,
            format!("{max} calls are already waiting on this handle (max_pending_calls)"),
        );
    }
    let cancel = {
        let caller = Arc::clone(&raw.caller);
        core.cancellable(
            id,
            // The method's name (the class's would cost a string per call).
            (std::borrow::Cow::Borrowed(method), 1),
            crate::core::cancel::Target::Call(Box::new(move || {
                caller.location().worker.address.clone()
            })),
            crate::worker::context::current_task(),
        )
    };
    if let Some(after) = raw.call_timeout {
        core.time_out(id, &cancel, after);
    }
    drop(cancel);
    let (turn, slot) = raw.caller.outbox().open();
    let order = Order {
        turn,
        task_id,
        method,
        id,
    };
    // A handle with no other call in flight (a call, then its get) sends
    // from this thread when it can.
    let args = if pending == 0 {
        match call_now(&core, raw, order, &slot, args) {
            Ok(()) => return ObjectRef::adopt(id, Arc::clone(&core.me_shared)),
            Err(args) => args,
        }
    } else {
        args
    };
    drop(slot);
    let raw = raw.clone();
    let core2 = Arc::clone(&core);
    core.handle.spawn(async move {
        call_raw(&core2, &raw, order, args).await;
    });
    ObjectRef::adopt(id, Arc::clone(&core.me_shared))
}

/// A call is answered (or failed for good): its reference resolves.
fn finish_call(core: &Arc<Core>, raw: &RawActor, id: ObjectId, state: ObjState) {
    raw.caller.pending.fetch_sub(1, Ordering::SeqCst);
    core.run_ended(id);
    core.complete_object(id, state);
}

/// One call: its place in the caller's order, and what it resolves.
#[derive(Clone, Copy)]
struct Order {
    /// Its turn in the caller's [`Outbox`].
    turn: u64,
    task_id: TaskId,
    method: &'static str,
    /// The reference of its result.
    id: ObjectId,
}

/// Arguments this big at most are sent from the caller's thread (a copy is
/// kept for a resend).
const CALL_NOW_ARGS_MAX: usize = 4 << 10;

/// Sends a call from the caller's thread, when its turn has come, its
/// arguments are small plain values and the actor's worker is reached over
/// a same-host socket already open; the reply completes the reference on
/// the connection's reading task. A call and its `get` then wake no task of
/// the runtime but that reader (the task path costs a hand-off to the
/// runtime: a thread wake-up, tens of microseconds on these machines).
/// Gives the arguments back when the call must take the task path.
fn call_now(
    core: &Arc<Core>,
    raw: &RawActor,
    order: Order,
    slot: &CallSlot,
    args: Vec<ArgValue>,
) -> std::result::Result<(), Vec<ArgValue>> {
    // Their total size, when all are plain values.
    let plain: Option<usize> = args
        .iter()
        .map(|a| match a {
            ArgValue::Bytes(bytes) | ArgValue::Lending { bytes, .. } => Some(bytes.len()),
            _ => None,
        })
        .sum();
    // Arguments carrying references take the task path, which follows
    // what the actor keeps of them.
    let lending = args.iter().any(|a| matches!(a, ArgValue::Lending { .. }));
    if lending
        || plain.is_none_or(|size| size > CALL_NOW_ARGS_MAX)
        || !slot.route.sent.is_turn(slot.pos)
    {
        return Err(args);
    }
    let location = &slot.route.location;
    if location.dead.is_cancelled() || raw.caller.gone.is_cancelled() {
        return Err(args);
    }
    let Some(client) = core.cached_worker(&location.worker.address) else {
        return Err(args);
    };
    if !client.is_same_host() {
        return Err(args);
    }
    let specs: Vec<ArgSpec> = args
        .into_iter()
        .filter_map(|a| match a {
            ArgValue::Bytes(b) => Some(ArgSpec::Inline(b)),
            _ => None,
        })
        .collect();
    let request = location.request(raw, &order, slot, (Some(specs.clone()), Vec::new(), None));
    let sent = Sent {
        route: Arc::clone(&slot.route),
        route_id: slot.route_id,
        seq: slot.seq,
    };
    let answered = {
        let (core, raw) = (Arc::clone(core), raw.clone());
        move |reply: std::result::Result<WorkerReply, shoal_net::RpcError>| match reply {
            // Answered at the slot it was sent to (and not by a node the
            // head declared dead): done, with no task.
            Ok(WorkerReply::TaskDone(done))
                if !core.watches.is_dead(done.node_id)
                    && raw.caller.outbox().close_on(order.turn, sent.route_id) =>
            {
                core.events.answered(&done, 0, failure_of(&done));
                finish_call(&core, &raw, order.id, ObjState::from(done.outcome));
            }
            // Lost (or moved meanwhile): the task path goes on.
            reply => {
                let mut drive = Drive::new(&core, &raw, order, Some(specs));
                drive
                    .tries
                    .first_sent_to(At(Arc::clone(&sent.route.location)));
                core.handle
                    .spawn(drive.run(Step::Reply(sent, Box::new(reply))));
            }
        }
    };
    // Not sent: the callback is dropped, the request gives the arguments
    // back, and the call, still holding its turn, takes the task path.
    // Recorded before the send: the reply may come back first.
    core.events.running(order.task_id, 0, location.placed());
    match client.send_then(&request, CALL_TIMEOUT, answered) {
        Some(Ok(())) => slot.route.sent.pass(slot.pos),
        Some(Err(_)) | None => {
            let WorkerRequest::ActorCall(call) = request else {
                unreachable!("Location::request makes an ActorCall")
            };
            let drive = Drive::new(core, raw, order, call.args);
            core.handle.spawn(drive.run(Step::Send));
        }
    }
    Ok(())
}

/// Why the call failed, if its reply says it did, as its event tells it.
fn failure_of(done: &shoal_proto::TaskReply) -> Option<String> {
    match &done.outcome {
        TaskOutcome::Failed(f) => Some(crate::core::events::failure_text(f)),
        _ => None,
    }
}

/// Resolves the call's arguments, then drives it to its answer.
async fn call_raw(core: &Arc<Core>, raw: &RawActor, order: Order, args: Vec<ArgValue>) {
    let function = format!("{}::{}", raw.class, order.method);
    // The argument references stay alive until the call is answered: a
    // stored argument must not be freed before the actor has read it.
    // The references inside argument values are lent to the call: what
    // the actor keeps of them it borrows (the reply says), the rest is
    // returned when the call is done.
    let (args, failed, _keep_alive, lent) =
        match core.resolve_lending(&function, order.task_id, args).await {
            Ok((args, keep, lent)) => (Some(args), None, keep, lent),
            Err(f) => (None, Some(f), Vec::new(), None),
        };
    let mut drive = Drive::new(core, raw, order, args);
    drive.lent = lent;
    if let Some(f) = failed {
        // Its slot is filled even so (a skip), so the actor moves past it.
        drive.answer(ObjState::Failed(f));
    }
    drive.run(Step::Send).await;
}

/// A request that went out: on which route, as which seq.
struct Sent {
    route: Arc<Route>,
    route_id: u64,
    seq: u64,
}

/// Where a call's drive goes on from.
enum Step {
    /// Send at the call's current slot, in its turn there (a slot whose
    /// turn has passed sends again at once: the host answers a call it ran
    /// with its kept reply).
    Send,
    /// The reply, or its loss, to the request sent as [`Sent`] (boxed: a
    /// reply is large, and a step is moved from turn to turn).
    Reply(
        Sent,
        Box<std::result::Result<WorkerReply, shoal_net::RpcError>>,
    ),
}

/// One call on its way to an answer, after its first attempt if that was
/// made from the caller's thread: the shell of `owner::calls::CallTries`,
/// which decides; this waits for the call's turn, sends, moves the
/// caller's calls, and resolves the reference. Once its result is known,
/// its slot at a later incarnation is still filled with a skip, so later
/// calls are not held.
struct Drive {
    core: Arc<Core>,
    raw: RawActor,
    order: Order,
    args: Option<Vec<ArgSpec>>,
    tries: CallTries<At>,
    reach: Reach,
    /// The references its argument values lend the actor.
    lent: Option<crate::core::Lent>,
}

impl Drive {
    fn new(core: &Arc<Core>, raw: &RawActor, order: Order, args: Option<Vec<ArgSpec>>) -> Self {
        let tries = CallTries::new(raw.caller.max_task_retries, raw.caller.max_restarts);
        Self {
            core: Arc::clone(core),
            raw: raw.clone(),
            order,
            args,
            tries,
            reach: Reach::default(),
            lent: None,
        }
    }

    /// Resolves the call's reference, once.
    fn answer(&mut self, state: ObjState) {
        if self.tries.answer() {
            if let ObjState::Failed(f) = &state {
                let why = crate::core::events::failure_text(f);
                self.core.events.failed(self.order.task_id, 0, why);
            }
            finish_call(&self.core, &self.raw, self.order.id, state);
        }
    }

    fn died(&self, message: &str) -> ObjState {
        ObjState::Failed(TaskFailure {
            kind: FailureKind::ActorDied,
            function: self.raw.class.clone(),
            task_id: self.order.task_id,
            node_id: None,
            message: format!("actor {}: {message}", self.raw.actor_id),
            backtrace: None,
            attempts: self.tries.attempts(),
            after_ms: None,
        })
    }

    /// Until the call has left the outbox.
    async fn run(mut self, mut step: Step) {
        loop {
            let next = match step {
                Step::Send => self.send().await,
                Step::Reply(sent, reply) => self.on_reply(sent, *reply).await,
            };
            match next {
                Some(next) => step = next,
                None => break,
            }
        }
        // Left without an answer only if another path closed it.
        let died = self.died("the call was abandoned");
        self.answer(died);
    }

    /// Fails the call, leaves the outbox and passes its turn on `slot`.
    fn fail(&mut self, slot: &CallSlot, message: &str) -> Option<Step> {
        let died = self.died(message);
        self.answer(died);
        self.raw.caller.outbox().close(self.order.turn);
        slot.route.sent.pass(slot.pos);
        None
    }

    /// Sends the call (or its skip) at its current slot, in its turn.
    async fn send(&mut self) -> Option<Step> {
        let caller = Arc::clone(&self.raw.caller);
        let slot = caller.outbox().slot(self.order.turn)?;
        slot.route.sent.wait(slot.pos).await;
        // Moved while it waited (the old route let its waiters go).
        if caller.outbox().route_id() != slot.route_id {
            return Some(Step::Send);
        }
        // The call holds its turn from here: each path passes it, or goes
        // round again holding it (a new route lets it go).
        let location = Arc::clone(&slot.route.location);
        let here = At(Arc::clone(&location));
        let turn = self.tries.turn(
            &here,
            caller.gone.is_cancelled(),
            location.dead.is_cancelled(),
        );
        let args = match turn {
            AtTurn::Fail(message) => return self.fail(&slot, &message),
            AtTurn::Relocate => {
                return match self.raw.relocate(&self.core, &slot).await {
                    Ok(()) => Some(Step::Send),
                    Err(message) => self.fail(&slot, &message),
                }
            }
            AtTurn::Send { args, died } => {
                if let Some(message) = died {
                    let died = self.died(&message);
                    finish_call(&self.core, &self.raw, self.order.id, died);
                }
                // Once answered, only a skip: the host moves past the slot.
                args.then(|| self.args.clone()).flatten()
            }
        };
        let with_args = args.is_some();
        let borrowed = match (&self.lent, with_args) {
            (Some(lent), true) => lent.0.locked().ids().to_vec(),
            _ => Vec::new(),
        };
        let lender = (!borrowed.is_empty()).then(|| self.core.me.clone());
        let request = location.request(&self.raw, &self.order, &slot, (args, borrowed, lender));
        let client = tokio::select! {
            client = self.core.worker(&location.worker.address) => client,
            _ = location.dead.cancelled() => return Some(Step::Send),
        };
        let client = match client {
            Ok(client) => {
                self.reach = Reach::default();
                client
            }
            Err(e) => {
                self.raw
                    .unreachable(&self.core, &location, e, &mut self.reach)
                    .await;
                return Some(Step::Send);
            }
        };
        match client.send(&request, CALL_TIMEOUT).await {
            Ok(in_flight) => {
                slot.route.sent.pass(slot.pos);
                if let Some(lent) = self.lent.as_ref().filter(|_| with_args) {
                    lent.0.locked().sent();
                }
                if with_args {
                    let placed = location.placed();
                    self.core.events.running(self.order.task_id, 0, placed);
                }
                if self.tries.sent(here, with_args) {
                    tracing::debug!(actor_id = %self.raw.actor_id, method = self.order.method, attempts = self.tries.attempts(), "resent a call lost with the actor's worker");
                }
                let reply = tokio::select! {
                    reply = in_flight.reply() => reply,
                    // The node saw the worker exit: no need to wait for
                    // the connection to time out.
                    _ = location.dead.cancelled() => Err(shoal_net::RpcError::Stream("the actor's worker exited".into())),
                    // The calls moved on (to a new connection or
                    // incarnation): so does this one, from its new slot.
                    _ = slot.route.superseded.cancelled() => return Some(Step::Send),
                };
                let sent = Sent {
                    route: slot.route,
                    route_id: slot.route_id,
                    seq: slot.seq,
                };
                Some(Step::Reply(sent, Box::new(reply)))
            }
            // Not sent: the call keeps its turn and tries again.
            Err(e) if e.is_connection_lost() => {
                caller.reroute(slot.route_id);
                Some(Step::Send)
            }
            Err(e) => self.again(&e.to_string(), Some(&slot)).await,
        }
    }

    /// Pauses before sending again at the same slot (`holding` its turn
    /// there, when the request could not be sent), or fails the call, as
    /// the machine says.
    async fn again(&mut self, why: &str, holding: Option<&CallSlot>) -> Option<Step> {
        let pause = match self.tries.again(why) {
            Ok(pause) => pause,
            Err(message) => {
                return match holding {
                    Some(slot) => self.fail(slot, &message),
                    None => {
                        let died = self.died(&message);
                        self.answer(died);
                        self.raw.caller.outbox().close(self.order.turn);
                        None
                    }
                }
            }
        };
        tracing::debug!(actor_id = %self.raw.actor_id, method = self.order.method, %why, "sending an actor call again");
        let location = self.raw.caller.location();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = location.dead.cancelled() => {}
        }
        Some(Step::Send)
    }

    /// Acts on the reply (or its loss) to the request sent as `sent`.
    async fn on_reply(
        &mut self,
        sent: Sent,
        reply: std::result::Result<WorkerReply, shoal_net::RpcError>,
    ) -> Option<Step> {
        let location = Arc::clone(&sent.route.location);
        if let Ok(WorkerReply::TaskDone(done)) = &reply {
            self.core.events.answered(done, 0, failure_of(done));
        }
        if let Some(lent) = &self.lent {
            let mut borrows = lent.0.locked();
            match &reply {
                Ok(WorkerReply::TaskDone(done)) => borrows.answered(&done.kept, done.worker_id),
                Ok(_) => {}
                // It may have run, and passed them on.
                Err(_) => borrows.lost(),
            }
        }
        match self.tries.heard(judge(reply, &location)) {
            AfterReply::Answer(state) => {
                self.answer(state);
                self.leave(&sent).await
            }
            AfterReply::SendAgain(why) => self.again(&why, None).await,
            AfterReply::Died(why) => {
                let died = self.died(&why);
                self.answer(died);
                self.leave(&sent).await
            }
            AfterReply::Reconnect(why) => {
                tracing::debug!(actor_id = %self.raw.actor_id, %why, "the connection to the actor's worker was lost; sending its open calls again");
                self.raw.caller.reroute(sent.route_id);
                Some(Step::Send)
            }
            AfterReply::MarkDead(why) => {
                tracing::debug!(actor_id = %self.raw.actor_id, %why, "the actor's incarnation is gone");
                location.dead.cancel();
                Some(Step::Send)
            }
        }
    }

    /// The host of `sent` answered: the call leaves the outbox, unless it
    /// has moved since to a new incarnation, where its slot gets a skip.
    async fn leave(&mut self, sent: &Sent) -> Option<Step> {
        let turn = self.order.turn;
        let slot = {
            let mut outbox = self.raw.caller.outbox();
            if outbox.close_on(turn, sent.route_id) {
                return None;
            }
            let slot = outbox.slot(turn)?;
            if !Arc::ptr_eq(&slot.route.location, &sent.route.location) || slot.seq != sent.seq {
                return Some(Step::Send);
            }
            // Moved to a new connection to the same incarnation, same seq:
            // that host has answered; only its turn there is owed.
            outbox.close(turn);
            slot
        };
        slot.route.sent.wait(slot.pos).await;
        slot.route.sent.pass(slot.pos);
        None
    }
}

/// What the actor's worker answered to a call (or how it was lost), as
/// the call machine hears it.
fn judge(
    reply: std::result::Result<WorkerReply, shoal_net::RpcError>,
    location: &Location,
) -> Heard {
    let refused = Heard::Refused;
    match reply {
        // A late answer from a node the head declared dead: the actor lives
        // on elsewhere (or is dead), and this instance is fenced.
        Ok(WorkerReply::TaskDone(reply))
            if crate::core::try_get().is_some_and(|core| core.watches.is_dead(reply.node_id)) =>
        {
            location.dead.cancel();
            Heard::Dead(format!(
                "its node {} was declared dead; its answer is not used",
                reply.node_id
            ))
        }
        Ok(WorkerReply::TaskDone(reply)) => Heard::Done(ObjState::from(reply.outcome)),
        Ok(other) => refused(format!("its worker answered {other:?}")),
        Err(e) if location.dead.is_cancelled() => Heard::Dead(e.to_string()),
        // The worker's word that it does not host this incarnation.
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
        {
            Heard::Dead(e.message)
        }
        Err(shoal_net::RpcError::Service(e))
            if e.kind == shoal_proto::ServiceErrorKind::Unavailable =>
        {
            Heard::Lost(e.to_string())
        }
        Err(shoal_net::RpcError::Service(e)) => {
            refused(format!("its worker refused the call: {e}"))
        }
        Err(e @ (shoal_net::RpcError::Connection(_) | shoal_net::RpcError::Stream(_))) => {
            Heard::ConnectionLost(e.to_string())
        }
        // The request reached the worker (a discarded reply), or may have:
        // the host answers a resend with the reply of the call's one run.
        Err(e @ (shoal_net::RpcError::Injected(_) | shoal_net::RpcError::Timeout(_))) => {
            Heard::Lost(e.to_string())
        }
        Err(e) => refused(format!("the call failed: {e}")),
    }
}
