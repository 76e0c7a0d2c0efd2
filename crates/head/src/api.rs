//! The head service: answers [`HeadRequest`]s.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shoal_net::handshake::HandshakeStats;
use shoal_net::{ClusterIdentity, Peer, Service};
use shoal_proto::head::{LeaseRequest, NodeRegistered, RegisterNode};
use shoal_proto::{
    ClusterId, ClusterStatus, HeadReply, HeadRequest, NodeId, NodeState, Role, ServiceError,
    ServiceErrorKind,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::actors::Actors;
use crate::config::HeadConfig;
use crate::jobs::{Binaries, Jobs};
use crate::membership::{Fenced, Membership};
use crate::scheduler::{Decision, NodeView, Scheduler};

/// Longest a lease request is held waiting for resources.
const LEASE_WAIT_MAX: Duration = Duration::from_secs(10);
/// Largest part of an executable sent in one reply.
const BINARY_CHUNK_MAX: u32 = 8 << 20;

/// The head's tables, under one lock so they change together.
struct State {
    membership: Membership,
    scheduler: Scheduler,
    jobs: Jobs,
    actors: Actors,
}

impl State {
    fn live_nodes(&self) -> Vec<NodeView> {
        self.membership
            .status(Instant::now())
            .into_iter()
            .filter(|n| n.state == NodeState::Alive)
            .map(|n| NodeView {
                node_id: n.node_id,
                address: n.address,
                total: n.resources_total,
            })
            .collect()
    }
}

/// The head's request handler and the state it serves.
pub struct HeadService {
    identity: Arc<ClusterIdentity>,
    state: Mutex<State>,
    binaries: Mutex<Binaries>,
    /// Woken when resources may have been freed or added.
    resources_changed: Notify,
    stats: Arc<HandshakeStats>,
    heartbeat_interval: Duration,
    node_timeout: Duration,
}

fn bad_request(message: impl Into<String>) -> ServiceError {
    ServiceError::new(ServiceErrorKind::BadRequest, message)
}

impl HeadService {
    /// A head with empty tables.
    pub fn new(
        identity: Arc<ClusterIdentity>,
        config: &HeadConfig,
        stats: Arc<HandshakeStats>,
    ) -> Self {
        Self {
            identity,
            state: Mutex::new(State {
                membership: Membership::new(config.nodes_max, config.dead_nodes_kept),
                scheduler: Scheduler::new(),
                jobs: Jobs::default(),
                actors: Actors::default(),
            }),
            binaries: Mutex::new(Binaries::default()),
            resources_changed: Notify::new(),
            stats,
            heartbeat_interval: config.heartbeat_interval,
            node_timeout: config.node_timeout,
        }
    }

    /// The cluster's id.
    pub fn cluster_id(&self) -> ClusterId {
        self.identity.cluster_id()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every method finishes its updates before returning, so a poisoned
        // lock's data is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn binaries(&self) -> MutexGuard<'_, Binaries> {
        self.binaries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declares silent nodes dead and reclaims their leases.
    pub fn sweep(&self) {
        let dead = {
            let mut state = self.state();
            let dead = state.membership.sweep(Instant::now(), self.node_timeout);
            for node_id in &dead {
                state.scheduler.node_died(*node_id);
                state.actors.node_died(*node_id);
            }
            dead
        };
        for node_id in dead {
            warn!(%node_id, timeout = ?self.node_timeout, "node missed its heartbeats; declared dead");
        }
    }

    /// The cluster's node table and resource view.
    pub fn status(&self) -> ClusterStatus {
        let state = self.state();
        let mut nodes = state.membership.status(Instant::now());
        for node in &mut nodes {
            if node.state == NodeState::Alive {
                let view = NodeView {
                    node_id: node.node_id,
                    address: String::new(),
                    total: node.resources_total.clone(),
                };
                node.resources_available = state.scheduler.available(&view);
            }
        }
        ClusterStatus {
            cluster_id: self.cluster_id(),
            nodes,
            handshakes_refused: self.stats.refused.load(Ordering::Relaxed),
            infeasible: state.scheduler.infeasible().to_vec(),
        }
    }

    fn register_node(&self, peer: &Peer, info: RegisterNode) -> Result<HeadReply, ServiceError> {
        check_registration(&info)?;
        let address = info.address.clone();
        // The id is fixed before the certificate is issued, and the node is
        // admitted only once issuing succeeded.
        let known = self
            .state()
            .membership
            .registered_with(info.registration_key);
        let node_id = known.unwrap_or_else(NodeId::random);
        let cert = self.identity.issue_node_cert(node_id).map_err(|e| {
            ServiceError::new(
                ServiceErrorKind::Internal,
                format!("issuing certificate: {e}"),
            )
        })?;
        {
            let mut state = self.state();
            state
                .membership
                .register(node_id, info, Instant::now())
                .map_err(|e| ServiceError::new(ServiceErrorKind::Unavailable, e.to_string()))?;
            let live = state.live_nodes();
            state.scheduler.recheck_infeasible(&live);
        }
        self.resources_changed.notify_waiters();
        info!(%node_id, %address, remote = %peer.remote, "node registered");
        Ok(HeadReply::NodeRegistered(NodeRegistered {
            node_id,
            heartbeat_interval_ms: millis(self.heartbeat_interval),
            node_cert_der: cert.cert_der,
            node_key_der: cert.key_der,
            ca_cert_der: self.identity.ca_cert_der(),
        }))
    }

    async fn request_lease(&self, request: LeaseRequest) -> Result<HeadReply, ServiceError> {
        request
            .resources
            .validate()
            .map_err(|e| bad_request(e.to_string()))?;
        let wait = Duration::from_millis(request.wait_ms).min(LEASE_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a release between the look and
            // the wait still wakes us.
            let notified = self.resources_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let decision = {
                let mut state = self.state();
                if !state.jobs.is_running(request.job_id) {
                    return Err(ServiceError::new(
                        ServiceErrorKind::NotFound,
                        format!("job {} is not running", request.job_id),
                    ));
                }
                let live = state.live_nodes();
                state.scheduler.request(&live, &request)
            };
            match decision {
                Decision::Granted(lease) => return Ok(HeadReply::LeaseGranted(lease)),
                Decision::Infeasible => return Ok(HeadReply::LeasePending { infeasible: true }),
                Decision::Wait => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(HeadReply::LeasePending { infeasible: false });
            }
        }
    }

    fn finish_job(&self, job_id: shoal_proto::JobId) {
        let reclaimed = {
            let mut state = self.state();
            if !state.jobs.finish(job_id) {
                return;
            }
            let ended = state.actors.job_finished(job_id);
            for actor in ended {
                state.scheduler.release(actor.lease_id);
            }
            state.scheduler.job_finished(job_id)
        };
        self.resources_changed.notify_waiters();
        info!(%job_id, leases_reclaimed = reclaimed, "job finished");
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Longest address or hostname accepted, and most resource names.
const NAME_BYTES_MAX: usize = 256;
const RESOURCES_MAX: usize = 64;

fn check_registration(info: &RegisterNode) -> Result<(), ServiceError> {
    if info.address.len() > NAME_BYTES_MAX || info.hostname.len() > NAME_BYTES_MAX {
        return Err(bad_request(format!(
            "address and hostname are limited to {NAME_BYTES_MAX} bytes"
        )));
    }
    if info.resources_total.0.len() > RESOURCES_MAX {
        return Err(bad_request(format!(
            "at most {RESOURCES_MAX} resource names"
        )));
    }
    info.resources_total
        .validate()
        .map_err(|e| bad_request(e.to_string()))
}

impl Service for HeadService {
    type Request = HeadRequest;
    type Reply = HeadReply;

    async fn handle(&self, peer: &Peer, request: HeadRequest) -> Result<HeadReply, ServiceError> {
        match request {
            HeadRequest::RegisterNode(info) => {
                peer.require(&[Role::Node])?;
                self.register_node(peer, info)
            }
            HeadRequest::Heartbeat {
                node_id,
                resources_available,
                jobs,
                dead_workers,
                object_store_used_bytes,
            } => {
                peer.require(&[Role::Node])?;
                resources_available
                    .validate()
                    .map_err(|e| bad_request(e.to_string()))?;
                let mut state = self.state();
                match state.membership.heartbeat(
                    node_id,
                    resources_available,
                    object_store_used_bytes,
                    Instant::now(),
                ) {
                    Ok(()) => {
                        let mut reclaimed = 0;
                        for worker in dead_workers.iter().take(10_000) {
                            reclaimed += state.scheduler.owner_died(*worker);
                        }
                        for actor in state
                            .actors
                            .workers_died(&dead_workers[..dead_workers.len().min(10_000)])
                        {
                            reclaimed += usize::from(state.scheduler.release(actor.lease_id));
                        }
                        let finished_jobs = state.jobs.not_running(&jobs[..jobs.len().min(10_000)]);
                        drop(state);
                        if reclaimed > 0 {
                            self.resources_changed.notify_waiters();
                        }
                        Ok(HeadReply::HeartbeatAck { finished_jobs })
                    }
                    Err(Fenced(node_id)) => Ok(HeadReply::NodeFenced { node_id }),
                }
            }
            HeadRequest::UnregisterNode { node_id } => {
                peer.require(&[Role::Node])?;
                let left = {
                    let mut state = self.state();
                    let left = state.membership.unregister(node_id);
                    state.scheduler.node_died(node_id);
                    state.actors.node_died(node_id);
                    left
                };
                if left {
                    info!(%node_id, "node left");
                    self.resources_changed.notify_waiters();
                }
                Ok(HeadReply::NodeUnregistered)
            }
            HeadRequest::GetClusterStatus => Ok(HeadReply::ClusterStatus(self.status())),
            HeadRequest::RegisterJob(job) => {
                peer.require(&[Role::Driver])?;
                if job.binary_size > crate::jobs::BINARY_BYTES_MAX {
                    return Err(bad_request("executable too large"));
                }
                let job_id = self.state().jobs.register(&job, peer.connection_id);
                let binary_present = self.binaries().has(&job.binary_hash);
                info!(%job_id, driver = %job.driver.address, pid = job.driver_pid, "job started");
                Ok(HeadReply::JobRegistered {
                    job_id,
                    binary_present,
                })
            }
            HeadRequest::UploadBinary {
                hash,
                offset,
                total,
                data,
            } => {
                peer.require(&[Role::Driver])?;
                let complete = self
                    .binaries()
                    .upload(&hash, offset, total, &data)
                    .map_err(|e| bad_request(e.to_string()))?;
                Ok(HeadReply::BinaryStored { complete })
            }
            HeadRequest::FetchBinary { hash, offset, len } => {
                peer.require(&[Role::Node])?;
                let (total, data) = self
                    .binaries()
                    .fetch(&hash, offset, len.min(BINARY_CHUNK_MAX))
                    .ok_or_else(|| {
                        ServiceError::new(
                            ServiceErrorKind::NotFound,
                            format!("no executable {hash}"),
                        )
                    })?;
                Ok(HeadReply::BinaryChunk { total, data })
            }
            HeadRequest::RequestLease(request) => {
                peer.require(&[Role::Driver, Role::Worker])?;
                self.request_lease(request).await
            }
            HeadRequest::ReturnLease { lease_id } => {
                peer.require(&[Role::Driver, Role::Worker])?;
                if self.state().scheduler.release(lease_id) {
                    self.resources_changed.notify_waiters();
                }
                Ok(HeadReply::LeaseReturned)
            }
            HeadRequest::LeaseBlocked { lease_id, blocked } => {
                peer.require(&[Role::Node])?;
                let changed = self.state().scheduler.set_blocked(lease_id, blocked);
                if changed && blocked {
                    self.resources_changed.notify_waiters();
                }
                Ok(HeadReply::LeaseReturned)
            }
            HeadRequest::RegisterActor(info) => {
                peer.require(&[Role::Driver, Role::Worker])?;
                if info.name.as_ref().is_some_and(|n| n.len() > 256) || info.namespace.len() > 256 {
                    return Err(bad_request(
                        "actor names and namespaces are limited to 256 bytes",
                    ));
                }
                let mut state = self.state();
                if info.detached {
                    state.scheduler.detach(info.lease_id);
                }
                state
                    .actors
                    .register(info.clone())
                    .map_err(|e| bad_request(e.to_string()))?;
                Ok(HeadReply::Actor(info))
            }
            HeadRequest::GetNamedActor { namespace, name } => {
                let state = self.state();
                let info = state
                    .actors
                    .named(&namespace, &name)
                    .cloned()
                    .ok_or_else(|| {
                        ServiceError::new(
                            ServiceErrorKind::NotFound,
                            format!("no live actor named {name:?} in namespace {namespace:?}"),
                        )
                    })?;
                Ok(HeadReply::Actor(info))
            }
            HeadRequest::KillActor { actor_id } => {
                peer.require(&[Role::Driver, Role::Worker, Role::Client])?;
                let killed = {
                    let mut state = self.state();
                    let killed = state.actors.kill(actor_id);
                    if let Some(actor) = &killed {
                        state.scheduler.release(actor.lease_id);
                    }
                    killed
                };
                let info = killed.ok_or_else(|| {
                    ServiceError::new(
                        ServiceErrorKind::NotFound,
                        format!("no live actor {actor_id}"),
                    )
                })?;
                self.resources_changed.notify_waiters();
                info!(%actor_id, class = %info.class, "actor killed");
                Ok(HeadReply::Actor(info))
            }
            HeadRequest::ListActors => Ok(HeadReply::Actors(self.state().actors.list())),
            HeadRequest::FinishJob { job_id } => {
                peer.require(&[Role::Driver])?;
                self.finish_job(job_id);
                Ok(HeadReply::JobFinished)
            }
        }
    }

    /// A driver's jobs end with its connection.
    fn disconnected(&self, peer: &Peer) {
        if peer.role != Role::Driver {
            return;
        }
        let jobs = self.state().jobs.registered_on(peer.connection_id);
        for job in jobs {
            self.finish_job(job);
        }
    }
}
