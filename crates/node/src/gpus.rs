//! Which GPU devices a lease's worker sees.
//!
//! The head counts a node's GPUs as one quantity; the node picks the
//! devices. A whole request (1, 2, ...) takes that many devices, free ones
//! first; a fraction below one shares a device, the fullest one it still
//! fits in (so fractions pack and whole devices stay free). When the head
//! granted past what the devices hold (its count ignores fragmentation, and
//! a blocked task's GPUs are lent back), the least used devices are shared
//! rather than the lease refused.

/// Devices a node may offer, at most.
pub const DEVICES_MAX: u32 = 1024;

/// Quantities within this of each other are equal.
const EPSILON: f64 = 1e-9;

/// A device's share held by one lease.
pub type Share = (u32, f64);

/// The node's GPU devices and how much of each is held.
#[derive(Debug, Default)]
pub struct Devices {
    used: Vec<f64>,
}

impl Devices {
    /// `count` devices, numbered from 0, all free.
    pub fn new(count: u32) -> Self {
        Self {
            used: vec![0.0; count as usize],
        }
    }

    /// How many devices there are.
    pub fn count(&self) -> usize {
        self.used.len()
    }

    /// Takes devices for `want` GPUs (none for 0, or on a node without
    /// devices).
    pub fn assign(&mut self, want: f64) -> Vec<Share> {
        if want <= EPSILON || self.used.is_empty() {
            return Vec::new();
        }
        let by_use = |a: &usize, b: &usize| self.used[*a].total_cmp(&self.used[*b]).then(a.cmp(b));
        let mut order: Vec<usize> = (0..self.used.len()).collect();
        let shares: Vec<Share> = if want < 1.0 {
            let fullest_fitting = order
                .iter()
                .copied()
                .filter(|&d| self.used[d] + want <= 1.0 + EPSILON)
                .max_by(|a, b| self.used[*a].total_cmp(&self.used[*b]).then(b.cmp(a)));
            let device = fullest_fitting.unwrap_or_else(|| {
                order.sort_by(by_use);
                order[0]
            });
            vec![(device as u32, want)]
        } else {
            order.sort_by(by_use);
            let whole = (want.round() as usize).clamp(1, self.used.len());
            order[..whole].iter().map(|&d| (d as u32, 1.0)).collect()
        };
        for &(device, share) in &shares {
            self.used[device as usize] += share;
        }
        shares
    }

    /// Gives back what [`Devices::assign`] took.
    pub fn give_back(&mut self, shares: &[Share]) {
        for &(device, share) in shares {
            if let Some(used) = self.used.get_mut(device as usize) {
                let left = *used - share;
                *used = if left <= EPSILON { 0.0 } else { left };
            }
        }
    }
}

/// The device ids of `shares`, in order.
pub fn ids(shares: &[Share]) -> Vec<u32> {
    let mut ids: Vec<u32> = shares.iter().map(|s| s.0).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `CUDA_VISIBLE_DEVICES`' value for `ids`.
pub fn visible_devices(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn whole_requests_take_distinct_free_devices() {
        let mut d = Devices::new(2);
        let a = d.assign(1.0);
        let b = d.assign(1.0);
        assert_ne!(ids(&a), ids(&b));
        d.give_back(&a);
        assert_eq!(ids(&d.assign(1.0)), ids(&a), "the freed device again");
        assert_eq!(ids(&Devices::new(4).assign(2.0)), vec![0, 1]);
    }

    #[test]
    fn fractions_share_a_device_and_leave_the_other_free() {
        let mut d = Devices::new(2);
        let a = d.assign(0.5);
        let b = d.assign(0.5);
        assert_eq!(ids(&a), ids(&b), "two halves share one device");
        let whole = d.assign(1.0);
        assert_ne!(ids(&whole), ids(&a), "the other device stays whole");
        assert!(Devices::new(0).assign(1.0).is_empty());
        assert!(d.assign(0.0).is_empty());
    }

    proptest! {
        /// Whatever is assigned and given back, every device ends free,
        /// and while the requests fit, no device is held past one.
        #[test]
        fn shares_come_back_exactly(wants in proptest::collection::vec(
            prop_oneof![Just(0.25), Just(0.5), Just(1.0), Just(2.0)], 0..12)) {
            let mut d = Devices::new(4);
            let mut held = Vec::new();
            let mut total = 0.0;
            for want in wants {
                let shares = d.assign(want);
                total += want;
                if total <= 4.0 && want < 1.0 {
                    prop_assert!(d.used.iter().all(|u| *u <= 1.0 + EPSILON));
                }
                held.push(shares);
            }
            for shares in &held {
                d.give_back(shares);
            }
            prop_assert!(d.used.iter().all(|u| *u == 0.0));
        }
    }
}
