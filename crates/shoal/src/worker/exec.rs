//! Running tasks: calling registered functions, catching panics with
//! their message and backtrace, and running quick calls without a thread
//! hand-off.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Once;

use futures_util::FutureExt;
use shoal_proto::{FailureKind, TaskFailure, TaskSpec};

use crate::registry::{self, Invoker};

thread_local! {
    /// The last panic on this thread: message and backtrace.
    static LAST_PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that remembers each panic's message and
/// backtrace for the task that caught it, then runs the previous hook.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = match info.payload().downcast_ref::<&str>() {
                Some(s) => (*s).to_string(),
                None => match info.payload().downcast_ref::<String>() {
                    Some(s) => s.clone(),
                    None => "panic with a non-string payload".to_string(),
                },
            };
            let location = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            let backtrace = std::backtrace::Backtrace::force_capture().to_string();
            LAST_PANIC
                .with(|p| *p.borrow_mut() = Some((format!("{message}{location}"), backtrace)));
            previous(info);
        }));
    });
}

/// A panic caught while running a task: its message and backtrace.
pub(crate) type Caught = (String, String);

/// Runs `f`, catching a panic (read on the thread that panicked: the
/// message is kept per thread).
pub(crate) fn caught<R>(f: impl FnOnce() -> R) -> Result<R, Caught> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| take_panic())
}

/// Runs `f` on this thread as `running`'s task, catching a panic.
pub(crate) fn run_caught<R>(
    running: super::context::Running,
    f: impl FnOnce() -> R,
) -> Result<R, Caught> {
    super::context::with_current_task(running, || caught(f))
}

/// Awaits `fut` as `running`'s task, catching a panic.
pub(crate) async fn await_caught<F: std::future::Future>(
    running: super::context::Running,
    fut: F,
) -> Result<F::Output, Caught> {
    super::context::scope_current_task(running, AssertUnwindSafe(fut).catch_unwind())
        .await
        .map_err(|_| take_panic())
}

pub(crate) fn take_panic() -> (String, String) {
    LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .unwrap_or_else(|| ("panicked".to_string(), String::new()))
}

/// A sync call whose last run took less than this may run on the runtime
/// thread that received it, sparing the hand-off to another thread and
/// back (`spawn_blocking` or `block_in_place`: 10-20 us, a fifth of a sync
/// round trip). A longer call, or one not yet seen, is handed off. A `get`
/// inside a call hands the thread's work away by itself
/// (`core::block_thread`).
const QUICK_CALL: std::time::Duration = std::time::Duration::from_micros(200);

/// Set while a call runs on a runtime thread without a hand-off.
static RUNNING_INLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The runtime thread, claimed for one quick call; released on drop.
pub(crate) struct InlineSlot(());

impl Drop for InlineSlot {
    fn drop(&mut self) {
        RUNNING_INLINE.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Claims this runtime thread for a call whose last run was `quick`. Only
/// one such call per process at a time, and only on a runtime of two
/// threads or more: a quick call turned slow holds up one thread, never
/// the runtime.
///
/// Sync tasks claim it directly: a task's next task waits for it on the
/// worker's gate, and a yield here cost a fifth of the sync task rate
/// (`single client tasks sync` 13.6-15.6k -> 10.6-11.8k/s). Actor calls
/// use [`claim_inline`], which yields once the slot is claimed.
pub(crate) fn inline_slot(quick: &std::sync::atomic::AtomicBool) -> Option<InlineSlot> {
    use std::sync::atomic::Ordering;
    let eligible = quick.load(Ordering::Relaxed)
        && tokio::runtime::Handle::try_current().is_ok_and(|h| h.metrics().num_workers() >= 2)
        && RUNNING_INLINE
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
    eligible.then_some(InlineSlot(()))
}

/// Claims this runtime thread for a quick actor call ([`inline_slot`]),
/// then yields once before the call runs. A task woken on this thread in the
/// same poll sits in a slot other threads cannot steal (tokio's LIFO slot)
/// until the thread is free again: the caller's next call, which a method
/// may wait for, or another actor's request (in local mode with threads,
/// actors share one runtime, and requests sent at once are woken
/// together). A yield runs that slot's task first and wakes an idle thread
/// of the runtime to take what is queued here, so a quick call turned slow
/// holds up only itself.
pub(crate) async fn claim_inline(quick: &std::sync::atomic::AtomicBool) -> Option<InlineSlot> {
    let slot = inline_slot(quick)?;
    tokio::task::yield_now().await;
    Some(slot)
}

/// Runs `run` and records in `quick` whether it took less than
/// [`QUICK_CALL`].
pub(crate) fn timed<R>(quick: &std::sync::atomic::AtomicBool, run: impl FnOnce() -> R) -> R {
    let started = std::time::Instant::now();
    let out = run();
    quick.store(
        started.elapsed() < QUICK_CALL,
        std::sync::atomic::Ordering::Relaxed,
    );
    out
}

/// The failure of a task cancelled where it runs (its owner has already
/// failed its reference, with its own words).
pub(crate) fn cancelled(spec: &TaskSpec, executor: super::Executor) -> TaskFailure {
    TaskFailure {
        kind: FailureKind::Cancelled,
        function: spec.function.name.clone(),
        task_id: spec.task_id,
        node_id: Some(executor.node_id),
        message: "cancelled".into(),
        backtrace: None,
        attempts: spec.attempt + 1,
        after_ms: None,
    }
}

/// The failure of a task whose function did not give its `returns`
/// returns as it should have (a bug: the macro joins them).
pub(crate) fn bad_returns(spec: &TaskSpec, executor: super::Executor, returns: u32) -> TaskFailure {
    TaskFailure {
        kind: FailureKind::BadReturn,
        message: format!("the function did not give its {returns} returns joined"),
        ..cancelled(spec, executor)
    }
}

/// Runs `spec`'s function (`entry`, looked up once by the caller) on
/// `args` (already fetched), catching panics. An async function is dropped
/// at its next await once `cancel` is cancelled; a sync one runs on
/// (`shoal::is_cancelled()` tells it).
pub(crate) async fn invoke(
    spec: &TaskSpec,
    entry: Option<&'static registry::Entry>,
    args: crate::shm::Args,
    executor: super::Executor,
    cancel: &super::cancel::Watch,
) -> Result<Vec<u8>, TaskFailure> {
    let node_id = executor.node_id;
    let failure = |kind, message: String, backtrace: Option<String>| TaskFailure {
        kind,
        function: spec.function.name.clone(),
        task_id: spec.task_id,
        node_id: Some(node_id),
        message,
        backtrace,
        attempts: spec.attempt + 1,
        after_ms: None,
    };
    let Some(entry) = entry else {
        return Err(failure(
            FailureKind::FunctionNotFound,
            format!(
                "no function named {:?} in this executable",
                spec.function.name
            ),
            None,
        ));
    };
    let function = entry.function;
    if function.signature != spec.function.signature {
        return Err(failure(
            FailureKind::FunctionNotFound,
            "the function's signature differs between the caller's build and the worker's".into(),
            None,
        ));
    }
    let running = super::context::Running {
        task: spec.task_id,
        executor,
    };
    let outcome = match &function.invoke {
        Invoker::Sync(call) => {
            let (call, quick) = (*call, &entry.quick);
            let run = move || timed(quick, || run_caught(running, || call(args)));
            match inline_slot(quick) {
                Some(_slot) => run(),
                None => match tokio::task::spawn_blocking(run).await {
                    Ok(result) => result,
                    Err(e) => Err((format!("the task's thread failed: {e}"), String::new())),
                },
            }
        }
        Invoker::Async(call) => tokio::select! {
            out = await_caught(running, call(args)) => out,
            _ = cancel.cancelled() => return Err(cancelled(spec, executor)),
        },
    };
    match outcome {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(failure(e.kind, e.message, None)),
        Err((message, backtrace)) => Err(failure(FailureKind::Panic, message, Some(backtrace))),
    }
}
