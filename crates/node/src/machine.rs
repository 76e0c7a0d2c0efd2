//! What this machine has to offer.

use shoal_proto::resources::{CPU, MEMORY};
use shoal_proto::ResourceSet;

use crate::config::NodeConfig;

/// Logical CPUs available to this process.
pub fn detect_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Total memory in bytes, from `/proc/meminfo`; `None` where unreadable.
pub fn detect_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&text)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The resources the node offers: detected CPUs and memory unless
/// configured, plus the configured custom resources.
pub fn resources(config: &NodeConfig) -> ResourceSet {
    let mut set = config.resources.clone();
    set.set(CPU, config.num_cpus.unwrap_or(detect_cpus() as f64));
    if let Some(memory) = config.memory_bytes.or_else(detect_memory_bytes) {
        set.set(MEMORY, memory as f64);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_parsed_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("garbage"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB"), None);
    }

    #[test]
    fn configured_values_override_detection() {
        let mut config = NodeConfig {
            num_cpus: Some(3.0),
            memory_bytes: Some(1024),
            ..Default::default()
        };
        config.resources.set("GPU", 1.0);
        let set = resources(&config);
        assert_eq!(set.get(CPU), 3.0);
        assert_eq!(set.get(MEMORY), 1024.0);
        assert_eq!(set.get("GPU"), 1.0);
    }

    #[test]
    fn detection_finds_at_least_one_cpu() {
        let set = resources(&NodeConfig::default());
        assert!(set.get(CPU) >= 1.0);
    }
}
