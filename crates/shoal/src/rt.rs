//! The process's tokio runtime, and blocking a thread on it safely.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process's runtime, started on first use.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal")
        .build()
        .map_err(|e| Error::NotInitialized(format!("cannot start the runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// The flavor of the runtime this thread is in, if any.
pub(crate) fn runtime_flavor() -> Option<tokio::runtime::RuntimeFlavor> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|h| h.runtime_flavor())
}

/// Runs `wait`, which blocks this thread: inside a multi-threaded runtime
/// under `block_in_place` (its other tasks move to another thread); refused
/// inside a single-threaded one, which it would stall.
pub(crate) fn block_thread<R>(wait: impl FnOnce() -> R) -> Result<R> {
    match runtime_flavor() {
        Some(tokio::runtime::RuntimeFlavor::CurrentThread) => Err(Error::BlockingGetInAsync),
        Some(_) => Ok(tokio::task::block_in_place(wait)),
        None => Ok(wait()),
    }
}

/// Wakes a parked thread.
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on this thread, parking between polls (for futures that
/// need no runtime, such as a wait on a slot).
pub(crate) fn park_on<F: Future>(fut: F) -> F::Output {
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// Logs through `tracing` when `SHOAL_LOG` (or `RUST_LOG`) asks for them and
/// the program has not installed a subscriber of its own.
pub(crate) fn init_logging() {
    let Some(spec) = std::env::var("SHOAL_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
    else {
        return;
    };
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_new(spec) {
        // Colours only on a terminal: a worker's stderr is its log file.
        use std::io::IsTerminal;
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(colour)
            .try_init();
    }
}

/// Waits until `done()` is true, looking again each time `notify` wakes
/// its waiters (registered before each look, so no wake-up is missed).
pub(crate) async fn notified_until(notify: &tokio::sync::Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
