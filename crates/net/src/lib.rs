//! Shoal's transport: QUIC (quinn) endpoints, the cluster's TLS identities, the
//! authenticated handshake and framed request/reply over streams.
//!
//! Modules:
//! - [`identity`]: the cluster identity made at `shoal start --head`: cluster id,
//!   256-bit join token and cluster CA; issues head and node certificates.
//! - [`tls`]: rustls configurations: the head's server, token-authenticated
//!   clients, and node-to-node mutual TLS.
//! - [`limits`]: every bound the transport applies (frame size, streams,
//!   windows, incoming connections, timeouts), set explicitly on quinn.
//! - [`endpoint`]: building quinn endpoints from the above.
//! - [`handshake`]: the `Hello` exchange that opens every connection, with the
//!   token proof bound to the TLS session and checked in constant time.
//! - [`rpc`]: request/reply over one bidirectional stream per request, with
//!   request ids and deadlines: the client ([`rpc::RpcClient`]) and the server
//!   loop ([`rpc::serve`]) around a [`rpc::Service`].
//! - [`faults`]: fault injection in the RPC client for tests, off unless
//!   `SHOAL_TESTING_RPC_FAILURE` is set (drop a request before it is sent,
//!   or a reply after its handler ran, by method, count or probability).
//! - [`transport`]: the seam every connection goes through: a
//!   [`transport::Transport`] opens connections, a [`transport::Listener`] is
//!   served; QUIC (with the same-host Unix link inside) or [`memory`].
//! - [`memory`]: an in-process network that loses, delays and cuts messages
//!   from a seed, behind the same seam, for tests of services under faults.
//! - [`host`]: this host as others see it: the advertised IP, local
//!   addresses, the host identity, the hostname.
//! - [`digest`]: SHA-256 as hex (content-addressed executables).
//! - [`sync`]: locks under the workspace's policy for poisoned locks
//!   ([`sync::MutexExt`], [`sync::RwLockExt`]).
//!
//! # Security model
//! Every connection is TLS 1.3. The head's certificate is signed by the
//! cluster CA, but a node joining from another machine holds only the join
//! token, so the authentication that matters is the handshake: both sides
//! prove they hold the token with an HMAC over keying material exported from
//! the TLS session (see [`handshake`]). Nothing past the `Hello` is read from a
//! peer that has not proved the token. Nodes then talk to each other over
//! mutual TLS with certificates the head issued them.

mod admission;
pub mod backoff;
pub mod digest;
pub mod endpoint;
pub mod error;
pub mod faults;
pub mod handshake;
pub mod host;
pub mod http;
pub mod identity;
pub mod limits;
pub mod memory;
pub mod rpc;
pub mod sync;
pub mod tls;
pub mod transport;
mod unix;

pub use error::{ConnectError, IdentityError, RpcError};
pub use identity::{ClusterIdentity, IssuedCert, JoinToken, TokenScope};
pub use limits::NetLimits;
pub use memory::MemoryNet;
pub use rpc::{Peer, RpcClient, Service};
pub use transport::{Listener, Transport};

/// The ALPN protocol name every Shoal connection negotiates.
pub const ALPN: &[u8] = b"shoal/1";

/// The TLS server name of the head's certificate.
pub const HEAD_SERVER_NAME: &str = "shoal-head";

/// The TLS server name of every node's certificate.
pub const NODE_SERVER_NAME: &str = "shoal-node";

/// QUIC application close codes.
pub mod close_code {
    /// Normal close.
    pub const DONE: u32 = 0;
    /// The handshake was refused (see the `Refused` reply for why).
    pub const HANDSHAKE_REFUSED: u32 = 1;
    /// The peer broke the protocol (bad frame, no hello in time, ...).
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 3;
}

/// quinn, re-exported for tests and tools that drive raw connections.
pub use quinn;
