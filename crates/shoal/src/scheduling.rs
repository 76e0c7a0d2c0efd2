//! Where tasks and actors run: GPUs, label selectors and strategies, as
//! options of a submission ([`TaskOptions`](crate::TaskOptions),
//! [`ActorOptions`](crate::ActorOptions)).

use shoal_proto::placement::{LabelConstraint, Placement};
use shoal_proto::resources::GPU;
use shoal_proto::ResourceSet;

/// How the scheduler picks a node for a task or an actor (see the
/// variants; [`Strategy::node_affinity`], [`Strategy::placement_group`]).
pub use shoal_proto::placement::Strategy;

/// The options that place a submission, the same on
/// [`TaskOptions`](crate::TaskOptions) and
/// [`ActorOptions`](crate::ActorOptions) (which have `resources` and
/// `scheduling` fields).
macro_rules! placement_options {
    ($what:literal) => {
        #[doc = concat!("GPUs ", $what, ": a fraction below one shares a device")]
        /// (`0.5`: two such share one), more are whole devices. The worker
        /// sees exactly its devices in `CUDA_VISIBLE_DEVICES` and in
        /// `shoal::context()?.gpu_ids`.
        pub fn num_gpus(mut self, n: f64) -> Self {
            self.scheduling.num_gpus(&mut self.resources, n);
            self
        }

        /// Only nodes whose labels match every pair take it: `("zone",
        /// "a")`, `("zone", "!a")`, `("zone", "in(a,b)")`, `("zone",
        /// "!in(a,b)")`. If no node matches, it waits and is reported
        /// infeasible (`shoal status`).
        pub fn label_selector(mut self, pairs: &[(&str, &str)]) -> Self {
            self.scheduling.selector(pairs, false);
            self
        }

        /// Nodes whose labels match every pair are preferred while one
        /// fits; others are used otherwise.
        pub fn label_selector_soft(mut self, pairs: &[(&str, &str)]) -> Self {
            self.scheduling.selector(pairs, true);
            self
        }

        /// How a node is picked (see [`Strategy`](crate::Strategy)).
        pub fn scheduling(mut self, strategy: crate::scheduling::Strategy) -> Self {
            self.scheduling.placement.strategy = strategy;
            self
        }
    };
}
pub(crate) use placement_options;

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

    /// The first mistake made, as the error a submission fails with.
    pub(crate) fn check(&self) -> crate::error::Result<()> {
        match &self.invalid {
            Some(why) => Err(crate::error::Error::InvalidOptions(why.clone())),
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
        assert!(
            matches!(s.check(), Err(crate::error::Error::InvalidOptions(m)) if m.contains("1.5"))
        );
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
