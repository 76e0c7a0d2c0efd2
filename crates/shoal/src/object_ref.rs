//! Typed references to objects: [`ObjectRef<T>`] and task arguments
//! ([`Arg<T>`]).

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_proto::{Address, ObjectId};

pub use crate::args::{ArgValue, KeepAlive};
use crate::core;
use crate::error::Result;

/// A reference to an object of type `T` somewhere in the cluster: the result
/// of a task, or a value `put` into the store.
///
/// Cheap to clone; `Send`; serializable, so it can travel inside task
/// arguments or other objects, and whoever receives it can [`get`] it. The
/// object is freed when no reference to it is left.
///
/// [`get`]: ObjectRef::get
pub struct ObjectRef<T> {
    /// Shared by the clones: the process's reference count (which frees the
    /// object) counts this, not each clone.
    inner: Arc<Counted>,
    _type: PhantomData<fn() -> T>,
}

/// One counted reference of this process.
struct Counted {
    id: ObjectId,
    owner: Arc<Address>,
    /// The object's slot in this process, once looked up: it stays the same
    /// while a reference lives (slots are made once per id and removed with
    /// the last reference), so `wait`'s scans skip the map.
    slot: std::sync::OnceLock<Arc<crate::owner::objects::Slot>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(core) = core::try_get() {
            core.release_ref(self.id);
        }
    }
}

impl<T> ObjectRef<T> {
    /// Wraps an id this process just registered a reference for.
    pub(crate) fn adopt(id: ObjectId, owner: impl Into<Arc<Address>>) -> Self {
        Self {
            inner: Arc::new(Counted {
                id,
                owner: owner.into(),
                slot: std::sync::OnceLock::new(),
            }),
            _type: PhantomData,
        }
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.inner.id
    }

    /// The process that owns the object.
    pub(crate) fn owner(&self) -> &Address {
        &self.inner.owner
    }
}

impl<T: DeserializeOwned + Send + 'static> ObjectRef<T> {
    /// Waits for the object and returns its value. Safe to call from
    /// threads and from multi-threaded async runtimes; inside a
    /// single-threaded runtime it fails with [`Error::BlockingGetInAsync`]
    /// (use `.await` there).
    ///
    /// [`Error::BlockingGetInAsync`]: crate::Error::BlockingGetInAsync
    pub fn get(&self) -> Result<T> {
        let core = core::get()?;
        if let Some(value) = core.get_here(self.id()) {
            return value;
        }
        let (id, owner, executor) = (
            self.id(),
            self.owner().clone(),
            crate::worker::context::current_executor(),
        );
        core.block_on(async move {
            core::get()?
                .get_value::<T>(id, &owner, None, executor)
                .await
        })
    }

    /// Like [`get`](Self::get), failing with [`Error::Timeout`] after `timeout`.
    ///
    /// [`Error::Timeout`]: crate::Error::Timeout
    pub fn get_timeout(&self, timeout: Duration) -> Result<T> {
        let core = core::get()?;
        let (id, owner, executor) = (
            self.id(),
            self.owner().clone(),
            crate::worker::context::current_executor(),
        );
        core.block_on(async move {
            core::get()?
                .get_value::<T>(id, &owner, Some(timeout), executor)
                .await
        })
    }

    /// Waits for the object without blocking a thread.
    pub async fn get_async(&self) -> Result<T> {
        let core = core::get()?;
        let (id, owner, executor) = (
            self.id(),
            self.owner().clone(),
            crate::worker::context::current_executor(),
        );
        core.spawn_and_wait(async move {
            core::get()?
                .get_value::<T>(id, &owner, None, executor)
                .await
        })
        .await
    }
}

impl<T: DeserializeOwned + Send + 'static> IntoFuture for ObjectRef<T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.get_async().await })
    }
}

impl<T: DeserializeOwned + Send + 'static> IntoFuture for &ObjectRef<T> {
    type Output = Result<T>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let this = self.clone();
        Box::pin(async move { this.get_async().await })
    }
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ObjectRef<{}>({})",
            std::any::type_name::<T>(),
            self.id()
        )
    }
}

impl<T> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl<T> Eq for ObjectRef<T> {}

impl<T> std::hash::Hash for ObjectRef<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state)
    }
}

#[derive(Serialize, Deserialize)]
struct WireRef {
    id: ObjectId,
    owner: Address,
}

impl<T> Serialize for ObjectRef<T> {
    /// Inside a task's argument value the reference is lent to the task
    /// (its owner keeps the object until the task is done, or for the job
    /// if the worker keeps the reference); anywhere else it has escaped
    /// this process, and its owner keeps the object for the rest of the
    /// job (see the crate docs on freeing).
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if let Some(core) = core::try_get() {
            let id = self.id();
            if crate::codec::lend_in_scope(id) {
                core.objects.lend(id);
            } else {
                core.objects.mark_escaped(id);
            }
        }
        WireRef {
            id: self.id(),
            owner: self.owner().clone(),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for ObjectRef<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let wire = WireRef::deserialize(deserializer)?;
        if let Some(core) = core::try_get() {
            core.objects.add_local(wire.id);
        }
        Ok(Self::adopt(wire.id, wire.owner))
    }
}

/// A task argument: a value, or a reference to one (resolved before the
/// task runs). Every parameter of a remote function accepts either.
pub enum Arg<T> {
    /// The value itself, encoded at submission.
    Value(T),
    /// A reference to the value.
    Ref(ObjectRef<T>),
}

impl<T> From<T> for Arg<T> {
    fn from(value: T) -> Self {
        Arg::Value(value)
    }
}

impl<T> From<ObjectRef<T>> for Arg<T> {
    fn from(r: ObjectRef<T>) -> Self {
        Arg::Ref(r)
    }
}

impl<T> From<&ObjectRef<T>> for Arg<T> {
    fn from(r: &ObjectRef<T>) -> Self {
        Arg::Ref(r.clone())
    }
}

/// Encodes one argument (used by the `#[remote]` expansion).
pub(crate) fn arg_value<T: Serialize + Send + 'static>(arg: Arg<T>) -> ArgValue {
    match arg {
        Arg::Value(v) => match crate::codec::lending(|| crate::codec::encode(&v)) {
            (Ok(bytes), lent) if lent.is_empty() => ArgValue::Bytes(bytes),
            (Ok(bytes), lent) => ArgValue::Lending { bytes, lent },
            (Err(e), lent) => {
                // No task will see them.
                if let Some(core) = core::try_get() {
                    let returned = crate::owner::objects::Ended::Returned;
                    core.end_borrows(lent.into_iter().map(|id| (id, returned.clone())));
                }
                ArgValue::Bad(e.to_string())
            }
        },
        Arg::Ref(r) => {
            let (id, owner) = (r.id(), r.owner().clone());
            ArgValue::Ref {
                id,
                owner,
                _keep: Box::new(r),
            }
        }
    }
}

/// Shared by the free functions: the core of an `ObjectRef`.
/// True once the object is ready (or failed); see [`core::Core::is_ready`].
pub(crate) fn is_ready<T>(core: &Arc<core::Core>, r: &ObjectRef<T>) -> bool {
    if let Some(slot) = r.inner.slot.get() {
        return !slot.is_pending();
    }
    match core.slot(r.id(), r.owner()) {
        Some(slot) => !r.inner.slot.get_or_init(|| slot).is_pending(),
        None => false,
    }
}

pub(crate) fn parts<T>(r: &ObjectRef<T>) -> (ObjectId, Address) {
    (r.id(), r.owner().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn object_refs_cross_threads() {
        assert_send_sync::<ObjectRef<Vec<u8>>>();
        assert_send_sync::<ObjectRef<std::rc::Rc<u8>>>();
    }
}
