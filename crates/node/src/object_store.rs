//! The node's store of large objects: written in parts, immutable once
//! sealed, bounded in bytes. (Shared memory, spilling and eviction come with
//! the object-plane work; today objects live in this process's heap.)

use std::collections::HashMap;
use std::sync::Arc;

use shoal_proto::ObjectId;

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
}

#[derive(Debug)]
struct Entry {
    data: Vec<u8>,
    total: u64,
    sealed: Option<Arc<Vec<u8>>>,
}

/// The store.
#[derive(Debug)]
pub struct ObjectStore {
    objects: HashMap<ObjectId, Entry>,
    used: u64,
    max: u64,
}

impl ObjectStore {
    /// An empty store of `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            objects: HashMap::new(),
            used: 0,
            max,
        }
    }

    /// Writes a part. The whole size is reserved at the first part, so
    /// concurrent writers cannot overcommit. Returns true once sealed.
    pub fn put(
        &mut self,
        id: ObjectId,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        let bad = |reason: String| StoreError::BadPart { id, reason };
        if !self.objects.contains_key(&id) {
            if offset != 0 {
                return Err(bad(format!("first part must start at 0, not {offset}")));
            }
            self.reserve(total)?;
            let capacity = usize::try_from(total).map_err(|_| bad("too large".into()))?;
            self.objects.insert(
                id,
                Entry {
                    data: Vec::with_capacity(capacity),
                    total,
                    sealed: None,
                },
            );
        }
        let entry = self.objects.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if entry.sealed.is_some() {
            // A retried write of an object already sealed: immutable, done.
            return Ok(true);
        }
        if entry.total != total {
            return Err(bad(format!("size changed from {} to {total}", entry.total)));
        }
        if offset != entry.data.len() as u64 {
            return Err(bad(format!(
                "expected offset {}, got {offset}",
                entry.data.len()
            )));
        }
        if offset + data.len() as u64 > total {
            return Err(bad(format!("part ends past the size {total}")));
        }
        entry.data.extend_from_slice(data);
        if entry.data.len() as u64 == total {
            entry.sealed = Some(Arc::new(std::mem::take(&mut entry.data)));
            return Ok(true);
        }
        Ok(false)
    }

    /// Stores a whole object at once.
    pub fn put_whole(&mut self, id: ObjectId, data: Vec<u8>) -> Result<(), StoreError> {
        if self.objects.get(&id).is_some_and(|e| e.sealed.is_some()) {
            return Ok(());
        }
        let total = data.len() as u64;
        self.reserve(total)?;
        self.objects.insert(
            id,
            Entry {
                data: Vec::new(),
                total,
                sealed: Some(Arc::new(data)),
            },
        );
        Ok(())
    }

    /// Counts `bytes` as used, if they fit.
    fn reserve(&mut self, bytes: u64) -> Result<(), StoreError> {
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

    /// A sealed object.
    pub fn get(&self, id: ObjectId) -> Result<Arc<Vec<u8>>, StoreError> {
        self.objects
            .get(&id)
            .and_then(|e| e.sealed.clone())
            .ok_or(StoreError::NotFound(id))
    }

    /// Frees objects; unknown ids are ignored.
    pub fn delete(&mut self, ids: &[ObjectId]) {
        for id in ids {
            if let Some(entry) = self.objects.remove(id) {
                self.used -= entry.total;
            }
        }
    }

    /// Bytes in use (reserved by partial objects included).
    pub fn used(&self) -> u64 {
        self.used
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::TaskId;

    #[test]
    fn parts_seal_and_read_back() {
        let mut s = ObjectStore::new(100);
        let id = TaskId::fresh().return_object(0);
        assert_eq!(s.put(id, 0, 10, b"hello"), Ok(false));
        assert!(s.get(id).is_err(), "unsealed objects are not readable");
        assert_eq!(s.put(id, 5, 10, b"world"), Ok(true));
        assert_eq!(s.get(id).expect("sealed").as_slice(), b"helloworld");
        assert_eq!(
            s.put(id, 0, 10, b"again"),
            Ok(true),
            "retried writes are no-ops"
        );
        assert_eq!(s.used(), 10);
        s.delete(&[id]);
        assert_eq!(s.used(), 0);
        assert!(s.is_empty());
    }

    #[test]
    fn bad_parts_and_overflow_are_refused() {
        let mut s = ObjectStore::new(16);
        let id = TaskId::fresh().return_object(0);
        assert!(matches!(
            s.put(id, 3, 8, b"x"),
            Err(StoreError::BadPart { .. })
        ));
        assert!(matches!(
            s.put(id, 0, 32, b"x"),
            Err(StoreError::Full { .. })
        ));
        assert_eq!(s.put(id, 0, 8, b"abcd"), Ok(false));
        assert!(matches!(
            s.put(id, 2, 8, b"x"),
            Err(StoreError::BadPart { .. })
        ));
        assert!(matches!(
            s.put(id, 4, 8, b"abcdefgh"),
            Err(StoreError::BadPart { .. })
        ));
        assert!(matches!(
            s.put(id, 4, 9, b"x"),
            Err(StoreError::BadPart { .. })
        ));
        let other = TaskId::fresh().return_object(0);
        assert!(
            matches!(s.put_whole(other, vec![0; 9]), Err(StoreError::Full { .. })),
            "8 reserved"
        );
        assert!(s.put(other, 0, u64::MAX, b"x").is_err());
    }
}
