//! Worker mode: the job's executable re-run by a node daemon, serving the
//! worker service of `crate::worker` over this process's `Core`. (Local
//! mode's thread workers are in `crate::local`.)

use std::sync::Arc;
use std::time::Duration;

use shoal_net::JoinToken;
use shoal_proto::{JobId, NodeId, NodeRequest, Role, WorkerId};

use crate::core::{self, Core, CoreSetup, HomeNode};
use crate::error::{Error, Result};
use crate::worker::Executor;

/// If this process was started as a worker, runs the worker loop and exits;
/// otherwise returns at once.
pub fn run_worker_if_worker() {
    if std::env::var("SHOAL_WORKER").as_deref() != Ok("1") {
        return;
    }
    crate::rt::init_logging();
    let code = match worker_main() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shoal worker failed: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn env(key: &str) -> Result<String> {
    std::env::var(key).map_err(|_| Error::NotInitialized(format!("worker mode without {key}")))
}

fn parse<T: std::str::FromStr>(key: &str) -> Result<T> {
    env(key)?
        .parse()
        .map_err(|_| Error::NotInitialized(format!("worker mode with a malformed {key}")))
}

/// The variables this worker was started with for its tasks or actor
/// (named in `SHOAL_WORKER_ENV`): the tasks it submits inherit them.
fn inherited_env() -> shoal_proto::EnvVars {
    let mut env = shoal_proto::EnvVars::new();
    let names = std::env::var(shoal_proto::env::WORKER_ENV_NAMES).unwrap_or_default();
    for name in names.split(',').filter(|n| !n.is_empty()) {
        if let Ok(value) = std::env::var(name) {
            env.set(name, value);
        }
    }
    env
}

fn worker_main() -> Result<()> {
    let worker_id: WorkerId = parse("SHOAL_WORKER_ID")?;
    let job_id: JobId = parse("SHOAL_JOB_ID")?;
    let node_id: NodeId = parse("SHOAL_NODE_ID")?;
    let node_address = env("SHOAL_NODE_ADDRESS")?;
    let head = env("SHOAL_ADDRESS")?;
    let token: JoinToken = env("SHOAL_TOKEN")?.parse()?;
    let binary_hash = std::env::var("SHOAL_BINARY_HASH").ok();
    if let Ok(ids) = std::env::var("SHOAL_GPU_IDS") {
        crate::scheduling::set_gpu_ids(worker_id, &ids);
    }
    let node_ip = match std::env::var("SHOAL_NODE_IP") {
        Ok(ip) => Some(ip.parse().map_err(|_| {
            Error::NotInitialized(format!("worker mode with a malformed SHOAL_NODE_IP {ip:?}"))
        })?),
        Err(_) => None,
    };
    let ports = match std::env::var("SHOAL_WORKER_PORT_RANGE") {
        Ok(range) => core::Ports::parse_range(&range).ok_or_else(|| {
            Error::NotInitialized(format!(
                "worker mode with a malformed SHOAL_WORKER_PORT_RANGE {range:?}"
            ))
        })?,
        Err(_) => core::Ports::Any,
    };
    let driver = match (
        std::env::var("SHOAL_DRIVER_ADDRESS"),
        std::env::var("SHOAL_DRIVER_ID"),
    ) {
        (Ok(address), Ok(id)) => id
            .parse()
            .ok()
            .map(|worker_id| shoal_proto::Address { worker_id, address }),
        _ => None,
    };
    let parent = nix::unistd::getppid();
    let rt = crate::rt::runtime()?;
    rt.block_on(async move {
        let head_address = tokio::net::lookup_host(&head)
            .await
            .map_err(|e| Error::NotInitialized(format!("cannot resolve the head {head}: {e}")))?
            .next()
            .ok_or_else(|| Error::NotInitialized(format!("the head {head} resolves to nothing")))?;
        let core = Core::connect(CoreSetup {
            head_address,
            token,
            role: Role::Worker,
            job_id: Some(job_id),
            worker_id,
            home: Some(HomeNode {
                node_id,
                address: node_address.clone(),
                same_host: true,
            }),
            executor: Some(Executor { node_id, worker_id }),
            upload_binary: false,
            driver,
            binary_hash,
            node_ip,
            ports,
            head_timeout: crate::core::head::HEAD_TIMEOUT,
            // As the node's environment says (unset or a bad value: off).
            task_events: crate::config::task_events_env(false),
            env: inherited_env(),
        })
        .await?;
        core::install(Arc::clone(&core));
        let node = core.node(&node_address).await?;
        let register = NodeRequest::RegisterWorker {
            worker_id,
            address: core.me.address.clone(),
            pid: std::process::id(),
        };
        node.call_idempotent(&register, Duration::from_secs(30))
            .await?;
        // Serve until the node daemon that started us is gone.
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if nix::unistd::getppid() != parent || node.close_reason().is_some() {
                return Ok(());
            }
        }
    })
}
