//! The node daemon's configuration.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_net::NetLimits;
use shoal_proto::ResourceSet;

/// `LO-HI` worker ports, `1 <= LO <= HI` (`--worker-port-range`, a cluster
/// file's `worker_port_range`, and `SHOAL_WORKER_PORT_RANGE` as a node hands
/// it to its workers).
pub fn parse_port_range(text: &str) -> Result<(u16, u16), BadPortRange> {
    let bad = || BadPortRange(text.to_string());
    let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// A port range that is not `LO-HI` with `1 <= LO <= HI <= 65535`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected LO-HI with 1 <= LO <= HI <= 65535, like 10002-10999, got {0:?}")]
pub struct BadPortRange(pub String);

/// Default values, in one place.
pub mod defaults {
    use std::time::Duration;

    /// Heartbeat period until the head says otherwise.
    pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    /// Longest wait between attempts to reach the head.
    pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
    /// Deadline of one request to the head.
    pub const HEAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// Idle workers are stopped after this long.
    pub const WORKER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// A new worker must register within this.
    pub const WORKER_START_TIMEOUT: Duration = Duration::from_secs(60);
    /// Share of the machine's memory the object store may use.
    pub const OBJECT_STORE_MEMORY_SHARE: f64 = 0.3;
}

/// The node daemon's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The head's address, `host:port`; resolved at every connection attempt.
    pub head_address: String,
    /// Where to serve peers (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The IP peers should use to reach this node; when unset, the host's
    /// advertised IP (`shoal_net::host::advertised_ip`: the route to the
    /// head, else the primary interface).
    pub node_ip: Option<std::net::IpAddr>,
    /// CPUs offered; detected when unset.
    pub num_cpus: Option<f64>,
    /// GPUs offered, devices 0 to N-1; detected when unset.
    pub num_gpus: Option<u32>,
    /// Labels offered to label selectors (`shoal.io/hostname` is added).
    pub labels: shoal_proto::placement::Labels,
    /// Memory offered, in bytes; detected when unset.
    pub memory_bytes: Option<u64>,
    /// Custom resources offered, `{"name": quantity}`.
    pub resources: ResourceSet,
    /// True for the node daemon that runs inside the head process.
    pub is_head_node: bool,
    /// Longest wait between attempts to reach the head.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// Deadline of one request to the head.
    #[serde(with = "humantime_serde")]
    pub head_request_timeout: Duration,
    /// Where executables, worker logs and (later) spill files go; a
    /// temporary directory when unset.
    pub session_dir: Option<std::path::PathBuf>,
    /// Object store capacity in bytes; 30% of memory when unset.
    pub object_store_bytes: Option<u64>,
    /// Most bytes spilled to disk; when unset, spilling goes on while the
    /// disk stays under 95% full.
    pub object_spill_bytes: Option<u64>,
    /// Idle workers are stopped after this long.
    #[serde(with = "humantime_serde")]
    pub worker_idle_timeout: Duration,
    /// A new worker must register within this.
    #[serde(with = "humantime_serde")]
    pub worker_start_timeout: Duration,
    /// The ports worker processes bind, `(lo, hi)` inclusive; free ports
    /// when unset.
    pub worker_port_range: Option<(u16, u16)>,
    /// The port the embedder serves this node's Prometheus metrics on (it
    /// binds it; the node registers it with the head), if any.
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// Transport limits.
    pub limits: NetLimits,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            head_address: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            node_ip: None,
            num_cpus: None,
            num_gpus: None,
            labels: Default::default(),
            memory_bytes: None,
            resources: ResourceSet::new(),
            is_head_node: false,
            reconnect_backoff_max: defaults::RECONNECT_BACKOFF_MAX,
            head_request_timeout: defaults::HEAD_REQUEST_TIMEOUT,
            session_dir: None,
            object_store_bytes: None,
            object_spill_bytes: None,
            worker_idle_timeout: defaults::WORKER_IDLE_TIMEOUT,
            worker_start_timeout: defaults::WORKER_START_TIMEOUT,
            worker_port_range: None,
            metrics_port: None,
            limits: NetLimits::default(),
        }
    }
}
