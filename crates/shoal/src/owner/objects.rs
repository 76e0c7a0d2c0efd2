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

/// Who uses an object in this process: 24 bytes while only local
/// references do (a million queued tasks have a million of these).
#[derive(Default)]
pub struct RefEntry {
    /// Local references (`ObjectRef`s alive here).
    count: u32,
    /// Tasks in flight that borrow it (see [`Borrows`]).
    lent: u32,
    escaped: bool,
    /// This process owns the object, which was pending when recorded; its
    /// slot is made when first asked for (see [`Objects::own`]).
    owned_unmade: bool,
    /// Made when another process first holds it through this one.
    shared: Option<Box<Shared>>,
}

/// The other processes an object is shared with, through this one.
#[derive(Default)]
struct Shared {
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
        self.count == 0
            && self.lent == 0
            && !self.escaped
            && self.shared.as_ref().is_none_or(|s| s.borrowers.is_empty())
    }

    fn shared(&mut self) -> &mut Shared {
        self.shared.get_or_insert_default()
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
///
/// Locks: a slot is made under the read lock of its `refs` entry (so a
/// release cannot remove the entry in between and leave the slot behind);
/// nothing takes a `refs` lock while holding a `slots` one.
#[derive(Default)]
pub struct Objects {
    slots: DashMap<ObjectId, Arc<Slot>>,
    refs: DashMap<ObjectId, RefEntry>,
}

impl Objects {
    /// Records an object this process owns, with one local reference. A
    /// pending one (a task's result) gets its slot when first asked for:
    /// a task waiting for a place holds only its reference entry.
    pub fn own(&self, id: ObjectId, state: ObjState) {
        if matches!(state, ObjState::Pending) && !self.slots.contains_key(&id) {
            let mut entry = self.refs.entry(id).or_default();
            entry.count += 1;
            entry.owned_unmade = true;
            return;
        }
        self.slots.insert(id, Slot::new(state, true));
        self.add_local(id);
    }

    /// The slot of an owned object recorded pending, made now (pending) if
    /// it was not yet.
    fn make_owned(&self, id: ObjectId) -> Option<Arc<Slot>> {
        let entry = self.refs.get(&id)?;
        if !entry.owned_unmade {
            return None;
        }
        let slot = self
            .slots
            .entry(id)
            .or_insert_with(|| Slot::new(ObjState::Pending, true));
        let slot = Arc::clone(&slot);
        drop(entry);
        Some(slot)
    }

    /// Whether this process owns `id` (made or not).
    fn owns(&self, id: ObjectId) -> bool {
        if let Some(slot) = self.slots.get(&id) {
            return slot.owned;
        }
        self.refs.get(&id).is_some_and(|e| e.owned_unmade)
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
                    let shared = entry.shared();
                    for worker in workers {
                        match shared.released_early.iter().position(|w| *w == worker) {
                            Some(at) => {
                                shared.released_early.swap_remove(at);
                            }
                            None if !shared.borrowers.contains(&worker) => {
                                shared.borrowers.push(worker)
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
            let lent = entry.lent > 0;
            if entry.shared.is_none() && !lent {
                return;
            }
            let shared = entry.shared();
            match shared.borrowers.iter().position(|w| *w == worker) {
                Some(at) => {
                    shared.borrowers.swap_remove(at);
                }
                None if lent && !shared.released_early.contains(&worker) => {
                    shared.released_early.push(worker)
                }
                None => {}
            }
        })
    }

    /// After a task or call `lender` lent `id` to: whether this process
    /// (its worker) still holds it; if so, `lender` is told when it no
    /// longer does.
    pub fn keep_for(&self, id: ObjectId, lender: &Address) -> bool {
        if self.owns(id) {
            return false;
        }
        match self.refs.get_mut(&id) {
            Some(mut entry) => {
                let shared = entry.shared();
                if !shared
                    .lenders
                    .iter()
                    .any(|l| l.worker_id == lender.worker_id)
                {
                    shared.lenders.push(lender.clone());
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
        if self.owns(id) {
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
        let tell = removed
            .and_then(|(_, entry)| entry.shared)
            .map(|shared| shared.lenders)
            .unwrap_or_default();
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
        if let Some(slot) = self.slots.get(&id) {
            return Some(f(&slot));
        }
        self.make_owned(id).map(|slot| f(&slot))
    }

    /// The slot of `id`, if this process has one (made now for an owned
    /// pending object).
    pub fn get(&self, id: ObjectId) -> Option<Arc<Slot>> {
        if let Some(slot) = self.slots.get(&id) {
            return Some(Arc::clone(&slot));
        }
        self.make_owned(id)
    }

    /// The slot of an object this process owns.
    pub fn owned(&self, id: ObjectId) -> Option<Arc<Slot>> {
        self.get(id).filter(|s| s.owned)
    }

    /// The slot of `id`, made (pending, borrowed) if there is none; true
    /// when made, and the value is then to be asked of its owner.
    pub fn borrow(&self, id: ObjectId) -> (Arc<Slot>, bool) {
        // An object of this process's, recorded pending.
        if let Some(slot) = self.make_owned(id) {
            return (slot, false);
        }
        let mut made = false;
        let slot = self.slots.entry(id).or_insert_with(|| {
            made = true;
            Slot::new(ObjState::Pending, false)
        });
        (Arc::clone(&slot), made)
    }

    /// Keeps the lineage of an owned stored result.
    pub fn set_lineage(&self, id: ObjectId, lineage: Arc<Lineage>) {
        if let Some(slot) = self.get(id) {
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
mod tests;
