//! Typed identifiers.
//!
//! Every id is a newtype over a [`Uuid`], serialized transparently (16 raw bytes in
//! MessagePack, a hyphenated string in human-readable formats such as JSON) and
//! displayed in the short form users see in `shoal status`. A new id is random
//! (UUID v4); a node gets a new [`NodeId`] each time it starts, which is what lets
//! the head reject anything from an earlier incarnation of the same machine.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use uuid::Uuid;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
        #[serde(transparent)]
        pub struct $name(
            #[cfg_attr(any(test, feature = "arbitrary"), proptest(strategy = "crate::ids::arb_uuid()"))] Uuid,
        );

        impl $name {
            /// A new random id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            /// The id with this UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The id's UUID.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The id as 16 bytes.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            /// The id as 32 lowercase hex digits, without hyphens.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.simple(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.simple())
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            /// Accepts the simple (32 hex digits) and the hyphenated forms.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

typed_id!(
    /// A cluster: every connection names the cluster it believes it speaks to.
    ClusterId
);
typed_id!(
    /// A node daemon's incarnation: new at every start of the daemon.
    NodeId
);
typed_id!(
    /// A job: one driver program's run.
    JobId
);
typed_id!(
    /// One submission of a task (attempts of it share the id).
    TaskId
);
typed_id!(
    /// An object in the object store.
    ObjectId
);
typed_id!(
    /// An actor, across its restarts.
    ActorId
);
typed_id!(
    /// A worker process (or, in local mode, thread).
    WorkerId
);
typed_id!(
    /// A placement group.
    PlacementGroupId
);
typed_id!(
    /// A worker lease granted by the head.
    LeaseId
);

/// Hashing for maps keyed by ids, far cheaper than the default SipHash on
/// tables that see tens of thousands of ids a second (the head's task
/// table, an owner's task events). Ids are mostly random bits already; a
/// random key per map keeps a peer from choosing ids that collide.
#[derive(Clone, Copy, Debug)]
pub struct IdHashState {
    k0: u64,
    k1: u64,
}

impl Default for IdHashState {
    fn default() -> Self {
        let key = Uuid::new_v4().as_u64_pair();
        Self {
            k0: key.0,
            k1: key.1,
        }
    }
}

impl std::hash::BuildHasher for IdHashState {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            h: self.k0,
            k1: self.k1,
        }
    }
}

/// The hasher of [`IdHashState`]: a multiply and rotate per 8 bytes.
#[derive(Clone, Copy, Debug)]
pub struct IdHasher {
    h: u64,
    k1: u64,
}

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.h = (self.h ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(29);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write(&n.to_le_bytes());
    }

    fn write_usize(&mut self, n: usize) {
        self.write(&n.to_le_bytes());
    }

    fn finish(&self) -> u64 {
        // A final mix, so the high bits (hashbrown's tags) depend on all.
        let mut h = self.h ^ self.k1;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

impl TaskId {
    /// A new task id: 96 random bits, the low 32 bits zero so that the ids of
    /// the task's objects can carry an index there.
    pub fn fresh() -> Self {
        Self(Uuid::from_u128(Uuid::new_v4().as_u128() & !0xffff_ffff))
    }

    /// The id of the task's `index`-th return value (0-based).
    pub fn return_object(&self, index: u32) -> ObjectId {
        ObjectId(Uuid::from_u128(self.0.as_u128() | u128::from(index + 1)))
    }

    /// The id of the `index`-th object `put` while this task ran (0-based).
    pub fn put_object(&self, index: u32) -> ObjectId {
        ObjectId(Uuid::from_u128(
            self.0.as_u128() | u128::from(PUT_BIT | (index & !PUT_BIT)),
        ))
    }
}

const PUT_BIT: u32 = 0x8000_0000;

impl ObjectId {
    /// The task that made this object (lineage is a pure function of the id).
    pub fn task_id(&self) -> TaskId {
        TaskId(Uuid::from_u128(self.0.as_u128() & !0xffff_ffff))
    }

    /// True for an object made by `put` rather than returned by a task.
    pub fn is_put(&self) -> bool {
        (self.0.as_u128() as u32) & PUT_BIT != 0
    }
}

#[cfg(any(test, feature = "arbitrary"))]
pub(crate) fn arb_uuid() -> impl proptest::strategy::Strategy<Value = Uuid> {
    use proptest::prelude::*;
    any::<u128>().prop_map(Uuid::from_u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let id = NodeId::random();
        let shown = id.to_string();
        assert_eq!(shown.len(), 32, "simple form is 32 hex digits");
        assert_eq!(shown.parse::<NodeId>().ok(), Some(id));
        assert_eq!(
            id.as_uuid().hyphenated().to_string().parse::<NodeId>().ok(),
            Some(id)
        );
    }

    #[test]
    fn garbage_does_not_parse() {
        assert!("not-an-id".parse::<JobId>().is_err());
        assert!("".parse::<JobId>().is_err());
    }

    #[test]
    fn object_ids_lead_back_to_their_task() {
        let task = TaskId::fresh();
        let r0 = task.return_object(0);
        let p0 = task.put_object(0);
        assert_ne!(r0, p0);
        assert_ne!(r0, task.return_object(1));
        assert_eq!(r0.task_id(), task);
        assert_eq!(p0.task_id(), task);
        assert!(!r0.is_put());
        assert!(p0.is_put());
        assert_eq!(
            task.put_object(u32::MAX).task_id(),
            task,
            "index overflow stays in the low bits"
        );
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(TaskId::random(), TaskId::random());
    }
}
