//! The head and the node daemons. The head is the real one's state
//! machines (`Membership`, `Scheduler`) behind a simulated service; the
//! nodes register, heartbeat, start workers for leases and are fenced when
//! the head declared them dead.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_head::membership::Membership;
use shoal_head::scheduler::{Decision, NodeView, Scheduler};
use shoal_proto::head::{LeaseRequest, RegisterNode};
use shoal_proto::{JobId, LeaseId, NodeId, ResourceSet, WorkerId};

use crate::msg::{node_pid, Msg, NodeNo, Pid, Tag, Timer, DRIVER, HEAD};
use crate::owner::Worker;
use crate::sim::Sim;
use crate::world::{Time, MS, SECOND};
use crate::Config;

/// How long the head waits for a heartbeat before declaring a node dead.
pub const NODE_TIMEOUT: Time = SECOND;
pub const HEARTBEAT: Time = 100 * MS;
/// How long the head holds a lease request while the cluster is full.
const HOLD: Time = 2 * SECOND;

pub fn node_id(no: NodeNo) -> NodeId {
    NodeId::from_uuid(uuid::Uuid::from_u128(no))
}

pub fn lease_id(no: u64) -> LeaseId {
    LeaseId::from_uuid(uuid::Uuid::from_u128(u128::from(no)))
}

pub fn worker_id(pid: Pid) -> WorkerId {
    WorkerId::from_uuid(uuid::Uuid::from_u128(u128::from(pid.0) + (1 << 64)))
}

pub fn cpus(n: f64) -> ResourceSet {
    let mut r = ResourceSet::new();
    r.set(shoal_proto::resources::CPU, n);
    r
}

/// The actor's entry at the head.
#[derive(Debug)]
pub enum ActorState {
    /// To be placed on a live node (incarnation to start).
    Placing,
    Starting {
        node: usize,
        node_id: NodeNo,
    },
    Alive {
        node_id: NodeNo,
        worker: Pid,
    },
    Dead,
}

pub struct Head {
    pub membership: Membership,
    pub scheduler: Scheduler,
    /// Live nodes: their index and view.
    pub views: BTreeMap<NodeNo, (usize, NodeView)>,
    /// Leases: their number, and by the scheduler's id.
    pub leases: BTreeMap<LeaseId, (u64, usize)>,
    /// The scheduler's id of each lease number.
    by_no: BTreeMap<u64, LeaseId>,
    next_lease: u64,
    next_node: NodeNo,
    /// Held lease requests, oldest first.
    held: Vec<(Tag, Pid, LeaseRequest)>,
    pub owners: BTreeMap<WorkerId, Pid>,
    base: Instant,
    cpus: f64,
    pub actor: ActorState,
    pub incarnation: u32,
    restarts_left: u32,
}

impl Head {
    pub fn new(config: &Config) -> Self {
        Head {
            membership: Membership::new(64, 64),
            scheduler: Scheduler::new(),
            views: BTreeMap::new(),
            leases: BTreeMap::new(),
            by_no: BTreeMap::new(),
            next_lease: 0,
            next_node: 0,
            held: Vec::new(),
            owners: BTreeMap::new(),
            base: Instant::now(),
            cpus: config.cpus,
            actor: ActorState::Placing,
            incarnation: 0,
            restarts_left: config.actor_restarts,
        }
    }

    fn instant(&self, now: Time) -> Instant {
        self.base + Duration::from_micros(now)
    }

    fn nodes(&self) -> Vec<NodeView> {
        self.views.values().map(|(_, v)| v.clone()).collect()
    }
}

pub struct Node {
    pub index: usize,
    pub up: bool,
    pub node_id: Option<NodeNo>,
    /// Boots so far: a heartbeat timer of an earlier boot stops.
    pub boot: u64,
    /// Workers by lease number.
    pub workers: BTreeMap<u64, Pid>,
    /// The actor incarnation this node started, and its worker.
    pub actor: Option<(u32, Pid)>,
}

impl Node {
    pub fn new(index: usize) -> Self {
        Node {
            index,
            up: false,
            node_id: None,
            boot: 0,
            workers: BTreeMap::new(),
            actor: None,
        }
    }
}

impl Sim {
    // ---- the head ----

    pub fn head_receive(&mut self, from: Pid, msg: Msg) {
        let now = self.head.instant(self.q.now);
        match msg {
            Msg::Register { node } => {
                // The registration key is the boot: a retry gets the same id.
                let key = (node as u64) << 32 | self.nodes[node].boot;
                let info = RegisterNode {
                    address: format!("198.18.0.{}:7000", node + 2),
                    pid: node as u32,
                    hostname: format!("node{node}"),
                    host_id: format!("host{node}"),
                    resources_total: cpus(self.head.cpus),
                    is_head_node: false,
                    registration_key: key,
                    object_store_capacity_bytes: 0,
                    metrics_address: None,
                    labels: Default::default(),
                };
                self.head.next_node += 1;
                let fresh = self.head.next_node;
                let Ok(id) = self.head.membership.register(node_id(fresh), info, now) else {
                    return;
                };
                let no = self.head.views.iter().find(|(_, (_, v))| v.node_id == id);
                let no = match no {
                    Some((no, _)) => *no,
                    None => {
                        let view = NodeView {
                            node_id: id,
                            address: format!("198.18.0.{}:7000", node + 2),
                            total: cpus(self.head.cpus),
                            labels: Default::default(),
                        };
                        self.head.views.insert(fresh, (node, view));
                        fresh
                    }
                };
                self.send(HEAD, from, Msg::Registered { node_id: no });
                self.head_place_actor();
                self.head_retry_held();
            }
            Msg::Heartbeat { node_id: no } => {
                let fenced = self
                    .head
                    .membership
                    .heartbeat(node_id(no), cpus(0.0), 0, now)
                    .is_err();
                if fenced {
                    self.send(HEAD, from, Msg::Fenced);
                }
            }
            Msg::RequestLease {
                tag,
                request_id,
                owner_node,
                wait,
            } => {
                self.head.owners.insert(worker_id(from), from);
                let request = LeaseRequest {
                    job_id: JobId::from_uuid(uuid::Uuid::from_u128(1)),
                    owner: worker_id(from),
                    resources: cpus(1.0),
                    preferred_node: None,
                    wait_ms: if wait { 2000 } else { 0 },
                    request_id,
                    owner_node: owner_node.map(node_id),
                    // Only an owner giving a request up asks without waiting.
                    abandon: !wait,
                    placement: Default::default(),
                };
                if !self.head_try(tag, from, &request) {
                    if wait {
                        self.head.held.push((tag, from, request));
                        self.timer(HEAD, HOLD, Timer::HoldExpired { tag });
                    } else {
                        self.send(HEAD, from, Msg::LeasePending { tag });
                    }
                }
            }
            Msg::ReturnLease { tag, lease } => {
                self.send(HEAD, from, Msg::Ack { tag });
                self.scheduler_release(lease);
                self.head_retry_held();
            }
            Msg::SetBlocked {
                tag,
                lease,
                blocked,
            } => {
                self.send(HEAD, from, Msg::Ack { tag });
                if let Some(id) = self.scheduler_id(lease) {
                    self.head.scheduler.set_blocked(id, blocked);
                }
                if blocked {
                    self.head_retry_held();
                }
            }
            Msg::OwnerDied { owner } => {
                self.head.scheduler.owner_died(worker_id(owner));
                self.head_orphans();
                self.head_retry_held();
            }
            Msg::ActorStarted {
                incarnation,
                worker,
                node_id: no,
            } => {
                let here = matches!(self.head.actor, ActorState::Starting { node_id, .. } if node_id == no);
                if incarnation == self.head.incarnation && here {
                    self.head.actor = ActorState::Alive {
                        node_id: no,
                        worker,
                    };
                }
            }
            Msg::GetActor { tag, known } => {
                let reply = match self.head.actor {
                    ActorState::Alive { node_id, worker }
                        if known.is_none_or(|k| k < self.head.incarnation) =>
                    {
                        Msg::ActorAt {
                            tag,
                            incarnation: self.head.incarnation,
                            worker,
                            node_id,
                        }
                    }
                    ActorState::Dead => Msg::ActorGone { tag },
                    _ => Msg::ActorNotYet { tag },
                };
                self.send(HEAD, from, reply);
            }
            _ => {}
        }
    }

    /// Tries to grant a request; true if it was answered.
    fn head_try(&mut self, tag: Tag, from: Pid, request: &LeaseRequest) -> bool {
        let nodes = self.head.nodes();
        match self.head.scheduler.request(&nodes, request) {
            Decision::Granted(lease) => {
                let (no, node) = match self.head.leases.get(&lease.lease_id) {
                    Some(known) => *known,
                    None => {
                        self.head.next_lease += 1;
                        let no = self.head.next_lease;
                        let node = self
                            .head
                            .views
                            .values()
                            .find(|(_, v)| v.node_id == lease.node_id)
                            .map_or(usize::MAX, |(i, _)| *i);
                        self.head.leases.insert(lease.lease_id, (no, node));
                        self.head.by_no.insert(no, lease.lease_id);
                        (no, node)
                    }
                };
                let node_no = self
                    .head
                    .views
                    .iter()
                    .find(|(_, (_, v))| v.node_id == lease.node_id)
                    .map_or(0, |(n, _)| *n);
                self.send(
                    HEAD,
                    from,
                    Msg::LeaseGranted {
                        tag,
                        lease: no,
                        node,
                        node_id: node_no,
                        room: lease.room_for_another,
                    },
                );
                true
            }
            // Its owner is dead: nobody waits for an answer.
            Decision::OwnerGone => true,
            // (The simulation asks for no node affinity: never refused.)
            Decision::Abandoned | Decision::Refused(_) => {
                self.send(HEAD, from, Msg::LeasePending { tag });
                true
            }
            Decision::Wait | Decision::Infeasible => false,
        }
    }

    fn scheduler_id(&self, lease: u64) -> Option<LeaseId> {
        self.head.by_no.get(&lease).copied()
    }

    fn scheduler_release(&mut self, lease: u64) {
        if let Some(id) = self.scheduler_id(lease) {
            self.head.scheduler.release(id);
        }
    }

    pub fn head_hold_expired(&mut self, tag: Tag) {
        if let Some(at) = self.head.held.iter().position(|(t, _, _)| *t == tag) {
            let (tag, from, _) = self.head.held.remove(at);
            self.send(HEAD, from, Msg::LeasePending { tag });
        }
    }

    fn head_retry_held(&mut self) {
        let held = std::mem::take(&mut self.head.held);
        for (tag, from, request) in held {
            if !self.head_try(tag, from, &request) {
                self.head.held.push((tag, from, request));
            }
        }
    }

    /// Leases whose owner died: their workers are stopped.
    fn head_orphans(&mut self) {
        let mut orphans = self.head.scheduler.take_orphaned();
        orphans.sort_by_key(|(_, l)| self.head.leases.get(l).map(|(no, _)| *no));
        for (node, lease) in orphans {
            let Some((no, _)) = self.head.leases.get(&lease).copied() else {
                continue;
            };
            let index = self
                .head
                .views
                .values()
                .find(|(_, v)| v.node_id == node)
                .map(|(i, _)| *i);
            if let Some(index) = index {
                self.send(HEAD, node_pid(index), Msg::KillLease { lease: no });
            }
        }
    }

    pub fn head_sweep(&mut self) {
        self.timer(HEAD, HEARTBEAT, Timer::Sweep);
        let now = self.head.instant(self.q.now);
        let dead = self
            .head
            .membership
            .sweep(now, Duration::from_micros(NODE_TIMEOUT));
        let mut dead: Vec<NodeNo> = dead
            .iter()
            .filter_map(|id| {
                self.head
                    .views
                    .iter()
                    .find(|(_, (_, v))| v.node_id == *id)
                    .map(|(no, _)| *no)
            })
            .collect();
        dead.sort_unstable();
        for no in dead {
            self.head.views.remove(&no);
            self.head.scheduler.node_died(node_id(no));
            self.note(format!("head: node {no} declared dead"));
            let owners: Vec<Pid> = std::iter::once(DRIVER)
                .chain(
                    self.owners
                        .keys()
                        .copied()
                        .filter(|p| *p != DRIVER && self.is_alive(*p)),
                )
                .collect();
            for owner in owners {
                self.send(HEAD, owner, Msg::NodeDied { node_id: no });
            }
            let on_it = match self.head.actor {
                ActorState::Alive { node_id, .. } | ActorState::Starting { node_id, .. } => {
                    node_id == no
                }
                _ => false,
            };
            if on_it {
                if self.head.restarts_left > 0 {
                    self.head.restarts_left -= 1;
                    self.head.incarnation += 1;
                    self.head.actor = ActorState::Placing;
                } else {
                    self.head.actor = ActorState::Dead;
                }
            }
        }
        self.head_orphans();
        // A start not yet confirmed is asked for again (the order is
        // idempotent at the node).
        if let ActorState::Starting { node, node_id } = self.head.actor {
            let incarnation = self.head.incarnation;
            self.send(
                HEAD,
                node_pid(node),
                Msg::StartActor {
                    incarnation,
                    node_id,
                },
            );
        }
        self.head_place_actor();
        self.head_retry_held();
    }

    /// Starts the actor's incarnation on the first live node.
    pub fn head_place_actor(&mut self) {
        if !matches!(self.head.actor, ActorState::Placing) {
            return;
        }
        let Some((&no, &(index, _))) = self.head.views.iter().next() else {
            return;
        };
        self.head.actor = ActorState::Starting {
            node: index,
            node_id: no,
        };
        let incarnation = self.head.incarnation;
        self.send(
            HEAD,
            node_pid(index),
            Msg::StartActor {
                incarnation,
                node_id: no,
            },
        );
    }

    pub fn head_create_actor(&mut self) {
        self.head.actor = ActorState::Placing;
    }

    // ---- node daemons ----

    pub fn node_boot(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.up = true;
        n.node_id = None;
        n.boot += 1;
        let boot = n.boot;
        self.send(node_pid(node), HEAD, Msg::Register { node });
        self.timer(node_pid(node), HEARTBEAT, Timer::Heartbeat { boot });
    }

    pub fn node_heartbeat(&mut self, node: usize, boot: u64) {
        let n = &self.nodes[node];
        if !n.up || n.boot != boot {
            return;
        }
        let msg = match n.node_id {
            Some(node_id) => Msg::Heartbeat { node_id },
            None => Msg::Register { node },
        };
        self.send(node_pid(node), HEAD, msg);
        self.timer(node_pid(node), HEARTBEAT, Timer::Heartbeat { boot });
    }

    /// Stops the node's workers: it crashed, or it was fenced.
    fn node_stop_workers(&mut self, node: usize) {
        let pids: Vec<Pid> = self
            .workers
            .values()
            .filter(|w| w.node == node && w.alive)
            .map(|w| w.pid)
            .collect();
        for pid in pids {
            self.kill_worker(pid, false);
        }
        self.nodes[node].workers.clear();
    }

    pub fn node_down(&mut self, node: usize) {
        self.node_stop_workers(node);
        let n = &mut self.nodes[node];
        n.up = false;
        n.node_id = None;
        self.fail_outstanding(node_pid(node));
    }

    /// Ends a worker's process; `report` when its node lives on to say so
    /// (the head then reclaims the leases it held as an owner).
    pub fn kill_worker(&mut self, pid: Pid, report: bool) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if !worker.alive {
            return;
        }
        worker.alive = false;
        let node = worker.node;
        self.fail_outstanding(pid);
        if report && self.owners.contains_key(&pid) {
            self.send(node_pid(node), HEAD, Msg::OwnerDied { owner: pid });
        }
    }

    pub fn node_receive(&mut self, node: usize, from: Pid, msg: Msg) {
        match msg {
            Msg::Registered { node_id } => {
                let n = &mut self.nodes[node];
                if n.node_id.is_none() {
                    n.node_id = Some(node_id);
                }
            }
            Msg::Fenced => {
                // Declared dead while cut off: its workers go, and it joins
                // again as a new node.
                self.note(format!("node {node} fenced"));
                self.node_stop_workers(node);
                self.nodes[node].node_id = None;
            }
            Msg::GrantWorker { tag, lease, owner } => {
                let Some(node_id) = self.nodes[node].node_id else {
                    self.send(node_pid(node), from, Msg::NoWorker { tag });
                    return;
                };
                let pid = match self.nodes[node].workers.get(&lease) {
                    Some(pid) => *pid,
                    None => {
                        let pid = self.new_pid();
                        self.workers
                            .insert(pid, Worker::new(pid, (node, node_id), lease, owner));
                        self.nodes[node].workers.insert(lease, pid);
                        pid
                    }
                };
                self.send(
                    node_pid(node),
                    from,
                    Msg::WorkerGranted { tag, worker: pid },
                );
            }
            Msg::ReleaseWorker { tag, lease, .. } => {
                self.send(node_pid(node), from, Msg::Ack { tag });
                if let Some(pid) = self.nodes[node].workers.remove(&lease) {
                    self.kill_worker(pid, true);
                }
            }
            Msg::KillLease { lease } => {
                if let Some(pid) = self.nodes[node].workers.remove(&lease) {
                    self.kill_worker(pid, true);
                }
            }
            Msg::StartActor {
                incarnation,
                node_id: to,
            } => {
                let Some(node_id) = self.nodes[node].node_id.filter(|id| *id == to) else {
                    return;
                };
                let pid = match self.nodes[node].actor {
                    Some((started, pid)) if started == incarnation && self.is_alive(pid) => pid,
                    _ => {
                        let pid = self.new_pid();
                        let mut worker = Worker::new(pid, (node, node_id), 0, HEAD);
                        worker.host_actor(incarnation);
                        self.workers.insert(pid, worker);
                        self.nodes[node].actor = Some((incarnation, pid));
                        pid
                    }
                };
                self.send(
                    node_pid(node),
                    HEAD,
                    Msg::ActorStarted {
                        incarnation,
                        worker: pid,
                        node_id,
                    },
                );
            }
            _ => {}
        }
    }
}
