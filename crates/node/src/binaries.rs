//! The node's content-addressed cache of job executables.
//!
//! Workers are the job's own executable re-run in worker mode. A node that
//! lacks it pulls it once from the head, in parts, into
//! `<cache>/<sha256>`, checks the hash, and reuses it for every later worker.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_net::{RpcClient, RpcError};
use shoal_proto::{HeadReply, HeadRequest};
use tokio::sync::watch;

/// Bytes asked for per request.
const CHUNK_BYTES: u32 = 8 << 20;

/// A connection to the head, when there is one.
pub type HeadWatch = watch::Receiver<Option<RpcClient<HeadRequest, HeadReply>>>;

/// The cache.
#[derive(Debug)]
pub struct BinaryCache {
    dir: PathBuf,
    head: HeadWatch,
    /// One fetch at a time: concurrent grants for a new job share it.
    fetching: tokio::sync::Mutex<()>,
}

/// Getting a job's executable failed.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// The name is not a hex SHA-256 (it would not be a safe file name).
    #[error("{0:?} is not a hex SHA-256")]
    BadHash(String),
    /// This node has no connection to the head to fetch it from.
    #[error("not connected to the head")]
    NoHead,
    /// Writing the cache failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Asking the head for a part failed.
    #[error("fetching executable {hash}: {source}")]
    Fetch {
        /// The executable.
        hash: String,
        /// Why.
        source: RpcError,
    },
    /// The head answered with something else than a part.
    #[error("unexpected reply fetching the executable: {0}")]
    UnexpectedReply(String),
    /// The head sent an empty part before the end.
    #[error("the head sent no bytes at offset {offset} of {total}")]
    Short {
        /// Where the part was asked for.
        offset: u64,
        /// The executable's size.
        total: u64,
    },
    /// What arrived does not hash to the name asked for.
    #[error("fetched executable hashes to {got}, not {expected}")]
    HashMismatch {
        /// The hash of what arrived.
        got: String,
        /// The name asked for.
        expected: String,
    },
}

/// Wraps an I/O error of `action` on `path`.
fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BinaryError {
    let path = path.to_path_buf();
    move |source| BinaryError::Io {
        action,
        path,
        source,
    }
}

impl BinaryCache {
    /// A cache in `dir` (created on first use), fetching through `head`.
    pub fn new(dir: PathBuf, head: HeadWatch) -> Self {
        Self {
            dir,
            head,
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The path of the executable with this hash, fetched if needed.
    pub async fn path(&self, hash: &str) -> Result<PathBuf, BinaryError> {
        if !shoal_net::digest::is_sha256_hex(hash) {
            return Err(BinaryError::BadHash(hash.chars().take(80).collect()));
        }
        let path = self.dir.join(hash);
        if path.exists() {
            return Ok(path);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        let head = self.head.borrow().clone().ok_or(BinaryError::NoHead)?;
        // A name of our own: nodes on one machine may share the directory,
        // and a file one of them still writes must never be executed.
        let partial = self.dir.join(format!(
            "{hash}.partial.{}.{}",
            std::process::id(),
            shoal_proto::WorkerId::random()
        ));
        let mut file = std::fs::File::create(&partial).map_err(io("creating", &partial))?;
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut offset = 0u64;
        loop {
            let request = HeadRequest::FetchBinary {
                hash: hash.to_string(),
                offset,
                len: CHUNK_BYTES,
            };
            let (total, data) = match head
                .call_idempotent(&request, Duration::from_secs(60))
                .await
            {
                Ok(HeadReply::BinaryChunk { total, data }) => (total, data),
                Ok(other) => return Err(BinaryError::UnexpectedReply(format!("{other:?}"))),
                Err(source) => {
                    return Err(BinaryError::Fetch {
                        hash: hash.to_string(),
                        source,
                    })
                }
            };
            if data.is_empty() && offset < total {
                return Err(BinaryError::Short { offset, total });
            }
            digest.update(&data);
            file.write_all(&data).map_err(io("writing", &partial))?;
            offset += data.len() as u64;
            if offset >= total {
                break;
            }
        }
        let got = shoal_proto::hex::encode(digest.finish().as_ref());
        if got != hash {
            let _ = std::fs::remove_file(&partial);
            return Err(BinaryError::HashMismatch {
                got,
                expected: hash.to_string(),
            });
        }
        file.sync_all().map_err(io("syncing", &partial))?;
        drop(file);
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of", &partial))?;
        // Atomic: the cached name only ever names a complete, closed file.
        std::fs::rename(&partial, &path).map_err(io("renaming", &partial))?;
        tracing::info!(%hash, bytes = offset, "fetched job executable");
        Ok(path)
    }
}
