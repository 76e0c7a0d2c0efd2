//! Hosts of their own for multi-host tests: Docker containers on a private
//! network, each with its own address, hostname, filesystem and `/dev/shm`.
//!
//! There is no image registry: the image is built here, once per test
//! process, with `docker import` of a root filesystem holding only the
//! shared libraries the project's binaries link (found with `ldd`) and
//! `sleep` as each container's idle main process. The binaries themselves
//! (`target/debug`) are mounted read-only at `/shoal`, so every host runs
//! the build under test; workers are the driver's executable fetched from
//! the head, as on real machines. Each host's `/tmp/shoal` (its session
//! root) is a directory of the test's, so the test can read tokens and logs.
//!
//! The network is `--internal` (no route out) on a /24 of 198.18.0.0/15,
//! the range set aside for such tests. Verbs for faults: [`Hosts::stop`]
//! (`docker kill`), [`Hosts::freeze`]/[`Hosts::thaw`] (`docker
//! pause`/`unpause`) and [`Hosts::cut`]/[`Hosts::reconnect`] (`docker
//! network disconnect`/`connect`). Dropping a [`Hosts`] removes its
//! containers and network, pass or fail; containers a killed test run left
//! behind are removed by the next run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use shoal_net::sync::MutexExt;

use serde_json::Value;

/// The head's port on its host.
pub const HEAD_PORT: u16 = 7100;
/// Where each host's session root is, inside it.
const SESSION_ROOT: &str = "/tmp/shoal";
/// The label every container and network of these tests carries, with the
/// test process's pid as its value.
const LABEL: &str = "shoal-test-pid";
/// Fast failure detection, for the head.
pub const FAST_CONFIG: &str = "[timeouts]\nheartbeat_interval = \"200ms\"\nnode_timeout = \"2s\"\n";

/// Runs `docker ARGS`; its output.
fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("these tests need a Docker engine; `docker` failed: {e}"))
}

/// Runs `docker ARGS`, panicking with its output unless it succeeds.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The directory of the binaries under test (`target/debug`).
fn binaries() -> PathBuf {
    crate::shoal_bin()
        .parent()
        .expect("the target directory")
        .to_path_buf()
}

/// The shared libraries `binary` links, as absolute paths.
fn linked(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", binary.display()));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)".
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The image's tag, built on first use: the libraries of `shoal`,
/// `scenarios` and `sleep`, and `sleep` itself.
fn image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        remove_leftovers();
        let sleep = PathBuf::from("/bin/sleep");
        let mut files = vec![sleep.clone()];
        for binary in [crate::shoal_bin(), crate::sibling_bin("scenarios"), sleep] {
            files.extend(linked(&binary));
        }
        files.sort();
        files.dedup();
        // Named after what goes in, so a changed system builds a new one.
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        for file in &files {
            let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            for b in file.display().to_string().bytes().chain(len.to_le_bytes()) {
                digest = (digest ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        let tag = format!("shoal-test-host:{digest:016x}");
        if docker(&["image", "inspect", &tag]).status.success() {
            return tag;
        }
        let root = tempfile::tempdir().expect("a staging directory");
        for file in &files {
            let to = root.path().join(file.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(to.parent().expect("a parent")).expect("staging dirs");
            std::fs::copy(file, &to).unwrap_or_else(|e| panic!("copying {}: {e}", file.display()));
        }
        for dir in ["tmp/shoal", "shoal", "dev/shm", "proc", "sys", "etc"] {
            std::fs::create_dir_all(root.path().join(dir)).expect("staging dirs");
        }
        let mut tar = Command::new("tar")
            .args(["-C"])
            .arg(root.path())
            .args(["-cf", "-", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let imported = Command::new("docker")
            .args(["import", "-", &tag])
            .stdin(tar.stdout.take().expect("tar's output"))
            .output()
            .expect("docker import");
        let packed = tar.wait().expect("tar's exit");
        assert!(packed.success(), "tar of the image's root failed: {packed}");
        assert!(
            imported.status.success(),
            "docker import failed: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        tag
    })
}

/// Removes containers and networks of test processes that are gone.
fn remove_leftovers() {
    let gone = |pid: &str| {
        pid.parse::<u32>().map_or(true, |pid| {
            pid != std::process::id() && !crate::process_alive(pid)
        })
    };
    let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL}\"}}}}");
    let filter = format!("label={LABEL}");
    let listed = docker_ok(&["ps", "-a", "--filter", &filter, "--format", &format]);
    let stale: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, pid)| gone(pid))
        .map(|(id, _)| id)
        .collect();
    if !stale.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(stale);
        docker(&args);
    }
    let listed = docker_ok(&["network", "ls", "--filter", &filter, "--format", &format]);
    for (id, _) in listed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, pid)| gone(pid))
    {
        docker(&["network", "rm", id]);
    }
}

/// One host of a [`Hosts`].
#[derive(Debug)]
pub struct Host {
    /// The container's name.
    pub container: String,
    /// Its hostname.
    pub hostname: String,
    /// Its address on the network.
    pub ip: String,
    /// Its session root, as the test sees it.
    dir: tempfile::TempDir,
}

/// Hosts on a private network of their own.
#[derive(Debug)]
pub struct Hosts {
    network: String,
    hosts: Vec<Host>,
}

impl Hosts {
    /// Starts one host per name (its hostname), on a new network.
    pub fn start(names: &[&str]) -> Hosts {
        Self::start_with(names, &[])
    }

    /// Like [`Hosts::start`], with more `docker run` options for every host
    /// (`--memory 3g`, `--shm-size 64m`: they override the defaults).
    pub fn start_with(names: &[&str], docker_args: &[&str]) -> Hosts {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let image = image();
        let pid = std::process::id();
        let label = format!("{LABEL}={pid}");
        // A /24 of 198.18.0.0/15 no other fixture uses: tried in turn.
        let mut made = None;
        for _ in 0..64 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let block = (pid.wrapping_mul(7).wrapping_add(n * 13)) % 500 + 2;
            let subnet = format!("198.{}.{}", 18 + block / 256, block % 256);
            let network = format!("shoal-{pid}-{n}");
            let out = docker(&[
                "network",
                "create",
                "--internal",
                "--label",
                &label,
                "--subnet",
                &format!("{subnet}.0/24"),
                &network,
            ]);
            if out.status.success() {
                made = Some((network, subnet));
                break;
            }
        }
        let (network, subnet) = made.expect("a free 198.18.0.0/15 subnet for a test network");
        let mut hosts = Hosts {
            network,
            hosts: Vec::new(),
        };
        let bins = binaries();
        for (i, name) in names.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("shoal-host-")
                .tempdir()
                .expect("a session root");
            let container = format!("{}-{name}", hosts.network);
            let ip = format!("{subnet}.{}", 10 + i);
            let mut args = vec![
                "run",
                "-d",
                "--init",
                "--name",
                &container,
                "--hostname",
                name,
                "--label",
                &label,
                "--network",
                &hosts.network,
                "--ip",
                &ip,
                "--shm-size",
                "1g",
            ];
            let bins_mount = format!("{}:/shoal:ro", bins.display());
            let session_mount = format!("{}:{SESSION_ROOT}", dir.path().display());
            args.extend(["-v", &bins_mount, "-v", &session_mount]);
            args.extend_from_slice(docker_args);
            args.extend([image, "/bin/sleep", "infinity"]);
            let run = args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
            // Pushed first: a container `docker run` made before failing is
            // removed on drop too.
            hosts.hosts.push(Host {
                container,
                hostname: name.to_string(),
                ip,
                dir,
            });
            docker_ok(&run.iter().map(String::as_str).collect::<Vec<_>>());
        }
        hosts
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Runs `program ARGS` on host `i` with `env`, waiting at most
    /// `timeout` (its output read meanwhile, so a chatty program never
    /// blocks on a full pipe).
    pub fn exec(
        &self,
        i: usize,
        program: &str,
        args: &[&str],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Output {
        let child = self.spawn(i, program, args, env);
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(timeout) {
            Ok(out) => out.expect("docker exec output"),
            Err(_) => {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let out = rx.recv().ok().and_then(Result::ok);
                let (stdout, stderr) = out
                    .map(|o| {
                        (
                            String::from_utf8_lossy(&o.stdout).into_owned(),
                            String::from_utf8_lossy(&o.stderr).into_owned(),
                        )
                    })
                    .unwrap_or_default();
                panic!(
                    "{program} {args:?} on {} did not finish within {timeout:?}:\nstdout:\n{stdout}\nstderr:\n{stderr}",
                    self.hosts[i].hostname
                );
            }
        }
    }

    /// Starts the `scenarios` driver on host `i` for a test that talks to
    /// it while it runs (see [`Driver`]).
    pub fn driver(&self, i: usize, args: &[&str], env: &[(&str, String)]) -> Driver {
        Driver::new(self.spawn(i, "/shoal/scenarios", args, env))
    }

    /// Starts `program ARGS` on host `i` with `env`, its stdio piped.
    pub fn spawn(&self, i: usize, program: &str, args: &[&str], env: &[(&str, String)]) -> Child {
        let mut command = Command::new("docker");
        command.args(["exec", "-i"]);
        for (k, v) in env {
            command.arg("-e").arg(format!("{k}={v}"));
        }
        command
            .arg(&self.hosts[i].container)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker exec")
    }

    /// `shoal ARGS --session-dir /tmp/shoal` on host `i`.
    pub fn shoal(&self, i: usize, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--session-dir", SESSION_ROOT]);
        self.exec(i, "/shoal/shoal", &all, &[], Duration::from_secs(90))
    }

    /// Like [`Hosts::shoal`], panicking with its output unless it succeeds.
    pub fn shoal_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.shoal(i, args);
        assert!(
            out.status.success(),
            "shoal {args:?} on {} failed ({}):\nstdout: {}\nstderr: {}",
            self.hosts[i].hostname,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a file into host `i`'s session root; its path there.
    pub fn write_file(&self, i: usize, name: &str, text: &str) -> String {
        std::fs::write(self.hosts[i].dir.path().join(name), text).expect("writing a file");
        format!("{SESSION_ROOT}/{name}")
    }

    /// Starts the head on host `i` at [`HEAD_PORT`], with fast failure
    /// detection, as a user would (no `--node-ip`); returns its address.
    pub fn start_head(&self, i: usize, extra: &[&str]) -> String {
        let config = self.write_file(i, "fast.toml", FAST_CONFIG);
        let port = HEAD_PORT.to_string();
        let mut args = vec!["start", "--head", "--port", &port, "--config", &config];
        args.extend_from_slice(extra);
        self.shoal_ok(i, &args);
        self.head_address()
    }

    /// Starts a node daemon on host `i` that joins the head, as a user
    /// would on another machine (address and token given).
    pub fn start_node(&self, i: usize, extra: &[&str]) -> String {
        let address = self.head_address();
        let token = self.token();
        let mut args = vec!["start", "--address", &address, "--token", &token];
        args.extend_from_slice(extra);
        self.shoal_ok(i, &args)
    }

    /// The host whose session root has a head.
    fn head_host(&self) -> usize {
        self.hosts
            .iter()
            .position(|h| h.dir.path().join("session_latest/head_address").exists())
            .expect("a host runs the head")
    }

    fn head_file(&self, name: &str) -> String {
        let path = self.hosts[self.head_host()]
            .dir
            .path()
            .join("session_latest")
            .join(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// The head's address, as its session directory says.
    pub fn head_address(&self) -> String {
        self.head_file("head_address")
    }

    /// The join token.
    pub fn token(&self) -> String {
        self.head_file("token")
    }

    /// `shoal status --json`, asked on the head's host.
    pub fn status(&self) -> Value {
        let out = self.shoal_ok(self.head_host(), &["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// The environment of a driver on any host.
    pub fn driver_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SHOAL_ADDRESS", self.head_address()),
            ("SHOAL_TOKEN", self.token()),
            ("SHOAL_BIN", "/shoal/shoal".to_string()),
            ("SHOAL_LOG", "warn".to_string()),
        ]
    }

    /// Runs the `scenarios` driver on host `i`; the JSON of its `RESULT`
    /// line. Panics with its output if it fails.
    pub fn scenario(
        &self,
        i: usize,
        args: &[&str],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Value {
        let out = self.exec(i, "/shoal/scenarios", args, env, timeout);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scenarios {args:?} on {} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            self.hosts[i].hostname,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        crate::result_of(&stdout)
    }

    /// Kills every process of host `i` (`docker kill`): a machine lost.
    pub fn stop(&self, i: usize) {
        docker_ok(&["kill", &self.hosts[i].container]);
    }

    /// Freezes every process of host `i` (`docker pause`): a machine that
    /// hangs, its sockets open.
    pub fn freeze(&self, i: usize) {
        docker_ok(&["pause", &self.hosts[i].container]);
    }

    /// Undoes [`Hosts::freeze`].
    pub fn thaw(&self, i: usize) {
        docker_ok(&["unpause", &self.hosts[i].container]);
    }

    /// Cuts host `i` off the network (`docker network disconnect`): its
    /// processes run on, reaching no one.
    pub fn cut(&self, i: usize) {
        docker_ok(&[
            "network",
            "disconnect",
            "--force",
            &self.network,
            &self.hosts[i].container,
        ]);
    }

    /// Undoes [`Hosts::cut`], with the host's old address.
    pub fn reconnect(&self, i: usize) {
        docker_ok(&[
            "network",
            "connect",
            "--ip",
            &self.hosts[i].ip,
            &self.network,
            &self.hosts[i].container,
        ]);
    }

    /// The command lines of the processes running on host `i` (`docker
    /// top`), its idle `sleep` included.
    pub fn processes(&self, i: usize) -> Vec<String> {
        // `docker top` wants a pid column; it is dropped here.
        docker_ok(&["top", &self.hosts[i].container, "-o", "pid,args"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                l.trim_start()
                    .split_once(' ')
                    .map(|(_, args)| args.trim().to_string())
            })
            .collect()
    }

    /// Panics if a daemon log on any host records a panic.
    pub fn assert_no_panics(&self) {
        for host in &self.hosts {
            for log in crate::logs(host.dir.path()) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    !text.contains("panicked"),
                    "{} on {} records a panic:\n{text}",
                    log.display(),
                    host.hostname
                );
            }
        }
    }

    /// Every daemon log of every host, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for host in &self.hosts {
            for log in crate::logs(host.dir.path()) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                out.push_str(&format!("== {} {}\n", host.hostname, log.display()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Pass or fail, leave nothing running. Paused containers are
        // removed by `rm -f` too.
        let mut args = vec!["rm", "-f"];
        args.extend(self.hosts.iter().map(|h| h.container.as_str()));
        if !self.hosts.is_empty() {
            docker(&args);
        }
        docker(&["network", "rm", &self.network]);
    }
}

/// A driver a test talks to while it runs: its output read on threads (so
/// neither pipe fills), lines waited for with a deadline, killed on drop.
pub struct Driver {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Driver {
    /// Takes over `child`, whose stdin, stdout and stderr are piped.
    pub fn new(mut child: Child) -> Driver {
        use std::io::{BufRead, Read};
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let sink = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.locked().push_str(&text);
            }
        });
        Driver {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.locked().clone()
    }

    /// The rest of the first line starting with `prefix`, waiting at most
    /// `timeout`; panics with the driver's stderr otherwise.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let line = self.wait_for_line(&format!("{prefix:?} line"), timeout, |l| {
            l.starts_with(prefix)
        });
        line[prefix.len()..].to_string()
    }

    /// The first line holding `text`, waiting at most `timeout`; panics
    /// with the process's stderr otherwise.
    pub fn wait_containing(&mut self, text: &str, timeout: Duration) -> String {
        self.wait_for_line(&format!("line with {text:?}"), timeout, |l| {
            l.contains(text)
        })
    }

    fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "the driver printed no {what} within {timeout:?}:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// The `RESULT` line's JSON, once printed (the driver may go on).
    pub fn result_line(&mut self, timeout: Duration) -> Value {
        let line = self.wait_for("RESULT ", timeout);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad RESULT json ({e}): {line}"))
    }

    /// Writes `line` to the driver's stdin.
    pub fn say(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").expect("writing to the driver");
        stdin.flush().expect("flushing to the driver");
    }

    /// Waits at most `timeout` for the driver to exit successfully; the
    /// JSON of its `RESULT` line. Panics with its output otherwise.
    pub fn result(mut self, timeout: Duration) -> Value {
        let line = self.wait_for("RESULT ", timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting on the driver") {
                assert!(
                    status.success(),
                    "driver failed ({status}):\n{}",
                    self.stderr()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the driver did not exit within {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad RESULT json ({e}): {line}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
