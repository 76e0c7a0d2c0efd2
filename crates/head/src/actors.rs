//! The actor directory: where every actor lives, names per namespace,
//! which actors end with their job, and which restart when their worker
//! dies.
//!
//! A restart is a new incarnation: the actor waits in `Restarting` for a
//! lease, the lease's node is ordered to run the constructor again (on its
//! next heartbeat), and its report makes the actor `Alive` at the new
//! worker. Reports for any other incarnation are ignored.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use shoal_proto::head::ActorSpec;
use shoal_proto::{ActorId, ActorInfo, ActorState, Address, JobId, LeaseId, NodeId, WorkerId};

/// Why an actor could not be registered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActorError {
    /// Another live actor has the name in the namespace.
    #[error("an actor named {name:?} already exists in namespace {namespace:?}")]
    NameTaken {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
    /// The directory is full.
    #[error("the cluster already has {0} actors")]
    TooMany(usize),
}

/// Actors remembered at most (live and dead).
const ACTORS_MAX: usize = 100_000;

/// An actor whose worker or node died, as the directory decided.
#[derive(Debug)]
pub struct Died {
    /// The actor after the decision (dead, or restarting).
    pub info: ActorInfo,
    /// The lease its old worker held, to release.
    pub lease_id: LeaseId,
}

/// A restart placed on a node, waiting for the node's report.
#[derive(Clone, Debug)]
pub struct Placed {
    /// The node ordered to create it.
    pub node_id: NodeId,
    /// The lease its new worker holds.
    pub lease_id: LeaseId,
}

/// The directory.
#[derive(Debug, Default)]
pub struct Actors {
    actors: HashMap<ActorId, ActorInfo>,
    names: HashMap<(String, String), ActorId>,
    /// Creation specs of actors that may restart.
    specs: HashMap<ActorId, ActorSpec>,
    /// Restarting actors waiting for a lease, oldest first.
    waiting: VecDeque<ActorId>,
    /// Restarting actors whose new worker is being created.
    placed: HashMap<ActorId, Placed>,
    /// Actors changed since [`Actors::take_dirty`].
    dirty: HashSet<ActorId>,
}

/// An actor as the head's store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActorRecord {
    /// Its record.
    pub info: ActorInfo,
    /// Its creation spec, kept while it may restart.
    pub spec: Option<ActorSpec>,
}

impl Actors {
    /// Records a new actor (alive); its name must be free. The spec is kept
    /// when the actor may restart.
    pub fn register(&mut self, mut info: ActorInfo, spec: ActorSpec) -> Result<(), ActorError> {
        // A retried registration (its reply lost) changes nothing: the
        // actor may have died or restarted since the first.
        if self.actors.contains_key(&info.actor_id) {
            return Ok(());
        }
        if self.actors.len() >= ACTORS_MAX {
            let dirty = &mut self.dirty;
            self.actors.retain(|id, a| {
                let keep = a.state == ActorState::Alive;
                if !keep {
                    dirty.insert(*id);
                }
                keep
            });
            if self.actors.len() >= ACTORS_MAX {
                return Err(ActorError::TooMany(ACTORS_MAX));
            }
        }
        if let Some(name) = &info.name {
            let key = (info.namespace.clone(), name.clone());
            if let Some(other) = self.names.get(&key) {
                if *other != info.actor_id {
                    return Err(ActorError::NameTaken {
                        namespace: key.0,
                        name: key.1,
                    });
                }
            }
            self.names.insert(key, info.actor_id);
        }
        info.state = ActorState::Alive;
        info.incarnation = 0;
        info.num_restarts = 0;
        if info.max_restarts > 0 {
            self.specs.insert(info.actor_id, spec);
        }
        self.dirty.insert(info.actor_id);
        self.actors.insert(info.actor_id, info);
        Ok(())
    }

    /// An actor reloaded from the store by a restarted head. A restart
    /// that was under way is placed again under a new incarnation (a
    /// report from the old attempt does not count).
    pub fn restore(&mut self, record: ActorRecord) {
        let ActorRecord { mut info, spec } = record;
        let id = info.actor_id;
        if info.state != ActorState::Dead {
            if let Some(name) = &info.name {
                self.names
                    .insert((info.namespace.clone(), name.clone()), id);
            }
        }
        if let Some(spec) = spec {
            self.specs.insert(id, spec);
        }
        if info.state == ActorState::Restarting {
            info.incarnation += 1;
            self.waiting.push_back(id);
            self.dirty.insert(id);
        }
        self.actors.insert(id, info);
    }

    /// The actors changed since the last call, each with its record
    /// (`None`: forgotten).
    pub fn take_dirty(&mut self) -> Vec<(ActorId, Option<ActorRecord>)> {
        let dirty: Vec<ActorId> = self.dirty.drain().collect();
        dirty
            .into_iter()
            .map(|id| {
                let record = self.actors.get(&id).map(|info| ActorRecord {
                    info: info.clone(),
                    spec: self.specs.get(&id).cloned(),
                });
                (id, record)
            })
            .collect()
    }

    /// Live actors on `node` whose worker is not among `workers`: they
    /// died while the head was away (a node joining a restarted head).
    pub fn gone_from(&mut self, node: NodeId, workers: &[WorkerId]) -> Vec<Died> {
        self.died_where(|a| a.node_id == node && !workers.contains(&a.worker.worker_id))
    }
    /// The live actor holding `lease_id`, if any.
    pub fn with_lease(&self, lease_id: LeaseId) -> Option<ActorId> {
        self.actors
            .values()
            .find(|a| a.state == ActorState::Alive && a.lease_id == lease_id)
            .map(|a| a.actor_id)
    }

    /// The actor, alive or not.
    pub fn get(&self, actor_id: ActorId) -> Option<&ActorInfo> {
        self.actors.get(&actor_id)
    }

    /// The live (or restarting) actor with this name.
    pub fn named(&self, namespace: &str, name: &str) -> Option<&ActorInfo> {
        let id = self.names.get(&(namespace.to_string(), name.to_string()))?;
        self.actors.get(id).filter(|a| a.state != ActorState::Dead)
    }

    /// Marks an actor dead and frees its name; returns it, and the leases it
    /// held (its worker's, and a restart's), if it was not dead already.
    pub fn kill(&mut self, actor_id: ActorId) -> Option<(ActorInfo, Vec<LeaseId>)> {
        let actor = self.actors.get_mut(&actor_id)?;
        if actor.state == ActorState::Dead {
            return None;
        }
        let mut leases = Vec::new();
        if actor.state == ActorState::Alive {
            leases.push(actor.lease_id);
        }
        actor.state = ActorState::Dead;
        let info = actor.clone();
        self.dirty.insert(actor_id);
        if let Some(name) = &info.name {
            self.names.remove(&(info.namespace.clone(), name.clone()));
        }
        self.specs.remove(&actor_id);
        self.waiting.retain(|id| *id != actor_id);
        if let Some(placed) = self.placed.remove(&actor_id) {
            leases.push(placed.lease_id);
        }
        Some((info, leases))
    }

    /// The actor's worker (or node) died: it restarts if it has restarts
    /// left, otherwise it is dead.
    fn died(&mut self, actor_id: ActorId) -> Option<Died> {
        let actor = self.actors.get_mut(&actor_id)?;
        if actor.state != ActorState::Alive {
            return None;
        }
        let lease_id = actor.lease_id;
        if actor.num_restarts < actor.max_restarts && self.specs.contains_key(&actor_id) {
            actor.state = ActorState::Restarting;
            actor.num_restarts += 1;
            actor.incarnation += 1;
            self.waiting.push_back(actor_id);
            self.dirty.insert(actor_id);
            return Some(Died {
                info: actor.clone(),
                lease_id,
            });
        }
        let (info, _) = self.kill(actor_id)?;
        Some(Died { info, lease_id })
    }

    fn died_where(&mut self, pred: impl Fn(&ActorInfo) -> bool) -> Vec<Died> {
        let ids: Vec<ActorId> = self
            .actors
            .values()
            .filter(|a| a.state == ActorState::Alive && pred(a))
            .map(|a| a.actor_id)
            .collect();
        ids.into_iter().filter_map(|id| self.died(id)).collect()
    }

    /// Actors on `node` whose worker exited, as that node reports: another
    /// node's report of them is not taken.
    pub fn workers_died(&mut self, node: NodeId, workers: &[WorkerId]) -> Vec<Died> {
        self.died_where(|a| a.node_id == node && workers.contains(&a.worker.worker_id))
    }

    /// Actors on a dead node; restarts placed there are placed again (their
    /// leases there are gone with the node). Returns the actors that died.
    pub fn node_died(&mut self, node: NodeId) -> Vec<Died> {
        let lost: Vec<ActorId> = self
            .placed
            .iter()
            .filter(|(_, p)| p.node_id == node)
            .map(|(id, _)| *id)
            .collect();
        for actor_id in lost {
            self.placed.remove(&actor_id);
            if let Some(actor) = self.actors.get_mut(&actor_id) {
                // A report from the lost attempt must not count.
                actor.incarnation += 1;
                self.waiting.push_back(actor_id);
                self.dirty.insert(actor_id);
            }
        }
        self.died_where(|a| a.node_id == node)
    }

    /// The job's actors that are not detached: ended, with the leases they
    /// held.
    pub fn job_finished(&mut self, job: JobId) -> Vec<(ActorInfo, Vec<LeaseId>)> {
        let ids: Vec<ActorId> = self
            .actors
            .values()
            .filter(|a| a.state != ActorState::Dead && a.job_id == job && !a.detached)
            .map(|a| a.actor_id)
            .collect();
        ids.into_iter().filter_map(|id| self.kill(id)).collect()
    }

    /// The actors not dead whose spec places them in placement group
    /// `group` (only restartable actors keep a spec: the others are found
    /// by their lease).
    pub fn in_group(&self, group: shoal_proto::PlacementGroupId) -> Vec<ActorId> {
        self.specs
            .iter()
            .filter(|(id, spec)| {
                matches!(
                    spec.placement.strategy,
                    shoal_proto::placement::Strategy::PlacementGroup { group: g, .. } if g == group
                ) && self
                    .actors
                    .get(id)
                    .is_some_and(|a| a.state != ActorState::Dead)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Restarting actors waiting for a lease, with their specs.
    pub fn waiting(&self) -> Vec<(ActorInfo, ActorSpec)> {
        self.waiting
            .iter()
            .filter_map(|id| Some((self.actors.get(id)?.clone(), self.specs.get(id)?.clone())))
            .collect()
    }

    /// A waiting restart got a lease: its node is ordered to create it.
    pub fn place(&mut self, actor_id: ActorId, placed: Placed) {
        self.waiting.retain(|id| *id != actor_id);
        self.placed.insert(actor_id, placed);
    }

    /// A node's report on a restart it was ordered to run: the new worker
    /// and its pid, or `None` when the node could not create the actor (the
    /// caller logs why). Returns the leases to release (the restart's, when
    /// it failed or was stale) and the actor as it now stands.
    pub fn restarted(
        &mut self,
        node_id: NodeId,
        node_address: &str,
        actor_id: ActorId,
        incarnation: u32,
        created: Option<(Address, u32)>,
    ) -> (Option<ActorInfo>, Vec<LeaseId>) {
        // The same report again (its reply was lost): accepted again.
        if let (Some(actor), Some((worker, _))) = (self.actors.get(&actor_id), &created) {
            if actor.state == ActorState::Alive
                && actor.incarnation == incarnation
                && actor.node_id == node_id
                && actor.worker == *worker
            {
                return (Some(actor.clone()), Vec::new());
            }
        }
        let current = self
            .actors
            .get(&actor_id)
            .is_some_and(|a| a.state == ActorState::Restarting && a.incarnation == incarnation)
            && self
                .placed
                .get(&actor_id)
                .is_some_and(|p| p.node_id == node_id);
        if !current {
            return (None, Vec::new());
        }
        let Some(placed) = self.placed.remove(&actor_id) else {
            return (None, Vec::new());
        };
        match created {
            Some((worker, pid)) => {
                let Some(actor) = self.actors.get_mut(&actor_id) else {
                    return (None, vec![placed.lease_id]);
                };
                actor.state = ActorState::Alive;
                actor.node_id = node_id;
                actor.node_address = node_address.to_string();
                actor.worker = worker;
                actor.pid = pid;
                actor.lease_id = placed.lease_id;
                self.dirty.insert(actor_id);
                (Some(actor.clone()), Vec::new())
            }
            // The constructor failed: as in Ray, the actor is dead.
            None => {
                let killed = self.kill(actor_id).map(|(info, _)| info);
                (killed, vec![placed.lease_id])
            }
        }
    }

    /// Every actor, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &ActorInfo> {
        self.actors.values()
    }

    /// Every actor, in no order, copied.
    pub fn all(&self) -> Vec<ActorInfo> {
        self.iter().cloned().collect()
    }

    /// Every actor, live first, by namespace and name.
    pub fn list(&self) -> Vec<ActorInfo> {
        let mut all: Vec<ActorInfo> = self.actors.values().cloned().collect();
        all.sort_by_key(|a| {
            (
                a.state != ActorState::Alive,
                a.namespace.clone(),
                a.name.clone(),
            )
        });
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{Address, LeaseId};

    fn actor(name: Option<&str>, detached: bool, job: JobId) -> ActorInfo {
        ActorInfo {
            actor_id: ActorId::random(),
            class: "c".into(),
            name: name.map(str::to_string),
            namespace: "ns".into(),
            detached,
            job_id: job,
            node_id: NodeId::random(),
            node_address: "n".into(),
            worker: Address {
                worker_id: WorkerId::random(),
                address: "w".into(),
            },
            pid: 1,
            lease_id: LeaseId::random(),
            state: ActorState::Alive,
            max_pending_calls: None,
            incarnation: 0,
            max_restarts: 0,
            num_restarts: 0,
            max_task_retries: 0,
        }
    }

    fn spec() -> ActorSpec {
        ActorSpec {
            args: vec![],
            max_concurrency: 1,
            resources: shoal_proto::ResourceSet::new(),
            owner: WorkerId::random(),
            placement: Default::default(),
            env: Default::default(),
        }
    }

    #[test]
    fn names_are_unique_per_namespace_and_freed_by_death() {
        let mut a = Actors::default();
        let job = JobId::random();
        let first = actor(Some("hits"), false, job);
        a.register(first.clone(), spec()).expect("free");
        assert!(matches!(
            a.register(actor(Some("hits"), false, job), spec()),
            Err(ActorError::NameTaken { .. })
        ));
        let mut elsewhere = actor(Some("hits"), false, job);
        elsewhere.namespace = "other".into();
        a.register(elsewhere, spec()).expect("another namespace");
        assert_eq!(
            a.named("ns", "hits").map(|x| x.actor_id),
            Some(first.actor_id)
        );
        assert!(a.kill(first.actor_id).is_some());
        assert!(a.kill(first.actor_id).is_none(), "already dead");
        assert!(a.named("ns", "hits").is_none());
        a.register(actor(Some("hits"), false, job), spec())
            .expect("free again");
    }

    #[test]
    fn detached_actors_outlive_their_job() {
        let mut a = Actors::default();
        let job = JobId::random();
        let owned = actor(None, false, job);
        let detached = actor(Some("d"), true, job);
        a.register(owned.clone(), spec()).expect("ok");
        a.register(detached.clone(), spec()).expect("ok");
        let ended = a.job_finished(job);
        assert_eq!(
            ended.iter().map(|x| x.0.actor_id).collect::<Vec<_>>(),
            vec![owned.actor_id]
        );
        assert!(a.named("ns", "d").is_some());
        let dead = [detached.worker.worker_id];
        assert!(
            a.workers_died(NodeId::random(), &dead).is_empty(),
            "reported by another node"
        );
        assert_eq!(a.workers_died(detached.node_id, &dead).len(), 1);
        assert!(a.named("ns", "d").is_none());
    }

    #[test]
    fn a_dead_worker_restarts_its_actor_while_restarts_last() {
        let mut a = Actors::default();
        let mut info = actor(Some("r"), false, JobId::random());
        info.max_restarts = 1;
        a.register(info.clone(), spec()).expect("ok");
        let died = a.workers_died(info.node_id, &[info.worker.worker_id]);
        assert_eq!(died.len(), 1);
        assert_eq!(died[0].info.state, ActorState::Restarting);
        assert_eq!(died[0].info.incarnation, 1);
        assert_eq!(died[0].lease_id, info.lease_id);
        assert!(a.named("ns", "r").is_some(), "the name stays reserved");
        assert_eq!(a.waiting().len(), 1);
        let node = NodeId::random();
        let lease = LeaseId::random();
        a.place(
            info.actor_id,
            Placed {
                node_id: node,
                lease_id: lease,
            },
        );
        assert!(a.waiting().is_empty());
        let worker = Address {
            worker_id: WorkerId::random(),
            address: "w2".into(),
        };
        // A report for another incarnation is ignored.
        let (stale, _) = a.restarted(node, "n2", info.actor_id, 0, Some((worker.clone(), 2)));
        assert!(stale.is_none());
        let (now, release) = a.restarted(node, "n2", info.actor_id, 1, Some((worker.clone(), 2)));
        let now = now.expect("restarted");
        assert!(release.is_empty());
        assert_eq!(
            (now.state, now.pid, now.lease_id, now.node_id),
            (ActorState::Alive, 2, lease, node)
        );
        // No restarts left: the next death is final.
        let died = a.workers_died(node, &[worker.worker_id]);
        assert_eq!(died[0].info.state, ActorState::Dead);
        assert!(a.named("ns", "r").is_none());
    }

    #[test]
    fn a_restart_lost_with_its_node_is_placed_again_and_kill_releases_it() {
        let mut a = Actors::default();
        let mut info = actor(None, false, JobId::random());
        info.max_restarts = 3;
        a.register(info.clone(), spec()).expect("ok");
        a.workers_died(info.node_id, &[info.worker.worker_id]);
        let node = NodeId::random();
        let lease = LeaseId::random();
        a.place(
            info.actor_id,
            Placed {
                node_id: node,
                lease_id: lease,
            },
        );
        a.node_died(node);
        let waiting = a.waiting();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].0.incarnation, 2, "the lost attempt is stale");
        let other = LeaseId::random();
        a.place(
            info.actor_id,
            Placed {
                node_id: NodeId::random(),
                lease_id: other,
            },
        );
        let (killed, leases) = a.kill(info.actor_id).expect("killed");
        assert_eq!(killed.state, ActorState::Dead);
        assert_eq!(
            leases,
            vec![other],
            "the old worker's lease went at its death"
        );
    }
}
