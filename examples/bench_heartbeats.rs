//! Measures a head serving many nodes' heartbeats: N simulated nodes, each
//! with its own QUIC connection to the head, join (`RegisterNode`) and then
//! heartbeat at the interval the head hands out (1 s by default), as a node
//! daemon's head link does, for a while. Reports the time to register them
//! all, heartbeats served per second, heartbeat round trips (p50/p99/max),
//! nodes the head declared dead (should be 0), and the head's CPU use and
//! resident memory.
//!
//! The head runs in a child process (this executable re-run with
//! `--serve-head`: a `LocalCluster`, so a head plus its own node daemon,
//! which adds one node), so its CPU time and memory are read from
//! `/proc/<pid>` apart from the simulated nodes'. The nodes share
//! `NODES_PER_ENDPOINT` to a client endpoint (a UDP socket); a real node
//! has one of its own. Like a node, a simulated node retries a refused
//! connection with backoff (the head takes 64 handshakes at once).
//!
//! Simulated nodes connect as `Role::Node`, which always takes QUIC (node
//! daemons never use the same-host Unix socket), as nodes on other machines
//! would; the program also sets `SHOAL_LOCAL_SOCKETS=0` unless it is set
//! already, and prints the head's open sockets to show the path taken (a
//! handful over QUIC, about one per node over Unix sockets).
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_heartbeats --
//! [NODES] [SECONDS] [NODES_PER_ENDPOINT]` (defaults 1000, 30, 1).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_net::handshake::ClientAuth;
use shoal_net::{JoinToken, NetLimits, Transport, HEAD_SERVER_NAME};
use shoal_proto::head::RegisterNode;
use shoal_proto::{HeadReply, HeadRequest, NodeState, ResourceSet, Role};
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Deadline of one request to the head, as a node's (`HEAD_REQUEST_TIMEOUT`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for every node to register.
const REGISTER_DEADLINE: Duration = Duration::from_secs(120);
/// Linux reports CPU times in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

fn main() -> Result<(), Error> {
    if std::env::var_os("SHOAL_LOCAL_SOCKETS").is_none() {
        std::env::set_var("SHOAL_LOCAL_SOCKETS", "0");
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-head") {
        return serve_head();
    }
    let arg = |i: usize, default: u64| -> Result<u64, Error> {
        match args.get(i) {
            None => Ok(default),
            Some(a) => a.parse().map_err(|_| {
                format!(
                    "argument {i} ({a:?}) is not a whole number; \
                     usage: bench_heartbeats [NODES] [SECONDS] [NODES_PER_ENDPOINT]"
                )
                .into()
            }),
        }
    };
    let nodes = arg(1, 1000)? as usize;
    let seconds = arg(2, 30)?;
    let per_endpoint = arg(3, 1)?.max(1) as usize;

    let mut head = Command::new(std::env::current_exe()?)
        .arg("--serve-head")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let head_pid = head.id();
    let mut line = String::new();
    std::io::BufReader::new(head.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (Some(addr), Some(token)) = (words.next(), words.next()) else {
        return Err(format!("the head process said {line:?}").into());
    };
    let addr: SocketAddr = addr.parse()?;
    let token: JoinToken = token.parse()?;
    println!(
        "head pid {head_pid} at {addr}; {nodes} simulated nodes, {} client endpoints, {seconds} s of heartbeats",
        nodes.div_ceil(per_endpoint)
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(simulate(
        addr,
        token,
        nodes,
        per_endpoint,
        Duration::from_secs(seconds),
        head_pid,
    ));
    // Closing its stdin stops the head; kill it if it lingers.
    drop(head.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while head.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if head.try_wait()?.is_none() {
        eprintln!("the head did not stop within 10 s; killing it");
        head.kill()?;
        head.wait()?;
    }
    result
}

/// The child: a head (and its node daemon) until stdin closes.
fn serve_head() -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = shoal::LocalConfig {
            head_node_cpus: 1.0,
            ..shoal::LocalConfig::default()
        };
        let cluster = shoal::LocalCluster::start(config).await?;
        println!("{} {}", cluster.address(), cluster.token());
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await??;
        cluster.shutdown().await;
        Ok(())
    })
}

/// What one simulated node saw.
#[derive(Default)]
struct NodeLog {
    registered_after: Option<Duration>,
    /// Round trips of heartbeats sent inside the measured window.
    round_trips: Vec<Duration>,
    failures: u64,
    fenced: u64,
}

#[derive(Default)]
struct Counters {
    registered: AtomicU64,
    refused_connects: AtomicU64,
}

async fn simulate(
    addr: SocketAddr,
    token: JoinToken,
    nodes: usize,
    per_endpoint: usize,
    duration: Duration,
    head_pid: u32,
) -> Result<(), Error> {
    let idle = (cpu_ticks(head_pid), resident(head_pid));
    let mut transports = Vec::new();
    for _ in 0..nodes.div_ceil(per_endpoint) {
        let auth = ClientAuth {
            token: token.clone(),
            role: Role::Node,
        };
        transports.push(Transport::token_client(
            auth,
            HEAD_SERVER_NAME,
            NetLimits::default(),
        )?);
    }
    let counters = Arc::new(Counters::default());
    // Heartbeats sent between `window.0` and `window.1` are measured.
    let (window_tx, window_rx) = tokio::sync::watch::channel(None::<(Instant, Instant)>);
    let stop = CancellationToken::new();
    let start = Instant::now();
    let tasks: Vec<_> = (0..nodes)
        .map(|i| {
            tokio::spawn(node(
                i,
                transports[i / per_endpoint].clone(),
                addr,
                start,
                counters.clone(),
                window_rx.clone(),
                stop.clone(),
            ))
        })
        .collect();

    while (counters.registered.load(Ordering::Relaxed) as usize) < nodes
        && start.elapsed() < REGISTER_DEADLINE
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let registered_in = start.elapsed();
    let after_register = cpu_ticks(head_pid);
    let registered = counters.registered.load(Ordering::Relaxed);
    println!(
        "registered {registered}/{nodes} nodes in {registered_in:.2?} ({} connections refused and retried); head used {:.2} CPU-s for it",
        counters.refused_connects.load(Ordering::Relaxed),
        (after_register - idle.0) as f64 / TICKS_PER_SECOND,
    );

    // Let the registration burst settle into steady heartbeats, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = Instant::now();
    let before = (cpu_ticks(head_pid), machine_ticks(), own_ticks());
    window_tx.send_replace(Some((from, from + duration)));
    tokio::time::sleep(duration).await;
    let after = (cpu_ticks(head_pid), machine_ticks(), own_ticks());
    let elapsed = from.elapsed().as_secs_f64();
    let head_rss = resident(head_pid);
    let head_sockets = std::fs::read_dir(format!("/proc/{head_pid}/fd")).map_or(0, |d| {
        d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    });
    stop.cancel();

    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await?);
    }
    let mut rtts: Vec<Duration> = logs.iter().flat_map(|l| l.round_trips.clone()).collect();
    rtts.sort();
    let failures: u64 = logs.iter().map(|l| l.failures).sum();
    let fenced: u64 = logs.iter().map(|l| l.fenced).sum();
    let slowest_join = logs.iter().filter_map(|l| l.registered_after).max();
    let pct = |p: f64| {
        rtts.get(((rtts.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "heartbeats: {} in {elapsed:.1} s = {:.0}/s; round trip p50 {:.2?} p99 {:.2?} max {:.2?}; {failures} requests failed, {fenced} answered NodeFenced",
        rtts.len(),
        rtts.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
    let head_cpu = (after.0 - before.0) as f64 / TICKS_PER_SECOND / elapsed;
    let own_cpu = (after.2 - before.2) as f64 / TICKS_PER_SECOND / elapsed;
    let (busy, total) = (after.1 .0 - before.1 .0, after.1 .1 - before.1 .1);
    println!(
        "head process: {:.1}% of one core while heartbeating ({:.1} us CPU per heartbeat); resident {} MiB idle -> {} MiB with the nodes (peak {} MiB); {head_sockets} open sockets",
        head_cpu * 100.0,
        head_cpu * 1e6 * elapsed / (rtts.len().max(1) as f64),
        idle.1 .0 >> 20,
        head_rss.0 >> 20,
        head_rss.1 >> 20,
    );
    println!(
        "simulated nodes' process: {:.1}% of one core; whole machine {:.1}% busy of {} cores (slowest join {:.2?})",
        own_cpu * 100.0,
        busy as f64 * 100.0 / total.max(1) as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        slowest_join.unwrap_or_default(),
    );

    let client = shoal::ClusterClient::connect(addr, token, Role::Client).await?;
    let status = client.status().await?;
    client.close().await;
    let dead = status
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Dead)
        .count();
    println!(
        "head's table: {} nodes, {} alive, {dead} declared dead (the head's own node included)",
        status.nodes.len(),
        status.nodes.len() - dead,
    );
    for endpoint in transports.iter().filter_map(|t| t.endpoint()) {
        endpoint.close(0u32.into(), b"done");
    }
    Ok(())
}

/// One simulated node: connect (retrying), register, heartbeat until `stop`.
async fn node(
    i: usize,
    transport: Transport,
    addr: SocketAddr,
    start: Instant,
    counters: Arc<Counters>,
    window: tokio::sync::watch::Receiver<Option<(Instant, Instant)>>,
    stop: CancellationToken,
) -> NodeLog {
    let mut log = NodeLog::default();
    let mut backoff = Duration::from_millis(50);
    let head = loop {
        match transport.connect::<HeadRequest, HeadReply>(addr).await {
            Ok(head) => break head,
            Err(_) if !stop.is_cancelled() => {
                counters.refused_connects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(_) => return log,
        }
    };
    let mut resources = ResourceSet::new();
    resources.set(shoal_proto::resources::CPU, 8.0);
    resources.set(shoal_proto::resources::MEMORY, 32.0 * (1u64 << 30) as f64);
    let register = HeadRequest::RegisterNode(RegisterNode {
        address: format!("127.0.0.1:{}", 20_000 + i),
        pid: std::process::id(),
        hostname: format!("sim-{i}"),
        host_id: format!("sim-{i}"),
        resources_total: resources.clone(),
        is_head_node: false,
        registration_key: ((i as u64) << 1) | 1,
        object_store_capacity_bytes: 1 << 30,
        metrics_address: None,
        labels: Default::default(),
    });
    let (node_id, interval) = loop {
        match head.call(&register, REQUEST_TIMEOUT).await {
            Ok(HeadReply::NodeRegistered(r)) => {
                break (
                    r.node_id,
                    Duration::from_millis(r.heartbeat_interval_ms.max(10)),
                )
            }
            _ if stop.is_cancelled() => return log,
            _ => {
                log.failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    log.registered_after = Some(start.elapsed());
    counters.registered.fetch_add(1, Ordering::Relaxed);
    let beat = HeadRequest::idle_heartbeat(node_id, resources);
    while !stop.is_cancelled() {
        let sent = Instant::now();
        let reply = head.call(&beat, REQUEST_TIMEOUT).await;
        let rtt = sent.elapsed();
        match reply {
            Ok(HeadReply::HeartbeatAck { .. }) => {
                if let Some((from, to)) = *window.borrow() {
                    if sent >= from && sent < to {
                        log.round_trips.push(rtt);
                    }
                }
            }
            Ok(HeadReply::NodeFenced { .. }) => log.fenced += 1,
            _ => log.failures += 1,
        }
        // A node sleeps the interval after each reply.
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
    head.close();
    log
}

/// utime + stime of a process, in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)
}

fn own_ticks() -> u64 {
    cpu_ticks(std::process::id())
}

/// (busy, total) ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = cpu.iter().sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// (resident, peak resident) bytes of a process, from `/proc/<pid>/status`.
fn resident(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}
