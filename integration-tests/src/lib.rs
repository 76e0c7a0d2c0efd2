//! Fixtures for cluster tests.
//!
//! - [`ProcessCluster`]: a cluster of real `shoal` processes on 127.0.0.1, in a
//!   session root of its own, stopped (SIGKILL) when dropped, pass or fail.
//! - [`hosts::Hosts`]: hosts of their own (Docker containers on a private
//!   network) for multi-host clusters, with verbs to stop, freeze and cut
//!   one off.
//! - [`poll_until`]: wait for a state with a deadline, never a bare sleep.
//! - [`history`]: the chaos suites' checker of lost, duplicated and
//!   reordered operations; [`Chaos`]: their seed and scale.
//! - [`raw`]: a peer that speaks QUIC and TLS but sends whatever bytes a test
//!   wants in the handshake, to check how the head refuses bad input.
//!
//! The in-process cluster is `shoal::LocalCluster`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;
pub mod history;
pub mod hosts;
pub mod prometheus;
pub mod redis;

/// Calls `probe` every 50 ms until it returns `Some`, or panics with `what`
/// after `timeout`.
pub fn poll_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The async twin of [`poll_until`].
pub async fn poll_until_async<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `shoal` binary built beside this test (`cargo build` first; `make test`
/// does).
pub fn shoal_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("shoal");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p shoal-cli` (make test does)",
        bin.display()
    );
    bin
}

/// Runs a driver program (a scenario or an example) to completion, with a
/// deadline; returns its stdout. Panics with its output if it fails.
pub fn run_driver(
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
    timeout: Duration,
) -> String {
    run_driver_logged(program, args, env, timeout).0
}

/// [`run_driver`], with what the driver logged (standard error) too.
pub fn run_driver_logged(
    program: &Path,
    args: &[&str],
    env: &[(&str, String)],
    timeout: Duration,
) -> (String, String) {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("SHOAL_ADDRESS")
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_WORKER_PROCESSES")
        .env("SHOAL_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on the driver") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("driver output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    match status {
        Some(s) if s.success() => (stdout, stderr),
        Some(s) => panic!(
            "{} {args:?} failed ({s}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
            program.display()
        ),
        None => panic!(
            "{} {args:?} did not finish within {timeout:?}:\nstdout:\n{stdout}\nstderr:\n{stderr}",
            program.display()
        ),
    }
}

/// Runs the `scenarios` driver to completion (see [`run_driver`]) and
/// returns the JSON of its `RESULT` line.
pub fn scenario_result(args: &[&str], env: &[(&str, String)], timeout: Duration) -> Value {
    result_of(&run_driver(&sibling_bin("scenarios"), args, env, timeout))
}

/// A chaos test's seed (from `SHOAL_CHAOS_SEED`, else the clock; printed so
/// a run can be replayed) and scale (`SHOAL_CHAOS=full` for `make chaos`;
/// otherwise the short smoke `make test` runs).
pub struct Chaos {
    /// The seed.
    pub seed: u64,
    /// Full size (minutes) rather than the smoke.
    pub full: bool,
    state: u64,
}

impl Chaos {
    /// Reads the seed and scale, and prints them for test `name`.
    pub fn from_env(name: &str) -> Self {
        let seed = std::env::var("SHOAL_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    ^ u64::from(std::process::id())
            });
        let full = std::env::var("SHOAL_CHAOS").is_ok_and(|v| v == "full");
        println!(
            "{name}: SHOAL_CHAOS_SEED={seed} ({})",
            if full { "full" } else { "smoke" }
        );
        Self {
            seed,
            full,
            state: seed,
        }
    }

    /// The next pseudo-random number (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration between `lo` and `hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis().max(1) as u64;
        lo + Duration::from_millis(self.next_u64() % span)
    }

    /// An index below `n` (n > 0).
    pub fn pick(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Starts the `scenarios` driver on this host for a test that talks to it
/// while it runs (see [`hosts::Driver`]: lines waited for with a deadline,
/// killed on drop).
pub fn driver(args: &[&str], env: &[(&str, String)]) -> hosts::Driver {
    hosts::Driver::new(spawn_scenario(args, env))
}

/// Starts the `scenarios` driver with its stdin, stdout and stderr piped,
/// for a test that talks to it or acts while it runs. The caller waits
/// for it (or kills it).
pub fn spawn_scenario(args: &[&str], env: &[(&str, String)]) -> Child {
    Command::new(sibling_bin("scenarios"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .env("SHOAL_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the scenarios driver")
}

/// The environment of a local-mode driver whose workers are processes.
pub fn local_processes() -> Vec<(&'static str, String)> {
    vec![("SHOAL_WORKER_PROCESSES", "1".to_string())]
}

/// The JSON of the `RESULT {...}` line a scenario prints.
pub fn result_of(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad RESULT json ({e}): {line}"))
}

/// A binary built beside `shoal` (scenarios, examples).
pub fn sibling_bin(name: &str) -> PathBuf {
    let bin = shoal_bin().with_file_name(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace` (make test does)",
        bin.display()
    );
    bin
}

/// A cluster of real `shoal` processes sharing one session root.
pub struct ProcessCluster {
    root: tempfile::TempDir,
    /// Environment the daemons start with (`shoal start` only).
    daemon_env: Vec<(String, String)>,
}

impl Default for ProcessCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessCluster {
    /// An empty session root; nothing runs yet.
    pub fn new() -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("shoal-test-")
                .tempdir()
                .expect("tempdir"),
            daemon_env: Vec::new(),
        }
    }

    /// An empty session root whose daemons start with `env` (and their
    /// workers, which inherit it).
    pub fn with_daemon_env(env: &[(&str, &str)]) -> Self {
        let mut cluster = Self::new();
        cluster.daemon_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cluster
    }

    /// Daemons started from now on get no extra environment.
    pub fn clear_daemon_env(&mut self) {
        self.daemon_env.clear();
    }

    /// The session root.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Runs `shoal ARGS --session-dir ROOT` and returns its output.
    pub fn shoal(&self, args: &[&str]) -> Output {
        // The flag goes before a `--`: what follows is a submitted
        // program's command line.
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut command = Command::new(shoal_bin());
        command
            .args(&args[..split])
            .arg("--session-dir")
            .arg(self.root())
            .args(&args[split..])
            .env_remove("SHOAL_TOKEN")
            .env_remove("SHOAL_ADDRESS");
        if args.first() == Some(&"start") {
            command.envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        }
        command.output().expect("running shoal")
    }

    /// Like [`shoal`](Self::shoal), panicking with its output unless it succeeds.
    pub fn shoal_ok(&self, args: &[&str]) -> String {
        let out = self.shoal(args);
        assert!(
            out.status.success(),
            "shoal {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a cluster file into the root and returns its path.
    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.root().join(name);
        std::fs::write(&path, text).expect("writing cluster file");
        path
    }

    /// Starts a head on a free loopback port; returns its address.
    pub fn start_head(&self, extra: &[&str]) -> String {
        let mut args = vec!["start", "--head", "--port", "0", "--node-ip", "127.0.0.1"];
        args.extend_from_slice(extra);
        self.shoal_ok(&args);
        self.head_address()
    }

    /// The head's address from the session directory.
    pub fn head_address(&self) -> String {
        let path = self.root().join("session_latest").join("head_address");
        std::fs::read_to_string(&path)
            .expect("head_address")
            .trim()
            .to_string()
    }

    /// Environment for a driver of this cluster.
    pub fn driver_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SHOAL_ADDRESS", self.head_address()),
            ("SHOAL_TOKEN", self.token()),
        ]
    }

    /// A head that runs no tasks and two nodes of 2 CPUs, the first offering
    /// the custom resource `maker`, the second `user`; fast failure detection.
    pub fn three_process() -> Self {
        Self::three_process_with(&[])
    }

    /// Like [`three_process`](Self::three_process), with `extra` flags for
    /// both node daemons.
    pub fn three_process_with(extra: &[&str]) -> Self {
        Self::new().started_three(extra)
    }

    /// Starts [`three_process`](Self::three_process)'s head and nodes in
    /// this session root.
    pub fn started_three(self, extra: &[&str]) -> Self {
        let cluster = self;
        let config = cluster.write_config("fast.toml", hosts::FAST_CONFIG);
        cluster.start_head(&[
            "--num-cpus",
            "0",
            "--config",
            config.to_str().expect("utf8 path"),
        ]);
        let node = |resource: &str| {
            let resources = format!(r#"{{"{resource}": 1}}"#);
            let mut args = vec!["--num-cpus", "2", "--resources", resources.as_str()];
            args.extend_from_slice(extra);
            cluster.start_node(&args);
        };
        node("maker");
        node("user");
        cluster
    }

    /// The join token from the session directory.
    pub fn token(&self) -> String {
        let path = self.root().join("session_latest").join("token");
        std::fs::read_to_string(&path)
            .expect("token")
            .trim()
            .to_string()
    }

    /// Starts a node daemon that joins the head; returns its pid.
    pub fn start_node(&self, extra: &[&str]) -> u32 {
        let address = self.head_address();
        let mut args = vec![
            "start",
            "--address",
            address.as_str(),
            "--node-ip",
            "127.0.0.1",
        ];
        args.extend_from_slice(extra);
        let out = self.shoal_ok(&args);
        // "Started a Shoal node (pid N) that joined ..."
        out.split("(pid ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no pid in shoal start output: {out}"))
    }

    /// Runs the `observe` scenario with task events on: `n` tasks that
    /// finish, one that fails, one retried after its worker died, and
    /// three actor calls; its result (checked: `n` tasks said).
    pub fn run_observed_job(&self, n: u32) -> Value {
        let marker = self.root().join("crashed-once");
        let _ = std::fs::remove_file(&marker);
        let mut env = self.driver_env();
        env.push(("SHOAL_TASK_EVENTS", "1".into()));
        let out = scenario_result(
            &["observe", &n.to_string(), &marker.display().to_string()],
            &env,
            Duration::from_secs(240),
        );
        assert_eq!(out["said"], n, "{out}");
        out
    }

    /// `shoal status --json`.
    pub fn status(&self) -> Value {
        let out = self.shoal_ok(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// The status node whose pid is `pid` and whose state is `state`, if any.
    pub fn node_by_pid(status: &Value, pid: u32, state: &str) -> Option<Value> {
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["pid"] == pid && n["state"] == state)
            .cloned()
    }

    /// Every pid the cluster's status lists.
    pub fn pids(status: &Value) -> Vec<u32> {
        status["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|n| n["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every log file under the root (daemons' and workers'), with its text.
    pub fn daemon_logs(&self) -> Vec<(PathBuf, String)> {
        logs(self.root())
            .into_iter()
            .map(|log| {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                (log, text)
            })
            .collect()
    }

    /// Panics if any daemon log under the root records a panic.
    pub fn assert_no_panics(&self) {
        for log in logs(self.root()) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                !text.contains("panicked"),
                "{} records a panic:\n{text}",
                log.display()
            );
        }
    }
}

fn logs(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for session in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if let Ok(entries) = std::fs::read_dir(session.path().join("logs")) {
            found.extend(entries.flatten().map(|e| e.path()));
        }
    }
    found
}

/// Lines of each daemon log a failing test prints (see `Drop`).
const FAILED_LOG_LINES: usize = 60;

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        // Pass or fail, leave nothing running.
        let _ = Command::new(shoal_bin())
            .args(["stop", "--force", "--session-dir"])
            .arg(self.root())
            .output();
        // A failing test's output (which cargo prints) ends with what its
        // daemons logged last: the session directory goes with the test,
        // and a failure seen once in CI may not come back.
        if std::thread::panicking() {
            for (log, text) in self.daemon_logs() {
                let name = log.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !(name.starts_with("head") || name.starts_with("node")) {
                    continue;
                }
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(FAILED_LOG_LINES)..];
                eprintln!(
                    "--- the last {} lines of {}:\n{}",
                    tail.len(),
                    log.display(),
                    tail.join("\n")
                );
            }
        }
    }
}

/// True while `pid` is a live (non-zombie) process.
pub fn process_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
    {
        None | Some('Z') | Some('X') => false,
        Some(_) => true,
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(pid, signal).expect("sending signal");
}

pub mod raw {
    //! A peer that completes QUIC and TLS but then sends arbitrary bytes.

    use std::net::SocketAddr;

    use shoal_net::quinn;
    use shoal_net::{endpoint, tls, NetLimits, HEAD_SERVER_NAME};
    use shoal_proto::codec::{self, CodecLimits};
    use shoal_proto::HelloReply;

    /// A QUIC connection to `addr` with no `Hello` sent yet.
    pub async fn connect(addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
        let limits = NetLimits::default();
        let tls = tls::token_client_config().expect("tls config");
        let config = endpoint::client_config(tls, &limits).expect("client config");
        let ep = endpoint::endpoint(([127, 0, 0, 1], 0).into(), None, &limits).expect("endpoint");
        let conn = ep
            .connect_with(config, addr, HEAD_SERVER_NAME)
            .expect("connect")
            .await
            .expect("QUIC handshake");
        (ep, conn)
    }

    /// Sends `bytes` as the handshake stream and reads the server's answer:
    /// `Ok(reply)` if it sent a `HelloReply`, `Err(text)` if it closed instead.
    pub async fn send_handshake_bytes(
        addr: SocketAddr,
        bytes: &[u8],
    ) -> Result<HelloReply, String> {
        let (ep, conn) = connect(addr).await;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(bytes).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let body = recv
            .read_to_end(64 << 10)
            .await
            .map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"bye");
        ep.wait_idle().await;
        codec::decode_frame(&body, &CodecLimits::HANDSHAKE).map_err(|e| e.to_string())
    }
}
