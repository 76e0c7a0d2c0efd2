//! The node's Prometheus metrics (exposed by the `shoal` binary at
//! `/metrics`): its object store's use, what it spilled, restored and
//! pulled, its workers, its heartbeats and refused handshakes. Read from
//! the node's own counters when scraped.

use std::sync::atomic::Ordering;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_net::sync::MutexExt;

use crate::NodeHandle;

fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

impl NodeHandle {
    /// Adds the node's metrics, as of now, to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let (used, spilled_now, totals) = {
            let store = self.store.locked();
            (store.used(), store.spilled(), store.spill_totals())
        };
        let metrics: [(&str, &str, Gauge); 4] = [
            (
                "shoal_object_store_used_bytes",
                "Bytes in the node's shared-memory object store",
                gauge(used),
            ),
            (
                "shoal_object_store_capacity_bytes",
                "The node's object store capacity",
                gauge(self.store_capacity),
            ),
            (
                "shoal_object_store_spilled_bytes",
                "Bytes of the node's objects on disk now (spilled)",
                gauge(spilled_now),
            ),
            (
                "shoal_workers",
                "The node's live worker processes (or threads, in local mode)",
                gauge(self.pool.worker_count() as u64),
            ),
        ];
        for (name, help, metric) in metrics {
            registry.register(name, help, metric);
        }
        let counters: [(&str, &str, u64); 9] = [
            (
                "shoal_object_spills",
                "Objects spilled to disk",
                totals.spilled_objects,
            ),
            (
                "shoal_object_spilled_bytes",
                "Bytes spilled to disk",
                totals.spilled_bytes,
            ),
            (
                "shoal_object_restores",
                "Spilled objects restored to memory",
                totals.restored_objects,
            ),
            (
                "shoal_object_restored_bytes",
                "Bytes restored from disk",
                totals.restored_bytes,
            ),
            (
                "shoal_object_pulls",
                "Objects pulled from other nodes",
                self.transfers.pulled(),
            ),
            (
                "shoal_object_pulled_bytes",
                "Bytes pulled from other nodes",
                self.transfers.pulled_bytes(),
            ),
            (
                "shoal_node_heartbeats",
                "Heartbeats the head answered",
                self.heartbeats.load(Ordering::Relaxed),
            ),
            (
                "shoal_node_handshakes_refused",
                "Connections the node refused in the handshake",
                self.stats.refused.load(Ordering::Relaxed),
            ),
            (
                "shoal_node_handshakes_retried",
                "New peers asked to prove their address (a QUIC Retry) while the handshake slots filled",
                self.stats.retried.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            registry.register(name, help, counter(value));
        }
    }
}
