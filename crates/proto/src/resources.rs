//! Resource sets: named quantities such as `CPU`, `memory` (bytes) and custom
//! resources (`{"GPU": 1.0}`), as Ray names them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The name of the CPU resource; one unit is one task slot.
pub const CPU: &str = "CPU";
/// The name of the GPU resource; one unit is one device, and a fraction
/// shares a device.
pub const GPU: &str = "GPU";
/// The name of the memory resource, in bytes.
pub const MEMORY: &str = "memory";

/// A set of named resource quantities, ordered by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
#[serde(transparent)]
pub struct ResourceSet(
    #[cfg_attr(
        any(test, feature = "arbitrary"),
        proptest(strategy = "arb_resource_map()")
    )]
    pub BTreeMap<String, f64>,
);

impl ResourceSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The quantity of `name`, zero when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// Sets `name` to `quantity`.
    pub fn set(&mut self, name: impl Into<String>, quantity: f64) {
        self.0.insert(name.into(), quantity);
    }

    /// Adds every quantity of `other` to this set.
    pub fn add(&mut self, other: &ResourceSet) {
        for (name, qty) in &other.0 {
            *self.0.entry(name.clone()).or_insert(0.0) += qty;
        }
    }

    /// The names and quantities, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Checks that every quantity is finite and not negative, every name
    /// 1 to 64 characters and there are at most [`RESOURCE_NAMES_MAX`]:
    /// what a node may advertise and a task, actor or lease may ask for.
    /// Every set a peer sends (registrations, heartbeats, lease requests,
    /// actor specs, placement bundles) is checked with it.
    pub fn validate(&self) -> Result<(), InvalidResource> {
        if self.0.len() > RESOURCE_NAMES_MAX {
            return Err(InvalidResource {
                name: format!("({} names)", self.0.len()),
                reason: "at most 64 resource names in a set",
            });
        }
        for (name, qty) in &self.0 {
            if name.is_empty() || name.len() > 64 {
                return Err(InvalidResource {
                    name: name.clone(),
                    reason: "names are 1 to 64 characters",
                });
            }
            if !qty.is_finite() || *qty < 0.0 {
                return Err(InvalidResource {
                    name: name.clone(),
                    reason: "quantities are finite and not negative",
                });
            }
        }
        Ok(())
    }
}

impl FromIterator<(String, f64)> for ResourceSet {
    fn from_iter<I: IntoIterator<Item = (String, f64)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Most resource names in one set (a node's, a task's, a lease's).
pub const RESOURCE_NAMES_MAX: usize = 64;

/// A resource set that a node may not advertise.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid resource {name:?}: {reason}")]
pub struct InvalidResource {
    /// The offending resource name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

#[cfg(any(test, feature = "arbitrary"))]
fn arb_resource_map() -> impl proptest::strategy::Strategy<Value = BTreeMap<String, f64>> {
    proptest::collection::btree_map("[A-Za-z_]{1,8}", 0.0f64..1e12, 0..4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sums_by_name() {
        let mut a: ResourceSet = [("CPU".to_string(), 2.0)].into_iter().collect();
        let b: ResourceSet = [("CPU".to_string(), 1.0), ("GPU".to_string(), 1.0)]
            .into_iter()
            .collect();
        a.add(&b);
        assert_eq!(a.get(CPU), 3.0);
        assert_eq!(a.get("GPU"), 1.0);
        assert_eq!(a.get("missing"), 0.0);
    }

    #[test]
    fn validate_bounds_the_names_in_a_set() {
        let mut r: ResourceSet = (0..RESOURCE_NAMES_MAX)
            .map(|i| (format!("r{i}"), 1.0))
            .collect();
        assert!(r.validate().is_ok());
        r.set("one-more", 1.0);
        assert!(r.validate().is_err());
    }

    #[test]
    fn validate_rejects_negative_nan_and_empty_names() {
        let mut r = ResourceSet::new();
        r.set("CPU", -1.0);
        assert!(r.validate().is_err());
        let mut r = ResourceSet::new();
        r.set("CPU", f64::NAN);
        assert!(r.validate().is_err());
        let mut r = ResourceSet::new();
        r.set("", 1.0);
        assert!(r.validate().is_err());
        let mut r = ResourceSet::new();
        r.set("CPU", 4.0);
        assert!(r.validate().is_ok());
    }
}
