//! `shoal start`: the head (`--head`) or a joining node (`--address`).
//!
//! Without `--block` the command re-runs itself with `--block` as a daemon in
//! its own process group, output to the session's log directory, waits until
//! the daemon answers, prints how to use it, and returns. With `--block` it
//! runs the daemon in the foreground until SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_head::HeadConfig;
use shoal_net::{ClusterIdentity, JoinToken};
use shoal_node::NodeConfig;
use shoal_proto::{ClusterStatus, NodeState, ResourceSet};
use tokio_util::sync::CancellationToken;

use crate::cluster_file::{ClusterFile, NodeSection};
use crate::session::{PidFile, Session};
use crate::{logging, status, SessionArgs};

/// How long `shoal start` waits for its daemon to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("role").required(true).args(["head", "address"])))]
pub struct StartArgs {
    /// Start the head, with a node daemon in the same process (like `ray start --head`).
    #[arg(long)]
    head: bool,
    /// Start a node daemon that joins the head at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    address: Option<String>,
    /// The head's port; 0 picks a free one. [default: 6380; with
    /// --recover, the port the session's head had]
    #[arg(long, requires = "head")]
    port: Option<u16>,
    /// Restart the head of the newest session under --session-dir after it
    /// died: same address, cluster id, CA and token, and the jobs, actors
    /// (names, detached ones), executables and key-value table it had
    /// written. Its nodes keep their ids and work and join it again.
    /// Without it, --head starts a new cluster.
    #[arg(long, requires = "head")]
    recover: bool,
    /// Keep the head's tables in Redis instead of a file in the session
    /// directory, so that a head on another machine can take over
    /// (`--recover --head-store` there, with this session's token, ca.crt
    /// and ca.key). One head holds the store at a time: a head that loses
    /// its lease stops. Run Redis with `appendonly yes` and `appendfsync
    /// always` for durable writes.
    #[arg(long, requires = "head", value_name = "redis://HOST:PORT", value_parser = parse_head_store)]
    head_store: Option<String>,
    /// The cluster token the head printed (shoal1.…; the driver token,
    /// shoal1d.…, cannot join a node). Falls back to SHOAL_TOKEN, then to
    /// the token in the session directory (on the head's own machine).
    #[arg(
        long,
        env = "SHOAL_TOKEN",
        hide_env_values = true,
        conflicts_with = "head"
    )]
    token: Option<String>,
    /// CPUs this node offers (detected by default); 0 runs no tasks here.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    num_cpus: Option<f64>,
    /// GPUs this node offers, devices 0 to N-1 (default: detected from
    /// `nvidia-smi -L`, else /proc/driver/nvidia/gpus, else 0). Each worker
    /// sees exactly its devices in CUDA_VISIBLE_DEVICES.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1024))]
    num_gpus: Option<u32>,
    /// Labels for label selectors, as JSON: '{"zone": "a", "disk": "ssd"}'.
    /// Every node also carries shoal.io/node-id and shoal.io/hostname.
    #[arg(long, value_name = "JSON", value_parser = parse_labels)]
    labels: Option<BTreeMap<String, String>>,
    /// Memory this node offers, in bytes (detected by default).
    #[arg(long, value_name = "BYTES")]
    memory: Option<u64>,
    /// Object store capacity of this node, in bytes (default: 30% of memory).
    /// Above 80% of it, objects spill to disk.
    #[arg(long, value_name = "BYTES")]
    object_store_memory: Option<u64>,
    /// Most bytes this node spills to disk (default: while the disk stays
    /// under 95% full). Past it, `put` fails with ObjectStoreFull.
    #[arg(long, value_name = "BYTES")]
    object_spill_bytes: Option<u64>,
    /// Custom resources this node offers, as JSON: '{"GPU": 1, "disk": 2}'.
    #[arg(long, value_name = "JSON", value_parser = parse_resources)]
    resources: Option<BTreeMap<String, f64>>,
    /// The IP other machines reach this node (and its workers) on; the
    /// daemon listens on it only. Default: listen on all interfaces and
    /// advertise the local address of the route to the head, else (for the
    /// head, or a head on loopback) the primary interface's. Never loopback
    /// unless given: every address this node hands out must be reachable
    /// from other hosts.
    #[arg(long, value_name = "IP")]
    node_ip: Option<IpAddr>,
    /// The UDP port the node daemon serves workers, drivers and peer nodes
    /// on (default: a free one). Open it, the head's --port and the worker
    /// ports in the firewall.
    #[arg(long, value_name = "PORT")]
    node_port: Option<u16>,
    /// The UDP ports this node's worker processes bind, one each, as LO-HI
    /// (like Ray's --min-worker-port/--max-worker-port; default: free
    /// ports). A worker that finds none free fails to start.
    #[arg(long, value_name = "LO-HI", value_parser = shoal_node::config::parse_port_range)]
    worker_port_range: Option<(u16, u16)>,
    /// The TCP port this process serves Prometheus metrics on, at
    /// http://IP:PORT/metrics (the head's with its node's). Taken, or unset
    /// on a node, a free port is used: `shoal status` shows each node's.
    /// 0 turns metrics off. [default: 9464 for the head]
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
    /// With --head: the TCP port of the dashboard (a web page and its JSON
    /// API; nothing is served without the cluster token, and `shoal start`
    /// prints a link that logs in). Taken, a free port is used; 0 turns it
    /// off. [default: 8265]
    #[arg(long, value_name = "PORT")]
    dashboard_port: Option<u16>,
    /// A TOML cluster file (see cluster-config/); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// With --address and --config: which [[nodes]] entry this node is. [default: 0]
    #[arg(long, value_name = "N", requires = "address")]
    node_index: Option<usize>,
    #[command(flatten)]
    session: SessionArgs,
    /// Run in the foreground until interrupted, instead of as a daemon.
    #[arg(long)]
    block: bool,
    /// The session directory a daemon started by `shoal start` uses.
    #[arg(long, hide = true, value_name = "DIR")]
    session_path: Option<PathBuf>,
}

/// `--head-store`'s parser.
fn parse_head_store(text: &str) -> Result<String> {
    shoal_head::redis::Target::parse(text).map_err(|e| anyhow::anyhow!(e))?;
    Ok(text.to_string())
}

/// `--labels`' parser (clap prints the message).
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let labels: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "expected a JSON object of names to strings, like '{{\"zone\": \"a\"}}': {e}"
        )
    })?;
    if let Some(key) = labels.keys().find(|k| k.starts_with("shoal.io/")) {
        bail!("{key:?}: shoal.io/ labels are set by Shoal");
    }
    shoal_proto::placement::check_labels(&labels)?;
    Ok(labels)
}

/// `--resources`' parser (clap prints the message).
fn parse_resources(text: &str) -> Result<BTreeMap<String, f64>> {
    let map: BTreeMap<String, f64> = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!("expected a JSON object of names to numbers, like '{{\"GPU\": 1}}': {e}")
    })?;
    for name in map.keys() {
        if name == shoal_proto::resources::CPU {
            bail!("use --num-cpus, not \"CPU\" in --resources");
        }
        if name == shoal_proto::resources::MEMORY {
            bail!("use --memory, not \"memory\" in --resources");
        }
        if name == shoal_proto::resources::GPU {
            bail!("use --num-gpus, not \"GPU\" in --resources");
        }
    }
    ResourceSet(map.clone()).validate()?;
    Ok(map)
}

pub fn run(args: StartArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => ClusterFile::load(path)?,
        None => ClusterFile::default(),
    };
    if let Some(n) = args.num_cpus {
        anyhow::ensure!(
            n.is_finite() && n >= 0.0,
            "--num-cpus must be a number >= 0, got {n}"
        );
    }
    // clap's `requires = "head"` counts a bool flag's default as given, so
    // the head-only flags are checked here.
    let head_only = [
        ("--port", args.port.is_some()),
        ("--recover", args.recover),
        ("--head-store", args.head_store.is_some()),
        ("--dashboard-port", args.dashboard_port.is_some()),
    ];
    if let Some((flag, _)) = head_only.iter().find(|(_, given)| *given && !args.head) {
        bail!("{flag} goes with --head (it is about the head, not a joining node)");
    }
    // Said here, before a daemon is started to find out.
    if let (false, Some(text)) = (args.head, &args.token) {
        check_node_token(&text.parse().context("parsing the join token")?)?;
    }
    match (args.head, args.block) {
        (true, true) => run_head(&args, &file),
        (false, true) => run_node(&args, &file),
        (_, false) => spawn_daemon(&args),
    }
}

/// The node settings: the file's section, overridden by flags.
fn node_settings(args: &StartArgs, section: NodeSection, file: &ClusterFile) -> NodeConfig {
    let mut resources = ResourceSet(section.resources);
    if let Some(flags) = &args.resources {
        resources = ResourceSet(flags.clone());
    }
    NodeConfig {
        node_ip: args.node_ip.or(section.node_ip),
        num_cpus: args.num_cpus.or(section.num_cpus),
        num_gpus: args.num_gpus.or(section.num_gpus),
        labels: args.labels.clone().unwrap_or(section.labels),
        memory_bytes: args.memory.or(section.memory_bytes),
        object_store_bytes: args.object_store_memory.or(section.object_store_bytes),
        object_spill_bytes: args.object_spill_bytes.or(section.object_spill_bytes),
        resources,
        limits: file.limits.clone(),
        listen: SocketAddr::new(
            args.node_ip
                .or(section.node_ip)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            args.node_port.or(section.node_port).unwrap_or(0),
        ),
        worker_port_range: args.worker_port_range.or(section.worker_port_range),
        ..NodeConfig::default()
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")
}

/// Cancels the returned token on SIGINT or SIGTERM.
fn shutdown_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

fn session_for(args: &StartArgs, create: bool) -> Result<Session> {
    if let Some(dir) = &args.session_path {
        return Session::open(dir.clone());
    }
    if args.recover {
        let session = Session::latest(&args.session.root).with_context(|| {
            format!(
                "--recover: no session under {} to recover",
                args.session.root.display()
            )
        })?;
        anyhow::ensure!(
            session.token_path().exists(),
            "--recover: {} holds no cluster identity (token, CA)",
            session.dir.display()
        );
        return Ok(session);
    }
    if !create {
        if let Some(latest) = Session::latest(&args.session.root) {
            return Ok(latest);
        }
    }
    Session::create(&args.session.root)
}

fn run_head(args: &StartArgs, file: &ClusterFile) -> Result<()> {
    logging::init("info");
    let session = session_for(args, true)?;
    let result = run_head_in(args, file, &session);
    // A head that never served leaves no session behind.
    if result.is_err() {
        session.discard();
    }
    result
}

fn run_head_in(args: &StartArgs, file: &ClusterFile, session: &Session) -> Result<()> {
    // A head restarted on the same session directory keeps its cluster.
    let identity = if session.token_path().exists() {
        ClusterIdentity::load(&session.dir).context("loading the session's cluster identity")?
    } else {
        let identity = ClusterIdentity::generate().context("generating the cluster identity")?;
        identity
            .save(&session.dir)
            .context("saving the cluster identity")?;
        identity
    };
    let identity = Arc::new(identity);
    let stored = match &args.head_store {
        Some(url) => shoal_head::store::open_redis(url, identity.cluster_id())
            .with_context(|| format!("opening the head's store at {url}"))?,
        None => shoal_head::store::open_session(&session.dir, args.recover)
            .context("opening the head's store")?,
    };
    let _pid = PidFile::write(session.pid_path("head"))?;
    let node_ip = args.node_ip.or(file.head.node_ip);
    // A recovered head listens where the old one did: nodes and drivers
    // reconnect to that address.
    let old_port = args
        .recover
        .then(|| session.head_address())
        .flatten()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.port());
    let port = args
        .port
        .or(old_port)
        .or(file.head.port)
        .unwrap_or(shoal_head::config::defaults::PORT);
    let config = HeadConfig {
        listen: SocketAddr::new(node_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port),
        heartbeat_interval: file.timeouts.heartbeat_interval,
        node_timeout: file.timeouts.node_timeout,
        limits: file.limits.clone(),
        ..HeadConfig::default()
    };
    let head_section = NodeSection {
        node_ip,
        num_cpus: file.head.num_cpus,
        num_gpus: file.head.num_gpus,
        labels: file.head.labels.clone(),
        memory_bytes: file.head.memory_bytes,
        resources: file.head.resources.clone(),
        object_store_bytes: file.head.object_store_bytes,
        object_spill_bytes: file.head.object_spill_bytes,
        node_port: file.head.node_port,
        worker_port_range: file.head.worker_port_range,
    };
    let mut node_config = node_settings(args, head_section, file);
    node_config.is_head_node = true;
    node_config.session_dir = Some(session.dir.clone());
    // One IP for the head and its node: the given one, else the primary
    // interface's (the node reaches the head on loopback, which says
    // nothing of how other hosts reach it).
    let advertised_ip = shoal_net::host::advertised_ip(node_ip, None);
    node_config.node_ip = Some(advertised_ip);

    runtime()?.block_on(async move {
        let shutdown = shutdown_on_signals()?;
        let head = shoal_head::Head::bind_stored(config, identity.clone(), Some(stored))?;
        let bound = head.local_addr().context("reading the head's address")?;
        // Local commands reach the head on loopback when it listens everywhere.
        let local_ip = node_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        node_config.head_address = SocketAddr::new(local_ip, bound.port()).to_string();
        // Submitted jobs' drivers run on this machine, and join as local
        // commands do.
        head.service().run_jobs(shoal_head::submit::JobRunner::new(
            session.dir.join("jobs"),
            session.dir.join("logs"),
            vec![
                ("SHOAL_ADDRESS".into(), node_config.head_address.clone()),
                (
                    "SHOAL_TOKEN".into(),
                    identity.token().driver_token().to_string(),
                ),
            ],
        ));
        let advertised = SocketAddr::new(advertised_ip, bound.port());
        let metrics = crate::metrics::listen(
            node_ip,
            args.metrics_port,
            Some(crate::metrics::HEAD_PORT),
            "metrics",
        )
        .await?;
        node_config.metrics_port = metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port());
        std::fs::write(session.head_address_path(), advertised.to_string())
            .context("writing head_address")?;
        session.publish()?;
        let node = shoal_node::Node::bind(node_config, identity.token().clone())?; // The log may be read by others than the token's owner: no token here.
        println!(
            "Shoal head listening on {advertised} (cluster {})",
            identity.cluster_id()
        );
        let dashboard = crate::metrics::listen(
            node_ip,
            args.dashboard_port,
            Some(crate::dashboard::PORT),
            "dashboard",
        )
        .await?;
        if let Some(listener) = dashboard {
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            let address = SocketAddr::new(advertised_ip, port);
            std::fs::write(session.dashboard_address_path(), address.to_string())
                .context("writing dashboard_address")?;
            println!("Dashboard at http://{address}/");
            let handler = crate::dashboard::handler(head.service(), identity.token().clone());
            tokio::spawn(shoal_net::http::serve(listener, handler, shutdown.clone()));
        }
        if let Some(listener) = metrics {
            let (service, handle) = (head.service(), node.handle());
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            println!("Metrics at http://{advertised_ip}:{port}/metrics");
            let handler = crate::metrics::handler(move |registry| {
                service.register_metrics(registry);
                handle.register_metrics(registry);
            });
            tokio::spawn(shoal_net::http::serve(listener, handler, shutdown.clone()));
        }
        let store_failed = head.store_failed();
        let head_done = async {
            head.run(shutdown.clone()).await;
            // A head whose store failed (or another head took it over)
            // stops, and its node with it.
            shutdown.cancel();
        };
        tokio::join!(head_done, node.run(shutdown.clone()));
        anyhow::ensure!(
            !store_failed.is_cancelled(),
            "the head stopped: its store failed, or another head took the store over (see the log)"
        );
        Ok(())
    })
}

fn run_node(args: &StartArgs, file: &ClusterFile) -> Result<()> {
    logging::init("info");
    let Some(address) = args.address.clone() else {
        bail!("--address is required")
    };
    let session = session_for(args, false)?;
    let result = run_node_in(args, file, address, &session);
    if result.is_err() {
        session.discard();
    }
    result
}

fn run_node_in(
    args: &StartArgs,
    file: &ClusterFile,
    address: String,
    session: &Session,
) -> Result<()> {
    let token = resolve_token(args.token.as_deref(), session)?;
    check_node_token(&token)?;
    let section = match (args.node_index, file.nodes.is_empty()) {
        (Some(i), _) => file.nodes.get(i).cloned().with_context(|| {
            format!(
                "--node-index {i}: the cluster file has {} [[nodes]] entries",
                file.nodes.len()
            )
        })?,
        (None, false) => file.nodes[0].clone(),
        (None, true) => NodeSection::default(),
    };
    let mut config = node_settings(args, section, file);
    config.head_address = address;
    config.session_dir = Some(session.dir.clone());
    let _pid = PidFile::write(session.pid_path(&format!("node-{}", std::process::id())))?;
    runtime()?.block_on(async move {
        let shutdown = shutdown_on_signals()?;
        let metrics =
            crate::metrics::listen(config.node_ip, args.metrics_port, None, "metrics").await?;
        config.metrics_port = metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port());
        let node = shoal_node::Node::bind(config, token)?;
        if let Some(listener) = metrics {
            let handle = node.handle();
            let handler =
                crate::metrics::handler(move |registry| handle.register_metrics(registry));
            tokio::spawn(shoal_net::http::serve(listener, handler, shutdown.clone()));
        }
        session.publish()?;
        node.run(shutdown).await;
        Ok(())
    })
}

/// The token from the flag or SHOAL_TOKEN, else from the session directory.
fn resolve_token(given: Option<&str>, session: &Session) -> Result<JoinToken> {
    if let Some(text) = given {
        return text.parse().context("parsing the join token");
    }
    shoal_net::identity::read_token(&session.token_path()).map_err(|e| {
        anyhow::anyhow!(
            "no join token: pass --token or set SHOAL_TOKEN (the head printed it when it started); \
             none in the session directory either ({e})"
        )
    })
}

/// A node joins with the cluster token; the driver token cannot make one
/// (the head would refuse its handshake).
fn check_node_token(token: &JoinToken) -> Result<()> {
    anyhow::ensure!(
        token.scope() == shoal_net::TokenScope::Cluster,
        "this is a driver token (shoal1d.…), which cannot join a node: nodes join with the \
         cluster token (shoal1.…) that `shoal start --head` printed, or with none on the \
         head's machine (it is read from the session directory)"
    );
    Ok(())
}

/// Starts this command again with `--block` as a daemon, waits until it
/// answers, and says how to use it. A daemon that does not come up leaves
/// no session behind (its log's end goes into the error).
fn spawn_daemon(args: &StartArgs) -> Result<()> {
    let session = session_for(args, args.head)?;
    let result = spawn_daemon_in(args, &session).and_then(|()| session.publish());
    let Err(e) = result else {
        return Ok(());
    };
    // The log's end goes into the message: the log itself goes with the
    // session when this start made it.
    let NotReady { log, error } = match e.downcast::<NotReady>() {
        Ok(not_ready) => not_ready,
        Err(e) => {
            session.discard();
            return Err(e);
        }
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    session.discard();
    let whole = if log.exists() {
        format!("\n(the whole log: {})", log.display())
    } else {
        String::new()
    };
    Err(error.context(format!("the daemon's log ends:\n{tail}{whole}")))
}

/// A daemon that did not come up, and its log.
#[derive(Debug)]
struct NotReady {
    log: PathBuf,
    error: anyhow::Error,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:#} (see the daemon's log: {})",
            self.error,
            self.log.display()
        )
    }
}

impl std::error::Error for NotReady {}

fn spawn_daemon_in(args: &StartArgs, session: &Session) -> Result<()> {
    // A node's log is named after the daemon's pid, known only after spawning.
    let log = session.log_path(&if args.head {
        "head".to_string()
    } else {
        format!("node-starting-{}", std::process::id())
    });
    // A recovered head adds to the log of the head it replaces.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(args.recover)
        .write(true)
        .truncate(!args.recover)
        .open(&log)
        .with_context(|| format!("creating log {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log file")?;
    let exe = std::env::current_exe().context("finding the shoal executable")?;
    let mut command = Command::new(exe);
    command.args(args_without_token(std::env::args_os().skip(1)));
    // The token goes by environment, not on a command line every local user
    // can read in /proc.
    if let Some(token) = &args.token {
        command.env("SHOAL_TOKEN", token);
    }
    let mut child = command
        .arg("--block")
        .arg("--session-path")
        .arg(&session.dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C at this terminal must not stop it.
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let pid = child.id();
    let log = if args.head {
        log
    } else {
        let named = session.log_path(&format!("node-{pid}"));
        std::fs::rename(&log, &named).map(|()| named).unwrap_or(log)
    };
    let ready = wait_until_ready(args, session, &mut child);
    let (address, token, status) = match ready {
        Ok(found) => found,
        Err(e) => {
            // Leave nothing half-started behind.
            let _ = child.kill();
            let _ = child.wait();
            return Err(NotReady { log, error: e }.into());
        }
    };
    let host = shoal_net::host::host_id();
    let node = status
        .nodes
        .iter()
        .find(|n| n.pid == pid && n.host_id == host && n.state == NodeState::Alive);
    if args.head && args.recover {
        println!("Recovered the Shoal head at {address} (pid {pid})");
        println!("  cluster:  {}", status.cluster_id);
        println!("  session:  {}", session.dir.display());
        println!("  log:      {}", log.display());
        println!("Its nodes join it again as they notice; see: shoal status");
    } else if args.head {
        println!("Started a Shoal head at {address} (pid {pid})");
        println!("  cluster:  {}", status.cluster_id);
        println!("  session:  {}", session.dir.display());
        println!("  log:      {}", log.display());
        println!();
        println!("To add a node to this cluster, run on that machine (the cluster token):");
        println!("    shoal start --address {address} --token {token}");
        println!("On this machine the token is read from the session directory:");
        println!("    shoal start --address {address}");
        println!("Drivers and clients on other machines connect with the driver token,");
        println!("which cannot join a node:");
        println!(
            "    SHOAL_ADDRESS={address} SHOAL_TOKEN={} ./your-program",
            token.driver_token()
        );
        println!("To see the cluster: shoal status");
        println!("To stop it:         shoal stop");
        if let Some(dashboard) = std::fs::read_to_string(session.dashboard_address_path())
            .ok()
            .map(|a| a.trim().to_string())
        {
            println!("The dashboard (this link logs in with the driver token):");
            println!(
                "    http://{dashboard}/login?token={}",
                token.driver_token()
            );
        }
        if let Some(metrics) = node.and_then(|n| n.metrics_address.as_deref()) {
            println!("Prometheus metrics: http://{metrics}/metrics");
        }
    } else {
        let id = node.map(|n| n.node_id.to_string()).unwrap_or_default();
        println!("Started a Shoal node (pid {pid}) that joined {address} as node {id}");
        println!("  log: {}", log.display());
    }
    Ok(())
}

/// Polls the head until the daemon we started shows up ALIVE in its status.
fn wait_until_ready(
    args: &StartArgs,
    session: &Session,
    child: &mut Child,
) -> Result<(String, JoinToken, ClusterStatus)> {
    let pid = child.id();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_error = String::from("not started yet");
    while Instant::now() < deadline {
        if let Some(exit) = child.try_wait().context("checking on the daemon")? {
            bail!("the daemon exited ({exit}) before it was ready");
        }
        let address = match &args.address {
            Some(address) => Some(address.clone()),
            None => session.head_address(),
        };
        let token = resolve_token(args.token.as_deref(), session).ok();
        if let (Some(address), Some(token)) = (address, token) {
            match status::fetch(&address, &token, Duration::from_secs(2)) {
                Ok(status) => {
                    let host = shoal_net::host::host_id();
                    let ours = |n: &&shoal_proto::NodeStatus| {
                        n.pid == pid && n.host_id == host && n.state == NodeState::Alive
                    };
                    if status.nodes.iter().any(|n| ours(&n)) {
                        return Ok((address, token, status));
                    }
                    last_error = "the daemon has not joined yet".into();
                }
                Err(e) => last_error = format!("{e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the daemon did not become ready within {READY_TIMEOUT:?}: {last_error}")
}

/// The arguments without `--token T` or `--token=T`.
fn args_without_token(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match arg.to_str() {
            Some("--token") => skip_next = true,
            Some(a) if a.starts_with("--token=") => {}
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_reaches_the_child_command_line() {
        let args = [
            "start",
            "--address",
            "h:1",
            "--token",
            "secret",
            "--token=also",
            "--block",
        ];
        let kept = args_without_token(args.iter().map(std::ffi::OsString::from));
        let kept: Vec<&str> = kept.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(kept, vec!["start", "--address", "h:1", "--block"]);
    }

    #[test]
    fn resources_json_is_checked() {
        assert!(parse_resources(r#"{"disk": 1}"#).is_ok());
        assert!(parse_resources(r#"{"GPU": 1}"#).is_err(), "--num-gpus");
        assert!(parse_resources("[1]").is_err());
        assert!(parse_resources(r#"{"CPU": 1}"#).is_err());
        assert!(parse_resources(r#"{"memory": 1}"#).is_err());
        assert!(parse_resources(r#"{"GPU": -1}"#).is_err());
    }

    #[test]
    fn worker_port_ranges_are_checked() {
        assert_eq!(
            shoal_node::config::parse_port_range("10002-10999"),
            Ok((10002, 10999))
        );
        assert_eq!(
            shoal_node::config::parse_port_range("7000-7000"),
            Ok((7000, 7000))
        );
        for bad in ["", "7000", "0-10", "9-8", "1-70000", "a-b", "-5"] {
            assert!(
                shoal_node::config::parse_port_range(bad).is_err(),
                "{bad:?} was taken"
            );
        }
    }
}
