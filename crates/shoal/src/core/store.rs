//! Large objects in node stores: written and mapped directly on the
//! store's host, else moved in parts over the network.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{
    ArgSpec, FailureKind, HeadReply, HeadRequest, NodeReply, NodeRequest, ObjectId,
    ServiceErrorKind, StoredAt, TaskFailure, TaskId, TaskOutcome, WorkerId,
};

use super::{
    try_get, Core, CHUNK_BYTES, CONTROL_TIMEOUT, INLINE_BYTES_MAX, PULL_TIMEOUT, STORE_FULL_WAIT,
};
use crate::codec::CodecError;
use crate::error::{Error, Result};
use crate::owner::objects::ObjState;
use crate::worker::context::current_task;
use crate::worker::Executor;

/// What [`Core::create_local`] found.
pub(crate) enum LocalFile {
    /// A new object's file to fill, then seal.
    Fill(std::path::PathBuf),
    /// The object is stored whole already.
    Sealed,
}

impl Core {
    pub(crate) fn next_put_id(&self) -> ObjectId {
        let task = current_task().unwrap_or(self.root_task);
        task.put_object(self.put_counter.fetch_add(1, Ordering::Relaxed))
    }

    /// The home node's store directory, if this process is on its host.
    async fn local_store(&self) -> Option<&std::path::PathBuf> {
        self.local_store
            .get_or_init(|| async {
                if !self.home.same_host {
                    return None;
                }
                let node = self.node(&self.home.address).await.ok()?;
                match node
                    .call_idempotent(&NodeRequest::GetNodeInfo, CONTROL_TIMEOUT)
                    .await
                {
                    Ok(NodeReply::NodeInfo { store_dir, .. }) if !store_dir.is_empty() => {
                        let dir = std::path::PathBuf::from(store_dir);
                        dir.is_dir().then_some(dir)
                    }
                    _ => None,
                }
            })
            .await
            .as_ref()
    }

    /// Maps a large object from this process's home node store, on its
    /// host; an object stored elsewhere is pulled there first.
    async fn map_local(
        &self,
        id: ObjectId,
        at: &StoredAt,
        priority: shoal_proto::PullPriority,
    ) -> Option<crate::shm::Blob> {
        self.local_store().await?;
        let node = self.node(&self.home.address).await.ok()?;
        let ask = if at.node_id == self.home.node_id {
            NodeRequest::OpenObject { id }
        } else {
            NodeRequest::PullObject {
                id,
                from: at.clone(),
                priority,
            }
        };
        let (path, size) = match node.call_idempotent(&ask, PULL_TIMEOUT).await {
            Ok(NodeReply::ObjectFile { path, size }) => (path, size),
            Ok(other) => {
                tracing::debug!(%id, reply = ?other, "unexpected answer to an object request");
                return None;
            }
            Err(e) => {
                tracing::debug!(%id, error = %e, "the home node could not provide the object");
                return None;
            }
        };
        match crate::shm::Mapping::open(std::path::Path::new(&path), size) {
            Ok(mapping) => Some(crate::shm::Blob::Mapped(mapping)),
            Err(e) => {
                tracing::debug!(%id, error = %e, "cannot map the object; reading it over the network");
                None
            }
        }
    }

    /// A large object's bytes: mapped when it is on this process's home
    /// node, otherwise read from the node that stores it.
    pub(crate) async fn fetch_stored(
        &self,
        id: ObjectId,
        at: &StoredAt,
        priority: shoal_proto::PullPriority,
    ) -> Result<crate::shm::Blob> {
        let reason = match self.read_copy(id, at, priority).await {
            Ok(blob) => return Ok(blob),
            Err(Error::ObjectLost { reason, .. }) => reason,
            Err(e) => return Err(e),
        };
        // That copy cannot be read: another one may (a node that pulled
        // it), before the caller turns to lineage.
        let mut tried = Vec::new();
        for other in self.other_copies(id, at).await {
            match self.read_copy(id, &other, priority).await {
                Ok(blob) => {
                    self.objects.moved(id, at, other);
                    return Ok(blob);
                }
                Err(e) => tried.push(e.to_string()),
            }
        }
        let reason = match tried.is_empty() {
            true => format!("{reason}; the head knows no other copy"),
            false => format!(
                "{reason}; no other copy could be read: {}",
                tried.join("; ")
            ),
        };
        Err(Error::ObjectLost { id, reason })
    }

    /// One copy's bytes: mapped when it is on (or pulled to) this process's
    /// home node, else read from the node that holds it.
    async fn read_copy(
        &self,
        id: ObjectId,
        at: &StoredAt,
        priority: shoal_proto::PullPriority,
    ) -> Result<crate::shm::Blob> {
        if let Some(mapped) = self.map_local(id, at, priority).await {
            return Ok(mapped);
        }
        self.read_stored(id, at).await.map(crate::shm::Blob::from)
    }

    /// The copies of `id` on live nodes other than `at`'s, as the head's
    /// object directory knows them.
    async fn other_copies(&self, id: ObjectId, at: &StoredAt) -> Vec<StoredAt> {
        match self
            .head
            .call_idempotent(&HeadRequest::LocateObject { id }, CONTROL_TIMEOUT)
            .await
        {
            Ok(HeadReply::ObjectLocations(copies)) => copies
                .into_iter()
                .filter(|c| c.node_id != at.node_id && c.size == at.size)
                .collect(),
            Ok(other) => {
                tracing::debug!(%id, reply = ?other, "unexpected answer to LocateObject");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(%id, error = %e, "could not ask the head for other copies");
                Vec::new()
            }
        }
    }

    /// Reads a large object from the node that stores it, in parts.
    async fn read_stored(&self, id: ObjectId, at: &StoredAt) -> Result<Vec<u8>> {
        let lost = |reason: String| Error::ObjectLost { id, reason };
        let node = self.node(&at.node_address).await.map_err(|e| {
            lost(format!(
                "its node {} at {} is unreachable: {e}",
                at.node_id, at.node_address
            ))
        })?;
        let capacity =
            usize::try_from(at.size).map_err(|_| lost("too large for this machine".into()))?;
        let mut bytes = Vec::with_capacity(capacity);
        while (bytes.len() as u64) < at.size {
            let read = NodeRequest::ReadObject {
                id,
                offset: bytes.len() as u64,
                len: CHUNK_BYTES,
            };
            match node.call_idempotent(&read, CONTROL_TIMEOUT).await {
                Ok(NodeReply::ObjectChunk { data, .. }) if !data.is_empty() => {
                    bytes.extend_from_slice(&data)
                }
                Ok(other) => return Err(lost(format!("its node answered {other:?}"))),
                Err(e) => {
                    return Err(lost(format!(
                        "reading it from node {} at {} failed: {e}",
                        at.node_id, at.node_address
                    )))
                }
            }
        }
        Ok(bytes)
    }

    /// Starts an object in the home node's store when this process is on
    /// its host: the path of the file to fill, then [`Core::seal_local`], or
    /// [`LocalFile::Sealed`] when it is stored already (a task run again
    /// stores the same id). `None` when the store is not local. Waits a
    /// little for room.
    pub(crate) async fn create_local(
        &self,
        id: ObjectId,
        total: u64,
        owner: Option<WorkerId>,
    ) -> Result<Option<LocalFile>> {
        if self.local_store().await.is_none() {
            return Ok(None);
        }
        let node = self.node(&self.home.address).await?;
        let mut room = RoomWait::default();
        loop {
            let create = NodeRequest::CreateObject { id, total, owner };
            match node.call_idempotent(&create, CONTROL_TIMEOUT).await {
                Ok(NodeReply::ObjectFile { path, .. }) => {
                    return Ok(Some(LocalFile::Fill(path.into())))
                }
                Ok(NodeReply::ObjectWritten { sealed: true }) => {
                    return Ok(Some(LocalFile::Sealed))
                }
                Err(shoal_net::RpcError::Service(e)) if e.kind == ServiceErrorKind::Unavailable => {
                    if room.again().await {
                        continue;
                    }
                    return Err(Error::ObjectStoreFull(e.message));
                }
                Ok(other) => {
                    return Err(Error::Protocol(format!("creating object {id}: {other:?}")))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Seals an object whose file this process filled.
    pub(crate) async fn seal_local(&self, id: ObjectId) -> Result<()> {
        let node = self.node(&self.home.address).await?;
        node.call_idempotent(&NodeRequest::SealObject { id }, CONTROL_TIMEOUT)
            .await?;
        Ok(())
    }

    /// Puts a large value by encoding it straight into its file in the home
    /// node's store (no intermediate copy); `None` when the store is not on
    /// this host. Called off the runtime: it writes the file.
    pub(crate) fn put_streamed<T: serde::Serialize>(
        self: &Arc<Self>,
        value: &T,
        size: u64,
    ) -> Result<Option<ObjectId>> {
        let id = self.next_put_id();
        let owner = Some(self.me.worker_id);
        let core = Arc::clone(self);
        let path = match self.block_on(async move { core.create_local(id, size, owner).await })? {
            None => return Ok(None),
            Some(LocalFile::Fill(path)) => path,
            // A fresh put id is never stored yet; if it were, it is whole.
            Some(LocalFile::Sealed) => {
                self.own(id, ObjState::Stored(self.home_at(size)));
                return Ok(Some(id));
            }
        };
        let file = crate::shm::open_locked(&path, true).map_err(CodecError::from);
        let written = file.and_then(|file| {
            if size >= crate::shm::WRITE_MAP_MIN {
                let sweep = self
                    .write_maps
                    .write(&file, size, |out| crate::codec::encode_into(out, value))?;
                if sweep {
                    self.sweep_write_maps();
                }
                return Ok(());
            }
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            crate::codec::encode_into(&mut out, value)?;
            Ok(std::io::Write::flush(&mut out)?)
        });
        if let Err(e) = written {
            self.delete_stored(id, self.home_at(size));
            return Err(Error::Encode {
                what: format!("put value into {}", path.display()),
                message: e.to_string(),
            });
        }
        let core = Arc::clone(self);
        self.block_on(async move { core.seal_local(id).await })?;
        self.own(id, ObjState::Stored(self.home_at(size)));
        Ok(Some(id))
    }

    /// Drops, every second, the kept mappings of files the store removed
    /// (so they do not hold the memory), until none is kept.
    fn sweep_write_maps(&self) {
        let maps = Arc::clone(&self.write_maps);
        let shutdown = self.shutdown.clone();
        self.handle.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if !maps.sweep() {
                    return;
                }
            }
        });
    }

    /// Writes a large object into this process's home node store: into its
    /// file directly on the node's host, else in parts over the network.
    pub(crate) async fn store_on_node(
        &self,
        id: ObjectId,
        bytes: &[u8],
        owner: Option<WorkerId>,
    ) -> Result<StoredAt> {
        let node = self.node(&self.home.address).await?;
        let total = bytes.len() as u64;
        let stored = self.home_at(total);
        match self.create_local(id, total, owner).await? {
            Some(LocalFile::Sealed) => return Ok(stored),
            Some(LocalFile::Fill(path)) => return self.fill_local(id, &path, bytes, stored).await,
            None => {}
        }
        let mut offset = 0usize;
        let mut room = RoomWait::default();
        loop {
            let end = (offset + CHUNK_BYTES as usize).min(bytes.len());
            let put = NodeRequest::PutObject {
                owner,
                id,
                offset: offset as u64,
                total,
                data: bytes[offset..end].to_vec(),
            };
            match node.call_idempotent(&put, CONTROL_TIMEOUT).await {
                Ok(NodeReply::ObjectWritten { sealed: true }) => break,
                Ok(NodeReply::ObjectWritten { sealed: false }) => offset = end,
                Ok(other) => {
                    return Err(Error::Protocol(format!("storing object {id}: {other:?}")))
                }
                Err(shoal_net::RpcError::Service(e)) if e.kind == ServiceErrorKind::Unavailable => {
                    if offset == 0 && room.again().await {
                        continue;
                    }
                    return Err(Error::ObjectStoreFull(e.message));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(stored)
    }

    /// Writes `bytes` into the object's file on this host and seals it.
    async fn fill_local(
        &self,
        id: ObjectId,
        path: &std::path::Path,
        bytes: &[u8],
        stored: StoredAt,
    ) -> Result<StoredAt> {
        let written = crate::shm::open_locked(path, true)
            .and_then(|mut f| std::io::Write::write_all(&mut f, bytes));
        if let Err(e) = written {
            return Err(Error::Protocol(format!(
                "writing object {id} to {}: {e}",
                path.display()
            )));
        }
        self.seal_local(id).await?;
        Ok(stored)
    }

    pub(crate) fn delete_stored(&self, id: ObjectId, at: StoredAt) {
        let core = try_get().cloned();
        self.deletes.spawn_on(
            async move {
                let Some(core) = core else { return };
                if let Ok(node) = core.node(&at.node_address).await {
                    let _ = node
                        .call_idempotent(
                            &NodeRequest::DeleteObjects { ids: vec![id] },
                            CONTROL_TIMEOUT,
                        )
                        .await;
                }
            },
            &self.handle,
        );
    }

    /// The bytes of task arguments, stored ones fetched from their nodes.
    pub(crate) async fn fetch_args(&self, args: &[ArgSpec]) -> Result<crate::shm::Args> {
        let mut out = Vec::with_capacity(args.len());
        for arg in args {
            match arg {
                ArgSpec::Inline(bytes) => out.push(crate::shm::Blob::from(bytes.clone())),
                ArgSpec::Stored { id, at } => out.push(
                    self.fetch_stored(*id, at, shoal_proto::PullPriority::Argument)
                        .await?,
                ),
            }
        }
        Ok(out)
    }

    /// A result, inline or (when large) stored in this node's store.
    pub(crate) async fn outcome_of(
        &self,
        id: ObjectId,
        bytes: Vec<u8>,
        (function, task_id, owner): (&str, TaskId, Option<WorkerId>),
        executor: Executor,
    ) -> TaskOutcome {
        if bytes.len() <= INLINE_BYTES_MAX {
            return TaskOutcome::Inline(bytes);
        }
        match self.store_on_node(id, &bytes, owner).await {
            Ok(at) => TaskOutcome::Stored(at),
            Err(e) => TaskOutcome::Failed(TaskFailure {
                kind: FailureKind::BadReturn,
                function: function.to_string(),
                task_id,
                node_id: Some(executor.node_id),
                message: format!("the result could not be stored: {e}"),
                backtrace: None,
                attempts: 1,
                after_ms: None,
            }),
        }
    }

    /// Where an object of `size` bytes in the home node's store is.
    fn home_at(&self, size: u64) -> StoredAt {
        StoredAt {
            node_id: self.home.node_id,
            node_address: self.home.address.clone(),
            size,
        }
    }
}

/// Waiting for room in a full store: freed objects are deleted
/// asynchronously, so a write refused for room is tried again for a while.
#[derive(Default)]
struct RoomWait {
    since: Option<std::time::Instant>,
}

impl RoomWait {
    /// Waits a moment and says yes while [`STORE_FULL_WAIT`] has not passed
    /// since the first refusal.
    async fn again(&mut self) -> bool {
        if self
            .since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            >= STORE_FULL_WAIT
        {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        true
    }
}
