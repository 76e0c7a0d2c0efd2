//! The head's durable tables: what a restarted head reloads.
//!
//! The head keeps its state in memory and writes what must survive it (jobs,
//! actors with their specs and names, the live nodes, executables, the
//! internal key-value table) through a [`Store`]: one writer thread takes the
//! writes in the order the head made them, commits as many as are waiting in
//! one transaction (group commit: one disk sync for a burst of requests), and
//! then counts them durable. A request's reply waits until everything it
//! changed is durable ([`Store::durable`]), so nothing acknowledged is lost
//! when the head dies.
//!
//! Where the tables live is a [`Backend`]: an embedded [`Redb`] file in the
//! session directory (pure Rust, crash-safe, no server), or none (a head
//! that forgets everything when it stops, as in local mode and unit tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use shoal_net::sync::MutexExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// A durable table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// The head's incarnation, and other single values.
    Meta,
    /// Jobs by id.
    Jobs,
    /// Actors by id, with their specs.
    Actors,
    /// The nodes alive when last written, by id.
    Nodes,
    /// Executables' metadata by hash (the bytes are files beside the store).
    Binaries,
    /// The internal key-value table.
    Kv,
    /// Placement groups not removed, by id (what they asked for; where
    /// their bundles are is placed again by a restarted head).
    Groups,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 7] = [
        Table::Meta,
        Table::Jobs,
        Table::Actors,
        Table::Nodes,
        Table::Binaries,
        Table::Kv,
        Table::Groups,
    ];

    /// Its name in the backend.
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Jobs => "jobs",
            Table::Actors => "actors",
            Table::Nodes => "nodes",
            Table::Binaries => "binaries",
            Table::Kv => "kv",
            Table::Groups => "placement_groups",
        }
    }
}

/// One change to a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Sets `key` to `value`.
    Put(Table, Vec<u8>, Vec<u8>),
    /// Removes `key`.
    Delete(Table, Vec<u8>),
}

/// Every table's rows, as loaded.
pub type Snapshot = HashMap<Table, Vec<(Vec<u8>, Vec<u8>)>>;

/// Why the store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk, file format, server).
    #[error("head store {what}: {message}")]
    Backend {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        message: String,
    },
    /// Another head holds the store: this one must not serve.
    #[error("another head holds the store: {0}")]
    Taken(String),
    /// The store stopped taking writes (it failed before, or the head is
    /// stopping).
    #[error("the head store is closed: {0}")]
    Closed(String),
}

impl StoreError {
    /// A backend error from any displayable cause.
    pub fn backend(what: &'static str, cause: impl std::fmt::Display) -> Self {
        StoreError::Backend {
            what,
            message: cause.to_string(),
        }
    }
}

/// Where the tables live.
pub trait Backend: Send + 'static {
    /// Every row of every table.
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Applies `writes` atomically and durably, or not at all.
    fn commit(&mut self, writes: &[Write]) -> Result<(), StoreError>;
    /// Called about once a second while idle (a lease to renew); an error
    /// stops the store.
    fn keep(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The embedded store: one redb file.
pub struct Redb {
    db: redb::Database,
}

/// The file name of the head's store in its session directory.
pub const REDB_FILE: &str = "head.redb";

type RedbTable = redb::TableDefinition<'static, &'static [u8], &'static [u8]>;

fn redb_table(table: Table) -> RedbTable {
    redb::TableDefinition::new(table.name())
}

impl Redb {
    /// Opens (or creates) the store at `path`. redb locks the file: a
    /// second head on the same file is refused.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Taken(format!("{} is open in another process", path.display()))
            }
            e => StoreError::backend("open", format!("{}: {e}", path.display())),
        })?;
        Ok(Self { db })
    }
}

impl Backend for Redb {
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let read = self
            .db
            .begin_read()
            .map_err(|e| StoreError::backend("read", e))?;
        let mut snapshot = Snapshot::new();
        for table in Table::ALL {
            let rows = snapshot.entry(table).or_default();
            let opened = match read.open_table(redb_table(table)) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(StoreError::backend("open table", e)),
            };
            let iter = redb::ReadableTable::iter(&opened)
                .map_err(|e| StoreError::backend("read table", e))?;
            for row in iter {
                let (k, v) = row.map_err(|e| StoreError::backend("read row", e))?;
                rows.push((k.value().to_vec(), v.value().to_vec()));
            }
        }
        Ok(snapshot)
    }

    fn commit(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| StoreError::backend("begin", e))?;
        {
            let mut tables = HashMap::new();
            for write in writes {
                let table = match write {
                    Write::Put(t, ..) | Write::Delete(t, _) => *t,
                };
                let opened = match tables.entry(table) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(
                        txn.open_table(redb_table(table))
                            .map_err(|e| StoreError::backend("open table", e))?,
                    ),
                };
                match write {
                    Write::Put(_, k, v) => opened
                        .insert(k.as_slice(), v.as_slice())
                        .map(drop)
                        .map_err(|e| StoreError::backend("write", e))?,
                    Write::Delete(_, k) => opened
                        .remove(k.as_slice())
                        .map(drop)
                        .map_err(|e| StoreError::backend("delete", e))?,
                }
            }
        }
        // Durability::Immediate (the default): synced before it returns.
        txn.commit().map_err(|e| StoreError::backend("commit", e))
    }
}

/// Writes waiting for the writer thread: their sequence number and rows.
type Batch = (u64, Vec<Write>);

/// The head's handle on its durable tables.
pub struct Store {
    /// To the writer thread; `None` for a store that keeps nothing.
    sender: Option<mpsc::Sender<Batch>>,
    /// The number of the newest batch handed over.
    enqueued: AtomicU64,
    /// The number of the newest batch durable; `Err` once the store failed.
    durable: watch::Receiver<Result<u64, StoreError>>,
    /// Cancelled when the store fails: the head must stop serving.
    failed: CancellationToken,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Where executables are kept, for a store on disk.
    files: Option<PathBuf>,
}

/// A fault for tests: the process exits right after the `N`th commit
/// that writes to table `TABLE` (by its [`Table::name`]), before any reply
/// for it is sent (`SHOAL_TESTING_HEAD_EXIT_AFTER_COMMITS=TABLE:N`).
const EXIT_AFTER_COMMITS: &str = "SHOAL_TESTING_HEAD_EXIT_AFTER_COMMITS";

/// The fault of [`EXIT_AFTER_COMMITS`]: a table and a count.
type ExitAfter = (Table, u64);

fn exit_after_from_env() -> Option<ExitAfter> {
    let value = std::env::var(EXIT_AFTER_COMMITS).ok()?;
    let (table, n) = value.split_once(':')?;
    let table = Table::ALL.into_iter().find(|t| t.name() == table)?;
    Some((table, n.parse().ok()?))
}

impl Store {
    /// A store that keeps nothing: every write is durable at once.
    pub fn none() -> Self {
        let (_, durable) = watch::channel(Ok(0));
        Self {
            sender: None,
            enqueued: AtomicU64::new(0),
            durable,
            failed: CancellationToken::new(),
            writer: Mutex::new(None),
            files: None,
        }
    }

    /// Loads every table from `backend`, then starts the writer thread.
    /// `files` is where executables are kept.
    pub fn start(
        mut backend: Box<dyn Backend>,
        files: Option<PathBuf>,
    ) -> Result<(Self, Snapshot), StoreError> {
        let snapshot = backend.load()?;
        let (sender, batches) = mpsc::channel::<Batch>();
        let (durable_tx, durable) = watch::channel(Ok(0));
        let failed = CancellationToken::new();
        let exit_after = exit_after_from_env();
        let writer = {
            let failed = failed.clone();
            std::thread::Builder::new()
                .name("shoal-head-store".into())
                .spawn(move || writer(backend, batches, durable_tx, failed, exit_after))
                .map_err(|e| StoreError::backend("start writer", e))?
        };
        Ok((
            Self {
                sender: Some(sender),
                enqueued: AtomicU64::new(0),
                durable,
                failed,
                writer: Mutex::new(Some(writer)),
                files,
            },
            snapshot,
        ))
    }

    /// Hands `writes` to the writer, in order; returns the number to wait
    /// for with [`Store::durable`]. Call it under the lock of the state the
    /// writes describe, so they are committed in the order they were made.
    pub fn enqueue(&self, writes: Vec<Write>) -> u64 {
        let Some(sender) = &self.sender else {
            return 0;
        };
        if writes.is_empty() {
            return self.enqueued.load(Ordering::Acquire);
        }
        let seq = self.enqueued.fetch_add(1, Ordering::AcqRel) + 1;
        // A closed writer has failed already: `durable` reports it.
        let _ = sender.send((seq, writes));
        seq
    }

    /// The number of the newest batch handed over.
    pub fn latest(&self) -> u64 {
        self.enqueued.load(Ordering::Acquire)
    }

    /// Waits until the batch numbered `seq` (and every one before it) is
    /// durable.
    pub async fn durable(&self, seq: u64) -> Result<(), StoreError> {
        if seq == 0 {
            return Ok(());
        }
        let mut durable = self.durable.clone();
        let reached = durable
            .wait_for(|d| match d {
                Ok(n) => *n >= seq,
                Err(_) => true,
            })
            .await
            .map_err(|_| StoreError::Closed("the writer stopped".into()))?;
        match &*reached {
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Cancelled when the store fails (a disk error, or another head took
    /// the store over): the head stops.
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// Where executables are kept, for a store on disk.
    pub fn files(&self) -> Option<&Path> {
        self.files.as_deref()
    }

    /// Commits what is waiting and stops the writer.
    pub fn close(&mut self) {
        self.sender = None;
        if let Some(writer) = self.writer.locked().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// How often an idle writer lets its backend renew what it holds.
const KEEP_EVERY: Duration = Duration::from_secs(1);

fn writer(
    mut backend: Box<dyn Backend>,
    batches: mpsc::Receiver<Batch>,
    durable: watch::Sender<Result<u64, StoreError>>,
    failed: CancellationToken,
    exit_after: Option<ExitAfter>,
) {
    let mut commits = 0u64;
    let mut last_keep = std::time::Instant::now();
    loop {
        let first = match batches.recv_timeout(KEEP_EVERY) {
            Ok(batch) => batch,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                last_keep = std::time::Instant::now();
                if let Err(e) = backend.keep() {
                    return fail(&durable, &failed, e);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let (mut seq, mut writes) = first;
        // Group commit: everything waiting goes in one transaction.
        while let Ok((next, more)) = batches.try_recv() {
            seq = next;
            writes.extend(more);
        }
        if last_keep.elapsed() >= KEEP_EVERY {
            last_keep = std::time::Instant::now();
            if let Err(e) = backend.keep() {
                return fail(&durable, &failed, e);
            }
        }
        if let Err(e) = backend.commit(&writes) {
            return fail(&durable, &failed, e);
        }
        if let Some((table, n)) = exit_after {
            let touches =
                |w: &Write| matches!(w, Write::Put(t, ..) | Write::Delete(t, _) if *t == table);
            commits += u64::from(writes.iter().any(touches));
            if commits == n {
                warn!(
                    commits,
                    table = table.name(),
                    "{EXIT_AFTER_COMMITS}: exiting after a commit, before its replies"
                );
                std::process::exit(99);
            }
        }
        let _previous = durable.send_replace(Ok(seq));
    }
}

fn fail(
    durable: &watch::Sender<Result<u64, StoreError>>,
    failed: &CancellationToken,
    e: StoreError,
) {
    error!(error = %e, "the head store failed; the head stops");
    // Cancelled first: whoever learns of the failure finds the head
    // stopping already.
    failed.cancel();
    let _previous = durable.send_replace(Err(e));
}

/// Encodes a row.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Records are plain structs of the head's own: encoding cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Decodes a row; a row that does not decode is skipped with a warning
/// (a store written by another version).
pub fn decode<T: serde::de::DeserializeOwned>(table: Table, bytes: &[u8]) -> Option<T> {
    match rmp_serde::from_slice(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(table = table.name(), error = %e, "skipping a row that does not decode");
            None
        }
    }
}

/// A started store and what it held.
pub struct Stored {
    /// The store.
    pub store: Store,
    /// Its tables as they were when it started.
    pub snapshot: Snapshot,
}

/// The head's tables in Redis at `url` (see [`crate::redis`]): the store's
/// lease is taken (waiting for another head's to lapse) before anything
/// is loaded. A new cluster's tables are empty: its id is new.
pub fn open_redis(url: &str, cluster: shoal_proto::ClusterId) -> Result<Stored, StoreError> {
    let backend = crate::redis::Redis::new(url, cluster, crate::redis::LEASE_TTL)?;
    let (store, snapshot) = Store::start(Box::new(backend), None)?;
    Ok(Stored { store, snapshot })
}

/// Executables' files, beside the store in the session directory.
pub const BINARIES_DIR: &str = "head-binaries";

/// The head's store in session directory `dir`: reloaded with `recover`,
/// else emptied first (a new cluster).
pub fn open_session(dir: &Path, recover: bool) -> Result<Stored, StoreError> {
    let path = dir.join(REDB_FILE);
    let files = dir.join(BINARIES_DIR);
    if !recover {
        for result in [std::fs::remove_file(&path), std::fs::remove_dir_all(&files)] {
            match result {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::backend("reset", e))
                }
                _ => {}
            }
        }
    }
    // A head that has just died may hold the file's lock for a moment
    // longer (its last threads exiting): wait a little before refusing.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let backend = loop {
        match Redb::open(&path) {
            Err(StoreError::Taken(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => break other?,
        }
    };
    let (store, snapshot) = Store::start(Box::new(backend), Some(files))?;
    Ok(Stored { store, snapshot })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(snapshot: &Snapshot, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut rows = snapshot.get(&table).cloned().unwrap_or_default();
        rows.sort();
        rows
    }

    #[tokio::test]
    async fn what_is_durable_is_there_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(REDB_FILE);
        {
            let backend = Redb::open(&path).expect("open");
            let (store, snapshot) = Store::start(Box::new(backend), None).expect("start");
            assert!(rows(&snapshot, Table::Jobs).is_empty());
            store.enqueue(vec![Write::Put(Table::Jobs, b"a".to_vec(), b"1".to_vec())]);
            store.enqueue(vec![
                Write::Put(Table::Jobs, b"b".to_vec(), b"2".to_vec()),
                Write::Put(Table::Kv, b"k".to_vec(), b"v".to_vec()),
            ]);
            let last = store.enqueue(vec![Write::Delete(Table::Jobs, b"a".to_vec())]);
            store.durable(last).await.expect("durable");
            assert_eq!(store.latest(), last);
            assert!(
                Redb::open(&path).is_err(),
                "a second head cannot open the store"
            );
        }
        let backend = Redb::open(&path).expect("reopen");
        let (_store, snapshot) = Store::start(Box::new(backend), None).expect("start");
        assert_eq!(
            rows(&snapshot, Table::Jobs),
            vec![(b"b".to_vec(), b"2".to_vec())]
        );
        assert_eq!(
            rows(&snapshot, Table::Kv),
            vec![(b"k".to_vec(), b"v".to_vec())]
        );
    }

    struct Failing;

    impl Backend for Failing {
        fn load(&mut self) -> Result<Snapshot, StoreError> {
            Ok(Snapshot::new())
        }
        fn commit(&mut self, _: &[Write]) -> Result<(), StoreError> {
            Err(StoreError::Taken("by another head".into()))
        }
    }

    #[tokio::test]
    async fn a_failed_commit_is_reported_and_stops_the_store() {
        let (store, _) = Store::start(Box::new(Failing), None).expect("start");
        let seq = store.enqueue(vec![Write::Put(Table::Kv, b"k".to_vec(), b"v".to_vec())]);
        let err = store.durable(seq).await.expect_err("not durable");
        assert!(matches!(err, StoreError::Taken(_)), "{err}");
        assert!(store.failed().is_cancelled());
    }
}
