//! The simulation: processes, the network between them, and the run loop.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::{Head, Node};
use crate::msg::{node_pid, Msg, Pid, Tag, Timer, DRIVER, HEAD};
use crate::owner::{Owner, Worker};
use crate::world::{Event, Faults, Net, Queue, Rng, Time, Trace, MS, SECOND};
use crate::{Config, Report, Violation};

/// What the run has seen, for the invariants.
#[derive(Debug, Default)]
pub struct Truth {
    /// Per top-level task: its result, once the driver has it.
    pub results: BTreeMap<u64, Result<i64, String>>,
    /// Per actor call: its result, once the driver has it.
    pub calls: BTreeMap<u64, Result<u64, String>>,
    /// Per actor incarnation: the call numbers it ran, in the order it ran
    /// them.
    pub ran: BTreeMap<u32, Vec<u64>>,
    /// The newest incarnation whose reply the driver accepted.
    pub accepted_incarnation: Option<u32>,
    /// Faults injected, for the report.
    pub faults: Vec<String>,
}

pub struct Sim {
    pub config: Config,
    pub q: Queue,
    pub rng: Rng,
    pub faults: Faults,
    pub net: Net,
    pub trace: Trace,
    pub events: u64,
    pub head: Head,
    pub nodes: Vec<Node>,
    /// Owners: the driver and every worker that submits (nested) tasks.
    pub owners: BTreeMap<Pid, Owner>,
    pub workers: BTreeMap<Pid, Worker>,
    /// Requests delivered and not answered, by the process answering:
    /// who asked, under which tag. A process that dies (or is cut off)
    /// fails them, as a connection would.
    pub outstanding: BTreeMap<Pid, BTreeSet<(Pid, Tag)>>,
    pub truth: Truth,
    /// Borrowed references: the processes' tables, the owners' borrows.
    pub lending: crate::borrow::Lending,
    /// Idempotent control requests out, as `call_idempotent` makes them:
    /// (caller, tag) -> (to, request, tries so far).
    retrying: BTreeMap<(Pid, Tag), (Pid, Msg, u32)>,
    /// The driver as the actor's caller.
    pub caller: crate::actor::Caller,
    next_tag: Tag,
    next_pid: u32,
    pub violation: Option<Violation>,
    /// Print every event (`SHOAL_SIM_TRACE=1`).
    print: bool,
}

impl Sim {
    pub fn new(seed: u64, config: Config) -> Self {
        let faults = Faults {
            drop_rate: config.drop_rate,
            spike_rate: 0.02,
            spike: (5 * MS, 60 * MS),
            latency: (50, 500),
            detect: (50 * MS, 400 * MS),
        };
        let nodes = (0..config.nodes).map(Node::new).collect();
        Sim {
            q: Queue::default(),
            rng: Rng::new(seed),
            faults,
            net: Net::default(),
            trace: Trace::default(),
            events: 0,
            head: Head::new(&config),
            nodes,
            owners: BTreeMap::new(),
            workers: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            truth: Truth::default(),
            lending: Default::default(),
            retrying: BTreeMap::new(),
            caller: Default::default(),
            next_tag: 0,
            next_pid: 1000,
            violation: None,
            print: std::env::var_os("SHOAL_SIM_TRACE").is_some(),
            config,
        }
    }

    pub fn tag(&mut self) -> Tag {
        self.next_tag += 1;
        self.next_tag
    }

    pub fn new_pid(&mut self) -> Pid {
        self.next_pid += 1;
        Pid(self.next_pid)
    }

    pub fn timer(&mut self, pid: Pid, after: Time, timer: Timer) {
        let at = self.q.now + after;
        self.q.at(at, Event::Timer { pid, timer });
    }

    /// The host a process lives on (`None`: the head's or the driver's
    /// host, never cut off).
    pub fn host_of(&self, pid: Pid) -> Option<usize> {
        if let Some(i) = self.nodes.iter().position(|n| node_pid(n.index) == pid) {
            return Some(i);
        }
        self.workers.get(&pid).map(|w| w.node)
    }

    /// Whether a process is running.
    pub fn is_alive(&self, pid: Pid) -> bool {
        if pid == HEAD || pid == DRIVER {
            return true;
        }
        if let Some(node) = self.nodes.iter().find(|n| node_pid(n.index) == pid) {
            return node.up;
        }
        self.workers.get(&pid).is_some_and(|w| w.alive)
    }

    fn linked(&self, a: Pid, b: Pid) -> bool {
        let cut = |p: Pid| self.host_of(p).is_some_and(|h| self.net.cut.contains(&h));
        !cut(a) && !cut(b)
    }

    /// Sends `msg`. A request may be lost (its caller then sees its
    /// connection fail; half the time the request got there first and the
    /// reply is what is lost); a message to a process that is not running,
    /// or across a cut, never arrives, and a request's caller is told.
    pub fn send(&mut self, from: Pid, to: Pid, msg: Msg) {
        let request = msg.request_tag();
        let reply = msg.reply_tag();
        if let Some(tag) = reply {
            // The caller was told the reply is lost: it never arrives.
            if self.net.lost_replies.remove(&(to, tag)) {
                return;
            }
            if let Some(set) = self.outstanding.get_mut(&from) {
                set.remove(&(to, tag));
            }
        }
        let reachable = self.is_alive(to) && self.linked(from, to);
        if !reachable {
            if let Some(tag) = request {
                self.fail_later(from, tag);
            } else if let Some(tag) = reply {
                self.fail_later(to, tag);
            }
            return;
        }
        if let Some(tag) = request {
            if self.rng.chance(self.faults.drop_rate) {
                self.fail_later(from, tag);
                if self.rng.chance(0.5) {
                    return;
                }
                self.net.lost_replies.insert((from, tag));
            }
        }
        let mut delay = self.rng.range(self.faults.latency.0, self.faults.latency.1);
        if self.rng.chance(self.faults.spike_rate) {
            delay += self.rng.range(self.faults.spike.0, self.faults.spike.1);
        }
        let at = self.q.now + delay;
        self.q.at(at, Event::Deliver { from, to, msg });
    }

    /// Sends an idempotent control request (a lease returned, a worker
    /// released, a worker blocked): tried up to 4 times, 20 ms apart and
    /// doubling, as `RpcClient::call_idempotent` does; built by `make` with
    /// its tag.
    pub fn control(&mut self, from: Pid, to: Pid, make: impl FnOnce(Tag) -> Msg) {
        let tag = self.tag();
        let msg = make(tag);
        self.retrying.insert((from, tag), (to, msg.clone(), 1));
        self.send(from, to, msg);
    }

    /// The answer to a control request, or its loss; true if it was one.
    fn control_answered(&mut self, pid: Pid, msg: &Msg) -> bool {
        let (tag, lost) = match msg {
            Msg::Ack { tag } => (*tag, false),
            Msg::Lost { tag } => (*tag, true),
            _ => return false,
        };
        let Some((to, request, tries)) = self.retrying.remove(&(pid, tag)) else {
            return false;
        };
        if lost && tries < 4 {
            let retry = self.tag();
            self.retrying
                .insert((pid, retry), (to, request.with_tag(retry), tries + 1));
            self.timer(pid, (20 * MS) << (tries - 1), Timer::Retry { tag: retry });
        } else if matches!(request, Msg::SetBlocked { .. }) {
            // The SDK awaits each blocked transition before the next.
            self.worker_blocked_done(pid);
        }
        true
    }

    fn control_retry(&mut self, pid: Pid, tag: Tag) {
        if let Some((to, request, _)) = self.retrying.get(&(pid, tag)).cloned() {
            if self.is_alive(pid) {
                self.send(pid, to, request);
            }
        }
    }

    /// Tells `caller` its request `tag` failed, after the time a lost
    /// connection takes to notice.
    pub fn fail_later(&mut self, caller: Pid, tag: Tag) {
        let delay = self.rng.range(self.faults.detect.0, self.faults.detect.1);
        let at = self.q.now + delay;
        self.q.at(
            at,
            Event::Deliver {
                from: HEAD,
                to: caller,
                msg: Msg::Lost { tag },
            },
        );
    }

    /// A process died or was cut off: the requests it was answering fail.
    pub fn fail_outstanding(&mut self, pid: Pid) {
        for (caller, tag) in self.outstanding.remove(&pid).unwrap_or_default() {
            self.net.lost_replies.insert((caller, tag));
            self.fail_later(caller, tag);
        }
    }

    pub fn note(&mut self, text: String) {
        if self.print {
            eprintln!("{text}");
        }
        self.trace.add(&text);
    }

    pub fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                step: self.events,
                time: self.q.now,
                what,
            });
        }
    }

    /// Runs to the end of the workload (or the time limit).
    pub fn run(mut self, seed: u64) -> Report {
        self.start();
        let limit = self.config.time_limit;
        let mut finished_at: Option<Time> = None;
        while let Some((time, event)) = self.q.pop() {
            if time > limit {
                break;
            }
            self.events += 1;
            match &event {
                Event::Deliver { from, to, msg } => {
                    self.note(format!("{time} {from:?}>{to:?} {msg:?}"))
                }
                Event::Timer { pid, timer } => self.note(format!("{time} {pid:?}! {timer:?}")),
            }
            self.dispatch(event);
            if self.violation.is_none() {
                crate::check::every_step(&mut self);
            }
            if self.violation.is_some() {
                break;
            }
            if finished_at.is_none() && self.workload_done() {
                finished_at = Some(time);
                self.driver_stop();
            }
            // Past the end of the work, give leases time to go back.
            if finished_at.is_some_and(|t| time > t + 3 * SECOND) {
                break;
            }
        }
        if self.violation.is_none() {
            crate::check::at_end(&mut self, finished_at.is_some());
        }
        Report {
            seed,
            hash: self.trace.value(),
            events: self.events,
            violation: self.violation,
            faults: self.truth.faults.len(),
        }
    }

    fn start(&mut self) {
        for i in 0..self.nodes.len() {
            self.node_boot(i);
        }
        self.timer(HEAD, 100 * MS, Timer::Sweep);
        self.owners.insert(DRIVER, Owner::new(DRIVER, None));
        for index in 0..self.config.tasks {
            let at = self.rng.range(10 * MS, 3 * SECOND);
            self.timer(DRIVER, at, Timer::Submit { index });
        }
        for index in 0..self.config.actor_calls {
            self.timer(DRIVER, 20 * MS + index * 30 * MS, Timer::Call { index });
        }
        self.timer(DRIVER, 10 * MS, Timer::Locate);
        self.head_create_actor();
        self.schedule_faults();
    }

    /// Crashes and partitions, drawn up front from the seed.
    fn schedule_faults(&mut self) {
        let n = self.nodes.len();
        for _ in 0..self.config.crashes {
            let node = self.rng.range(0, n as u64) as usize;
            let at = self.rng.range(100 * MS, 4 * SECOND);
            self.timer(node_pid(node), at, Timer::Crash { node });
        }
        for _ in 0..self.config.partitions {
            let node = self.rng.range(0, n as u64) as usize;
            let at = self.rng.range(100 * MS, 4 * SECOND);
            self.timer(node_pid(node), at, Timer::Cut { node });
        }
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Timer { pid, timer } => self.on_timer(pid, timer),
            Event::Deliver { from, to, msg } => {
                // Its process died while it was on its way: a request's
                // caller sees the connection fail.
                if !self.is_alive(to) {
                    if let Some(tag) = msg.request_tag() {
                        self.fail_later(from, tag);
                    }
                    return;
                }
                // Cut off while in flight: lost, and a request's caller
                // (or a reply's) learns its connection failed.
                if !matches!(msg, Msg::Lost { .. }) && !self.linked(from, to) {
                    if let Some(tag) = msg.request_tag() {
                        self.fail_later(from, tag);
                    } else if let Some(tag) = msg.reply_tag() {
                        self.fail_later(to, tag);
                    }
                    return;
                }
                if let Some(tag) = msg.request_tag() {
                    self.outstanding.entry(to).or_default().insert((from, tag));
                }
                if to == HEAD {
                    self.head_receive(from, msg);
                } else if self.nodes.iter().any(|n| node_pid(n.index) == to) {
                    let node = (to.0 - 10) as usize;
                    self.node_receive(node, from, msg);
                } else {
                    self.process_receive(to, from, msg);
                }
            }
        }
    }

    fn on_timer(&mut self, pid: Pid, timer: Timer) {
        match timer {
            Timer::Sweep => self.head_sweep(),
            Timer::HoldExpired { tag } => self.head_hold_expired(tag),
            Timer::Heartbeat { boot } => {
                let node = (pid.0 - 10) as usize;
                self.node_heartbeat(node, boot);
            }
            Timer::Crash { node } => self.crash(node),
            Timer::Restart { node } => self.node_boot(node),
            Timer::Cut { node } => self.cut(node),
            Timer::Heal { node } => {
                self.net.cut.remove(&node);
                self.truth.faults.push(format!("heal {node}"));
            }
            Timer::Submit { index } => self.driver_submit(index),
            Timer::Call { index } => self.driver_call(index),
            Timer::Locate => self.driver_locate(),
            Timer::Resend { seq } => self.driver_resend(seq),
            Timer::TaskEnd => self.worker_task_end(pid),
            Timer::Ask { key } => self.owner_ask_due(pid, key),
            Timer::Idle { lease, epoch } => self.owner_idle(pid, lease, epoch),
            Timer::Abandon { request_id } => self.owner_abandon(pid, request_id),
            Timer::Retry { tag } => self.control_retry(pid, tag),
        }
    }

    fn process_receive(&mut self, to: Pid, from: Pid, msg: Msg) {
        if self.control_answered(to, &msg) {
            return;
        }
        match msg {
            Msg::Push { .. } | Msg::ActorCall { .. } => self.worker_receive(to, from, msg),
            Msg::ActorAt { .. } | Msg::ActorNotYet { .. } | Msg::ActorGone { .. } => {
                self.driver_actor_reply(msg)
            }
            Msg::ActorReply { .. } => self.driver_actor_reply(msg),
            Msg::Lost { tag } if to == DRIVER && self.actor_tag(tag) => self.driver_actor_lost(tag),
            other => self.owner_receive(to, from, other),
        }
    }

    /// A node's process dies with its workers; it comes back later as a
    /// new node.
    fn crash(&mut self, node: usize) {
        if !self.nodes[node].up {
            return;
        }
        self.truth.faults.push(format!("crash {node}"));
        self.node_down(node);
        let back = self.rng.range(300 * MS, 2 * SECOND);
        self.timer(node_pid(node), back, Timer::Restart { node });
    }

    /// A host is cut off from everyone for a while: long enough, and the
    /// head declares its node dead; when it is back its node is fenced.
    fn cut(&mut self, node: usize) {
        if self.net.cut.contains(&node) {
            return;
        }
        self.truth.faults.push(format!("cut {node}"));
        self.net.cut.insert(node);
        let pids: Vec<Pid> = std::iter::once(node_pid(node))
            .chain(
                self.workers
                    .values()
                    .filter(|w| w.node == node)
                    .map(|w| w.pid),
            )
            .collect();
        for pid in pids {
            self.fail_outstanding(pid);
        }
        let long = self.rng.chance(0.6);
        let span = if long {
            self.rng.range(1500 * MS, 3 * SECOND)
        } else {
            self.rng.range(100 * MS, 500 * MS)
        };
        self.timer(node_pid(node), span, Timer::Heal { node });
    }
}
