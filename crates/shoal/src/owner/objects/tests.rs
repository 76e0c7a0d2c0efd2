//! The object table: references, borrows, and when an object goes.

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

#[test]
fn a_pending_owned_object_gets_its_slot_when_first_asked_for() {
    let objects = Objects::default();
    let (a, at) = (id(), stored());
    objects.own(a, ObjState::Pending);
    assert!(objects.slots.is_empty(), "no slot while nobody asks");
    assert!(!objects.still_borrowed(a), "it is this process's own");
    let slot = objects.owned(a).expect("made when asked for");
    assert!(slot.is_pending() && slot.owned);
    let again = objects.get(a).expect("the same slot");
    assert!(Arc::ptr_eq(&slot, &again), "made once");
    // A reference to it arriving in this process finds it owned.
    let (borrowed, made) = objects.borrow(a);
    assert!(Arc::ptr_eq(&slot, &borrowed) && !made);
    assert_eq!(objects.complete(a, ObjState::Stored(at.clone())), None);
    assert_eq!(objects.release(a).free, Some(Free { id: a, at }));
    assert!(objects.get(a).is_none());
}

#[test]
fn a_pending_owned_object_completed_unasked_keeps_its_state() {
    let objects = Objects::default();
    let (a, b, at) = (id(), id(), stored());
    objects.own(a, ObjState::Pending);
    objects.own(b, ObjState::Pending);
    assert_eq!(
        objects.complete(a, ObjState::Inline(Arc::new(vec![7]))),
        None
    );
    assert!(matches!(
        objects.get(a).map(|s| s.state()),
        Some(ObjState::Inline(v)) if *v == vec![7]
    ));
    // Released before its task ended: nothing to free then, and its
    // result is freed when it comes.
    assert_eq!(objects.release(b), Forgotten::default());
    assert!(objects.get(b).is_none(), "no slot is made for it any more");
    assert_eq!(
        objects.complete(b, ObjState::Stored(at.clone())),
        Some(Free { id: b, at })
    );
}
