//! Executables (and `shoal job submit`'s working directories) by content
//! hash: uploaded in parts by the first driver that runs one, fetched in
//! parts by nodes that lack it.
//!
//! What a token holder can make the head hold is bounded: an upload's size
//! ([`BINARY_BYTES_MAX`]); uploads in progress at once
//! ([`UPLOADS_IN_PROGRESS_MAX`]) and their bytes ([`UPLOAD_BYTES_MAX`]);
//! an upload no part of which arrived for [`UPLOAD_IDLE`] is dropped (its
//! driver died mid-upload). Complete executables live as files in the
//! head's session directory when it has one, not in memory; a head
//! without one (local mode, or a store on another machine, which keeps
//! them in its rows) holds at most [`BINARIES_KEPT`] and
//! [`MEMORY_BYTES_MAX`] in memory, forgetting the oldest first.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use shoal_net::digest::{is_sha256_hex, sha256_hex};

/// Largest executable accepted.
pub const BINARY_BYTES_MAX: u64 = 2 << 30;
/// Executables kept (least recently stored forgotten first).
pub const BINARIES_KEPT: usize = 16;
/// Uploads in progress at once; another is refused (the driver tries
/// again) until one completes or is dropped.
pub const UPLOADS_IN_PROGRESS_MAX: usize = 4;
/// Declared bytes of the uploads in progress, together.
pub const UPLOAD_BYTES_MAX: u64 = 4 << 30;
/// An upload with no part for this long is dropped.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// Bytes of complete executables a head without a directory for them
/// holds in memory.
pub const MEMORY_BYTES_MAX: u64 = 4 << 30;

/// Why an upload was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Larger than [`BINARY_BYTES_MAX`].
    #[error("executable of {0} bytes exceeds the {BINARY_BYTES_MAX} byte limit")]
    TooLarge(u64),
    /// Parts must arrive in order.
    #[error("expected the part at offset {expected}, got {got}")]
    OutOfOrder {
        /// The next offset expected.
        expected: u64,
        /// The offset sent.
        got: u64,
    },
    /// The part runs past the declared size, or the size changed.
    #[error("part does not fit the declared size {0}")]
    BadSize(u64),
    /// The whole upload does not hash to its name.
    #[error("upload does not match its hash {0}")]
    HashMismatch(String),
    /// The head could not keep it on disk.
    #[error("cannot keep the executable: {0}")]
    NotKept(String),
    /// The name is not a hex SHA-256.
    #[error("{0:?} is not a hex SHA-256")]
    BadHash(String),
    /// Too many uploads in progress, or too many bytes of them: the
    /// uploader tries again later.
    #[error("the head takes {UPLOADS_IN_PROGRESS_MAX} uploads of {UPLOAD_BYTES_MAX} bytes in all at once; {uploads} uploads of {bytes} bytes are in progress")]
    Busy {
        /// Uploads in progress.
        uploads: usize,
        /// Their declared bytes.
        bytes: u64,
    },
}

/// Executables by content hash.
#[derive(Debug, Default)]
pub struct Binaries {
    complete: HashMap<String, Held>,
    /// Complete ones, oldest stored first.
    order: VecDeque<String>,
    /// Bytes of complete ones held in memory.
    in_memory: u64,
    /// Uploads in progress.
    uploads: HashMap<String, Upload>,
    /// How complete executables outlive the head.
    keeping: Keeping,
    /// The store rows of executables stored (`Some(row)`) or forgotten
    /// since [`Binaries::take_dirty`].
    dirty: Vec<(String, Option<Vec<u8>>)>,
}

/// Where a complete executable is.
#[derive(Debug)]
enum Held {
    Memory(Arc<Vec<u8>>),
    /// A file of this many bytes in the keeping directory.
    File(u64),
}

/// An upload in progress.
#[derive(Debug)]
struct Upload {
    /// Its declared size.
    total: u64,
    bytes: Vec<u8>,
    /// When its last part arrived.
    last: Instant,
}

/// How a head with a store keeps its executables.
#[derive(Debug, Default)]
enum Keeping {
    /// In memory only (a head without a store).
    #[default]
    Memory,
    /// As files in this directory, their sizes in the store (an embedded
    /// store: the files sit beside it).
    Files(PathBuf),
    /// Whole, in the store's rows (a store on another machine, which a
    /// head taking over there reads).
    Rows,
}

/// What one part of an upload made of it.
#[derive(Debug)]
pub enum Part {
    /// More parts are to come.
    More,
    /// The executable is stored already.
    Stored,
    /// The upload is whole: to check and keep (see [`Whole::check_and_keep`]).
    Whole(Whole),
}

/// A whole upload, not yet checked against its hash nor kept.
#[derive(Debug)]
pub struct Whole {
    hash: String,
    bytes: Vec<u8>,
    keep_in: KeepIn,
}

/// Where a whole upload is to be kept (from [`Keeping`]).
#[derive(Debug)]
enum KeepIn {
    Memory,
    File(PathBuf),
    Row,
}

/// A checked executable, kept, to count in with [`Binaries::hold_kept`].
#[derive(Debug)]
pub struct Kept {
    hash: String,
    held: Held,
    /// Its store row, if the store is to have one.
    row: Option<Vec<u8>>,
}

impl Whole {
    /// Checks the bytes against the hash and keeps them: written to their
    /// file and synced, or encoded as their store row. Slow for a large
    /// executable (a 100 MB one takes about a second on a loaded machine),
    /// so done with the executables' lock let go, on a blocking thread.
    pub fn check_and_keep(self) -> Result<Kept, UploadError> {
        let Whole {
            hash,
            bytes,
            keep_in,
        } = self;
        if sha256_hex(&bytes) != hash {
            return Err(UploadError::HashMismatch(hash));
        }
        let size = bytes.len() as u64;
        let (held, row) = match keep_in {
            KeepIn::Memory => (Held::Memory(Arc::new(bytes)), None),
            KeepIn::File(dir) => {
                Binaries::keep(&dir, &hash, &bytes)
                    .map_err(|e| UploadError::NotKept(e.to_string()))?;
                let row = BinaryRow { size, bytes: None };
                (Held::File(size), Some(crate::store::encode(&row)))
            }
            KeepIn::Row => {
                let row = BinaryRow {
                    size,
                    bytes: Some(bytes),
                };
                let encoded = crate::store::encode(&row);
                // Moved into the row to encode it, and back (no copy).
                let bytes = row.bytes.unwrap_or_default();
                (Held::Memory(Arc::new(bytes)), Some(encoded))
            }
        };
        Ok(Kept { hash, held, row })
    }
}

/// An executable's row in the store.
#[derive(Debug, Serialize, Deserialize)]
struct BinaryRow {
    size: u64,
    /// The bytes, when the store keeps them (else they are a file).
    #[serde(with = "serde_bytes")]
    bytes: Option<Vec<u8>>,
}

/// Why a kept executable could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct FileError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

impl Binaries {
    /// Executables kept as files in `dir`.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self {
            keeping: Keeping::Files(dir),
            ..Self::default()
        }
    }

    /// Executables kept in memory and whole in the store's rows.
    pub fn in_rows() -> Self {
        Self {
            keeping: Keeping::Rows,
            ..Self::default()
        }
    }

    /// Reloads a kept executable from its store row (a restarted head). One
    /// whose file is gone or whose bytes do not match the hash is
    /// forgotten, and uploaded again by the next driver that runs it.
    pub fn restore(&mut self, hash: &str, row: &[u8]) -> Result<(), FileError> {
        if !is_sha256_hex(hash) {
            return Ok(());
        }
        let Some(row) = crate::store::decode::<BinaryRow>(crate::store::Table::Binaries, row)
        else {
            return Ok(());
        };
        let held = match (row.bytes, &self.keeping) {
            (Some(bytes), _) => {
                if sha256_hex(&bytes) != hash {
                    self.dirty.push((hash.to_string(), None));
                    return Ok(());
                }
                Held::Memory(Arc::new(bytes))
            }
            (None, Keeping::Files(dir)) => {
                let path = dir.join(hash);
                // Read to check it, then left on disk.
                let bytes = std::fs::read(&path).map_err(|source| FileError {
                    what: "reading",
                    path: path.clone(),
                    source,
                })?;
                if sha256_hex(&bytes) != hash {
                    self.dirty.push((hash.to_string(), None));
                    return Ok(());
                }
                Held::File(bytes.len() as u64)
            }
            (None, _) => return Ok(()),
        };
        self.hold(hash, held);
        Ok(())
    }

    /// The store rows of executables stored or forgotten since the last
    /// call.
    pub fn take_dirty(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut self.dirty)
    }

    /// Writes a complete executable to its file, synced before it is
    /// counted as stored.
    fn keep(dir: &Path, hash: &str, bytes: &[u8]) -> Result<(), FileError> {
        use std::io::Write as _;
        let path = dir.join(hash);
        // Its own partial file: two uploads of the same executable may be
        // kept at once (a second begun while the first was being checked).
        static KEEPING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = KEEPING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = dir.join(format!("{hash}.{n}.partial"));
        let err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| FileError { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(err("creating", dir))?;
        let mut file = std::fs::File::create(&partial).map_err(err("creating", &partial))?;
        file.write_all(bytes).map_err(err("writing", &partial))?;
        file.sync_all().map_err(err("syncing", &partial))?;
        std::fs::rename(&partial, &path).map_err(err("renaming", &partial))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("syncing", dir))
    }

    /// True if the executable is stored.
    pub fn has(&self, hash: &str) -> bool {
        self.complete.contains_key(hash)
    }

    /// Where a stored executable (or archive) is, to read once the
    /// executables' lock is let go: a file read under it would hold up
    /// every upload and fetch meanwhile.
    pub fn stored(&self, hash: &str) -> Option<Stored> {
        Some(match self.complete.get(hash)? {
            Held::Memory(bytes) => Stored::Memory(bytes.clone()),
            Held::File(size) => Stored::File {
                path: self.file(hash)?,
                size: *size,
            },
        })
    }

    fn file(&self, hash: &str) -> Option<PathBuf> {
        match &self.keeping {
            Keeping::Files(dir) => Some(dir.join(hash)),
            _ => None,
        }
    }

    /// Stores one part of an upload, with the hash check and the keeping
    /// of a whole one done at once: see [`Binaries::take_part`] for a
    /// caller that must not hold the lock meanwhile. True once stored.
    #[cfg(test)]
    pub fn upload(
        &mut self,
        hash: &str,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<bool, UploadError> {
        self.upload_at(hash, offset, total, data, Instant::now())
    }

    #[cfg(test)]
    fn upload_at(
        &mut self,
        hash: &str,
        offset: u64,
        total: u64,
        data: &[u8],
        now: Instant,
    ) -> Result<bool, UploadError> {
        match self.take_part_at(hash, offset, total, data, now)? {
            Part::More => Ok(false),
            Part::Stored => Ok(true),
            Part::Whole(whole) => {
                self.hold_kept(whole.check_and_keep()?);
                Ok(true)
            }
        }
    }

    /// Takes one part of an upload. The last part returns the whole upload,
    /// which is checked and kept ([`Whole::check_and_keep`]: hashing and
    /// writing hundreds of megabytes) with the executables' lock let go,
    /// then counted in with [`Binaries::hold_kept`].
    pub fn take_part(
        &mut self,
        hash: &str,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<Part, UploadError> {
        self.take_part_at(hash, offset, total, data, Instant::now())
    }

    fn take_part_at(
        &mut self,
        hash: &str,
        offset: u64,
        total: u64,
        data: &[u8],
        now: Instant,
    ) -> Result<Part, UploadError> {
        if !is_sha256_hex(hash) {
            return Err(UploadError::BadHash(hash.chars().take(80).collect()));
        }
        if self.has(hash) {
            return Ok(Part::Stored);
        }
        if total > BINARY_BYTES_MAX {
            return Err(UploadError::TooLarge(total));
        }
        // Uploads whose driver went away mid-way.
        self.uploads
            .retain(|_, u| now.saturating_duration_since(u.last) < UPLOAD_IDLE);
        if !self.uploads.contains_key(hash) {
            let uploads = self.uploads.len();
            let bytes: u64 = self.uploads.values().map(|u| u.total).sum();
            if uploads >= UPLOADS_IN_PROGRESS_MAX || bytes.saturating_add(total) > UPLOAD_BYTES_MAX
            {
                return Err(UploadError::Busy { uploads, bytes });
            }
        }
        let upload = self
            .uploads
            .entry(hash.to_string())
            .or_insert_with(|| Upload {
                total,
                bytes: Vec::new(),
                last: now,
            });
        if upload.total != total {
            return Err(UploadError::BadSize(upload.total));
        }
        let buf = &mut upload.bytes;
        // The part received last, sent again (its reply was lost).
        if offset < buf.len() as u64 && offset + data.len() as u64 == buf.len() as u64 {
            upload.last = now;
            return Ok(Part::More);
        }
        if offset != buf.len() as u64 {
            return Err(UploadError::OutOfOrder {
                expected: buf.len() as u64,
                got: offset,
            });
        }
        if offset + data.len() as u64 > total {
            return Err(UploadError::BadSize(total));
        }
        buf.extend_from_slice(data);
        upload.last = now;
        if (buf.len() as u64) < total {
            return Ok(Part::More);
        }
        let bytes = self
            .uploads
            .remove(hash)
            .map(|u| u.bytes)
            .unwrap_or_default();
        let keep_in = match &self.keeping {
            Keeping::Memory => KeepIn::Memory,
            Keeping::Files(dir) => KeepIn::File(dir.clone()),
            Keeping::Rows => KeepIn::Row,
        };
        Ok(Part::Whole(Whole {
            hash: hash.to_string(),
            bytes,
            keep_in,
        }))
    }

    /// Counts in an executable checked and kept by
    /// [`Whole::check_and_keep`], with its store row.
    pub fn hold_kept(&mut self, kept: Kept) {
        if let Some(row) = kept.row {
            self.dirty.push((kept.hash.clone(), Some(row)));
        }
        self.hold(&kept.hash, kept.held);
    }

    /// Counts a complete executable in, forgetting the oldest past the
    /// bounds.
    fn hold(&mut self, hash: &str, held: Held) {
        if let Held::Memory(bytes) = &held {
            self.in_memory += bytes.len() as u64;
        }
        if let Some(Held::Memory(old)) = self.complete.insert(hash.to_string(), held) {
            self.in_memory -= old.len() as u64;
        } else {
            self.order.push_back(hash.to_string());
        }
        while self.order.len() > BINARIES_KEPT
            || (self.in_memory > MEMORY_BYTES_MAX && self.order.len() > 1)
        {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(Held::Memory(bytes)) = self.complete.remove(&old) {
                self.in_memory -= bytes.len() as u64;
            }
            if let Keeping::Files(dir) = &self.keeping {
                // A file left behind is only space.
                let _ = std::fs::remove_file(dir.join(&old));
            }
            if !matches!(self.keeping, Keeping::Memory) {
                self.dirty.push((old, None));
            }
        }
    }
}

/// A complete executable's bytes, found under the executables' lock and
/// read after it ([`Binaries::stored`]).
#[derive(Clone, Debug)]
pub enum Stored {
    /// Held in memory (a head that keeps no directory).
    Memory(Arc<Vec<u8>>),
    /// A file in the session directory.
    File {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

impl Stored {
    /// The whole executable; `None` if its file cannot be read (it was
    /// dropped meanwhile, past the count kept).
    pub fn read(&self) -> Option<Arc<Vec<u8>>> {
        match self {
            Stored::Memory(bytes) => Some(bytes.clone()),
            Stored::File { path, .. } => std::fs::read(path).ok().map(Arc::new),
        }
    }

    /// Up to `len` bytes from `offset` (none past the end), with the whole
    /// size.
    pub fn read_at(&self, offset: u64, len: u32) -> Option<(u64, Vec<u8>)> {
        match self {
            Stored::Memory(whole) => {
                let start = usize::try_from(offset).ok()?.min(whole.len());
                let end = start.saturating_add(len as usize).min(whole.len());
                Some((whole.len() as u64, whole[start..end].to_vec()))
            }
            Stored::File { path, size } => {
                use std::os::unix::fs::FileExt;
                let start = offset.min(*size);
                let want = u64::from(len).min(size - start) as usize;
                let mut part = vec![0; want];
                let file = std::fs::File::open(path).ok()?;
                file.read_exact_at(&mut part, start).ok()?;
                Some((*size, part))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_upload_is_checked_and_kept_apart_from_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Binaries::in_dir(dir.path().to_path_buf());
        let data = vec![7u8; 4096];
        let hash = sha256_hex(&data);
        let Ok(Part::Whole(whole)) = b.take_part(&hash, 0, 4096, &data) else {
            panic!("the last part gives the whole upload");
        };
        // Meanwhile (the hash checked and the file written with the lock
        // let go) the table serves others, and does not count it yet.
        assert!(!b.has(&hash));
        let other = sha256_hex(b"other");
        assert!(matches!(b.take_part(&other, 0, 10, b"ot"), Ok(Part::More)));
        let kept = whole.check_and_keep().expect("kept");
        assert!(dir.path().join(&hash).exists(), "written before counted");
        b.hold_kept(kept);
        assert!(b.has(&hash));
        assert_eq!(b.take_dirty().len(), 1, "its row for the store");
        assert!(matches!(
            b.take_part(&hash, 0, 4096, &data),
            Ok(Part::Stored)
        ));
        // A whole upload that does not match its hash is refused then.
        let wrong = sha256_hex(b"not these bytes");
        let Ok(Part::Whole(whole)) = b.take_part(&wrong, 0, 3, b"abc") else {
            panic!("whole");
        };
        assert_eq!(
            whole.check_and_keep().map(|_| ()),
            Err(UploadError::HashMismatch(wrong.clone()))
        );
        assert!(!b.has(&wrong));
    }

    #[test]
    fn upload_in_parts_checks_the_hash() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let hash = sha256_hex(&data);
        let mut b = Binaries::default();
        assert_eq!(b.upload(&hash, 0, 10_000, &data[..4000]), Ok(false));
        assert_eq!(
            b.upload(&hash, 0, 10_000, &data[..4000]),
            Ok(false),
            "the last part again (its reply lost) is taken once"
        );
        assert_eq!(
            b.upload(&hash, 0, 10_000, &data[..10]),
            Err(UploadError::OutOfOrder {
                expected: 4000,
                got: 0
            })
        );
        assert_eq!(b.upload(&hash, 4000, 10_000, &data[4000..]), Ok(true));
        assert!(b.has(&hash));
        assert_eq!(
            b.stored(&hash).and_then(|s| s.read_at(9_990, 100)),
            Some((10_000, data[9_990..].to_vec()))
        );
        assert_eq!(
            b.stored(&hash).and_then(|s| s.read_at(20_000, 100)),
            Some((10_000, vec![]))
        );
        let wrong = sha256_hex(b"other");
        assert_eq!(
            b.upload(&wrong, 0, 3, b"abc"),
            Err(UploadError::HashMismatch(wrong.clone()))
        );
        assert!(!b.has(&wrong));
        assert!(matches!(
            b.upload("../etc", 0, 1, b"x"),
            Err(UploadError::BadHash(_))
        ));
        assert_eq!(
            b.upload(&wrong, 0, BINARY_BYTES_MAX + 1, b"x"),
            Err(UploadError::TooLarge(BINARY_BYTES_MAX + 1))
        );
    }

    fn hashed(n: u32) -> (String, Vec<u8>) {
        let data = n.to_le_bytes().repeat(100);
        (sha256_hex(&data), data)
    }

    #[test]
    fn uploads_in_progress_are_bounded_and_an_abandoned_one_expires() {
        let mut b = Binaries::default();
        let start = Instant::now();
        // Uploads begun and never finished (their drivers died).
        for n in 0..UPLOADS_IN_PROGRESS_MAX as u32 {
            let (hash, data) = hashed(n);
            assert_eq!(b.upload_at(&hash, 0, 400, &data[..10], start), Ok(false));
        }
        let (hash, data) = hashed(99);
        assert!(matches!(
            b.upload_at(&hash, 0, 400, &data[..10], start),
            Err(UploadError::Busy { uploads, .. }) if uploads == UPLOADS_IN_PROGRESS_MAX
        ));
        // One of them goes on: it is not dropped while its parts arrive.
        let (going, going_data) = hashed(0);
        let later = start + UPLOAD_IDLE / 2;
        assert_eq!(
            b.upload_at(&going, 10, 400, &going_data[10..20], later),
            Ok(false)
        );
        // The abandoned ones are dropped after the idle time, and the
        // waiting upload gets its turn; the live one still completes.
        let after = start + UPLOAD_IDLE;
        assert_eq!(b.upload_at(&hash, 0, 400, &data, after), Ok(true));
        assert_eq!(b.uploads.len(), 1, "only the live upload is left");
        assert_eq!(
            b.upload_at(&going, 20, 400, &going_data[20..], after),
            Ok(true)
        );
        assert!(b.uploads.is_empty());
    }

    #[test]
    fn the_bytes_of_uploads_in_progress_are_bounded() {
        let mut b = Binaries::default();
        let now = Instant::now();
        // Declared sizes count, before any byte of them arrives.
        for n in 0..2 {
            let (hash, data) = hashed(n);
            assert_eq!(
                b.upload_at(&hash, 0, BINARY_BYTES_MAX, &data[..1], now),
                Ok(false)
            );
        }
        let (hash, data) = hashed(7);
        assert!(matches!(
            b.upload_at(&hash, 0, 400, &data[..1], now),
            Err(UploadError::Busy { bytes, .. }) if bytes == 2 * BINARY_BYTES_MAX
        ));
    }

    #[test]
    fn executables_of_a_head_with_a_directory_are_files_not_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Binaries::in_dir(dir.path().to_path_buf());
        let (hash, data) = hashed(1);
        assert_eq!(b.upload(&hash, 0, 400, &data), Ok(true));
        assert_eq!(b.in_memory, 0, "nothing held in memory");
        assert!(matches!(b.complete.get(&hash), Some(Held::File(400))));
        assert_eq!(
            std::fs::read(dir.path().join(&hash)).expect("its file"),
            data
        );
        let stored = b.stored(&hash).expect("stored");
        assert_eq!(stored.read_at(390, 100), Some((400, data[390..].to_vec())));
        assert_eq!(stored.read().as_deref(), Some(&data));
        // Past the count kept, the oldest file goes.
        for n in 2..=BINARIES_KEPT as u32 + 1 {
            let (other, bytes) = hashed(n);
            assert_eq!(b.upload(&other, 0, 400, &bytes), Ok(true));
        }
        assert!(!b.has(&hash));
        assert!(!dir.path().join(&hash).exists());
        // A restarted head finds the files by their rows, still not in memory.
        // The store applies the rows in order: a forgotten one is deleted.
        let mut rows = HashMap::new();
        for (kept, row) in b.take_dirty() {
            match row {
                Some(row) => rows.insert(kept, row),
                None => rows.remove(&kept),
            };
        }
        let mut again = Binaries::in_dir(dir.path().to_path_buf());
        for (kept, row) in &rows {
            again.restore(kept, row).expect("restored");
        }
        assert_eq!(again.complete.len(), BINARIES_KEPT);
        assert_eq!(again.in_memory, 0);
    }
}
