//! The node's content-addressed cache of job executables.
//!
//! Workers are the job's own executable re-run in worker mode. A node that
//! lacks it pulls it once from the head, in parts, into
//! `<cache>/<sha256>`, checks the hash, and reuses it for every later worker.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use shoal_net::RpcClient;
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

fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
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
    pub async fn path(&self, hash: &str) -> Result<PathBuf, String> {
        if !valid_hash(hash) {
            return Err(format!("{hash:?} is not a hex SHA-256"));
        }
        let path = self.dir.join(hash);
        if path.exists() {
            return Ok(path);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let head = self
            .head
            .borrow()
            .clone()
            .ok_or("not connected to the head")?;
        // A name of our own: nodes on one machine may share the directory,
        // and a file one of them still writes must never be executed.
        let partial = self.dir.join(format!(
            "{hash}.partial.{}.{}",
            std::process::id(),
            shoal_proto::WorkerId::random()
        ));
        let mut file = std::fs::File::create(&partial)
            .map_err(|e| format!("creating {}: {e}", partial.display()))?;
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
                Ok(other) => {
                    return Err(format!(
                        "unexpected reply fetching the executable: {other:?}"
                    ))
                }
                Err(e) => return Err(format!("fetching executable {hash}: {e}")),
            };
            if data.is_empty() && offset < total {
                return Err(format!(
                    "the head sent no bytes at offset {offset} of {total}"
                ));
            }
            digest.update(&data);
            file.write_all(&data)
                .map_err(|e| format!("writing {}: {e}", partial.display()))?;
            offset += data.len() as u64;
            if offset >= total {
                break;
            }
        }
        let got: String = digest
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != hash {
            let _ = std::fs::remove_file(&partial);
            return Err(format!("fetched executable hashes to {got}, not {hash}"));
        }
        file.sync_all().map_err(|e| e.to_string())?;
        drop(file);
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        // Atomic: the cached name only ever names a complete, closed file.
        std::fs::rename(&partial, &path).map_err(|e| e.to_string())?;
        tracing::info!(%hash, bytes = offset, "fetched job executable");
        Ok(path)
    }
}
