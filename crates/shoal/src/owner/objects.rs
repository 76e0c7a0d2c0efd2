//! The objects this process owns or has cached, and its references to
//! them, with no I/O: what must be freed comes out as a [`Free`].
//!
//! Each object has a slot: its state, whether this process owns it (it
//! made the object: a task it submitted, or a `put`) or caches a borrowed
//! copy, and, for a stored task result, the lineage to make it again.
//! Each `ObjectRef` alive in this process counts once (its clones share
//! one count). An owned object is freed when its last local reference is
//! dropped and no task borrows it, unless a reference escaped (was
//! serialized into another process's hands in a way this process cannot
//! follow: inside a `put` value, a return value, an actor's arguments):
//! then it is kept until the job ends.
//!
//! A reference inside a task's or actor call's argument values is lent to
//! it ([`Objects::lend`], [`Borrows`]): the worker that runs it borrows
//! it, and says in its reply whether it still holds it. The borrow ends
//! with the task. A worker that kept it becomes a borrower of this
//! process ([`RefEntry::borrowers`]), and notes this process as its lender
//! ([`Objects::keep_for`]): when nothing in the worker holds it any more,
//! the worker tells its lenders ([`Forgotten::tell`]), which drop it as a
//! borrower ([`Objects::release_borrower`]); the object goes when neither
//! its owner nor any borrower holds it (Ray's borrower protocol: lenders
//! that are borrowers themselves pass the release on the same way). What
//! a worker may have passed on before it was lost escapes.

use shoal_net::sync::MutexExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use shoal_proto::{Address, ObjectId, StoredAt, TaskFailure, WorkerId};
use tokio::sync::Notify;

use super::tasks::Lineage;

/// The state of an object in this process.
#[derive(Clone, Debug)]
pub enum ObjState {
    Pending,
    Inline(Arc<Vec<u8>>),
    Stored(StoredAt),
    Failed(TaskFailure),
    Lost(String),
    /// A borrowed object whose owner is gone.
    OwnerDied(String),
}

impl From<shoal_proto::TaskOutcome> for ObjState {
    /// What a worker's answer says an object is.
    fn from(outcome: shoal_proto::TaskOutcome) -> Self {
        match outcome {
            shoal_proto::TaskOutcome::Inline(bytes) => ObjState::Inline(Arc::new(bytes)),
            shoal_proto::TaskOutcome::Stored(at) => ObjState::Stored(at),
            shoal_proto::TaskOutcome::Failed(f) => ObjState::Failed(f),
        }
    }
}

/// An object's state and the waiters for it.
pub struct Slot {
    state: Mutex<ObjState>,
    /// `state` is not `Pending` (read without the lock by `wait`'s scans).
    ready: AtomicBool,
    notify: Notify,
    /// True if this process owns the object (else it is a cached borrow).
    pub owned: bool,
    /// For a stored task result this process owns: how to make it again.
    lineage: Mutex<Option<Arc<Lineage>>>,
}

impl Slot {
    pub fn new(state: ObjState, owned: bool) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(!matches!(state, ObjState::Pending)),
            state: Mutex::new(state),
            notify: Notify::new(),
            owned,
            lineage: Mutex::new(None),
        })
    }

    pub fn lineage(&self) -> Option<Arc<Lineage>> {
        self.lineage.locked().clone()
    }

    pub fn state(&self) -> ObjState {
        self.state.locked().clone()
    }

    /// Runs `f` on the state under its lock (for reads that need no copy).
    pub fn with_state<R>(&self, f: impl FnOnce(&ObjState) -> R) -> R {
        f(&self.state.locked())
    }

    pub fn is_pending(&self) -> bool {
        !self.ready.load(Ordering::Acquire)
    }

    /// Sets the state and wakes its waiters.
    pub fn set(&self, state: ObjState) {
        let ready = !matches!(state, ObjState::Pending);
        let mut guard = self.state.locked();
        *guard = state;
        self.ready.store(ready, Ordering::Release);
        drop(guard);
        self.notify.notify_waiters();
    }

    /// Sets `state` if the object is still pending (a cancel); true if
    /// it did.
    pub fn set_if_pending(&self, state: ObjState) -> bool {
        let mut guard = self.state.locked();
        if !matches!(*guard, ObjState::Pending) {
            return false;
        }
        *guard = state;
        self.ready.store(true, Ordering::Release);
        drop(guard);
        self.notify.notify_waiters();
        true
    }

    /// Sets the final `state` of a run, unless the run was cancelled
    /// meanwhile: then the state is given back (a stored result is to be
    /// freed).
    fn finish(&self, state: ObjState) -> Option<ObjState> {
        let mut guard = self.state.locked();
        let cancelled = matches!(
            &*guard,
            ObjState::Failed(f) if matches!(f.kind, shoal_proto::FailureKind::Cancelled | shoal_proto::FailureKind::Timeout)
        );
        if cancelled {
            return Some(state);
        }
        let ready = !matches!(state, ObjState::Pending);
        *guard = state;
        self.ready.store(ready, Ordering::Release);
        drop(guard);
        self.notify.notify_waiters();
        None
    }

    /// Woken by every [`set`](Self::set) (enable it before reading the
    /// state, so no change is missed).
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

/// A stored object no reference needs any more: delete it from its node.
#[derive(Debug, PartialEq)]
pub struct Free {
    pub id: ObjectId,
    pub at: StoredAt,
}

/// What dropping a use of an object gave: a stored copy to delete (this
/// process owned it), and the lenders to tell that this process no
/// longer holds it (it borrowed it).
#[derive(Debug, Default, PartialEq)]
pub struct Forgotten {
    pub free: Option<Free>,
    pub tell: Vec<Address>,
}

#[derive(Default)]
pub struct RefEntry {
    /// Local references (`ObjectRef`s alive here).
    count: usize,
    /// Tasks in flight that borrow it (see [`Borrows`]).
    lent: usize,
    escaped: bool,
    /// Workers that kept it after a task or call this process lent it to,
    /// until they say they dropped it.
    borrowers: Vec<WorkerId>,
    /// Releases that came before the reply naming their borrower (the
    /// worker dropped it at once): that borrower is not added.
    released_early: Vec<WorkerId>,
    /// Who lent it to this process and counts it as a borrower: told
    /// when nothing here holds it any more.
    lenders: Vec<Address>,
}

impl RefEntry {
    /// Nothing here needs the object any more.
    fn unused(&self) -> bool {
        self.count == 0 && self.lent == 0 && !self.escaped && self.borrowers.is_empty()
    }
}

/// How a lent reference's borrow by a task ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    /// No worker holds it.
    Returned,
    /// These workers still hold it: they are its borrowers now.
    Kept(Vec<WorkerId>),
    /// A worker may have passed it on before it was lost: kept for the job.
    Escaped,
}

/// The references one task carries inside its argument values, lent to
/// each worker that runs it, as its owner decides what becomes of them
/// when the task is done:
/// - a worker answered and no longer holds it: the borrow ends (the
///   object is freed with its last reference);
/// - a worker said it still holds it (in a thread, in an actor it made,
///   in a task of its own still running): it escapes;
/// - a try ended without an answer (the worker or its node lost): every
///   one escapes, since the worker may have passed them on before it died.
#[derive(Debug, Default)]
pub struct Borrows {
    ids: Vec<ObjectId>,
    /// What each answering worker kept.
    kept: Vec<(ObjectId, WorkerId)>,
    all_kept: bool,
    /// Tries sent and not yet answered or lost.
    unanswered: u32,
}

impl Borrows {
    /// The references lent (each already counted by [`Objects::lend`]).
    pub fn new(ids: Vec<ObjectId>) -> Self {
        Self {
            ids,
            ..Self::default()
        }
    }

    /// The objects lent, as the task's spec names them.
    pub fn ids(&self) -> &[ObjectId] {
        &self.ids
    }

    /// A try was sent to a worker.
    pub fn sent(&mut self) {
        self.unanswered += 1;
    }

    /// Worker `by` answered, still holding `kept` (what it names that was
    /// not lent is ignored).
    pub fn answered(&mut self, kept: &[ObjectId], by: WorkerId) {
        self.unanswered = self.unanswered.saturating_sub(1);
        if kept.is_empty() {
            return;
        }
        let lent: std::collections::HashSet<&ObjectId> = self.ids.iter().collect();
        self.kept.extend(
            kept.iter()
                .filter(|id| lent.contains(id))
                .map(|id| (*id, by)),
        );
    }

    /// A try ended without an answer.
    pub fn lost(&mut self) {
        self.unanswered = self.unanswered.saturating_sub(1);
        self.all_kept = true;
    }

    /// Whoever receives them may keep them for good (an actor).
    pub fn keep_all(&mut self) {
        self.all_kept = true;
    }

    /// The task is done: how each lent object's borrow ended. Once.
    pub fn end(&mut self) -> Vec<(ObjectId, Ended)> {
        let all = self.all_kept || self.unanswered > 0;
        let kept = std::mem::take(&mut self.kept);
        std::mem::take(&mut self.ids)
            .into_iter()
            .map(|id| {
                let mut by: Vec<WorkerId> = kept
                    .iter()
                    .filter(|(k, _)| *k == id)
                    .map(|(_, w)| *w)
                    .collect();
                by.dedup();
                let ended = match (all, by.is_empty()) {
                    (true, _) => Ended::Escaped,
                    (false, true) => Ended::Returned,
                    (false, false) => Ended::Kept(by),
                };
                (id, ended)
            })
            .collect()
    }
}

/// The object table of one process.
#[derive(Default)]
pub struct Objects {
    slots: DashMap<ObjectId, Arc<Slot>>,
    refs: DashMap<ObjectId, RefEntry>,
}

impl Objects {
    /// Records an object this process owns, with one local reference.
    pub fn own(&self, id: ObjectId, state: ObjState) {
        self.slots.insert(id, Slot::new(state, true));
        self.add_local(id);
    }

    /// One more local reference (a reference received from elsewhere).
    pub fn add_local(&self, id: ObjectId) {
        self.refs.entry(id).or_default().count += 1;
    }

    /// A reference left this process: keep the object for the job's life.
    pub fn mark_escaped(&self, id: ObjectId) {
        self.refs.entry(id).or_default().escaped = true;
    }

    /// Drops one local reference. With the last one, unless a task or
    /// borrower holds it or it escaped, the slot goes: an owned stored
    /// object is to be freed, a borrowed one's lenders told.
    pub fn release(&self, id: ObjectId) -> Forgotten {
        self.forget_if(id, |entry| entry.count = entry.count.saturating_sub(1))
    }

    /// A reference was serialized into a task's argument values: the
    /// task borrows the object until [`end_borrow`](Self::end_borrow).
    pub fn lend(&self, id: ObjectId) {
        self.refs.entry(id).or_default().lent += 1;
    }

    /// A task's borrow ended (see [`Borrows::end`]): the workers that
    /// kept the object become its borrowers. The last use gone, as in
    /// [`release`](Self::release).
    pub fn end_borrow(&self, id: ObjectId, ended: Ended) -> Forgotten {
        self.forget_if(id, |entry| {
            entry.lent = entry.lent.saturating_sub(1);
            match ended {
                Ended::Returned => {}
                Ended::Escaped => entry.escaped = true,
                Ended::Kept(workers) => {
                    for worker in workers {
                        match entry.released_early.iter().position(|w| *w == worker) {
                            Some(at) => {
                                entry.released_early.swap_remove(at);
                            }
                            None if !entry.borrowers.contains(&worker) => {
                                entry.borrowers.push(worker)
                            }
                            None => {}
                        }
                    }
                }
            }
        })
    }

    /// Borrower `worker` no longer holds `id`. A release for a borrower
    /// not known yet, while a task that lent it is in flight, is kept for
    /// when that task's reply names it.
    pub fn release_borrower(&self, id: ObjectId, worker: WorkerId) -> Forgotten {
        self.forget_if(id, |entry| {
            match entry.borrowers.iter().position(|w| *w == worker) {
                Some(at) => {
                    entry.borrowers.swap_remove(at);
                }
                None if entry.lent > 0 && !entry.released_early.contains(&worker) => {
                    entry.released_early.push(worker)
                }
                None => {}
            }
        })
    }

    /// After a task or call `lender` lent `id` to: whether this process
    /// (its worker) still holds it; if so, `lender` is told when it no
    /// longer does.
    pub fn keep_for(&self, id: ObjectId, lender: &Address) -> bool {
        if self.slots.get(&id).is_some_and(|slot| slot.owned) {
            return false;
        }
        match self.refs.get_mut(&id) {
            Some(mut entry) => {
                if !entry
                    .lenders
                    .iter()
                    .any(|l| l.worker_id == lender.worker_id)
                {
                    entry.lenders.push(lender.clone());
                }
                true
            }
            None => false,
        }
    }

    /// Whether a worker that borrowed `id` still holds it: a reference, a
    /// task it lent it to, or an escape. False for an object this process
    /// owns (a task run by its owner's process is counted in this table
    /// already).
    pub fn still_borrowed(&self, id: ObjectId) -> bool {
        if self.slots.get(&id).is_some_and(|slot| slot.owned) {
            return false;
        }
        self.refs.contains_key(&id)
    }

    /// Applies `change` to the entry of `id`; if nothing here needs the
    /// object after it, the entry and the slot go, and an owned stored
    /// object is to be freed.
    fn forget_if(&self, id: ObjectId, change: impl FnOnce(&mut RefEntry)) -> Forgotten {
        let mut unused = false;
        let removed = self.refs.remove_if_mut(&id, |_, entry| {
            change(entry);
            unused = entry.unused();
            unused
        });
        let tell = removed.map(|(_, entry)| entry.lenders).unwrap_or_default();
        if !unused {
            return Forgotten::default();
        }
        let free = self
            .slots
            .remove(&id)
            .and_then(|(_, slot)| match slot.state() {
                ObjState::Stored(at) if slot.owned => Some(Free { id, at }),
                _ => None,
            });
        Forgotten { free, tell }
    }

    /// An owned object's final state; if nobody holds a reference any
    /// more, a stored result is to be freed.
    pub fn complete(&self, id: ObjectId, state: ObjState) -> Option<Free> {
        let unused = match self.get(id) {
            Some(slot) => slot.finish(state),
            None => Some(state),
        };
        match unused {
            Some(ObjState::Stored(at)) => Some(Free { id, at }),
            _ => None,
        }
    }

    /// Runs `f` on the slot of `id`, if there is one, without taking a
    /// reference to it (the `get` of a value already here is this and a
    /// decode: an `Arc` clone is a tenth of it).
    pub fn with<R>(&self, id: ObjectId, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.slots.get(&id).map(|slot| f(&slot))
    }

    /// The slot of `id`, if this process has one.
    pub fn get(&self, id: ObjectId) -> Option<Arc<Slot>> {
        self.slots.get(&id).map(|s| Arc::clone(&s))
    }

    /// The slot of an object this process owns.
    pub fn owned(&self, id: ObjectId) -> Option<Arc<Slot>> {
        self.get(id).filter(|s| s.owned)
    }

    /// The slot of `id`, made (pending, borrowed) if there is none; true
    /// when made, and the value is then to be asked of its owner.
    pub fn borrow(&self, id: ObjectId) -> (Arc<Slot>, bool) {
        let mut made = false;
        let slot = self.slots.entry(id).or_insert_with(|| {
            made = true;
            Slot::new(ObjState::Pending, false)
        });
        (Arc::clone(&slot), made)
    }

    /// Keeps the lineage of an owned stored result.
    pub fn set_lineage(&self, id: ObjectId, lineage: Arc<Lineage>) {
        if let Some(slot) = self.slots.get(&id) {
            *slot.lineage.locked() = Some(lineage);
        }
    }

    /// An owned object was read from `to` because `from` could not be:
    /// later reads (and borrowers asking) go to `to`.
    pub fn moved(&self, id: ObjectId, from: &StoredAt, to: StoredAt) {
        if let Some(slot) = self.owned(id) {
            if matches!(slot.state(), ObjState::Stored(at) if at == *from) {
                slot.set(ObjState::Stored(to));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{NodeId, TaskId};

    fn stored() -> StoredAt {
        StoredAt {
            node_id: NodeId::random(),
            node_address: "198.18.0.2:7000".into(),
            size: 1 << 20,
        }
    }

    fn id() -> ObjectId {
        TaskId::fresh().return_object(0)
    }

    #[test]
    fn an_owned_stored_object_is_freed_with_its_last_reference() {
        let objects = Objects::default();
        let (a, at) = (id(), stored());
        objects.own(a, ObjState::Stored(at.clone()));
        objects.add_local(a);
        assert_eq!(objects.release(a).free, None, "one reference is left");
        assert!(objects.get(a).is_some());
        assert_eq!(objects.release(a).free, Some(Free { id: a, at }));
        assert!(objects.get(a).is_none(), "the slot goes with it");
        assert_eq!(objects.release(a).free, None, "released once only");
    }

    #[test]
    fn an_escaped_reference_keeps_the_object_for_the_job() {
        let objects = Objects::default();
        let a = id();
        objects.own(a, ObjState::Stored(stored()));
        objects.mark_escaped(a);
        assert_eq!(objects.release(a).free, None);
        assert!(
            objects.get(a).is_some(),
            "another process may still read it"
        );
    }

    #[test]
    fn inline_and_borrowed_objects_free_nothing_on_a_node() {
        let objects = Objects::default();
        let (small, borrowed) = (id(), id());
        objects.own(small, ObjState::Inline(Arc::new(vec![1])));
        assert_eq!(objects.release(small).free, None);
        let (slot, made) = objects.borrow(borrowed);
        assert!(made && !slot.owned);
        let (again, made) = objects.borrow(borrowed);
        assert!(!made && Arc::ptr_eq(&slot, &again), "one fetch per object");
        slot.set(ObjState::Stored(stored()));
        objects.add_local(borrowed);
        assert_eq!(objects.release(borrowed).free, None, "the owner frees it");
    }

    #[test]
    fn a_result_completed_after_its_references_are_gone_is_freed_at_once() {
        let objects = Objects::default();
        let (a, at) = (id(), stored());
        objects.own(a, ObjState::Pending);
        assert_eq!(
            objects.release(a).free,
            None,
            "still pending: nothing stored"
        );
        assert_eq!(
            objects.complete(a, ObjState::Stored(at.clone())),
            Some(Free { id: a, at })
        );
        let b = id();
        objects.own(b, ObjState::Pending);
        let slot = objects.get(b).expect("slot");
        assert!(slot.is_pending());
        assert_eq!(
            objects.complete(b, ObjState::Inline(Arc::new(vec![2]))),
            None
        );
        assert!(!slot.is_pending());
    }

    #[test]
    fn an_object_lent_to_a_task_outlives_its_last_reference_until_the_task_is_done() {
        let objects = Objects::default();
        let (a, at) = (id(), stored());
        objects.own(a, ObjState::Stored(at.clone()));
        objects.lend(a);
        let mut borrows = Borrows::new(vec![a]);
        assert_eq!(objects.release(a).free, None, "the task still borrows it");
        assert!(objects.get(a).is_some());
        borrows.sent();
        borrows.answered(&[], WorkerId::random());
        let ends = borrows.end();
        assert_eq!(ends, vec![(a, Ended::Returned)]);
        assert_eq!(
            objects.end_borrow(a, Ended::Returned).free,
            Some(Free { id: a, at })
        );
        assert!(objects.get(a).is_none());
        assert!(borrows.end().is_empty(), "a borrow ends once");
    }

    #[test]
    fn an_object_a_worker_kept_is_kept_until_that_borrower_lets_it_go() {
        let objects = Objects::default();
        let (a, b, at) = (id(), id(), stored());
        objects.own(a, ObjState::Stored(stored()));
        objects.own(b, ObjState::Stored(at.clone()));
        for x in [a, b] {
            objects.lend(x);
        }
        let worker = WorkerId::random();
        let mut borrows = Borrows::new(vec![a, b]);
        borrows.sent();
        // An id the task was not lent is ignored.
        borrows.answered(&[b, id()], worker);
        let ends = borrows.end();
        assert_eq!(
            ends,
            vec![(a, Ended::Returned), (b, Ended::Kept(vec![worker]))]
        );
        for (x, ended) in ends {
            assert_eq!(
                objects.end_borrow(x, ended).free,
                None,
                "a local reference is left"
            );
            assert_eq!(objects.release(x).free.is_some(), x == a);
        }
        assert!(objects.get(b).is_some(), "the worker still reads it");
        assert_eq!(
            objects.release_borrower(b, WorkerId::random()).free,
            None,
            "another worker"
        );
        assert_eq!(
            objects.release_borrower(b, worker).free,
            Some(Free { id: b, at })
        );
        assert!(objects.get(b).is_none());
    }

    #[test]
    fn a_release_that_comes_before_the_reply_is_not_lost() {
        // The worker dropped the reference right after it answered; its
        // release overtook the reply naming it a borrower.
        let objects = Objects::default();
        let (a, at) = (id(), stored());
        objects.own(a, ObjState::Stored(at.clone()));
        objects.lend(a);
        let worker = WorkerId::random();
        assert_eq!(objects.release(a).free, None);
        assert_eq!(
            objects.release_borrower(a, worker).free,
            None,
            "the task is in flight"
        );
        assert_eq!(
            objects.end_borrow(a, Ended::Kept(vec![worker])).free,
            Some(Free { id: a, at }),
            "the early release cancels the borrow"
        );
    }

    #[test]
    fn a_worker_that_kept_a_reference_tells_its_lender_when_it_lets_it_go() {
        let objects = Objects::default();
        let a = id();
        let lender = Address {
            worker_id: WorkerId::random(),
            address: "198.18.0.3:7100".into(),
        };
        assert!(!objects.keep_for(a, &lender), "not held here");
        objects.add_local(a);
        assert!(objects.keep_for(a, &lender));
        assert!(objects.keep_for(a, &lender), "one lender once");
        let gone = objects.release(a);
        assert_eq!(gone.free, None, "a borrower frees nothing");
        assert_eq!(gone.tell, vec![lender.clone()]);
        let owned = id();
        objects.own(owned, ObjState::Inline(Arc::new(vec![1])));
        assert!(
            !objects.keep_for(owned, &lender),
            "its owner counts it already"
        );
    }

    #[test]
    fn a_try_lost_with_its_worker_or_node_keeps_every_lent_object() {
        // The worker may have passed the references on before it died,
        // even if a retry answered after it that it kept nothing.
        let objects = Objects::default();
        let a = id();
        objects.own(a, ObjState::Stored(stored()));
        objects.lend(a);
        let mut borrows = Borrows::new(vec![a]);
        borrows.sent();
        borrows.lost();
        borrows.sent();
        borrows.answered(&[], WorkerId::random());
        assert_eq!(borrows.end(), vec![(a, Ended::Escaped)]);
        assert_eq!(objects.end_borrow(a, Ended::Escaped).free, None);
        assert_eq!(objects.release(a).free, None);
        assert!(objects.get(a).is_some());

        // A try still unanswered when the task ends (its owner gave up on
        // it) counts the same.
        let mut borrows = Borrows::new(vec![a]);
        borrows.sent();
        assert_eq!(borrows.end(), vec![(a, Ended::Escaped)]);
    }

    #[test]
    fn a_task_that_never_reached_a_worker_returns_what_it_borrowed() {
        let objects = Objects::default();
        let (a, at) = (id(), stored());
        objects.own(a, ObjState::Stored(at.clone()));
        objects.lend(a);
        assert_eq!(objects.release(a).free, None);
        let mut borrows = Borrows::new(vec![a]);
        assert_eq!(borrows.end(), vec![(a, Ended::Returned)]);
        assert_eq!(
            objects.end_borrow(a, Ended::Returned).free,
            Some(Free { id: a, at })
        );
        // Lent to an actor: kept whatever it answers.
        let b = id();
        objects.own(b, ObjState::Stored(stored()));
        let mut borrows = Borrows::new(vec![b]);
        borrows.keep_all();
        assert_eq!(borrows.end(), vec![(b, Ended::Escaped)]);
    }

    #[test]
    fn a_borrower_holds_a_reference_it_lent_on_or_that_escaped_it() {
        // The worker's side: its table says what it still holds.
        let objects = Objects::default();
        let (held, passed, escaped, dropped) = (id(), id(), id(), id());
        for x in [held, passed, escaped, dropped] {
            objects.add_local(x);
        }
        objects.lend(passed);
        objects.mark_escaped(escaped);
        for x in [passed, escaped, dropped] {
            assert_eq!(objects.release(x).free, None, "a borrower frees nothing");
        }
        assert!(objects.still_borrowed(held));
        assert!(objects.still_borrowed(passed), "its own task borrows it");
        assert!(objects.still_borrowed(escaped));
        assert!(!objects.still_borrowed(dropped));
        assert_eq!(objects.end_borrow(passed, Ended::Returned).free, None);
        assert!(!objects.still_borrowed(passed));
        // The owner's own process ran the task: its counts are exact.
        let owned = id();
        objects.own(owned, ObjState::Inline(Arc::new(vec![1])));
        assert!(!objects.still_borrowed(owned));
    }

    #[test]
    fn an_escaped_reference_stays_escaped_when_it_comes_back_and_goes_again() {
        // Its entry is kept at zero references: a reference adopted again
        // later (inside a result, say) must not free what others may read.
        let objects = Objects::default();
        let a = id();
        objects.own(a, ObjState::Stored(stored()));
        objects.mark_escaped(a);
        assert_eq!(objects.release(a).free, None);
        objects.add_local(a);
        assert_eq!(objects.release(a).free, None, "another process may hold it");
        assert!(objects.get(a).is_some());
    }

    #[test]
    fn a_copy_read_elsewhere_moves_an_owned_object_once() {
        let objects = Objects::default();
        let (a, first, second, third) = (id(), stored(), stored(), stored());
        objects.own(a, ObjState::Stored(first.clone()));
        objects.moved(a, &first, second.clone());
        // A late report about the first copy does not undo the move.
        objects.moved(a, &first, third);
        assert!(
            matches!(objects.get(a).map(|s| s.state()), Some(ObjState::Stored(at)) if at == second)
        );
    }
}
