//! The resource ledger and lease scheduler, as a state machine with no I/O.
//!
//! A lease holds resources on one node until it is returned, its node dies,
//! or its job finishes. Allocated resources never exceed a node's total and
//! are never negative. Placement: the preferred node (the owner's own) if
//! the request fits there now, else the fitting live node with the lowest
//! CPU utilisation. A request that no live node could fit even when idle is
//! infeasible: it waits and is reported, never dropped silently.

use std::collections::HashMap;

use shoal_proto::head::{InfeasibleRequest, Lease, LeaseRequest};
use shoal_proto::resources::CPU;
use shoal_proto::{JobId, LeaseId, NodeId, ResourceSet, WorkerId};

/// A live node as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The node.
    pub node_id: NodeId,
    /// Its address.
    pub address: String,
    /// Everything it offers.
    pub total: ResourceSet,
}

/// What became of a lease request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Granted.
    Granted(Lease),
    /// Fits some live node's total, but not its free resources now.
    Wait,
    /// No live node could fit it even when idle.
    Infeasible,
}

#[derive(Clone, Debug)]
struct LeaseEntry {
    node_id: NodeId,
    job_id: JobId,
    owner: WorkerId,
    resources: ResourceSet,
    /// Its worker waits on other tasks: its resources are lent back.
    blocked: bool,
}

/// The ledger of leases.
#[derive(Debug, Default)]
pub struct Scheduler {
    leases: HashMap<LeaseId, LeaseEntry>,
    allocated: HashMap<NodeId, ResourceSet>,
    infeasible: Vec<InfeasibleRequest>,
}

const INFEASIBLE_KEPT: usize = 100;
/// Quantities within this of each other are equal (float sums drift).
const EPSILON: f64 = 1e-9;

fn fits(request: &ResourceSet, free: impl Fn(&str) -> f64) -> bool {
    request
        .iter()
        .all(|(name, qty)| qty <= free(name) + EPSILON)
}

impl Scheduler {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn free(&self, node: &NodeView, name: &str) -> f64 {
        let used = self
            .allocated
            .get(&node.node_id)
            .map_or(0.0, |a| a.get(name));
        node.total.get(name) - used
    }

    /// Whether `resources` fit in what `node` has free now.
    fn has_room(&self, node: &NodeView, resources: &ResourceSet) -> bool {
        fits(resources, |r| self.free(node, r))
    }

    fn cpu_utilisation(&self, node: &NodeView) -> f64 {
        let total = node.total.get(CPU);
        if total <= 0.0 {
            return 1.0;
        }
        self.allocated
            .get(&node.node_id)
            .map_or(0.0, |a| a.get(CPU))
            / total
    }

    /// Tries to place `request` on one of `nodes` (the live nodes).
    pub fn request(&mut self, nodes: &[NodeView], request: &LeaseRequest) -> Decision {
        let can_ever_fit = nodes
            .iter()
            .any(|n| fits(&request.resources, |r| n.total.get(r)));
        if !can_ever_fit {
            self.note_infeasible(request);
            return Decision::Infeasible;
        }
        let fitting = |n: &&NodeView| self.has_room(n, &request.resources);
        let preferred = request
            .preferred_node
            .and_then(|id| nodes.iter().find(|n| n.node_id == id))
            .filter(fitting);
        let chosen = preferred.or_else(|| {
            nodes
                .iter()
                .filter(fitting)
                .min_by(|a, b| self.cpu_utilisation(a).total_cmp(&self.cpu_utilisation(b)))
        });
        let Some(node) = chosen else {
            return Decision::Wait;
        };
        let lease_id = LeaseId::random();
        self.allocated
            .entry(node.node_id)
            .or_default()
            .add(&request.resources);
        self.leases.insert(
            lease_id,
            LeaseEntry {
                node_id: node.node_id,
                job_id: request.job_id,
                owner: request.owner,
                resources: request.resources.clone(),
                blocked: false,
            },
        );
        let room_for_another = nodes.iter().any(|n| self.has_room(n, &request.resources));
        Decision::Granted(Lease {
            lease_id,
            node_id: node.node_id,
            node_address: node.address.clone(),
            resources: request.resources.clone(),
            room_for_another,
        })
    }

    fn note_infeasible(&mut self, request: &LeaseRequest) {
        let entry = InfeasibleRequest {
            job_id: request.job_id,
            resources: request.resources.clone(),
        };
        if !self.infeasible.contains(&entry) {
            if self.infeasible.len() >= INFEASIBLE_KEPT {
                self.infeasible.remove(0);
            }
            tracing::warn!(job_id = %request.job_id, resources = ?request.resources, "infeasible request: no live node has these resources; it waits");
            self.infeasible.push(entry);
        }
    }

    /// Returns a lease; false if it was unknown (already returned or reclaimed).
    pub fn release(&mut self, lease_id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&lease_id) else {
            return false;
        };
        if !lease.blocked {
            self.credit(lease.node_id, &lease.resources);
        }
        true
    }

    fn credit(&mut self, node_id: NodeId, resources: &ResourceSet) {
        if let Some(allocated) = self.allocated.get_mut(&node_id) {
            for (name, qty) in resources.iter() {
                let now = (allocated.get(name) - qty).max(0.0);
                allocated.set(name, now);
            }
        }
    }

    /// Marks a lease's worker blocked (its resources lent back to the node)
    /// or resumed (taken again, possibly past capacity until other leases
    /// end). Returns true if the state changed.
    pub fn set_blocked(&mut self, lease_id: LeaseId, blocked: bool) -> bool {
        let Some(lease) = self.leases.get_mut(&lease_id) else {
            return false;
        };
        if lease.blocked == blocked {
            return false;
        }
        lease.blocked = blocked;
        let (node_id, resources) = (lease.node_id, lease.resources.clone());
        if blocked {
            self.credit(node_id, &resources);
        } else {
            self.allocated.entry(node_id).or_default().add(&resources);
        }
        true
    }

    fn release_where(&mut self, pred: impl Fn(&LeaseEntry) -> bool) -> usize {
        let ids: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| pred(l))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.release(*id);
        }
        ids.len()
    }

    /// Moves a lease out of its job: a detached actor's lease is not
    /// reclaimed when the job that created it ends.
    pub fn detach(&mut self, lease_id: LeaseId) {
        if let Some(lease) = self.leases.get_mut(&lease_id) {
            lease.job_id = JobId::from_uuid(shoal_proto::ids::Uuid::nil());
        }
    }

    /// Reclaims every lease on a dead node.
    pub fn node_died(&mut self, node_id: NodeId) -> usize {
        let n = self.release_where(|l| l.node_id == node_id);
        self.allocated.remove(&node_id);
        n
    }

    /// Reclaims every lease of a finished job.
    pub fn job_finished(&mut self, job_id: JobId) -> usize {
        self.infeasible.retain(|r| r.job_id != job_id);
        self.release_where(|l| l.job_id == job_id)
    }

    /// Reclaims every lease held by a dead owner.
    pub fn owner_died(&mut self, owner: WorkerId) -> usize {
        self.release_where(|l| l.owner == owner)
    }

    /// Clears infeasible entries that some node in `nodes` can now fit.
    pub fn recheck_infeasible(&mut self, nodes: &[NodeView]) {
        self.infeasible.retain(|r| {
            !nodes
                .iter()
                .any(|n| fits(&r.resources, |name| n.total.get(name)))
        });
    }

    /// Free resources of `node` according to the ledger.
    pub fn available(&self, node: &NodeView) -> ResourceSet {
        node.total
            .iter()
            .map(|(name, _)| (name.to_string(), self.free(node, name).max(0.0)))
            .collect()
    }

    /// Requests waiting that no node can fit.
    pub fn infeasible(&self) -> &[InfeasibleRequest] {
        &self.infeasible
    }

    /// Leases outstanding.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(cpus: f64) -> NodeView {
        let mut total = ResourceSet::new();
        total.set(CPU, cpus);
        NodeView {
            node_id: NodeId::random(),
            address: "a".into(),
            total,
        }
    }

    fn request(cpus: f64) -> LeaseRequest {
        let mut resources = ResourceSet::new();
        resources.set(CPU, cpus);
        LeaseRequest {
            job_id: JobId::from_uuid(uuid_of(1)),
            owner: WorkerId::from_uuid(uuid_of(2)),
            resources,
            preferred_node: None,
            wait_ms: 0,
        }
    }

    fn uuid_of(n: u128) -> shoal_proto::ids::Uuid {
        shoal_proto::ids::Uuid::from_u128(n)
    }

    #[test]
    fn spreads_to_the_least_loaded_node() {
        let nodes = vec![node(2.0), node(2.0)];
        let mut s = Scheduler::new();
        let a = match s.request(&nodes, &request(1.0)) {
            Decision::Granted(l) => l,
            d => panic!("{d:?}"),
        };
        let b = match s.request(&nodes, &request(1.0)) {
            Decision::Granted(l) => l,
            d => panic!("{d:?}"),
        };
        assert_ne!(
            a.node_id, b.node_id,
            "the second lease goes to the idle node"
        );
    }

    #[test]
    fn a_grant_says_whether_another_of_its_shape_would_fit() {
        let nodes = vec![node(1.0), node(2.0)];
        let mut s = Scheduler::new();
        let room: Vec<bool> = (0..3)
            .map(|_| match s.request(&nodes, &request(1.0)) {
                Decision::Granted(l) => l.room_for_another,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(room, [true, true, false], "the third takes the last CPU");
    }

    #[test]
    fn prefers_the_owners_node_while_it_fits() {
        let nodes = vec![node(2.0), node(2.0)];
        let mut s = Scheduler::new();
        let mut r = request(1.0);
        r.preferred_node = Some(nodes[1].node_id);
        for _ in 0..2 {
            match s.request(&nodes, &r) {
                Decision::Granted(l) => assert_eq!(l.node_id, nodes[1].node_id),
                d => panic!("{d:?}"),
            }
        }
        match s.request(&nodes, &r) {
            Decision::Granted(l) => assert_eq!(l.node_id, nodes[0].node_id, "full: spill over"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn waits_when_full_and_grants_after_release() {
        let nodes = vec![node(1.0)];
        let mut s = Scheduler::new();
        let Decision::Granted(l) = s.request(&nodes, &request(1.0)) else {
            panic!("first fits")
        };
        assert_eq!(s.request(&nodes, &request(1.0)), Decision::Wait);
        assert!(s.release(l.lease_id));
        assert!(!s.release(l.lease_id), "double release is a no-op");
        assert!(matches!(
            s.request(&nodes, &request(1.0)),
            Decision::Granted(_)
        ));
    }

    #[test]
    fn infeasible_requests_are_reported_not_dropped() {
        let nodes = vec![node(2.0)];
        let mut s = Scheduler::new();
        assert_eq!(s.request(&nodes, &request(4.0)), Decision::Infeasible);
        assert_eq!(s.request(&nodes, &request(4.0)), Decision::Infeasible);
        assert_eq!(s.infeasible().len(), 1, "reported once");
        let mut custom = request(1.0);
        custom.resources.set("GPU", 1.0);
        assert_eq!(s.request(&nodes, &custom), Decision::Infeasible);
        assert_eq!(s.infeasible().len(), 2);
        s.recheck_infeasible(&[node(8.0)]);
        assert_eq!(
            s.infeasible().len(),
            1,
            "the CPU request fits a bigger node now"
        );
    }

    #[test]
    fn a_blocked_lease_lends_its_resources_back() {
        let nodes = vec![node(1.0)];
        let mut s = Scheduler::new();
        let Decision::Granted(parent) = s.request(&nodes, &request(1.0)) else {
            panic!("fits")
        };
        assert_eq!(s.request(&nodes, &request(1.0)), Decision::Wait);
        assert!(s.set_blocked(parent.lease_id, true));
        assert!(!s.set_blocked(parent.lease_id, true), "idempotent");
        let Decision::Granted(child) = s.request(&nodes, &request(1.0)) else {
            panic!("lent CPU")
        };
        assert!(s.set_blocked(parent.lease_id, false));
        assert!(
            s.available(&nodes[0]).get(CPU) <= 0.0,
            "oversubscribed while both run"
        );
        assert!(s.release(child.lease_id));
        assert!(s.release(parent.lease_id));
        assert_eq!(
            s.available(&nodes[0]).get(CPU),
            1.0,
            "back to exactly the capacity"
        );
    }

    #[test]
    fn node_death_and_job_end_reclaim_leases() {
        let nodes = vec![node(4.0)];
        let mut s = Scheduler::new();
        for _ in 0..3 {
            assert!(matches!(
                s.request(&nodes, &request(1.0)),
                Decision::Granted(_)
            ));
        }
        assert_eq!(s.available(&nodes[0]).get(CPU), 1.0);
        assert_eq!(s.job_finished(request(1.0).job_id), 3);
        assert_eq!(s.available(&nodes[0]).get(CPU), 4.0);
        assert!(matches!(
            s.request(&nodes, &request(1.0)),
            Decision::Granted(_)
        ));
        assert_eq!(s.node_died(nodes[0].node_id), 1);
        assert_eq!(s.lease_count(), 0);
    }

    proptest! {
        /// Whatever the sequence of grants and releases, allocations never
        /// exceed capacity and are never negative.
        #[test]
        fn ledger_never_overcommits(ops in proptest::collection::vec((0u8..3, 0.0f64..3.0), 1..200)) {
            let nodes = vec![node(2.0), node(3.0)];
            let mut s = Scheduler::new();
            let mut held: Vec<LeaseId> = Vec::new();
            for (op, qty) in ops {
                match op {
                    0 | 1 => {
                        if let Decision::Granted(l) = s.request(&nodes, &request(qty)) {
                            held.push(l.lease_id);
                        }
                    }
                    _ => {
                        if let Some(id) = held.pop() {
                            prop_assert!(s.release(id));
                        }
                    }
                }
                for n in &nodes {
                    let free = s.available(n).get(CPU);
                    prop_assert!(free >= 0.0 && free <= n.total.get(CPU) + EPSILON);
                }
            }
        }
    }
}
