//! Objects as their owner and borrowers see them: waiting, reading,
//! reference counting (the shell of `owner::objects`).

use shoal_net::sync::MutexExt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use shoal_proto::{
    Address, NodeRequest, ObjectId, ObjectValue, WorkerId, WorkerReply, WorkerRequest,
};
use tokio::sync::watch;
use tracing::debug;

use super::{Core, CONTROL_TIMEOUT, GET};
use crate::error::{Error, Result};
use crate::owner::objects::{Borrows, Ended, Forgotten, ObjState, Slot};
use crate::rt::{park_on, runtime_flavor};
use crate::worker::context::current_executor;
use crate::worker::Executor;

/// Waits until the object is no longer pending; `None` on timeout.
pub(crate) async fn ready(slot: &Slot, deadline: Option<tokio::time::Instant>) -> Option<ObjState> {
    loop {
        let notified = slot.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let state = slot.state();
        if !matches!(state, ObjState::Pending) {
            return Some(state);
        }
        match deadline {
            Some(d) => tokio::time::timeout_at(d, notified).await.ok()?,
            None => notified.await,
        }
    }
}

/// The references a task borrows inside its argument values, shared by
/// its tries (and its lineage, for reruns). When the task is done with
/// them (this is dropped), each borrow ends as [`Borrows::end`] says.
pub(crate) struct Lent(pub(crate) Arc<std::sync::Mutex<Borrows>>);

impl Lent {
    pub(crate) fn new(ids: Vec<ObjectId>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Borrows::new(ids))))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let ends = self.0.locked().end();
        if let Some(core) = super::try_get() {
            core.end_borrows(ends);
        }
    }
}

impl Core {
    /// Ends tasks' borrows (the workers that kept an object become its
    /// borrowers); frees what nothing needs any more.
    pub(crate) fn end_borrows(&self, ends: impl IntoIterator<Item = (ObjectId, Ended)>) {
        for (id, ended) in ends {
            let gone = self.objects.end_borrow(id, ended);
            self.forgotten(id, gone);
        }
    }

    /// A borrower of `id` (a worker this process lent it to) no longer
    /// holds it.
    pub(crate) fn release_borrower(&self, id: ObjectId, worker: shoal_proto::WorkerId) {
        let gone = self.objects.release_borrower(id, worker);
        self.forgotten(id, gone);
    }

    /// Carries out what dropping a use of `id` gave: deletes a stored copy
    /// this process owned, and tells the lenders of one it borrowed that
    /// it no longer holds it.
    fn forgotten(&self, id: ObjectId, gone: Forgotten) {
        if let Some(free) = gone.free {
            self.delete_stored(free.id, free.at);
        }
        for lender in gone.tell {
            let request = WorkerRequest::ReleaseBorrow {
                id,
                borrower: self.me.worker_id,
            };
            let (core, address) = (super::try_get().cloned(), lender.address);
            let Some(core) = core else { return };
            self.deletes.spawn_on(
                async move {
                    let told = match core.worker(&address).await {
                        Ok(lender) => lender
                            .call_idempotent(&request, CONTROL_TIMEOUT)
                            .await
                            .map(drop)
                            .map_err(Error::from),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = told {
                        tracing::debug!(%id, %address, error = %e, "could not tell a lender a borrowed object was dropped");
                    }
                },
                &self.handle,
            );
        }
    }

    /// The slot for `id`: owned, cached, or a new borrow fetched from its owner.
    pub(crate) fn slot(self: &Arc<Self>, id: ObjectId, owner: &Address) -> Option<Arc<Slot>> {
        if let Some(slot) = self.objects.get(id) {
            return Some(slot);
        }
        if owner.worker_id == self.me.worker_id {
            return None;
        }
        let (slot, made) = self.objects.borrow(id);
        if !made {
            return Some(slot);
        }
        let core = Arc::clone(self);
        let owner = owner.clone();
        let fetching = Arc::clone(&slot);
        self.handle.spawn(async move {
            let state = core.fetch_from_owner(id, &owner).await;
            fetching.set(state);
            core.changed.notify_waiters();
        });
        Some(slot)
    }

    async fn fetch_from_owner(&self, id: ObjectId, owner: &Address) -> ObjState {
        loop {
            let owner_client = match self.worker(&owner.address).await {
                Ok(c) => c,
                Err(e) => {
                    return ObjState::OwnerDied(format!(
                        "its owner at {} is unreachable: {e}",
                        owner.address
                    ))
                }
            };
            let ask = WorkerRequest::GetObject {
                id,
                wait_ms: 10_000,
            };
            match owner_client
                .call_idempotent(&ask, Duration::from_secs(20))
                .await
            {
                Ok(WorkerReply::Object(ObjectValue::NotReady)) => continue,
                Ok(WorkerReply::Object(ObjectValue::Inline(bytes))) => {
                    return ObjState::Inline(Arc::new(bytes))
                }
                Ok(WorkerReply::Object(ObjectValue::Stored(at))) => return ObjState::Stored(at),
                Ok(WorkerReply::Object(ObjectValue::Failed(f))) => return ObjState::Failed(f),
                Ok(WorkerReply::Object(ObjectValue::Unknown)) => {
                    return ObjState::Lost("its owner no longer has it".into())
                }
                Ok(other) => return ObjState::Lost(format!("its owner answered {other:?}")),
                Err(e) if e.is_connection_lost() => {
                    return ObjState::OwnerDied(format!(
                        "its owner at {} is gone: {e}",
                        owner.address
                    ))
                }
                Err(e) => {
                    return ObjState::Lost(format!("its owner at {} failed: {e}", owner.address))
                }
            }
        }
    }

    /// Waits for an object's state; `None` if it is unknown or the deadline passed.
    pub(crate) async fn wait_state(
        self: &Arc<Self>,
        id: ObjectId,
        owner: &Address,
        timeout: Option<Duration>,
    ) -> Option<ObjState> {
        let slot = self.slot(id, owner)?;
        ready(&slot, timeout.map(|t| tokio::time::Instant::now() + t)).await
    }

    /// Runs `fut`, a wait for other tasks' results, telling the node that
    /// the task running on `executor` (if any) is blocked meanwhile: its CPUs
    /// are lent back so the tasks it waits for can run (no nested deadlock).
    /// Neither telling is waited for: the CPU is handed back, and taken
    /// again, at once.
    pub(crate) async fn while_blocked<F: Future>(
        self: &Arc<Self>,
        executor: Option<Executor>,
        fut: F,
    ) -> F::Output {
        let Some(executor) = executor else {
            return fut.await;
        };
        // Each waiting get lets one more task pushed to this worker start
        // (it may be the one waited for).
        let gate = self.gates.gate(executor.worker_id);
        gate.add_permits(1);
        self.set_blocked(executor.worker_id, true);
        let out = fut.await;
        self.set_blocked(executor.worker_id, false);
        // Take the lent permit back; if the task it let in still runs, as
        // soon as one ends (this task goes on meanwhile).
        match gate.clone().try_acquire_owned() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.handle.spawn(async move {
                    if let Ok(permit) = gate.acquire_owned().await {
                        permit.forget();
                    }
                });
            }
        }
        out
    }

    /// One more (or one fewer) get of the worker waits: when that changes
    /// whether it is blocked, its teller tells the node (started the first
    /// time).
    fn set_blocked(self: &Arc<Self>, worker_id: WorkerId, blocked: bool) {
        if !self.gates.set_blocked(worker_id, blocked) {
            return;
        }
        if let Some(rx) = self.gates.tell_blocked(worker_id, blocked) {
            self.handle
                .spawn(tell_blocked(Arc::clone(self), worker_id, rx));
        }
    }

    /// The value of an object. `executor` is the worker whose task asks, if
    /// any (see [`Core::while_blocked`]).
    pub(crate) async fn get_value<T: DeserializeOwned>(
        self: &Arc<Self>,
        id: ObjectId,
        owner: &Address,
        timeout: Option<Duration>,
        executor: Option<Executor>,
    ) -> Result<T> {
        let Some(slot) = self.slot(id, owner) else {
            return Err(Error::ObjectLost {
                id,
                reason: "this process does not hold it".into(),
            });
        };
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let ready = if slot.is_pending() {
            self.while_blocked(executor, ready(&slot, deadline)).await
        } else {
            ready(&slot, deadline).await
        };
        let Some(state) = ready else {
            return Err(Error::Timeout(timeout.unwrap_or_default()));
        };
        let bytes = match state {
            ObjState::Inline(bytes) => crate::shm::Blob::Owned(bytes),
            ObjState::Stored(at) => match self.fetch_stored(id, &at, GET).await {
                Ok(bytes) => bytes,
                // The copy is gone (its node died): a task result is made
                // again from its lineage.
                Err(Error::ObjectLost { reason, .. }) if slot.owned => {
                    let at = self.reconstruct(id, &at, reason).await?;
                    self.fetch_stored(id, &at, GET).await?
                }
                // A borrowed copy is gone: ask its owner again (it may have
                // rebuilt it, or be gone too).
                Err(Error::ObjectLost { reason, .. }) => {
                    match self.fetch_from_owner(id, owner).await {
                        ObjState::Stored(now) if now != at => {
                            slot.set(ObjState::Stored(now.clone()));
                            self.fetch_stored(id, &now, GET).await?
                        }
                        ObjState::OwnerDied(why) => {
                            slot.set(ObjState::OwnerDied(why.clone()));
                            return Err(Error::OwnerDied { id, reason: why });
                        }
                        _ => return Err(Error::ObjectLost { id, reason }),
                    }
                }
                Err(e) => return Err(e),
            },
            ObjState::Failed(f) => return Err(Error::from_failure(f)),
            ObjState::Lost(reason) => return Err(Error::ObjectLost { id, reason }),
            ObjState::OwnerDied(reason) => return Err(Error::OwnerDied { id, reason }),
            ObjState::Pending => return Err(Error::Timeout(timeout.unwrap_or_default())),
        };
        decode_object(id, &bytes)
    }

    /// Waits until `want` of `objects` are ready or the timeout passes;
    /// returns which are ready.
    pub(crate) async fn wait_many(
        self: &Arc<Self>,
        objects: &[(ObjectId, Address)],
        want: usize,
        timeout: Option<Duration>,
    ) -> Vec<bool> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let flags: Vec<bool> = objects
                .iter()
                .map(|(id, owner)| self.is_ready(*id, owner))
                .collect();
            if flags.iter().filter(|f| **f).count() >= want {
                return flags;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return objects
                            .iter()
                            .map(|(id, owner)| self.is_ready(*id, owner))
                            .collect();
                    }
                }
                None => notified.await,
            }
        }
    }

    /// True once the object is ready (or failed).
    pub(crate) fn is_ready(self: &Arc<Self>, id: ObjectId, owner: &Address) -> bool {
        if let Some(ready) = self.objects.with(id, |slot| !slot.is_pending()) {
            return ready;
        }
        self.slot(id, owner).is_some_and(|s| !s.is_pending())
    }

    /// Drops one local reference; frees the object when it was the last.
    pub(crate) fn release_ref(&self, id: ObjectId) {
        let gone = self.objects.release(id);
        self.forgotten(id, gone);
    }

    /// Keeps a small encoded value this process owns (no runtime involved).
    pub(crate) fn put_inline(&self, bytes: Vec<u8>) -> ObjectId {
        let id = self.next_put_id();
        self.own(id, ObjState::Inline(Arc::new(bytes)));
        id
    }

    /// The value of an object already here in memory (or its failure),
    /// without the runtime: `None` when it must be waited for or read
    /// from a store.
    pub(crate) fn try_get_here<T: DeserializeOwned>(&self, id: ObjectId) -> Option<Result<T>> {
        // A blocking get is refused inside a single-threaded runtime whether
        // or not the value is ready (block_on says so).
        if runtime_flavor() == Some(tokio::runtime::RuntimeFlavor::CurrentThread) {
            return None;
        }
        let state = self
            .objects
            .with(id, |slot| {
                slot.with_state(|state| match state {
                    ObjState::Inline(bytes) => Some(Ok(Arc::clone(bytes))),
                    ObjState::Failed(f) => Some(Err(Error::from_failure(f.clone()))),
                    ObjState::Pending
                    | ObjState::Stored(_)
                    | ObjState::Lost(_)
                    | ObjState::OwnerDied(_) => None,
                })
            })
            .flatten()?;
        Some(state.and_then(|bytes| decode_object(id, &crate::shm::Blob::Owned(bytes))))
    }

    /// [`Core::try_get_here`], parking this thread first (outside the
    /// runtime) while the object is pending.
    pub(crate) fn get_here<T: DeserializeOwned>(&self, id: ObjectId) -> Option<Result<T>> {
        self.try_get_here(id)
            .or_else(|| self.wait_here(id).then(|| self.try_get_here(id)).flatten())
    }

    /// Blocks this thread (outside any runtime and task) until an object
    /// this process already tracks is no longer pending; false when that
    /// cannot be done here (the caller then waits through the runtime).
    /// One wake-up from the completing thread, no runtime task in between.
    pub(crate) fn wait_here(&self, id: ObjectId) -> bool {
        if tokio::runtime::Handle::try_current().is_ok() || current_executor().is_some() {
            return false;
        }
        let Some(slot) = self.objects.get(id) else {
            return false;
        };
        park_on(ready(&slot, None));
        true
    }

    /// Stores a large encoded value this process owns in its home node's
    /// store (from a host other than the store's).
    pub(crate) async fn put_stored(self: &Arc<Self>, bytes: Vec<u8>) -> Result<ObjectId> {
        self.put_stored_at(&bytes).await.map(|(id, _)| id)
    }

    /// [`Core::put_stored`], saying where the object is.
    pub(crate) async fn put_stored_at(
        self: &Arc<Self>,
        bytes: &[u8],
    ) -> Result<(ObjectId, shoal_proto::StoredAt)> {
        let id = self.next_put_id();
        let at = self
            .store_on_node(id, bytes, Some(self.me.worker_id))
            .await?;
        self.own(id, ObjState::Stored(at.clone()));
        Ok((id, at))
    }

    /// A pending slot for an object this process will own.
    pub(crate) fn register_pending(&self, id: ObjectId) {
        self.own(id, ObjState::Pending);
    }

    /// Records an object this process owns, with one local reference.
    pub(crate) fn own(&self, id: ObjectId, state: ObjState) {
        self.objects.own(id, state);
    }

    /// Sets an owned object's final state (freeing a stored result nobody
    /// holds a reference to any more), and wakes `wait`.
    pub(crate) fn complete_object(&self, id: ObjectId, state: ObjState) {
        if let Some(free) = self.objects.complete(id, state) {
            self.delete_stored(free.id, free.at);
        }
        self.changed.notify_waiters();
    }

    /// An owned object's value for a borrower; waits up to `wait`.
    pub(crate) async fn object_value(&self, id: ObjectId, wait: Duration) -> ObjectValue {
        let Some(slot) = self.objects.owned(id) else {
            return ObjectValue::Unknown;
        };
        match ready(&slot, Some(tokio::time::Instant::now() + wait)).await {
            None | Some(ObjState::Pending) => ObjectValue::NotReady,
            Some(ObjState::Inline(bytes)) => ObjectValue::Inline(bytes.to_vec()),
            Some(ObjState::Stored(at)) => ObjectValue::Stored(at),
            Some(ObjState::Failed(f)) => ObjectValue::Failed(f),
            Some(ObjState::Lost(_) | ObjState::OwnerDied(_)) => ObjectValue::Unknown,
        }
    }
}

/// An object's bytes decoded as `T`.
fn decode_object<T: DeserializeOwned>(id: ObjectId, bytes: &crate::shm::Blob) -> Result<T> {
    crate::shm::decode(bytes).map_err(|e| Error::Decode {
        what: format!("object {id} as {}", std::any::type_name::<T>()),
        message: e.to_string(),
    })
}

/// Tells the node each change of whether `worker_id` is blocked, in order;
/// changes made while one is told are told as the latest state only. A
/// change the node did not take (it could not reach the head, or the head
/// refused it) is told again, with backoff, until it is taken or undone:
/// the node keeps its pool in step with what the head took, and until the
/// head hears that the worker is blocked the worker's CPU stays lent out.
/// Ends with the process.
async fn tell_blocked(core: Arc<Core>, worker_id: WorkerId, mut want: watch::Receiver<bool>) {
    const RETRY_FIRST: Duration = Duration::from_millis(50);
    const RETRY_MAX: Duration = Duration::from_secs(2);
    let mut told = false;
    let mut retry = RETRY_FIRST;
    loop {
        let blocked = *want.borrow_and_update();
        if blocked != told {
            let tell = NodeRequest::WorkerBlocked { worker_id, blocked };
            let taken = match core.node(&core.home.address).await {
                Ok(node) => node
                    .call_idempotent(&tell, CONTROL_TIMEOUT)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match taken {
                Ok(()) => {
                    told = blocked;
                    retry = RETRY_FIRST;
                }
                Err(e) => {
                    debug!(error = %e, blocked, retry_ms = retry.as_millis() as u64,
                        "the node did not take the worker's blocked state; telling it again");
                    tokio::select! {
                        changed = want.changed() => if changed.is_err() { return },
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        if want.changed().await.is_err() {
            return;
        }
    }
}
