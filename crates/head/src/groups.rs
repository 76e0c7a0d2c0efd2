//! The placement-group table: what each group asked for, its name, and
//! whether it was removed. Where its bundles are is the scheduler's
//! (`Scheduler::group`); a record joins the two.

use std::collections::{HashMap, HashSet, VecDeque};

use shoal_proto::placement::{GroupState, PlacementGroupInfo, PlacementGroupSpec};
use shoal_proto::{JobId, NodeId, PlacementGroupId};

/// Groups not removed, at most (a creation past it is refused).
pub const GROUPS_MAX: usize = 100_000;
/// Removed groups remembered, for listing and for a retried removal.
const REMOVED_KEPT: usize = 1_000;

/// Why a group cannot be created.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// Another live group has the name.
    #[error("a placement group named {0:?} exists already")]
    NameTaken(String),
    /// The table is full.
    #[error("{0} placement groups exist already; remove some first")]
    TooMany(usize),
}

struct Record {
    spec: PlacementGroupSpec,
    removed: bool,
    /// No set of live nodes could hold it, when last tried.
    infeasible: bool,
}

/// The placement groups the head knows.
#[derive(Default)]
pub struct Groups {
    records: HashMap<PlacementGroupId, Record>,
    names: HashMap<String, PlacementGroupId>,
    removed: VecDeque<PlacementGroupId>,
    live: usize,
    /// Changed since the store was last told.
    dirty: HashSet<PlacementGroupId>,
}

impl Groups {
    /// Records a new group; `Ok(false)` if it is known already (a retried
    /// creation).
    pub fn add(&mut self, spec: &PlacementGroupSpec) -> Result<bool, GroupError> {
        if self.records.contains_key(&spec.group_id) {
            return Ok(false);
        }
        if self.live >= GROUPS_MAX {
            return Err(GroupError::TooMany(GROUPS_MAX));
        }
        if let Some(name) = &spec.name {
            if self.names.contains_key(name) {
                return Err(GroupError::NameTaken(name.clone()));
            }
            self.names.insert(name.clone(), spec.group_id);
        }
        self.live += 1;
        self.dirty.insert(spec.group_id);
        self.records.insert(
            spec.group_id,
            Record {
                spec: spec.clone(),
                removed: false,
                infeasible: false,
            },
        );
        Ok(true)
    }

    /// Marks a group removed (its name free again); false if it was
    /// removed already or is unknown.
    pub fn remove(&mut self, id: PlacementGroupId) -> bool {
        let Some(record) = self.records.get_mut(&id).filter(|r| !r.removed) else {
            return false;
        };
        record.removed = true;
        self.live -= 1;
        self.dirty.insert(id);
        if let Some(name) = &record.spec.name {
            self.names.remove(name);
        }
        self.removed.push_back(id);
        if self.removed.len() > REMOVED_KEPT {
            if let Some(old) = self.removed.pop_front() {
                self.records.remove(&old);
            }
        }
        true
    }

    /// The rows changed since the last call: a live group's spec, or
    /// `None` for a removed one (its row goes).
    pub fn take_dirty(&mut self) -> Vec<(PlacementGroupId, Option<PlacementGroupSpec>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|id| {
                let spec = self
                    .records
                    .get(&id)
                    .filter(|r| !r.removed)
                    .map(|r| r.spec.clone());
                (id, spec)
            })
            .collect()
    }

    /// Notes whether a group could be held by the live nodes at all.
    pub fn set_infeasible(&mut self, id: PlacementGroupId, infeasible: bool) {
        if let Some(record) = self.records.get_mut(&id) {
            record.infeasible = infeasible;
        }
    }

    /// The live group named `name`.
    pub fn named(&self, name: &str) -> Option<PlacementGroupId> {
        self.names.get(name).copied()
    }

    /// The live groups of `job_id` that go with it (not detached).
    pub fn of_job(&self, job_id: JobId) -> Vec<PlacementGroupId> {
        self.records
            .iter()
            .filter(|(_, r)| !r.removed && !r.spec.detached && r.spec.job_id == job_id)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A group's record, its placement as `placed` says (the scheduler's
    /// view: state and each bundle's node), or `None` if unknown.
    pub fn info(
        &self,
        id: PlacementGroupId,
        placed: Option<(GroupState, Vec<Option<NodeId>>)>,
    ) -> Option<PlacementGroupInfo> {
        let record = self.records.get(&id)?;
        let (state, bundle_nodes) = match placed {
            Some(placed) if !record.removed => placed,
            _ => (GroupState::Removed, vec![None; record.spec.bundles.len()]),
        };
        Some(PlacementGroupInfo {
            spec: record.spec.clone(),
            state,
            bundle_nodes,
            infeasible: record.infeasible && state != GroupState::Created,
        })
    }

    /// Every group known, live ones first, each in id order.
    pub fn ids(&self) -> Vec<PlacementGroupId> {
        let mut ids: Vec<(bool, PlacementGroupId)> = self
            .records
            .iter()
            .map(|(id, r)| (r.removed, *id))
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::placement::PlacementStrategy;
    use shoal_proto::ResourceSet;

    fn spec(name: Option<&str>) -> PlacementGroupSpec {
        PlacementGroupSpec {
            group_id: PlacementGroupId::random(),
            job_id: JobId::random(),
            name: name.map(str::to_string),
            detached: false,
            strategy: PlacementStrategy::Pack,
            bundles: vec![ResourceSet::new()],
        }
    }

    #[test]
    fn names_are_unique_among_live_groups_and_free_again_on_removal() {
        let mut g = Groups::default();
        let first = spec(Some("train"));
        assert_eq!(g.add(&first), Ok(true));
        assert_eq!(g.add(&first), Ok(false), "a retried creation");
        assert_eq!(
            g.add(&spec(Some("train"))),
            Err(GroupError::NameTaken("train".into()))
        );
        assert_eq!(g.named("train"), Some(first.group_id));
        assert!(g.remove(first.group_id));
        assert!(!g.remove(first.group_id), "removed once");
        assert_eq!(g.named("train"), None);
        assert_eq!(g.add(&spec(Some("train"))), Ok(true));
        let info = g.info(first.group_id, None).expect("kept for listing");
        assert_eq!(info.state, GroupState::Removed);
    }
}
