//! Measures what one task costs: the round trip of one small task (p50, p99)
//! and the rate of 10 000 no-op tasks submitted at once, next to the floor
//! they sit on: a bare request/reply over Shoal's transport on loopback, QUIC
//! and the same-host Unix socket that processes of one host use.
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_tasks`
//! (on a cluster: prefix `SHOAL_ADDRESS=host:port`; `--floor-only` skips tasks)

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::{endpoint, tls, ClusterIdentity, NetLimits, Peer, RpcClient, Service, Transport};
use shoal_proto::{Role, ServiceError};
use tokio_util::sync::CancellationToken;

#[shoal::remote]
fn noop(i: u32) -> u32 {
    i
}

/// An actor whose method does nothing: the cost of a call.
#[shoal::actor]
#[derive(Default)]
pub struct Echoer {
    calls: u64,
}

#[shoal::actor]
impl Echoer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn echo(&mut self, i: u32) -> u32 {
        self.calls += 1;
        i
    }

    pub async fn echo_async(&self, i: u32) -> u32 {
        i
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what:<44} p50 {:>8.1?}  p99 {:>8.1?}  ({} samples)",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.len()
    );
}

#[derive(Serialize, Deserialize)]
struct Ping(u32);

struct Echo;

impl Service for Echo {
    type Request = Ping;
    type Reply = u32;

    async fn handle(&self, _peer: &Peer, request: Ping) -> Result<u32, ServiceError> {
        Ok(request.0)
    }
}

/// A bare request/reply on loopback, over QUIC or (`same_host`) the Unix
/// socket beside it.
fn floor(
    same_host: bool,
    round_trips: usize,
    batch: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let via = if same_host { "Unix socket" } else { "QUIC" };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let identity = ClusterIdentity::generate()?;
        let limits = NetLimits {
            same_host_sockets: same_host,
            ..NetLimits::default()
        };
        let cert = identity.issue_head_cert()?;
        let server = endpoint::server_config(tls::server_config(&cert)?, &limits)?;
        let ep = endpoint::endpoint(([127, 0, 0, 1], 0).into(), Some(server), &limits)?;
        let addr = ep.local_addr()?;
        let stop = CancellationToken::new();
        let auth = Arc::new(ServerAuth::new(
            identity.token().clone(),
            vec![Role::Driver],
        ));
        let serving = tokio::spawn(shoal_net::rpc::serve(
            ep,
            Arc::new(Echo),
            auth,
            limits.clone(),
            Arc::new(HandshakeStats::default()),
            stop.clone(),
        ));
        let transport = Transport::token_client(
            ClientAuth {
                token: identity.token().clone(),
                role: Role::Driver,
            },
            shoal_net::HEAD_SERVER_NAME,
            limits,
        )?;
        let client: RpcClient<Ping, u32> = transport.connect(addr).await?;
        assert_eq!(client.is_same_host(), same_host, "{client:?}");
        let timeout = Duration::from_secs(10);
        for i in 0..200 {
            client.call(&Ping(i), timeout).await?;
        }
        let mut samples = Vec::with_capacity(round_trips);
        for i in 0..round_trips {
            let start = Instant::now();
            client.call(&Ping(i as u32), timeout).await?;
            samples.push(start.elapsed());
        }
        report(&format!("bare {via} request/reply (floor)"), samples);
        let start = Instant::now();
        let mut handles = Vec::new();
        for i in 0..batch {
            let client = client.clone();
            handles.push(tokio::spawn(async move {
                client.call(&Ping(i as u32), timeout).await
            }));
        }
        for h in handles {
            h.await??;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:<44} {:>10.0} per second",
            format!("bare {via}, {batch} requests at once"),
            batch as f64 / secs
        );
        client.close();
        stop.cancel();
        let _ = serving.await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let floor_only = std::env::args().any(|a| a == "--floor-only");
    if !floor_only {
        let _shoal = shoal::init(shoal::Config::from_env())?;
        let mode = if std::env::var("SHOAL_ADDRESS").is_ok() {
            "cluster"
        } else {
            "local"
        };
        let mode =
            if mode == "local" && std::env::var("SHOAL_WORKER_PROCESSES").is_ok_and(|v| v == "1") {
                "local, worker processes"
            } else {
                mode
            };
        // Warm up: workers started, leases held.
        shoal::get_all(&(0..200).map(noop::remote).collect::<Vec<_>>())?;
        let mut samples = Vec::new();
        for i in 0..2000 {
            let start = Instant::now();
            noop::remote(i).get()?;
            samples.push(start.elapsed());
        }
        report(&format!("one small task, submit and get ({mode})"), samples);
        for round in 0..3 {
            let start = Instant::now();
            let refs: Vec<_> = (0..10_000).map(noop::remote).collect();
            shoal::get_all(&refs)?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{:<44} {:>10.0} per second",
                format!("10 000 no-op tasks at once, round {round} ({mode})"),
                10_000.0 / secs
            );
        }
        let actor = Echoer::remote()?;
        shoal::get_all(&(0..200).map(|i| actor.echo(i)).collect::<Vec<_>>())?;
        let mut samples = Vec::new();
        for i in 0..2000 {
            let start = Instant::now();
            actor.echo(i).get()?;
            samples.push(start.elapsed());
        }
        let total: Duration = samples.iter().sum();
        println!(
            "{:<44} {:>10.0} per second",
            format!("1:1 actor calls sync ({mode})"),
            2000.0 / total.as_secs_f64()
        );
        report(&format!("one actor call, call and get ({mode})"), samples);
        for (what, asynchronous) in [
            ("1:1 actor calls async", false),
            ("1:1 async-actor calls async", true),
        ] {
            for round in 0..3 {
                let start = Instant::now();
                let refs: Vec<_> = (0..1000)
                    .map(|i| {
                        if asynchronous {
                            actor.echo_async(i)
                        } else {
                            actor.echo(i)
                        }
                    })
                    .collect();
                shoal::get_all(&refs)?;
                let secs = start.elapsed().as_secs_f64();
                println!(
                    "{:<44} {:>10.0} per second",
                    format!("{what}, round {round} ({mode})"),
                    1000.0 / secs
                );
            }
        }
    }
    floor(false, 5000, 10_000)?;
    floor(true, 5000, 10_000)
}
