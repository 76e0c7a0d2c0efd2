//! The cluster's internal key-value table: small values (up to 1 MiB) by
//! namespace and key, kept by the head and surviving its restart (as Ray's
//! internal KV). For coordination and metadata, not for data: objects are
//! for that.
//!
//! ```no_run
//! # fn main() -> shoal::Result<()> {
//! let _shoal = shoal::init(shoal::Config::from_env())?;
//! shoal::kv::put("app", "leader", b"node-3", true)?;
//! assert_eq!(shoal::kv::get("app", "leader")?, Some(b"node-3".to_vec()));
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{HeadReply, HeadRequest};

use crate::error::{Error, Result};

/// Deadline of one request (the head link waits for a restarting head on
/// top of it, up to `Config::head_timeout`).
const TIMEOUT: Duration = Duration::from_secs(30);

fn ask(request: HeadRequest) -> Result<HeadReply> {
    let core = crate::driver::ensure_core();
    let core2 = Arc::clone(&core);
    core.block_on(async move { Ok(core2.head.call_idempotent(&request, TIMEOUT).await?) })
}

fn unexpected(reply: HeadReply, what: &str) -> Error {
    Error::Protocol(format!("{reply:?} in answer to {what}"))
}

/// Sets `key` to `value` in `namespace`; with `overwrite` false an
/// existing value is kept. Returns whether the table changed. Durable when
/// it returns: a head that dies after it keeps the value.
pub fn put(namespace: &str, key: &str, value: &[u8], overwrite: bool) -> Result<bool> {
    let request = HeadRequest::KvPut {
        namespace: namespace.to_string(),
        key: key.as_bytes().to_vec(),
        value: value.to_vec(),
        overwrite,
    };
    match ask(request)? {
        HeadReply::KvWritten { changed } => Ok(changed),
        other => Err(unexpected(other, "KvPut")),
    }
}

/// The value of `key` in `namespace`, if set.
pub fn get(namespace: &str, key: &str) -> Result<Option<Vec<u8>>> {
    let request = HeadRequest::KvGet {
        namespace: namespace.to_string(),
        key: key.as_bytes().to_vec(),
    };
    match ask(request)? {
        HeadReply::KvValue(value) => Ok(value),
        other => Err(unexpected(other, "KvGet")),
    }
}

/// Removes `key` from `namespace`; true if it was set.
pub fn delete(namespace: &str, key: &str) -> Result<bool> {
    let request = HeadRequest::KvDelete {
        namespace: namespace.to_string(),
        key: key.as_bytes().to_vec(),
    };
    match ask(request)? {
        HeadReply::KvWritten { changed } => Ok(changed),
        other => Err(unexpected(other, "KvDelete")),
    }
}

/// The keys of `namespace` that start with `prefix`, in order (at most
/// 10 000).
pub fn keys(namespace: &str, prefix: &str) -> Result<Vec<String>> {
    let request = HeadRequest::KvKeys {
        namespace: namespace.to_string(),
        prefix: prefix.as_bytes().to_vec(),
    };
    match ask(request)? {
        HeadReply::KvKeys(keys) => Ok(keys
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect()),
        other => Err(unexpected(other, "KvKeys")),
    }
}
