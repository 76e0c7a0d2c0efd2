//! The TOML cluster file read by `shoal start --config FILE`.
//!
//! ```toml
//! [head]
//! port = 6380
//! num_cpus = 0                 # a head that runs no tasks
//! node_ip = "127.0.0.1"
//! node_port = 7200             # the head node's daemon port (UDP)
//! worker_port_range = "7300-7399"
//!
//! [timeouts]
//! heartbeat_interval = "1s"
//! node_timeout = "10s"
//!
//! [limits]                     # transport limits, see shoal_net::NetLimits
//! frame_bytes_max = 16777216
//!
//! [[nodes]]                    # one entry per joining node (--node-index picks)
//! num_cpus = 2
//! num_gpus = 1
//! labels = { zone = "a" }
//! resources = { disk = 1 }
//! ```
//! Flags given on the command line override the file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use shoal_net::NetLimits;

/// A cluster file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterFile {
    /// The head node.
    pub head: HeadSection,
    /// Heartbeat and failure-detection timing.
    pub timeouts: Timeouts,
    /// Transport limits.
    pub limits: NetLimits,
    /// Nodes that join the head.
    pub nodes: Vec<NodeSection>,
}

/// The `[head]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadSection {
    /// The head's port.
    pub port: Option<u16>,
    /// The IP to bind and advertise.
    pub node_ip: Option<IpAddr>,
    /// The head node's daemon port.
    pub node_port: Option<u16>,
    /// The ports the head node's workers bind, `"LO-HI"`.
    #[serde(deserialize_with = "port_range")]
    pub worker_port_range: Option<(u16, u16)>,
    /// The head node's CPUs (0: runs no tasks).
    pub num_cpus: Option<f64>,
    /// The head node's GPUs.
    pub num_gpus: Option<u32>,
    /// The head node's labels.
    pub labels: BTreeMap<String, String>,
    /// The head node's memory, in bytes.
    pub memory_bytes: Option<u64>,
    /// The head node's custom resources.
    pub resources: BTreeMap<String, f64>,
    /// The head node's object store capacity in bytes.
    pub object_store_bytes: Option<u64>,
    /// The head node's limit of bytes spilled to disk.
    pub object_spill_bytes: Option<u64>,
}

/// A `[[nodes]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Object store capacity in bytes.
    pub object_store_bytes: Option<u64>,
    /// Most bytes spilled to disk.
    pub object_spill_bytes: Option<u64>,
    /// The IP to bind and advertise.
    pub node_ip: Option<IpAddr>,
    /// The node daemon's port.
    pub node_port: Option<u16>,
    /// The ports this node's workers bind, `"LO-HI"`.
    #[serde(deserialize_with = "port_range")]
    pub worker_port_range: Option<(u16, u16)>,
    /// CPUs offered.
    pub num_cpus: Option<f64>,
    /// GPUs offered.
    pub num_gpus: Option<u32>,
    /// Labels offered to label selectors.
    pub labels: BTreeMap<String, String>,
    /// Memory offered, in bytes.
    pub memory_bytes: Option<u64>,
    /// Custom resources offered.
    pub resources: BTreeMap<String, f64>,
}

/// The `[timeouts]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// How often nodes heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which a node is declared dead.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            heartbeat_interval: shoal_head::config::defaults::HEARTBEAT_INTERVAL,
            node_timeout: shoal_head::config::defaults::NODE_TIMEOUT,
        }
    }
}

impl ClusterFile {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading cluster file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in cluster file {}", path.display()))
    }

    /// Parses and checks cluster-file text.
    pub fn parse(text: &str) -> Result<Self> {
        let file: ClusterFile = toml::from_str(text)?;
        anyhow::ensure!(
            file.timeouts.heartbeat_interval < file.timeouts.node_timeout,
            "heartbeat_interval ({:?}) must be shorter than node_timeout ({:?})",
            file.timeouts.heartbeat_interval,
            file.timeouts.node_timeout
        );
        anyhow::ensure!(
            !file.timeouts.heartbeat_interval.is_zero(),
            "heartbeat_interval must be positive"
        );
        let sections = std::iter::once(("[head]", &file.head.labels, &file.head.resources)).chain(
            file.nodes
                .iter()
                .map(|n| ("[[nodes]]", &n.labels, &n.resources)),
        );
        for (section, labels, resources) in sections {
            shoal_proto::placement::check_labels(labels)
                .with_context(|| format!("labels of {section}"))?;
            anyhow::ensure!(
                !resources.contains_key(shoal_proto::resources::GPU),
                "{section}: give GPUs as num_gpus, not in resources"
            );
        }
        Ok(file)
    }
}

/// A `"LO-HI"` worker port range, checked as it is read.
fn port_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<(u16, u16)>, D::Error> {
    let text = String::deserialize(d)?;
    shoal_node::config::parse_port_range(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example in `cluster-config/` parses.
    #[test]
    fn every_example_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster-config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("cluster-config exists") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                ClusterFile::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(
            seen >= 1,
            "no example cluster files found in {}",
            dir.display()
        );
    }

    #[test]
    fn local_three_node_layout_has_a_head_and_two_nodes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster-config");
        let file = ClusterFile::load(&dir.join("local-3-node.toml")).expect("parses");
        assert_eq!(file.nodes.len(), 2);
        assert!(file.head.port.is_some());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(
            ClusterFile::parse("[head]\nprot = 1\n").is_err(),
            "typo in a key"
        );
        assert!(ClusterFile::parse("[timeouts]\nnode_timeout = \"soon\"\n").is_err());
        assert!(ClusterFile::parse("[timeouts]\nheartbeat_interval = \"20s\"\n").is_err());
        assert!(ClusterFile::parse("[head]\nport = 70000\n").is_err());
        assert!(ClusterFile::parse("[head]\nworker_port_range = \"9-8\"\n").is_err());
        assert!(ClusterFile::parse("[[nodes]]\nworker_port_range = \"7000\"\n").is_err());
        let ok = ClusterFile::parse(
            "[head]\nnode_port = 7200\nworker_port_range = \"7300-7399\"\n[[nodes]]\nnode_port = 7201\n",
        )
        .expect("ports parse");
        assert_eq!(ok.head.node_port, Some(7200));
        assert_eq!(ok.nodes[0].node_port, Some(7201));
        assert_eq!(ok.head.worker_port_range, Some((7300, 7399)));
        assert!(
            ClusterFile::parse("").is_ok(),
            "an empty file means all defaults"
        );
    }
}
