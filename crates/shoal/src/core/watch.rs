//! Knowing when the workers this process uses exit: one long poll per node.
//!
//! A leased worker and an actor's worker are watched through their node
//! (`NodeRequest::WatchWorkers`), so a task in flight to a worker that died
//! is retried, and calls to a dead actor fail, at once. One poll per node
//! carries all of this process's workers there: the node answers as soon as
//! any of them exits (with those that have), or after [`POLL`] with none.
//! A poll per worker would hold one request slot of the connection each,
//! and a driver with more than about 1 000 actors on a node filled its
//! connection's request limit (`streams_max`) with polls. A worker added
//! while a poll is out joins the next one, within [`POLL`].
//!
//! The head's word counts too: a node it declared dead (silent past its
//! timeout, or cut off from the head while this process can still reach
//! it) is fenced. This process learns of each death by a long poll of the
//! head (`HeadRequest::WatchNodeDeaths`, started with the first watch), its
//! watches of that node's workers end as if they exited (tasks are retried
//! elsewhere, callers move to the actor's next incarnation), and results
//! that node's workers send later are rejected ([`Watches::is_dead`]).

use shoal_net::sync::MutexExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_proto::{HeadReply, HeadRequest, NodeId, NodeReply, NodeRequest, WorkerId};
use tokio_util::sync::CancellationToken;

use crate::core::Core;

/// The longest one poll waits with no worker exiting.
const POLL: Duration = Duration::from_secs(2);

/// How long the owner waits for one poll's reply.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Consecutive polls without an answer after which the node's workers are
/// taken for dead (it has not answered for minutes).
const UNANSWERED_MAX: u32 = 4;

/// What one poll said.
#[derive(Debug, PartialEq, Eq)]
enum Polled {
    /// These workers exited (none: all running).
    Exited(Vec<WorkerId>),
    /// The node is gone: so are its workers.
    NodeLost,
    /// No answer either way: the poll timed out or the node refused it.
    Unanswered,
}

/// Reads a poll's reply: only the node's word, or the loss of the
/// connection to it (a node's workers end with it), means a worker exited.
/// Taking a timeout for a death made actors "die" by the hundred once
/// polls queued behind a full connection.
fn polled(reply: std::result::Result<NodeReply, shoal_net::RpcError>) -> Polled {
    match reply {
        Ok(NodeReply::WorkersExited { worker_ids }) => Polled::Exited(worker_ids),
        Err(e) if e.is_connection_lost() => Polled::NodeLost,
        Ok(_) | Err(_) => Polled::Unanswered,
    }
}

/// The workers watched on one node: each with the tokens to cancel when
/// it exits (a token cancelled by its holder stops its watch).
#[derive(Default)]
struct NodeWatch {
    workers: Mutex<HashMap<WorkerId, Vec<CancellationToken>>>,
    /// The node id each worker was leased under, where known: a node that
    /// rejoins under a new id keeps its address, and the old id's death
    /// must not end the new id's watches.
    node_ids: Mutex<HashMap<WorkerId, NodeId>>,
}

impl NodeWatch {
    fn workers(&self) -> MutexGuard<'_, HashMap<WorkerId, Vec<CancellationToken>>> {
        self.workers.locked()
    }

    /// Drops watches nobody waits on; the workers still watched.
    fn still_watched(&self) -> Vec<WorkerId> {
        let mut workers = self.workers();
        workers.retain(|_, tokens| {
            tokens.retain(|t| !t.is_cancelled());
            !tokens.is_empty()
        });
        workers.keys().copied().collect()
    }

    /// The workers watched here that may belong to node `node_id`: those
    /// leased under that id, and (unless `known_only`) those whose node id
    /// is not known.
    fn of_node(&self, node_id: NodeId, known_only: bool) -> Vec<WorkerId> {
        let ids = self.node_ids.locked();
        self.workers()
            .keys()
            .filter(|w| match ids.get(w) {
                Some(id) => *id == node_id,
                None => !known_only,
            })
            .copied()
            .collect()
    }

    /// Tells the watchers of `exited` that their worker is gone.
    fn exited(&self, exited: &[WorkerId]) {
        {
            let mut ids = self.node_ids.locked();
            for worker in exited {
                ids.remove(worker);
            }
        }
        let mut workers = self.workers();
        for worker in exited {
            for token in workers.remove(worker).unwrap_or_default() {
                token.cancel();
            }
        }
    }
}

/// Node deaths remembered (ids), at most: beyond it the oldest are
/// forgotten (their late results are long over).
const DEAD_KEPT: usize = 10_000;

/// How long the head may hold one poll for node deaths.
const DEATHS_POLL: Duration = Duration::from_secs(10);

/// This process's watches, by node address.
#[derive(Default)]
pub(crate) struct Watches {
    nodes: Mutex<HashMap<String, Arc<NodeWatch>>>,
    /// Set once the head is being polled for node deaths.
    deaths_watched: std::sync::atomic::AtomicBool,
    /// Nodes the head declared dead, in the order learned.
    dead: Mutex<(
        std::collections::HashSet<NodeId>,
        std::collections::VecDeque<NodeId>,
    )>,
}

impl Watches {
    fn nodes(&self) -> MutexGuard<'_, HashMap<String, Arc<NodeWatch>>> {
        self.nodes.locked()
    }

    /// Cancels `gone` when worker `worker` of the node at `node` exits (or
    /// the node is lost). The watch ends when `gone` is cancelled, by this or
    /// by its holder.
    /// `node_id` is the node's id when known (a lease's): see
    /// [`NodeWatch::node_ids`].
    pub(crate) fn watch(
        &self,
        core: &Arc<Core>,
        node: &str,
        node_id: Option<NodeId>,
        worker: WorkerId,
        gone: CancellationToken,
    ) {
        if !self
            .deaths_watched
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            core.handle.spawn(watch_deaths(Arc::clone(core)));
        }
        if node_id.is_some_and(|id| self.is_dead(id)) {
            gone.cancel();
            return;
        }
        let mut nodes = self.nodes();
        let (watch, first) = match nodes.get(node) {
            Some(watch) => (Arc::clone(watch), false),
            None => {
                let watch = Arc::new(NodeWatch::default());
                nodes.insert(node.to_string(), Arc::clone(&watch));
                (watch, true)
            }
        };
        watch.workers().entry(worker).or_default().push(gone);
        if let Some(id) = node_id {
            watch.node_ids.locked().insert(worker, id);
        }
        drop(nodes);
        if first {
            core.handle
                .spawn(poll_node(Arc::clone(core), node.to_string(), watch));
        }
    }
}

impl Watches {
    /// Whether the head declared node `node_id` dead: its workers' results
    /// are not to be used.
    pub(crate) fn is_dead(&self, node_id: NodeId) -> bool {
        self.dead.locked().0.contains(&node_id)
    }

    /// The head declared node `node_id` (at `address`) dead: its workers are
    /// gone for this process, whatever the node itself may still say. A
    /// death learned late (`old`: from before this process watched, the
    /// head's first answer) ends only watches of that very id: the address
    /// may serve the node's next incarnation by now.
    fn node_died(&self, node_id: NodeId, address: &str, old: bool) {
        {
            let mut dead = self.dead.locked();
            if !dead.0.insert(node_id) {
                return;
            }
            dead.1.push_back(node_id);
            if dead.1.len() > DEAD_KEPT {
                if let Some(old) = dead.1.pop_front() {
                    dead.0.remove(&old);
                }
            }
        }
        let watch = self.nodes().get(address).cloned();
        if let Some(watch) = watch {
            let workers = watch.of_node(node_id, old);
            tracing::warn!(%node_id, %address, workers = workers.len(), "the head declared a node dead; its workers are no longer used");
            watch.exited(&workers);
        }
    }
}

/// Learns of node deaths from the head, for as long as this process runs.
async fn watch_deaths(core: Arc<Core>) {
    let mut after = 0u64;
    while !core.shutdown.is_cancelled() {
        let ask = HeadRequest::WatchNodeDeaths {
            after,
            wait_ms: DEATHS_POLL.as_millis() as u64,
        };
        let reply = tokio::select! {
            reply = core.head.call(&ask, DEATHS_POLL + POLL_TIMEOUT) => reply,
            _ = core.shutdown.cancelled() => return,
        };
        match reply {
            Ok(HeadReply::NodeDeaths { seq, nodes }) => {
                // The first answer lists the deaths the head still keeps,
                // older ones too: a lease granted just before its node
                // died is caught as well, and a dead node is dead for good.
                let old = after == 0;
                for dead in nodes {
                    core.watches.node_died(dead.node_id, &dead.address, old);
                }
                after = seq;
            }
            Ok(other) => {
                tracing::debug!(reply = ?other, "unexpected answer to WatchNodeDeaths");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "watching for node deaths; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Polls one node while any of its workers is watched.
async fn poll_node(core: Arc<Core>, node: String, watch: Arc<NodeWatch>) {
    let mut unanswered = 0;
    loop {
        let workers = watch.still_watched();
        if workers.is_empty() {
            // Under the table's lock, so a watch added meanwhile is seen.
            let mut nodes = core.watches.nodes();
            if watch.still_watched().is_empty() {
                nodes.remove(&node);
                return;
            }
            continue;
        }
        let request = NodeRequest::WatchWorkers {
            worker_ids: workers.clone(),
            wait_ms: POLL.as_millis() as u64,
        };
        // A node that cannot be connected to counts as no answer: a refused
        // connection (the node busy with handshakes) is not a death.
        let said = match core.node(&node).await {
            Ok(client) => polled(client.call(&request, POLL_TIMEOUT).await),
            Err(_) => Polled::Unanswered,
        };
        match said {
            Polled::Exited(exited) => {
                unanswered = 0;
                watch.exited(&exited);
            }
            Polled::NodeLost => watch.exited(&workers),
            Polled::Unanswered => {
                unanswered += 1;
                if unanswered >= UNANSWERED_MAX {
                    watch.exited(&workers);
                    unanswered = 0;
                } else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_net::RpcError;
    use shoal_proto::{ServiceError, ServiceErrorKind};

    #[test]
    fn only_the_nodes_word_or_a_lost_connection_means_workers_exited() {
        let a = WorkerId::random();
        let exited = Ok(NodeReply::WorkersExited {
            worker_ids: vec![a],
        });
        let none = Ok(NodeReply::WorkersExited { worker_ids: vec![] });
        let lost = Err(RpcError::Connection(
            shoal_net::quinn::ConnectionError::Reset,
        ));
        let timed_out = Err(RpcError::Timeout(POLL_TIMEOUT));
        let refused = Err(RpcError::Service(ServiceError::new(
            ServiceErrorKind::Unavailable,
            "busy",
        )));
        assert_eq!(polled(exited), Polled::Exited(vec![a]));
        assert_eq!(polled(none), Polled::Exited(vec![]));
        assert_eq!(polled(lost), Polled::NodeLost);
        assert_eq!(polled(timed_out), Polled::Unanswered);
        assert_eq!(polled(refused), Polled::Unanswered);
        assert_eq!(polled(Ok(NodeReply::Ok)), Polled::Unanswered);
    }

    #[test]
    fn exits_cancel_their_watchers_and_cancelled_watches_are_dropped() {
        let watch = NodeWatch::default();
        let (a, b, c) = (WorkerId::random(), WorkerId::random(), WorkerId::random());
        let (ta1, ta2, tb, tc) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        watch.workers().insert(a, vec![ta1.clone(), ta2.clone()]);
        watch.workers().insert(b, vec![tb.clone()]);
        watch.workers().insert(c, vec![tc.clone()]);
        tc.cancel();
        let mut still = watch.still_watched();
        still.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(still, expected, "c's only watcher left");
        watch.exited(&[a]);
        assert!(ta1.is_cancelled() && ta2.is_cancelled());
        assert!(!tb.is_cancelled());
        assert_eq!(watch.still_watched(), vec![b]);
    }

    #[test]
    fn a_node_declared_dead_ends_the_watches_of_its_workers_only() {
        let watches = Watches::default();
        let watch = Arc::new(NodeWatch::default());
        watches
            .nodes()
            .insert("10.0.0.1:7000".into(), Arc::clone(&watch));
        let (old_id, new_id) = (NodeId::random(), NodeId::random());
        // Leased under the old id, under the new id (the node rejoined at
        // the same address), and an actor's worker (no id known).
        let (a, b, c) = (WorkerId::random(), WorkerId::random(), WorkerId::random());
        let (ta, tb, tc) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        watch.workers().insert(a, vec![ta.clone()]);
        watch.workers().insert(b, vec![tb.clone()]);
        watch.workers().insert(c, vec![tc.clone()]);
        {
            let mut ids = watch.node_ids.lock().expect("unpoisoned");
            ids.insert(a, old_id);
            ids.insert(b, new_id);
        }
        assert!(!watches.is_dead(old_id));
        watches.node_died(old_id, "10.0.0.1:7000", false);
        assert!(watches.is_dead(old_id));
        assert!(ta.is_cancelled(), "leased on the dead node");
        assert!(tc.is_cancelled(), "no id known: taken as the dead node's");
        assert!(!tb.is_cancelled(), "the node's next incarnation is alive");
        assert!(!watches.is_dead(new_id));
    }
}
