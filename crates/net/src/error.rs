//! Transport errors.

use std::io;

use shoal_proto::{DecodeError, EncodeError, HandshakeRefusal, ServiceError};

/// Creating, saving or loading a cluster identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Certificate generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// Reading or writing identity files failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// A join token string is not of the form `shoal1.<cluster id>.<secret>`
    /// (a cluster token) or `shoal1d.<cluster id>.<secret>` (a driver token).
    #[error("malformed join token: {0} (expected shoal1.<32 hex cluster id>.<64 hex secret>, or shoal1d. for a driver token)")]
    MalformedToken(&'static str),
    /// A TLS configuration could not be built from the identity.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Opening an authenticated connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address could not be resolved.
    #[error("cannot resolve {addr:?}: {source}")]
    Resolve {
        /// The address as given (`host:port`).
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The address resolved to nothing.
    #[error("{addr:?} resolves to no address")]
    Unresolved {
        /// The address as given.
        addr: String,
    },
    /// The local endpoint could not be created.
    #[error("cannot create local endpoint: {0}")]
    Endpoint(#[source] io::Error),
    /// quinn refused to start the connection (bad address, no client config, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where to.
        addr: String,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The QUIC connection failed or was closed.
    #[error("connection to {addr} failed: {source}")]
    Connection {
        /// Where to.
        addr: String,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The peer did not answer in time.
    #[error("{what} with {addr} timed out")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// Where to.
        addr: String,
    },
    /// The server refused our `Hello`.
    #[error("{addr} refused the handshake: {refusal}")]
    Refused {
        /// Where to.
        addr: String,
        /// Why, in the server's words.
        refusal: HandshakeRefusal,
    },
    /// The server could not prove it holds the join token: not our cluster,
    /// or a man in the middle.
    #[error("{addr} did not prove it holds the cluster's join token")]
    ServerNotAuthenticated {
        /// Where to.
        addr: String,
    },
    /// The handshake exchange itself failed (stream error, bad frame).
    #[error("handshake with {addr} failed: {reason}")]
    Handshake {
        /// Where to.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// A request/reply exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// No reply before the deadline.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The request could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The reply could not be decoded.
    #[error("bad reply: {0}")]
    Decode(#[from] DecodeError),
    /// The stream failed mid-exchange.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The service answered with a typed error.
    #[error("service error: {0}")]
    Service(#[from] ServiceError),
    /// The reply answered another request.
    #[error("reply id {got} does not match request id {expected}")]
    IdMismatch {
        /// The request's id.
        expected: u64,
        /// The reply's id.
        got: u64,
    },
    /// A fault injected by `SHOAL_TESTING_RPC_FAILURE` (see
    /// [`crate::faults`]): the request was dropped before it was sent, or
    /// its reply discarded after the server handled it. The connection is
    /// fine; retry as after a timeout.
    #[error("injected fault: {0}")]
    Injected(String),
}

impl RpcError {
    /// True when the connection is unusable and must be replaced. Not for
    /// [`RpcError::Injected`]: the connection is fine.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, RpcError::Connection(_))
    }

    /// True when the exchange ended without an answer on a connection that
    /// may still work (a lost request or reply, a timeout, a broken stream):
    /// an idempotent request may be sent again.
    pub fn is_worth_retrying(&self) -> bool {
        matches!(
            self,
            RpcError::Injected(_)
                | RpcError::Timeout(_)
                | RpcError::Stream(_)
                | RpcError::IdMismatch { .. }
        )
    }

    /// True when the service answered that it is busy for now
    /// (`Unavailable`): the same request may succeed later.
    pub fn is_busy(&self) -> bool {
        matches!(self, RpcError::Service(e) if e.kind == shoal_proto::ServiceErrorKind::Unavailable)
    }
}

impl ConnectError {
    /// The handshake with `addr` failed for `reason` (a broken exchange,
    /// an answer that does not read).
    pub fn handshake(addr: std::net::SocketAddr, reason: String) -> Self {
        ConnectError::Handshake {
            addr: addr.to_string(),
            reason,
        }
    }
}
