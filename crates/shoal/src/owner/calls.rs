//! An actor call's tries, as its caller decides them, with no I/O. The
//! shell (`actor::call`) says when the call's turn comes at a slot, what
//! became of a request (an answer, or how it was lost), and carries out
//! what comes back: send (with the arguments, or a skip), fail, move to
//! the actor's next incarnation, pause and send again, reconnect.
//!
//! - A call is answered once; after that only a skip is sent at its slot,
//!   so the host moves past it.
//! - Sent with its arguments to an incarnation that died since, it may
//!   have run there: sending it to a new incarnation is a retry, counted
//!   once sent, within `max_task_retries`; past them it is answered
//!   `ActorDied` (and a skip still sent).
//! - A reply lost on a live connection to a live worker is asked again at
//!   the same slot (the host answers a call it ran with its kept reply), up
//!   to [`RESENDS_MAX`] times with a growing pause.
//! - An actor with no restarts left fails its calls when its worker exits;
//!   a dead actor (killed, or out of restarts) fails them at once.

use std::time::Duration;

use super::objects::ObjState;

/// Times a call is sent again at one slot (its replies lost on a live
/// connection) before it fails.
pub const RESENDS_MAX: u32 = 100;

/// How the request at a slot ended, as the shell judged the reply.
#[derive(Debug)]
pub enum Heard {
    /// Answered.
    Done(ObjState),
    /// Answered with something that is not a call's reply.
    Refused(String),
    /// Lost on a live connection to a live worker.
    Lost(String),
    /// The connection was lost.
    ConnectionLost(String),
    /// The incarnation is gone.
    Dead(String),
}

/// What to do when the call's turn comes.
#[derive(Debug, PartialEq, Eq)]
pub enum AtTurn {
    /// Fail the call (answered `ActorDied` with this message) and pass
    /// the turn.
    Fail(String),
    /// Move the caller's open calls to the actor's next incarnation.
    Relocate,
    /// Send: with the arguments, or a skip. `died` when the call was just
    /// answered `ActorDied` with this message (its retries used up).
    Send { args: bool, died: Option<String> },
}

/// What to do after a reply (or its loss).
#[derive(Debug)]
pub enum AfterReply {
    /// Answer with this state (if not answered yet) and leave the outbox.
    Answer(ObjState),
    /// Answer `ActorDied` with this message (if not answered yet) and
    /// leave the outbox.
    Died(String),
    /// Send again at the same slot ([`CallTries::again`] says when).
    SendAgain(String),
    /// Move every open call to a new connection, then send.
    Reconnect(String),
    /// Mark the incarnation dead, then send (the turn decides what next).
    MarkDead(String),
}

/// One call's tries. `L` names an incarnation's location (the shell's
/// handle; equal for the same location).
#[derive(Debug)]
pub struct CallTries<L> {
    max_task_retries: u32,
    max_restarts: u32,
    answered: bool,
    /// Where it was last sent with its arguments (it may have run there).
    tried: Option<L>,
    /// The send about to be made is a retry.
    retrying: bool,
    /// Times sent again to a new incarnation.
    retries: u32,
    /// Times sent again at one slot.
    resends: u32,
}

impl<L: PartialEq> CallTries<L> {
    pub fn new(max_task_retries: u32, max_restarts: u32) -> Self {
        Self {
            max_task_retries,
            max_restarts,
            answered: false,
            tried: None,
            retrying: false,
            retries: 0,
            resends: 0,
        }
    }

    /// The call was sent with its arguments to `location` before the
    /// machine took over (from the caller's thread).
    pub fn first_sent_to(&mut self, location: L) {
        self.tried = Some(location);
    }

    /// Whether the call is answered.
    pub fn is_answered(&self) -> bool {
        self.answered
    }

    /// Marks the call answered: true the first time only (the shell then
    /// resolves its reference).
    pub fn answer(&mut self) -> bool {
        !std::mem::replace(&mut self.answered, true)
    }

    /// Tries made, for the failure's `attempts`.
    pub fn attempts(&self) -> u32 {
        self.retries + 1
    }

    /// The call's turn came at a slot on `location`; `gone` when the actor
    /// is dead for good, `dead` when this incarnation is.
    pub fn turn(&mut self, location: &L, gone: bool, dead: bool) -> AtTurn {
        if gone {
            return AtTurn::Fail("it is dead".into());
        }
        if dead {
            if self.max_restarts == 0 {
                return AtTurn::Fail("its worker has exited".into());
            }
            return AtTurn::Relocate;
        }
        self.retrying =
            !self.answered && self.tried.as_ref().is_some_and(|tried| tried != location);
        let mut died = None;
        if self.retrying && self.retries >= self.max_task_retries {
            self.retrying = false;
            if self.answer() {
                died = Some("its worker exited with the call in flight".to_string());
            }
        }
        AtTurn::Send {
            args: !self.answered,
            died,
        }
    }

    /// The request decided at the turn went out to `location`: true when
    /// it was a retry (now counted).
    pub fn sent(&mut self, location: L, args: bool) -> bool {
        if !args {
            return false;
        }
        let retry = std::mem::take(&mut self.retrying);
        if retry {
            self.retries += 1;
        }
        self.tried = Some(location);
        retry
    }

    /// What the request's reply (or its loss) means.
    pub fn heard(&mut self, heard: Heard) -> AfterReply {
        match heard {
            Heard::Done(state) => AfterReply::Answer(state),
            Heard::Refused(why) => AfterReply::Died(why),
            Heard::Lost(why) => AfterReply::SendAgain(why),
            Heard::ConnectionLost(why) => AfterReply::Reconnect(why),
            Heard::Dead(why) => AfterReply::MarkDead(why),
        }
    }

    /// The request could not be sent, or its reply was lost: the pause
    /// before sending again at the same slot, or, past [`RESENDS_MAX`],
    /// why the call fails.
    pub fn again(&mut self, why: &str) -> Result<Duration, String> {
        self.resends += 1;
        if self.resends > RESENDS_MAX {
            return Err(format!(
                "{RESENDS_MAX} attempts at the call were lost; the last: {why}"
            ));
        }
        Ok(backoff(self.resends))
    }
}

/// The pause before the `n`-th try again (from 1): 10 ms doubling, at most
/// one second.
pub fn backoff(n: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1 << n.saturating_sub(1).min(7)))
        .min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Locations by incarnation number.
    type Tries = CallTries<u32>;

    fn send(args: bool) -> AtTurn {
        AtTurn::Send { args, died: None }
    }

    #[test]
    fn a_call_answered_at_its_first_slot_is_sent_once_with_its_arguments() {
        let mut call = Tries::new(0, 0);
        assert_eq!(call.turn(&1, false, false), send(true));
        assert!(!call.sent(1, true), "not a retry");
        let state = ObjState::Inline(std::sync::Arc::new(vec![1]));
        assert!(matches!(
            call.heard(Heard::Done(state)),
            AfterReply::Answer(_)
        ));
        assert!(call.answer(), "answered once");
        assert!(!call.answer());
        // Moved since to a new connection: only a skip goes there.
        assert_eq!(call.turn(&1, false, false), send(false));
    }

    #[test]
    fn a_call_lost_with_its_incarnation_is_retried_within_max_task_retries() {
        let mut call = Tries::new(1, 5);
        assert_eq!(call.turn(&1, false, false), send(true));
        call.sent(1, true);
        assert!(matches!(
            call.heard(Heard::Dead("exited".into())),
            AfterReply::MarkDead(_)
        ));
        assert_eq!(call.turn(&1, false, true), AtTurn::Relocate);
        // The next incarnation: a retry, counted once sent.
        assert_eq!(call.turn(&2, false, false), send(true));
        assert!(call.sent(2, true));
        assert_eq!(call.attempts(), 2);
        // Lost there too: retries used up, answered ActorDied, and only a
        // skip goes to the third incarnation.
        assert_eq!(
            call.turn(&3, false, false),
            AtTurn::Send {
                args: false,
                died: Some("its worker exited with the call in flight".into()),
            }
        );
        assert!(!call.sent(3, false));
        assert!(call.is_answered());
        assert_eq!(call.attempts(), 2);
    }

    #[test]
    fn sending_again_to_the_same_incarnation_is_not_a_retry() {
        // A new connection to the same worker: the host answers a call it
        // ran with its kept reply, so no retry is counted.
        let mut call = Tries::new(0, 0);
        call.turn(&1, false, false);
        call.sent(1, true);
        assert!(matches!(
            call.heard(Heard::ConnectionLost("reset".into())),
            AfterReply::Reconnect(_)
        ));
        assert_eq!(call.turn(&1, false, false), send(true));
        assert!(!call.sent(1, true));
        assert_eq!(call.attempts(), 1);
    }

    #[test]
    fn lost_replies_are_asked_again_with_a_growing_pause_then_given_up() {
        let mut call = Tries::new(0, 0);
        call.turn(&1, false, false);
        call.sent(1, true);
        assert!(matches!(
            call.heard(Heard::Lost("timeout".into())),
            AfterReply::SendAgain(why) if why == "timeout"
        ));
        let pauses: Vec<Duration> = (0..RESENDS_MAX)
            .map(|_| call.again("timeout").expect("a pause"))
            .collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(pauses.last(), Some(&Duration::from_secs(1)));
        let gave_up = call.again("timeout").expect_err("given up");
        assert!(gave_up.contains("the last: timeout"), "{gave_up}");
    }

    #[test]
    fn an_actor_without_restarts_or_dead_for_good_fails_its_calls() {
        let mut call = Tries::new(3, 0);
        assert_eq!(
            call.turn(&1, false, true),
            AtTurn::Fail("its worker has exited".into())
        );
        let mut call = Tries::new(3, 3);
        assert_eq!(
            call.turn(&1, true, false),
            AtTurn::Fail("it is dead".into())
        );
        let mut call = Tries::new(3, 3);
        assert!(
            matches!(call.heard(Heard::Refused("bad".into())), AfterReply::Died(w) if w == "bad")
        );
    }
}
