//! Starting Shoal in a driver: connecting to a cluster, or starting a local
//! one; and the guard that ends the job.

#[cfg(feature = "local")]
use shoal_net::sync::MutexExt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use shoal_net::JoinToken;
use shoal_proto::{Role, WorkerId};

use crate::config::Config;
use crate::error::{Error, Result};
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
                #[cfg(feature = "local")]
                {
                    let local = core2.local.locked().take();
                    if let Some(cluster) = local {
                        cluster.shutdown().await;
                    }
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

/// Where a driver connects, and what it keeps alive.
struct Joining {
    head_address: SocketAddr,
    token: JoinToken,
    /// The node it puts objects on, when known before connecting (local
    /// mode's).
    home: Option<core::HomeNode>,
    /// The IP it advertises, when given.
    node_ip: Option<IpAddr>,
    /// Local mode's cluster, kept by the core until the job ends.
    #[cfg(feature = "local")]
    local: Option<crate::local::LocalCluster>,
}

async fn start_driver(config: Config) -> Result<Arc<core::Core>> {
    if !config.bad_env.is_empty() {
        return Err(Error::NotInitialized(format!(
            "bad environment: {}",
            config.bad_env.join("; ")
        )));
    }
    config
        .env
        .check()
        .map_err(|e| Error::InvalidOptions(format!("Config::env_var: {e}")))?;
    let joining = match &config.address {
        Some(address) => join_cluster(&config, address).await?,
        None => start_local(&config).await?,
    };
    let ports = config
        .driver_port
        .map_or(core::Ports::Any, core::Ports::Fixed);
    let core = core::Core::connect(core::CoreSetup {
        head_address: joining.head_address,
        token: joining.token,
        role: Role::Driver,
        job_id: None,
        worker_id: WorkerId::random(),
        home: joining.home,
        executor: None,
        upload_binary: config.address.is_some() || config.worker_processes,
        driver: None,
        binary_hash: None,
        node_ip: joining.node_ip,
        ports,
        head_timeout: config.head_timeout,
        // SHOAL_TASK_EVENTS has the last word, whatever the program says.
        task_events: crate::config::task_events_env(config.task_events),
        env: config.env.clone(),
    })
    .await?;
    #[cfg(feature = "local")]
    {
        *core.local.locked() = joining.local;
    }
    Ok(core)
}

/// The cluster at `address` (SHOAL_ADDRESS).
async fn join_cluster(config: &Config, address: &str) -> Result<Joining> {
    let head_address = tokio::net::lookup_host(address)
        .await
        .map_err(|e| Error::NotInitialized(format!("cannot resolve SHOAL_ADDRESS {address}: {e}")))?
        .next()
        .ok_or_else(|| Error::NotInitialized(format!("{address} resolves to nothing")))?;
    Ok(Joining {
        head_address,
        token: find_token(config)?,
        home: None,
        node_ip: config.node_ip,
        #[cfg(feature = "local")]
        local: None,
    })
}

/// Local mode: a cluster started in this process.
#[cfg(feature = "local")]
async fn start_local(config: &Config) -> Result<Joining> {
    let cluster = crate::local::start(config).await?;
    let home = cluster
        .node_id(0)
        .zip(cluster.node_address(0))
        .map(|(node_id, address)| core::HomeNode {
            node_id,
            address: address.to_string(),
            same_host: true,
        });
    Ok(Joining {
        head_address: cluster.address(),
        token: cluster.token().clone(),
        home,
        // Local mode lives on loopback: nothing in it is reached from
        // another host.
        node_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        local: Some(cluster),
    })
}

/// Local mode needs the `local` feature (the head and the node daemon).
#[cfg(not(feature = "local"))]
async fn start_local(_: &Config) -> Result<Joining> {
    Err(Error::NotInitialized(
        "local mode (no SHOAL_ADDRESS) needs the shoal crate's `local` feature, which this \
         program was built without: set SHOAL_ADDRESS to join a cluster, or build with \
         shoal's default features"
            .into(),
    ))
}

/// The token from the config, else the newest session's on this machine;
/// as the driver token (a driver never acts as a node), whichever was given.
fn find_token(config: &Config) -> Result<shoal_net::JoinToken> {
    let token: shoal_net::JoinToken = match &config.token {
        Some(token) => token.parse()?,
        None => {
            let root = config
                .session_root
                .clone()
                .unwrap_or_else(|| "/tmp/shoal".into());
            let path = root.join("session_latest").join("token");
            shoal_net::identity::read_token(&path).map_err(|e| {
                Error::NotInitialized(format!(
                    "no join token: set SHOAL_TOKEN (the head printed it), or run on the head's machine ({e})"
                ))
            })?
        }
    };
    Ok(token.driver_token())
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

#[cfg(all(test, not(feature = "local")))]
mod tests {
    use super::*;

    #[test]
    fn without_the_local_feature_init_with_no_address_says_what_to_do() {
        let err = init(Config::local())
            .err()
            .expect("no local mode without the feature");
        let Error::NotInitialized(message) = &err else {
            panic!("{err:?}");
        };
        assert!(
            message.contains("`local` feature") && message.contains("SHOAL_ADDRESS"),
            "{message}"
        );
    }
}
