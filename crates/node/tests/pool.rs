//! The worker pool's warm spares, with a launcher that starts "workers"
//! ready at once (as local mode's threads do) and counts them; and what
//! the node's service does with a worker's blocked state the head cannot
//! be told.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_net::handshake::ClientAuth;
use shoal_net::rpc::{Peer, Service};
use shoal_net::{ClusterIdentity, MemoryNet, NetLimits, Transport, NODE_SERVER_NAME};
use shoal_node::api::NodeService;
use shoal_node::binaries::BinaryCache;
use shoal_node::object_store::ObjectStore;
use shoal_node::transfer::Transfers;
use shoal_node::worker_pool::{PoolConfig, Tenancy, WorkerPool};
use shoal_node::{LaunchSpec, Launched, WorkerKind, WorkerLauncher};
use shoal_proto::{JobId, LeaseId, NodeId, NodeRequest, ResourceSet, Role, ServiceErrorKind};

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

/// The kind of worker these tests lease: one job's, on no executable.
fn kind() -> WorkerKind {
    WorkerKind {
        job_id: JobId::random(),
        binary_hash: "none".into(),
        driver: None,
        env: Default::default(),
    }
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
    let kind = kind();
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

/// A node service with no head connection (as before the head has bound
/// the node's): nothing reaches a worker over the network in this test.
fn unconnected_service(pool: Arc<WorkerPool>, dir: &std::path::Path) -> NodeService {
    let store = ObjectStore::new(dir, &dir.join("spill"), 1 << 20, None).expect("a store");
    let store = Arc::new(std::sync::Mutex::new(store));
    let identity = ClusterIdentity::generate().expect("an identity");
    let auth = ClientAuth {
        token: identity.token().driver_token(),
        role: Role::Node,
    };
    let host = "198.18.0.2".parse().expect("an ip");
    let transport = Transport::memory(
        MemoryNet::new(1),
        host,
        NODE_SERVER_NAME,
        auth,
        NetLimits::default(),
    );
    let (_no_config, peer_config) = tokio::sync::watch::channel(None);
    let transfers = Arc::new(Transfers::new(Arc::clone(&store), transport, peer_config));
    let (_id, node_id) = tokio::sync::watch::channel(Some(NodeId::random()));
    let (_no_head, head) = tokio::sync::watch::channel(None);
    NodeService::new(node_id, head, cpus(1.0), pool, store, transfers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_state_the_head_did_not_take_is_undone_so_the_worker_tells_it_again() {
    let launcher = Arc::new(Counting::default());
    let pool = pool(Arc::clone(&launcher));
    let kind = kind();
    let first = pool
        .grant(LeaseId::random(), kind, cpus(1.0), Tenancy::Shared)
        .await
        .expect("a worker");
    let dir = std::env::temp_dir().join(format!("shoal-pool-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let service = unconnected_service(Arc::clone(&pool), &dir);
    let worker = Peer {
        role: Role::Worker,
        remote: "127.0.0.1:1".parse().expect("an address"),
        connection_id: 1,
    };
    let blocked = NodeRequest::WorkerBlocked {
        worker_id: first.worker_id,
        blocked: true,
    };

    // The head cannot be told: the worker hears so (it tells again)...
    let refused = service
        .handle(&worker, blocked)
        .await
        .expect_err("no head to tell");
    assert_eq!(refused.kind, ServiceErrorKind::Unavailable, "{refused:?}");
    // ...and the node has not lent the CPU out or started a replacement
    // for a lease the head never heard of: the worker is not blocked yet.
    assert_eq!(launcher.launched.load(Ordering::SeqCst), 1);
    assert!(pool.set_blocked(first.worker_id, true).is_some());
    pool.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}
