//! The replies an actor keeps for one caller, so that a call sent again
//! (its reply was lost on the way: a connection blip, a dropped reply) is
//! answered with the reply of its one run, never run a second time.
//!
//! A plain table with no I/O: the host (`actor::Host::call`) asks it what
//! to do with each call and tells it when a run ends. Replies are kept by
//! the call's `seq` until the caller says it has them (`done_below`, sent
//! with every call), and at most [`KEPT_MAX`] of them: past that, the
//! oldest go, and a resend of one of those gets a typed error
//! ([`Seen::Forgotten`]) rather than a second run.

use std::collections::BTreeMap;

use tokio::sync::oneshot;

/// Most replies kept per caller; past it the oldest are dropped.
pub(crate) const KEPT_MAX: usize = 4096;

/// One call of the caller, as the table knows it.
#[derive(Debug)]
enum Kept<R> {
    /// Running now: these resends wait for its reply.
    Running(Vec<oneshot::Sender<R>>),
    /// Ran: its reply.
    Done(R),
}

/// What to do with a call that arrives.
#[derive(Debug)]
pub(crate) enum Seen<R> {
    /// Never started here: run it (in its turn).
    New,
    /// It ran: answer with this reply.
    Replay(R),
    /// It is running: answer with its reply when the run ends (an error
    /// if the run is abandoned).
    Wait(oneshot::Receiver<R>),
    /// It ran, and its reply is no longer kept: answer with a typed error.
    Forgotten,
}

/// The calls of one caller that ran (or run) here and whose replies the
/// caller may still ask for again.
#[derive(Debug)]
pub(crate) struct KeptReplies<R> {
    calls: BTreeMap<u64, Kept<R>>,
    /// How many of `calls` are `Done`.
    done: usize,
}

impl<R> Default for KeptReplies<R> {
    fn default() -> Self {
        Self {
            calls: BTreeMap::new(),
            done: 0,
        }
    }
}

impl<R: Clone> KeptReplies<R> {
    /// The caller has the replies of every call below `done_below`: they
    /// are dropped (a run still going is kept: its waiters need it).
    pub(crate) fn forget_below(&mut self, done_below: u64) {
        let Some((&first, _)) = self.calls.first_key_value() else {
            return;
        };
        if first >= done_below {
            return;
        }
        let kept = self.calls.split_off(&done_below);
        let below = std::mem::replace(&mut self.calls, kept);
        for (seq, call) in below {
            match call {
                Kept::Done(_) => self.done -= 1,
                running @ Kept::Running(_) => {
                    self.calls.insert(seq, running);
                }
            }
        }
    }

    /// What to do with call `seq`; `turn_passed` says whether some run of
    /// it has already taken its turn here (so, absent from the table, it ran
    /// and its reply was dropped). Takes no place: see [`Self::start`].
    pub(crate) fn seen(&mut self, seq: u64, turn_passed: bool) -> Seen<R> {
        match self.calls.get_mut(&seq) {
            Some(Kept::Done(reply)) => Seen::Replay(reply.clone()),
            Some(Kept::Running(waiters)) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Seen::Wait(rx)
            }
            None if turn_passed => Seen::Forgotten,
            None => Seen::New,
        }
    }

    /// Call `seq` starts running (it was [`Seen::New`] in its turn).
    pub(crate) fn start(&mut self, seq: u64) {
        let before = self.calls.insert(seq, Kept::Running(Vec::new()));
        assert!(
            before.is_none(),
            "call {seq} started twice: the host checks the table in the call's turn"
        );
    }

    /// Call `seq` ran and answered `reply`: kept for a resend, and given to
    /// the resends waiting for it. The oldest replies go past [`KEPT_MAX`].
    pub(crate) fn finish(&mut self, seq: u64, reply: R) {
        if let Some(Kept::Running(waiters)) = self.calls.remove(&seq) {
            for waiter in waiters {
                let _ = waiter.send(reply.clone());
            }
        }
        self.calls.insert(seq, Kept::Done(reply));
        self.done += 1;
        while self.done > KEPT_MAX {
            let oldest = self
                .calls
                .iter()
                .find(|(_, call)| matches!(call, Kept::Done(_)))
                .map(|(seq, _)| *seq);
            let Some(oldest) = oldest else { break };
            self.calls.remove(&oldest);
            self.done -= 1;
        }
    }

    /// The run of call `seq` ended without a reply (its handler was
    /// dropped): its waiters get an error, and a later resend is
    /// [`Seen::Forgotten`].
    pub(crate) fn abandon(&mut self, seq: u64) {
        if matches!(self.calls.get(&seq), Some(Kept::Running(_))) {
            self.calls.remove(&seq);
        }
    }

    /// Replies kept now (for tests).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host's view of one caller: the table and the turns it has passed.
    fn ran(table: &mut KeptReplies<String>, seq: u64) {
        assert!(matches!(table.seen(seq, false), Seen::New));
        table.start(seq);
        table.finish(seq, format!("reply {seq}"));
    }

    #[test]
    fn a_resent_call_that_ran_is_answered_with_its_kept_reply_not_run_again() {
        let mut table = KeptReplies::default();
        ran(&mut table, 0);
        ran(&mut table, 1);
        match table.seen(0, true) {
            Seen::Replay(reply) => assert_eq!(reply, "reply 0"),
            other => panic!("a resend of a call that ran must replay its reply: {other:?}"),
        }
        // Asking again changes nothing.
        assert!(matches!(table.seen(1, true), Seen::Replay(r) if r == "reply 1"));
        assert!(matches!(table.seen(1, true), Seen::Replay(r) if r == "reply 1"));
        assert_eq!(table.kept(), 2);
    }

    #[test]
    fn a_resend_of_a_call_still_running_waits_for_that_runs_reply() {
        let mut table = KeptReplies::default();
        assert!(matches!(table.seen(0, false), Seen::New));
        table.start(0);
        let Seen::Wait(mut first) = table.seen(0, true) else {
            panic!("a resend of a running call must wait")
        };
        let Seen::Wait(mut second) = table.seen(0, true) else {
            panic!("a second resend must wait too")
        };
        assert!(first.try_recv().is_err(), "no reply before the run ends");
        table.finish(0, "once".to_string());
        assert_eq!(first.try_recv().expect("the run's reply"), "once");
        assert_eq!(second.try_recv().expect("the run's reply"), "once");
        assert!(matches!(table.seen(0, true), Seen::Replay(r) if r == "once"));
    }

    #[test]
    fn an_abandoned_run_fails_its_waiters_and_is_never_run_again() {
        let mut table = KeptReplies::<String>::default();
        table.start(3);
        let Seen::Wait(mut waiter) = table.seen(3, true) else {
            panic!("must wait")
        };
        table.abandon(3);
        assert!(matches!(
            waiter.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(table.seen(3, true), Seen::Forgotten));
    }

    #[test]
    fn replies_below_done_below_are_dropped_and_a_resend_of_one_is_forgotten() {
        let mut table = KeptReplies::default();
        for seq in 0..5 {
            ran(&mut table, seq);
        }
        // Call 5 is still running: the caller cannot have its reply.
        table.start(5);
        table.forget_below(3);
        assert_eq!(table.kept(), 2, "3 and 4 stay");
        assert!(matches!(table.seen(2, true), Seen::Forgotten));
        assert!(matches!(table.seen(3, true), Seen::Replay(_)));
        table.forget_below(100);
        assert_eq!(table.kept(), 0);
        assert!(
            matches!(table.seen(5, true), Seen::Wait(_)),
            "a running call is kept whatever the caller says"
        );
        table.finish(5, "five".into());
        assert!(matches!(table.seen(5, true), Seen::Replay(_)));
        // Saying less than before drops nothing more.
        table.forget_below(0);
        assert_eq!(table.kept(), 1);
    }

    #[test]
    fn past_the_bound_the_oldest_replies_go_and_their_resends_are_forgotten_not_run() {
        let mut table = KeptReplies::default();
        // A long call at 0 still running is not counted nor dropped.
        table.start(0);
        for seq in 1..=(KEPT_MAX as u64 + 10) {
            ran(&mut table, seq);
        }
        assert_eq!(table.kept(), KEPT_MAX);
        for seq in 1..=10 {
            assert!(
                matches!(table.seen(seq, true), Seen::Forgotten),
                "call {seq} was dropped for room"
            );
        }
        assert!(matches!(table.seen(11, true), Seen::Replay(_)));
        assert!(matches!(table.seen(0, true), Seen::Wait(_)));
    }

    #[test]
    fn a_call_not_yet_started_is_new_until_it_starts() {
        let mut table = KeptReplies::<String>::default();
        assert!(matches!(table.seen(7, false), Seen::New));
        assert!(
            matches!(table.seen(7, false), Seen::New),
            "seen takes no place"
        );
        table.start(7);
        assert!(matches!(table.seen(7, true), Seen::Wait(_)));
    }
}
