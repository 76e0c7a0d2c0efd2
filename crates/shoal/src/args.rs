//! Task arguments after encoding, as the owner resolves them.

use shoal_proto::{Address, ObjectId};

/// Keeps the references a submitted task uses alive until it finishes.
#[doc(hidden)]
pub type KeepAlive = Box<dyn std::any::Any + Send>;

/// A task argument after encoding.
#[doc(hidden)]
pub enum ArgValue {
    Bytes(Vec<u8>),
    /// A value with references inside, each lent to the task while it was
    /// encoded (see `owner::objects::Borrows`).
    Lending {
        bytes: Vec<u8>,
        lent: Vec<ObjectId>,
    },
    Ref {
        id: ObjectId,
        owner: Address,
        _keep: KeepAlive,
    },
    /// Encoding failed: the task fails with this message.
    Bad(String),
}
