//! What the head writes to its store, what a restarted head reloads from
//! it, and how the nodes that outlived the old head join the new one.
//!
//! Kept: jobs, actors (records, specs, names), the live nodes, executables
//! and the key-value table. Not kept, because the nodes hold it and tell a
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
use shoal_proto::{JobId, NodeId};
use tracing::{info, warn};

use crate::actors::{ActorRecord, Died};
use crate::api::State;
use crate::jobs::{Binaries, JobRecord};
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

fn id_key<T: AsRef<[u8]>>(id: T) -> Vec<u8> {
    id.as_ref().to_vec()
}

fn parse_id(bytes: &[u8]) -> Option<shoal_proto::ids::Uuid> {
    shoal_proto::ids::Uuid::from_slice(bytes).ok()
}

impl State {
    /// Everything changed since the last call, as one batch for the store.
    pub(crate) fn journal(&mut self, binaries: &mut Binaries) -> Vec<Write> {
        let mut writes = Vec::new();
        let row = |table, key: Vec<u8>, value: Option<Vec<u8>>| match value {
            Some(v) => Write::Put(table, key, v),
            None => Write::Delete(table, key),
        };
        for (id, record) in self.jobs.take_dirty() {
            writes.push(row(
                Table::Jobs,
                id_key(id.as_bytes()),
                record.map(|r| encode(&r)),
            ));
        }
        for (id, record) in self.actors.take_dirty() {
            writes.push(row(
                Table::Actors,
                id_key(id.as_bytes()),
                record.map(|r| encode(&r)),
            ));
        }
        for (id, node) in self.membership.take_dirty() {
            writes.push(row(
                Table::Nodes,
                id_key(id.as_bytes()),
                node.map(|n| encode(&n)),
            ));
        }
        for (key, value) in self.kv.take_dirty() {
            writes.push(row(Table::Kv, key, value));
        }
        for (hash, size) in binaries.take_dirty() {
            writes.push(row(
                Table::Binaries,
                hash.into_bytes(),
                size.map(|s| encode(&s)),
            ));
        }
        writes
    }

    /// Reloads the tables of a head that died, as the head's first act.
    /// The incarnation it returns is written with the next journal.
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
        for (key, _) in rows(Table::Binaries) {
            let Ok(hash) = std::str::from_utf8(key) else {
                continue;
            };
            match binaries.restore(hash) {
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

    /// Writes the incarnation with the next journal (once).
    pub(crate) fn incarnation_write(&mut self) -> Option<Write> {
        std::mem::take(&mut self.incarnation_dirty)
            .then(|| Write::Put(Table::Meta, INCARNATION.to_vec(), encode(&self.incarnation)))
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
