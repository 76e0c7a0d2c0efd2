//! `shoal logs`: the log files of the cluster's processes, read from the
//! node that has them. Only the head's address is needed: the head says
//! where each node, actor, task and worker is, and the CLI then asks that
//! node (as a client holding the token, which may only read logs there).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shoal_net::handshake::ClientAuth;
use shoal_net::{NetLimits, RpcClient, Transport};
use shoal_proto::node::{LogFile, LOG_CHUNK_MAX};
use shoal_proto::state::{Row, StateKind};
use shoal_proto::{NodeReply, NodeRequest, NodeState, Role};

use crate::list::text;
use crate::status::{HeadArgs, HeadTarget};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The log of the worker hosting this actor.
    #[arg(long, value_name = "ID", conflicts_with_all = ["task", "worker", "node"])]
    actor: Option<String>,
    /// The log of the worker that ran this task (its task events must be
    /// on: SHOAL_TASK_EVENTS=1 in its driver).
    #[arg(long, value_name = "ID", conflicts_with_all = ["worker", "node"])]
    task: Option<String>,
    /// The log of this worker.
    #[arg(long, value_name = "ID", conflicts_with = "node")]
    worker: Option<String>,
    /// With FILE: a file of this node (as `shoal logs` lists them).
    #[arg(long, value_name = "ID", requires = "file")]
    node: Option<String>,
    /// The file's name on the node given with --node.
    #[arg(requires = "node")]
    file: Option<String>,
    /// Keep printing what is added, until interrupted.
    #[arg(long, short)]
    follow: bool,
    /// Only the last N lines (then what is added, with --follow).
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    #[command(flatten)]
    head: HeadArgs,
}

const TIMEOUT: Duration = Duration::from_secs(30);
/// How often --follow looks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

type NodeClient = RpcClient<NodeRequest, NodeReply>;

/// A live node as the head lists it.
struct Node {
    node_id: String,
    address: String,
}

/// What to print, as the head's tables say.
enum Wanted {
    /// Every node's list of files.
    List,
    /// This file of this node.
    File { node: String, name: String },
    /// This worker's log, on whichever node has it.
    Worker(String),
}

/// The log of the worker an actor's or task's record names, on its node;
/// `none` says why there is none.
fn worker_file(row: &Row, none: impl Fn() -> String) -> Result<Wanted> {
    let (Some(worker), Some(node)) = (text(row, "worker_id"), text(row, "node_id")) else {
        bail!("{}", none());
    };
    Ok(Wanted::File {
        node: node.to_string(),
        name: worker_log(worker),
    })
}

pub fn run(args: LogsArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    // The head's answers first (they run a runtime of their own).
    let nodes = live_nodes(&target)?;
    let wanted = if let Some(id) = &args.actor {
        let row = crate::list::one(&target, StateKind::Actors, "actor_id", id)?;
        worker_file(&row, || format!("actor {id} has no worker"))?
    } else if let Some(id) = &args.task {
        let row = crate::list::one(&target, StateKind::Tasks, "task_id", id)?;
        worker_file(&row, || {
            format!("task {id} has not been sent to a worker (yet)")
        })?
    } else if let Some(id) = &args.worker {
        Wanted::Worker(id.clone())
    } else if let (Some(node), Some(file)) = (&args.node, &args.file) {
        Wanted::File {
            node: node.clone(),
            name: file.clone(),
        }
    } else {
        Wanted::List
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(async move {
        let transport = Transport::token_client(
            ClientAuth {
                token: target.token.clone(),
                role: Role::Client,
            },
            shoal_net::NODE_SERVER_NAME,
            NetLimits::default(),
        )?;
        let result = logs(&args, &nodes, wanted, &transport).await;
        transport.wait_idle().await;
        result
    })
}

async fn logs(
    args: &LogsArgs,
    nodes: &[Node],
    wanted: Wanted,
    transport: &Transport,
) -> Result<()> {
    let (node, name) = match wanted {
        Wanted::List => return list_all(nodes, transport).await,
        Wanted::File { node, name } => (node, name),
        Wanted::Worker(id) => {
            let name = worker_log(&id);
            let mut found = None;
            for node in nodes {
                let client = connect(transport, &node.address).await?;
                let has = list(&client).await?.iter().any(|f| f.name == name);
                client.close();
                if has {
                    found = Some(node.node_id.clone());
                    break;
                }
            }
            let node = found.with_context(|| format!("no live node has a log of worker {id}"))?;
            (node, name)
        }
    };
    let node = nodes
        .iter()
        .find(|n| n.node_id == node)
        .with_context(|| format!("node {node} is not alive (see `shoal status`)"))?;
    let client = connect(transport, &node.address).await?;
    let result = print_file(&client, &name, args.tail, args.follow).await;
    client.close();
    result
}

fn worker_log(worker_id: &str) -> String {
    format!("worker-{worker_id}.log")
}

fn live_nodes(target: &HeadTarget) -> Result<Vec<Node>> {
    let status = crate::status::fetch(&target.address, &target.token, TIMEOUT)?;
    Ok(status
        .nodes
        .into_iter()
        .filter(|n| n.state == NodeState::Alive)
        .map(|n| Node {
            node_id: n.node_id.to_string(),
            address: n.address,
        })
        .collect())
}

async fn connect(transport: &Transport, address: &str) -> Result<NodeClient> {
    let addr = shoal_net::host::resolve(address).await?;
    transport
        .connect_named(addr, shoal_net::NODE_SERVER_NAME)
        .await
        .with_context(|| format!("connecting to the node at {address}"))
}

async fn list(client: &NodeClient) -> Result<Vec<LogFile>> {
    match client.call(&NodeRequest::ListLogs, TIMEOUT).await? {
        NodeReply::Logs(files) => Ok(files),
        other => bail!("unexpected reply from the node: {other:?}"),
    }
}

async fn list_all(nodes: &[Node], transport: &Transport) -> Result<()> {
    for node in nodes {
        println!("node {} ({})", node.node_id, node.address);
        let client = connect(transport, &node.address).await?;
        for file in list(&client).await? {
            println!("  {:<48} {:>12}  {}", file.name, file.size, file.kind);
        }
        client.close();
    }
    println!("\nRead one with: shoal logs --node ID FILE [--tail N] [--follow]");
    Ok(())
}

async fn read(client: &NodeClient, name: &str, offset: u64) -> Result<(u64, Vec<u8>)> {
    let request = NodeRequest::ReadLog {
        name: name.to_string(),
        offset,
        len: LOG_CHUNK_MAX,
    };
    match client.call(&request, TIMEOUT).await? {
        NodeReply::LogChunk { size, data } => Ok((size, data)),
        other => bail!("unexpected reply from the node: {other:?}"),
    }
}

/// Where the last `lines` lines of a file of `size` bytes start, reading
/// back from its end a chunk at a time.
async fn tail_offset(client: &NodeClient, name: &str, size: u64, lines: usize) -> Result<u64> {
    let mut end = size;
    let mut seen = 0;
    while end > 0 {
        let start = end.saturating_sub(u64::from(LOG_CHUNK_MAX));
        let (_, data) = read(client, name, start).await?;
        let data = &data[..((end - start) as usize).min(data.len())];
        for (i, byte) in data.iter().enumerate().rev() {
            // A final newline ends the last line; it does not start one.
            if *byte == b'\n' && start + i as u64 + 1 != size {
                seen += 1;
                if seen == lines {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

async fn print_file(
    client: &NodeClient,
    name: &str,
    tail: Option<usize>,
    follow: bool,
) -> Result<()> {
    let (size, _) = read(client, name, u64::MAX).await?;
    let mut offset = match tail {
        Some(0) => size,
        Some(n) => tail_offset(client, name, size, n).await?,
        None => 0,
    };
    let mut out = std::io::stdout().lock();
    loop {
        let (size, data) = read(client, name, offset).await?;
        if size < offset {
            // Truncated (or replaced): start over.
            offset = 0;
            continue;
        }
        offset += data.len() as u64;
        out.write_all(&data)?;
        if offset < size {
            continue;
        }
        out.flush()?;
        if !follow {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
