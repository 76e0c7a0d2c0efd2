//! Where work may run: node labels, label selectors and scheduling
//! strategies, as an owner asks for them with a lease.
//!
//! A node carries labels (`zone=a`), its own and two defaults
//! ([`NODE_ID_LABEL`], [`HOSTNAME_LABEL`]). A selector constrains a key with
//! one of Ray's forms: `a` (equals), `!a` (differs, or the key is absent),
//! `in(a,b)` and `!in(a,b)`. A hard selector admits only matching nodes; a
//! soft one prefers them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{JobId, NodeId, PlacementGroupId, ResourceSet};

/// A node's labels, by key.
pub type Labels = BTreeMap<String, String>;

/// The label every node carries with its id.
pub const NODE_ID_LABEL: &str = "shoal.io/node-id";
/// The label every node carries with its host's name.
pub const HOSTNAME_LABEL: &str = "shoal.io/hostname";
/// Labels a node may carry, at most.
pub const LABELS_MAX: usize = 64;
/// Longest label key, in bytes.
pub const LABEL_KEY_MAX: usize = 253;
/// Longest label value, in bytes.
pub const LABEL_VALUE_MAX: usize = 63;
/// Constraints one selector may hold, at most.
pub const SELECTOR_MAX: usize = 32;
/// Values one `in(...)` may list, at most.
pub const SELECTOR_VALUES_MAX: usize = 32;

/// A label, selector or strategy that is not well formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPlacement(pub String);

fn check_key(key: &str) -> Result<(), InvalidPlacement> {
    let ok = !key.is_empty()
        && key.len() <= LABEL_KEY_MAX
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidPlacement(format!(
            "label key {key:?}: 1 to {LABEL_KEY_MAX} bytes of letters, digits, '-', '_', '.' and '/'"
        )))
    }
}

fn check_value(value: &str) -> Result<(), InvalidPlacement> {
    let ok = value.len() <= LABEL_VALUE_MAX
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidPlacement(format!(
            "label value {value:?}: at most {LABEL_VALUE_MAX} bytes of letters, digits, '-', '_' and '.'"
        )))
    }
}

/// A few short strings (proptest's default makes messages too large to
/// encode once nested).
#[cfg(any(test, feature = "arbitrary"))]
pub(crate) fn small_strings() -> impl proptest::strategy::Strategy<Value = Vec<String>> {
    proptest::collection::vec("[a-z]{0,8}", 0..3)
}

/// A few short labels.
#[cfg(any(test, feature = "arbitrary"))]
pub(crate) fn small_labels() -> impl proptest::strategy::Strategy<Value = Labels> {
    proptest::collection::btree_map("[a-z./]{1,8}", "[a-z]{0,8}", 0..3)
}

/// Checks a node's labels: keys and values well formed, at most
/// [`LABELS_MAX`].
pub fn check_labels(labels: &Labels) -> Result<(), InvalidPlacement> {
    if labels.len() > LABELS_MAX {
        return Err(InvalidPlacement(format!(
            "{} labels; a node carries at most {LABELS_MAX}",
            labels.len()
        )));
    }
    for (key, value) in labels {
        check_key(key)?;
        check_value(value)?;
    }
    Ok(())
}

/// What a selector asks of one label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum LabelMatch {
    /// The node has the key, with one of these values.
    In(
        #[cfg_attr(
            any(test, feature = "arbitrary"),
            proptest(strategy = "small_strings()")
        )]
        Vec<String>,
    ),
    /// The node lacks the key, or has another value.
    NotIn(
        #[cfg_attr(
            any(test, feature = "arbitrary"),
            proptest(strategy = "small_strings()")
        )]
        Vec<String>,
    ),
}

/// One key's constraint in a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct LabelConstraint {
    /// The label's key.
    pub key: String,
    /// What its value must be.
    pub matches: LabelMatch,
}

impl LabelConstraint {
    /// Parses Ray's forms: `a`, `!a`, `in(a,b)`, `!in(a,b)`.
    pub fn parse(key: &str, expression: &str) -> Result<Self, InvalidPlacement> {
        check_key(key)?;
        let bad = || {
            InvalidPlacement(format!(
                "selector {key}={expression:?}: expected \"a\", \"!a\", \"in(a,b)\" or \"!in(a,b)\""
            ))
        };
        let (negated, rest) = match expression.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, expression.trim()),
        };
        let values: Vec<String> = match rest.strip_prefix("in(") {
            Some(list) => {
                let list = list.strip_suffix(')').ok_or_else(bad)?;
                list.split(',').map(|v| v.trim().to_string()).collect()
            }
            None => vec![rest.to_string()],
        };
        if values.iter().any(|v| v.is_empty()) || values.len() > SELECTOR_VALUES_MAX {
            return Err(bad());
        }
        for value in &values {
            check_value(value).map_err(|_| bad())?;
        }
        let matches = if negated {
            LabelMatch::NotIn(values)
        } else {
            LabelMatch::In(values)
        };
        Ok(Self {
            key: key.to_string(),
            matches,
        })
    }

    /// Whether a node with `labels` meets this constraint.
    pub fn admits(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.matches {
            LabelMatch::In(values) => value.is_some_and(|v| values.contains(v)),
            LabelMatch::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
        }
    }

    fn check(&self) -> Result<(), InvalidPlacement> {
        check_key(&self.key)?;
        let values = match &self.matches {
            LabelMatch::In(v) | LabelMatch::NotIn(v) => v,
        };
        // As `parse` takes them: no empty value.
        if values.is_empty()
            || values.len() > SELECTOR_VALUES_MAX
            || values.iter().any(String::is_empty)
        {
            return Err(InvalidPlacement(format!(
                "selector on {:?}: 1 to {SELECTOR_VALUES_MAX} values, none empty",
                self.key
            )));
        }
        values.iter().try_for_each(|v| check_value(v))
    }
}

impl fmt::Display for LabelConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (not, values) = match &self.matches {
            LabelMatch::In(v) => ("", v),
            LabelMatch::NotIn(v) => ("!", v),
        };
        match values.as_slice() {
            [one] => write!(f, "{}={not}{one}", self.key),
            many => write!(f, "{}={not}in({})", self.key, many.join(",")),
        }
    }
}

/// Whether `labels` meet every constraint of `selector`.
pub fn selects(selector: &[LabelConstraint], labels: &Labels) -> bool {
    selector.iter().all(|c| c.admits(labels))
}

/// How the scheduler picks a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum Strategy {
    /// The node holding most of the arguments' bytes if it fits, else the
    /// owner's node while it is below half use, else other nodes below
    /// half use in a fixed order, else the least loaded.
    #[default]
    Default,
    /// Round robin over the nodes that fit.
    Spread,
    /// One node: with `soft`, elsewhere (as by default) when that node is
    /// dead or could never fit the request; without, such a request fails
    /// (the SDK's `Error::Unschedulable`).
    NodeAffinity {
        /// The node.
        node_id: NodeId,
        /// Run elsewhere rather than fail.
        soft: bool,
    },
    /// Inside a placement group's bundle: the one numbered `bundle`, or
    /// any with room; its resources come out of the bundle's. Refused
    /// (`Error::Unschedulable`) once the group is removed.
    PlacementGroup {
        /// The group.
        group: PlacementGroupId,
        /// The bundle, or any.
        bundle: Option<u32>,
    },
}

impl Strategy {
    /// [`Strategy::NodeAffinity`].
    pub fn node_affinity(node_id: NodeId, soft: bool) -> Self {
        Strategy::NodeAffinity { node_id, soft }
    }

    /// [`Strategy::PlacementGroup`]: in `group`'s bundle `bundle`, or any
    /// of its bundles (`group`: a `shoal::PlacementGroup` or its id).
    pub fn placement_group(group: impl Into<PlacementGroupId>, bundle: Option<u32>) -> Self {
        Strategy::PlacementGroup {
            group: group.into(),
            bundle,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Default => f.write_str("DEFAULT"),
            Strategy::Spread => f.write_str("SPREAD"),
            Strategy::NodeAffinity { node_id, soft } => {
                let soft = if *soft { ", soft" } else { "" };
                write!(f, "NODE_AFFINITY({node_id}{soft})")
            }
            Strategy::PlacementGroup { group, bundle } => match bundle {
                Some(b) => write!(f, "PLACEMENT_GROUP({group}, bundle {b})"),
                None => write!(f, "PLACEMENT_GROUP({group})"),
            },
        }
    }
}

/// Where a lease may go, beyond its resources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct Placement {
    /// How a node is picked.
    #[serde(default)]
    pub strategy: Strategy,
    /// Only nodes whose labels meet all of these.
    #[serde(default)]
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<LabelConstraint>(), 0..3)"
        )
    )]
    pub labels: Vec<LabelConstraint>,
    /// Nodes whose labels meet all of these are preferred.
    #[serde(default)]
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<LabelConstraint>(), 0..3)"
        )
    )]
    pub labels_soft: Vec<LabelConstraint>,
    /// The node holding most bytes of the task's arguments, when it is not
    /// the owner's: preferred when it fits (locality).
    #[serde(default)]
    pub near: Option<NodeId>,
}

impl Placement {
    /// Checks what a peer sent: selectors well formed and bounded.
    pub fn check(&self) -> Result<(), InvalidPlacement> {
        for selector in [&self.labels, &self.labels_soft] {
            if selector.len() > SELECTOR_MAX {
                return Err(InvalidPlacement(format!(
                    "{} label constraints; at most {SELECTOR_MAX}",
                    selector.len()
                )));
            }
            selector.iter().try_for_each(LabelConstraint::check)?;
        }
        Ok(())
    }

    /// True for the default: no strategy, selector or locality.
    pub fn is_default(&self) -> bool {
        *self == Placement::default()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.strategy)?;
        let list = |c: &[LabelConstraint]| {
            c.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.labels.is_empty() {
            write!(f, " labels {{{}}}", list(&self.labels))?;
        }
        if !self.labels_soft.is_empty() {
            write!(f, " soft labels {{{}}}", list(&self.labels_soft))?;
        }
        Ok(())
    }
}

/// How a placement group's bundles are laid over nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum PlacementStrategy {
    /// On as few nodes as fit them (one if it can).
    #[default]
    Pack,
    /// Over as many nodes as there are (sharing nodes when it must).
    Spread,
    /// All on one node, or none.
    StrictPack,
    /// Each on a node of its own, or none.
    StrictSpread,
}

impl fmt::Display for PlacementStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlacementStrategy::Pack => "PACK",
            PlacementStrategy::Spread => "SPREAD",
            PlacementStrategy::StrictPack => "STRICT_PACK",
            PlacementStrategy::StrictSpread => "STRICT_SPREAD",
        })
    }
}

/// Bundles one group may have, at most.
pub const BUNDLES_MAX: usize = 1024;
/// Longest group name, in bytes.
pub const GROUP_NAME_MAX: usize = 256;

/// A placement group as its creator asks for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct PlacementGroupSpec {
    /// Chosen by the creator: a retried creation makes one group.
    pub group_id: PlacementGroupId,
    /// The creator's job: the group goes with it unless detached.
    pub job_id: JobId,
    /// A name, unique among live groups, to find it by.
    #[serde(default)]
    pub name: Option<String>,
    /// Outlives its job, until removed.
    #[serde(default)]
    pub detached: bool,
    /// How the bundles are laid over nodes.
    pub strategy: PlacementStrategy,
    /// The resources of each bundle, reserved together.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<ResourceSet>(), 0..4)"
        )
    )]
    pub bundles: Vec<ResourceSet>,
}

impl PlacementGroupSpec {
    /// Checks what a peer sent: 1 to [`BUNDLES_MAX`] well-formed,
    /// non-empty bundles and a bounded name.
    pub fn check(&self) -> Result<(), InvalidPlacement> {
        if self.bundles.is_empty() || self.bundles.len() > BUNDLES_MAX {
            return Err(InvalidPlacement(format!(
                "a placement group has 1 to {BUNDLES_MAX} bundles, not {}",
                self.bundles.len()
            )));
        }
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() > GROUP_NAME_MAX {
                return Err(InvalidPlacement(format!(
                    "a placement group's name is 1 to {GROUP_NAME_MAX} bytes"
                )));
            }
        }
        for (i, bundle) in self.bundles.iter().enumerate() {
            bundle
                .validate()
                .map_err(|e| InvalidPlacement(format!("bundle {i}: {e}")))?;
            if bundle.0.len() > SELECTOR_MAX || bundle.iter().all(|(_, q)| q <= 0.0) {
                return Err(InvalidPlacement(format!(
                    "bundle {i} must ask for something, with at most {SELECTOR_MAX} resource names"
                )));
            }
        }
        Ok(())
    }
}

/// Where a placement group stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GroupState {
    /// Not reserved yet: it waits for room (or, if `infeasible`, for a
    /// node that could ever hold it).
    Pending,
    /// Every bundle is reserved.
    Created,
    /// A node holding some of its bundles died: they are being placed
    /// again.
    Rescheduling,
    /// Removed: its bundles are free, what ran in them was stopped.
    Removed,
}

impl fmt::Display for GroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupState::Pending => "PENDING",
            GroupState::Created => "CREATED",
            GroupState::Rescheduling => "RESCHEDULING",
            GroupState::Removed => "REMOVED",
        })
    }
}

/// A placement group as the head records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct PlacementGroupInfo {
    /// What was asked.
    pub spec: PlacementGroupSpec,
    /// Where it stands.
    pub state: GroupState,
    /// The node of each bundle, once reserved.
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::prelude::any::<Option<NodeId>>(), 0..4)"
        )
    )]
    pub bundle_nodes: Vec<Option<NodeId>>,
    /// No set of live nodes could ever hold it as asked.
    #[serde(default)]
    pub infeasible: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rays_four_forms_parse_and_match() {
        let zone_a = labels(&[("zone", "a")]);
        let zone_c = labels(&[("zone", "c")]);
        let none = labels(&[]);
        let case = |expr: &str| LabelConstraint::parse("zone", expr).expect("a valid selector");
        let eq = case("a");
        assert!(eq.admits(&zone_a) && !eq.admits(&zone_c) && !eq.admits(&none));
        let ne = case("!a");
        assert!(!ne.admits(&zone_a) && ne.admits(&zone_c) && ne.admits(&none));
        let within = case("in(a, b)");
        assert_eq!(within.matches, LabelMatch::In(vec!["a".into(), "b".into()]));
        assert!(within.admits(&zone_a) && !within.admits(&zone_c));
        let outside = case("!in(a,b)");
        assert!(!outside.admits(&zone_a) && outside.admits(&zone_c) && outside.admits(&none));
        assert_eq!(outside.to_string(), "zone=!in(a,b)");
        assert_eq!(eq.to_string(), "zone=a");
    }

    #[test]
    fn group_specs_from_peers_are_bounded() {
        let cpu: ResourceSet = [("CPU".to_string(), 1.0)].into_iter().collect();
        let spec = |bundles: Vec<ResourceSet>, name: Option<String>| PlacementGroupSpec {
            group_id: PlacementGroupId::random(),
            job_id: JobId::random(),
            name,
            detached: false,
            strategy: PlacementStrategy::Pack,
            bundles,
        };
        assert!(spec(vec![cpu.clone()], Some("g".into())).check().is_ok());
        let refused = [
            spec(Vec::new(), None),
            spec(vec![cpu.clone(); BUNDLES_MAX + 1], None),
            spec(vec![ResourceSet::new()], None),
            spec(
                vec![[("CPU".to_string(), -1.0)].into_iter().collect()],
                None,
            ),
            spec(vec![cpu.clone()], Some(String::new())),
            spec(vec![cpu], Some("n".repeat(GROUP_NAME_MAX + 1))),
        ];
        for bad in refused {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_selectors_and_labels_are_refused() {
        for expr in ["", "!", "in(a,b", "in()", "in(a,,b)", "a b", "in(a,b))"] {
            assert!(LabelConstraint::parse("zone", expr).is_err(), "{expr:?}");
        }
        assert!(LabelConstraint::parse("", "a").is_err());
        assert!(LabelConstraint::parse("zo ne", "a").is_err());
        assert!(check_labels(&labels(&[("zone", "a"), ("shoal.io/node-id", "x-1")])).is_ok());
        assert!(check_labels(&labels(&[("zone", "a,b")])).is_err());
        let many: Labels = (0..=LABELS_MAX)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(check_labels(&many).is_err());
        let placement = Placement {
            labels: vec![LabelConstraint {
                key: "zone".into(),
                matches: LabelMatch::In(vec![]),
            }],
            ..Placement::default()
        };
        assert!(placement.check().is_err(), "an empty in() from a peer");
        // What `parse` refuses, a peer's selector may not carry either.
        for values in [vec![String::new()], vec!["a".into(), String::new()]] {
            let placement = Placement {
                labels: vec![LabelConstraint {
                    key: "zone".into(),
                    matches: LabelMatch::NotIn(values.clone()),
                }],
                ..Placement::default()
            };
            assert!(placement.check().is_err(), "{values:?} from a peer");
        }
    }
}
