//! Local mode (the `local` feature, on by default): a whole cluster inside
//! this process, from the `shoal-local` crate, with the SDK's part of it:
//! workers as threads of the driver (`ThreadLauncher`), and a client of
//! the cluster's head ([`LocalClusterExt::client`]).

use std::future::Future;
use std::sync::Arc;

use shoal_net::handshake::{HandshakeStats, ServerAuth};
use shoal_net::{endpoint, tls, JoinToken, NetLimits};
use shoal_node::{LaunchSpec, Launched, ProcessLauncher, WorkerLauncher};
use shoal_proto::{NodeId, Role};
use tokio_util::sync::CancellationToken;

pub use shoal_local::{LocalCluster, LocalConfig, LocalError};

use crate::client::ClusterClient;
use crate::config::Config;
use crate::core::{Core, WORKER_SERVER_NAME};
use crate::error::Result;
use crate::worker::service::WorkerService;
use crate::worker::Executor;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::LocalCluster {}
}

/// What the SDK adds to a [`LocalCluster`]: `use shoal::LocalClusterExt;`
/// then `cluster.client()`.
pub trait LocalClusterExt: sealed::Sealed {
    /// A client connection to the cluster's head.
    fn client(&self) -> impl Future<Output = Result<ClusterClient>> + Send;
}

impl LocalClusterExt for LocalCluster {
    fn client(&self) -> impl Future<Output = Result<ClusterClient>> + Send {
        ClusterClient::connect(self.address(), self.token().clone(), Role::Client)
    }
}

/// Starts local mode's cluster for a driver: a head and one node daemon with
/// `config`'s CPUs, whose workers are threads of this process unless
/// `config.worker_processes`.
pub(crate) async fn start(config: &Config) -> Result<LocalCluster> {
    let launcher: Option<Arc<dyn WorkerLauncher>> = if config.worker_processes {
        None
    } else {
        Some(Arc::new(ThreadLauncher))
    };
    let defaults = LocalConfig::default();
    let local_config = LocalConfig {
        head_node_cpus: config.num_cpus.unwrap_or(defaults.head_node_cpus),
        ..defaults
    };
    Ok(LocalCluster::start_with(local_config, launcher).await?)
}

/// Starts local-mode workers as tasks of this process: each serves the
/// worker service on its own loopback endpoint, and runs sync functions on
/// blocking threads.
#[derive(Debug, Default)]
pub(crate) struct ThreadLauncher;

impl WorkerLauncher for ThreadLauncher {
    fn needs_executable(&self) -> bool {
        false
    }

    fn launch(&self, spec: LaunchSpec) -> std::result::Result<Launched, String> {
        if !spec.user_env.is_empty() {
            // A thread cannot have an environment of its own: a lease
            // asking for variables gets a process of this executable.
            let executable = std::env::current_exe()
                .map_err(|e| format!("finding this executable for a worker process: {e}"))?;
            let process = ProcessLauncher {
                logs: None,
                inherit_output: true,
            };
            return process.launch(LaunchSpec {
                executable: Some(executable),
                ..spec
            });
        }
        let lookup = |key: &str| {
            spec.env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .ok_or(format!("no {key} for the worker"))
        };
        let node_id: NodeId = lookup("SHOAL_NODE_ID")?
            .parse()
            .map_err(|_| "bad SHOAL_NODE_ID")?;
        let token: JoinToken = lookup("SHOAL_TOKEN")?.parse().map_err(|e| format!("{e}"))?;
        if let Ok(ids) = lookup("SHOAL_GPU_IDS") {
            crate::scheduling::set_gpu_ids(spec.worker_id, &ids);
        }
        let limits = NetLimits::default();
        let cert = tls::self_signed(WORKER_SERVER_NAME).map_err(|e| e.to_string())?;
        let server = tls::server_config(&cert)
            .and_then(|tls| endpoint::server_config(tls, &limits))
            .map_err(|e| e.to_string())?;
        let ep = endpoint::endpoint(([127, 0, 0, 1], 0).into(), Some(server), &limits)
            .map_err(|e| e.to_string())?;
        let address = ep.local_addr().map_err(|e| e.to_string())?.to_string();
        let stop = CancellationToken::new();
        let service = Arc::new(WorkerService::<Core>::new(Some(Executor {
            node_id,
            worker_id: spec.worker_id,
        })));
        let auth = Arc::new(ServerAuth::new(
            token,
            vec![Role::Driver, Role::Worker, Role::Node],
        ));
        let task = tokio::spawn(shoal_net::rpc::serve(
            ep,
            service,
            auth,
            limits,
            Arc::new(HandshakeStats::default()),
            stop.clone(),
        ));
        Ok(Launched {
            pid: None,
            exited: Box::pin(async move {
                let _ = task.await;
                "thread worker stopped".to_string()
            }),
            kill: Box::new(move || stop.cancel()),
            address: Some(address),
        })
    }
}
