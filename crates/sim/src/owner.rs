//! Owners and workers. An owner (the driver, or a worker running a task
//! that submits tasks of its own) decides with the SDK's own state
//! machines: `owner::leases` places its tasks on leased workers and asks
//! for leases, `owner::tasks` decides each try's fate. This file only
//! carries their commands out over the simulated network, as the SDK's
//! shell does over QUIC.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use shoal::owner::leases::{class_key, Answer, Ask, ClassKey, Command, Leases, Place};
use shoal::owner::objects::ObjState;
use shoal::owner::tasks::{PlaceDone, TaskRun, Then, Tried};
use shoal_proto::{FailureKind, TaskFailure, TaskId, TaskOutcome};

use crate::cluster::{cpus, lease_id, node_id};
use crate::msg::{node_pid, Msg, NodeNo, Pid, Tag, Timer, DRIVER, HEAD};
use crate::sim::Sim;
use crate::world::{Time, MS};

/// A leased worker, as an owner holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    pub worker: Pid,
    pub lease: u64,
    pub node: usize,
    pub node_id: NodeNo,
}

/// A task its owner runs.
#[derive(Debug)]
pub struct OwnedTask {
    run: TaskRun,
    arg: i64,
    fanout: u32,
}

pub struct Owner {
    pub pid: Pid,
    /// The node hosting this owner (a worker's), as the head knows it.
    node: Option<NodeNo>,
    pub leases: Leases<Held, (u64, bool)>,
    pub tasks: BTreeMap<u64, OwnedTask>,
    asks_due: BTreeMap<u64, Ask>,
    next_ask: u64,
    asks: BTreeMap<Tag, Ask>,
    /// Abandon requests out, with the request id they give up.
    abandons: BTreeMap<Tag, u64>,
    grants: BTreeMap<Tag, (Ask, u64, usize, NodeNo, bool)>,
    pushes: BTreeMap<Tag, (u64, Place<Held>)>,
    pub dead: BTreeSet<NodeNo>,
    class: ClassKey,
}

impl Owner {
    pub fn new(pid: Pid, node: Option<NodeNo>) -> Self {
        Owner {
            pid,
            node,
            leases: Leases::default(),
            tasks: BTreeMap::new(),
            asks_due: BTreeMap::new(),
            next_ask: 0,
            asks: BTreeMap::new(),
            abandons: BTreeMap::new(),
            grants: BTreeMap::new(),
            pushes: BTreeMap::new(),
            dead: BTreeSet::new(),
            class: class_key(&cpus(1.0).into()),
        }
    }
}

/// A task a worker runs.
#[derive(Clone, Debug)]
struct Job {
    tag: Tag,
    from: Pid,
    task: u64,
    arg: i64,
    fanout: u32,
    /// The driver's object its argument holds a reference to.
    lent: Option<u64>,
    /// Children not yet answered, and the sum of those that were.
    waiting: u32,
    sum: Result<i64, String>,
}

/// The actor an actor worker hosts: one caller (the driver), whose calls
/// run once each, in the order of their numbers.
#[derive(Debug, Default)]
pub struct Host {
    pub incarnation: u32,
    pub next: u64,
    pub kept: BTreeMap<u64, u64>,
    pub held: BTreeMap<u64, (Tag, Pid)>,
    pub counter: u64,
}

pub struct Worker {
    pub pid: Pid,
    pub node: usize,
    pub node_id: NodeNo,
    pub lease: u64,
    pub owner: Pid,
    pub alive: bool,
    queue: VecDeque<Job>,
    running: Option<Job>,
    pub actor: Option<Host>,
    /// Blocked transitions to tell the head, one at a time in order (the
    /// SDK awaits each before the next), and whether one is out.
    blocked_queue: VecDeque<bool>,
    blocked_out: bool,
}

impl Worker {
    pub fn new(pid: Pid, (node, node_id): (usize, NodeNo), lease: u64, owner: Pid) -> Self {
        Worker {
            pid,
            node,
            node_id,
            lease,
            owner,
            alive: true,
            queue: VecDeque::new(),
            running: None,
            actor: None,
            blocked_queue: VecDeque::new(),
            blocked_out: false,
        }
    }

    /// Whether a task queued or running here holds object `n`.
    pub fn has_job_with(&self, n: u64) -> bool {
        self.running
            .iter()
            .chain(self.queue.iter())
            .any(|job| job.lent == Some(n))
    }

    pub fn host_actor(&mut self, incarnation: u32) {
        self.actor = Some(Host {
            incarnation,
            ..Host::default()
        });
    }
}

/// The value a leaf task computes, and a parent's: the sum of its children.
pub fn leaf(arg: i64) -> i64 {
    2 * arg + 1
}

pub fn expected(arg: i64, fanout: u32) -> i64 {
    if fanout == 0 {
        return leaf(arg);
    }
    (0..i64::from(fanout)).map(|c| leaf(arg * 10 + c)).sum()
}

fn failed(task: u64, message: String) -> TaskFailure {
    TaskFailure {
        kind: FailureKind::Error,
        function: "sim::task".into(),
        task_id: task_id(task),
        node_id: None,
        message,
        backtrace: None,
        attempts: 1,
        after_ms: None,
    }
}

fn task_id(task: u64) -> TaskId {
    TaskId::from_uuid(uuid::Uuid::from_u128(u128::from(task) << 32))
}

type Out = Vec<Command<Held, (u64, bool)>>;

impl Sim {
    fn owner(&mut self, pid: Pid) -> &mut Owner {
        self.owners
            .entry(pid)
            .or_insert_with(|| Owner::new(pid, None))
    }

    /// `owner` submits task `task` of `arg` (a parent of `fanout` children
    /// when not 0).
    pub fn owner_submit(&mut self, owner: Pid, task: u64, arg: i64, fanout: u32) {
        let max_retries = self.config.max_retries;
        let run = TaskRun::new((task_id(task), "sim::task"), (max_retries, false), 0, false);
        self.owner(owner)
            .tasks
            .insert(task, OwnedTask { run, arg, fanout });
        self.owner_acquire(owner, task);
    }

    fn owner_acquire(&mut self, pid: Pid, task: u64) {
        let Some(fanout) = self
            .owners
            .get(&pid)
            .and_then(|o| o.tasks.get(&task))
            .map(|t| t.fanout)
        else {
            return;
        };
        let mut out = Vec::new();
        let o = self.owner(pid);
        let class = Arc::clone(&o.class);
        // Leaf tasks run short: tasks may queue behind them.
        let placed = o.leases.acquire(
            &class,
            &cpus(1.0).into(),
            fanout == 0,
            || (task, fanout == 0),
            &mut out,
        );
        if let Some(place) = placed {
            self.owner_push(pid, task, place);
        }
        self.owner_carry_out(pid, out);
    }

    fn owner_push(&mut self, pid: Pid, task: u64, place: Place<Held>) {
        let Some(t) = self.owners.get(&pid).and_then(|o| o.tasks.get(&task)) else {
            let mut out = Vec::new();
            self.owner(pid).leases.unplaced(&place, &mut out);
            self.owner_carry_out(pid, out);
            return;
        };
        let (attempt, arg, fanout) = (t.run.attempt(), t.arg, t.fanout);
        let tag = self.tag();
        let worker = place.worker.worker;
        self.owner(pid).pushes.insert(tag, (task, place));
        let lent = self.borrow_sent(pid, task);
        self.send(
            pid,
            worker,
            Msg::Push {
                tag,
                task,
                attempt,
                arg,
                fanout,
                lent,
            },
        );
    }

    pub fn owner_carry_out(&mut self, pid: Pid, out: Out) {
        for command in out {
            match command {
                Command::Give((task, _), place) => self.owner_push(pid, task, place),
                Command::Ask(ask) => {
                    let o = self.owner(pid);
                    o.next_ask += 1;
                    let key = o.next_ask;
                    let after = ask.after.as_micros() as Time;
                    o.asks_due.insert(key, ask);
                    self.timer(pid, after, Timer::Ask { key });
                }
                Command::WarnInfeasible(_) => self.note(format!("{pid:?} infeasible")),
                // The simulation asks for no node affinity: never refused.
                Command::Refuse(..) => self.note(format!("{pid:?} refused")),
                Command::Return { worker, kill } => self.return_lease(pid, &worker, kill),
                Command::ArmIdle {
                    lease_id, epoch, ..
                } => {
                    let lease = lease_id.as_uuid().as_u128() as u64;
                    self.timer(pid, 10 * MS, Timer::Idle { lease, epoch });
                }
                Command::Abandon(ask) => self.owner_abandon(pid, ask.request_id),
            }
        }
    }

    /// Gives a lease back: its node releases (or stops) the worker and the
    /// head gets the resources back, each asked until answered (4 tries).
    fn return_lease(&mut self, pid: Pid, worker: &Held, kill: bool) {
        let lease = worker.lease;
        self.control(pid, node_pid(worker.node), |tag| Msg::ReleaseWorker {
            tag,
            lease,
            kill,
        });
        self.control(pid, HEAD, |tag| Msg::ReturnLease { tag, lease });
    }

    /// Asks under `request_id` without waiting, until the head answers,
    /// and returns what it grants.
    pub fn owner_abandon(&mut self, pid: Pid, request_id: u64) {
        if !self.is_alive(pid) {
            return;
        }
        let tag = self.request_lease(pid, request_id, false);
        self.owner(pid).abandons.insert(tag, request_id);
    }

    /// Sends a lease request of `pid`'s under `request_id`; its tag.
    fn request_lease(&mut self, pid: Pid, request_id: u64, wait: bool) -> Tag {
        let tag = self.tag();
        let owner_node = self.owners.get(&pid).and_then(|o| o.node);
        self.send(
            pid,
            HEAD,
            Msg::RequestLease {
                tag,
                request_id,
                owner_node,
                wait,
            },
        );
        tag
    }

    pub fn owner_ask_due(&mut self, pid: Pid, key: u64) {
        if !self.is_alive(pid) {
            return;
        }
        let Some(ask) = self.owner(pid).asks_due.remove(&key) else {
            return;
        };
        let mut out = Vec::new();
        let wanted = self.owner(pid).leases.still_wanted(&ask, &mut out);
        self.owner_carry_out(pid, out);
        if !wanted {
            return;
        }
        let tag = self.request_lease(pid, ask.request_id, true);
        self.owner(pid).asks.insert(tag, ask);
    }

    pub fn owner_idle(&mut self, pid: Pid, lease: u64, epoch: u64) {
        if !self.is_alive(pid) {
            return;
        }
        let mut out = Vec::new();
        let o = self.owner(pid);
        let class = Arc::clone(&o.class);
        o.leases
            .idle_expired(&class, lease_id(lease), epoch, &mut out);
        self.owner_carry_out(pid, out);
    }

    fn owner_answered(&mut self, pid: Pid, tag: Tag, answer: Answer) {
        let Some(ask) = self.owner(pid).asks.remove(&tag) else {
            return;
        };
        let mut out = Vec::new();
        self.owner(pid).leases.answered(ask, answer, &mut out);
        self.owner_carry_out(pid, out);
    }

    pub fn owner_receive(&mut self, pid: Pid, from: Pid, msg: Msg) {
        match msg {
            Msg::LeaseGranted {
                tag,
                lease,
                node,
                node_id,
                room,
            } => {
                if self.owner(pid).abandons.remove(&tag).is_some() {
                    self.control(pid, HEAD, |tag| Msg::ReturnLease { tag, lease });
                    return;
                }
                let Some(ask) = self.owner(pid).asks.get(&tag).cloned() else {
                    return;
                };
                self.owner_answered(pid, tag, Answer::Granted);
                let grant = self.tag();
                self.owner(pid)
                    .grants
                    .insert(grant, (ask, lease, node, node_id, room));
                self.send(
                    pid,
                    node_pid(node),
                    Msg::GrantWorker {
                        tag: grant,
                        lease,
                        owner: pid,
                    },
                );
            }
            Msg::LeasePending { tag } => {
                if self.owner(pid).abandons.remove(&tag).is_some() {
                    return;
                }
                self.owner_answered(pid, tag, Answer::Pending { infeasible: false })
            }
            Msg::WorkerGranted { tag, worker } => {
                let Some((ask, lease, node, node_id, room)) = self.owner(pid).grants.remove(&tag)
                else {
                    return;
                };
                let held = Held {
                    worker,
                    lease,
                    node,
                    node_id,
                };
                if self.owner(pid).dead.contains(&node_id) {
                    // Granted on a node declared dead since: no use.
                    self.control(pid, HEAD, |tag| Msg::ReturnLease { tag, lease });
                    let mut out = Vec::new();
                    self.owner(pid).leases.grant_failed(ask, &mut out);
                    self.owner_carry_out(pid, out);
                    return;
                }
                let mut out = Vec::new();
                self.owner(pid)
                    .leases
                    .joined(ask, (held, lease_id(lease)), room, &mut out);
                self.owner_carry_out(pid, out);
            }
            Msg::NoWorker { tag } => self.owner_grant_failed(pid, tag),
            Msg::Done {
                tag,
                task,
                value,
                node_id,
                kept,
            } => {
                let Some((key, place)) = self.owner(pid).pushes.remove(&tag) else {
                    return;
                };
                debug_assert_eq!(key, task);
                let tried = if self.owner(pid).dead.contains(&node_id) {
                    Tried::AnsweredFromDeadNode(node_id_of(node_id))
                } else {
                    self.borrow_tried(pid, key, Some(kept));
                    Tried::Answered(match value {
                        Ok(v) => TaskOutcome::Inline(v.to_le_bytes().to_vec()),
                        Err(e) => TaskOutcome::Failed(failed(task, e)),
                    })
                };
                self.owner_tried(pid, key, place, tried);
            }
            Msg::Lost { tag } => {
                let o = self.owner(pid);
                if o.asks.contains_key(&tag) {
                    self.owner_answered(pid, tag, Answer::Lost);
                } else if o.grants.contains_key(&tag) {
                    self.owner_grant_failed(pid, tag);
                } else if let Some((key, place)) = o.pushes.remove(&tag) {
                    self.owner_tried(pid, key, place, Tried::Lost("connection lost".into()));
                } else if let Some(request_id) = o.abandons.remove(&tag) {
                    let pause = self.rng.range(50 * MS, 500 * MS);
                    self.timer(pid, pause, Timer::Abandon { request_id });
                }
            }
            Msg::NodeDied { node_id } => {
                let o = self.owner(pid);
                if !o.dead.insert(node_id) {
                    return;
                }
                // Its workers are gone for this owner: tasks in flight
                // there are tried again.
                let lost: Vec<Tag> = o
                    .pushes
                    .iter()
                    .filter(|(_, (_, p))| p.worker.node_id == node_id)
                    .map(|(tag, _)| *tag)
                    .collect();
                for tag in lost {
                    if let Some((key, place)) = self.owner(pid).pushes.remove(&tag) {
                        self.owner_tried(pid, key, place, Tried::Lost("its node died".into()));
                    }
                }
                if pid == DRIVER {
                    self.driver_node_died(node_id);
                }
            }
            other => self.note(format!("{pid:?} ignored {other:?} from {from:?}")),
        }
    }

    fn owner_grant_failed(&mut self, pid: Pid, tag: Tag) {
        let Some((ask, lease, node, _, _)) = self.owner(pid).grants.remove(&tag) else {
            return;
        };
        self.control(pid, node_pid(node), |tag| Msg::ReleaseWorker {
            tag,
            lease,
            kill: true,
        });
        self.control(pid, HEAD, |tag| Msg::ReturnLease { tag, lease });
        let mut out = Vec::new();
        self.owner(pid).leases.grant_failed(ask, &mut out);
        self.owner_carry_out(pid, out);
    }

    fn owner_tried(&mut self, pid: Pid, key: u64, place: Place<Held>, tried: Tried) {
        let Some(task) = self.owner(pid).tasks.get_mut(&key) else {
            return;
        };
        let answered = matches!(tried, Tried::Answered(_));
        let (done, then) = task.run.tried(tried);
        if !answered {
            // The worker may have passed the reference on before it was lost.
            self.borrow_tried(pid, key, None);
        }
        let mut out = Vec::new();
        {
            let o = self.owner(pid);
            match done {
                PlaceDone::Release => o.leases.release(&place, &mut out),
                PlaceDone::Discard => o.leases.discard(&place.class, place.lease_id, &mut out),
            }
        }
        self.owner_carry_out(pid, out);
        match then {
            Then::Again => self.owner_acquire(pid, key),
            Then::Finish(state) => self.owner_finish(pid, key, state),
            Then::RebuildArgs => self.owner_finish(
                pid,
                key,
                ObjState::Failed(failed(key, "argument lost".into())),
            ),
        }
    }

    fn owner_finish(&mut self, pid: Pid, key: u64, state: ObjState) {
        self.owner(pid).tasks.remove(&key);
        self.borrow_end(pid, key);
        let value = match state {
            ObjState::Inline(bytes) => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes[..8]);
                Ok(i64::from_le_bytes(raw))
            }
            ObjState::Failed(f) => Err(format!("{:?}: {}", f.kind, f.message)),
            other => Err(format!("unexpected {other:?}")),
        };
        if pid == DRIVER {
            self.truth.results.insert(key, value);
        } else {
            self.worker_child_done(pid, value);
        }
    }

    /// The driver submits top-level task `index`.
    pub fn driver_submit(&mut self, index: u64) {
        let fanout = if index.is_multiple_of(4) {
            self.config.fanout
        } else {
            0
        };
        self.driver_lends(index, index);
        self.owner_submit(DRIVER, index, index as i64, fanout);
    }

    /// Every task has its result and every actor call its answer.
    pub fn workload_done(&self) -> bool {
        self.truth.results.len() as u64 == self.config.tasks
            && self.truth.calls.len() as u64 == self.config.actor_calls
    }

    /// The work is over: the driver gives its idle leases back, and the
    /// head then reclaims the job's (as `FinishJob` does).
    pub fn driver_stop(&mut self) {
        let mut out = Vec::new();
        self.owner(DRIVER).leases.stop(&mut out);
        self.owner_carry_out(DRIVER, out);
    }

    // ---- workers ----

    pub fn worker_receive(&mut self, pid: Pid, from: Pid, msg: Msg) {
        match msg {
            Msg::Push {
                tag,
                task,
                arg,
                fanout,
                lent,
                ..
            } => {
                let Some(worker) = self.workers.get_mut(&pid) else {
                    return;
                };
                worker.queue.push_back(Job {
                    tag,
                    from,
                    task,
                    arg,
                    fanout,
                    lent,
                    waiting: fanout,
                    sum: Ok(0),
                });
                if worker.running.is_none() {
                    self.worker_start_next(pid);
                }
            }
            Msg::ActorCall { .. } => self.host_call(pid, from, msg),
            _ => {}
        }
    }

    fn worker_start_next(&mut self, pid: Pid) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(job) = worker.queue.pop_front() else {
            return;
        };
        worker.running = Some(job.clone());
        let (lease, node_id) = (worker.lease, worker.node_id);
        if let Some(n) = job.lent {
            self.worker_takes(pid, n);
        }
        if job.fanout == 0 {
            let long = self.rng.chance(0.05);
            let span = if long {
                self.rng.range(50 * MS, 300 * MS)
            } else {
                self.rng.range(100, 5 * MS)
            };
            self.timer(pid, span, Timer::TaskEnd);
            return;
        }
        // A parent: this worker becomes an owner of its children, and
        // lends its CPU back while it waits for them.
        self.owners
            .entry(pid)
            .or_insert_with(|| Owner::new(pid, Some(node_id)));
        self.worker_set_blocked(pid, lease, true);
        for c in 0..job.fanout {
            let child = self.next_child();
            if let Some(n) = job.lent {
                self.lend_on(pid, child, n);
            }
            self.owner_submit(pid, child, job.arg * 10 + i64::from(c), 0);
        }
    }

    /// Tells the head this worker's lease is blocked (or not), after the
    /// transitions told before.
    fn worker_set_blocked(&mut self, pid: Pid, lease: u64, blocked: bool) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        worker.blocked_queue.push_back(blocked);
        if !worker.blocked_out {
            self.worker_blocked_next(pid, lease);
        }
    }

    fn worker_blocked_next(&mut self, pid: Pid, lease: u64) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(blocked) = worker.blocked_queue.pop_front() else {
            worker.blocked_out = false;
            return;
        };
        worker.blocked_out = true;
        self.control(pid, HEAD, |tag| Msg::SetBlocked {
            tag,
            lease,
            blocked,
        });
    }

    /// The last blocked transition was answered (or given up).
    pub fn worker_blocked_done(&mut self, pid: Pid) {
        if let Some(lease) = self.workers.get(&pid).map(|w| w.lease) {
            self.worker_blocked_next(pid, lease);
        }
    }

    fn next_child(&mut self) -> u64 {
        (1 << 32) + self.tag()
    }

    pub fn worker_task_end(&mut self, pid: Pid) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if !worker.alive {
            return;
        }
        let Some(job) = worker.running.take() else {
            return;
        };
        let node_id = worker.node_id;
        let kept = job.lent.is_some_and(|n| self.worker_done_with(pid, n));
        self.send(
            pid,
            job.from,
            Msg::Done {
                tag: job.tag,
                task: job.task,
                value: Ok(leaf(job.arg)),
                node_id,
                kept,
            },
        );
        self.worker_start_next(pid);
    }

    fn worker_child_done(&mut self, pid: Pid, value: Result<i64, String>) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if !worker.alive {
            return;
        }
        let Some(job) = worker.running.as_mut() else {
            return;
        };
        job.waiting = job.waiting.saturating_sub(1);
        job.sum = match (job.sum.clone(), value) {
            (Ok(sum), Ok(v)) => Ok(sum + v),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        if job.waiting > 0 {
            return;
        }
        let Some(job) = worker.running.take() else {
            return;
        };
        let (lease, node_id) = (worker.lease, worker.node_id);
        self.worker_set_blocked(pid, lease, false);
        let kept = job.lent.is_some_and(|n| self.worker_done_with(pid, n));
        self.send(
            pid,
            job.from,
            Msg::Done {
                tag: job.tag,
                task: job.task,
                value: job.sum,
                node_id,
                kept,
            },
        );
        self.worker_start_next(pid);
    }
}

fn node_id_of(no: NodeNo) -> shoal_proto::NodeId {
    node_id(no)
}
