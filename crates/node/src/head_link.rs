//! The node's link to the head: join, heartbeat, reconnect.
//!
//! One loop owns the connection. It (re)connects with capped exponential
//! backoff, registers when it has no id, and heartbeats every interval. A lost
//! connection is replaced and the old id tried again first: if the head still
//! knows it (a network blip) nothing changes. A head that restarted and
//! recovered its tables answers `RejoinAsked`: the node tells it the leases,
//! workers and objects it kept through the outage and keeps its id and
//! work. A head that declared the node dead (or never knew it) answers
//! `NodeFenced`: the node stops its work and registers again under a new
//! id, as the design requires.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use shoal_net::handshake::ServerAuth;
use shoal_net::sync::MutexExt;
use shoal_net::{endpoint, tls, ConnectError, IssuedCert, RpcError, Transport};
use shoal_proto::head::{NodeRegistered, RegisterNode, RestartActor};
use shoal_proto::{HeadReply, HeadRequest, NodeId, ResourceSet, WorkerReply, WorkerRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::NodeConfig;

use crate::HeadClient;

/// Consecutive failed heartbeats after which the connection is replaced.
const FAILURES_BEFORE_RECONNECT: u32 = 2;

pub(crate) struct HeadLink<'a> {
    pub config: &'a NodeConfig,
    pub token: &'a shoal_net::JoinToken,
    pub transport: &'a Transport,
    pub resources: &'a ResourceSet,
    pub advertised: SocketAddr,
    pub server: &'a shoal_net::quinn::Endpoint,
    pub auth: &'a Arc<ServerAuth>,
    pub node_id: &'a watch::Sender<Option<NodeId>>,
    pub head: &'a watch::Sender<Option<HeadClient>>,
    pub pool: &'a Arc<crate::worker_pool::WorkerPool>,
    pub store: &'a Arc<std::sync::Mutex<crate::object_store::ObjectStore>>,
    pub store_capacity: u64,
    pub peer_config: &'a watch::Sender<Option<shoal_net::quinn::ClientConfig>>,
    pub transfers: &'a Arc<crate::transfer::Transfers>,
    /// Heartbeats answered, for metrics.
    pub heartbeats: &'a std::sync::atomic::AtomicU64,
}

impl HeadLink<'_> {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut client: Option<HeadClient> = None;
        let mut interval = crate::config::defaults::HEARTBEAT_INTERVAL;
        let mut backoff = Backoff::new(self.config.reconnect_backoff_max);
        let mut failures = 0u32;
        // Same key for every retry of one registration, so a lost reply does
        // not make a phantom second node; a new key once fenced.
        let mut registration_key = new_key();
        // The head sends its orders until acknowledged; each is acted on
        // once (a restart order may arrive again if our acknowledgment was
        // lost).
        let mut orders_acked = 0u64;
        let mut restarts_seen = Seen::default();
        // The connection is handed to the rest of the node (workers
        // blocking leases, actor restarts) only once the head has bound it
        // to this node: before, the head refuses what it carries for the
        // node.
        let mut published = false;
        while !shutdown.is_cancelled() {
            let Some(head) = client.clone() else {
                let Some(connected) = shutdown.run_until_cancelled(self.connect()).await else {
                    break;
                };
                match connected {
                    Ok(c) => {
                        debug!(head = %c.remote_address(), "connected to head");
                        client = Some(c);
                        published = false;
                        failures = 0;
                    }
                    Err(e) => {
                        backoff.log_and_wait(&e, &shutdown).await;
                    }
                }
                continue;
            };
            let current = *self.node_id.borrow();
            let Some(node_id) = current else {
                let Some(registered) = shutdown
                    .run_until_cancelled(self.register(&head, registration_key))
                    .await
                else {
                    break;
                };
                match registered {
                    Ok((registered, ip)) => {
                        interval = Duration::from_millis(registered.heartbeat_interval_ms.max(10));
                        self.apply(registered, ip);
                        self.head.send_replace(Some(head.clone()));
                        published = true;
                        backoff.reset();
                    }
                    Err(e) => {
                        if e.is_connection_lost() {
                            client = None;
                        }
                        backoff.log_and_wait(&e, &shutdown).await;
                    }
                }
                continue;
            };
            self.pool.reap_idle();
            let dead_workers = self.pool.take_dead();
            let orphaned = self.store().delete_owned_by(&dead_workers);
            if orphaned > 0 {
                debug!(objects = orphaned, "freed objects whose owner died");
            }
            let object_changes = self.store().take_changes();
            let beat = HeadRequest::Heartbeat {
                node_id,
                resources_available: self.pool.available(),
                jobs: self.pool.jobs(),
                dead_workers: dead_workers.clone(),
                object_store_used_bytes: self.store_used(),
                object_changes: object_changes.clone(),
                objects_pulled: self.transfers.pulled(),
                orders_acked,
                // Binds a replaced connection to this node.
                registration_key,
            };
            let Some(reply) = shutdown
                .run_until_cancelled(head.call(&beat, self.config.head_request_timeout))
                .await
            else {
                break;
            };
            match reply {
                Ok(HeadReply::HeartbeatAck {
                    finished_jobs,
                    restart_actors,
                    delete_objects,
                    release_leases,
                    orders_seq,
                }) => {
                    self.heartbeats
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    failures = 0;
                    if !published {
                        self.head.send_replace(Some(head.clone()));
                        published = true;
                    }
                    orders_acked = orders_seq;
                    // Their owners died: the workers work for no one.
                    for lease_id in release_leases {
                        self.pool.release(lease_id, true);
                    }
                    self.store().delete_copies(&delete_objects);
                    if !finished_jobs.is_empty() {
                        info!(jobs = ?finished_jobs, "jobs finished; stopping their workers");
                        self.pool.finish_jobs(&finished_jobs);
                    }
                    for order in restart_actors {
                        if !restarts_seen.first(order.actor_id, order.incarnation) {
                            continue;
                        }
                        tokio::spawn(restart_actor(
                            order,
                            node_id,
                            head.clone(),
                            self.transport.clone(),
                            self.pool.clone(),
                        ));
                    }
                }
                Ok(HeadReply::RejoinAsked { .. }) => {
                    // Reported again after the rejoin (the head took
                    // nothing from this heartbeat).
                    self.pool.requeue_dead(dead_workers);
                    info!(%node_id, "the head restarted; joining it again as the same node, with the workers, leases and objects kept");
                    let Some(rejoined) = shutdown
                        .run_until_cancelled(self.rejoin(&head, node_id, registration_key))
                        .await
                    else {
                        break;
                    };
                    match rejoined {
                        Ok(Some((registered, ip))) => {
                            interval =
                                Duration::from_millis(registered.heartbeat_interval_ms.max(10));
                            self.apply(registered, ip);
                            self.head.send_replace(Some(head.clone()));
                            published = true;
                            // The new head numbers its orders from zero.
                            orders_acked = 0;
                            backoff.reset();
                        }
                        Ok(None) => {
                            warn!(%node_id, "the restarted head refused this node's id; stopping every worker and joining as a new node");
                            self.fence();
                            registration_key = new_key();
                            orders_acked = 0;
                            restarts_seen = Seen::default();
                        }
                        Err(e) => {
                            if e.is_connection_lost() {
                                client = None;
                            }
                            backoff.log_and_wait(&e, &shutdown).await;
                        }
                    }
                    continue;
                }
                Ok(HeadReply::NodeFenced { .. }) => {
                    warn!(%node_id, "the head does not know this node (it restarted, or declared it dead); stopping every worker and freeing every object, then joining again as a new node");
                    // Fenced: the head has placed this node's work elsewhere
                    // (restarted its actors, retried its tasks), so nothing
                    // of it may go on: never two live instances of an actor.
                    self.fence();
                    registration_key = new_key();
                    orders_acked = 0;
                    restarts_seen = Seen::default();
                    continue;
                }
                Ok(other) => warn!(reply = ?other, "unexpected reply to a heartbeat"),
                Err(e) => {
                    // Report them again with the next heartbeat.
                    self.pool.requeue_dead(dead_workers);
                    self.store().requeue_changes(object_changes);
                    failures += 1;
                    warn!(error = %e, failures, "heartbeat failed");
                    if e.is_connection_lost() || failures >= FAILURES_BEFORE_RECONNECT {
                        head.close();
                        client = None;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        self.leave(client, registration_key).await;
    }

    /// Ends everything this node ran under its old id, before it rejoins.
    fn fence(&self) {
        let workers = self.pool.worker_count();
        // Their exits are reported with the next heartbeats, so the leases
        // they held as owners elsewhere are reclaimed.
        self.pool.stop_all();
        let objects = self.store().clear();
        info!(
            workers,
            objects, "fenced: stopped the workers and freed the objects of the old node"
        );
        self.node_id.send_replace(None);
    }

    fn store(&self) -> std::sync::MutexGuard<'_, crate::object_store::ObjectStore> {
        self.store.locked()
    }

    fn store_used(&self) -> u64 {
        self.store().used()
    }

    async fn connect(&self) -> Result<HeadClient, ConnectError> {
        let addr = shoal_net::host::resolve(&self.config.head_address).await?;
        self.transport.connect(addr).await
    }

    /// The node's labels: its own and its host's name (a name that is no
    /// label value is left out).
    fn labels(&self) -> shoal_proto::placement::Labels {
        use shoal_proto::placement::{check_labels, HOSTNAME_LABEL};
        let mut labels = self.config.labels.clone();
        let mut host = labels.clone();
        host.insert(HOSTNAME_LABEL.into(), shoal_net::host::hostname());
        if check_labels(&host).is_ok() {
            labels = host;
        }
        labels
    }

    /// What this node registers with.
    fn describe(&self, head: &HeadClient, registration_key: u64) -> (RegisterNode, IpAddr) {
        // The host's advertised IP (shoal_net::host): never the loopback
        // address a head on this host is reached on.
        let ip = shoal_net::host::advertised_ip(self.config.node_ip, Some(head.remote_address()));
        let node = RegisterNode {
            address: SocketAddr::new(ip, self.advertised.port()).to_string(),
            pid: std::process::id(),
            hostname: shoal_net::host::hostname(),
            host_id: shoal_net::host::host_id().to_string(),
            resources_total: self.resources.clone(),
            is_head_node: self.config.is_head_node,
            registration_key,
            object_store_capacity_bytes: self.store_capacity,
            metrics_address: self
                .config
                .metrics_port
                .map(|port| SocketAddr::new(ip, port).to_string()),
            labels: self.labels(),
        };
        (node, ip)
    }

    async fn register(
        &self,
        head: &HeadClient,
        registration_key: u64,
    ) -> Result<(NodeRegistered, IpAddr), RpcError> {
        let (node, ip) = self.describe(head, registration_key);
        let request = HeadRequest::RegisterNode(node);
        match head
            .call_idempotent(&request, self.config.head_request_timeout)
            .await?
        {
            HeadReply::NodeRegistered(registered) => Ok((registered, ip)),
            other => Err(RpcError::Stream(format!(
                "unexpected reply to registration: {other:?}"
            ))),
        }
    }

    /// Joins a restarted head again under `node_id`, with the leases,
    /// workers and objects this node kept. `Ok(None)`: the head refused
    /// the id (the node is fenced).
    async fn rejoin(
        &self,
        head: &HeadClient,
        node_id: NodeId,
        registration_key: u64,
    ) -> Result<Option<(NodeRegistered, IpAddr)>, RpcError> {
        let (node, ip) = self.describe(head, registration_key);
        let (leases, workers) = self.pool.holdings();
        let objects = self.store().snapshot();
        let request = HeadRequest::RejoinNode(Box::new(shoal_proto::head::RejoinNode {
            node_id,
            node,
            leases,
            workers,
            objects,
        }));
        match head
            .call_idempotent(&request, self.config.head_request_timeout)
            .await?
        {
            HeadReply::NodeRegistered(registered) => Ok(Some((registered, ip))),
            HeadReply::NodeFenced { .. } => Ok(None),
            other => Err(RpcError::Stream(format!(
                "unexpected reply to a rejoin: {other:?}"
            ))),
        }
    }

    /// Adopts a new registration: serve peers with the issued certificate and
    /// announce the new id.
    fn apply(&self, registered: NodeRegistered, ip: IpAddr) {
        let cert = IssuedCert {
            cert_der: registered.node_cert_der,
            key_der: registered.node_key_der,
        };
        let server = tls::mtls_server_config(&cert, &registered.ca_cert_der)
            .and_then(|tls| endpoint::server_config(tls, &self.config.limits));
        match server {
            Ok(server) => endpoint::set_server_config(self.server, server, &self.config.limits),
            Err(e) => warn!(error = %e, "the head's certificate is unusable; not serving peers"),
        }
        let client = tls::mtls_client_config(&cert, &registered.ca_cert_der)
            .and_then(|tls| endpoint::client_config(tls, &self.config.limits));
        match client {
            Ok(client) => {
                self.peer_config.send_replace(Some(client));
            }
            Err(e) => {
                warn!(error = %e, "the head's certificate is unusable; not pulling from peers")
            }
        }
        self.auth.set_node_id(registered.node_id);
        // Workers reach this node on its advertised address (a same-host
        // socket underneath) and advertise the same IP themselves.
        let mut env = vec![
            ("SHOAL_WORKER".into(), "1".into()),
            ("SHOAL_NODE_ID".into(), registered.node_id.to_string()),
            (
                "SHOAL_NODE_ADDRESS".into(),
                SocketAddr::new(ip, self.advertised.port()).to_string(),
            ),
            ("SHOAL_NODE_IP".into(), ip.to_string()),
            ("SHOAL_ADDRESS".into(), self.config.head_address.clone()),
            // User code runs in workers: the driver token, which cannot
            // make a node.
            ("SHOAL_TOKEN".into(), self.token.driver_token().to_string()),
        ];
        if let Some((lo, hi)) = self.config.worker_port_range {
            env.push(("SHOAL_WORKER_PORT_RANGE".into(), format!("{lo}-{hi}")));
        }
        self.pool.set_env(env);
        info!(node_id = %registered.node_id, "joined the cluster");
        self.node_id.send_replace(Some(registered.node_id));
    }

    /// Leaves the cluster on purpose, so the head need not wait for the
    /// heartbeat timeout. Best effort: the head may be gone already.
    async fn leave(&self, client: Option<HeadClient>, registration_key: u64) {
        let (Some(head), Some(node_id)) = (client, *self.node_id.borrow()) else {
            return;
        };
        let bye = HeadRequest::UnregisterNode {
            node_id,
            registration_key,
        };
        if let Err(e) = head.call_idempotent(&bye, Duration::from_secs(2)).await {
            debug!(error = %e, "could not tell the head we are leaving");
        }
        head.close();
    }
}

/// Restart orders acted on, by actor and incarnation (the most recent few).
#[derive(Default)]
struct Seen {
    order: std::collections::VecDeque<(shoal_proto::ActorId, u32)>,
    set: std::collections::HashSet<(shoal_proto::ActorId, u32)>,
}

impl Seen {
    const KEPT: usize = 4096;

    /// True the first time this restart is seen.
    fn first(&mut self, actor_id: shoal_proto::ActorId, incarnation: u32) -> bool {
        if !self.set.insert((actor_id, incarnation)) {
            return false;
        }
        self.order.push_back((actor_id, incarnation));
        if self.order.len() > Self::KEPT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Runs an actor's constructor again in a new worker, as the head ordered,
/// and reports the outcome. A worker the head does not take is stopped.
async fn restart_actor(
    order: RestartActor,
    node_id: NodeId,
    head: HeadClient,
    transport: Transport,
    pool: Arc<crate::worker_pool::WorkerPool>,
) {
    let RestartActor {
        actor_id,
        incarnation,
        class,
        spec,
        lease,
        job_id,
        binary_hash,
        driver,
        detached,
    } = order;
    let tenancy = if detached {
        crate::worker_pool::Tenancy::Detached
    } else {
        crate::worker_pool::Tenancy::Dedicated
    };
    pool.set_owner(lease.lease_id, Some(spec.owner), None);
    let created = async {
        let worker = pool
            .grant(
                lease.lease_id,
                crate::worker_pool::WorkerKind {
                    job_id,
                    binary_hash,
                    driver: Some(driver),
                    env: spec.env.clone(),
                },
                lease.resources.clone(),
                tenancy,
            )
            .await
            .map_err(|e| format!("no worker: {}", e.message))?;
        let addr: SocketAddr = worker
            .address
            .parse()
            .map_err(|e| format!("bad worker address {:?}: {e}", worker.address))?;
        let client = transport
            .connect::<WorkerRequest, WorkerReply>(addr)
            .await
            .map_err(|e| format!("cannot reach the new worker: {e}"))?;
        let create = WorkerRequest::CreateActor {
            actor_id,
            class: class.clone(),
            args: spec.args,
            max_concurrency: spec.max_concurrency,
            incarnation,
        };
        let reply = client.call(&create, ACTOR_CREATE_TIMEOUT).await;
        client.close();
        match reply {
            Ok(WorkerReply::ActorCreated { failure: None, pid }) => Ok((worker, pid)),
            Ok(WorkerReply::ActorCreated {
                failure: Some(f), ..
            }) => Err(format!("the constructor failed: {}", f.message)),
            Ok(other) => Err(format!("{other:?} in answer to CreateActor")),
            Err(e) => Err(format!("CreateActor: {e}")),
        }
    }
    .await;
    let (worker, pid, failure) = match created {
        Ok((worker, pid)) => (Some(worker), pid, None),
        Err(why) => (None, 0, Some(why)),
    };
    let report = HeadRequest::ActorRestarted {
        node_id,
        actor_id,
        incarnation,
        worker,
        pid,
        failure: failure.clone(),
    };
    // Idempotent: a report whose reply was lost is sent again, and the head
    // answers it the same (it must not stop a worker the head made alive).
    let accepted = matches!(
        head.call_idempotent(&report, Duration::from_secs(30)).await,
        Ok(HeadReply::RestartAccepted { accepted: true })
    );
    if accepted {
        info!(%actor_id, %class, incarnation, pid, "actor restarted here");
    } else {
        if let Some(why) = failure {
            warn!(%actor_id, %class, incarnation, %why, "actor restart failed");
        }
        pool.release(lease.lease_id, true);
    }
}

/// Longest a restarted actor's constructor may run.
const ACTOR_CREATE_TIMEOUT: Duration = Duration::from_secs(600);

/// A random non-zero registration key.
fn new_key() -> u64 {
    shoal_proto::NodeId::random().as_uuid().as_u64_pair().0 | 1
}

/// Capped exponential backoff that logs the first failure loudly and
/// repeats quietly.
struct Backoff {
    pauses: shoal_net::backoff::Backoff,
    failures: u32,
}

impl Backoff {
    const START: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Self {
        Self {
            pauses: shoal_net::backoff::Backoff::new(Self::START, max),
            failures: 0,
        }
    }

    fn reset(&mut self) {
        self.pauses.reset();
        self.failures = 0;
    }

    async fn log_and_wait(
        &mut self,
        error: &(dyn std::fmt::Display + Sync),
        shutdown: &CancellationToken,
    ) {
        self.failures += 1;
        if self.failures == 1 || self.failures.is_multiple_of(20) {
            warn!(error = %error, attempts = self.failures, "cannot reach the head; retrying");
        } else {
            debug!(error = %error, attempts = self.failures, "cannot reach the head; retrying");
        }
        let pause = self.pauses.next_pause();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
