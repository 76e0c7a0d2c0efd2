//! Locks, and the one policy for a poisoned lock.
//!
//! # Policy
//! A `std` lock is poisoned when a thread panicked while it held the lock.
//! Shoal's critical sections never run user code (tasks and actor methods
//! run outside every lock of the runtime, the daemons and the transport)
//! and never leave shared state half-updated across a point that can
//! panic: each one reads or replaces whole values. So the data behind a
//! poisoned lock is still consistent, and the panic itself is the bug,
//! already reported by the panic hook and the log. Shoal therefore
//! recovers the guard instead of propagating the poison: one panicking
//! thread must not take a whole daemon, with every task and actor it
//! serves, down with it. Recovery is logged once at `warn` (the poison is
//! cleared, so later lockers do not log it again).
//!
//! Use [`MutexExt::locked`], [`RwLockExt::read_locked`] and
//! [`RwLockExt::write_locked`] instead of `lock()`/`read()`/`write()`
//! followed by `unwrap_or_else(PoisonError::into_inner)`, and [`recover`]
//! for the other poisonable results (`Condvar` waits). A critical section
//! that cannot keep to the rule above must not use these: it should end the
//! process rather than go on with state it cannot trust.

use std::panic::Location;
use std::sync::{LockResult, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] under the policy of this module.
pub trait MutexExt<T: ?Sized> {
    /// Locks, recovering (and logging) a lock poisoned by a panic in
    /// another thread.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    #[track_caller]
    fn locked(&self) -> MutexGuard<'_, T> {
        match self.lock() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                self.clear_poison();
                log_recovered::<T>(Location::caller());
                guard
            }
        }
    }
}

/// [`RwLock::read`] and [`RwLock::write`] under the policy of this module.
pub trait RwLockExt<T: ?Sized> {
    /// Locks for reading, recovering (and logging) a lock poisoned by a
    /// panic in another thread.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// Locks for writing, recovering (and logging) a lock poisoned by a
    /// panic in another thread.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    #[track_caller]
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        match self.read() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                self.clear_poison();
                log_recovered::<T>(Location::caller());
                guard
            }
        }
    }

    #[track_caller]
    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        match self.write() {
            Ok(guard) => guard,
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                self.clear_poison();
                log_recovered::<T>(Location::caller());
                guard
            }
        }
    }
}

/// The guard of any other poisonable result (a `Condvar` wait), recovered
/// under the policy of this module. The poison cannot be cleared from
/// here, so each recovery is logged.
#[track_caller]
pub fn recover<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(|poisoned| {
        log_recovered::<G>(Location::caller());
        poisoned.into_inner()
    })
}

fn log_recovered<T: ?Sized>(at: &Location<'_>) {
    tracing::warn!(
        %at,
        data = std::any::type_name::<T>(),
        "recovered a lock poisoned by a panic in another thread (see that panic); going on"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar};
    use std::time::Duration;

    fn poison<T: Send + Sync + 'static>(lock: Arc<T>, hold: fn(&T)) {
        let held = std::thread::spawn(move || {
            hold(&lock);
        });
        assert!(held.join().is_err(), "the holder panicked");
    }

    #[test]
    fn a_poisoned_mutex_is_recovered_with_its_data_and_cleared() {
        let m = Arc::new(Mutex::new(vec![1, 2]));
        poison(Arc::clone(&m), |m| {
            let _guard = m.lock();
            panic!("a bug while holding the lock");
        });
        assert!(m.is_poisoned());
        m.locked().push(3);
        assert!(!m.is_poisoned(), "recovered once, then clear");
        assert_eq!(*m.locked(), vec![1, 2, 3]);
    }

    #[test]
    fn a_poisoned_rwlock_is_recovered_for_reading_and_writing() {
        let l = Arc::new(RwLock::new(7));
        poison(Arc::clone(&l), |l| {
            let _guard = l.write();
            panic!("a bug while holding the lock");
        });
        assert_eq!(*l.read_locked(), 7);
        assert!(!l.is_poisoned());
        *l.write_locked() = 8;
        assert_eq!(*l.read_locked(), 8);
    }

    #[test]
    fn a_condvar_wait_on_a_poisoned_mutex_is_recovered() {
        let pair = Arc::new((Mutex::new(true), Condvar::new()));
        poison(Arc::clone(&pair), |pair| {
            let _guard = pair.0.lock();
            panic!("a bug while holding the lock");
        });
        let (lock, cond) = &*pair;
        let guard = recover(lock.lock());
        let (set, _) = recover(cond.wait_timeout_while(guard, Duration::from_millis(1), |s| !*s));
        assert!(*set);
    }
}
