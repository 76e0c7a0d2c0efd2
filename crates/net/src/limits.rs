//! Every bound the transport applies, in one place, set explicitly on quinn
//! rather than left to its defaults (quinn's default of 100 concurrent streams
//! makes `open_bi` hang when reached; its idle timeout has no keep-alive).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::CodecLimits;

/// Transport limits. Units are last in each name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetLimits {
    /// Largest control frame accepted or sent.
    pub frame_bytes_max: u32,
    /// Deepest nesting accepted in a control message.
    pub decode_depth_max: u32,
    /// Concurrent requests (bidirectional streams) a peer may have open on one
    /// connection.
    pub streams_max: u32,
    /// Connections waiting to be accepted (quinn's `max_incoming`).
    pub incoming_max: usize,
    /// Connections in their QUIC or `Hello` handshake at once; more are
    /// refused until one finishes.
    pub handshakes_max: usize,
    /// Of those, the most from one source address: peers stuck in their
    /// handshake on one host leave the others room.
    pub handshakes_per_source_max: usize,
    /// Connections a server holds on its same-host (Unix) socket at once,
    /// in their handshake or not; more are closed at once until one ends
    /// (their clients use QUIC instead). Each holds a descriptor and a
    /// 64 KiB read buffer.
    pub same_host_connections_max: usize,
    /// Flow-control window per stream.
    pub stream_window_bytes: u32,
    /// Flow-control window per connection.
    pub connection_window_bytes: u32,
    /// UDP socket send and receive buffers.
    pub socket_buffer_bytes: usize,
    /// A connection with no traffic for this long is closed. On the
    /// same-host socket the server closes it (its clients send a keep-alive
    /// every `keep_alive_interval`); zero turns that off there.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Keep-alive period, well under `idle_timeout`.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Time for a peer to finish the QUIC and `Hello` handshakes.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Longest deadline a server honours for one request (not for tasks and
    /// actor methods, which run as long as they take). `SHOAL_REQUEST_TIMEOUT_MAX`
    /// (`"300s"`, `"2m"`) sets the default; one that does not parse is
    /// ignored with a warning.
    #[serde(with = "humantime_serde")]
    pub request_timeout_max: Duration,
    /// Servers on loopback also listen on a Unix socket, and clients of a
    /// loopback address use it (see `unix`); on unless
    /// `SHOAL_LOCAL_SOCKETS=0`.
    pub same_host_sockets: bool,
}

impl Default for NetLimits {
    fn default() -> Self {
        Self {
            frame_bytes_max: CodecLimits::CONTROL.frame_bytes_max,
            decode_depth_max: CodecLimits::CONTROL.depth_max,
            streams_max: 1024,
            incoming_max: 256,
            handshakes_max: 64,
            handshakes_per_source_max: 16,
            same_host_connections_max: 4096,
            stream_window_bytes: 4 << 20,
            connection_window_bytes: 32 << 20,
            socket_buffer_bytes: 4 << 20,
            // A peer that dies without a word (SIGKILL, power loss) is noticed
            // within this: keep-alives flow every second on live connections.
            idle_timeout: Duration::from_secs(6),
            keep_alive_interval: Duration::from_secs(1),
            // Short: until then a peer is unauthenticated and holds a slot.
            handshake_timeout: Duration::from_secs(5),
            request_timeout_max: request_timeout_max_from_env(),
            same_host_sockets: std::env::var("SHOAL_LOCAL_SOCKETS").map_or(true, |v| v != "0"),
        }
    }
}

/// `SHOAL_REQUEST_TIMEOUT_MAX`, else 300 s.
fn request_timeout_max_from_env() -> Duration {
    request_timeout_max_from(std::env::var("SHOAL_REQUEST_TIMEOUT_MAX").ok().as_deref())
}

fn request_timeout_max_from(text: Option<&str>) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(300);
    let Some(text) = text else {
        return DEFAULT;
    };
    match humantime_serde::re::humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            tracing::warn!(value = %text, "SHOAL_REQUEST_TIMEOUT_MAX is not a duration above 0 (like \"300s\"); using 300s");
            DEFAULT
        }
    }
}

impl NetLimits {
    /// The codec limits for control frames.
    pub fn codec(&self) -> CodecLimits {
        CodecLimits {
            frame_bytes_max: self.frame_bytes_max,
            depth_max: self.decode_depth_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_cap_is_read_and_a_bad_one_keeps_the_default() {
        assert_eq!(request_timeout_max_from(None), Duration::from_secs(300));
        assert_eq!(
            request_timeout_max_from(Some("2m")),
            Duration::from_secs(120)
        );
        assert_eq!(request_timeout_max_from(Some("1s")), Duration::from_secs(1));
        for bad in ["soon", "0s", "", "-1s"] {
            assert_eq!(
                request_timeout_max_from(Some(bad)),
                Duration::from_secs(300),
                "{bad:?}"
            );
        }
    }
}
