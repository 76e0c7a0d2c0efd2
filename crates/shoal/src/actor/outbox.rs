//! One actor caller's open calls: those it made and whose slot at the
//! actor has not yet answered, each with its place there.
//!
//! A plain table with no I/O (the caller's side in `actor.rs` sends). A
//! call is made on the current *route* (an incarnation of the actor, over
//! one connection to its worker) and takes the next `seq` there (the
//! host's order) and the next position (the order its request leaves in,
//! so a host waiting for a caller's earlier call always gets it, never
//! finds it stuck behind the connection's request limit).
//!
//! When the route changes, every open call moves to the new one in the
//! order the calls were made, ahead of any call made later:
//! - [`Outbox::reroute`]: the same incarnation over a new connection (the
//!   old one was lost). Each call keeps its `seq`, so the host answers a
//!   call it already ran with the reply it kept; positions start again.
//! - [`Outbox::relocate`]: a new incarnation after a restart. Calls are
//!   numbered again from 0 in the order they were made.
//!
//! A call leaves the table ([`Outbox::close`]) once the host of its
//! current slot has answered it; until then its slot must be filled, by
//! the call or, when it may not run there, a skip (the host only moves
//! past it).

use std::collections::BTreeMap;

/// A call's slot on a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Slot<R> {
    /// The route.
    pub route: R,
    /// Which route it is (a new one each change).
    pub route_id: u64,
    /// The call's place in the host's order.
    pub seq: u64,
    /// The call's turn to send on the route.
    pub pos: u64,
    /// The lowest `seq` on the route still unanswered (every call below
    /// has its reply): the host may forget those.
    pub done_below: u64,
}

#[derive(Clone, Copy, Debug)]
struct Place {
    seq: u64,
    pos: u64,
}

/// A caller's open calls, by the order they were made in (their turn).
#[derive(Debug)]
pub(crate) struct Outbox<R> {
    route: R,
    route_id: u64,
    next_turn: u64,
    next_seq: u64,
    next_pos: u64,
    /// Every open call, by turn; all are on the current route.
    open: BTreeMap<u64, Place>,
}

impl<R: Clone> Outbox<R> {
    /// An empty outbox on `route`, numbering from 0.
    pub(crate) fn new(route: R) -> Self {
        Self {
            route,
            route_id: 0,
            next_turn: 0,
            next_seq: 0,
            next_pos: 0,
            open: BTreeMap::new(),
        }
    }

    /// The current route.
    pub(crate) fn route(&self) -> &R {
        &self.route
    }

    /// Which route is current.
    pub(crate) fn route_id(&self) -> u64 {
        self.route_id
    }

    /// A new call: its turn and its slot, after every call made before.
    pub(crate) fn open(&mut self) -> (u64, Slot<R>) {
        let turn = self.next_turn;
        self.next_turn += 1;
        let place = Place {
            seq: self.next_seq,
            pos: self.next_pos,
        };
        self.next_seq += 1;
        self.next_pos += 1;
        self.open.insert(turn, place);
        (turn, self.slot_of(place))
    }

    /// The current slot of call `turn`; `None` once it is closed.
    pub(crate) fn slot(&self, turn: u64) -> Option<Slot<R>> {
        self.open.get(&turn).map(|place| self.slot_of(*place))
    }

    fn slot_of(&self, place: Place) -> Slot<R> {
        Slot {
            route: self.route.clone(),
            route_id: self.route_id,
            seq: place.seq,
            pos: place.pos,
            done_below: self.done_below(),
        }
    }

    /// The lowest seq still open (calls are numbered in turn order), or
    /// the next to be given.
    fn done_below(&self) -> u64 {
        self.open
            .first_key_value()
            .map_or(self.next_seq, |(_, place)| place.seq)
    }

    /// Call `turn` was answered at its slot: it leaves.
    pub(crate) fn close(&mut self, turn: u64) -> bool {
        self.open.remove(&turn).is_some()
    }

    /// Closes call `turn` if it is still on route `route_id` (its slot
    /// there is the one that answered).
    pub(crate) fn close_on(&mut self, turn: u64, route_id: u64) -> bool {
        self.route_id == route_id && self.close(turn)
    }

    /// The same incarnation over a new connection: every open call keeps
    /// its seq and takes a new position, in the order the calls were
    /// made. Returns the old route (whose waiters must be let go).
    pub(crate) fn reroute(&mut self, route: R) -> R {
        self.next_pos = 0;
        for place in self.open.values_mut() {
            place.pos = self.next_pos;
            self.next_pos += 1;
        }
        self.replace(route)
    }

    /// A new incarnation: every open call is numbered again from 0, seq
    /// and position, in the order the calls were made, ahead of later
    /// calls. Returns the old route.
    pub(crate) fn relocate(&mut self, route: R) -> R {
        self.next_pos = 0;
        for place in self.open.values_mut() {
            place.pos = self.next_pos;
            place.seq = self.next_pos;
            self.next_pos += 1;
        }
        self.next_seq = self.next_pos;
        self.replace(route)
    }

    fn replace(&mut self, route: R) -> R {
        self.route_id += 1;
        std::mem::replace(&mut self.route, route)
    }

    /// Calls open now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(outbox: &Outbox<&str>, turns: &[u64]) -> Vec<(u64, u64)> {
        turns
            .iter()
            .map(|t| {
                let slot = outbox.slot(*t).expect("open");
                (slot.seq, slot.pos)
            })
            .collect()
    }

    #[test]
    fn calls_are_numbered_in_the_order_they_are_made_and_done_below_follows_answers() {
        let mut outbox = Outbox::new("a");
        let made: Vec<_> = (0..4).map(|_| outbox.open()).collect();
        for (i, (turn, slot)) in made.iter().enumerate() {
            assert_eq!(*turn, i as u64);
            assert_eq!((slot.seq, slot.pos, slot.route_id), (i as u64, i as u64, 0));
            assert_eq!(slot.done_below, 0, "call 0 is still open");
        }
        assert!(outbox.close(1));
        assert_eq!(outbox.slot(3).expect("open").done_below, 0);
        assert!(outbox.close(0));
        assert_eq!(outbox.slot(3).expect("open").done_below, 2);
        assert!(!outbox.close(0), "closing twice is refused");
        outbox.close(2);
        outbox.close(3);
        let (_, next) = outbox.open();
        assert_eq!(
            (next.seq, next.done_below),
            (4, 4),
            "nothing open below the new call"
        );
    }

    #[test]
    fn a_reroute_keeps_each_calls_seq_and_sends_them_again_in_order_before_later_calls() {
        let mut outbox = Outbox::new("first connection");
        for _ in 0..5 {
            outbox.open();
        }
        // 0 and 2 were answered; 1, 3, 4 were lost with the connection.
        outbox.close(0);
        outbox.close(2);
        let old = outbox.reroute("second connection");
        assert_eq!(old, "first connection");
        assert_eq!(outbox.route_id(), 1);
        assert_eq!(seqs(&outbox, &[1, 3, 4]), vec![(1, 0), (3, 1), (4, 2)]);
        let (turn, later) = outbox.open();
        assert_eq!(turn, 5);
        assert_eq!((later.seq, later.pos), (5, 3), "after the resends");
        assert_eq!(later.done_below, 1);
        assert_eq!(later.route, "second connection");
    }

    #[test]
    fn a_relocation_renumbers_open_calls_from_zero_in_call_order_ahead_of_later_ones() {
        let mut outbox = Outbox::new("incarnation 0");
        for _ in 0..6 {
            outbox.open();
        }
        outbox.close(0);
        outbox.close(3);
        outbox.relocate("incarnation 1");
        assert_eq!(
            seqs(&outbox, &[1, 2, 4, 5]),
            vec![(0, 0), (1, 1), (2, 2), (3, 3)]
        );
        let (_, later) = outbox.open();
        assert_eq!((later.seq, later.pos, later.done_below), (4, 4, 0));
        // A second restart, after some answers.
        outbox.close(1);
        outbox.close(2);
        outbox.relocate("incarnation 2");
        assert_eq!(seqs(&outbox, &[4, 5, 6]), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(outbox.len(), 3);
        assert!(!outbox.close_on(4, 1), "route 1 is gone");
        assert!(outbox.close_on(4, 2));
    }
}
