//! The object directory: which nodes hold a copy of each object, as their
//! heartbeats report. A hint for readers and for `shoal list objects`: an
//! owner always knows where its object's primary copy is.

use std::collections::{BTreeMap, HashMap};

use shoal_proto::head::{ObjectCopy, ObjectCopyChange, ObjectInfo};
use shoal_proto::{NodeId, ObjectId, WorkerId};

/// Objects remembered at most; changes past it are dropped.
const OBJECTS_MAX: usize = 1_000_000;

#[derive(Debug)]
struct Record {
    size: u64,
    owner: Option<WorkerId>,
    copies: BTreeMap<NodeId, CopyState>,
}

#[derive(Debug, Clone, Copy)]
struct CopyState {
    primary: bool,
    spilled: bool,
}

/// The directory.
#[derive(Debug, Default)]
pub struct Objects {
    records: HashMap<ObjectId, Record>,
}

impl Objects {
    /// Applies a node's reported changes. Returns the copies elsewhere of
    /// objects whose primary copy is gone (freed by its owner, or its owner
    /// died): those nodes are told to delete them.
    pub fn apply(&mut self, node: NodeId, changes: &[ObjectCopyChange]) -> Vec<(NodeId, ObjectId)> {
        let mut orphans = Vec::new();
        for change in changes {
            match change {
                ObjectCopyChange::Added {
                    id,
                    size,
                    owner,
                    primary,
                } => {
                    if !self.records.contains_key(id) && self.records.len() >= OBJECTS_MAX {
                        continue;
                    }
                    let record = self.records.entry(*id).or_insert(Record {
                        size: *size,
                        owner: *owner,
                        copies: BTreeMap::new(),
                    });
                    record.owner = record.owner.or(*owner);
                    record.copies.insert(
                        node,
                        CopyState {
                            primary: *primary,
                            spilled: false,
                        },
                    );
                }
                ObjectCopyChange::Spilled { id, spilled } => {
                    if let Some(copy) = self
                        .records
                        .get_mut(id)
                        .and_then(|r| r.copies.get_mut(&node))
                    {
                        copy.spilled = *spilled;
                    }
                }
                ObjectCopyChange::Removed { id } => {
                    let was_primary = self
                        .records
                        .get(id)
                        .and_then(|r| r.copies.get(&node))
                        .is_some_and(|c| c.primary);
                    self.remove_copy(*id, node);
                    if was_primary {
                        if let Some(record) = self.records.remove(id) {
                            orphans.extend(record.copies.keys().map(|n| (*n, *id)));
                        }
                    }
                }
            }
        }
        orphans
    }

    fn remove_copy(&mut self, id: ObjectId, node: NodeId) {
        if let Some(record) = self.records.get_mut(&id) {
            record.copies.remove(&node);
            if record.copies.is_empty() {
                self.records.remove(&id);
            }
        }
    }

    /// A node died: its copies are gone.
    pub fn node_died(&mut self, node: NodeId) {
        self.records.retain(|_, r| {
            r.copies.remove(&node);
            !r.copies.is_empty()
        });
    }

    /// The nodes holding a copy of `id`, the primary first.
    pub fn copies(&self, id: ObjectId) -> Vec<(NodeId, u64)> {
        let Some(record) = self.records.get(&id) else {
            return Vec::new();
        };
        let mut copies: Vec<(bool, NodeId)> = record
            .copies
            .iter()
            .map(|(node, c)| (!c.primary, *node))
            .collect();
        copies.sort();
        copies
            .into_iter()
            .map(|(_, node)| (node, record.size))
            .collect()
    }

    /// Every object, largest first.
    pub fn list(&self) -> Vec<ObjectInfo> {
        let mut all: Vec<ObjectInfo> = self
            .records
            .iter()
            .map(|(id, r)| ObjectInfo {
                id: *id,
                size: r.size,
                owner: r.owner,
                copies: r
                    .copies
                    .iter()
                    .map(|(node_id, c)| ObjectCopy {
                        node_id: *node_id,
                        primary: c.primary,
                        spilled: c.spilled,
                    })
                    .collect(),
            })
            .collect();
        all.sort_by(|a, b| b.size.cmp(&a.size).then(a.id.cmp(&b.id)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::TaskId;

    #[test]
    fn copies_come_and_go_with_reports_and_node_deaths() {
        let mut d = Objects::default();
        let (a, b) = (NodeId::random(), NodeId::random());
        let id = TaskId::fresh().return_object(0);
        let owner = WorkerId::random();
        d.apply(
            a,
            &[ObjectCopyChange::Added {
                id,
                size: 10,
                owner: Some(owner),
                primary: true,
            }],
        );
        d.apply(
            b,
            &[ObjectCopyChange::Added {
                id,
                size: 10,
                owner: None,
                primary: false,
            }],
        );
        d.apply(a, &[ObjectCopyChange::Spilled { id, spilled: true }]);
        let listed = d.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].owner, Some(owner));
        assert_eq!(listed[0].copies.len(), 2);
        let on_a = listed[0].copies.iter().find(|c| c.node_id == a).expect("a");
        assert!(on_a.primary && on_a.spilled);
        d.node_died(a);
        assert_eq!(d.list()[0].copies.len(), 1);
        d.apply(b, &[ObjectCopyChange::Removed { id }]);
        assert!(d.list().is_empty());
    }

    #[test]
    fn a_removed_primary_orders_its_copies_deleted() {
        let mut d = Objects::default();
        let (a, b) = (NodeId::random(), NodeId::random());
        let id = TaskId::fresh().return_object(0);
        let added = |primary| ObjectCopyChange::Added {
            id,
            size: 10,
            owner: None,
            primary,
        };
        d.apply(a, &[added(true)]);
        d.apply(b, &[added(false)]);
        assert!(
            d.apply(b, &[ObjectCopyChange::Removed { id }]).is_empty(),
            "an evicted copy orders nothing"
        );
        d.apply(b, &[added(false)]);
        assert_eq!(
            d.apply(a, &[ObjectCopyChange::Removed { id }]),
            vec![(b, id)]
        );
        assert!(d.list().is_empty());
    }
}
