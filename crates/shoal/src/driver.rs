//! Starting Shoal in a driver: connecting to a cluster, or starting a local
//! one; and the guard that ends the job.

use std::sync::Arc;

use shoal_proto::{Role, WorkerId};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::local::{LocalCluster, LocalConfig};
use crate::{core, process, rt};

/// Keeps Shoal running; dropping it ends the job (and a local cluster).
#[must_use = "dropping the guard ends the job"]
pub struct Shoal {
    owns: bool,
}

impl Drop for Shoal {
    fn drop(&mut self) {
        if !self.owns {
            return;
        }
        if let Some(core) = core::try_get() {
            let core2 = Arc::clone(core);
            let _ = core.block_on(async move {
                core2.shut_down().await;
                let local = core2.local.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(cluster) = local {
                    cluster.shutdown().await;
                }
                Ok(())
            });
        }
    }
}

/// Starts Shoal for this program: connects to the cluster at
/// `config`'s address, or starts a local one.
///
/// Call it first in `main`: when the program runs as a worker, `init` runs
/// the worker loop and never returns (or use `#[shoal::main]`, which does
/// that before `main`'s body). A second call returns a guard that owns
/// nothing.
pub fn init(config: Config) -> Result<Shoal> {
    rt::init_logging();
    process::run_worker_if_worker();
    if core::try_get().is_some() {
        return Ok(Shoal { owns: false });
    }
    let rt = rt::runtime()?;
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(start_driver(config).await);
    });
    let started = rt::block_thread(|| rx.recv())?;
    let core = started.map_err(|_| Error::NotInitialized("the runtime stopped".into()))??;
    if !core::install(core) {
        return Ok(Shoal { owns: false });
    }
    Ok(Shoal { owns: true })
}

async fn start_driver(config: Config) -> Result<Arc<core::Core>> {
    if !config.bad_env.is_empty() {
        return Err(Error::NotInitialized(format!(
            "bad environment: {}",
            config.bad_env.join("; ")
        )));
    }
    let (head_address, token, local) = match &config.address {
        Some(address) => {
            let head = tokio::net::lookup_host(address)
                .await
                .map_err(|e| {
                    Error::NotInitialized(format!("cannot resolve SHOAL_ADDRESS {address}: {e}"))
                })?
                .next()
                .ok_or_else(|| Error::NotInitialized(format!("{address} resolves to nothing")))?;
            (head, find_token(&config)?, None)
        }
        None => {
            let launcher: Option<Arc<dyn shoal_node::WorkerLauncher>> = if config.worker_processes {
                None
            } else {
                Some(Arc::new(process::ThreadLauncher))
            };
            let local_config = LocalConfig {
                head_node_cpus: config
                    .num_cpus
                    .unwrap_or(LocalConfig::default().head_node_cpus),
                ..LocalConfig::default()
            };
            let cluster = LocalCluster::start_with(local_config, launcher).await?;
            (cluster.address(), cluster.token().clone(), Some(cluster))
        }
    };
    let home = local.as_ref().and_then(|c| {
        Some(core::HomeNode {
            node_id: c.node_id(0)?,
            address: c.node_address(0)?.to_string(),
            same_host: true,
        })
    });
    // Local mode lives on loopback: nothing in it is reached from another
    // host.
    let node_ip = match &local {
        Some(_) => Some(std::net::Ipv4Addr::LOCALHOST.into()),
        None => config.node_ip,
    };
    let ports = config
        .driver_port
        .map_or(core::Ports::Any, core::Ports::Fixed);
    let core = core::Core::connect(core::CoreSetup {
        head_address,
        token,
        role: Role::Driver,
        job_id: None,
        worker_id: WorkerId::random(),
        home,
        executor: None,
        upload_binary: config.address.is_some() || config.worker_processes,
        driver: None,
        binary_hash: None,
        node_ip,
        ports,
    })
    .await?;
    *core.local.lock().unwrap_or_else(|e| e.into_inner()) = local;
    Ok(core)
}

/// The token from the config, else the newest session's on this machine.
fn find_token(config: &Config) -> Result<shoal_net::JoinToken> {
    if let Some(token) = &config.token {
        return Ok(token.parse()?);
    }
    let root = config
        .session_root
        .clone()
        .unwrap_or_else(|| "/tmp/shoal".into());
    let path = root.join("session_latest").join("token");
    shoal_net::identity::read_token(&path).map_err(|e| {
        Error::NotInitialized(format!(
            "no join token: set SHOAL_TOKEN (the head printed it), or run on the head's machine ({e})"
        ))
    })
}

pub(crate) fn ensure_core() -> Arc<core::Core> {
    if let Ok(core) = core::get() {
        return core;
    }
    // Like Ray, the first remote call starts Shoal if the program did not.
    match init(Config::from_env()) {
        Ok(guard) => std::mem::forget(guard),
        Err(e) => panic!("shoal::init failed on the first remote call: {e}"),
    }
    match core::get() {
        Ok(core) => core,
        Err(e) => panic!("shoal is not initialised: {e}"),
    }
}
