//! The node table, as a state machine with no I/O: every method takes the
//! current time, so failure detection can be tested step by step.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use shoal_proto::head::{DeadNode, RegisterNode};
use shoal_proto::placement::NODE_ID_LABEL;
use shoal_proto::{NodeId, NodeState, NodeStatus, ResourceSet};

/// A heartbeat or request from a node that is not a live member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("node {0} is not a live member")]
pub struct Fenced(pub NodeId);

/// The table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the cluster already has {0} live nodes")]
pub struct TooManyNodes(pub usize);

#[derive(Debug)]
struct Entry {
    info: RegisterNode,
    state: NodeState,
    resources_available: ResourceSet,
    last_heard: Instant,
    /// The node's requests taken (registration, rejoin, heartbeat) whose
    /// replies wait for the head's own store (see
    /// [`Membership::owe_reply`]): while the head owes the node a reply,
    /// the node's silence is the head's doing.
    replies_owed: u32,
    store_used: u64,
    objects_pulled: u64,
}

/// The node table.
#[derive(Debug)]
pub struct Membership {
    nodes: HashMap<NodeId, Entry>,
    /// Registration keys of live nodes, so a retried registration is answered
    /// with the id it already got.
    keys: HashMap<u64, NodeId>,
    /// Registration order, for stable listings.
    order: Vec<NodeId>,
    /// Dead nodes, oldest first, to forget beyond `dead_kept`.
    dead: VecDeque<NodeId>,
    /// Deaths numbered in order (the most recent `dead_kept`), for owners
    /// that watch for them; and the newest number.
    deaths: VecDeque<(u64, DeadNode)>,
    deaths_seq: u64,
    nodes_max: usize,
    dead_kept: usize,
    /// Nodes admitted or declared dead since [`Membership::take_dirty`].
    dirty: std::collections::HashSet<NodeId>,
}

impl Membership {
    /// An empty table admitting up to `nodes_max` live nodes and remembering
    /// up to `dead_kept` dead ones.
    pub fn new(nodes_max: usize, dead_kept: usize) -> Self {
        Self {
            nodes: HashMap::new(),
            keys: HashMap::new(),
            order: Vec::new(),
            dead: VecDeque::new(),
            deaths: VecDeque::new(),
            deaths_seq: 0,
            nodes_max,
            dead_kept,
            dirty: Default::default(),
        }
    }

    /// The live node that registered with `key`, if any: a retried
    /// registration gets the id it already has.
    pub fn registered_with(&self, key: u64) -> Option<NodeId> {
        let id = *self.keys.get(&key)?;
        (self.state(id) == Some(NodeState::Alive)).then_some(id)
    }

    /// Admits a node under `id` (new, from [`NodeId::random`]); it starts
    /// with all its resources free.
    pub fn register(
        &mut self,
        id: NodeId,
        mut info: RegisterNode,
        now: Instant,
    ) -> Result<NodeId, TooManyNodes> {
        if let Some(existing) = self
            .registered_with(info.registration_key)
            .filter(|_| info.registration_key != 0)
        {
            return Ok(existing);
        }
        if self.alive_count() >= self.nodes_max {
            return Err(TooManyNodes(self.nodes_max));
        }
        if info.registration_key != 0 {
            self.keys.insert(info.registration_key, id);
        }
        // Its id is a label too, whatever the node said.
        info.labels
            .insert(NODE_ID_LABEL.to_string(), id.to_string());
        let entry = Entry {
            resources_available: info.resources_total.clone(),
            info,
            state: NodeState::Alive,
            last_heard: now,
            replies_owed: 0,
            store_used: 0,
            objects_pulled: 0,
        };
        self.nodes.insert(id, entry);
        self.order.retain(|n| *n != id);
        self.order.push(id);
        self.dirty.insert(id);
        Ok(id)
    }

    /// Records a heartbeat. A dead or unknown node is fenced: it must join
    /// again as a new node.
    pub fn heartbeat(
        &mut self,
        id: NodeId,
        available: ResourceSet,
        store_used: u64,
        now: Instant,
    ) -> Result<(), Fenced> {
        match self.nodes.get_mut(&id) {
            Some(entry) if entry.state == NodeState::Alive => {
                entry.last_heard = now;
                entry.resources_available = available;
                entry.store_used = store_used;
                Ok(())
            }
            _ => Err(Fenced(id)),
        }
    }

    /// The reply to a registration, rejoin or heartbeat of `id` just taken
    /// waits until what it saw is durable. A node sends its next heartbeat
    /// only after the reply, so until [`Membership::replied`] it is not
    /// counted silent: a slow store (a large executable written to Redis on
    /// a loaded machine) must not get every node declared dead.
    pub fn owe_reply(&mut self, id: NodeId) {
        if let Some(entry) = self.nodes.get_mut(&id) {
            if entry.state == NodeState::Alive {
                entry.replies_owed += 1;
            }
        }
    }

    /// The reply owed to `id` (see [`Membership::owe_reply`]) goes out (or
    /// never will: its request was dropped) at `now`; the node's silence is
    /// counted from then.
    pub fn replied(&mut self, id: NodeId, now: Instant) {
        if let Some(entry) = self.nodes.get_mut(&id) {
            if entry.replies_owed == 0 {
                return;
            }
            entry.replies_owed -= 1;
            if entry.state == NodeState::Alive {
                entry.last_heard = entry.last_heard.max(now);
            }
        }
    }

    /// Records the objects a node has pulled (reported with its heartbeat).
    pub fn set_objects_pulled(&mut self, id: NodeId, pulled: u64) {
        if let Some(entry) = self.nodes.get_mut(&id) {
            entry.objects_pulled = pulled;
        }
    }

    /// Marks a node dead because it left. Returns false if it was not alive.
    pub fn unregister(&mut self, id: NodeId) -> bool {
        self.mark_dead(id)
    }

    /// Declares dead every live node silent for longer than `timeout` (and
    /// owed no reply); returns them.
    pub fn sweep(&mut self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        let expired: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, e)| {
                e.state == NodeState::Alive
                    && e.replies_owed == 0
                    && now.saturating_duration_since(e.last_heard) > timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.mark_dead(*id);
        }
        expired
    }

    fn mark_dead(&mut self, id: NodeId) -> bool {
        let Some(entry) = self.nodes.get_mut(&id) else {
            return false;
        };
        if entry.state == NodeState::Dead {
            return false;
        }
        entry.state = NodeState::Dead;
        entry.resources_available = ResourceSet::new();
        self.dirty.insert(id);
        let key = entry.info.registration_key;
        if self.keys.get(&key) == Some(&id) {
            self.keys.remove(&key);
        }
        self.deaths_seq += 1;
        self.deaths.push_back((
            self.deaths_seq,
            DeadNode {
                node_id: id,
                address: entry.info.address.clone(),
            },
        ));
        if self.deaths.len() > self.dead_kept.max(1) {
            self.deaths.pop_front();
        }
        self.dead.push_back(id);
        while self.dead.len() > self.dead_kept {
            if let Some(old) = self.dead.pop_front() {
                self.nodes.remove(&old);
                self.order.retain(|n| *n != old);
            }
        }
        true
    }

    /// The deaths numbered after `after` (those still kept), and the newest
    /// number. An `after` past the newest number is a count of another
    /// head's (this one restarted and counts from 0 again): every death
    /// kept is new to that caller.
    pub fn deaths_after(&self, after: u64) -> (u64, Vec<DeadNode>) {
        let after = if after > self.deaths_seq { 0 } else { after };
        let nodes = self
            .deaths
            .iter()
            .filter(|(seq, _)| *seq > after)
            .map(|(_, dead)| dead.clone())
            .collect();
        (self.deaths_seq, nodes)
    }

    /// The nodes admitted or declared dead since the last call: a live
    /// one with what it registered with, a dead one with `None`.
    pub fn take_dirty(&mut self) -> Vec<(NodeId, Option<RegisterNode>)> {
        let dirty: Vec<NodeId> = self.dirty.drain().collect();
        dirty
            .into_iter()
            .map(|id| {
                let info = self
                    .nodes
                    .get(&id)
                    .filter(|e| e.state == NodeState::Alive)
                    .map(|e| e.info.clone());
                (id, info)
            })
            .collect()
    }

    /// Live nodes.
    pub fn alive_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|e| e.state == NodeState::Alive)
            .count()
    }

    /// A live node's address.
    pub fn address(&self, id: NodeId) -> Option<&str> {
        self.nodes
            .get(&id)
            .filter(|e| e.state == NodeState::Alive)
            .map(|e| e.info.address.as_str())
    }

    /// The state of a node, if remembered.
    pub fn state(&self, id: NodeId) -> Option<NodeState> {
        self.nodes.get(&id).map(|e| e.state)
    }

    /// Every remembered node, in registration order.
    pub fn status(&self, now: Instant) -> Vec<NodeStatus> {
        self.order
            .iter()
            .filter_map(|id| self.nodes.get(id).map(|e| (id, e)))
            .map(|(id, e)| NodeStatus {
                node_id: *id,
                address: e.info.address.clone(),
                state: e.state,
                pid: e.info.pid,
                hostname: e.info.hostname.clone(),
                host_id: e.info.host_id.clone(),
                is_head_node: e.info.is_head_node,
                resources_total: e.info.resources_total.clone(),
                resources_available: e.resources_available.clone(),
                object_store_used_bytes: e.store_used,
                objects_pulled: e.objects_pulled,
                object_store_capacity_bytes: e.info.object_store_capacity_bytes,
                metrics_address: e.info.metrics_address.clone(),
                labels: e.info.labels.clone(),
                last_heartbeat_ms_ago: u64::try_from(
                    now.saturating_duration_since(e.last_heard).as_millis(),
                )
                .unwrap_or(u64::MAX),
            })
            .collect()
    }

    /// The cluster's resource view: totals and free resources of live nodes.
    pub fn resources(&self) -> (ResourceSet, ResourceSet) {
        let mut total = ResourceSet::new();
        let mut available = ResourceSet::new();
        for e in self.nodes.values().filter(|e| e.state == NodeState::Alive) {
            total.add(&e.info.resources_total);
            available.add(&e.resources_available);
        }
        (total, available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(cpus: f64) -> RegisterNode {
        let mut resources = ResourceSet::new();
        resources.set("CPU", cpus);
        RegisterNode {
            address: "127.0.0.1:1".into(),
            pid: 1,
            hostname: "h".into(),
            host_id: String::new(),
            resources_total: resources,
            is_head_node: false,
            registration_key: 0,
            object_store_capacity_bytes: 0,
            metrics_address: None,
            labels: Default::default(),
        }
    }

    fn reg(m: &mut Membership, info: RegisterNode, now: Instant) -> Result<NodeId, TooManyNodes> {
        m.register(NodeId::random(), info, now)
    }

    #[test]
    fn a_retried_registration_gets_the_same_id() {
        let mut m = Membership::new(10, 10);
        let t0 = Instant::now();
        let keyed = RegisterNode {
            registration_key: 42,
            ..info(1.0)
        };
        let a = reg(&mut m, keyed.clone(), t0).expect("room");
        let again = reg(&mut m, keyed.clone(), t0).expect("room");
        assert_eq!(a, again);
        assert_eq!(m.alive_count(), 1, "no phantom second node");
        m.unregister(a);
        let b = reg(&mut m, keyed, t0).expect("room");
        assert_ne!(a, b, "a dead node's key does not revive it");
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn each_registration_gets_a_new_id() {
        let mut m = Membership::new(10, 10);
        let t0 = Instant::now();
        let a = reg(&mut m, info(1.0), t0).expect("room");
        let b = reg(&mut m, info(1.0), t0).expect("room");
        assert_ne!(a, b);
        assert_eq!(m.alive_count(), 2);
    }

    #[test]
    fn deaths_are_numbered_for_watchers_and_counted_once() {
        let mut m = Membership::new(10, 2);
        let t0 = Instant::now();
        assert_eq!(m.deaths_after(0), (0, vec![]));
        let ids: Vec<NodeId> = (0..3)
            .map(|_| reg(&mut m, info(1.0), t0).expect("room"))
            .collect();
        assert!(m.unregister(ids[0]));
        assert!(!m.unregister(ids[0]), "a node dies once");
        let (seq, dead) = m.deaths_after(0);
        assert_eq!(seq, 1);
        assert_eq!(dead.iter().map(|d| d.node_id).collect::<Vec<_>>(), [ids[0]]);
        assert_eq!(m.deaths_after(seq), (1, vec![]), "nothing new");
        m.unregister(ids[1]);
        m.unregister(ids[2]);
        let (seq, dead) = m.deaths_after(0);
        assert_eq!(seq, 3);
        assert_eq!(
            dead.iter().map(|d| d.node_id).collect::<Vec<_>>(),
            [ids[1], ids[2]],
            "only the most recent are kept"
        );
        assert_eq!(
            m.deaths_after(9).1.len(),
            2,
            "a count from another head (this one restarted): all of them"
        );
    }

    #[test]
    fn silent_node_dies_after_the_timeout_and_is_fenced() {
        let mut m = Membership::new(10, 10);
        let t0 = Instant::now();
        let a = reg(&mut m, info(2.0), t0).expect("room");
        let b = reg(&mut m, info(2.0), t0).expect("room");
        assert!(
            m.sweep(t0 + TIMEOUT, TIMEOUT).is_empty(),
            "not dead at exactly the timeout"
        );
        m.heartbeat(b, ResourceSet::new(), 0, t0 + TIMEOUT)
            .expect("alive");
        assert_eq!(
            m.sweep(t0 + TIMEOUT + Duration::from_millis(1), TIMEOUT),
            vec![a]
        );
        assert_eq!(m.state(a), Some(NodeState::Dead));
        assert_eq!(m.state(b), Some(NodeState::Alive));
        assert_eq!(
            m.heartbeat(a, ResourceSet::new(), 0, t0 + TIMEOUT * 2),
            Err(Fenced(a))
        );
        assert_eq!(
            m.state(a),
            Some(NodeState::Dead),
            "a fenced heartbeat does not revive"
        );
    }

    #[test]
    fn a_node_owed_a_reply_is_not_silent_until_the_reply_goes_out() {
        let mut m = Membership::new(10, 10);
        let t0 = Instant::now();
        let a = reg(&mut m, info(2.0), t0).expect("room");
        m.heartbeat(a, ResourceSet::new(), 0, t0).expect("alive");
        m.owe_reply(a);
        // The head's store is slow: the reply waits, and so does the node.
        assert!(m.sweep(t0 + TIMEOUT * 5, TIMEOUT).is_empty());
        // The reply goes out: the node's silence counts from then.
        let sent = t0 + TIMEOUT * 5;
        m.replied(a, sent);
        assert!(m.sweep(sent + TIMEOUT, TIMEOUT).is_empty());
        // A reply not owed (already sent) touches nothing.
        m.replied(a, sent + TIMEOUT);
        assert_eq!(
            m.sweep(sent + TIMEOUT + Duration::from_millis(1), TIMEOUT),
            vec![a]
        );
        // Nor does one owed to a node that has since died.
        m.owe_reply(a);
        m.replied(a, sent + TIMEOUT * 3);
        assert_eq!(m.state(a), Some(NodeState::Dead));
    }

    #[test]
    fn unknown_node_is_fenced() {
        let mut m = Membership::new(10, 10);
        let stranger = NodeId::random();
        assert_eq!(
            m.heartbeat(stranger, ResourceSet::new(), 0, Instant::now()),
            Err(Fenced(stranger))
        );
    }

    #[test]
    fn resources_count_live_nodes_only() {
        let mut m = Membership::new(10, 10);
        let t0 = Instant::now();
        let a = reg(&mut m, info(2.0), t0).expect("room");
        reg(&mut m, info(3.0), t0).expect("room");
        let mut free = ResourceSet::new();
        free.set("CPU", 1.0);
        m.heartbeat(a, free, 0, t0).expect("alive");
        let (total, available) = m.resources();
        assert_eq!(total.get("CPU"), 5.0);
        assert_eq!(available.get("CPU"), 4.0);
        assert!(m.unregister(a));
        assert!(!m.unregister(a), "already dead");
        let (total, available) = m.resources();
        assert_eq!(total.get("CPU"), 3.0);
        assert_eq!(available.get("CPU"), 3.0);
        let dead = m
            .status(t0)
            .into_iter()
            .find(|n| n.node_id == a)
            .expect("remembered");
        assert_eq!(dead.state, NodeState::Dead);
        assert_eq!(dead.resources_available.get("CPU"), 0.0);
    }

    #[test]
    fn table_is_bounded() {
        let mut m = Membership::new(2, 1);
        let t0 = Instant::now();
        let a = reg(&mut m, info(1.0), t0).expect("room");
        let b = reg(&mut m, info(1.0), t0).expect("room");
        assert_eq!(reg(&mut m, info(1.0), t0), Err(TooManyNodes(2)));
        m.unregister(a);
        m.unregister(b);
        assert_eq!(
            m.state(a),
            None,
            "oldest dead node forgotten beyond the bound"
        );
        assert_eq!(m.state(b), Some(NodeState::Dead));
        assert_eq!(m.status(t0).len(), 1);
    }
}
