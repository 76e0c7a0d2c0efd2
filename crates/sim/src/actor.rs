//! One actor with restarts, and the driver calling it: calls numbered per
//! incarnation, sent again (same number) when a reply is lost on a live
//! worker, failed (`ActorDied`) when the incarnation dies with them in
//! flight; the host runs each number once, in order, and answers a resend
//! with the reply it kept.

use std::collections::BTreeMap;

use crate::msg::{Msg, NodeNo, Pid, Tag, Timer, DRIVER, HEAD};
use crate::sim::Sim;
use crate::world::MS;

/// Where the driver believes the actor lives.
#[derive(Clone, Debug)]
pub struct Location {
    pub incarnation: u32,
    pub worker: Pid,
    pub node_id: NodeNo,
    next_seq: u64,
}

/// The driver as the actor's caller.
#[derive(Debug, Default)]
pub struct Caller {
    pub location: Option<Location>,
    /// The last incarnation located (a relocation asks for a newer one).
    known: Option<u32>,
    locating: Option<Tag>,
    /// Calls sent to the current location: seq -> (call, tag of the last send).
    open: BTreeMap<u64, (u64, Tag)>,
    /// Calls waiting for a location.
    queued: Vec<u64>,
    gone: bool,
}

impl Sim {
    pub fn actor_tag(&self, tag: Tag) -> bool {
        self.caller.locating == Some(tag) || self.caller.open.values().any(|(_, t)| *t == tag)
    }

    pub fn driver_call(&mut self, index: u64) {
        if self.caller.gone {
            self.truth
                .calls
                .insert(index, Err("ActorDied: the actor is dead".into()));
            return;
        }
        if self.caller.location.is_some() {
            self.send_call(index);
        } else {
            self.caller.queued.push(index);
            self.driver_locate();
        }
    }

    fn send_call(&mut self, index: u64) {
        let Some(location) = self.caller.location.as_mut() else {
            return;
        };
        let seq = location.next_seq;
        location.next_seq += 1;
        let (incarnation, worker) = (location.incarnation, location.worker);
        let tag = self.tag();
        self.caller.open.insert(seq, (index, tag));
        self.send(
            DRIVER,
            worker,
            Msg::ActorCall {
                tag,
                incarnation,
                seq,
            },
        );
    }

    pub fn driver_locate(&mut self) {
        if self.caller.location.is_some() || self.caller.locating.is_some() || self.caller.gone {
            return;
        }
        let tag = self.tag();
        self.caller.locating = Some(tag);
        let known = self.caller.known;
        self.send(DRIVER, HEAD, Msg::GetActor { tag, known });
    }

    pub fn driver_resend(&mut self, seq: u64) {
        let Some(location) = self.caller.location.clone() else {
            return;
        };
        let Some((index, _)) = self.caller.open.get(&seq).copied() else {
            return;
        };
        let tag = self.tag();
        self.caller.open.insert(seq, (index, tag));
        self.send(
            DRIVER,
            location.worker,
            Msg::ActorCall {
                tag,
                incarnation: location.incarnation,
                seq,
            },
        );
    }

    /// The incarnation in use is gone: its open calls fail (they may have
    /// run; `max_task_retries` is 0), and the next one is looked up.
    fn incarnation_gone(&mut self) {
        self.caller.location = None;
        for (_, (index, _)) in std::mem::take(&mut self.caller.open) {
            self.truth.calls.insert(
                index,
                Err("ActorDied: its worker exited with the call in flight".into()),
            );
        }
        self.driver_locate();
    }

    pub fn driver_node_died(&mut self, node_id: NodeNo) {
        if self
            .caller
            .location
            .as_ref()
            .is_some_and(|l| l.node_id == node_id)
        {
            self.incarnation_gone();
        }
    }

    pub fn driver_actor_reply(&mut self, msg: Msg) {
        match msg {
            Msg::ActorAt {
                tag,
                incarnation,
                worker,
                node_id,
            } if self.caller.locating == Some(tag) => {
                self.caller.locating = None;
                let dead = self
                    .owners
                    .get(&DRIVER)
                    .is_some_and(|o| o.dead.contains(&node_id));
                if dead {
                    self.timer(DRIVER, 50 * MS, Timer::Locate);
                    return;
                }
                self.caller.known = Some(incarnation);
                self.caller.location = Some(Location {
                    incarnation,
                    worker,
                    node_id,
                    next_seq: 0,
                });
                for index in std::mem::take(&mut self.caller.queued) {
                    self.send_call(index);
                }
            }
            Msg::ActorNotYet { tag } if self.caller.locating == Some(tag) => {
                self.caller.locating = None;
                self.timer(DRIVER, 50 * MS, Timer::Locate);
            }
            Msg::ActorGone { tag } if self.caller.locating == Some(tag) => {
                self.caller.locating = None;
                self.caller.gone = true;
                for index in std::mem::take(&mut self.caller.queued) {
                    self.truth
                        .calls
                        .insert(index, Err("ActorDied: no restarts left".into()));
                }
            }
            Msg::ActorReply {
                incarnation,
                seq,
                value,
                node_id,
                ..
            } => {
                let here = self
                    .caller
                    .location
                    .as_ref()
                    .is_some_and(|l| l.incarnation == incarnation && l.node_id == node_id);
                let dead = self
                    .owners
                    .get(&DRIVER)
                    .is_some_and(|o| o.dead.contains(&node_id));
                if !here || dead {
                    return;
                }
                let Some((index, _)) = self.caller.open.remove(&seq) else {
                    return;
                };
                if self
                    .truth
                    .accepted_incarnation
                    .is_some_and(|newest| incarnation < newest)
                {
                    self.violate(format!(
                        "call {index} accepted a reply of incarnation {incarnation} after one of a newer incarnation"
                    ));
                }
                self.truth.accepted_incarnation = Some(incarnation);
                self.truth.calls.insert(index, Ok(value));
            }
            _ => {}
        }
    }

    pub fn driver_actor_lost(&mut self, tag: Tag) {
        if self.caller.locating == Some(tag) {
            self.caller.locating = None;
            self.timer(DRIVER, 50 * MS, Timer::Locate);
            return;
        }
        let Some(seq) = self
            .caller
            .open
            .iter()
            .find(|(_, (_, t))| *t == tag)
            .map(|(seq, _)| *seq)
        else {
            return;
        };
        // A lost connection is not a death: sent again, same number.
        let pause = self.rng.range(MS, 20 * MS);
        self.timer(DRIVER, pause, Timer::Resend { seq });
    }

    /// The actor's worker receives a call.
    pub fn host_call(&mut self, pid: Pid, from: Pid, msg: Msg) {
        let Msg::ActorCall {
            tag,
            incarnation,
            seq,
        } = msg
        else {
            return;
        };
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        let node_id = worker.node_id;
        let Some(host) = worker.actor.as_mut() else {
            return;
        };
        if host.incarnation != incarnation {
            return;
        }
        // A resend of a call that ran is answered with its kept reply;
        // otherwise every call whose turn has come runs, in order.
        let mut replies = Vec::new();
        if seq < host.next {
            let value = host.kept.get(&seq).copied().unwrap_or_default();
            replies.push((tag, from, seq, value, false));
        } else {
            host.held.insert(seq, (tag, from));
            while let Some((tag, from)) = host.held.remove(&host.next) {
                host.counter += 1;
                let seq = host.next;
                host.kept.insert(seq, host.counter);
                host.next += 1;
                replies.push((tag, from, seq, host.counter, true));
            }
        }
        for (tag, from, seq, value, ran) in replies {
            if ran {
                let order = self.truth.ran.entry(incarnation).or_default();
                let last = order.last().copied();
                order.push(seq);
                if last.map_or(0, |l| l + 1) != seq {
                    self.violate(format!(
                        "incarnation {incarnation} ran call {seq} after {last:?}: a caller's order was broken"
                    ));
                }
            }
            self.send(
                pid,
                from,
                Msg::ActorReply {
                    tag,
                    incarnation,
                    seq,
                    value,
                    node_id,
                },
            );
        }
    }
}
