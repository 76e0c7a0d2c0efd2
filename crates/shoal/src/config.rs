//! How a program finds (or makes) its cluster.

use std::path::PathBuf;

/// Where the cluster is, and how local mode runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) address: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) session_root: Option<PathBuf>,
    pub(crate) worker_processes: bool,
    pub(crate) num_cpus: Option<f64>,
    pub(crate) node_ip: Option<std::net::IpAddr>,
    pub(crate) driver_port: Option<u16>,
    pub(crate) head_timeout: std::time::Duration,
    pub(crate) task_events: bool,
    /// Variables every worker of the job is started with.
    pub(crate) env: shoal_proto::EnvVars,
    /// Environment variables that did not parse: `init` refuses to start.
    pub(crate) bad_env: Vec<String>,
}

impl Config {
    /// From the environment: `SHOAL_ADDRESS` (`host:port` of a head; unset
    /// means local mode), `SHOAL_TOKEN` (else the token in the newest session
    /// under `SHOAL_SESSION_DIR`, default `/tmp/shoal`), and
    /// `SHOAL_WORKER_PROCESSES=1` for process workers in local mode,
    /// `SHOAL_NODE_IP` (the IP other hosts reach this program on; by default
    /// its host's advertised IP) and `SHOAL_DRIVER_PORT` (a fixed port for
    /// this program's endpoint, for firewalls; by default a free one), and
    /// `SHOAL_HEAD_TIMEOUT` (seconds; see [`Config::head_timeout`]) and
    /// `SHOAL_TASK_EVENTS=1` (see [`Config::task_events`]). A
    /// value that does not parse makes `init` fail with a message naming it.
    pub fn from_env() -> Self {
        Self::from_vars(|key| std::env::var(key).ok())
    }

    /// [`Config::from_env`] over any source of variables.
    fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut bad_env = Vec::new();
        fn parsed<T: std::str::FromStr>(
            value: Option<String>,
            key: &str,
            what: &str,
            bad: &mut Vec<String>,
        ) -> Option<T> {
            let value = value?;
            value.parse().ok().or_else(|| {
                bad.push(format!("{key}={value:?} is not {what}"));
                None
            })
        }
        let node_ip = parsed(
            var("SHOAL_NODE_IP"),
            "SHOAL_NODE_IP",
            "an IP address",
            &mut bad_env,
        );
        let driver_port = parsed(
            var("SHOAL_DRIVER_PORT"),
            "SHOAL_DRIVER_PORT",
            "a port number (0-65535)",
            &mut bad_env,
        );
        let head_timeout = parsed::<Seconds>(
            var("SHOAL_HEAD_TIMEOUT"),
            "SHOAL_HEAD_TIMEOUT",
            "a number of seconds (0 or more)",
            &mut bad_env,
        )
        .map_or(crate::core::head::HEAD_TIMEOUT, |s| s.0);
        let task_events = task_events_from(var("SHOAL_TASK_EVENTS"), false, &mut bad_env);
        Self {
            address: var("SHOAL_ADDRESS"),
            token: var("SHOAL_TOKEN"),
            session_root: var("SHOAL_SESSION_DIR").map(PathBuf::from),
            worker_processes: var("SHOAL_WORKER_PROCESSES")
                .is_some_and(|v| v == "1" || v == "true"),
            num_cpus: var("SHOAL_NUM_CPUS").and_then(|v| v.parse().ok()),
            node_ip,
            driver_port,
            head_timeout,
            task_events,
            env: Default::default(),
            bad_env,
        }
    }

    /// Local mode: a head and a node inside this process, workers as threads
    /// (with the `local` feature, on by default; without it `init` fails).
    pub fn local() -> Self {
        Self::default()
    }
}

/// `SHOAL_TASK_EVENTS`: `1`, `true` or `on`, or `0`, `false` or `off`;
/// unset, `default` (another value is named in `bad`).
pub(crate) fn task_events_from(
    value: Option<String>,
    default: bool,
    bad: &mut Vec<String>,
) -> bool {
    match value.as_deref().map(str::trim) {
        None | Some("") => default,
        Some("1" | "true" | "on") => true,
        Some("0" | "false" | "off") => false,
        Some(other) => {
            bad.push(format!(
                "SHOAL_TASK_EVENTS={other:?} is not one of 0, 1, true, false, on, off"
            ));
            default
        }
    }
}

/// Whether task events are on: as `SHOAL_TASK_EVENTS` says, else
/// `default` (a bad value: `default`; `init` names it for drivers).
pub(crate) fn task_events_env(default: bool) -> bool {
    task_events_from(
        std::env::var("SHOAL_TASK_EVENTS").ok(),
        default,
        &mut Vec::new(),
    )
}

/// A duration given in seconds (`2.5`): finite and not negative.
struct Seconds(std::time::Duration);

impl std::str::FromStr for Seconds {
    type Err = std::time::TryFromFloatSecsError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let secs: f64 = text.trim().parse().unwrap_or(f64::NAN);
        std::time::Duration::try_from_secs_f64(secs).map(Seconds)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            address: None,
            token: None,
            session_root: None,
            worker_processes: false,
            num_cpus: None,
            node_ip: None,
            driver_port: None,
            head_timeout: crate::core::head::HEAD_TIMEOUT,
            task_events: false,
            env: Default::default(),
            bad_env: Vec::new(),
        }
    }
}

impl Config {
    /// Connect to the head at `host:port` instead of running locally.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// The cluster's join token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// In local mode, run workers as real processes (this executable re-run
    /// in worker mode) instead of threads: crash isolation, at a cost.
    pub fn worker_processes(mut self, yes: bool) -> Self {
        self.worker_processes = yes;
        self
    }

    /// In local mode, the CPUs offered (default: this machine's).
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.num_cpus = Some(n);
        self
    }

    /// The IP other hosts reach this program on (default: its host's
    /// advertised IP: that of the cluster's node on this host, else the
    /// local address of the route to the head, else the primary
    /// interface's).
    pub fn node_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.node_ip = Some(ip);
        self
    }

    /// A fixed port for this program's endpoint, which workers and nodes
    /// of other hosts connect to (open it in the firewall); default: a free
    /// port.
    pub fn driver_port(mut self, port: u16) -> Self {
        self.driver_port = Some(port);
        self
    }

    /// How long calls to the head wait for it while it cannot be reached
    /// (a head being restarted with `shoal start --head --recover`) before
    /// they fail with [`Error::HeadUnavailable`](crate::Error); tasks
    /// waiting for a worker fail the same way. Work already running goes on
    /// meanwhile. Default 60 s.
    pub fn head_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.head_timeout = timeout;
        self
    }

    /// Whether this program's tasks and actor calls record their state
    /// changes for the head (`shoal list tasks`, `shoal get task`, `shoal
    /// summary tasks`, `shoal timeline`). Default off for now: on, they
    /// cost between 7% and 13% of the call rate of short async tasks and
    /// about 5% of async actor calls (measured with `shoal
    /// microbenchmark`), above the 5% that would make them the default. `SHOAL_TASK_EVENTS=1` (or `0`) in the environment has the
    /// last word, for drivers and, set on node daemons, for their workers.
    pub fn task_events(mut self, on: bool) -> Self {
        self.task_events = on;
        self
    }

    /// Sets `name` to `value` in the environment of every worker process
    /// that runs this job's tasks and actors (a task's or actor's own
    /// `.env_var` wins). Workers are only shared between tasks asking for
    /// the same environment. In local mode with thread workers, work with
    /// variables to set runs in worker processes of this executable.
    pub fn env_var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.set(name, value);
        self
    }

    /// Where to look for the session's token (default `/tmp/shoal`).
    pub fn session_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.session_root = Some(dir.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Config {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()))
    }

    #[test]
    fn node_ip_and_driver_port_are_read_and_bad_values_named() {
        let good = from(&[
            ("SHOAL_NODE_IP", "198.18.0.2"),
            ("SHOAL_DRIVER_PORT", "7500"),
        ]);
        assert_eq!(good.node_ip, Some("198.18.0.2".parse().expect("ip")));
        assert_eq!(good.driver_port, Some(7500));
        assert!(good.bad_env.is_empty());
        let bad = from(&[("SHOAL_NODE_IP", "host-a"), ("SHOAL_DRIVER_PORT", "70000")]);
        assert_eq!((bad.node_ip, bad.driver_port), (None, None));
        assert_eq!(bad.bad_env.len(), 2, "{:?}", bad.bad_env);
        assert!(
            bad.bad_env[0].contains("SHOAL_NODE_IP"),
            "{:?}",
            bad.bad_env
        );
        assert!(
            bad.bad_env[1].contains("SHOAL_DRIVER_PORT"),
            "{:?}",
            bad.bad_env
        );
        assert!(from(&[]).bad_env.is_empty(), "unset is not bad");
    }

    #[test]
    fn the_head_timeout_is_read_and_bad_values_named() {
        let good = from(&[("SHOAL_HEAD_TIMEOUT", "2.5")]);
        assert_eq!(good.head_timeout, std::time::Duration::from_millis(2500));
        assert!(good.bad_env.is_empty());
        assert_eq!(from(&[]).head_timeout, crate::core::head::HEAD_TIMEOUT);
        for value in ["-1", "soon", "NaN", "inf"] {
            let bad = from(&[("SHOAL_HEAD_TIMEOUT", value)]);
            assert_eq!(bad.bad_env.len(), 1, "{value}: {:?}", bad.bad_env);
            assert!(bad.bad_env[0].contains("SHOAL_HEAD_TIMEOUT"));
        }
    }

    #[test]
    fn task_events_are_off_unless_asked_for_and_bad_values_named() {
        assert!(!from(&[]).task_events);
        for on in ["1", "true", "on"] {
            assert!(from(&[("SHOAL_TASK_EVENTS", on)]).task_events, "{on}");
        }
        assert!(!from(&[("SHOAL_TASK_EVENTS", "0")]).task_events);
        let bad = from(&[("SHOAL_TASK_EVENTS", "yes please")]);
        assert!(
            bad.bad_env[0].contains("SHOAL_TASK_EVENTS"),
            "{:?}",
            bad.bad_env
        );
        // The environment overrides what the program chose.
        assert!(!task_events_from(Some("off".into()), true, &mut Vec::new()));
        assert!(task_events_from(None, true, &mut Vec::new()));
    }
}
