//! The node's store of large objects: one file per object in shared memory
//! (a tmpfs directory, `/dev/shm` when the machine has it), immutable once
//! sealed, bounded in bytes, spilling to disk when nearly full.
//!
//! Writers on this host create the file through the store and fill it
//! themselves (one copy); peers elsewhere write it in parts over the
//! network. Readers on this host map the sealed file (no copy, see the SDK's
//! `shm` module); peers read it in parts. Above [`SPILL_AT`] of capacity the
//! least recently used sealed objects move to the spill directory on disk
//! and come back when read. The store's directory is removed when the store
//! is dropped, and directories left by daemons that died are removed when
//! the next store starts.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use shoal_proto::head::ObjectCopyChange as CopyChange;
use shoal_proto::{ObjectId, WorkerId};

/// Share of capacity above which objects spill to disk.
pub const SPILL_AT: f64 = 0.8;

/// Why the store refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No room: the store holds `used` of `max` bytes.
    #[error("object store full: {used} of {max} bytes used, {wanted} more wanted")]
    Full {
        /// Bytes in use.
        used: u64,
        /// Capacity.
        max: u64,
        /// Bytes the refused object needs.
        wanted: u64,
    },
    /// Parts must arrive in order, within the declared size.
    #[error("bad part for object {id}: {reason}")]
    BadPart {
        /// The object.
        id: ObjectId,
        /// What was wrong.
        reason: String,
    },
    /// The object is not here (or not sealed yet).
    #[error("object {0} is not in this node's store")]
    NotFound(ObjectId),
    /// The file system failed.
    #[error("object store file error on {what}: {message}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        message: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |e| StoreError::Io {
        what,
        message: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Being written: `written` bytes so far (parts), or by a local writer.
    Writing { written: u64 },
    /// Sealed, in shared memory.
    InMemory,
    /// Sealed, moved to the spill directory.
    Spilled,
}

#[derive(Debug)]
struct Entry {
    total: u64,
    state: State,
    /// For least-recently-used eviction and spilling.
    last_used: u64,
    /// The copy its owner wrote (spilled when room is short), or a copy
    /// pulled from another node (evicted when room is short).
    primary: bool,
    owner: Option<WorkerId>,
}

/// An object as `shoal list objects` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectListing {
    /// The object.
    pub id: ObjectId,
    /// Its size.
    pub size: u64,
    /// On disk rather than in memory.
    pub spilled: bool,
    /// The owner's copy (not one pulled from elsewhere).
    pub primary: bool,
}

/// Objects and bytes spilled to disk and restored from it since the store
/// opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpillTotals {
    /// Objects spilled.
    pub spilled_objects: u64,
    /// Bytes spilled.
    pub spilled_bytes: u64,
    /// Objects restored.
    pub restored_objects: u64,
    /// Bytes restored.
    pub restored_bytes: u64,
}

/// The store.
#[derive(Debug)]
pub struct ObjectStore {
    dir: PathBuf,
    spill_dir: PathBuf,
    objects: HashMap<ObjectId, Entry>,
    /// Bytes in shared memory (partial objects reserved whole).
    used: u64,
    spilled: u64,
    /// Since the store opened: objects and bytes spilled and restored.
    totals: SpillTotals,
    max: u64,
    /// Most bytes spilled (else: while the disk stays under 95% full).
    spill_max: Option<u64>,
    clock: u64,
    /// Changes not yet reported to the head.
    changes: Vec<CopyChange>,
    /// Files of freed objects kept for new ones: their memory is already
    /// allocated, so writing a new object into one costs no page faults
    /// (the gigabytes-per-second of `put` are those of a copy, not of the
    /// kernel handing out fresh pages). Dropped first when room is short.
    pool: Vec<(u64, PathBuf)>,
    /// Bytes in `pool`.
    pooled: u64,
    /// Names pooled files.
    pool_counter: u64,
}

/// Changes kept for the head at most (older ones are dropped; the head's
/// directory is a hint, readers fall back to the owner's location).
const CHANGES_MAX: usize = 100_000;

/// Prefix of store directories, followed by the daemon's process id.
const DIR_PREFIX: &str = "shoal-objects-";

/// True when a process holds a lock on the file at `path` (it maps or
/// writes the object), or the file cannot be checked.
fn file_in_use(path: &Path) -> bool {
    match File::open(path) {
        // The exclusive lock is released when `file` closes.
        Ok(file) => file.try_lock().is_err(),
        Err(_) => true,
    }
}

/// Creates `dir` (and any missing parent) for this user alone: objects are
/// users' data, and `/dev/shm` is open to every local user.
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        // A directory that was already there keeps its mode otherwise.
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(io(format!("creating {}", dir.display())))
}

/// Creates (or empties) an object's file, readable and writable by this
/// user alone. Files renamed from the reuse pool and copies made with
/// `std::fs::copy` (spills, restores) keep this mode.
fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Where stores live: the shared-memory file system when there is one.
pub fn default_root(fallback: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        fallback.to_path_buf()
    }
}

impl ObjectStore {
    /// An empty store of `max` bytes with its files in a new directory
    /// under `root` and spilled objects under `spill_root`.
    pub fn new(
        root: &Path,
        spill_root: &Path,
        max: u64,
        spill_max: Option<u64>,
    ) -> Result<Self, StoreError> {
        remove_orphans(root);
        let tag = format!("{DIR_PREFIX}{}-{:08x}", std::process::id(), rand_tag());
        let dir = root.join(&tag);
        let spill_dir = spill_root.join(&tag);
        private_dir(&dir)?;
        private_dir(&spill_dir)?;
        Ok(Self {
            dir,
            spill_dir,
            objects: HashMap::new(),
            used: 0,
            spilled: 0,
            totals: SpillTotals::default(),
            max,
            spill_max,
            clock: 0,
            changes: Vec::new(),
            pool: Vec::new(),
            pooled: 0,
            pool_counter: 0,
        })
    }

    /// Most bytes of freed files kept for reuse.
    fn pool_max(&self) -> u64 {
        self.max / 4
    }

    /// Keeps a freed object's file for reuse, or removes it.
    ///
    /// A process that maps an object, or writes one, holds a shared lock
    /// on the file ([`file_in_use`]): such a file is only unlinked (its
    /// memory goes when the last mapping does), never given to a new
    /// object, whose writes the old mapping would see (or, truncated,
    /// fault on). The file is renamed before the check, so a reader that
    /// opens it by its object path and locks it after the check finds the
    /// path gone and does not use it.
    fn free_file(&mut self, path: PathBuf, size: u64) {
        if self.pooled.saturating_add(size) > self.pool_max() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        self.pool_counter += 1;
        let kept = self.dir.join(format!("free-{}", self.pool_counter));
        if std::fs::rename(&path, &kept).is_err() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        if file_in_use(&kept) {
            let _ = std::fs::remove_file(&kept);
            return;
        }
        self.pool.push((size, kept));
        self.pooled += size;
    }

    /// Takes the pooled file closest in size to `total`, if any.
    fn take_pooled(&mut self, total: u64) -> Option<PathBuf> {
        let at = (0..self.pool.len()).min_by_key(|&i| self.pool[i].0.abs_diff(total))?;
        let (size, path) = self.pool.swap_remove(at);
        self.pooled -= size;
        Some(path)
    }

    /// Drops pooled files until `bytes` more fit under `limit`.
    fn shrink_pool(&mut self, bytes: u64, limit: u64) {
        while self.used.saturating_add(self.pooled).saturating_add(bytes) > limit {
            let Some((size, path)) = self.pool.pop() else {
                return;
            };
            self.pooled -= size;
            let _ = std::fs::remove_file(path);
        }
    }

    /// The directory holding the objects' files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: ObjectId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn spill_path(&self, id: ObjectId) -> PathBuf {
        self.spill_dir.join(id.to_string())
    }

    fn touch(&mut self, id: ObjectId) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(entry) = self.objects.get_mut(&id) {
            entry.last_used = clock;
        }
    }

    /// Starts an object of `total` bytes whose file a writer on this host
    /// fills; returns its path. [`ObjectStore::seal`] makes it readable.
    pub fn create(
        &mut self,
        id: ObjectId,
        total: u64,
        owner: Option<WorkerId>,
    ) -> Result<PathBuf, StoreError> {
        self.create_copy(id, total, true, owner)
    }

    /// Like [`ObjectStore::create`], for a writer that may be storing an
    /// object again: a task run twice (retried, or rebuilt from its lineage
    /// while its first result was only unreachable) stores the same object
    /// id. An object already sealed at that size is [`Created::Sealed`]:
    /// immutable, so the writer has nothing to do.
    pub fn begin(
        &mut self,
        id: ObjectId,
        total: u64,
        owner: Option<WorkerId>,
    ) -> Result<Created, StoreError> {
        match self.objects.get(&id) {
            Some(entry)
                if entry.total == total && !matches!(entry.state, State::Writing { .. }) =>
            {
                self.promote(id, owner);
                Ok(Created::Sealed)
            }
            _ => self.create(id, total, owner).map(Created::File),
        }
    }

    /// A writer stored an object this node holds as a pulled copy: the copy
    /// is now the owner's (spilled, not evicted, when room is short).
    fn promote(&mut self, id: ObjectId, owner: Option<WorkerId>) {
        let Some(entry) = self.objects.get_mut(&id) else {
            return;
        };
        if entry.primary {
            return;
        }
        entry.primary = true;
        entry.owner = owner.or(entry.owner);
        let size = entry.total;
        self.sealed(id, size);
    }

    /// Starts a copy of an object that lives elsewhere, pulled here in parts
    /// ([`ObjectStore::write_part`]); evicted first when room is short.
    pub fn create_secondary(&mut self, id: ObjectId, total: u64) -> Result<PathBuf, StoreError> {
        self.create_copy(id, total, false, None)
    }

    fn create_copy(
        &mut self,
        id: ObjectId,
        total: u64,
        primary: bool,
        owner: Option<WorkerId>,
    ) -> Result<PathBuf, StoreError> {
        if total == 0 {
            return Err(StoreError::BadPart {
                id,
                reason: "an object in the store cannot be empty".into(),
            });
        }
        if let Some(entry) = self.objects.get(&id) {
            return match entry.state {
                State::Writing { .. } if entry.total == total => Ok(self.path(id)),
                State::Writing { .. } => Err(StoreError::BadPart {
                    id,
                    reason: format!("size changed from {} to {total}", entry.total),
                }),
                _ => Err(StoreError::BadPart {
                    id,
                    reason: "already sealed".into(),
                }),
            };
        }
        let reuse = self.take_pooled(total);
        if let Err(e) = self.reserve(id, total) {
            if let Some(old) = reuse {
                let _ = std::fs::remove_file(old);
            }
            return Err(e);
        }
        let path = self.path(id);
        let made = match reuse {
            Some(old) => std::fs::rename(&old, &path).and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(total)
            }),
            None => private_file(&path).and_then(|f| f.set_len(total)),
        };
        if let Err(e) = made {
            self.used -= total;
            let _ = std::fs::remove_file(&path);
            return Err(io(format!("creating {}", path.display()))(e));
        }
        self.objects.insert(
            id,
            Entry {
                total,
                state: State::Writing { written: 0 },
                last_used: 0,
                primary,
                owner,
            },
        );
        self.touch(id);
        Ok(path)
    }

    /// Seals an object a local writer filled.
    pub fn seal(&mut self, id: ObjectId) -> Result<(), StoreError> {
        let path = self.path(id);
        let entry = self.objects.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if entry.state != (State::Writing { written: 0 }) {
            return match entry.state {
                State::Writing { .. } => Err(StoreError::BadPart {
                    id,
                    reason: "written in parts: sealed by its last part".into(),
                }),
                _ => Ok(()),
            };
        }
        let len = std::fs::metadata(&path)
            .map_err(io(format!("checking {}", path.display())))?
            .len();
        if len != entry.total {
            return Err(StoreError::BadPart {
                id,
                reason: format!("the file has {len} bytes, not {}", entry.total),
            });
        }
        entry.state = State::InMemory;
        self.sealed(id, len);
        Ok(())
    }

    fn sealed(&mut self, id: ObjectId, size: u64) {
        let Some(entry) = self.objects.get(&id) else {
            return;
        };
        let change = CopyChange::Added {
            id,
            size,
            owner: entry.owner,
            primary: entry.primary,
        };
        self.record(change);
    }

    fn record(&mut self, change: CopyChange) {
        if self.changes.len() < CHANGES_MAX {
            self.changes.push(change);
        }
    }

    /// Writes part of a pulled copy at any offset (parts may arrive out of
    /// order); the caller seals it with [`ObjectStore::seal_pulled`].
    pub fn write_part(&mut self, id: ObjectId, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path(id);
        let entry = self.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        if !matches!(entry.state, State::Writing { .. }) || entry.primary {
            return Err(StoreError::BadPart {
                id,
                reason: "not a copy being pulled".into(),
            });
        }
        if offset.saturating_add(data.len() as u64) > entry.total {
            return Err(StoreError::BadPart {
                id,
                reason: format!("part ends past the size {}", entry.total),
            });
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        file.write_all_at(data, offset)
            .map_err(io(format!("writing {}", path.display())))
    }

    /// Seals a pulled copy once every part is written.
    pub fn seal_pulled(&mut self, id: ObjectId) -> Result<(), StoreError> {
        let entry = self.objects.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if !matches!(entry.state, State::Writing { .. }) {
            return Ok(());
        }
        entry.state = State::InMemory;
        let total = entry.total;
        self.sealed(id, total);
        Ok(())
    }

    /// Changes since the last call, for the head.
    pub fn take_changes(&mut self) -> Vec<CopyChange> {
        std::mem::take(&mut self.changes)
    }

    /// Every sealed copy here, as changes for a head that knows none of
    /// them (a restarted head); the changes not yet reported are dropped,
    /// since the list says it all.
    pub fn snapshot(&mut self) -> Vec<CopyChange> {
        self.changes.clear();
        let mut all = Vec::new();
        for (id, entry) in &self.objects {
            if matches!(entry.state, State::Writing { .. }) {
                continue;
            }
            all.push(CopyChange::Added {
                id: *id,
                size: entry.total,
                owner: entry.owner,
                primary: entry.primary,
            });
            if entry.state == State::Spilled {
                all.push(CopyChange::Spilled {
                    id: *id,
                    spilled: true,
                });
            }
        }
        all
    }

    /// Puts changes back that could not be reported.
    pub fn requeue_changes(&mut self, mut changes: Vec<CopyChange>) {
        changes.append(&mut self.changes);
        changes.truncate(CHANGES_MAX);
        self.changes = changes;
    }

    /// Writes a part (a writer elsewhere). The whole size is reserved at the
    /// first part, so concurrent writers cannot overcommit. Returns true
    /// once sealed.
    pub fn put(
        &mut self,
        id: ObjectId,
        offset: u64,
        total: u64,
        data: &[u8],
        owner: Option<WorkerId>,
    ) -> Result<bool, StoreError> {
        let bad = |reason: String| StoreError::BadPart { id, reason };
        if !self.objects.contains_key(&id) {
            if offset != 0 {
                return Err(bad(format!("first part must start at 0, not {offset}")));
            }
            self.create(id, total, owner)?;
        }
        let path = self.path(id);
        let entry = self.objects.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let written = match entry.state {
            State::Writing { written } => written,
            // A retried write of an object already sealed: immutable, done.
            State::InMemory | State::Spilled => {
                self.promote(id, owner);
                return Ok(true);
            }
        };
        if entry.total != total {
            return Err(bad(format!("size changed from {} to {total}", entry.total)));
        }
        // The part written last, sent again (its reply was lost): written.
        if offset < written && offset + data.len() as u64 == written {
            return Ok(false);
        }
        if offset != written {
            return Err(bad(format!("expected offset {written}, got {offset}")));
        }
        if offset + data.len() as u64 > total {
            return Err(bad(format!("part ends past the size {total}")));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        file.write_all_at(data, offset)
            .map_err(io(format!("writing {}", path.display())))?;
        let written = offset + data.len() as u64;
        entry.state = if written == total {
            State::InMemory
        } else {
            State::Writing { written }
        };
        if written == total {
            self.sealed(id, total);
        }
        Ok(written == total)
    }

    /// Stores a whole object at once.
    pub fn put_whole(&mut self, id: ObjectId, data: &[u8]) -> Result<(), StoreError> {
        if self.objects.contains_key(&id) {
            return Ok(());
        }
        let path = self.create(id, data.len() as u64, None)?;
        let written = private_file(&path).and_then(|mut f| f.write_all(data));
        if let Err(e) = written {
            self.delete(&[id]);
            return Err(io(format!("writing {}", path.display()))(e));
        }
        self.seal(id)
    }

    /// Makes room for `bytes`: spills the least recently used sealed objects
    /// while the store would pass [`SPILL_AT`], then counts them as used if
    /// they fit.
    fn reserve(&mut self, keep: ObjectId, bytes: u64) -> Result<(), StoreError> {
        let threshold = (self.max as f64 * SPILL_AT) as u64;
        self.shrink_pool(bytes, threshold);
        if self.used.saturating_add(bytes) > threshold {
            // Copies pulled from elsewhere go first: they can be pulled again.
            let mut copies: Vec<(u64, ObjectId)> = self
                .objects
                .iter()
                .filter(|(id, e)| e.state == State::InMemory && !e.primary && **id != keep)
                .map(|(id, e)| (e.last_used, *id))
                .collect();
            copies.sort_unstable();
            for (_, id) in copies {
                if self.used.saturating_add(bytes) <= threshold {
                    break;
                }
                self.delete(&[id]);
            }
        }
        if self.used.saturating_add(bytes) > threshold {
            let mut candidates: Vec<(u64, ObjectId)> = self
                .objects
                .iter()
                .filter(|(id, e)| e.state == State::InMemory && e.primary && **id != keep)
                .map(|(id, e)| (e.last_used, *id))
                .collect();
            candidates.sort_unstable();
            for (_, id) in candidates {
                if self.used.saturating_add(bytes) <= threshold {
                    break;
                }
                if let Err(e) = self.spill(id) {
                    // A smaller object may still fit where this one did not.
                    tracing::debug!(%id, error = %e, "could not spill an object to disk");
                }
            }
        }
        if self.used.saturating_add(bytes) > self.max {
            return Err(StoreError::Full {
                used: self.used,
                max: self.max,
                wanted: bytes,
            });
        }
        self.used += bytes;
        Ok(())
    }

    fn spill(&mut self, id: ObjectId) -> Result<(), StoreError> {
        let total = self.objects.get(&id).map_or(0, |e| e.total);
        let room = match self.spill_max {
            Some(max) => self.spilled.saturating_add(total) <= max,
            None => disk_has_room(&self.spill_dir, total),
        };
        if !room {
            return Err(StoreError::Io {
                what: "spilling".into(),
                message: "no room left for spilled objects".into(),
            });
        }
        let (from, to) = (self.path(id), self.spill_path(id));
        // Readers that mapped the file keep their mapping; the memory goes
        // when they unmap it.
        std::fs::copy(&from, &to).map_err(io(format!("spilling {}", from.display())))?;
        std::fs::remove_file(&from).map_err(io(format!("removing {}", from.display())))?;
        if let Some(entry) = self.objects.get_mut(&id) {
            entry.state = State::Spilled;
            self.used -= entry.total;
            self.spilled += entry.total;
            self.totals.spilled_objects += 1;
            self.totals.spilled_bytes += entry.total;
        }
        self.record(CopyChange::Spilled { id, spilled: true });
        tracing::debug!(%id, "object spilled to disk");
        Ok(())
    }

    fn restore(&mut self, id: ObjectId) -> Result<(), StoreError> {
        let total = self.objects.get(&id).ok_or(StoreError::NotFound(id))?.total;
        self.reserve(id, total)?;
        let (from, to) = (self.spill_path(id), self.path(id));
        if let Err(e) = std::fs::copy(&from, &to) {
            self.used -= total;
            let _ = std::fs::remove_file(&to);
            return Err(io(format!("restoring {}", from.display()))(e));
        }
        let _ = std::fs::remove_file(&from);
        if let Some(entry) = self.objects.get_mut(&id) {
            entry.state = State::InMemory;
            self.spilled -= total;
            self.totals.restored_objects += 1;
            self.totals.restored_bytes += total;
        }
        self.record(CopyChange::Spilled { id, spilled: false });
        tracing::debug!(%id, "object restored from disk");
        Ok(())
    }

    /// The path of a sealed object's file in shared memory (restored first
    /// if it was spilled), and its size.
    pub fn open(&mut self, id: ObjectId) -> Result<(PathBuf, u64), StoreError> {
        let entry = self.objects.get(&id).ok_or(StoreError::NotFound(id))?;
        let total = entry.total;
        match entry.state {
            State::Writing { .. } => return Err(StoreError::NotFound(id)),
            State::Spilled => self.restore(id)?,
            State::InMemory => {}
        }
        self.touch(id);
        Ok((self.path(id), total))
    }

    /// Reads up to `len` bytes of a sealed object from `offset`; returns
    /// them and the object's size.
    pub fn read(
        &mut self,
        id: ObjectId,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let (path, total) = self.open(id)?;
        let start = offset.min(total);
        let end = start.saturating_add(len).min(total);
        // Read into fresh capacity, not into zeroed memory first: a part
        // is 8 MiB, and zeroing it costs as much as the read.
        let want = (end - start) as usize;
        let mut data = Vec::with_capacity(want);
        File::open(&path)
            .and_then(|mut f| {
                use std::io::{Read, Seek};
                f.seek(std::io::SeekFrom::Start(start))?;
                f.take(want as u64).read_to_end(&mut data)
            })
            .and_then(|read| match read == want {
                true => Ok(()),
                false => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{read} of {want} bytes"),
                )),
            })
            .map_err(io(format!("reading {}", path.display())))?;
        Ok((data, total))
    }

    /// Frees objects; unknown ids are ignored.
    pub fn delete(&mut self, ids: &[ObjectId]) {
        for id in ids {
            if let Some(entry) = self.objects.remove(id) {
                if !matches!(entry.state, State::Writing { .. }) {
                    self.record(CopyChange::Removed { id: *id });
                }
                if entry.state == State::Spilled {
                    self.spilled -= entry.total;
                    let _ = std::fs::remove_file(self.spill_path(*id));
                } else {
                    self.used -= entry.total;
                    self.free_file(self.path(*id), entry.total);
                }
            }
        }
    }

    /// Frees every object: the node was fenced (declared dead), so its
    /// copies count for nothing (owners rebuilt or gave them up), and it
    /// rejoins as a new node with an empty store. No change is reported:
    /// the head forgot the old node's copies with it.
    pub fn clear(&mut self) -> usize {
        let ids: Vec<ObjectId> = self.objects.keys().copied().collect();
        self.delete(&ids);
        self.changes.clear();
        ids.len()
    }

    /// Deletes the pulled copies among `ids` (their primary is gone).
    pub fn delete_copies(&mut self, ids: &[ObjectId]) {
        let copies: Vec<ObjectId> = ids
            .iter()
            .filter(|id| self.objects.get(id).is_some_and(|e| !e.primary))
            .copied()
            .collect();
        self.delete(&copies);
    }

    /// Frees the primary copies owned by processes that died: nobody can
    /// free them any more, and readers get `OwnerDied` (as in Ray).
    pub fn delete_owned_by(&mut self, owners: &[WorkerId]) -> usize {
        if owners.is_empty() {
            return 0;
        }
        let ids: Vec<ObjectId> = self
            .objects
            .iter()
            .filter(|(_, e)| e.primary && e.owner.is_some_and(|o| owners.contains(&o)))
            .map(|(id, _)| *id)
            .collect();
        self.delete(&ids);
        ids.len()
    }

    /// Bytes in shared memory (reserved by partial objects included).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// What was spilled and restored since the store opened.
    pub fn spill_totals(&self) -> SpillTotals {
        self.totals
    }

    /// Bytes spilled to disk now.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Every object held.
    pub fn list(&self) -> Vec<ObjectListing> {
        self.objects
            .iter()
            .filter(|(_, e)| !matches!(e.state, State::Writing { .. }))
            .map(|(id, e)| ObjectListing {
                id: *id,
                size: e.total,
                spilled: e.state == State::Spilled,
                primary: e.primary,
            })
            .collect()
    }

    /// Objects held.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

impl ObjectStore {
    /// Removes every object and the store's directories (the node is
    /// stopping). Readers that mapped an object keep their mapping.
    pub fn close(&mut self) {
        self.objects.clear();
        self.used = 0;
        self.spilled = 0;
        self.pool.clear();
        self.pooled = 0;
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.spill_dir);
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// True if `bytes` more keep the file system holding `dir` under 95% full.
fn disk_has_room(dir: &Path, bytes: u64) -> bool {
    let Ok(fs) = nix::sys::statvfs::statvfs(dir) else {
        return false;
    };
    let block = fs.fragment_size().max(1);
    let total = fs.blocks() * block;
    let free = fs.blocks_available() * block;
    let used_after = total.saturating_sub(free).saturating_add(bytes);
    (used_after as f64) <= total as f64 * 0.95
}

fn rand_tag() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).ok();
    u32::from_le_bytes(b)
}

/// Removes store directories under `root` whose daemon is no longer running
/// (killed before it could remove its own).
pub fn remove_orphans(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !running(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// True while `pid` is a process that has not exited (a zombie has).
fn running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !matches!(
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next()),
        None | Some('Z') | Some('X')
    )
}

/// What [`ObjectStore::begin`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A file to fill, then seal.
    File(PathBuf),
    /// The object is here, sealed, at that size already.
    Sealed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::TaskId;

    fn store(max: u64) -> (tempfile::TempDir, ObjectStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = ObjectStore::new(
            &dir.path().join("shm"),
            &dir.path().join("spill"),
            max,
            None,
        )
        .expect("store");
        (dir, s)
    }

    fn read_all(s: &mut ObjectStore, id: ObjectId) -> Vec<u8> {
        s.read(id, 0, u64::MAX).expect("readable").0
    }

    #[test]
    fn storing_a_sealed_object_again_finds_it_sealed() {
        let (_dir, mut s) = store(1000);
        let id = ObjectId::random();
        let Created::File(path) = s.begin(id, 4, None).expect("begun") else {
            panic!("a new object is a file to fill")
        };
        std::fs::write(&path, b"abcd").expect("filled");
        s.seal(id).expect("sealed");
        // The retried task's write: nothing to do, and the bytes are kept.
        assert_eq!(s.begin(id, 4, None).expect("again"), Created::Sealed);
        assert_eq!(std::fs::read(&path).expect("read"), b"abcd");
        // Another size under the same id is still refused.
        assert!(s.begin(id, 5, None).is_err());
    }

    #[test]
    fn storing_over_a_pulled_copy_makes_it_the_owners() {
        let (_dir, mut s) = store(1000);
        let id = ObjectId::random();
        let owner = WorkerId::random();
        s.create_secondary(id, 4).expect("a pulled copy");
        s.write_part(id, 0, b"abcd").expect("its part");
        s.seal_pulled(id).expect("sealed");
        s.take_changes();
        assert_eq!(s.begin(id, 4, Some(owner)).expect("again"), Created::Sealed);
        let changes = s.take_changes();
        assert!(
            changes.iter().any(|c| matches!(c,
                CopyChange::Added { primary: true, owner: Some(o), .. } if *o == owner)),
            "{changes:?}"
        );
    }

    #[test]
    fn parts_seal_and_read_back() {
        let (_d, mut s) = store(100);
        let id = TaskId::fresh().return_object(0);
        assert_eq!(s.put(id, 0, 10, b"hello", None), Ok(false));
        assert!(s.open(id).is_err(), "unsealed objects are not readable");
        assert_eq!(s.put(id, 5, 10, b"world", None), Ok(true));
        assert_eq!(read_all(&mut s, id), b"helloworld");
        assert_eq!(s.read(id, 5, 3).expect("part").0, b"wor");
        assert_eq!(
            s.put(id, 0, 10, b"again", None),
            Ok(true),
            "retried writes are no-ops"
        );
        assert_eq!(s.used(), 10);
        s.delete(&[id]);
        assert_eq!(s.used(), 0);
        assert!(s.is_empty());
        assert!(!s.path(id).exists());
    }

    #[test]
    fn a_part_and_a_creation_sent_again_are_done_once() {
        let (_d, mut s) = store(100);
        let id = TaskId::fresh().return_object(0);
        let path = s.create(id, 10, None).expect("created");
        assert_eq!(s.create(id, 10, None).expect("again"), path, "same file");
        assert_eq!(s.used(), 10, "reserved once");
        s.delete(&[id]);
        let id = TaskId::fresh().return_object(0);
        assert_eq!(s.put(id, 0, 10, b"hello", None), Ok(false));
        assert_eq!(
            s.put(id, 0, 10, b"hello", None),
            Ok(false),
            "the last part again (its reply lost)"
        );
        assert!(
            s.put(id, 3, 10, b"lowo", None).is_err(),
            "a part overlapping what is written and going past it"
        );
        assert_eq!(s.put(id, 5, 10, b"world", None), Ok(true));
        assert_eq!(read_all(&mut s, id), b"helloworld");
        assert_eq!(s.used(), 10);
    }

    #[test]
    fn freed_files_are_reused_and_dropped_when_room_is_short() {
        let (_d, mut s) = store(1000);
        let files = |s: &ObjectStore| std::fs::read_dir(s.dir()).expect("dir").count();
        let a = TaskId::fresh().return_object(0);
        s.create(a, 200, None).expect("created");
        s.seal(a).expect("sealed");
        s.delete(&[a]);
        assert_eq!((s.used(), files(&s)), (0, 1), "the freed file is kept");
        // A new object takes the kept file, at its own size.
        let b = TaskId::fresh().return_object(0);
        let path = s.create(b, 150, None).expect("created");
        assert_eq!(files(&s), 1);
        assert_eq!(std::fs::metadata(&path).expect("file").len(), 150);
        s.seal(b).expect("sealed");
        assert_eq!(s.used(), 150);
        s.delete(&[b]);
        // Three kept files (240 bytes); two are taken by new objects and
        // the last is dropped, not an object spilled, when room runs short.
        let small: Vec<ObjectId> = (0..3).map(|_| TaskId::fresh().return_object(0)).collect();
        for id in &small {
            s.create(*id, 80, None).expect("created");
            s.seal(*id).expect("sealed");
        }
        s.delete(&small);
        assert_eq!(files(&s), 3);
        let e = TaskId::fresh().return_object(0);
        s.create(e, 600, None).expect("created");
        s.seal(e).expect("sealed");
        let f = TaskId::fresh().return_object(0);
        s.create(f, 150, None).expect("created");
        assert_eq!((s.used(), s.spilled(), files(&s)), (750, 0, 2));
    }

    #[test]
    fn a_freed_file_a_process_still_maps_is_removed_not_reused() {
        let (_d, mut s) = store(1000);
        let files = |s: &ObjectStore| std::fs::read_dir(s.dir()).expect("dir").count();
        let a = TaskId::fresh().return_object(0);
        let path = s.create(a, 200, None).expect("created");
        std::fs::write(&path, [7u8; 200]).expect("written");
        s.seal(a).expect("sealed");
        // A reader's lock, as `shoal::shm` takes while it maps the file.
        let reader = File::open(&path).expect("opened");
        reader.try_lock_shared().expect("locked");
        s.delete(&[a]);
        assert_eq!((s.used(), files(&s)), (0, 0), "removed, not kept");
        let b = TaskId::fresh().return_object(0);
        let new = s.create(b, 200, None).expect("created");
        std::fs::write(&new, [9u8; 200]).expect("written");
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut &reader, &mut seen).expect("read");
        assert_eq!(seen, vec![7u8; 200], "the reader's file is untouched");
    }

    #[test]
    fn a_local_writer_fills_the_file_and_seals_it() {
        let (_d, mut s) = store(100);
        let id = TaskId::fresh().return_object(0);
        let path = s.create(id, 4, None).expect("created");
        assert!(matches!(s.open(id), Err(StoreError::NotFound(_))));
        std::fs::write(&path, b"abcd").expect("written");
        s.seal(id).expect("sealed");
        assert_eq!(read_all(&mut s, id), b"abcd");
        let other = TaskId::fresh().return_object(0);
        let path = s.create(other, 8, None).expect("created");
        std::fs::write(&path, b"too long!").expect("written");
        assert!(
            matches!(s.seal(other), Err(StoreError::BadPart { .. })),
            "a file of the wrong size is refused"
        );
    }

    #[test]
    fn bad_parts_and_overflow_are_refused() {
        let (_d, mut s) = store(16);
        let id = TaskId::fresh().return_object(0);
        assert!(matches!(
            s.put(id, 3, 8, b"x", None),
            Err(StoreError::BadPart { .. })
        ));
        assert!(matches!(
            s.put(id, 0, 32, b"x", None),
            Err(StoreError::Full { .. })
        ));
        assert!(matches!(
            s.put(id, 0, 0, b"", None),
            Err(StoreError::BadPart { .. })
        ));
        assert_eq!(s.put(id, 0, 8, b"abcd", None), Ok(false));
        assert!(matches!(
            s.put(id, 2, 8, b"x", None),
            Err(StoreError::BadPart { .. })
        ));
        assert!(matches!(
            s.put(id, 4, 8, b"abcdefgh", None),
            Err(StoreError::BadPart { .. })
        ));
        assert!(matches!(
            s.put(id, 4, 9, b"x", None),
            Err(StoreError::BadPart { .. })
        ));
        let other = TaskId::fresh().return_object(0);
        assert!(
            matches!(s.put_whole(other, &[0; 9]), Err(StoreError::Full { .. })),
            "8 reserved, and a partial object cannot spill"
        );
        assert!(s.put(other, 0, u64::MAX, b"x", None).is_err());
    }

    #[test]
    fn objects_spill_past_the_threshold_and_come_back_when_read() {
        let (_d, mut s) = store(100);
        let ids: Vec<ObjectId> = (0..10).map(|_| TaskId::fresh().return_object(0)).collect();
        for (i, id) in ids.iter().enumerate() {
            s.put_whole(*id, &[i as u8; 30])
                .expect("room is made by spilling");
            assert!(s.used() <= 80, "used {} past the spill threshold", s.used());
        }
        assert_eq!(s.used() + s.spilled(), 300);
        assert!(s.list().iter().filter(|o| o.spilled).count() >= 8);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(read_all(&mut s, *id), vec![i as u8; 30], "object {i}");
        }
        s.delete(&ids);
        assert_eq!((s.used(), s.spilled()), (0, 0));
    }

    #[test]
    fn objects_and_their_spills_are_this_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        let modes = |dir: &Path| -> Vec<u32> {
            std::fs::read_dir(dir)
                .expect("dir")
                .map(|e| mode(&e.expect("entry").path()))
                .collect()
        };
        let (_d, mut s) = store(100);
        assert_eq!(mode(s.dir()), 0o700, "the store's directory");
        assert_eq!(mode(&s.spill_dir), 0o700, "the spill directory");
        // Whole objects, enough of them to spill some.
        for i in 0..4u8 {
            s.put_whole(TaskId::fresh().return_object(0), &[i; 30])
                .expect("stored");
        }
        let pulled = s
            .create_secondary(TaskId::fresh().return_object(0), 10)
            .expect("a pulled copy");
        assert_eq!(mode(&pulled), 0o600, "a pulled copy");
        let (stored, spilled) = (modes(s.dir()), modes(&s.spill_dir));
        assert!(!stored.is_empty() && !spilled.is_empty());
        assert!(
            stored.iter().chain(&spilled).all(|m| *m == 0o600),
            "stored {stored:?}, spilled {spilled:?} (modes in decimal)"
        );
    }

    #[test]
    fn the_directory_goes_with_the_store_and_orphans_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        // A directory left by a daemon that is not running.
        let orphan = root.path().join(format!("{DIR_PREFIX}{}-0", i32::MAX));
        std::fs::create_dir_all(&orphan).expect("orphan");
        let s = ObjectStore::new(root.path(), &root.path().join("spill"), 10, None).expect("store");
        assert!(!orphan.exists(), "the orphan was removed");
        let dir = s.dir().to_path_buf();
        assert!(dir.exists());
        drop(s);
        assert!(!dir.exists());
    }

    #[test]
    fn past_the_spill_limit_the_store_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = ObjectStore::new(
            &dir.path().join("shm"),
            &dir.path().join("spill"),
            100,
            Some(30),
        )
        .expect("store");
        let id = |_| TaskId::fresh().return_object(0);
        let ids: Vec<ObjectId> = (0..4).map(id).collect();
        s.put_whole(ids[0], &[0; 40]).expect("fits");
        s.put_whole(ids[1], &[1; 30])
            .expect("fits, spilling nothing yet");
        s.put_whole(ids[2], &[2; 31])
            .expect("the 30-byte object spills (the 40-byte one is past the limit)");
        assert_eq!((s.used(), s.spilled()), (71, 30));
        assert!(
            matches!(s.put_whole(ids[3], &[3; 50]), Err(StoreError::Full { .. })),
            "nothing more can spill"
        );
        s.delete(&[ids[2]]);
        assert_eq!(read_all(&mut s, ids[1]), vec![1; 30], "restored");
        assert_eq!((s.used(), s.spilled()), (70, 0));
    }
}
