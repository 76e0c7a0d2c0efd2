//! The internal key-value table: small values by namespace and key (as
//! Ray's internal KV), kept in the head's store.

use std::collections::BTreeMap;

/// Longest key and namespace.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest value.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Most entries.
pub const ENTRIES_MAX: usize = 100_000;
/// Most keys in one listing.
pub const KEYS_LISTED_MAX: usize = 10_000;

/// Why a write was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// A namespace or key too long, or a namespace with a NUL byte.
    #[error(
        "namespaces and keys are limited to {KEY_BYTES_MAX} bytes, and a namespace has no NUL byte"
    )]
    BadKey,
    /// The value is too large.
    #[error("values are limited to {VALUE_BYTES_MAX} bytes, got {0}")]
    TooLarge(usize),
    /// The table is full.
    #[error("the table already has {ENTRIES_MAX} entries")]
    Full,
}

type Key = (String, Vec<u8>);

/// The table.
#[derive(Debug, Default)]
pub struct Kv {
    entries: BTreeMap<Key, Vec<u8>>,
    /// Keys changed since [`Kv::take_dirty`].
    dirty: Vec<Key>,
}

fn check(namespace: &str, key: &[u8]) -> Result<(), KvError> {
    if namespace.len() > KEY_BYTES_MAX || key.len() > KEY_BYTES_MAX || namespace.contains('\0') {
        return Err(KvError::BadKey);
    }
    Ok(())
}

/// The store's key for an entry: the namespace, a NUL, the key.
pub fn store_key(namespace: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(namespace.len() + 1 + key.len());
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

impl Kv {
    /// Sets a value; with `overwrite` false an existing value stays.
    /// Returns whether the table changed.
    pub fn put(
        &mut self,
        namespace: &str,
        key: &[u8],
        value: Vec<u8>,
        overwrite: bool,
    ) -> Result<bool, KvError> {
        check(namespace, key)?;
        if value.len() > VALUE_BYTES_MAX {
            return Err(KvError::TooLarge(value.len()));
        }
        let k = (namespace.to_string(), key.to_vec());
        let full = self.entries.len() >= ENTRIES_MAX;
        match self.entries.get_mut(&k) {
            Some(_) if !overwrite => return Ok(false),
            Some(old) => *old = value,
            None if full => return Err(KvError::Full),
            None => {
                self.entries.insert(k.clone(), value);
            }
        }
        self.dirty.push(k);
        Ok(true)
    }

    /// A value.
    pub fn get(&self, namespace: &str, key: &[u8]) -> Option<&Vec<u8>> {
        self.entries.get(&(namespace.to_string(), key.to_vec()))
    }

    /// Removes a key; true if it was set.
    pub fn delete(&mut self, namespace: &str, key: &[u8]) -> bool {
        let k = (namespace.to_string(), key.to_vec());
        let removed = self.entries.remove(&k).is_some();
        if removed {
            self.dirty.push(k);
        }
        removed
    }

    /// The keys of `namespace` starting with `prefix`, in order (at most
    /// [`KEYS_LISTED_MAX`]).
    pub fn keys(&self, namespace: &str, prefix: &[u8]) -> Vec<Vec<u8>> {
        let start = (namespace.to_string(), prefix.to_vec());
        self.entries
            .range(start..)
            .take_while(|((ns, k), _)| ns == namespace && k.starts_with(prefix))
            .take(KEYS_LISTED_MAX)
            .map(|((_, k), _)| k.clone())
            .collect()
    }

    /// An entry reloaded from the store (its key as [`store_key`] made
    /// it); a malformed one is skipped.
    pub fn restore(&mut self, stored: &[u8], value: Vec<u8>) {
        let Some(nul) = stored.iter().position(|b| *b == 0) else {
            return;
        };
        let Ok(namespace) = std::str::from_utf8(&stored[..nul]) else {
            return;
        };
        self.entries
            .insert((namespace.to_string(), stored[nul + 1..].to_vec()), value);
    }

    /// The entries changed since the last call: store key and value
    /// (`None`: removed).
    pub fn take_dirty(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .map(|k| {
                let value = self.entries.get(&k).cloned();
                (store_key(&k.0, &k.1), value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_keys_delete_and_what_the_store_gets() {
        let mut kv = Kv::default();
        assert_eq!(kv.put("ns", b"a1", b"x".to_vec(), false), Ok(true));
        assert_eq!(kv.put("ns", b"a1", b"y".to_vec(), false), Ok(false));
        assert_eq!(kv.get("ns", b"a1"), Some(&b"x".to_vec()));
        assert_eq!(kv.put("ns", b"a1", b"y".to_vec(), true), Ok(true));
        kv.put("ns", b"a2", b"z".to_vec(), false).expect("put");
        kv.put("ns", b"b", b"w".to_vec(), false).expect("put");
        kv.put("other", b"a3", b"v".to_vec(), false).expect("put");
        assert_eq!(kv.keys("ns", b"a"), vec![b"a1".to_vec(), b"a2".to_vec()]);
        assert!(kv.delete("ns", b"b"));
        assert!(!kv.delete("ns", b"b"));
        assert_eq!(kv.put("n\0s", b"k", vec![], true), Err(KvError::BadKey));
        assert_eq!(
            kv.put("ns", b"k", vec![0; VALUE_BYTES_MAX + 1], true),
            Err(KvError::TooLarge(VALUE_BYTES_MAX + 1))
        );
        let mut reloaded = Kv::default();
        for (key, value) in kv.take_dirty() {
            match value {
                Some(v) => reloaded.restore(&key, v),
                None => {
                    let (ns, k) = key.split_at(key.iter().position(|b| *b == 0).expect("nul"));
                    reloaded.delete(std::str::from_utf8(ns).expect("utf8"), &k[1..]);
                }
            }
        }
        assert_eq!(reloaded.get("ns", b"a1"), Some(&b"y".to_vec()));
        assert_eq!(reloaded.get("other", b"a3"), Some(&b"v".to_vec()));
        assert_eq!(reloaded.get("ns", b"b"), None);
    }
}
