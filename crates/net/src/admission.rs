//! Which new QUIC peers a server takes into its handshake.
//!
//! A peer holds a slot from its first packet until it has proved the join
//! token (or its handshake deadline passes). Slots are bounded three ways,
//! so that peers which never finish cannot lock everyone else out:
//! - in all ([`NetLimits::handshakes_max`]); past it a peer is refused;
//! - per source address ([`NetLimits::handshakes_per_source_max`]): one
//!   host's stuck handshakes leave the other hosts their slots;
//! - once half the slots are taken, a peer whose address QUIC has not
//!   validated gets a Retry first ([`quinn::Incoming::retry`]): it must
//!   answer from the address it claims, so spoofed sources take no slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::limits::NetLimits;
use crate::sync::MutexExt;

/// What to do with a new peer.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Take it: the slot is held until dropped.
    Slot(Slot),
    /// Ask it to prove its address first.
    Retry,
    /// Refuse it: the bound in all or for its source is reached.
    Refuse,
}

/// The server's handshake slots.
#[derive(Clone)]
pub(crate) struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    max: usize,
    per_source_max: usize,
    taken: Mutex<Taken>,
}

#[derive(Default)]
struct Taken {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Admission {
    pub(crate) fn new(limits: &NetLimits) -> Self {
        let max = limits.handshakes_max.max(1);
        Self {
            inner: Arc::new(Inner {
                max,
                per_source_max: limits.handshakes_per_source_max.clamp(1, max),
                taken: Mutex::new(Taken::default()),
            }),
        }
    }

    /// Decides for a peer at `source`; `validated` is whether QUIC has
    /// proved its address already (it answered a Retry), `may_retry`
    /// whether a Retry can still be sent.
    pub(crate) fn admit(&self, source: IpAddr, validated: bool, may_retry: bool) -> Admit {
        let mut taken = self.inner.taken.locked();
        if taken.total >= self.inner.max {
            return Admit::Refuse;
        }
        if !validated && may_retry && taken.total >= self.inner.max / 2 {
            return Admit::Retry;
        }
        let from_source = taken.by_source.entry(source).or_insert(0);
        if *from_source >= self.inner.per_source_max {
            return Admit::Refuse;
        }
        *from_source += 1;
        taken.total += 1;
        Admit::Slot(Slot {
            admission: self.inner.clone(),
            source,
        })
    }

    /// Slots held now, in all.
    #[cfg(test)]
    fn taken(&self) -> usize {
        self.inner.taken.locked().total
    }
}

/// One peer's place in the handshake; given back when dropped.
pub(crate) struct Slot {
    admission: Arc<Inner>,
    source: IpAddr,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("source", &self.source)
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.admission.taken.locked();
        taken.total = taken.total.saturating_sub(1);
        if let Some(n) = taken.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                taken.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_source: usize) -> Admission {
        Admission::new(&NetLimits {
            handshakes_max: max,
            handshakes_per_source_max: per_source,
            ..NetLimits::default()
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let a = admission(8, 2);
        let held: Vec<Admit> = (0..3).map(|_| a.admit(ip(1), true, false)).collect();
        assert!(matches!(
            held[..],
            [Admit::Slot(_), Admit::Slot(_), Admit::Refuse]
        ));
        assert!(matches!(a.admit(ip(2), true, false), Admit::Slot(_)));
        drop(held);
        assert_eq!(a.taken(), 0, "dropped slots are given back");
        assert!(matches!(a.admit(ip(1), true, false), Admit::Slot(_)));
    }

    #[test]
    fn past_half_the_slots_unvalidated_peers_get_a_retry() {
        let a = admission(4, 4);
        let held: Vec<Admit> = (1..=2).map(|i| a.admit(ip(i), false, true)).collect();
        assert!(held.iter().all(|s| matches!(s, Admit::Slot(_))));
        assert!(matches!(a.admit(ip(3), false, true), Admit::Retry));
        // The same peer back with the Retry's token, or one that cannot be
        // retried, is admitted.
        let validated = a.admit(ip(3), true, false);
        assert!(matches!(validated, Admit::Slot(_)));
        let no_retry = a.admit(ip(4), false, false);
        assert!(matches!(no_retry, Admit::Slot(_)));
        assert!(matches!(a.admit(ip(5), true, false), Admit::Refuse), "full");
    }
}
