//! The node service: peers, lease holders and the node's own workers call it.

use std::sync::{Arc, Mutex, MutexGuard};

use shoal_net::sync::MutexExt;
use shoal_net::{Peer, Service};
use shoal_proto::{NodeId, NodeReply, NodeRequest, ResourceSet, ServiceError, ServiceErrorKind};
use tokio::sync::watch;

use crate::object_store::{Created, ObjectStore, StoreError};
use crate::worker_pool::{worker_log_name as worker_log, WorkerPool};

/// Largest part of an object sent in one reply.
pub const OBJECT_CHUNK_MAX: u32 = 8 << 20;

/// Answers [`NodeRequest`]s.
pub struct NodeService {
    node_id: watch::Receiver<Option<NodeId>>,
    head: crate::binaries::HeadWatch,
    resources: ResourceSet,
    pool: Arc<WorkerPool>,
    store: Arc<Mutex<ObjectStore>>,
    transfers: Arc<crate::transfer::Transfers>,
    /// The name of this daemon's own log file in the workers' log
    /// directory (`head.log`, `node-PID.log`), listed with theirs.
    daemon_log: Option<String>,
}

impl NodeService {
    /// Names this daemon's own log file (see [`NodeRequest::ListLogs`]).
    pub fn with_daemon_log(mut self, name: String) -> Self {
        self.daemon_log = Some(name);
        self
    }

    /// The node's log files: its daemon's, then its workers' that exist.
    fn logs(&self) -> Vec<shoal_proto::node::LogFile> {
        let Some(dir) = self.pool.log_dir() else {
            return Vec::new();
        };
        let daemon = self.daemon_log.iter().map(|name| {
            let kind = if name == "head.log" { "head" } else { "node" };
            (name.clone(), kind)
        });
        let workers = self
            .pool
            .launched()
            .into_iter()
            .rev()
            .map(|w| (worker_log(w), "worker"));
        daemon
            .chain(workers)
            .filter_map(|(name, kind)| {
                let size = std::fs::metadata(dir.join(&name)).ok()?.len();
                Some(shoal_proto::node::LogFile {
                    name,
                    size,
                    kind: kind.to_string(),
                })
            })
            .collect()
    }

    /// Part of a listed log file.
    fn read_log(&self, name: &str, offset: u64, len: u32) -> Result<NodeReply, ServiceError> {
        use std::io::{Read, Seek};
        // Only a name it lists: never a path out of the directory.
        let worker = name
            .strip_prefix("worker-")
            .and_then(|rest| rest.strip_suffix(".log"))
            .and_then(|id| id.parse::<shoal_proto::WorkerId>().ok());
        let listed = self.daemon_log.as_deref() == Some(name)
            || worker.is_some_and(|w| self.pool.launched().contains(&w) && worker_log(w) == name);
        if !listed {
            return Err(ServiceError::new(
                ServiceErrorKind::NotFound,
                format!("no log file {name:?} on this node (see ListLogs)"),
            ));
        }
        let dir = self.pool.log_dir().ok_or_else(|| {
            ServiceError::new(ServiceErrorKind::NotFound, "this node keeps no log files")
        })?;
        let io = |e: std::io::Error| {
            ServiceError::new(ServiceErrorKind::Internal, format!("reading {name}: {e}"))
        };
        let mut file = std::fs::File::open(dir.join(name)).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let want = u64::from(len.min(shoal_proto::node::LOG_CHUNK_MAX));
        let take = want.min(size.saturating_sub(offset));
        let mut data = Vec::with_capacity(take as usize);
        if take > 0 {
            file.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;
            file.take(take).read_to_end(&mut data).map_err(io)?;
        }
        Ok(NodeReply::LogChunk { size, data })
    }
    /// A service for the node whose id `node_id` follows.
    pub fn new(
        node_id: watch::Receiver<Option<NodeId>>,
        head: crate::binaries::HeadWatch,
        resources: ResourceSet,
        pool: Arc<WorkerPool>,
        store: Arc<Mutex<ObjectStore>>,
        transfers: Arc<crate::transfer::Transfers>,
    ) -> Self {
        Self {
            node_id,
            head,
            resources,
            pool,
            store,
            transfers,
            daemon_log: None,
        }
    }

    fn node_id(&self) -> Result<NodeId, ServiceError> {
        (*self.node_id.borrow())
            .ok_or_else(|| ServiceError::new(ServiceErrorKind::Unavailable, "node has not joined"))
    }

    fn store(&self) -> MutexGuard<'_, ObjectStore> {
        self.store.locked()
    }
}

pub(crate) fn store_error(e: StoreError) -> ServiceError {
    let kind = match e {
        StoreError::Full { .. } => ServiceErrorKind::Unavailable,
        StoreError::BadPart { .. } => ServiceErrorKind::BadRequest,
        StoreError::NotFound(_) => ServiceErrorKind::NotFound,
        StoreError::Io { .. } => ServiceErrorKind::Internal,
    };
    ServiceError::new(kind, e.to_string())
}

impl Service for NodeService {
    type Request = NodeRequest;
    type Reply = NodeReply;

    async fn handle(&self, peer: &Peer, request: NodeRequest) -> Result<NodeReply, ServiceError> {
        // Who may send what: the one table, `shoal_proto::NODE_RPCS`.
        peer.require(request.rpc().roles)?;
        let node_id = self.node_id()?;
        match request {
            NodeRequest::ListLogs => Ok(NodeReply::Logs(self.logs())),
            NodeRequest::ReadLog { name, offset, len } => self.read_log(&name, offset, len),
            NodeRequest::Ping => Ok(NodeReply::Pong { node_id }),
            NodeRequest::GetNodeInfo => Ok(NodeReply::NodeInfo {
                node_id,
                pid: std::process::id(),
                resources_total: self.resources.clone(),
                resources_available: self.pool.available(),
                store_dir: self.store().dir().display().to_string(),
            }),
            NodeRequest::GrantWorker {
                lease_id,
                job_id,
                binary_hash,
                resources,
                driver,
                dedicated,
                detached,
                owner,
                owner_node,
                env,
            } => {
                env.check()
                    .map_err(|e| ServiceError::new(ServiceErrorKind::BadRequest, e))?;
                self.pool.set_owner(lease_id, owner, owner_node);
                let tenancy = match (dedicated, detached) {
                    (_, true) => crate::worker_pool::Tenancy::Detached,
                    (true, false) => crate::worker_pool::Tenancy::Dedicated,
                    (false, false) => crate::worker_pool::Tenancy::Shared,
                };
                resources
                    .validate()
                    .map_err(|e| ServiceError::new(ServiceErrorKind::BadRequest, e.to_string()))?;
                let worker = self
                    .pool
                    .grant(
                        lease_id,
                        crate::worker_pool::WorkerKind {
                            job_id,
                            binary_hash,
                            driver,
                            env,
                        },
                        resources,
                        tenancy,
                    )
                    .await?;
                Ok(NodeReply::WorkerGranted { worker })
            }
            NodeRequest::ReleaseWorker { lease_id, kill } => {
                self.pool.release(lease_id, kill);
                Ok(NodeReply::Ok)
            }
            NodeRequest::RegisterWorker {
                worker_id,
                address,
                pid,
            } => {
                self.pool.register(worker_id, address, pid)?;
                Ok(NodeReply::Ok)
            }
            NodeRequest::PutObject {
                id,
                offset,
                total,
                data,
                owner,
            } => {
                let sealed = self
                    .store()
                    .put(id, offset, total, &data, owner)
                    .map_err(store_error)?;
                Ok(NodeReply::ObjectWritten { sealed })
            }
            NodeRequest::ReadObject { id, offset, len } => {
                let (data, total) = self
                    .store()
                    .read(id, offset, u64::from(len.min(OBJECT_CHUNK_MAX)))
                    .map_err(store_error)?;
                Ok(NodeReply::ObjectChunk {
                    total,
                    data: data.into(),
                })
            }
            NodeRequest::CreateObject { id, total, owner } => {
                match self.store().begin(id, total, owner).map_err(store_error)? {
                    Created::File(path) => Ok(NodeReply::ObjectFile {
                        path: path.display().to_string(),
                        size: total,
                    }),
                    // Stored before (a task run twice): nothing to write.
                    Created::Sealed => Ok(NodeReply::ObjectWritten { sealed: true }),
                }
            }
            NodeRequest::SealObject { id } => {
                self.store().seal(id).map_err(store_error)?;
                Ok(NodeReply::Ok)
            }
            NodeRequest::PullObject { id, from, priority } => {
                let (path, size) = self.transfers.pull(id, from, priority).await?;
                Ok(NodeReply::ObjectFile {
                    path: path.display().to_string(),
                    size,
                })
            }
            NodeRequest::OpenObject { id } => {
                let (path, size) = self.store().open(id).map_err(store_error)?;
                Ok(NodeReply::ObjectFile {
                    path: path.display().to_string(),
                    size,
                })
            }
            NodeRequest::DeleteObjects { ids } => {
                self.store().delete(&ids);
                Ok(NodeReply::Ok)
            }
            NodeRequest::KillWorker { worker_id } => {
                self.pool.kill_worker(worker_id);
                Ok(NodeReply::Ok)
            }
            NodeRequest::WatchWorkers {
                worker_ids,
                wait_ms,
            } => {
                let wait = std::time::Duration::from_millis(wait_ms)
                    .min(std::time::Duration::from_secs(60));
                let worker_ids = self.pool.watch_any(&worker_ids, wait).await;
                Ok(NodeReply::WorkersExited { worker_ids })
            }
            NodeRequest::WorkerBlocked { worker_id, blocked } => {
                if let Some(lease_id) = self.pool.set_blocked(worker_id, blocked) {
                    // Undone when the head did not take it (or there is no
                    // bound head connection yet), so the worker's retry
                    // tells it again: the pool and the head stay in step.
                    let head = self.head.borrow().clone();
                    let told = match head {
                        Some(head) => {
                            let tell = shoal_proto::HeadRequest::LeaseBlocked { lease_id, blocked };
                            head.call_idempotent(&tell, std::time::Duration::from_secs(10))
                                .await
                                .map(drop)
                                .map_err(|e| e.to_string())
                        }
                        None => Err("the node is not connected to the head".to_string()),
                    };
                    if let Err(e) = told {
                        self.pool.set_blocked(worker_id, !blocked);
                        return Err(ServiceError::new(ServiceErrorKind::Unavailable, e));
                    }
                    // Taken: the CPU is lent out, so a worker for the lease
                    // it goes to is started now (once per change, not per
                    // retry).
                    if blocked {
                        self.pool.replace_blocked(worker_id);
                    }
                }
                Ok(NodeReply::Ok)
            }
        }
    }
}
