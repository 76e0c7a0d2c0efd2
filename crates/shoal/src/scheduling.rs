//! Where tasks and actors run: GPUs, label selectors and strategies, as
//! options of a submission ([`TaskOptions`](crate::TaskOptions),
//! [`ActorOptions`](crate::ActorOptions)).

use shoal_proto::placement::{LabelConstraint, Placement};
use shoal_proto::resources::GPU;
use shoal_proto::{NodeId, ResourceSet};

/// How the scheduler picks a node for a task or an actor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// The node holding the most bytes of the task's arguments when it fits;
    /// else the caller's node while it is below half use; else other nodes
    /// below half use, in a fixed order; else the least loaded.
    #[default]
    Default,
    /// Round robin over the nodes that fit, one lease after another.
    Spread,
    /// One node. With `soft`, elsewhere (by default) when that node is dead
    /// or could never fit the request; without, such a task fails with
    /// [`Error::Unschedulable`](crate::Error::Unschedulable).
    NodeAffinity {
        /// The node (`shoal::context()?.node_id`, or `shoal status`).
        node_id: NodeId,
        /// Run elsewhere rather than fail.
        soft: bool,
    },
    /// Inside a placement group: in bundle `bundle`, or any bundle with
    /// room. Its resources come out of the bundle's. Once the group is
    /// removed, the task fails with
    /// [`Error::Unschedulable`](crate::Error::Unschedulable).
    PlacementGroup {
        /// The group.
        group: shoal_proto::PlacementGroupId,
        /// The bundle, or any.
        bundle: Option<u32>,
    },
}

impl Strategy {
    /// [`Strategy::NodeAffinity`].
    pub fn node_affinity(node_id: NodeId, soft: bool) -> Self {
        Strategy::NodeAffinity { node_id, soft }
    }

    /// [`Strategy::PlacementGroup`]: in `group`'s bundle `bundle`, or
    /// any of its bundles.
    pub fn placement_group(group: &crate::PlacementGroup, bundle: Option<u32>) -> Self {
        Strategy::PlacementGroup {
            group: group.id(),
            bundle,
        }
    }
}

/// The placement part of a submission's options, and the first mistake
/// made setting it (reported when the task is submitted).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Scheduling {
    pub(crate) placement: Placement,
    pub(crate) invalid: Option<String>,
}

impl Scheduling {
    fn refuse(&mut self, why: String) {
        self.invalid.get_or_insert(why);
    }

    /// Sets `resources`' GPUs: a fraction below one shares a device, more
    /// must be whole devices.
    pub(crate) fn num_gpus(&mut self, resources: &mut ResourceSet, n: f64) {
        if !n.is_finite() || n < 0.0 || (n > 1.0 && n.fract() != 0.0) {
            self.refuse(format!(
                "num_gpus must be a fraction below 1 or a whole number of devices, got {n}"
            ));
            return;
        }
        if n == 0.0 {
            resources.0.remove(GPU);
        } else {
            resources.set(GPU, n);
        }
    }

    /// Parses `pairs` of key and expression into a selector.
    pub(crate) fn selector(&mut self, pairs: &[(&str, &str)], soft: bool) {
        let mut parsed = Vec::with_capacity(pairs.len());
        for (key, expression) in pairs {
            match LabelConstraint::parse(key, expression) {
                Ok(c) => parsed.push(c),
                Err(e) => return self.refuse(e.to_string()),
            }
        }
        if soft {
            self.placement.labels_soft = parsed;
        } else {
            self.placement.labels = parsed;
        }
    }

    pub(crate) fn strategy(&mut self, strategy: Strategy) {
        self.placement.strategy = match strategy {
            Strategy::Default => shoal_proto::placement::Strategy::Default,
            Strategy::Spread => shoal_proto::placement::Strategy::Spread,
            Strategy::NodeAffinity { node_id, soft } => {
                shoal_proto::placement::Strategy::NodeAffinity { node_id, soft }
            }
            Strategy::PlacementGroup { group, bundle } => {
                shoal_proto::placement::Strategy::PlacementGroup { group, bundle }
            }
        };
    }

    /// The first mistake made, as the error a submission fails with.
    pub(crate) fn check(&self) -> crate::Result<()> {
        match &self.invalid {
            Some(why) => Err(crate::Error::InvalidOptions(why.clone())),
            None => Ok(()),
        }
    }
}

/// The GPU devices the calling task or actor was given (empty for a
/// driver, or on a node without GPUs).
pub(crate) fn gpu_ids(worker: Option<shoal_proto::WorkerId>) -> Vec<u32> {
    let Some(worker) = worker else {
        return Vec::new();
    };
    GPU_IDS
        .get(&worker)
        .map_or_else(Vec::new, |ids| ids.value().clone())
}

/// Each worker's devices, by worker (thread workers of one process each
/// have their own), from `SHOAL_GPU_IDS` at its start.
static GPU_IDS: std::sync::LazyLock<dashmap::DashMap<shoal_proto::WorkerId, Vec<u32>>> =
    std::sync::LazyLock::new(dashmap::DashMap::new);

/// Records a worker's devices from its `SHOAL_GPU_IDS` value (`0,1`).
pub(crate) fn set_gpu_ids(worker: shoal_proto::WorkerId, text: &str) {
    let ids: Vec<u32> = text
        .split(',')
        .filter_map(|id| id.trim().parse().ok())
        .collect();
    if ids.is_empty() {
        GPU_IDS.remove(&worker);
    } else {
        GPU_IDS.insert(worker, ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_quantities_are_fractions_or_whole_devices() {
        let mut resources = ResourceSet::new();
        let mut s = Scheduling::default();
        s.num_gpus(&mut resources, 0.5);
        s.num_gpus(&mut resources, 2.0);
        assert!(s.check().is_ok());
        assert_eq!(resources.get(GPU), 2.0);
        s.num_gpus(&mut resources, 1.5);
        assert!(matches!(s.check(), Err(crate::Error::InvalidOptions(m)) if m.contains("1.5")));
    }

    #[test]
    fn a_bad_selector_is_kept_for_the_submission() {
        let mut s = Scheduling::default();
        s.selector(&[("zone", "in(a,b)")], false);
        assert!(s.check().is_ok());
        assert_eq!(s.placement.labels.len(), 1);
        s.selector(&[("zone", "in(a")], true);
        assert!(s.check().is_err());
    }
}
