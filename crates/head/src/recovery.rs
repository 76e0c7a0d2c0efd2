//! What the head writes to its store, what a restarted head reloads from
//! it, and how the nodes that outlived the old head join the new one.
//!
//! Kept: jobs, actors (records, specs, names), the live nodes, executables,
//! the key-value table and placement groups (what they asked for: a
//! restarted head reserves their bundles again). Not kept, because the nodes hold it and tell a
//! restarted head: the resource ledger (the leases their workers hold), the
//! object directory (the copies in their stores), which workers live.
//!
//! A restarted head reloads the tables, then:
//! - counts every node alive when it died as alive still, and answers its
//!   next heartbeat with `RejoinAsked`; the node sends what it holds
//!   ([`State::rejoin`]) and keeps its id. A node that does not come back
//!   within a grace (two QUIC idle timeouts: the longest a node takes to
//!   notice the old head is gone, when no stateless reset told it sooner)
//!   plus the node timeout is declared dead as usual (its actors restart
//!   or die). The old head's own node died with it: it is dead at once.
//! - grants no lease until every such node has rejoined or been declared
//!   dead, so the ledger is whole before it places anything.
//! - keeps the running jobs running for [`DRIVER_GRACE`], for their
//!   drivers to connect again (a driver's job then ends with its new
//!   connection, as before); a job whose driver does not come back ends.

use std::time::{Duration, Instant};

use shoal_proto::head::{RegisterNode, RejoinNode};
use shoal_proto::placement::PlacementGroupSpec;
use shoal_proto::{JobId, NodeId};
use tracing::{info, warn};

use crate::actors::{ActorRecord, Died};
use crate::api::State;
use crate::binaries::Binaries;
use crate::jobs::JobRecord;
use crate::membership::Fenced;
use crate::store::{decode, encode, Snapshot, Table, Write};

/// How long a restarted head keeps reloaded jobs running for their drivers
/// to connect again, at least.
pub const DRIVER_GRACE: Duration = Duration::from_secs(30);

/// The key of the head's incarnation in [`Table::Meta`].
const INCARNATION: &[u8] = b"incarnation";

/// Most objects taken from one node's rejoin.
const REJOIN_OBJECTS_MAX: usize = 1_000_000;

/// What a restarted head reloaded.
#[derive(Debug, Default)]
pub struct Restored {
    /// This head's incarnation (1 for the first head of a store).
    pub incarnation: u64,
    /// Jobs still running.
    pub running_jobs: usize,
    /// Actors not dead.
    pub live_actors: usize,
    /// Nodes asked to join again.
    pub nodes_awaited: usize,
    /// Executables reloaded.
    pub binaries: usize,
    /// Key-value entries.
    pub kv_entries: usize,
}

/// A changed row: its value, or `None` when it is gone.
fn row(table: Table, key: Vec<u8>, value: Option<Vec<u8>>) -> Write {
    match value {
        Some(v) => Write::Put(table, key, v),
        None => Write::Delete(table, key),
    }
}

/// The rows of records changed under ids.
fn records<'a, R: serde::Serialize + 'a>(
    table: Table,
    changed: impl IntoIterator<Item = (&'a [u8; 16], Option<R>)> + 'a,
) -> impl Iterator<Item = Write> + 'a {
    changed
        .into_iter()
        .map(move |(id, record)| row(table, id.to_vec(), record.map(|r| encode(&r))))
}

fn parse_id(bytes: &[u8]) -> Option<shoal_proto::ids::Uuid> {
    shoal_proto::ids::Uuid::from_slice(bytes).ok()
}

impl State {
    /// Everything changed since the last call, as one batch for the store.
    /// Executables' rows come from `binaries` when given.
    pub(crate) fn journal(&mut self, binaries: Option<&mut Binaries>) -> Vec<Write> {
        let mut writes = Vec::new();
        if std::mem::take(&mut self.incarnation_dirty) {
            let value = encode(&self.incarnation);
            writes.push(Write::Put(Table::Meta, INCARNATION.to_vec(), value));
        }
        let jobs = self.jobs.take_dirty();
        writes.extend(records(
            Table::Jobs,
            jobs.iter().map(|(id, r)| (id.as_bytes(), r.as_ref())),
        ));
        let actors = self.actors.take_dirty();
        writes.extend(records(
            Table::Actors,
            actors.iter().map(|(id, r)| (id.as_bytes(), r.as_ref())),
        ));
        let nodes = self.membership.take_dirty();
        writes.extend(records(
            Table::Nodes,
            nodes.iter().map(|(id, n)| (id.as_bytes(), n.as_ref())),
        ));
        for (key, value) in self.kv.take_dirty() {
            writes.push(row(Table::Kv, key, value));
        }
        let groups = self.groups.take_dirty();
        writes.extend(records(
            Table::Groups,
            groups
                .iter()
                .map(|(id, spec)| (id.as_bytes(), spec.as_ref())),
        ));
        for (hash, value) in binaries.map(Binaries::take_dirty).unwrap_or_default() {
            writes.push(row(Table::Binaries, hash.into_bytes(), value));
        }
        writes
    }

    /// Reloads the tables of a head that died (or of none, for a new
    /// cluster), as the head's first act. The incarnation it returns is
    /// written with the next journal.
    pub(crate) fn restore(
        &mut self,
        snapshot: &Snapshot,
        binaries: &mut Binaries,
        now: Instant,
        rejoin_grace: Duration,
    ) -> Restored {
        let mut restored = Restored::default();
        let rows = |table| snapshot.get(&table).map(Vec::as_slice).unwrap_or_default();
        let before = rows(Table::Meta)
            .iter()
            .find(|(k, _)| k == INCARNATION)
            .and_then(|(_, v)| decode::<u64>(Table::Meta, v))
            .unwrap_or(0);
        restored.incarnation = before + 1;
        for (key, value) in rows(Table::Jobs) {
            let (Some(id), Some(record)) = (parse_id(key), decode::<JobRecord>(Table::Jobs, value))
            else {
                continue;
            };
            restored.running_jobs += usize::from(record.running);
            self.jobs.restore(JobId::from_uuid(id), record);
        }
        for (_, value) in rows(Table::Actors) {
            if let Some(record) = decode::<ActorRecord>(Table::Actors, value) {
                restored.live_actors +=
                    usize::from(record.info.state != shoal_proto::ActorState::Dead);
                self.actors.restore(record);
            }
        }
        for (key, value) in rows(Table::Kv) {
            self.kv.restore(key, value.clone());
            restored.kv_entries += 1;
        }
        // Placed again once the ledger is whole (the nodes' leases told).
        for (_, value) in rows(Table::Groups) {
            if let Some(spec) = decode::<PlacementGroupSpec>(Table::Groups, value) {
                if self.groups.add(&spec).is_ok() {
                    self.scheduler.add_group(&spec);
                }
            }
        }
        for (key, value) in rows(Table::Binaries) {
            let Ok(hash) = std::str::from_utf8(key) else {
                continue;
            };
            match binaries.restore(hash, value) {
                Ok(()) => restored.binaries += 1,
                Err(e) => {
                    warn!(error = %e, "an executable of the old head is gone; drivers upload it again")
                }
            }
        }
        let mut head_nodes = Vec::new();
        for (key, value) in rows(Table::Nodes) {
            let (Some(id), Some(node)) =
                (parse_id(key), decode::<RegisterNode>(Table::Nodes, value))
            else {
                continue;
            };
            let id = NodeId::from_uuid(id);
            let is_head_node = node.is_head_node;
            // Counted as heard from until the grace ends: a node may take
            // that long to notice the old head is gone and dial this one.
            if self
                .membership
                .register(id, node, now + rejoin_grace)
                .is_err()
            {
                continue;
            }
            if is_head_node {
                head_nodes.push(id);
            } else {
                self.rejoining.insert(id);
            }
        }
        restored.nodes_awaited = self.rejoining.len();
        // The old head's own node ran in its process, and died with it.
        for id in head_nodes {
            self.membership.unregister(id);
            self.node_gone(id);
        }
        self.drivers_until = Some(now + DRIVER_GRACE);
        self.incarnation = restored.incarnation;
        self.incarnation_dirty = true;
        restored
    }

    /// A node that outlived the old head joins this one under its id, with
    /// what it holds. Returns the actors that died while the head was away
    /// (their workers are gone). `Fenced`: this head does not count the
    /// node as one to wait for (it was declared dead, or never known); it
    /// must join as a new node.
    pub(crate) fn rejoin(&mut self, node: RejoinNode, now: Instant) -> Result<Vec<Died>, Fenced> {
        let id = node.node_id;
        if !self.rejoining.remove(&id) {
            // The same rejoin again (its reply was lost): it is a member.
            return match self.membership.state(id) {
                Some(shoal_proto::NodeState::Alive) => Ok(Vec::new()),
                _ => Err(Fenced(id)),
            };
        }
        // Heard from: its silence is counted from now.
        let _ = self
            .membership
            .heartbeat(id, node.node.resources_total.clone(), 0, now);
        let mut adopted = 0;
        for lease in &node.leases {
            if lease.detached || self.jobs.is_running(lease.job_id) {
                self.scheduler.adopt(id, lease);
                adopted += 1;
            } else {
                // Its job ended while the head was away.
                self.orders.entry(id).or_default().release(lease.lease_id);
            }
        }
        let objects = &node.objects[..node.objects.len().min(REJOIN_OBJECTS_MAX)];
        let orphans = self.objects.apply(id, objects);
        for (holder, object) in orphans {
            self.orders.entry(holder).or_default().delete(object);
        }
        let died = self.actors.gone_from(id, &node.workers);
        info!(node_id = %id, leases = adopted, objects = objects.len(), workers = node.workers.len(), actors_lost = died.len(), "node joined the restarted head again");
        Ok(died)
    }

    /// Ends the wait for drivers of reloaded jobs, once it is over: the
    /// jobs whose driver did not connect again.
    pub(crate) fn drivers_gone(&mut self, now: Instant) -> Vec<JobId> {
        match self.drivers_until {
            Some(until) if now >= until => {
                self.drivers_until = None;
                self.jobs.unattached()
            }
            _ => Vec::new(),
        }
    }

    /// True while the ledger may be missing leases: nodes of the old head
    /// have not all joined again (or been declared dead).
    pub(crate) fn recovering(&self) -> bool {
        !self.rejoining.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use shoal_proto::head::{ActorSpec, HeldLease, RegisterJob};
    use shoal_proto::{ActorInfo, ActorState, Address, LeaseId, ResourceSet, WorkerId};

    use super::*;

    fn cpus(n: f64) -> ResourceSet {
        let mut r = ResourceSet::new();
        r.set("CPU", n);
        r
    }

    fn node(is_head_node: bool) -> RegisterNode {
        RegisterNode {
            address: "198.18.0.2:7000".into(),
            pid: 1,
            hostname: "h".into(),
            host_id: "h".into(),
            resources_total: cpus(2.0),
            is_head_node,
            registration_key: if is_head_node { 8 } else { 7 },
            object_store_capacity_bytes: 1 << 20,
            metrics_address: None,
            labels: Default::default(),
        }
    }

    fn address() -> Address {
        Address {
            worker_id: WorkerId::random(),
            address: "198.18.0.2:7001".into(),
        }
    }

    fn detached_actor(node_id: NodeId, job_id: JobId) -> ActorInfo {
        ActorInfo {
            actor_id: shoal_proto::ActorId::random(),
            class: "Counter".into(),
            name: Some("counter".into()),
            namespace: "ns".into(),
            detached: true,
            job_id,
            node_id,
            node_address: "198.18.0.2:7000".into(),
            worker: address(),
            pid: 2,
            lease_id: LeaseId::random(),
            state: ActorState::Alive,
            max_pending_calls: None,
            incarnation: 0,
            max_restarts: 1,
            num_restarts: 0,
            max_task_retries: 0,
        }
    }

    fn spec() -> ActorSpec {
        ActorSpec {
            args: Vec::new(),
            max_concurrency: 1,
            resources: cpus(1.0),
            owner: WorkerId::random(),
            placement: Default::default(),
            env: Default::default(),
        }
    }

    /// What a store holds after `writes`, as it loads it.
    fn apply(snapshot: &mut Snapshot, writes: Vec<Write>) {
        let mut tables: HashMap<Table, HashMap<Vec<u8>, Vec<u8>>> = HashMap::new();
        for (table, rows) in snapshot.drain() {
            tables.insert(table, rows.into_iter().collect());
        }
        for write in writes {
            match write {
                Write::Put(t, k, v) => {
                    tables.entry(t).or_default().insert(k, v);
                }
                Write::Delete(t, k) => {
                    tables.entry(t).or_default().remove(&k);
                }
            }
        }
        for (table, rows) in tables {
            snapshot.insert(table, rows.into_iter().collect());
        }
    }

    /// A head's tables written as it would, then reloaded by a new head.
    fn restart(
        old: &mut State,
        snapshot: &mut Snapshot,
        binaries: &mut Binaries,
        now: Instant,
    ) -> (State, Restored) {
        let writes = old.journal(Some(binaries));
        apply(snapshot, writes);
        let mut new = State::new(100, 100);
        let restored = new.restore(snapshot, binaries, now, Duration::from_secs(1));
        (new, restored)
    }

    #[test]
    fn a_restarted_head_keeps_its_tables_and_takes_its_nodes_back_with_what_they_hold() {
        let now = Instant::now();
        let mut binaries = Binaries::default();
        let mut snapshot = Snapshot::new();
        let mut old = State::new(100, 100);
        let first = old.restore(&snapshot, &mut binaries, now, Duration::from_secs(1));
        assert_eq!(first.incarnation, 1);

        let job = old.jobs.register(
            &RegisterJob {
                driver_pid: 1,
                binary_hash: "ab".repeat(32),
                binary_size: 1,
                driver: address(),
                job_id: None,
            },
            11,
        );
        let worker_node = NodeId::random();
        let head_node = NodeId::random();
        old.membership
            .register(worker_node, node(false), now)
            .expect("node");
        old.membership
            .register(head_node, node(true), now)
            .expect("head node");
        let actor = detached_actor(worker_node, job);
        old.actors.register(actor.clone(), spec()).expect("actor");
        old.kv.put("ns", b"k", b"v".to_vec(), true).expect("kv");

        let (mut new, restored) = restart(&mut old, &mut snapshot, &mut binaries, now);
        assert_eq!(restored.incarnation, 2);
        assert_eq!(restored.running_jobs, 1);
        assert_eq!(restored.live_actors, 1);
        assert_eq!(
            restored.nodes_awaited, 1,
            "the head's own node died with it"
        );
        assert!(new.jobs.is_running(job));
        assert_eq!(new.jobs.unattached(), vec![job], "until its driver is back");
        assert_eq!(
            new.actors.named("ns", "counter").map(|a| a.actor_id),
            Some(actor.actor_id)
        );
        assert_eq!(new.kv.get("ns", b"k"), Some(&b"v".to_vec()));
        assert_eq!(
            new.membership.state(head_node),
            Some(shoal_proto::NodeState::Dead)
        );
        assert!(new.recovering(), "no lease before the node is back");

        // A node the head does not wait for must join as a new node.
        let stranger = RejoinNode {
            node_id: NodeId::random(),
            node: node(false),
            leases: Vec::new(),
            workers: Vec::new(),
            objects: Vec::new(),
        };
        assert!(new.rejoin(stranger, now).is_err());

        // The node comes back with the actor's lease and an ended job's;
        // the actor's worker died while the head was away.
        let held = |lease_id, job_id, detached| HeldLease {
            lease_id,
            job_id,
            owner: Some(WorkerId::random()),
            owner_node: None,
            resources: cpus(1.0),
            blocked: false,
            detached,
        };
        let stale = LeaseId::random();
        let rejoin = RejoinNode {
            node_id: worker_node,
            node: node(false),
            leases: vec![
                held(actor.lease_id, job, true),
                held(stale, JobId::random(), false),
            ],
            workers: Vec::new(),
            objects: Vec::new(),
        };
        let died = new
            .rejoin(rejoin.clone(), now)
            .expect("the node is taken back");
        assert!(!new.recovering());
        assert_eq!(
            new.scheduler.lease_count(),
            1,
            "the actor's lease, not the ended job's"
        );
        assert_eq!(
            new.orders.get(&worker_node).map(|o| o.pending().releases),
            Some(vec![stale]),
            "the node is told to stop the ended job's worker"
        );
        assert_eq!(died.len(), 1);
        assert_eq!(died[0].info.state, ActorState::Restarting);
        // The same rejoin again (its reply lost) changes nothing.
        assert!(new.rejoin(rejoin, now).expect("again").is_empty());

        // What changed is written, and a third head sees it.
        let (third, restored) = restart(&mut new, &mut snapshot, &mut binaries, now);
        assert_eq!(restored.incarnation, 3);
        let reloaded = third.actors.get(actor.actor_id).expect("the actor");
        assert_eq!(reloaded.state, ActorState::Restarting);
        assert!(
            reloaded.incarnation > died[0].info.incarnation,
            "a restart under way is placed again under a new incarnation"
        );
    }

    #[test]
    fn a_restarted_head_keeps_its_placement_groups_and_places_them_again() {
        use shoal_proto::placement::{GroupState, PlacementGroupSpec, PlacementStrategy};
        let now = Instant::now();
        let mut binaries = Binaries::default();
        let mut snapshot = Snapshot::new();
        let mut old = State::new(100, 100);
        old.restore(&snapshot, &mut binaries, now, Duration::from_secs(1));
        let spec = |name: &str| PlacementGroupSpec {
            group_id: shoal_proto::PlacementGroupId::random(),
            job_id: JobId::random(),
            name: Some(name.into()),
            detached: true,
            strategy: PlacementStrategy::StrictSpread,
            bundles: vec![cpus(1.0)],
        };
        let (kept, removed) = (spec("kept"), spec("removed"));
        for g in [&kept, &removed] {
            old.groups.add(g).expect("added");
            old.scheduler.add_group(g);
        }
        assert!(old.remove_group(removed.group_id));
        let (new, _) = restart(&mut old, &mut snapshot, &mut binaries, now);
        assert_eq!(new.groups.named("kept"), Some(kept.group_id));
        assert_eq!(
            new.groups.named("removed"),
            None,
            "a removed group's row went"
        );
        let info = new.group_info(kept.group_id).expect("reloaded");
        assert_eq!(
            info.state,
            GroupState::Pending,
            "placed again once nodes are back"
        );
        assert_eq!(new.scheduler.groups_to_place(), vec![kept.group_id]);
    }
}
