//! Creating, finding and ending actors.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::{
    ActorId, HeadReply, HeadRequest, NodeReply, NodeRequest, TaskId, WorkerReply, WorkerRequest,
};

use super::{Actor, ActorHandle, ActorOptions, Lifetime, RawActor, WireActor};
use crate::args::ArgValue;
use crate::core::Core;
use crate::error::{Error, Result};
use crate::registry::{self, MethodInvoker};

/// Creates an actor of `A` with constructor arguments `args`.
pub(crate) fn create<A: Actor>(
    options: ActorOptions,
    args: Vec<ArgValue>,
) -> Result<ActorHandle<A>> {
    options.check()?;
    let core = crate::driver::ensure_core();
    let class = A::CLASS.to_string();
    let has_async = registry::actor_class(&class).is_some_and(|c| {
        c.methods
            .iter()
            .any(|(_, m)| matches!(m, MethodInvoker::AsyncRef(_) | MethodInvoker::AsyncMut(_)))
    });
    let max_concurrency = options
        .max_concurrency
        .unwrap_or(if has_async { 1000 } else { 1 });
    let core2 = Arc::clone(&core);
    let raw = core
        .block_on(async move { create_raw(&core2, class, options, max_concurrency, args).await })?;
    Ok(ActorHandle::new(raw))
}

async fn create_raw(
    core: &Arc<Core>,
    class: String,
    options: ActorOptions,
    max_concurrency: u32,
    args: Vec<ArgValue>,
) -> Result<RawActor> {
    let shape = crate::owner::leases::Shape {
        resources: options.resources.clone(),
        placement: options.scheduling.placement.clone(),
        env: core.env.merged(&options.env),
    };
    shape
        .env
        .check()
        .map_err(|e| Error::InvalidOptions(format!("env_var: {e}")))?;
    let resources = &shape.resources;
    let actor_id = ActorId::random();
    let task_id = TaskId::fresh();
    // Kept until the constructor has run (its stored arguments must not be
    // freed before the worker reads them), or for the actor's life when it
    // may run the constructor again.
    let (args, keep_args) = core
        .resolve_args(&class, task_id, args)
        .await
        .map_err(Error::from_failure)?;
    // One request id for all tries: a retry after a lost grant gets that
    // grant, so no lease leaks.
    let request_id = core.leases.fresh_request_id();
    let lease = loop {
        let request = crate::core::lease_request(core, &shape, request_id, 2000);
        let asked = core
            .head
            .call_idempotent(
                &HeadRequest::RequestLease(request.clone()),
                Duration::from_secs(15),
            )
            .await;
        match asked {
            Ok(HeadReply::LeaseGranted(lease)) => break lease,
            Ok(HeadReply::LeaseRefused { reason }) => return Err(Error::Unschedulable(reason)),
            Ok(HeadReply::LeasePending { infeasible: true }) => {
                tracing::warn!(%class, ?resources, placement = %shape.placement, "no node can ever fit this actor; it waits (see `shoal status`)");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(HeadReply::LeasePending { .. }) => {}
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "{other:?} in answer to a lease request"
                )))
            }
            Err(e) => {
                // The head may have granted it, its answer lost.
                // Given up in the background: the caller gets its error now.
                if e.is_worth_retrying() || e.is_connection_lost() {
                    let core2 = Arc::clone(core);
                    core.handle.spawn(async move {
                        crate::core::abandon_request(&core2, request).await;
                    });
                }
                return Err(e.into());
            }
        }
    };
    let node = match core.node(&lease.node_address).await {
        Ok(node) => node,
        Err(e) => {
            crate::core::return_to_head(core, lease.lease_id).await;
            return Err(e);
        }
    };
    let detached = options.detached;
    let grant = crate::core::grant_request(core, &lease, (true, detached), &shape.env);
    let worker = match node.call_idempotent(&grant, Duration::from_secs(90)).await {
        Ok(NodeReply::WorkerGranted { worker }) => worker,
        other => {
            // The node may have granted a worker we never heard of.
            crate::core::release_lease(core, &node, lease.lease_id, true).await;
            return Err(match other {
                Err(e) => e.into(),
                Ok(other) => Error::Protocol(format!("{other:?} in answer to GrantWorker")),
            });
        }
    };
    let node_address = node_address(&node);
    let lease_id = lease.lease_id;
    let node_id = lease.node_id;
    let restartable = options.max_restarts > 0;
    // Until it is registered, dropping this ends the worker: a failed
    // creation leaves nothing behind.
    let (keep_args, ctor_args) = if restartable {
        (Vec::new(), keep_args)
    } else {
        (keep_args, Vec::new())
    };
    let lifetime = Arc::new(Lifetime {
        actor_id,
        escaped: false.into(),
        registered: false.into(),
        lease: Some((lease, node_address.clone())),
        _ctor_args: Mutex::new(ctor_args),
    });
    let client = core.worker(&worker.address).await?;
    let create = WorkerRequest::CreateActor {
        actor_id,
        class: class.clone(),
        args: args.clone(),
        max_concurrency,
        incarnation: 0,
    };
    let pid = match client.call(&create, Duration::from_secs(600)).await? {
        WorkerReply::ActorCreated { failure: None, pid } => pid,
        WorkerReply::ActorCreated {
            failure: Some(f), ..
        } => return Err(Error::from_failure(f)),
        other => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to CreateActor"
            )))
        }
    };
    drop(keep_args);
    let info = shoal_proto::ActorInfo {
        actor_id,
        class: class.clone(),
        name: options.name.clone(),
        namespace: options.namespace.clone(),
        detached,
        job_id: core.job_id,
        node_id,
        node_address: node_address.clone(),
        worker: worker.clone(),
        pid,
        lease_id,
        state: shoal_proto::ActorState::Alive,
        max_pending_calls: options.max_pending_calls,
        incarnation: 0,
        max_restarts: options.max_restarts,
        num_restarts: 0,
        max_task_retries: options.max_task_retries,
    };
    let spec = shoal_proto::head::ActorSpec {
        // Only a restartable actor's spec is kept.
        args: if restartable { args } else { Vec::new() },
        max_concurrency,
        resources: shape.resources.clone(),
        owner: core.me.worker_id,
        placement: shape.placement.clone(),
        env: shape.env.clone(),
    };
    match core
        .head
        .call_idempotent(
            &HeadRequest::RegisterActor {
                info: info.clone(),
                spec: Box::new(spec),
            },
            Duration::from_secs(30),
        )
        .await
    {
        Ok(_) => {}
        Err(crate::core::head::HeadCallError::Rpc(shoal_net::RpcError::Service(e)))
            if e.kind == shoal_proto::ServiceErrorKind::BadRequest =>
        {
            return Err(Error::ActorNameTaken(e.message))
        }
        Err(e) => return Err(e.into()),
    }
    lifetime.registered.store(true, Ordering::Relaxed);
    // A detached actor is not ended by its creator's handles.
    lifetime.escaped.store(detached, Ordering::Relaxed);
    Ok(RawActor::new(core, WireActor::from_info(info), lifetime))
}

/// The actor named `name` in `namespace`, checked to be of class `A`.
pub(crate) fn get_named<A: Actor>(name: &str, namespace: &str) -> Result<ActorHandle<A>> {
    let core = crate::driver::ensure_core();
    let ask = HeadRequest::GetNamedActor {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    let core2 = Arc::clone(&core);
    let reply = core.block_on(async move {
        Ok(core2
            .head
            .call_idempotent(&ask, Duration::from_secs(30))
            .await)
    })?;
    let info = match reply {
        Ok(HeadReply::Actor(info)) => info,
        Ok(other) => {
            return Err(Error::Protocol(format!(
                "{other:?} in answer to GetNamedActor"
            )))
        }
        Err(crate::core::head::HeadCallError::Rpc(shoal_net::RpcError::Service(e)))
            if e.kind == shoal_proto::ServiceErrorKind::NotFound =>
        {
            return Err(Error::NotFound(e.message))
        }
        Err(e) => return Err(e.into()),
    };
    if info.class != A::CLASS {
        return Err(Error::NotFound(format!(
            "the actor named {name:?} in namespace {namespace:?} is a {}, not a {}",
            info.class,
            A::CLASS
        )));
    }
    Ok(ActorHandle::new(RawActor::borrowed(WireActor::from_info(
        info,
    ))))
}

/// Asks the head to end the actor (`no_restart`) or only its worker, then
/// stops the worker through its node.
async fn stop_actor(core: &Arc<Core>, actor_id: ActorId, no_restart: bool) -> Result<()> {
    let info = match core
        .head
        .call_idempotent(
            &HeadRequest::KillActor {
                actor_id,
                no_restart,
            },
            Duration::from_secs(30),
        )
        .await?
    {
        HeadReply::Actor(info) => info,
        other => return Err(Error::Protocol(format!("{other:?} in answer to KillActor"))),
    };
    let node = core.node(&info.node_address).await?;
    node.call_idempotent(
        &NodeRequest::KillWorker {
            worker_id: info.worker.worker_id,
        },
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

/// Ends the actor for good (its creator's last handle is gone).
pub(super) async fn end_actor(core: &Arc<Core>, actor_id: ActorId) -> Result<()> {
    stop_actor(core, actor_id, true).await
}

/// Ends an actor now: the head forgets it (its name is free again) and its
/// node stops its worker; calls in flight and later get `Error::ActorDied`.
/// Without `no_restart`, only its worker is stopped: an actor with restarts
/// left comes back, as after a crash.
pub(crate) fn kill(raw: &RawActor, no_restart: bool) -> Result<()> {
    let core = crate::driver::ensure_core();
    let core2 = Arc::clone(&core);
    let actor_id = raw.actor_id;
    core.block_on(async move { stop_actor(&core2, actor_id, no_restart).await })?;
    if no_restart {
        raw.caller.gone.cancel();
    }
    raw.caller.location().dead.cancel();
    Ok(())
}

fn node_address(node: &crate::core::NodeClient) -> String {
    node.remote_address().to_string()
}
