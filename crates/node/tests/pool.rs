//! The worker pool's warm spares, with a launcher that starts "workers"
//! ready at once (as local mode's threads do) and counts them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_node::binaries::BinaryCache;
use shoal_node::worker_pool::{PoolConfig, Tenancy, WorkerPool};
use shoal_node::{LaunchSpec, Launched, WorkerKind, WorkerLauncher};
use shoal_proto::{JobId, LeaseId, ResourceSet};

#[derive(Default)]
struct Counting {
    launched: AtomicUsize,
}

impl WorkerLauncher for Counting {
    fn needs_executable(&self) -> bool {
        false
    }

    fn launch(&self, spec: LaunchSpec) -> Result<Launched, String> {
        self.launched.fetch_add(1, Ordering::SeqCst);
        Ok(Launched {
            pid: None,
            exited: Box::pin(std::future::pending()),
            kill: Box::new(|| {}),
            address: Some(format!("worker-{}", spec.worker_id)),
        })
    }
}

fn cpus(n: f64) -> ResourceSet {
    let mut r = ResourceSet::new();
    r.set("CPU", n);
    r
}

fn pool(launcher: Arc<Counting>) -> Arc<WorkerPool> {
    let (_tx, head) = tokio::sync::watch::channel(None);
    let dir = std::env::temp_dir().join("shoal-pool-test-unused");
    Arc::new(WorkerPool::new(
        launcher,
        BinaryCache::new(dir, head),
        PoolConfig {
            total: cpus(1.0),
            idle_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(10),
            log_dir: None,
        },
    ))
}

fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_workers_replacement_is_started_before_the_lease_that_needs_it() {
    let launcher = Arc::new(Counting::default());
    let pool = pool(Arc::clone(&launcher));
    let kind = WorkerKind {
        job_id: JobId::random(),
        binary_hash: "none".into(),
        driver: None,
        env: Default::default(),
    };
    let first = pool
        .grant(LeaseId::random(), kind.clone(), cpus(1.0), Tenancy::Shared)
        .await
        .expect("a worker");
    // One CPU, one worker running: no spare.
    assert_eq!(launcher.launched.load(Ordering::SeqCst), 1);
    assert_eq!(pool.worker_count(), 1);

    // Its task blocks: the CPU is lent back, and a replacement starts now.
    assert!(pool.set_blocked(first.worker_id, true).is_some());
    pool.replace_blocked(first.worker_id);
    poll_until("the spare", || {
        launcher.launched.load(Ordering::SeqCst) == 2
    });
    assert_eq!(pool.worker_count(), 2);

    // The lease the lent CPU goes to takes the spare: nothing is started
    // on demand.
    let second = pool
        .grant(LeaseId::random(), kind.clone(), cpus(1.0), Tenancy::Shared)
        .await
        .expect("the spare");
    assert_ne!(second.worker_id, first.worker_id);
    assert_eq!(launcher.launched.load(Ordering::SeqCst), 2);

    // One spare per blocked worker: blocking the same worker again, or a
    // second replacement call, starts no more.
    assert!(pool.set_blocked(first.worker_id, true).is_none());
    pool.replace_blocked(first.worker_id);
    assert_eq!(launcher.launched.load(Ordering::SeqCst), 2);

    // Once it has resumed, blocking again lends its CPU again: a new
    // replacement starts.
    assert!(pool.set_blocked(first.worker_id, false).is_some());
    assert!(pool.set_blocked(first.worker_id, true).is_some());
    pool.replace_blocked(first.worker_id);
    poll_until("the second spare", || {
        launcher.launched.load(Ordering::SeqCst) == 3
    });
    pool.stop_all();
}
