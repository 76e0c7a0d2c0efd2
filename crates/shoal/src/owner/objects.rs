//! The objects this process owns or has cached, and its references to
//! them, with no I/O: what must be freed comes out as a [`Free`].
//!
//! Each object has a slot: its state, whether this process owns it (it
//! made the object: a task it submitted, or a `put`) or caches a borrowed
//! copy, and, for a stored task result, the lineage to make it again.
//! Each `ObjectRef` alive in this process counts once (its clones share
//! one count). An owned object is freed when its last local reference is
//! dropped, unless a reference escaped (was serialized into another
//! process's hands): then it is kept until the job ends.

use shoal_net::sync::MutexExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use shoal_proto::{ObjectId, StoredAt, TaskFailure};
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

#[derive(Default)]
struct RefEntry {
    count: usize,
    escaped: bool,
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

    /// Drops one local reference. With the last one the slot goes; an
    /// owned stored object that never escaped is to be freed.
    pub fn release(&self, id: ObjectId) -> Option<Free> {
        let mut last = false;
        self.refs.remove_if_mut(&id, |_, entry| {
            entry.count = entry.count.saturating_sub(1);
            last = entry.count == 0 && !entry.escaped;
            entry.count == 0
        });
        if !last {
            return None;
        }
        let (_, slot) = self.slots.remove(&id)?;
        match slot.state() {
            ObjState::Stored(at) if slot.owned => Some(Free { id, at }),
            _ => None,
        }
    }

    /// An owned object's final state; if nobody holds a reference any
    /// more, a stored result is to be freed.
    pub fn complete(&self, id: ObjectId, state: ObjState) -> Option<Free> {
        match self.get(id) {
            Some(slot) => {
                slot.set(state);
                None
            }
            None => match state {
                ObjState::Stored(at) => Some(Free { id, at }),
                _ => None,
            },
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
        assert_eq!(objects.release(a), None, "one reference is left");
        assert!(objects.get(a).is_some());
        assert_eq!(objects.release(a), Some(Free { id: a, at }));
        assert!(objects.get(a).is_none(), "the slot goes with it");
        assert_eq!(objects.release(a), None, "released once only");
    }

    #[test]
    fn an_escaped_reference_keeps_the_object_for_the_job() {
        let objects = Objects::default();
        let a = id();
        objects.own(a, ObjState::Stored(stored()));
        objects.mark_escaped(a);
        assert_eq!(objects.release(a), None);
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
        assert_eq!(objects.release(small), None);
        let (slot, made) = objects.borrow(borrowed);
        assert!(made && !slot.owned);
        let (again, made) = objects.borrow(borrowed);
        assert!(!made && Arc::ptr_eq(&slot, &again), "one fetch per object");
        slot.set(ObjState::Stored(stored()));
        objects.add_local(borrowed);
        assert_eq!(objects.release(borrowed), None, "the owner frees it");
    }

    #[test]
    fn a_result_completed_after_its_references_are_gone_is_freed_at_once() {
        let objects = Objects::default();
        let (a, at) = (id(), stored());
        objects.own(a, ObjState::Pending);
        assert_eq!(objects.release(a), None, "still pending: nothing stored");
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
