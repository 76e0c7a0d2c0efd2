//! The `/metrics` endpoint of a head or node process: the Prometheus text
//! format (0.0.4), encoded by `prometheus-client` from the head's and the
//! node's registries at each scrape.
//!
//! Read-only and unauthenticated, as Prometheus scrapes: it shows counts,
//! never ids, names or values, and changes nothing.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::registry::Registry;
use shoal_net::http::{Handler, Request, Response};
use tokio::net::TcpListener;

/// The head's metrics port unless `--metrics-port` says otherwise (the port
/// of the OpenTelemetry Prometheus exporter). Taken, a free one is used.
pub const HEAD_PORT: u16 = 9464;

/// The HTTP listener for a `--*-port` flag (`flag`), else `default` (none:
/// a free port), on `ip` (none: every interface); `Some(0)` turns it off.
/// A port that is taken falls back to a free one, so several daemons can
/// share a host. `what` names it in errors.
pub async fn listen(
    ip: Option<IpAddr>,
    flag: Option<u16>,
    default: Option<u16>,
    what: &str,
) -> Result<Option<TcpListener>> {
    let port = match flag {
        Some(0) => return Ok(None),
        Some(port) => port,
        None => default.unwrap_or(0),
    };
    let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let listener = shoal_net::http::bind(ip, port, true)
        .await
        .with_context(|| format!("binding the {what} port on {ip}"))?;
    Ok(Some(listener))
}

/// Serves `GET /metrics` from what `fill` registers at each scrape.
pub fn handler(fill: impl Fn(&mut Registry) + Send + Sync + 'static) -> Handler {
    Arc::new(move |request: Request| {
        if request.path != "/metrics" {
            return Response::text(404, "only /metrics is served here\n");
        }
        if request.method != "GET" && request.method != "HEAD" {
            return Response::text(405, "GET /metrics\n");
        }
        let mut registry = Registry::default();
        fill(&mut registry);
        let mut text = String::new();
        match encode(&mut text, &registry) {
            Ok(()) => Response::new(200, CONTENT_TYPE, text),
            Err(e) => Response::text(500, format!("encoding the metrics failed: {e}\n")),
        }
    })
}
