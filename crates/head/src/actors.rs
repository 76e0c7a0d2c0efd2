//! The actor directory: where every actor lives, names per namespace, and
//! which actors end with their job.

use std::collections::HashMap;

use shoal_proto::{ActorId, ActorInfo, ActorState, JobId, NodeId, WorkerId};

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

/// The directory.
#[derive(Debug, Default)]
pub struct Actors {
    actors: HashMap<ActorId, ActorInfo>,
    names: HashMap<(String, String), ActorId>,
}

impl Actors {
    /// Records a new actor (alive); its name must be free.
    pub fn register(&mut self, mut info: ActorInfo) -> Result<(), ActorError> {
        if self.actors.len() >= ACTORS_MAX {
            self.actors.retain(|_, a| a.state == ActorState::Alive);
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
        self.actors.insert(info.actor_id, info);
        Ok(())
    }

    /// The live actor with this name.
    pub fn named(&self, namespace: &str, name: &str) -> Option<&ActorInfo> {
        let id = self.names.get(&(namespace.to_string(), name.to_string()))?;
        self.actors.get(id).filter(|a| a.state == ActorState::Alive)
    }

    /// Marks an actor dead and frees its name; returns it if it was alive.
    pub fn kill(&mut self, actor_id: ActorId) -> Option<ActorInfo> {
        let actor = self.actors.get_mut(&actor_id)?;
        if actor.state == ActorState::Dead {
            return None;
        }
        actor.state = ActorState::Dead;
        let info = actor.clone();
        if let Some(name) = &info.name {
            self.names.remove(&(info.namespace.clone(), name.clone()));
        }
        Some(info)
    }

    fn kill_where(&mut self, pred: impl Fn(&ActorInfo) -> bool) -> Vec<ActorInfo> {
        let ids: Vec<ActorId> = self
            .actors
            .values()
            .filter(|a| a.state == ActorState::Alive && pred(a))
            .map(|a| a.actor_id)
            .collect();
        ids.into_iter().filter_map(|id| self.kill(id)).collect()
    }

    /// Actors whose worker exited.
    pub fn workers_died(&mut self, workers: &[WorkerId]) -> Vec<ActorInfo> {
        self.kill_where(|a| workers.contains(&a.worker.worker_id))
    }

    /// Actors on a dead node.
    pub fn node_died(&mut self, node: NodeId) -> Vec<ActorInfo> {
        self.kill_where(|a| a.node_id == node)
    }

    /// The job's actors that are not detached.
    pub fn job_finished(&mut self, job: JobId) -> Vec<ActorInfo> {
        self.kill_where(|a| a.job_id == job && !a.detached)
    }

    /// Every actor, live ones first.
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
        }
    }

    #[test]
    fn names_are_unique_per_namespace_and_freed_by_death() {
        let mut a = Actors::default();
        let job = JobId::random();
        let first = actor(Some("hits"), false, job);
        a.register(first.clone()).expect("free");
        assert!(matches!(
            a.register(actor(Some("hits"), false, job)),
            Err(ActorError::NameTaken { .. })
        ));
        let mut elsewhere = actor(Some("hits"), false, job);
        elsewhere.namespace = "other".into();
        a.register(elsewhere).expect("another namespace");
        assert_eq!(
            a.named("ns", "hits").map(|x| x.actor_id),
            Some(first.actor_id)
        );
        assert!(a.kill(first.actor_id).is_some());
        assert!(a.kill(first.actor_id).is_none(), "already dead");
        assert!(a.named("ns", "hits").is_none());
        a.register(actor(Some("hits"), false, job))
            .expect("free again");
    }

    #[test]
    fn detached_actors_outlive_their_job() {
        let mut a = Actors::default();
        let job = JobId::random();
        let owned = actor(None, false, job);
        let detached = actor(Some("d"), true, job);
        a.register(owned.clone()).expect("ok");
        a.register(detached.clone()).expect("ok");
        let ended = a.job_finished(job);
        assert_eq!(
            ended.iter().map(|x| x.actor_id).collect::<Vec<_>>(),
            vec![owned.actor_id]
        );
        assert!(a.named("ns", "d").is_some());
        assert_eq!(a.workers_died(&[detached.worker.worker_id]).len(), 1);
        assert!(a.named("ns", "d").is_none());
    }
}
