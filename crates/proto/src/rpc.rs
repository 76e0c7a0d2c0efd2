//! Envelopes around every request and reply.
//!
//! Each request on a stream carries a request id (for logs and for matching a
//! reply to its request) and the time the caller will wait for it, so that a
//! server can drop work whose caller has already given up.

use serde::{Deserialize, Serialize};

/// A request with its id and deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct RequestEnvelope<T> {
    /// Unique per connection and direction.
    pub id: u64,
    /// How long, from when it was sent, the caller waits for the reply.
    pub timeout_ms: u64,
    /// The request itself.
    pub body: T,
}

/// A reply with the id of its request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub struct ReplyEnvelope<T> {
    /// The id of the request answered.
    pub id: u64,
    /// The reply, or why there is none.
    pub result: Result<T, ServiceError>,
}

/// A service's typed refusal of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
#[error("{kind:?}: {message}")]
pub struct ServiceError {
    /// What kind of failure.
    pub kind: ServiceErrorKind,
    /// A human-readable account, with context.
    pub message: String,
}

impl ServiceError {
    /// A new error of `kind`.
    pub fn new(kind: ServiceErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The kinds of [`ServiceError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(any(test, feature = "arbitrary"), derive(proptest_derive::Arbitrary))]
pub enum ServiceErrorKind {
    /// The request was well-formed but not acceptable (bad values).
    BadRequest,
    /// The request's deadline passed before it could be answered.
    DeadlineExceeded,
    /// The named thing does not exist.
    NotFound,
    /// The role of the connection may not make this request.
    PermissionDenied,
    /// The server is shutting down or overloaded; try again.
    Unavailable,
    /// A bug or an unexpected failure on the server.
    Internal,
}
