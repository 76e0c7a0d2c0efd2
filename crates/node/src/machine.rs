//! What this machine has to offer.

use shoal_proto::resources::{CPU, GPU, MEMORY};
use shoal_proto::ResourceSet;

use crate::config::NodeConfig;

/// Logical CPUs available to this process.
pub fn detect_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// GPUs on this machine: the devices `nvidia-smi -L` lists, else the
/// entries of `/proc/driver/nvidia/gpus`, else none.
pub fn detect_gpus() -> u32 {
    let listed = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| count_listed_gpus(&String::from_utf8_lossy(&out.stdout)));
    listed.unwrap_or_else(|| {
        std::fs::read_dir("/proc/driver/nvidia/gpus")
            .map(|dir| dir.filter_map(Result::ok).count() as u32)
            .unwrap_or(0)
    })
}

/// The devices in `nvidia-smi -L`'s output (`GPU 0: ... (UUID: ...)`).
fn count_listed_gpus(text: &str) -> u32 {
    text.lines().filter(|l| l.starts_with("GPU ")).count() as u32
}

/// Memory this process may use, in bytes: `/proc/meminfo`'s total, or the
/// cgroup's limit when lower (a container's `--memory`); `None` where
/// neither can be read.
pub fn detect_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total(&text));
    match (total, cgroup_memory_limit()) {
        (Some(total), Some(limit)) => Some(total.min(limit)),
        (total, limit) => total.or(limit),
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), if it has one.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for (version, path) in cgroup_paths(&own) {
        let file = match version {
            2 => format!("/sys/fs/cgroup{path}/memory.max"),
            _ => format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
        };
        candidates.push(file);
    }
    // Inside a container the cgroup file system is mounted at its own
    // cgroup, whatever path /proc/self/cgroup names.
    candidates.push("/sys/fs/cgroup/memory.max".into());
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    candidates
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .filter_map(|text| parse_limit(&text))
        .min()
}

/// `(version, path)` of the memory controller's cgroup in
/// `/proc/self/cgroup`: `0::/path` (v2) or `N:...memory...:/path` (v1).
fn cgroup_paths(text: &str) -> Vec<(u8, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            if id == "0" && controllers.is_empty() {
                Some((2, path.to_string()))
            } else if controllers.split(',').any(|c| c == "memory") {
                Some((1, path.to_string()))
            } else {
                None
            }
        })
        .map(|(v, path)| (v, if path == "/" { String::new() } else { path }))
        .collect()
}

/// A limit file's bytes; `None` for "max" or v1's "unlimited" (a value
/// near `i64::MAX`).
fn parse_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

/// The bytes free on the file system holding `dir` (a tmpfs such as
/// `/dev/shm`, which other stores and programs on the host share).
pub fn file_system_free_bytes(dir: &std::path::Path) -> Option<u64> {
    let fs = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(
        fs.blocks_available()
            .saturating_mul(fs.fragment_size().max(1)),
    )
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
    // GPUs: as given by count; else as given among the resources (an
    // embedder's, checked with the rest); else detected.
    let given = config.resources.0.contains_key(GPU);
    match config.num_gpus {
        Some(n) => {
            set.0.remove(GPU);
            if n > 0 {
                set.set(GPU, f64::from(n));
            }
        }
        None if given => {}
        None => match detect_gpus() {
            0 => {}
            n => set.set(GPU, f64::from(n)),
        },
    }
    if let Some(memory) = config.memory_bytes.or_else(detect_memory_bytes) {
        set.set(MEMORY, memory as f64);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_counted_from_nvidia_smi() {
        let text = "GPU 0: NVIDIA A100 (UUID: GPU-1)\nGPU 1: NVIDIA A100 (UUID: GPU-2)\n";
        assert_eq!(count_listed_gpus(text), 2);
        assert_eq!(count_listed_gpus("No devices were found\n"), 0);
    }

    #[test]
    fn given_gpus_replace_detected_ones_and_zero_offers_none() {
        let config = NodeConfig {
            num_gpus: Some(2),
            ..NodeConfig::default()
        };
        assert_eq!(resources(&config).get(GPU), 2.0);
        let none = NodeConfig {
            num_gpus: Some(0),
            ..NodeConfig::default()
        };
        assert!(!resources(&none).0.contains_key(GPU));
    }

    #[test]
    fn mem_total_is_parsed_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:        1 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("garbage"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB"), None);
    }

    #[test]
    fn cgroup_limits_are_read_for_both_versions() {
        assert_eq!(
            cgroup_paths("0::/user.slice/session-1.scope\n"),
            vec![(2, "/user.slice/session-1.scope".to_string())]
        );
        assert_eq!(
            cgroup_paths("9:name=systemd:/docker/ab\n4:memory:/docker/ab\n3:cpu,cpuacct:/x\n"),
            vec![(1, "/docker/ab".to_string())]
        );
        assert_eq!(cgroup_paths("0::/\n"), vec![(2, String::new())]);
        assert_eq!(parse_limit("3221225472\n"), Some(3 << 30));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit(""), None);
    }

    #[test]
    fn detected_memory_is_within_the_machines() {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_mem_total(&t));
        if let (Some(total), Some(found)) = (total, detect_memory_bytes()) {
            assert!(found <= total && found > 0, "{found} of {total}");
        }
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
