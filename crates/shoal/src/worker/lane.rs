//! An actor's own threads: calls of an actor of sync methods queue on
//! them in order, so back-to-back calls cost no thread hand-offs.

use shoal_net::sync::MutexExt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::RwLock;

use super::context::Running;
use super::exec::run_caught;
use crate::registry::ActorState;

/// A call's invocation, or the panic that ended it.
pub(crate) type Invoked = std::result::Result<crate::registry::Invocation, super::exec::Caught>;

/// Most threads of an actor's own (past this, its calls run on the
/// runtime's blocking threads).
pub(crate) const LANE_THREADS_MAX: u32 = 64;

/// A call queued on an actor's own thread.
type LaneJob = Box<dyn FnOnce() + Send>;

/// An actor's own thread; it ends when the actor is dropped.
pub(crate) struct Lane {
    jobs: std::sync::mpsc::Sender<LaneJob>,
    pub(crate) threads: u32,
    /// Calls queued or running.
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

/// A sync method and its arguments.
pub(crate) enum SyncCall {
    Ref(
        fn(&ActorState, crate::shm::Args) -> crate::registry::Invocation,
        crate::shm::Args,
    ),
    Mut(
        fn(&mut ActorState, crate::shm::Args) -> crate::registry::Invocation,
        crate::shm::Args,
    ),
}

impl SyncCall {
    /// Runs under the state's lock: `&self` methods share it unless
    /// `exclusive` (an actor running one call at a time). A call cancelled
    /// by the time it holds the lock does not run.
    pub(crate) fn run_locked(
        self,
        state: &RwLock<ActorState>,
        exclusive: bool,
        cancel: &super::cancel::Watch,
    ) -> crate::registry::Invocation {
        let cancelled = || Err(crate::registry::InvokeError::cancelled());
        match self {
            SyncCall::Ref(f, args) if !exclusive => {
                let guard = state.blocking_read();
                if cancel.is_cancelled() {
                    return cancelled();
                }
                f(&guard, args)
            }
            SyncCall::Ref(f, args) => {
                let guard = state.blocking_write();
                if cancel.is_cancelled() {
                    return cancelled();
                }
                f(&guard, args)
            }
            SyncCall::Mut(f, args) => {
                let mut guard = state.blocking_write();
                if cancel.is_cancelled() {
                    return cancelled();
                }
                f(&mut guard, args)
            }
        }
    }

    pub(crate) fn run_on(self, state: &mut ActorState) -> crate::registry::Invocation {
        match self {
            SyncCall::Ref(f, args) => f(state, args),
            SyncCall::Mut(f, args) => f(state, args),
        }
    }
}

impl Lane {
    /// `threads` threads taking calls from one queue, in order.
    pub(crate) fn start(class: &str, threads: u32) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<LaneJob>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!(
                    "actor {}",
                    class.rsplit("::").next().unwrap_or(class)
                ))
                .spawn(move || loop {
                    let job = queue.locked().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Self {
            jobs,
            threads: threads.max(1),
            busy: Arc::default(),
        })
    }

    /// For an actor running one call at a time with nothing queued or
    /// running: claims the actor and its state for a call run by the
    /// caller's thread (release with [`Lane::done`]).
    pub(crate) fn run_here(
        &self,
        state: &Arc<RwLock<ActorState>>,
    ) -> Option<tokio::sync::OwnedRwLockWriteGuard<ActorState>> {
        let multi_thread =
            crate::rt::runtime_flavor() == Some(tokio::runtime::RuntimeFlavor::MultiThread);
        if self.threads != 1 || !multi_thread {
            return None;
        }
        self.busy
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        match Arc::clone(state).try_write_owned() {
            Ok(guard) => Some(guard),
            Err(_) => {
                self.done();
                None
            }
        }
    }

    /// A call claimed or queued has ended.
    pub(crate) fn done(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Runs a call claimed with [`Lane::run_here`] on this runtime thread:
    /// directly if the method was `quick` last time (see
    /// [`super::exec::claim_inline`]), else with the thread's other work handed
    /// away first.
    pub(crate) async fn run_claimed(
        quick: &std::sync::atomic::AtomicBool,
        run: impl FnOnce() -> Invoked,
    ) -> Invoked {
        match super::exec::claim_inline(quick).await {
            Some(_slot) => super::exec::timed(quick, run),
            None => tokio::task::block_in_place(|| super::exec::timed(quick, run)),
        }
    }

    /// Queues `f` on the actor's thread, after the calls queued before it
    /// (the queueing is done when this returns); the future is its result.
    pub(crate) fn queue(
        &self,
        running: Running,
        f: impl FnOnce() -> crate::registry::Invocation + Send + 'static,
    ) -> impl Future<Output = Invoked> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let busy = Arc::clone(&self.busy);
        let job: LaneJob = Box::new(move || {
            let out = run_caught(running, f);
            busy.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(out);
        });
        let stopped = || Err(("the actor's thread has stopped".into(), String::new()));
        self.busy.fetch_add(1, Ordering::SeqCst);
        let sent = self.jobs.send(job).is_ok();
        if !sent {
            self.done();
        }
        async move {
            if !sent {
                return stopped();
            }
            rx.await.unwrap_or_else(|_| stopped())
        }
    }
}
