//! The link-time registry of remote functions.
//!
//! `#[shoal::remote]` submits a [`RemoteFunction`] with `inventory`; a worker
//! looks a function up by name and checks its signature hash. Only what was
//! compiled into the executable can run: no code travels on the wire.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::FailureKind;

/// A boxed future, as async functions' invokers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Encoded arguments in, encoded result (or why not) out.
pub type Invocation = Result<Vec<u8>, InvokeError>;

/// Why invoking a function failed (other than a panic).
#[derive(Debug)]
pub struct InvokeError {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
}

impl InvokeError {
    /// An actor method was called on state of another type (a bug).
    pub fn wrong_actor(expected: &str) -> Self {
        Self {
            kind: FailureKind::FunctionNotFound,
            message: format!("the actor's state is not a {expected}"),
        }
    }

    /// The call was cancelled before it ran.
    pub(crate) fn cancelled() -> Self {
        Self {
            kind: FailureKind::Cancelled,
            message: "cancelled".into(),
        }
    }

    /// The function returned `Err(e)`.
    pub fn app(e: &dyn std::fmt::Display) -> Self {
        Self {
            kind: FailureKind::Error,
            message: e.to_string(),
        }
    }
}

/// Decodes argument `index` (called by the `#[remote]` expansion).
pub fn decode_arg<T: DeserializeOwned>(
    bytes: Option<crate::shm::Blob>,
    index: usize,
    name: &str,
) -> Result<T, InvokeError> {
    let bytes = bytes.ok_or_else(|| InvokeError {
        kind: FailureKind::BadArguments,
        message: format!("argument {index} (`{name}`) is missing"),
    })?;
    crate::shm::decode(&bytes).map_err(|e| InvokeError {
        kind: FailureKind::BadArguments,
        message: format!("argument {index} (`{name}`) does not decode as its parameter type: {e}"),
    })
}

/// Encodes a return value (called by the `#[remote]` expansion).
pub fn encode_return<T: Serialize>(value: &T) -> Result<Vec<u8>, InvokeError> {
    crate::codec::escaping(|| crate::codec::encode(value)).map_err(|e| InvokeError {
        kind: FailureKind::BadReturn,
        message: e.to_string(),
    })
}

/// The encoded returns of a function with `num_returns` above one, as one
/// block: their count (`u32`), then each one's length (`u64`) and bytes,
/// little-endian.
pub fn join_returns(parts: &[Vec<u8>]) -> Vec<u8> {
    let total: usize = parts.iter().map(|p| 8 + p.len()).sum();
    let mut out = Vec::with_capacity(4 + total);
    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The returns [`join_returns`] joined, if `bytes` holds exactly `n`.
pub(crate) fn split_returns(bytes: &[u8], n: u32) -> Option<Vec<Vec<u8>>> {
    let (count, mut rest) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*count) != n {
        return None;
    }
    let mut parts = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (len, after) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        if after.len() < len {
            return None;
        }
        parts.push(after[..len].to_vec());
        rest = &after[len..];
    }
    rest.is_empty().then_some(parts)
}

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
    /// How many objects it returns (`num_returns`; 1 for most): with more
    /// than one, the invoker gives them joined by [`join_returns`].
    pub returns: u32,
    /// A streaming generator (it returns `impl Iterator` or `impl
    /// Stream`): its items go to the owner one by one as they are made,
    /// and its result is their count.
    pub streaming: bool,
}

/// The registry entry `inventory` collects.
pub struct Registered(pub &'static RemoteFunction);

inventory::collect!(Registered);

/// A function in this executable's table.
pub(crate) struct Entry {
    pub function: &'static RemoteFunction,
    /// Its last run was quick (see [`crate::worker::exec::inline_slot`]).
    pub quick: std::sync::atomic::AtomicBool,
    /// As an owner sees it: how many of its last runs in a row were short
    /// (see [`Entry::is_short`]).
    pub short_runs: std::sync::atomic::AtomicU32,
}

/// A run this short may have tasks queued behind it on its worker.
const SHORT_RUN_US: u64 = 1_000;
/// Runs in a row that must have been short before tasks queue behind the
/// function's next one.
const SHORT_RUNS_TRUSTED: u32 = 3;

impl Entry {
    /// Whether tasks may queue behind a run of this function on a leased
    /// worker: its last few runs were all short. A task behind an unknown
    /// or long one would wait for it while another worker may be free.
    pub(crate) fn is_short(&self) -> bool {
        self.short_runs.load(std::sync::atomic::Ordering::Relaxed) >= SHORT_RUNS_TRUSTED
    }

    /// Records how long a run took (its worker's word).
    pub(crate) fn ran_for(&self, run_us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if run_us < SHORT_RUN_US {
            let runs = self.short_runs.load(Relaxed);
            self.short_runs.store(runs.saturating_add(1), Relaxed);
        } else {
            self.short_runs.store(0, Relaxed);
        }
    }
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
                    short_runs: Default::default(),
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
    /// Its concurrency groups (`#[shoal::actor(concurrency_groups(io =
    /// 4))]`): each name, and how many of its methods' calls may run at
    /// once.
    pub concurrency_groups: &'static [(&'static str, u32)],
    /// Per method, in `methods`' order: the index of its group in
    /// `concurrency_groups`, or `None` for the default group (the actor's
    /// `max_concurrency`).
    pub method_groups: &'static [Option<usize>],
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
