//! The head's configuration.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_net::NetLimits;

/// Default values, in one place.
pub mod defaults {
    use std::time::Duration;

    /// The head's default port, as `shoal start --head` uses it.
    pub const PORT: u16 = 6380;
    /// How often nodes heartbeat.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    /// Silence after which a node is declared dead.
    pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Most nodes the head admits at once.
    pub const NODES_MAX: usize = 10_000;
    /// Dead nodes remembered for `shoal status`.
    pub const DEAD_NODES_KEPT: usize = 1_000;
}

/// The head's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// How often nodes must heartbeat (told to each node at registration).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A node silent for this long is declared dead.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// Most live nodes admitted.
    pub nodes_max: usize,
    /// Dead nodes remembered (oldest forgotten first).
    pub dead_nodes_kept: usize,
    /// Transport limits.
    pub limits: NetLimits,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], defaults::PORT)),
            heartbeat_interval: defaults::HEARTBEAT_INTERVAL,
            node_timeout: defaults::NODE_TIMEOUT,
            nodes_max: defaults::NODES_MAX,
            dead_nodes_kept: defaults::DEAD_NODES_KEPT,
            limits: NetLimits::default(),
        }
    }
}
