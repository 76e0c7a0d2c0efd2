//! Pulling objects from other nodes into this node's store.
//!
//! A process on this host that needs an object stored elsewhere asks its
//! node to pull it ([`NodeRequest::PullObject`]): the node fetches it from
//! the holding node in parts, [`PULL_PARTS_IN_FLIGHT`] at a time, into a
//! secondary copy in its store, which the asker then maps. Concurrent
//! requests for one object share one pull. Peers are reached over mutual
//! TLS with the certificate the head issued this node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_net::sync::MutexExt;
use shoal_net::{ConnectError, RpcClient, RpcError};
use shoal_proto::{
    NodeReply, NodeRequest, ObjectId, PullPriority, ServiceError, ServiceErrorKind, StoredAt,
};
use tokio::sync::watch;

use crate::object_store::{ObjectStore, StoreError};

/// Parts of one object requested from its holder at once.
pub const PULL_PARTS_IN_FLIGHT: usize = 4;
/// Objects pulled at once; more wait, by priority then arrival.
pub const PULLS_AT_ONCE: usize = 2;
/// Size of one part.
const PART_BYTES: u64 = 8 << 20;
/// Deadline of one part.
const PART_TIMEOUT: Duration = Duration::from_secs(60);

type PeerClient = RpcClient<NodeRequest, NodeReply>;
/// A pull's end, shared by everyone waiting for it.
type Outcome = Option<Result<(), Arc<PullError>>>;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
enum PullError {
    /// The head has not issued this node its certificate yet, so no peer
    /// would accept it.
    #[error("this node has no certificate yet")]
    NoCertificate,
    /// The holder could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// This node's store refused the copy.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a part from the holder failed.
    #[error("reading part at {offset}: {source}")]
    Read {
        /// Where in the object.
        offset: u64,
        /// Why.
        source: RpcError,
    },
    /// The holder answered a read with something else than that part.
    #[error("the holder answered {0}")]
    BadPart(String),
    /// The task reading a part panicked or was cancelled.
    #[error("reading a part: {0}")]
    Part(#[from] tokio::task::JoinError),
}

/// The node's puller.
pub struct Transfers {
    store: Arc<Mutex<ObjectStore>>,
    /// The node's transport (as a node, with the join token).
    transport: shoal_net::Transport,
    /// The client configuration toward peers, once the head has issued this
    /// node its certificate.
    peer_config: watch::Receiver<Option<shoal_net::quinn::ClientConfig>>,
    peers: Mutex<HashMap<String, PeerClient>>,
    /// Pulls under way: later askers wait for the first one's outcome.
    pulling: Mutex<HashMap<ObjectId, watch::Receiver<Outcome>>>,
    /// Objects pulled since the node started.
    pulled: AtomicU64,
    /// Their bytes.
    pulled_bytes: AtomicU64,
    queue: Mutex<PullQueue>,
}

/// Pulls running, and those waiting to start (a `get`'s before a task
/// argument's, then oldest first).
#[derive(Default)]
pub struct PullQueue {
    running: usize,
    arrivals: u64,
    waiting: std::collections::BTreeMap<(PullPriority, u64), tokio::sync::oneshot::Sender<()>>,
}

impl PullQueue {
    /// Starts a pull now if fewer than `limit` run; else a receiver that
    /// fires when it may start.
    pub fn admit(
        &mut self,
        priority: PullPriority,
        limit: usize,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        if self.running < limit {
            self.running += 1;
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.arrivals += 1;
        self.waiting.insert((priority, self.arrivals), tx);
        Some(rx)
    }

    /// A pull finished: the first waiting one takes its place.
    pub fn release(&mut self) {
        while let Some((_, next)) = self.waiting.pop_first() {
            if next.send(()).is_ok() {
                return;
            }
        }
        self.running = self.running.saturating_sub(1);
    }
}

fn unavailable(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ServiceErrorKind::Unavailable, message)
}

fn store_error(e: StoreError) -> ServiceError {
    crate::api::store_error(e)
}

impl Transfers {
    /// A puller storing into `store`, connecting through `transport` (the
    /// node's) with the peer configuration once there is one.
    pub fn new(
        store: Arc<Mutex<ObjectStore>>,
        transport: shoal_net::Transport,
        peer_config: watch::Receiver<Option<shoal_net::quinn::ClientConfig>>,
    ) -> Self {
        Self {
            store,
            transport,
            peer_config,
            peers: Mutex::new(HashMap::new()),
            pulling: Mutex::new(HashMap::new()),
            pulled: AtomicU64::new(0),
            pulled_bytes: AtomicU64::new(0),
            queue: Mutex::new(PullQueue::default()),
        }
    }

    /// Objects pulled since the node started.
    pub fn pulled(&self) -> u64 {
        self.pulled.load(Ordering::Relaxed)
    }

    /// Bytes of the objects pulled since the node started.
    pub fn pulled_bytes(&self) -> u64 {
        self.pulled_bytes.load(Ordering::Relaxed)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, ObjectStore> {
        self.store.locked()
    }

    /// The object's file in this node's store, pulled from `from` first if
    /// it is not here.
    pub async fn pull(
        self: &Arc<Self>,
        id: ObjectId,
        from: StoredAt,
        priority: PullPriority,
    ) -> Result<(PathBuf, u64), ServiceError> {
        if let Ok(found) = self.store().open(id) {
            return Ok(found);
        }
        let mut outcome = {
            let mut pulling = self.pulling.locked();
            match pulling.get(&id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    pulling.insert(id, rx.clone());
                    // A task of its own: the pull finishes for the others
                    // even if this asker goes away.
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        let turn = this.queue.locked().admit(priority, PULLS_AT_ONCE);
                        if let Some(turn) = turn {
                            let _ = turn.await;
                        }
                        let result = this.fetch(id, &from).await.map_err(Arc::new);
                        this.queue.locked().release();
                        if let Err(e) = &result {
                            tracing::warn!(%id, from = %from.node_address, error = %e, "pulling an object failed");
                        }
                        this.pulling.locked().remove(&id);
                        tx.send_replace(Some(result));
                    });
                    rx
                }
            }
        };
        let result = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| unavailable("the pull was abandoned"))?
            .clone();
        match result {
            Some(Ok(())) => self.store().open(id).map_err(store_error),
            Some(Err(e)) => Err(unavailable(e.to_string())),
            None => Err(unavailable("the pull was abandoned")),
        }
    }

    async fn peer(&self, address: &str) -> Result<PeerClient, PullError> {
        let cached = self.peers.locked().get(address).cloned();
        if let Some(client) = cached.filter(|c| c.close_reason().is_none()) {
            return Ok(client);
        }
        let config = self
            .peer_config
            .borrow()
            .clone()
            .ok_or(PullError::NoCertificate)?;
        let addr = shoal_net::host::resolve(address).await?;
        let client = self
            .transport
            .with_client_config(config, shoal_net::NODE_SERVER_NAME)
            .connect(addr)
            .await?;
        self.peers
            .locked()
            .insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Copies the object from its holder into a secondary copy here.
    async fn fetch(&self, id: ObjectId, from: &StoredAt) -> Result<(), PullError> {
        let started = std::time::Instant::now();
        let peer = self.peer(&from.node_address).await?;
        self.store().create_secondary(id, from.size)?;
        let copied = self.copy_parts(&peer, id, from.size).await;
        let sealed = copied.and_then(|()| Ok(self.store().seal_pulled(id)?));
        match &sealed {
            Ok(()) => {
                self.pulled.fetch_add(1, Ordering::Relaxed);
                self.pulled_bytes.fetch_add(from.size, Ordering::Relaxed);
                // Large pulls are worth a line: they are where a slow
                // `get` on another node spends its time.
                if from.size >= PART_BYTES {
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(%id, from = %from.node_address, bytes = from.size, seconds, gb_per_s = from.size as f64 / seconds / 1e9, "pulled an object");
                }
            }
            Err(_) => self.store().delete(&[id]),
        }
        sealed
    }

    async fn copy_parts(
        &self,
        peer: &PeerClient,
        id: ObjectId,
        size: u64,
    ) -> Result<(), PullError> {
        let offsets: Vec<u64> = (0..size.div_ceil(PART_BYTES))
            .map(|i| i * PART_BYTES)
            .collect();
        let mut parts = tokio::task::JoinSet::new();
        let mut next = offsets.into_iter();
        loop {
            while parts.len() < PULL_PARTS_IN_FLIGHT {
                let Some(offset) = next.next() else { break };
                let peer = peer.clone();
                let len = PART_BYTES.min(size - offset) as u32;
                parts.spawn(async move {
                    let read = NodeRequest::ReadObject { id, offset, len };
                    match peer.call(&read, PART_TIMEOUT).await {
                        Ok(NodeReply::ObjectChunk { total, data })
                            if total == size && data.len() == len as usize =>
                        {
                            Ok((offset, data))
                        }
                        Ok(other) => Err(PullError::BadPart(short(&other))),
                        Err(source) => Err(PullError::Read { offset, source }),
                    }
                });
            }
            let Some(joined) = parts.join_next().await else {
                return Ok(());
            };
            let (offset, data) = joined??;
            self.store().write_part(id, offset, &data)?;
        }
    }
}

fn short(reply: &NodeReply) -> String {
    match reply {
        NodeReply::ObjectChunk { total, data } => {
            format!("a part of {} bytes of an object of {total}", data.len())
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_pulls_start_by_priority_then_arrival() {
        let mut q = PullQueue::default();
        assert!(q.admit(PullPriority::Argument, 1).is_none(), "a free slot");
        let mut arg = q.admit(PullPriority::Argument, 1).expect("queued");
        let mut get = q.admit(PullPriority::Get, 1).expect("queued");
        let mut later_get = q.admit(PullPriority::Get, 1).expect("queued");
        q.release();
        assert!(get.try_recv().is_ok(), "a get goes first");
        assert!(later_get.try_recv().is_err() && arg.try_recv().is_err());
        q.release();
        assert!(later_get.try_recv().is_ok(), "then the next get");
        q.release();
        assert!(arg.try_recv().is_ok(), "then task arguments");
        q.release();
        assert_eq!(q.running, 0);
    }
}
