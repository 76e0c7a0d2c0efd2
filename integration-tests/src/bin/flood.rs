//! A handshake flood, for SEC-5: from its own address (127.0.0.2, as from
//! another host), it keeps up to `STUCK` connections per target that finish
//! TLS and never send a `Hello`, and `SLOW` more that send their `Hello` a
//! byte at a time, opening new ones as the targets drop them, until
//! `SECONDS` have passed. Then it prints one line of JSON: connections
//! established, refused and dropped by the targets.
//!
//! Run: `flood SECONDS STUCK SLOW ADDR...`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_net::quinn;
use shoal_net::{endpoint, tls, NetLimits, HEAD_SERVER_NAME};

const USAGE: &str = "usage: flood SECONDS STUCK SLOW ADDR...";
/// New connections opened per target per tick, at most.
const OPENED_PER_TICK: usize = 5;
const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Counts {
    established: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
}

/// Holds one connection as long as the target keeps it: silent, or
/// writing a `Hello`-sized frame one byte every 200 ms.
async fn hold(
    ep: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    slow: bool,
    until: Instant,
    counts: Arc<Counts>,
) {
    let connecting = match ep.connect_with(config, addr, HEAD_SERVER_NAME) {
        Ok(c) => c,
        Err(_) => {
            counts.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(conn)) => conn,
        _ => {
            counts.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    counts.established.fetch_add(1, Ordering::Relaxed);
    let trickle = async {
        let Ok((mut send, _recv)) = conn.open_bi().await else {
            return;
        };
        // A length prefix claiming a small frame, then its bytes, slowly.
        let mut bytes = vec![0, 0, 0, 200];
        bytes.extend(std::iter::repeat_n(0xc0u8, 200));
        for b in bytes {
            if send.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::future::pending::<()>().await
    };
    let deadline = tokio::time::sleep_until(until.into());
    tokio::select! {
        _ = conn.closed() => {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
        _ = deadline => {}
        _ = async { if slow { trickle.await } else { std::future::pending().await } } => {}
    }
    conn.close(0u32.into(), b"done");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let numbers: Vec<Option<u64>> = args.iter().take(3).map(|a| a.parse().ok()).collect();
    let (Some(&Some(seconds)), Some(&Some(stuck)), Some(&Some(slow))) =
        (numbers.first(), numbers.get(1), numbers.get(2))
    else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let targets: Result<Vec<SocketAddr>, _> = args[3..].iter().map(|a| a.parse()).collect();
    let targets = match targets {
        Ok(t) if !t.is_empty() => t,
        _ => {
            eprintln!("{USAGE} (ADDR is ip:port)");
            std::process::exit(2);
        }
    };
    let limits = NetLimits::default();
    let config = match tls::token_client_config()
        .map_err(|e| e.to_string())
        .and_then(|t| endpoint::client_config(t, &limits).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flood: {e}");
            std::process::exit(1);
        }
    };
    let ep = match endpoint::endpoint(([127, 0, 0, 2], 0).into(), None, &limits) {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("flood: cannot bind 127.0.0.2: {e}");
            std::process::exit(1);
        }
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    let counts = Arc::new(Counts::default());
    // Per target: how many of each kind are held now.
    let held: Vec<(Arc<AtomicU64>, Arc<AtomicU64>)> =
        targets.iter().map(|_| Default::default()).collect();
    let mut ticks = tokio::time::interval(TICK);
    while Instant::now() < until {
        ticks.tick().await;
        for (addr, (stuck_held, slow_held)) in targets.iter().zip(&held) {
            for (count, want, is_slow) in [(stuck_held, stuck, false), (slow_held, slow, true)] {
                let room = want.saturating_sub(count.load(Ordering::Relaxed)) as usize;
                for _ in 0..room.min(OPENED_PER_TICK) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let (ep, config, addr, counts, count) = (
                        ep.clone(),
                        config.clone(),
                        *addr,
                        counts.clone(),
                        count.clone(),
                    );
                    tokio::spawn(async move {
                        hold(ep, config, addr, is_slow, until, counts).await;
                        count.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        }
    }
    println!(
        "{{\"established\": {}, \"refused\": {}, \"dropped\": {}}}",
        counts.established.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.dropped.load(Ordering::Relaxed)
    );
    ep.close(0u32.into(), b"done");
}
