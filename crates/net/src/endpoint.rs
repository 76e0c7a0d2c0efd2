//! Building quinn endpoints with every limit set explicitly.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::error::IdentityError;
use crate::limits::NetLimits;

/// Connection-level receive window a server grants before the peer has
/// proved the token: enough for a `Hello`, too little to pin memory.
pub const UNAUTHENTICATED_WINDOW_BYTES: u32 = 64 << 10;

/// quinn's transport settings for clients: the full limits from the start.
pub fn transport_config(limits: &NetLimits) -> Arc<TransportConfig> {
    Arc::new(base_transport(
        limits,
        limits.streams_max,
        limits.connection_window_bytes,
    ))
}

/// quinn's transport settings for servers: one stream and a small window
/// until the handshake succeeds, when the server raises both to the limits
/// (see [`grant_full_limits`]). An unauthenticated peer can make the server
/// buffer at most [`UNAUTHENTICATED_WINDOW_BYTES`].
pub fn server_transport_config(limits: &NetLimits) -> Arc<TransportConfig> {
    Arc::new(base_transport(limits, 1, UNAUTHENTICATED_WINDOW_BYTES))
}

/// Raises an authenticated connection to the full limits.
pub fn grant_full_limits(conn: &quinn::Connection, limits: &NetLimits) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(limits.streams_max));
    conn.set_receive_window(VarInt::from_u32(limits.connection_window_bytes));
}

fn base_transport(limits: &NetLimits, streams: u32, window: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // No QUIC datagrams: nothing uses them, and their buffer is memory an
    // unauthenticated peer could fill.
    t.datagram_receive_buffer_size(None);
    t.stream_receive_window(VarInt::from_u32(limits.stream_window_bytes));
    t.receive_window(VarInt::from_u32(window));
    t.send_window(u64::from(limits.connection_window_bytes));
    // Durations beyond QUIC's range fall back to none (no idle timeout) only
    // for absurd configs; 30 s defaults are far inside it.
    t.max_idle_timeout(IdleTimeout::try_from(limits.idle_timeout).ok());
    t.keep_alive_interval(Some(limits.keep_alive_interval));
    t
}

/// quinn server settings: TLS, transport limits and the bound on connections
/// being set up at once.
pub fn server_config(
    tls: rustls::ServerConfig,
    limits: &NetLimits,
) -> Result<quinn::ServerConfig, IdentityError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(server_transport_config(limits));
    config.max_incoming(limits.incoming_max);
    config.migration(false);
    Ok(config)
}

/// quinn client settings: TLS and transport limits.
pub fn client_config(
    tls: rustls::ClientConfig,
    limits: &NetLimits,
) -> Result<quinn::ClientConfig, IdentityError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(limits));
    Ok(config)
}

/// A UDP socket bound to `addr` with enlarged buffers (many medium streams in
/// flight overflow the kernel's default receive buffer).
pub fn bind_socket(addr: SocketAddr, limits: &NetLimits) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = UdpSocket::bind(addr)?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max, and a
    // smaller buffer only costs throughput.
    let _ = setsockopt(&socket, sockopt::RcvBuf, &limits.socket_buffer_bytes);
    let _ = setsockopt(&socket, sockopt::SndBuf, &limits.socket_buffer_bytes);
    Ok(socket)
}

/// An endpoint on `addr`, serving with `server` if given. Must be called
/// inside a tokio runtime.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    limits: &NetLimits,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_with(addr, server, limits, quinn::EndpointConfig::default())
}

/// [`endpoint`] whose stateless resets are signed with `reset_key`: an
/// endpoint restarted on the same address with the same key resets the
/// connections its predecessor had, so their peers learn at once that it
/// is gone (see [`JoinToken::reset_key`](crate::JoinToken::reset_key)).
pub fn endpoint_with_reset_key(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    limits: &NetLimits,
    reset_key: ring::hmac::Key,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(|| Box::new(RandomCids));
    endpoint_with(addr, server, limits, config)
}

/// Random 8-byte connection ids, none told apart from another endpoint's:
/// quinn's default generator signs its ids with a per-endpoint key and
/// drops packets for ids it did not sign, so a restarted endpoint would
/// never answer its predecessor's peers with a stateless reset.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 8];
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            // No system randomness: a v4 UUID's bits (also random).
            bytes = shoal_proto::ids::Uuid::new_v4()
                .as_u64_pair()
                .0
                .to_le_bytes();
        }
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

fn endpoint_with(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    limits: &NetLimits,
    config: quinn::EndpointConfig,
) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_socket(addr, limits)?;
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}
