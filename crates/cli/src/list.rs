//! `shoal list actors | objects`: the actors and objects the head knows.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use shoal_proto::{ActorState, HeadReply, HeadRequest};

use crate::status::{ask, HeadArgs, HeadTarget};

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// What to list.
    #[arg(value_enum)]
    what: What,
    #[command(flatten)]
    head: HeadArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum What {
    /// Actors: state, class, name, node, pid.
    Actors,
    /// Objects in node stores: size, owner, copies, spilled or in memory.
    Objects,
}

pub fn run(args: ListArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    if let What::Objects = args.what {
        return list_objects(&target, args.json);
    }
    let actors = match ask(
        &target.address,
        &target.token,
        HeadRequest::ListActors,
        Duration::from_secs(10),
    )? {
        HeadReply::Actors(actors) => actors,
        other => anyhow::bail!("unexpected reply from the head: {other:?}"),
    };
    if args.json {
        let rows: Vec<_> = actors
            .iter()
            .map(|a| {
                json!({
                    "actor_id": a.actor_id.to_string(),
                    "class": a.class,
                    "name": a.name,
                    "namespace": a.namespace,
                    "state": state_name(a.state),
                    "incarnation": a.incarnation,
                    "num_restarts": a.num_restarts,
                    "max_restarts": a.max_restarts,
                    "detached": a.detached,
                    "job_id": a.job_id.to_string(),
                    "node_id": a.node_id.to_string(),
                    "address": a.worker.address,
                    "pid": a.pid,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<32}  {:<10}  {:<30}  {:<20}  {:<32}  {:>7}  {:>8}",
        "ACTOR", "STATE", "CLASS", "NAME", "NODE", "PID", "RESTARTS"
    );
    for a in &actors {
        let state = state_name(a.state);
        let name = a
            .name
            .as_ref()
            .map(|n| format!("{}/{n}", a.namespace))
            .unwrap_or_default();
        println!(
            "{:<32}  {:<10}  {:<30}  {:<20}  {:<32}  {:>7}  {:>8}",
            a.actor_id, state, a.class, name, a.node_id, a.pid, a.num_restarts
        );
    }
    Ok(())
}

fn list_objects(target: &HeadTarget, as_json: bool) -> Result<()> {
    let objects = match ask(
        &target.address,
        &target.token,
        HeadRequest::ListObjects,
        Duration::from_secs(10),
    )? {
        HeadReply::Objects(objects) => objects,
        other => anyhow::bail!("unexpected reply from the head: {other:?}"),
    };
    let where_ = |c: &shoal_proto::head::ObjectCopy| {
        if c.spilled {
            "SPILLED"
        } else {
            "IN_MEMORY"
        }
    };
    if as_json {
        let rows: Vec<_> = objects
            .iter()
            .map(|o| {
                json!({
                    "object_id": o.id.to_string(),
                    "size": o.size,
                    "owner": o.owner.map(|w| w.to_string()),
                    "locations": o.copies.iter().map(|c| json!({
                        "node_id": c.node_id.to_string(),
                        "primary": c.primary,
                        "state": where_(c),
                    })).collect::<Vec<_>>(),
                    "spilled": o.copies.iter().any(|c| c.primary && c.spilled),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<32}  {:>12}  {:<32}  {:<10}  COPIES",
        "OBJECT", "SIZE", "OWNER", "PRIMARY"
    );
    for o in &objects {
        let primary = o.copies.iter().find(|c| c.primary).map_or("-", where_);
        let copies: Vec<String> = o.copies.iter().map(|c| c.node_id.to_string()).collect();
        let owner = o.owner.map_or_else(|| "-".to_string(), |w| w.to_string());
        println!(
            "{:<32}  {:>12}  {:<32}  {:<10}  {}",
            o.id,
            o.size,
            owner,
            primary,
            copies.join(",")
        );
    }
    Ok(())
}

fn state_name(state: ActorState) -> &'static str {
    match state {
        ActorState::Alive => "ALIVE",
        ActorState::Restarting => "RESTARTING",
        ActorState::Dead => "DEAD",
    }
}
