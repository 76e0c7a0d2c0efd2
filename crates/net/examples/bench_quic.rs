//! What one node-to-node QUIC connection carries on this machine, two ways,
//! with the node daemons' own TLS (mutual, cluster certificates) and
//! transport limits:
//! - **raw**: the bytes written straight onto streams (one stream per part,
//!   the same parts in flight as a pull) and read off them, no framing;
//! - **pull**: the same parts as `ReadObject` requests answered with
//!   `ObjectChunk` replies through Shoal's RPC layer, the path a node's pull
//!   takes (minus the store files at both ends).
//!
//! Run: `cargo run --release -p shoal-net --example bench_quic -- [MB] [ROUNDS]
//! [PARTS_IN_FLIGHT]` (default 800 MB, 3 rounds, 4 parts in flight).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_net::handshake::{ClientAuth, HandshakeStats, ServerAuth};
use shoal_net::rpc::{serve, Peer, Service};
use shoal_net::{endpoint, tls, ClusterIdentity, NetLimits, Transport};
use shoal_proto::{NodeId, NodeReply, NodeRequest, ObjectId, Role, ServiceError};
use tokio_util::sync::CancellationToken;

/// Size of one part, as in a node's pull.
const PART: usize = 8 << 20;
/// Parts in flight at once by default, as in a node's pull.
const IN_FLIGHT: usize = 4;
const T: Duration = Duration::from_secs(60);
const USAGE: &str = "usage: bench_quic [MB] [ROUNDS] [PARTS_IN_FLIGHT]";

/// Answers `ReadObject` from one buffer in memory.
struct Holder {
    data: bytes::Bytes,
}

impl Service for Holder {
    type Request = NodeRequest;
    type Reply = NodeReply;

    async fn handle(&self, _peer: &Peer, request: NodeRequest) -> Result<NodeReply, ServiceError> {
        match request {
            NodeRequest::ReadObject { offset, len, .. } => {
                let start = offset as usize;
                let end = (start + len as usize).min(self.data.len());
                Ok(NodeReply::ObjectChunk {
                    total: self.data.len() as u64,
                    // Copied, as a node copies a part out of its file.
                    data: self.data[start..end].to_vec().into(),
                })
            }
            _ => Ok(NodeReply::Ok),
        }
    }
}

fn parts(total: usize) -> Vec<(usize, usize)> {
    (0..total.div_ceil(PART))
        .map(|i| (i * PART, PART.min(total - i * PART)))
        .collect()
}

/// A raw server: each stream asks for (offset, len) in 16 bytes and gets
/// those bytes back, written from the buffer without a copy.
async fn serve_raw(
    endpoint: quinn::Endpoint,
    data: bytes::Bytes,
    limits: NetLimits,
    served: Arc<std::sync::OnceLock<quinn::Connection>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let data = data.clone();
        let limits = limits.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            endpoint::grant_full_limits(&conn, &limits);
            let _ = served.set(conn.clone());
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let data = data.clone();
                tokio::spawn(async move {
                    let mut ask = [0u8; 16];
                    if recv.read_exact(&mut ask).await.is_err() {
                        return;
                    }
                    let offset = u64::from_le_bytes(ask[..8].try_into().expect("8 bytes")) as usize;
                    let len = u64::from_le_bytes(ask[8..].try_into().expect("8 bytes")) as usize;
                    let _ = send.write_chunk(data.slice(offset..offset + len)).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
}

/// Fetches `total` bytes in parts, `in_flight` at once, with `fetch`
/// (which returns a part's bytes in pieces), into one buffer; returns
/// GB/s.
async fn round<F, Fut>(total: usize, in_flight: usize, fetch: F) -> f64
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = Vec<bytes::Bytes>> + Send + 'static,
{
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    let mut todo = parts(total).into_iter();
    let mut sink = vec![0u8; total];
    loop {
        while running.len() < in_flight {
            let Some((offset, len)) = todo.next() else {
                break;
            };
            let part = fetch(offset, len);
            running.spawn(async move { (offset, part.await) });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (mut at, pieces) = done.expect("part");
        for piece in pieces {
            sink[at..at + piece.len()].copy_from_slice(&piece);
            at += piece.len();
        }
    }
    std::hint::black_box(&sink);
    total as f64 / start.elapsed().as_secs_f64() / 1e9
}

async fn raw_round(conn: &quinn::Connection, total: usize, in_flight: usize) -> f64 {
    round(total, in_flight, |offset, len| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
            let mut ask = [0u8; 16];
            ask[..8].copy_from_slice(&(offset as u64).to_le_bytes());
            ask[8..].copy_from_slice(&(len as u64).to_le_bytes());
            send.write_all(&ask).await.expect("ask");
            let _ = send.finish();
            let mut pieces = Vec::new();
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
                pieces.push(chunk.bytes);
            }
            pieces
        }
    })
    .await
}

async fn pull_round(
    client: &shoal_net::RpcClient<NodeRequest, NodeReply>,
    total: usize,
    in_flight: usize,
) -> f64 {
    let id = ObjectId::random();
    round(total, in_flight, |offset, len| {
        let client = client.clone();
        async move {
            let read = NodeRequest::ReadObject {
                id,
                offset: offset as u64,
                len: len as u32,
            };
            match client.call(&read, T).await.expect("read a part") {
                NodeReply::ObjectChunk { data, .. } => vec![data.0],
                other => panic!("answered {other:?}"),
            }
        }
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: usize| -> Result<usize, String> {
        args.get(i).map_or(Ok(default), |a| {
            a.parse()
                .map_err(|_| format!("{USAGE} (not a number: {a:?})"))
        })
    };
    let (mb, rounds, in_flight) = match (number(0, 800), number(1, 3), number(2, IN_FLIGHT)) {
        (Ok(mb), Ok(rounds), Ok(in_flight)) if args.len() <= 3 && in_flight > 0 => {
            (mb, rounds, in_flight)
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let total = mb << 20;
    let data = bytes::Bytes::from(vec![7u8; total]);

    let identity = ClusterIdentity::generate()?;
    let limits = NetLimits {
        same_host_sockets: false,
        ..NetLimits::default()
    };
    let ca = identity.ca_cert_der();
    let server_cert = identity.issue_node_cert(NodeId::random())?;
    let client_cert = identity.issue_node_cert(NodeId::random())?;
    let server_endpoint =
        |limits: &NetLimits| -> Result<quinn::Endpoint, Box<dyn std::error::Error>> {
            let config =
                endpoint::server_config(tls::mtls_server_config(&server_cert, &ca)?, limits)?;
            Ok(endpoint::endpoint(
                ([127, 0, 0, 1], 0).into(),
                Some(config),
                limits,
            )?)
        };
    let client_config =
        endpoint::client_config(tls::mtls_client_config(&client_cert, &ca)?, &limits)?;
    let client_endpoint = endpoint::endpoint(([127, 0, 0, 1], 0).into(), None, &limits)?;

    // Raw.
    let raw = server_endpoint(&limits)?;
    let raw_addr: SocketAddr = raw.local_addr()?;
    let served = Arc::new(std::sync::OnceLock::new());
    tokio::spawn(serve_raw(raw, data.clone(), limits.clone(), served.clone()));
    let conn = client_endpoint
        .connect_with(
            endpoint::client_config_to(client_config.clone(), raw_addr, &limits),
            raw_addr,
            shoal_net::NODE_SERVER_NAME,
        )?
        .await?;
    for round in 0..rounds {
        println!(
            "raw QUIC, {mb} MB in {} MiB parts, {in_flight} in flight: round {round}: {:.2} GB/s",
            PART >> 20,
            raw_round(&conn, total, in_flight).await
        );
    }
    if let Some(server) = served.get() {
        let stats = server.stats();
        println!(
            "  the sending side: path MTU {} B, {} datagrams, {} packets lost",
            stats.path.current_mtu, stats.udp_tx.datagrams, stats.path.lost_packets
        );
    }
    conn.close(0u32.into(), b"done");

    // Through the RPC layer, as a pull.
    let rpc = server_endpoint(&limits)?;
    let rpc_addr = rpc.local_addr()?;
    let mut auth = ServerAuth::new(identity.token().clone(), vec![Role::Node]);
    auth.certificate_required = vec![Role::Node];
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        rpc,
        Arc::new(Holder { data }),
        Arc::new(auth),
        limits.clone(),
        Arc::new(HandshakeStats::default()),
        shutdown.clone(),
    ));
    let transport = Transport::quic(
        client_endpoint,
        client_config,
        shoal_net::NODE_SERVER_NAME,
        ClientAuth {
            token: identity.token().clone(),
            role: Role::Node,
        },
        limits,
    );
    let client = transport.connect(rpc_addr).await?;
    for round in 0..rounds {
        println!(
            "ReadObject RPCs, {mb} MB in {} MiB parts, {in_flight} in flight: round {round}: {:.2} GB/s",
            PART >> 20,
            pull_round(&client, total, in_flight).await
        );
    }
    client.close();
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
