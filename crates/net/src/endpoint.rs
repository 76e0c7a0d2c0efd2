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

/// Largest UDP payload an endpoint accepts, and the top of the MTU search
/// on a path within this host: loopback carries 64 KiB datagrams.
pub const SAME_HOST_UDP_PAYLOAD_BYTES: u16 = 65_527;

/// Which kind of path a connection takes, for its packet sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Between hosts: quinn's MTU search up to 1 452 bytes (Ethernet), with
    /// segmentation offload (one `sendmsg` carries up to 10 packets).
    Network,
    /// Within this host (loopback, or an address of this host): the MTU
    /// search goes up to [`SAME_HOST_UDP_PAYLOAD_BYTES`], and packets are
    /// sent one per `sendmsg`. quinn batches up to 10 packets of the
    /// path's MTU in one offloaded send, and the kernel refuses a batch
    /// over 64 KiB (quinn drops it silently, as a lost packet), so large
    /// packets and offload do not mix. On loopback this carries 2 to 3
    /// times the bytes of 1 452-byte packets for the same CPU.
    SameHost,
}

impl Path {
    /// The path to a peer at `ip`.
    pub fn to(ip: std::net::IpAddr) -> Self {
        if crate::host::is_local_ip(ip) {
            Path::SameHost
        } else {
            Path::Network
        }
    }

    /// The connection-level window a receiver grants: on one host, no more
    /// than its socket's receive buffer. Data in flight past that is not
    /// queued in a network but dropped by the kernel (counted as
    /// `RcvbufErrors`), and every drop of a 64 KiB packet halves the
    /// sender's congestion window.
    fn receive_window(self, limits: &NetLimits) -> u32 {
        match self {
            Path::Network => limits.connection_window_bytes,
            Path::SameHost => {
                // Three quarters of what the kernel granted (it counts each
                // packet's overhead against the buffer too).
                let granted = RECEIVE_BUFFER_GRANTED.load(std::sync::atomic::Ordering::Relaxed);
                let granted = if granted == 0 {
                    limits.socket_buffer_bytes
                } else {
                    granted
                };
                let window = u32::try_from(granted / 4 * 3).unwrap_or(u32::MAX);
                limits.connection_window_bytes.min(window.max(1 << 20))
            }
        }
    }
}

/// quinn's transport settings for clients: the full limits from the start.
pub fn transport_config(limits: &NetLimits, path: Path) -> Arc<TransportConfig> {
    Arc::new(base_transport(
        limits,
        limits.streams_max,
        path.receive_window(limits),
        path,
    ))
}

/// quinn's transport settings for servers: one stream and a small window
/// until the handshake succeeds, when the server raises both to the limits
/// (see [`grant_full_limits`]). An unauthenticated peer can make the server
/// buffer at most [`UNAUTHENTICATED_WINDOW_BYTES`].
pub fn server_transport_config(limits: &NetLimits, path: Path) -> Arc<TransportConfig> {
    Arc::new(base_transport(
        limits,
        1,
        UNAUTHENTICATED_WINDOW_BYTES,
        path,
    ))
}

/// Raises an authenticated connection to the full limits (for its path).
pub fn grant_full_limits(conn: &quinn::Connection, limits: &NetLimits) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(limits.streams_max));
    let path = Path::to(conn.remote_address().ip());
    conn.set_receive_window(VarInt::from_u32(path.receive_window(limits)));
}

fn base_transport(limits: &NetLimits, streams: u32, window: u32, path: Path) -> TransportConfig {
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
    if path == Path::SameHost {
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(SAME_HOST_UDP_PAYLOAD_BYTES);
        t.mtu_discovery_config(Some(mtu));
        t.enable_segmentation_offload(false);
    }
    t
}

/// quinn server settings: TLS, transport limits and the bound on connections
/// being set up at once. For an endpoint on a loopback address, whose
/// peers are all on this host, [`endpoint`] and [`set_server_config`] give
/// it the same-host packet sizes.
pub fn server_config(
    tls: rustls::ServerConfig,
    limits: &NetLimits,
) -> Result<quinn::ServerConfig, IdentityError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(server_transport_config(limits, Path::Network));
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
    config.transport_config(transport_config(limits, Path::Network));
    Ok(config)
}

/// `config` for a connection to `addr`: with the same-host packet sizes
/// when `addr` is on this host.
pub fn client_config_to(
    mut config: quinn::ClientConfig,
    addr: SocketAddr,
    limits: &NetLimits,
) -> quinn::ClientConfig {
    let path = Path::to(addr.ip());
    if path == Path::SameHost {
        config.transport_config(transport_config(limits, path));
    }
    config
}

/// Serves with `config` from now on (a node's mutual-TLS configuration,
/// once the head has issued its certificate), with the same-host packet
/// sizes for peers on this host (see [`for_bound`]).
pub fn set_server_config(
    endpoint: &quinn::Endpoint,
    config: quinn::ServerConfig,
    limits: &NetLimits,
) {
    match endpoint.local_addr() {
        Ok(bound) => endpoint.set_server_config(Some(for_bound(config, bound, limits))),
        Err(_) => endpoint.set_server_config(Some(config)),
    }
}

/// Same-host variants of the server configurations of endpoints bound to
/// every interface, by the address they are bound to: their peers on this
/// host are accepted with it (see `rpc::serve`).
static SAME_HOST_SERVERS: std::sync::Mutex<
    std::collections::BTreeMap<SocketAddr, Arc<quinn::ServerConfig>>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The server configuration for a peer on this host of the endpoint bound
/// to `bound`, when it differs from the endpoint's own.
pub(crate) fn same_host_server(bound: SocketAddr) -> Option<Arc<quinn::ServerConfig>> {
    use crate::sync::MutexExt;
    SAME_HOST_SERVERS.locked().get(&bound).cloned()
}

/// `config` for an endpoint bound to `bound`: on loopback, where every
/// peer is on this host, with the same-host packet sizes; on every
/// interface, as it is, with a same-host variant kept for peers on this
/// host; on one address of another network, as it is.
fn for_bound(
    mut config: quinn::ServerConfig,
    bound: SocketAddr,
    limits: &NetLimits,
) -> quinn::ServerConfig {
    use crate::sync::MutexExt;
    if bound.ip().is_loopback() {
        config.transport_config(server_transport_config(limits, Path::SameHost));
    } else if bound.ip().is_unspecified() {
        let mut same_host = config.clone();
        same_host.transport_config(server_transport_config(limits, Path::SameHost));
        SAME_HOST_SERVERS
            .locked()
            .insert(bound, Arc::new(same_host));
    }
    config
}

/// The receive buffer the kernel gave the last socket bound (what Linux
/// reports: twice what was asked, within `net.core.rmem_max`); 0 before
/// any. Same-host windows are sized from it.
static RECEIVE_BUFFER_GRANTED: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// A UDP socket bound to `addr` with enlarged buffers (many medium streams in
/// flight overflow the kernel's default receive buffer).
pub fn bind_socket(addr: SocketAddr, limits: &NetLimits) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = UdpSocket::bind(addr)?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max, and a
    // smaller buffer only costs throughput.
    let _ = setsockopt(&socket, sockopt::RcvBuf, &limits.socket_buffer_bytes);
    let _ = setsockopt(&socket, sockopt::SndBuf, &limits.socket_buffer_bytes);
    if let Ok(granted) = nix::sys::socket::getsockopt(&socket, sockopt::RcvBuf) {
        RECEIVE_BUFFER_GRANTED.store(granted, std::sync::atomic::Ordering::Relaxed);
    }
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
    mut config: quinn::EndpointConfig,
) -> std::io::Result<quinn::Endpoint> {
    // Accept datagrams as large as a same-host peer sends; a path between
    // hosts never carries more than its MTU.
    config
        .max_udp_payload_size(SAME_HOST_UDP_PAYLOAD_BYTES)
        .map_err(|e| std::io::Error::other(format!("max_udp_payload_size: {e:?}")))?;
    let socket = bind_socket(addr, limits)?;
    let bound = socket.local_addr()?;
    let server = server.map(|s| for_bound(s, bound, limits));
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{tls, ClusterIdentity, HEAD_SERVER_NAME};
    use std::time::{Duration, Instant};

    /// Sends `bytes` from the server to a client on this host over one
    /// stream, the server's endpoint bound to `bind`; returns the server
    /// side's path MTU and lost packets after.
    async fn send_to_same_host_client(bind: SocketAddr, bytes: usize) -> (u16, u64) {
        let limits = NetLimits::default();
        let identity = ClusterIdentity::generate().expect("identity");
        let cert = identity.issue_head_cert().expect("cert");
        let tls = tls::server_config(&cert).expect("tls");
        let server = endpoint(
            bind,
            Some(server_config(tls, &limits).expect("config")),
            &limits,
        )
        .expect("server endpoint");
        let bound = server.local_addr().expect("bound");
        let target = SocketAddr::new([127, 0, 0, 1].into(), bound.port());
        let accepted = tokio::spawn(async move {
            let incoming = server.accept().await.expect("a connection");
            let conn = match same_host_server(bound) {
                Some(config) => incoming.accept_with(config),
                None => incoming.accept(),
            }
            .expect("accepted")
            .await
            .expect("set up");
            grant_full_limits(&conn, &NetLimits::default());
            let (mut send, _recv) = conn.accept_bi().await.expect("a stream");
            send.write_all(&vec![5u8; bytes]).await.expect("written");
            send.finish().expect("finished");
            send.stopped().await.expect("read to the end");
            // MTU discovery may still be climbing: its answer is what the
            // connection settled on, polled for a while.
            let deadline = Instant::now() + Duration::from_secs(5);
            while conn.stats().path.current_mtu <= 1452 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let stats = conn.stats();
            (stats.path.current_mtu, stats.path.lost_packets)
        });
        let client_ep = endpoint(([127, 0, 0, 1], 0).into(), None, &limits).expect("client");
        let config = client_config(tls::token_client_config().expect("tls"), &limits)
            .expect("client config");
        let conn = client_ep
            .connect_with(
                client_config_to(config, target, &limits),
                target,
                HEAD_SERVER_NAME,
            )
            .expect("connect")
            .await
            .expect("connected");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(b"go").await.expect("ask");
        let got = recv.read_to_end(bytes + 1).await.expect("read");
        assert_eq!(got.len(), bytes);
        let seen = accepted.await.expect("server side");
        conn.close(0u32.into(), b"done");
        seen
    }

    /// Large packets on a same-host path, whether the server listens on
    /// loopback or on every interface. With segmentation offload left on,
    /// the kernel refuses every batch over 64 KiB, quinn counts the packets
    /// lost, and the MTU falls back to 1 200 bytes.
    #[tokio::test]
    async fn same_host_connections_use_large_packets() {
        for bind in [
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([0, 0, 0, 0], 0)),
        ] {
            let (mtu, lost) = send_to_same_host_client(bind, 16 << 20).await;
            assert!(
                mtu > 1452,
                "bound to {bind}: the path MTU is {mtu} after {lost} lost packets"
            );
        }
    }

    #[test]
    fn only_addresses_of_this_host_are_same_host_paths() {
        assert_eq!(Path::to([127, 0, 0, 1].into()), Path::SameHost);
        assert_eq!(Path::to([198, 51, 100, 7].into()), Path::Network);
        assert_eq!(Path::to([0, 0, 0, 0].into()), Path::Network);
    }
}
