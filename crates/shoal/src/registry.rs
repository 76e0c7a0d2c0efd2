//! The link-time registry of remote functions.
//!
//! `#[shoal::remote]` submits a [`RemoteFunction`] with `inventory`; a worker
//! looks a function up by name and checks its signature hash. Only what was
//! compiled into the executable can run: no code travels on the wire.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use crate::exec::InvokeError;

/// A boxed future, as async functions' invokers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Encoded arguments in, encoded result (or why not) out.
pub type Invocation = Result<Vec<u8>, InvokeError>;

/// Calls the function with encoded arguments and encodes its result.
pub enum Invoker {
    /// A plain `fn`: runs on a blocking thread.
    Sync(fn(crate::shm::Args) -> Invocation),
    /// An `async fn`: runs on the worker's runtime.
    Async(fn(crate::shm::Args) -> BoxFuture<Invocation>),
}

/// A registered remote function.
pub struct RemoteFunction {
    /// `module_path!()` of its companion module: the crate path and name.
    pub name: &'static str,
    /// Hash of its signature as written.
    pub signature: u64,
    /// How to call it.
    pub invoke: Invoker,
}

/// The registry entry `inventory` collects.
pub struct Registered(pub &'static RemoteFunction);

inventory::collect!(Registered);

/// A function in this executable's table.
pub(crate) struct Entry {
    pub function: &'static RemoteFunction,
    /// Its last run was quick (see [`crate::exec::inline_slot`]).
    pub quick: std::sync::atomic::AtomicBool,
}

fn table() -> &'static HashMap<&'static str, Entry> {
    static TABLE: OnceLock<HashMap<&'static str, Entry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        inventory::iter::<Registered>
            .into_iter()
            .map(|r| {
                let entry = Entry {
                    function: r.0,
                    quick: Default::default(),
                };
                (r.0.name, entry)
            })
            .collect()
    })
}

/// The function registered under `name`.
pub fn lookup(name: &str) -> Option<&'static RemoteFunction> {
    entry(name).map(|e| e.function)
}

/// The table entry of the function registered under `name`.
pub(crate) fn entry(name: &str) -> Option<&'static Entry> {
    table().get(name)
}

/// A digest of the whole function table (names and signatures), so a
/// worker built from other code can be told apart.
pub fn digest() -> u64 {
    let mut entries: Vec<(&str, u64)> = table()
        .iter()
        .map(|(n, e)| (*n, e.function.signature))
        .collect();
    entries.sort();
    entries.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, (n, s)| {
        n.bytes()
            .chain(s.to_le_bytes())
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    })
}

/// An actor's state, as its host holds it.
pub type ActorState = Box<dyn std::any::Any + Send + Sync>;

/// Shared read access to an actor's state, held across an `async` method.
pub type ReadGuard = tokio::sync::OwnedRwLockReadGuard<ActorState>;
/// Exclusive access to an actor's state, held across an `async` method.
pub type WriteGuard = tokio::sync::OwnedRwLockWriteGuard<ActorState>;

/// How to call one actor method: by receiver and asyncness.
pub enum MethodInvoker {
    /// `fn m(&self, ..)`: may run on several threads at once.
    Ref(fn(&ActorState, crate::shm::Args) -> Invocation),
    /// `fn m(&mut self, ..)`: runs alone.
    Mut(fn(&mut ActorState, crate::shm::Args) -> Invocation),
    /// `async fn m(&self, ..)`: interleaves with other such calls.
    AsyncRef(fn(ReadGuard, crate::shm::Args) -> BoxFuture<Invocation>),
    /// `async fn m(&mut self, ..)`: runs alone.
    AsyncMut(fn(WriteGuard, crate::shm::Args) -> BoxFuture<Invocation>),
}

/// A registered actor class: its constructor and methods.
pub struct ActorClass {
    /// `module_path!()` and the type's name.
    pub name: &'static str,
    /// Runs the constructor on encoded arguments.
    pub construct: fn(crate::shm::Args) -> Result<ActorState, InvokeError>,
    /// The methods, by name.
    pub methods: &'static [(&'static str, MethodInvoker)],
}

/// The registry entry `inventory` collects for actor classes.
pub struct RegisteredActor(pub &'static ActorClass);

inventory::collect!(RegisteredActor);

/// The actor class registered under `name`.
pub fn actor_class(name: &str) -> Option<&'static ActorClass> {
    static TABLE: OnceLock<HashMap<&'static str, &'static ActorClass>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            inventory::iter::<RegisteredActor>
                .into_iter()
                .map(|r| (r.0.name, r.0))
                .collect()
        })
        .get(name)
        .copied()
}
