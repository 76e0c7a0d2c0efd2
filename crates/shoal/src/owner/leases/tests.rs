//! The lease machine, walked step by step.

use super::*;

type Machine = Leases<&'static str, (u32, bool)>;
type Out = Vec<Command<&'static str, (u32, bool)>>;

fn cpu() -> (ClassKey, Shape) {
    let mut r = ResourceSet::new();
    r.set("CPU", 1.0);
    let shape = Shape::from(r);
    (class_key(&shape), shape)
}

/// The place a long task took on `worker` under `lease_id`.
fn place(worker: &'static str, lease_id: LeaseId, class: &ClassKey) -> Place<&'static str> {
    Place {
        worker,
        lease_id,
        class: Arc::clone(class),
        short: false,
    }
}

/// The head held the request: the cluster is full.
fn held(m: &mut Machine, ask: Ask) -> Out {
    let mut out = Vec::new();
    m.answered(ask, Answer::Pending { infeasible: false }, &mut out);
    out
}

fn asks(out: &Out) -> Vec<Ask> {
    out.iter()
        .filter_map(|c| match c {
            Command::Ask(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn gives(out: &Out) -> Vec<(u32, &'static str)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Give((t, _), p) => Some((*t, p.worker)),
            _ => None,
        })
        .collect()
}

fn returns(out: &Out) -> Vec<(&'static str, bool)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Return { worker, kill, .. } => Some((*worker, *kill)),
            _ => None,
        })
        .collect()
}

fn arm(out: &Out) -> Option<(LeaseId, u64)> {
    out.iter().find_map(|c| match c {
        Command::ArmIdle {
            lease_id, epoch, ..
        } => Some((*lease_id, *epoch)),
        _ => None,
    })
}

/// A lease granted and its worker joined, for the ask given.
fn join(m: &mut Machine, ask: Ask, worker: &'static str, room: bool) -> (LeaseId, Out) {
    let mut out = Vec::new();
    m.answered(ask.clone(), Answer::Granted, &mut out);
    assert!(out.is_empty(), "a grant alone does nothing: {out:?}");
    let lease = LeaseId::random();
    m.joined(ask, (worker, lease), room, &mut out);
    (lease, out)
}

#[test]
fn a_waiting_task_asks_once_and_takes_the_worker_that_joins() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    assert!(m
        .acquire(&class, &r, false, || (1, false), &mut out)
        .is_none());
    let ask = asks(&out).pop().expect("a request");
    assert_eq!((ask.request_id, ask.after), (1, Duration::ZERO));
    assert_eq!(m.counts(&class), (0, 1, 1));
    let (_, out) = join(&mut m, ask, "w1", true);
    assert_eq!(gives(&out), vec![(1, "w1")]);
    // Nobody else waits: the request ends, and the worker is not idle.
    assert!(asks(&out).is_empty() && arm(&out).is_none(), "{out:?}");
    assert_eq!(m.counts(&class), (1, 0, 0));
}

#[test]
fn a_released_worker_is_reused_then_returned_once_idle() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    let (lease, _) = join(&mut m, asks(&out).remove(0), "w1", true);
    let place = place("w1", lease, &class);
    let mut out = Vec::new();
    m.release(&place, &mut out);
    let (_, first) = arm(&out).expect("idle clock");
    // A task arriving in time takes the same worker, with no request.
    let mut out = Vec::new();
    let again = m
        .acquire(&class, &r, false, || (2, false), &mut out)
        .expect("reuse");
    assert_eq!(again.worker, "w1");
    assert!(out.is_empty());
    // The first clock is stale now; after the second idle spell the
    // lease goes back.
    let mut out = Vec::new();
    m.idle_expired(&class, lease, first, &mut out);
    assert!(returns(&out).is_empty());
    m.release(&again, &mut out);
    let (_, second) = arm(&out).expect("idle clock");
    let mut out = Vec::new();
    m.idle_expired(&class, lease, second, &mut out);
    assert_eq!(returns(&out), vec![("w1", false)]);
    assert_eq!(m.counts(&class), (0, 0, 0));
}

#[test]
fn tasks_queue_behind_short_tasks_only_once_the_cluster_is_full() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    // Three short tasks; the worker that joins says there is room for
    // another: the other two wait for more workers.
    for t in 1..=3 {
        m.acquire(&class, &r, true, || (t, true), &mut out);
    }
    let mut pending = asks(&out);
    assert_eq!(pending.len(), 3, "one request per waiting task");
    let (_, out) = join(&mut m, pending.remove(0), "w1", true);
    assert_eq!(gives(&out), vec![(1, "w1")]);
    // The head holds the next request: the cluster is full, and short
    // tasks now queue on the busy worker.
    let out = held(&mut m, pending.remove(0));
    assert_eq!(gives(&out), vec![(2, "w1"), (3, "w1")]);
}

#[test]
fn nothing_queues_behind_a_task_that_may_run_long() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    m.acquire(&class, &r, true, || (2, true), &mut out);
    let mut pending = asks(&out);
    let (_, out) = join(&mut m, pending.remove(0), "w1", false);
    assert_eq!(gives(&out), vec![(1, "w1")], "task 2 waits: 1 may be long");
    let out = held(&mut m, pending.remove(0));
    assert!(gives(&out).is_empty());
    // Nor while another worker is being started.
    let (class2, r2) = {
        let mut r = ResourceSet::new();
        r.set("CPU", 2.0);
        let shape = Shape::from(r);
        (class_key(&shape), shape)
    };
    let mut out = Vec::new();
    m.acquire(&class2, &r2, true, || (3, true), &mut out);
    m.acquire(&class2, &r2, true, || (4, true), &mut out);
    let mut pending = asks(&out);
    let second = pending.remove(1);
    let mut scratch = Vec::new();
    m.answered(second, Answer::Granted, &mut scratch);
    let (_, out) = join(&mut m, pending.remove(0), "w2", false);
    assert_eq!(
        gives(&out),
        vec![(3, "w2")],
        "4 waits for the worker on its way"
    );
}

#[test]
fn a_lost_answer_is_asked_again_under_its_id_and_abandoned_when_unwanted() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    let ask = asks(&out).remove(0);
    let mut out = Vec::new();
    m.answered(ask.clone(), Answer::Lost, &mut out);
    let retry = asks(&out).remove(0);
    assert_eq!(
        retry.request_id, ask.request_id,
        "same id: the head may hold its grant"
    );
    assert_eq!(retry.after, BACKOFF_FIRST);
    // A failure that is not a lost answer gets a new id, and backs off
    // further.
    let mut out = Vec::new();
    m.answered(retry.clone(), Answer::Failed, &mut out);
    let third = asks(&out).remove(0);
    assert_ne!(third.request_id, retry.request_id);
    assert_eq!(third.after, BACKOFF_FIRST * 2);
    // Lost again, and meanwhile nobody waits any more (the job ends):
    // the request ends with one last word to the head under its id.
    let mut out = Vec::new();
    m.answered(third, Answer::Lost, &mut out);
    let fourth = asks(&out).remove(0);
    let mut out = Vec::new();
    m.stop(&mut out);
    assert!(!m.still_wanted(&fourth, &mut out));
    assert!(
        matches!(out.as_slice(), [Command::Abandon(a)] if a.request_id == fourth.request_id),
        "{out:?}"
    );
    assert_eq!(m.counts(&class).2, 0, "no request out");
}

#[test]
fn an_infeasible_class_is_reported_once_and_asked_for_slowly() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    let mut ask = asks(&out).remove(0);
    for round in 0..3 {
        let mut out = Vec::new();
        m.answered(ask, Answer::Pending { infeasible: true }, &mut out);
        let warned = out
            .iter()
            .filter(|c| matches!(c, Command::WarnInfeasible(_)))
            .count();
        assert_eq!(warned, usize::from(round == 0));
        ask = asks(&out).remove(0);
        assert_eq!(ask.after, LEASE_WAIT);
    }
}

#[test]
fn a_failed_worker_is_returned_once_with_a_kill_and_replaced() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    let (lease, _) = join(&mut m, asks(&out).remove(0), "w1", true);
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (2, false), &mut out);
    let mut out = Vec::new();
    m.discard(&class, lease, &mut out);
    m.discard(&class, lease, &mut out);
    assert_eq!(returns(&out), vec![("w1", true)]);
    // Task 2 still waits, and a request is out for it.
    assert_eq!(m.counts(&class).1, 1);
    assert!(m.counts(&class).2 >= 1);
    // A late release of task 1's place changes nothing.
    let place = place("w1", lease, &class);
    let mut out = Vec::new();
    m.release(&place, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_place_whose_task_is_gone_goes_to_the_next_waiter() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    m.acquire(&class, &r, false, || (2, false), &mut out);
    let ask = asks(&out).remove(0);
    let (_, out) = join(&mut m, ask, "w1", true);
    let given = out
        .into_iter()
        .find_map(|c| match c {
            Command::Give((1, _), place) => Some(place),
            _ => None,
        })
        .expect("task 1 first");
    let mut out = Vec::new();
    m.unplaced(&given, &mut out);
    assert_eq!(gives(&out), vec![(2, "w1")]);
}

#[test]
fn stopping_returns_idle_leases_now_and_busy_ones_when_answered() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    m.acquire(&class, &r, false, || (2, false), &mut out);
    let mut pending = asks(&out);
    let (l1, _) = join(&mut m, pending.remove(0), "w1", true);
    let (l2, _) = join(&mut m, pending.remove(0), "w2", true);
    let p1 = place("w1", l1, &class);
    let mut out = Vec::new();
    m.release(&p1, &mut out);
    let mut out = Vec::new();
    m.stop(&mut out);
    assert_eq!(returns(&out), vec![("w1", false)]);
    let p2 = place("w2", l2, &class);
    let mut out = Vec::new();
    m.release(&p2, &mut out);
    assert_eq!(returns(&out), vec![("w2", false)]);
    // And no more requests are made.
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (3, false), &mut out);
    assert!(asks(&out).is_empty());
}

#[test]
fn the_request_after_a_grant_that_followed_a_lost_answer_has_a_new_id() {
    // Found by the cluster simulation (shoal-sim, seed 23): a try lost,
    // the retry (same id) granted; the next request reused the id, the
    // head answered with the same lease, and its worker joined twice.
    let (class, r) = cpu();
    let mut m = Machine::default();
    // More tasks wait than requests may be out: the request goes on once
    // its worker has joined.
    let mut out = Vec::new();
    for task in 0..REQUESTS_IN_FLIGHT_MAX as u32 + 2 {
        m.acquire(&class, &r, false, || (task, false), &mut out);
    }
    assert_eq!(asks(&out).len(), REQUESTS_IN_FLIGHT_MAX);
    let first = asks(&out).remove(0);
    let mut out = Vec::new();
    m.answered(first.clone(), Answer::Lost, &mut out);
    let retry = asks(&out).remove(0);
    assert_eq!(retry.request_id, first.request_id);
    let (_, out) = join(&mut m, retry.clone(), "w1", true);
    let next = asks(&out).remove(0);
    assert_ne!(
        next.request_id, retry.request_id,
        "that id's grant is held already"
    );
}

/// A waiting task whose function's shortness is learned while it waits.
struct Judged(u32, std::rc::Rc<std::cell::Cell<bool>>);

impl Waiting for Judged {
    fn short(&self) -> bool {
        self.1.get()
    }
}

#[test]
fn a_waiting_task_is_judged_by_the_runs_that_ended_while_it_waited() {
    // 1 000 tasks submitted at once all wait before any has run: judged
    // when they wait, none would ever be short, and none would queue
    // behind another once the cluster is full (the batch benchmarks lost a
    // fifth of their rate so).
    let (class, r) = cpu();
    let short = std::rc::Rc::new(std::cell::Cell::new(false));
    let mut m: Leases<&'static str, Judged> = Leases::default();
    let mut out = Vec::new();
    for t in 1..=3 {
        let judged = Judged(t, std::rc::Rc::clone(&short));
        m.acquire(&class, &r, false, || judged, &mut out);
    }
    let mut asks: Vec<Ask> = out
        .iter()
        .filter_map(|c| match c {
            Command::Ask(a) => Some(a.clone()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    m.answered(asks.remove(0), Answer::Granted, &mut out);
    let lease = LeaseId::random();
    m.joined(asks.remove(0), ("w1", lease), false, &mut out);
    let first = out
        .into_iter()
        .find_map(|c| match c {
            Command::Give(Judged(1, _), place) => Some(place),
            _ => None,
        })
        .expect("task 1 placed");
    // Task 1's function turned out short; the cluster is full.
    short.set(true);
    let mut out = Vec::new();
    m.answered(
        asks.remove(0),
        Answer::Pending { infeasible: false },
        &mut out,
    );
    m.release(&first, &mut out);
    let given: Vec<u32> = out
        .iter()
        .filter_map(|c| match c {
            Command::Give(Judged(t, _), _) => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(given, vec![2, 3], "3 queues behind 2, now known short");
}

#[test]
fn a_refused_class_fails_its_waiting_tasks_and_asks_no_more() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    m.acquire(&class, &r, false, || (2, false), &mut out);
    let pending = asks(&out);
    assert_eq!(pending.len(), 2);
    let mut out = Vec::new();
    m.answered(
        pending[0].clone(),
        Answer::Refused("node gone".into()),
        &mut out,
    );
    let refused: Vec<u32> = out
        .iter()
        .filter_map(|c| match c {
            Command::Refuse((t, _), why) if why == "node gone" => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![1, 2], "both waiting tasks fail");
    assert!(asks(&out).is_empty(), "no try after a refusal");
    // The other request, answered the same, ends without asking again.
    let mut out = Vec::new();
    m.answered(
        pending[1].clone(),
        Answer::Refused("node gone".into()),
        &mut out,
    );
    assert!(asks(&out).is_empty());
    assert_eq!(m.counts(&class), (0, 0, 0));
}

#[test]
fn an_idle_lease_goes_back_at_once_when_the_cluster_is_full_or_the_owner_is_a_task() {
    let (class, r) = cpu();
    // The cluster had no room when the lease was granted.
    let mut m = Machine::default();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    let (lease, _) = join(&mut m, asks(&out).remove(0), "w1", false);
    let mut out = Vec::new();
    m.release(&place("w1", lease, &class), &mut out);
    assert_eq!(returns(&out), vec![("w1", false)]);
    assert!(arm(&out).is_none(), "no idle clock: {out:?}");

    // An owner that is a task keeps none even with room to spare.
    let mut m = Machine::default();
    m.keep_no_idle();
    let mut out = Vec::new();
    m.acquire(&class, &r, false, || (1, false), &mut out);
    let (lease, _) = join(&mut m, asks(&out).remove(0), "w2", true);
    let mut out = Vec::new();
    m.release(&place("w2", lease, &class), &mut out);
    assert_eq!(returns(&out), vec![("w2", false)]);
    assert!(arm(&out).is_none(), "no idle clock: {out:?}");
    assert_eq!(m.counts(&class), (0, 0, 0));
}

#[test]
fn waiters_taken_out_leave_the_rest_in_order_for_the_next_worker() {
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    for task in 1..=4 {
        assert!(m
            .acquire(&class, &r, false, || (task, false), &mut out)
            .is_none());
    }
    let ask = asks(&out).into_iter().next().expect("a request");
    let taken = m.take_waiters(|(task, _)| task % 2 == 0);
    assert_eq!(taken, vec![(2, false), (4, false)]);
    assert_eq!(m.counts(&class).1, 2, "two still wait");
    assert!(m.take_waiters(|(task, _)| *task == 9).is_empty());
    // The worker that joins goes to the first of those left.
    let (_, out) = join(&mut m, ask, "w1", true);
    assert_eq!(gives(&out), vec![(1, "w1")]);
    assert_eq!(m.counts(&class).1, 1);
}

#[test]
fn no_more_leases_are_asked_than_tasks_wait_while_granted_ones_become_workers() {
    // Three tasks, three requests, all granted; the workers start slowly
    // (a cold node fetches the executable) and join one by one. Each takes
    // a task, and its request ends: no fourth lease, which a slow node's
    // task would have gone to instead (spread tasks missed a node so).
    let (class, r) = cpu();
    let mut m = Machine::default();
    let mut out = Vec::new();
    for task in 0..3 {
        m.acquire(&class, &r, false, || (task, false), &mut out);
    }
    let requests = asks(&out);
    assert_eq!(requests.len(), 3);
    for ask in &requests {
        let mut out = Vec::new();
        m.answered(ask.clone(), Answer::Granted, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
    for (ask, worker) in requests.into_iter().zip(["w1", "w2", "w3"]) {
        let mut out = Vec::new();
        m.joined(ask, (worker, LeaseId::random()), true, &mut out);
        assert_eq!(gives(&out).len(), 1, "{worker} takes a task: {out:?}");
        assert!(asks(&out).is_empty(), "asked again after {worker}: {out:?}");
    }
}
