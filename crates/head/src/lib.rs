//! The head: Shoal's control plane.
//!
//! The head keeps the cluster's node table: it registers node daemons (a new
//! [`NodeId`](shoal_proto::NodeId) for every start of a daemon), records their
//! heartbeats and free resources, declares a node dead when its heartbeats stop
//! for longer than [`HeadConfig::node_timeout`], fences dead nodes (a dead
//! node's heartbeat is refused and it must join again as a new node), and
//! answers status queries. It also issues each joining node the certificate
//! it uses for node-to-node mutual TLS.
//!
//! Modules:
//! - [`config`]: [`HeadConfig`] and its defaults.
//! - [`membership`]: the node table as a state machine with no I/O (time is
//!   passed in), so it can be tested step by step.
//! - [`scheduler`]: the resource ledger and lease placement, a state machine
//!   with no I/O.
//! - [`jobs`]: the job table and the executables workers run.
//! - [`submit`]: the drivers of submitted jobs, which the head runs.
//! - [`actors`]: the actor directory: locations, names, lifetimes.
//! - [`kv`]: the internal key-value table.
//! - [`store`]: the durable tables (group commit to a redb file, or none).
//! - [`redis`]: the same tables in Redis, with a lease so that one head
//!   serves at a time (a head another machine can take over).
//! - [`recovery`]: what is written, what a restarted head reloads, and how
//!   the nodes that outlived it join it again.
//! - [`api`]: the head service: [`HeadRequest`](shoal_proto::HeadRequest) in,
//!   [`HeadReply`](shoal_proto::HeadReply) out.
//!
//! The entry point is [`Head::bind`] then [`Head::run`], or [`run`] for both;
//! the CLI, local mode and the tests all go through it. A head given a
//! store ([`Head::bind_stored`]) writes what must survive it before it
//! answers, and reloads it when restarted on the same store.

pub mod actors;
pub mod api;
pub mod binaries;
pub mod config;
pub mod groups;
pub mod jobs;
pub mod kv;
mod links;
pub mod membership;
pub mod metrics;
pub mod objects;
pub mod recovery;
pub mod redis;
pub mod scheduler;
pub mod state_api;
pub mod store;
pub mod submit;
pub mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_net::handshake::{HandshakeStats, ServerAuth};
use shoal_net::{endpoint, tls, ClusterIdentity, IdentityError, Listener};
use shoal_proto::Role;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::HeadConfig;

/// The head could not start.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS identity could not be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// A head bound to its address, ready to [`run`](Head::run).
pub struct Head {
    listener: Listener,
    service: Arc<api::HeadService>,
    auth: Arc<ServerAuth>,
    stats: Arc<HandshakeStats>,
    config: HeadConfig,
}

impl Head {
    /// Binds the head's QUIC endpoint. Must be called inside a tokio runtime.
    pub fn bind(config: HeadConfig, identity: Arc<ClusterIdentity>) -> Result<Self, HeadError> {
        Self::bind_stored(config, identity, None)
    }

    /// [`Head::bind`] for a head whose tables go to (and were reloaded
    /// from) `stored` (see [`store::open_session`]).
    pub fn bind_stored(
        config: HeadConfig,
        identity: Arc<ClusterIdentity>,
        stored: Option<store::Stored>,
    ) -> Result<Self, HeadError> {
        let cert = identity.issue_head_cert()?;
        let server = endpoint::server_config(tls::server_config(&cert)?, &config.limits)?;
        // Signed with the cluster's key: a head restarted here resets the
        // old head's connections, and their peers reconnect at once.
        let reset_key = identity.token().reset_key();
        let endpoint = endpoint::endpoint_with_reset_key(
            config.listen,
            Some(server),
            &config.limits,
            reset_key,
        )
        .map_err(|source| HeadError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self::on(endpoint.into(), config, identity, stored))
    }

    /// A head that will serve on `listener` (QUIC, or an in-process
    /// network: see `shoal_net::transport`); `config.listen` is not used.
    pub fn on(
        listener: Listener,
        config: HeadConfig,
        identity: Arc<ClusterIdentity>,
        stored: Option<store::Stored>,
    ) -> Self {
        let stats = Arc::new(HandshakeStats::default());
        let auth = Arc::new(ServerAuth::new(
            identity.token().clone(),
            vec![Role::Node, Role::Driver, Role::Worker, Role::Client],
        ));
        let service = Arc::new(api::HeadService::new(
            identity,
            &config,
            stats.clone(),
            stored,
        ));
        Self {
            listener,
            service,
            auth,
            stats,
            config,
        }
    }

    /// The head's request handler, for what the embedder serves beside it
    /// (metrics, the dashboard).
    pub fn service(&self) -> Arc<api::HeadService> {
        Arc::clone(&self.service)
    }

    /// The address the head listens on (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Cancelled when the head's store fails or another head takes it
    /// over: [`Head::run`] returns then.
    pub fn store_failed(&self) -> CancellationToken {
        self.service.store_failed()
    }

    /// This head's incarnation (see [`api::HeadService::incarnation`]).
    pub fn incarnation(&self) -> u64 {
        self.service.incarnation()
    }

    /// Serves until `shutdown` is cancelled (or the store fails), then
    /// closes every connection.
    pub async fn run(self, shutdown: CancellationToken) {
        let addr = self.local_addr().ok();
        info!(?addr, cluster_id = %self.service.cluster_id(), incarnation = self.service.incarnation(), "head serving");
        let shutdown = shutdown.child_token();
        let failed = self.service.store_failed();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = failed.cancelled() => stop.cancel(),
                () = stop.cancelled() => {}
            }
        });
        let service = self.service.clone();
        let detector =
            failure_detector(self.service.clone(), self.config.clone(), shutdown.clone());
        let placer = group_placer(self.service.clone(), shutdown.clone());
        let server = shoal_net::rpc::serve(
            self.listener,
            self.service,
            self.auth,
            self.config.limits.clone(),
            self.stats,
            shutdown,
        );
        tokio::join!(detector, placer, server);
        service.stop_jobs().await;
        info!("head stopped");
    }
}

/// Binds and runs a head until `shutdown` is cancelled.
pub async fn run(
    config: HeadConfig,
    identity: Arc<ClusterIdentity>,
    shutdown: CancellationToken,
) -> Result<(), HeadError> {
    Head::bind(config, identity)?.run(shutdown).await;
    Ok(())
}

/// Reserves bundles for the placement groups waiting for them (created
/// while the cluster was full, or whose node died), as room appears.
async fn group_placer(service: Arc<api::HeadService>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(GROUP_RETRY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {
                if let Err(e) = service.place_groups(None).await {
                    warn!(error = %e, "could not reserve placement groups' bundles; trying again");
                }
            }
        }
    }
}

/// How often waiting placement groups are tried again.
const GROUP_RETRY: Duration = Duration::from_millis(100);

/// Declares nodes dead when their heartbeats stop. Ticks at a tenth of the
/// timeout, so a node is declared dead within 1.1 timeouts.
async fn failure_detector(
    service: Arc<api::HeadService>,
    config: HeadConfig,
    shutdown: CancellationToken,
) {
    let tick = (config.node_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => service.sweep(),
        }
    }
}
