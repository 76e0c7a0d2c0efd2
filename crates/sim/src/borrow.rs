//! Borrowed references under faults. Each top-level task carries, inside
//! its argument value, a reference to a stored object of the driver's; the
//! driver drops its own reference at once, so only the task's borrow keeps
//! the object. A worker keeps the reference past its task now and then (in
//! a thread, say), and a parent lends it on to its children. Every process
//! counts with the SDK's own table (`owner::objects::Objects`), and owners
//! decide with its `Borrows`, as the SDK's shell does.
//!
//! The invariant: an object is never freed while a live worker holds a
//! reference to it, lent it on to a task of its own, or has a task queued
//! or running with it.

use std::collections::BTreeMap;

use shoal::owner::objects::{Borrows, Ended, ObjState, Objects};
use shoal_proto::{ObjectId, StoredAt, TaskId, WorkerId};

use crate::msg::{Pid, DRIVER};
use crate::sim::Sim;

/// The processes' tables and the owners' borrows.
#[derive(Default)]
pub struct Lending {
    /// Each process's objects and references.
    pub tables: BTreeMap<Pid, Objects>,
    /// Per owner and task: what the task borrows.
    borrows: BTreeMap<(Pid, u64), Borrows>,
    /// Objects freed, and borrows that ended kept, for the report.
    pub freed: u64,
    pub kept: u64,
}

/// The id of the driver's object number `n`.
pub fn object_id(n: u64) -> ObjectId {
    TaskId::from_uuid(uuid::Uuid::from_u128((u128::from(n) << 64) | 0xb0)).return_object(0)
}

impl Sim {
    fn table(&mut self, pid: Pid) -> &Objects {
        self.lending.tables.entry(pid).or_default()
    }

    /// The driver makes object `n` and lends it to task `task`, then drops
    /// its own reference.
    pub fn driver_lends(&mut self, task: u64, n: u64) {
        let id = object_id(n);
        let at = StoredAt {
            node_id: shoal_proto::NodeId::from_uuid(uuid::Uuid::from_u128(0xd0)),
            node_address: "198.18.0.1:7000".into(),
            size: 1 << 20,
        };
        let table = self.table(DRIVER);
        table.own(id, ObjState::Stored(at));
        table.lend(id);
        if table.release(id).free.is_some() {
            self.violate(format!("object {n} freed while task {task} borrows it"));
        }
        let borrows = Borrows::new(vec![id]);
        self.lending.borrows.insert((DRIVER, task), borrows);
    }

    /// A worker that runs a parent lends its reference on to a child.
    pub fn lend_on(&mut self, owner: Pid, child: u64, n: u64) {
        let id = object_id(n);
        self.table(owner).lend(id);
        self.lending
            .borrows
            .insert((owner, child), Borrows::new(vec![id]));
    }

    /// A try of `task` goes to a worker: the object it lends, if any.
    pub fn borrow_sent(&mut self, owner: Pid, task: u64) -> Option<u64> {
        let borrows = self.lending.borrows.get_mut(&(owner, task))?;
        borrows.sent();
        borrows.ids().first().map(|id| object_number(*id))
    }

    /// A try of `task` was answered (the worker still holding the object
    /// when `kept`), or ended without an answer.
    pub fn borrow_tried(&mut self, owner: Pid, task: u64, answered: Option<bool>) {
        let Some(borrows) = self.lending.borrows.get_mut(&(owner, task)) else {
            return;
        };
        match answered {
            Some(kept) => {
                let kept: Vec<ObjectId> = if kept {
                    borrows.ids().to_vec()
                } else {
                    Vec::new()
                };
                // The worker becomes a borrower; simulated workers never
                // say they let go, so the object stays while one may
                // hold it (the invariant checked below).
                let worker = WorkerId::from_uuid(uuid::Uuid::from_u128(0x3e));
                borrows.answered(&kept, worker);
            }
            None => borrows.lost(),
        }
    }

    /// `task` is done: its borrows end; a freed object is checked against
    /// every live worker.
    pub fn borrow_end(&mut self, owner: Pid, task: u64) {
        let Some(mut borrows) = self.lending.borrows.remove(&(owner, task)) else {
            return;
        };
        for (id, ended) in borrows.end() {
            let kept = matches!(ended, Ended::Kept(_) | Ended::Escaped);
            self.lending.kept += u64::from(kept);
            let Some(free) = self.table(owner).end_borrow(id, ended).free else {
                continue;
            };
            self.lending.freed += 1;
            if let Some(holder) = self.holder_of(free.id) {
                let n = object_number(free.id);
                self.violate(format!("object {n} freed while {holder} holds it"));
                return;
            }
        }
    }

    /// A live worker that may still read `id`, if there is one.
    fn holder_of(&self, id: ObjectId) -> Option<String> {
        let n = object_number(id);
        self.workers.values().filter(|w| w.alive).find_map(|w| {
            let table = self.lending.tables.get(&w.pid);
            if table.is_some_and(|t| t.still_borrowed(id)) {
                return Some(format!(
                    "{:?} (a reference, or a task it lent it to)",
                    w.pid
                ));
            }
            w.has_job_with(n)
                .then(|| format!("{:?} (a task queued or running with it)", w.pid))
        })
    }

    /// A worker starts a task whose argument holds object `n`: the
    /// reference is decoded (one more local reference).
    pub fn worker_takes(&mut self, pid: Pid, n: u64) {
        self.table(pid).add_local(object_id(n));
    }

    /// A worker's task with object `n` ends: it keeps the reference now
    /// and then, else drops it; whether it still holds it (for the reply).
    pub fn worker_done_with(&mut self, pid: Pid, n: u64) -> bool {
        let id = object_id(n);
        if !self.rng.chance(0.15) {
            // A borrower frees nothing: the owner does.
            let _ = self.table(pid).release(id);
        }
        self.table(pid).still_borrowed(id)
    }
}

/// The number of the driver's object `id`.
pub fn object_number(id: ObjectId) -> u64 {
    (id.task_id().as_uuid().as_u128() >> 64) as u64
}
