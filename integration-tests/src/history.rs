//! A history checker for the chaos suites, in the spirit of Jepsen's
//! total-queue checker: every operation a client made is logged with its
//! outcome, the effects a server saw are logged in the order it saw them,
//! and the checker reports what was lost, duplicated or reordered.
//!
//! - An operation is *acknowledged* when its client got a success for it.
//! - *Lost*: acknowledged, but its effect never seen (or, for operations
//!   whose value is checked, seen with a wrong value).
//! - *Duplicated*: its effect seen more than once (at-least-once delivery
//!   allows it; the count is reported).
//! - *Reordered*: per client, the order in which operations were first seen
//!   differs from the order the client issued them. Duplicates do not count
//!   as reordering: a resent call seen again after later ones is a
//!   duplicate, not a reordering, so only first sightings are compared.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// One operation as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client (caller) that issued it.
    pub client: u32,
    /// Its place in that client's order (0, 1, 2, ...).
    pub seq: u32,
    /// Whether the client got a success for it.
    pub acknowledged: bool,
}

/// What the checker found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations issued.
    pub operations: usize,
    /// Acknowledged operations.
    pub acknowledged: usize,
    /// Acknowledged operations whose effect was never seen.
    pub lost: Vec<(u32, u32)>,
    /// Operations seen more than once, with the number of extra sightings.
    pub duplicated: Vec<((u32, u32), usize)>,
    /// Per client, operations first seen after an operation the client
    /// issued later.
    pub reordered: Vec<(u32, u32)>,
    /// Effects seen that no client issued.
    pub unexpected: Vec<(u32, u32)>,
}

impl Report {
    /// Extra sightings in all.
    pub fn duplicates(&self) -> usize {
        self.duplicated.iter().map(|(_, n)| n).sum()
    }

    /// True when nothing was lost, reordered or made up (duplicates are
    /// allowed: at-least-once).
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.reordered.is_empty() && self.unexpected.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "operations {}, acknowledged {}, lost {}, duplicates {}, reordered {}, unexpected {}",
            self.operations,
            self.acknowledged,
            self.lost.len(),
            self.duplicates(),
            self.reordered.len(),
            self.unexpected.len()
        )
    }
}

/// Checks a history: `ops` as the clients saw them, `seen` the effects in
/// the order the server saw them, as (client, seq).
pub fn check(ops: &[Op], seen: &[(u32, u32)]) -> Report {
    let issued: HashSet<(u32, u32)> = ops.iter().map(|o| (o.client, o.seq)).collect();
    let mut counts: HashMap<(u32, u32), usize> = HashMap::new();
    let mut firsts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for &(client, seq) in seen {
        if !issued.contains(&(client, seq)) {
            unexpected.push((client, seq));
            continue;
        }
        let count = counts.entry((client, seq)).or_default();
        if *count == 0 {
            firsts.entry(client).or_default().push(seq);
        }
        *count += 1;
    }
    let mut lost: Vec<(u32, u32)> = ops
        .iter()
        .filter(|o| o.acknowledged && !counts.contains_key(&(o.client, o.seq)))
        .map(|o| (o.client, o.seq))
        .collect();
    lost.sort_unstable();
    let mut duplicated: Vec<((u32, u32), usize)> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| (*k, n - 1))
        .collect();
    duplicated.sort_unstable();
    let mut reordered = Vec::new();
    for (client, order) in firsts {
        let mut highest: Option<u32> = None;
        for seq in order {
            if highest.is_some_and(|h| seq < h) {
                reordered.push((client, seq));
            }
            highest = highest.max(Some(seq));
        }
    }
    Report {
        operations: ops.len(),
        acknowledged: ops.iter().filter(|o| o.acknowledged).count(),
        lost,
        duplicated,
        reordered,
        unexpected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(client: u32, n: u32) -> Vec<Op> {
        (0..n)
            .map(|seq| Op {
                client,
                seq,
                acknowledged: true,
            })
            .collect()
    }

    #[test]
    fn a_clean_history_is_ok() {
        let mut all = ops(0, 3);
        all.extend(ops(1, 2));
        let seen = [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)];
        let report = check(&all, &seen);
        assert!(report.ok(), "{report}");
        assert_eq!(report.duplicates(), 0);
        assert_eq!(
            report.to_string(),
            "operations 5, acknowledged 5, lost 0, duplicates 0, reordered 0, unexpected 0"
        );
    }

    #[test]
    fn an_acknowledged_operation_never_seen_is_lost() {
        let report = check(&ops(0, 3), &[(0, 0), (0, 2)]);
        assert_eq!(report.lost, vec![(0, 1)]);
        assert!(!report.ok());
    }

    #[test]
    fn an_unacknowledged_operation_may_be_missing() {
        let mut all = ops(0, 2);
        all[1].acknowledged = false;
        let report = check(&all, &[(0, 0)]);
        assert!(report.ok(), "{report}");
        assert_eq!(report.acknowledged, 1);
    }

    #[test]
    fn a_resent_operation_is_a_duplicate_not_a_reordering() {
        // 1 and 2 were seen, their replies lost, and both were resent.
        let seen = [(0, 0), (0, 1), (0, 2), (0, 1), (0, 2), (0, 3)];
        let report = check(&ops(0, 4), &seen);
        assert!(report.ok(), "{report}");
        assert_eq!(report.duplicated, vec![((0, 1), 1), ((0, 2), 1)]);
        assert_eq!(report.duplicates(), 2);
    }

    #[test]
    fn a_later_operation_seen_first_is_a_reordering() {
        let seen = [(0, 0), (0, 2), (0, 1), (1, 0)];
        let mut all = ops(0, 3);
        all.extend(ops(1, 1));
        let report = check(&all, &seen);
        assert_eq!(report.reordered, vec![(0, 1)]);
        assert!(!report.ok());
    }

    #[test]
    fn an_effect_nobody_issued_is_reported() {
        let report = check(&ops(0, 1), &[(0, 0), (7, 3)]);
        assert_eq!(report.unexpected, vec![(7, 3)]);
        assert!(!report.ok());
    }
}
