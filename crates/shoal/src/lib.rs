//! The Shoal SDK: ordinary Rust functions, run as tasks across the cores of a
//! machine or the machines of a cluster, with typed references to their
//! results.
//!
//! ```no_run
//! use shoal::prelude::*;
//!
//! #[shoal::remote]
//! fn add(a: i64, b: i64) -> i64 { a + b }
//!
//! fn main() -> shoal::Result<()> {
//!     // Must come first: in a worker process, init runs the worker loop and
//!     // never returns. With no SHOAL_ADDRESS it starts a local cluster.
//!     let _shoal = shoal::init(shoal::Config::from_env())?;
//!     let x: ObjectRef<i64> = add::remote(1, 2);
//!     let y = add::remote(x.clone(), 10); // a ref where a value is expected
//!     assert_eq!(y.get()?, 13);
//!     Ok(())
//! }
//! ```
//!
//! # How it runs
//! Workers are this program's own executable, re-run by a node daemon in
//! worker mode (an environment variable tells `init`); functions are found
//! by name in a link-time registry, so only code compiled into the program
//! runs. In local mode (no address) a head and a node run inside this
//! process and workers are threads, unless [`Config::worker_processes`].
//!
//! # Objects and freeing
//! Values up to 100 KiB travel inline and live in the owner's memory; larger
//! ones stay in the store of the node that made them and are pulled in parts
//! by whoever reads them. An object is freed when the last reference to it in
//! its owner is dropped and nothing borrows it. A reference inside a task's
//! or actor call's argument value is lent to it: when it is done (or, for a
//! stored result that may be made again, when the result goes), its object
//! is freed with the owner's last reference, unless the worker still holds
//! the reference (an actor keeps it, a thread, a task of its own still
//! running): the worker is then a borrower, and tells the process that lent
//! it when it lets go (Ray's borrower protocol). A worker lost before it
//! answered keeps what it was lent until the job ends, and so does a
//! reference serialized anywhere else (inside a `put` value, a return value,
//! an actor's constructor arguments).
//!
//! Modules, from the bottom up: `codec`, `shm` and [`registry`] (values,
//! buffers and the functions compiled in); `owner` (the owner's state
//! machines: leases, tasks, objects; no I/O); `worker` (the worker side:
//! its service, running tasks, the actor host); `core` (the shell that owns
//! connections and carries out the owner's decisions); [`object_ref`],
//! [`generator`] and [`actor`] (the handles users hold); `process` (worker mode); `local`
//! (local mode: the `shoal-local` crate's in-process cluster, with the
//! thread workers; the `local` feature, on by default) and [`client`].
//!
//! # Features
//! - `local` (default): local mode. Without it the SDK only joins clusters
//!   (`SHOAL_ADDRESS`), `init` with no address fails with
//!   [`Error::NotInitialized`], and the head and the node daemon are not
//!   built into the program.

#![warn(missing_docs)]

// Lets the macros' `::shoal::` paths work inside this crate too.
#[allow(unused_extern_crates)]
extern crate self as shoal;

pub mod actor;
mod args;
mod bytes;
pub mod client;
mod codec;
mod config;
mod core;
mod driver;
mod error;
pub mod generator;
pub mod kv;
#[cfg(feature = "local")]
pub mod local;
pub mod object_ref;
mod options;
#[doc(hidden)]
pub mod owner;
pub mod placement_group;
mod process;
pub mod registry;
mod rt;
mod scheduling;
mod shm;
mod turns;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use actor::{Actor, ActorHandle, ActorOptions};
pub use bytes::Bytes;
pub use client::ClusterClient;
pub use config::Config;
pub use driver::{init, Shoal};
pub use error::{Error, Result, TaskError};
pub use futures_util::Stream;
pub use generator::ObjectRefGenerator;
#[cfg(feature = "local")]
pub use local::{LocalCluster, LocalClusterExt, LocalConfig, LocalError};
pub use object_ref::{Arg, ObjectRef};
pub use options::TaskOptions;
pub use placement_group::{
    get_placement_group, placement_group, placement_group_with, remove_placement_group, Bundle,
    PlacementGroup, PlacementGroupOptions, PlacementStrategy,
};
pub use scheduling::Strategy;
pub use shm::{Buffer, BufferMut, Number};
pub use shoal_macros::{actor, main, method, remote};
pub use shoal_proto::{
    ClusterStatus, JobId, NodeId, NodeState, NodeStatus, ObjectId, ResourceSet, TaskId, WorkerId,
};

/// What most programs need: `use shoal::prelude::*;`.
pub mod prelude {
    pub use crate::{ActorHandle, Arg, Bytes, Config, Error, ObjectRef, Result, TaskError};
}

/// The live actor named `name` in `namespace`, as a handle of type `A`
/// (an error if it is of another class, or there is none).
pub fn get_actor<A: Actor>(name: &str, namespace: &str) -> Result<ActorHandle<A>> {
    actor::get_named(name, namespace)
}

/// Ends an actor's worker now; calls in flight fail with
/// [`Error::ActorDied`]. With `no_restart` (or no restarts left) the actor
/// is dead for good: later calls fail the same way and its name is free
/// again. Otherwise it restarts as after a crash, and later calls go to the
/// new incarnation.
pub fn kill<A: Actor>(actor: &ActorHandle<A>, no_restart: bool) -> Result<()> {
    actor::kill(actor.as_raw(), no_restart)
}

/// Cancels the task or actor call that makes `object` (as Ray's
/// `ray.cancel`). Its reference gives [`Error::Cancelled`] at once. A task
/// not started yet never starts; a running one sees
/// [`is_cancelled`] turn true, and an async one is dropped at its next
/// `.await`. The tasks and calls it submitted are cancelled too
/// (recursively). An actor call waiting for its turn never runs. A task or
/// call that has ended is left as it is. Works from any process holding the
/// reference (the cancel goes to the object's owner).
pub fn cancel<T>(object: &ObjectRef<T>) -> Result<()> {
    cancel_with(object, false)
}

/// [`cancel`], and the task's worker process is stopped (a sync task that
/// never looks at [`is_cancelled`] stops too). For an actor call it is
/// [`cancel`]: stopping the worker would end the actor (use [`kill`]). In
/// local mode with thread workers, the worker's service stops and its
/// thread runs the function to its end.
pub fn cancel_force<T>(object: &ObjectRef<T>) -> Result<()> {
    cancel_with(object, true)
}

fn cancel_with<T>(object: &ObjectRef<T>, force: bool) -> Result<()> {
    let core = core::get()?;
    let (id, owner) = object_ref::parts(object);
    core.block_on(async move { core::get()?.cancel(id, &owner, force).await })
}

/// True inside a task or actor call that has been cancelled (by
/// [`cancel`], a timeout, or the cancel of the task that submitted it):
/// long-running sync code checks it and returns early. False elsewhere.
pub fn is_cancelled() -> bool {
    let Some(task) = worker::context::current_task() else {
        return false;
    };
    core::get().is_ok_and(|core| worker::Process::cancels(&*core).is_cancelled(task))
}

/// Where the calling code runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    /// The job.
    pub job_id: shoal_proto::JobId,
    /// The node: for a task, the node it runs on; for a driver, the node it
    /// puts objects on.
    pub node_id: NodeId,
    /// This process's (or thread worker's) id.
    pub worker_id: WorkerId,
    /// The task running, if any.
    pub task_id: Option<TaskId>,
    /// The GPU devices this task or actor was given (as in its worker's
    /// `CUDA_VISIBLE_DEVICES`); empty for a driver.
    pub gpu_ids: Vec<u32>,
}

/// Where the calling code runs (like Ray's `get_runtime_context()`).
pub fn context() -> Result<Context> {
    let core = core::get()?;
    let executor = worker::context::current_executor();
    Ok(Context {
        job_id: core.job_id,
        node_id: executor.map_or(core.home.node_id, |e| e.node_id),
        worker_id: executor.map_or(core.me.worker_id, |e| e.worker_id),
        task_id: worker::context::current_task(),
        gpu_ids: scheduling::gpu_ids(executor.map(|e| e.worker_id)),
    })
}

/// Waits for an object and returns its value (see [`ObjectRef::get`]).
pub fn get<T: DeserializeOwned + Send + 'static>(object: &ObjectRef<T>) -> Result<T> {
    object.get()
}

/// Waits for every object, in order, and returns their values.
pub fn get_all<T: DeserializeOwned + Send + 'static>(objects: &[ObjectRef<T>]) -> Result<Vec<T>> {
    let core = core::get()?;
    // The values already here are decoded on this thread; the runtime only
    // waits for the rest.
    let mut out = Vec::with_capacity(objects.len());
    for object in objects {
        match core.get_here::<T>(object.id()) {
            Some(value) => out.push(value?),
            None => break,
        }
    }
    if out.len() == objects.len() {
        return Ok(out);
    }
    let parts: Vec<_> = objects[out.len()..].iter().map(object_ref::parts).collect();
    let executor = worker::context::current_executor();
    core.block_on(async move {
        let core = core::get()?;
        for (id, owner) in &parts {
            out.push(core.get_value::<T>(*id, owner, None, executor).await?);
        }
        Ok(out)
    })
}

/// Stores a value and returns a reference to it. Values over 100 KiB go to
/// this machine's node store; when it is full, fails with
/// [`Error::ObjectStoreFull`].
pub fn put<T: Serialize + Send + 'static>(value: T) -> Result<ObjectRef<T>> {
    // References inside it escape, even if this runs while an argument is
    // encoded (a user's `Serialize`): the object may be read any time.
    codec::escaping(|| put_escaping(value))
}

fn put_escaping<T: Serialize + Send + 'static>(value: T) -> Result<ObjectRef<T>> {
    let core = driver::ensure_core();
    let encode_error = |e: codec::CodecError| Error::Encode {
        what: "put value".into(),
        message: e.to_string(),
    };
    // A small value is kept in this process; a large one goes straight
    // into its file in the node's store when the store is on this host.
    let id = match codec::encode_small(&value, core::INLINE_BYTES_MAX).map_err(encode_error)? {
        Some(bytes) => core.put_inline(bytes),
        None => {
            let size = codec::encoded_len(&value).map_err(encode_error)?;
            let id = match core.put_streamed(&value, size)? {
                Some(id) => id,
                None => {
                    let bytes = codec::encode(&value).map_err(encode_error)?;
                    let core2 = Arc::clone(&core);
                    core.block_on(async move { core2.put_stored(bytes).await })?
                }
            };
            if size >= DROP_ASIDE_BYTES {
                drop_aside(value);
            }
            id
        }
    };
    Ok(ObjectRef::adopt(id, Arc::clone(&core.me_shared)))
}

/// Values put of at least this size are freed on a thread of their own.
const DROP_ASIDE_BYTES: u64 = 8 << 20;

/// Frees a large value the caller no longer has, on another thread: giving
/// hundreds of MB back to the system costs tens of milliseconds that the
/// caller of `put` need not wait for (its copy is in the store).
fn drop_aside<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new()
        .name("shoal-free".into())
        .spawn(move || drop(value));
    // Without a thread the value was dropped with the closure, here.
    drop(spawned);
}

/// The ready references and the others, as [`wait`] returns them.
pub type Split<T> = (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>);

/// Waits until `num_returns` of `objects` are ready (or failed), or until
/// `timeout`. Returns the ready ones and the others, each in input order.
pub fn wait<T>(
    objects: &[ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> Result<Split<T>> {
    let core = core::get()?;
    let want = num_returns.min(objects.len());
    // Enough already ready: no need for the runtime.
    let here: Vec<bool> = objects
        .iter()
        .map(|o| object_ref::is_ready(&core, o))
        .collect();
    let flags = if here.iter().filter(|r| **r).count() >= want {
        here
    } else {
        let parts: Vec<_> = objects.iter().map(object_ref::parts).collect();
        let executor = worker::context::current_executor();
        core.block_on(async move {
            let core = core::get()?;
            Ok(core
                .while_blocked(executor, core.wait_many(&parts, want, timeout))
                .await)
        })?
    };
    let (mut ready, mut pending) = (Vec::new(), Vec::new());
    for (object, is_ready) in objects.iter().zip(flags) {
        if is_ready && ready.len() < want {
            ready.push(object.clone());
        } else {
            pending.push(object.clone());
        }
    }
    Ok((ready, pending))
}

/// Used by the macros' expansions; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::object_ref::ArgValue;
    pub use crate::process::run_worker_if_worker;
    pub use crate::registry::{decode_arg, encode_return, join_returns, InvokeError};
    pub use crate::registry::{BoxFuture, Invoker, Registered, RemoteFunction};
    pub use crate::shm::{Args, Blob};
    pub use inventory;

    use crate::{Arg, ObjectRef, TaskOptions};
    use std::sync::Arc;

    /// Submits a task of `function`.
    pub fn submit<T>(
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> ObjectRef<T> {
        let core = crate::driver::ensure_core();
        let id = core.submit(function, options, args);
        ObjectRef::adopt(id, Arc::clone(&core.me_shared))
    }

    pub use crate::generator::{drive_iter, drive_stream};

    /// Submits a streaming generator's task.
    pub fn submit_generator<T>(
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> crate::ObjectRefGenerator<T> {
        let core = crate::driver::ensure_core();
        let (generator, id) = core.submit_generator(function, options, args);
        let result = ObjectRef::adopt(id, Arc::clone(&core.me_shared));
        crate::ObjectRefGenerator::new(core, generator, result)
    }

    /// Submits a task of several returns: the first's id and its owner.
    pub fn submit_returns(
        function: &'static RemoteFunction,
        options: TaskOptions,
        args: Vec<ArgValue>,
    ) -> (crate::ObjectId, Arc<shoal_proto::Address>) {
        let core = crate::driver::ensure_core();
        let id = core.submit(function, options, args);
        (id, Arc::clone(&core.me_shared))
    }

    /// The reference to return `index` of the task [`submit_returns`]
    /// submitted (each counted once for the caller at submission).
    pub fn return_ref<T>(
        first: &(crate::ObjectId, Arc<shoal_proto::Address>),
        index: u32,
    ) -> ObjectRef<T> {
        ObjectRef::adopt(first.0.task_id().return_object(index), Arc::clone(&first.1))
    }

    pub use crate::actor::RawActor;
    pub use crate::registry::{
        ActorClass, ActorState, MethodInvoker, ReadGuard, RegisteredActor, WriteGuard,
    };

    /// Creates an actor of `A`.
    pub fn create_actor<A: crate::Actor>(
        options: crate::ActorOptions,
        args: Vec<ArgValue>,
    ) -> crate::Result<crate::ActorHandle<A>> {
        crate::actor::create(options, args)
    }

    /// Calls an actor method.
    pub fn call_actor<T>(
        actor: &RawActor,
        method: &'static str,
        args: Vec<ArgValue>,
    ) -> ObjectRef<T> {
        crate::actor::call(actor, method, args)
    }

    /// Closes this process's connections to workers, as a network blip
    /// would; returns how many were open. For tests of what callers do
    /// then (actor calls in flight must be sent again, not failed).
    pub fn testing_close_worker_connections() -> usize {
        crate::driver::ensure_core().close_worker_connections()
    }

    /// Encodes one argument.
    pub fn arg<T: serde::Serialize + Send + 'static>(arg: Arg<T>) -> ArgValue {
        crate::object_ref::arg_value(arg)
    }
}
