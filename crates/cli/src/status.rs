//! `shoal status`: the cluster's nodes, states and resources.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use shoal_net::handshake::ClientAuth;
use shoal_net::{JoinToken, NetLimits, RpcClient, Transport, HEAD_SERVER_NAME};
use shoal_proto::placement::NODE_ID_LABEL;
use shoal_proto::resources::{CPU, GPU, MEMORY};
use shoal_proto::{ClusterStatus, HeadReply, HeadRequest, NodeState, ResourceSet, Role};

use crate::session::Session;
use crate::SessionArgs;

/// Which head to ask, for the commands that query a running cluster.
#[derive(Debug, clap::Args)]
pub struct HeadArgs {
    /// The head's HOST:PORT (default: the newest session on this machine).
    #[arg(long, value_name = "HOST:PORT", env = "SHOAL_ADDRESS")]
    address: Option<String>,
    /// The join token (default: SHOAL_TOKEN, then the session directory's).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    session: SessionArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    head: HeadArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The head to ask and the token to prove, from flags, the environment or
/// the newest session under the root.
pub struct HeadTarget {
    pub address: String,
    pub token: JoinToken,
}

impl HeadTarget {
    pub fn from_args(args: &HeadArgs) -> Result<Self> {
        Self::resolve(
            args.address.as_deref(),
            args.token.as_deref(),
            &args.session,
        )
    }

    fn resolve(address: Option<&str>, token: Option<&str>, session: &SessionArgs) -> Result<Self> {
        let latest = Session::latest(&session.root);
        let address = match (address, &latest) {
            (Some(a), _) => a.to_string(),
            (None, Some(s)) => s
                .head_address()
                .context("the newest session has no head_address")?,
            (None, None) => anyhow::bail!(
                "no cluster found under {}: pass --address HOST:PORT",
                session.root.display()
            ),
        };
        let token: JoinToken = match (token, &latest) {
            (Some(t), _) => t.parse().context("parsing the join token")?,
            (None, Some(s)) => shoal_net::identity::read_token(&s.token_path())
                .context("reading the session's join token; pass --token")?,
            (None, None) => anyhow::bail!("no join token: pass --token or set SHOAL_TOKEN"),
        };
        // A client never acts as a node: it holds the driver token only.
        let token = token.driver_token();
        Ok(Self { address, token })
    }
}

pub fn run(args: StatusArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    let timeout = Duration::from_secs(10);
    let status = fetch(&target.address, &target.token, timeout)?;
    let actors = match ask(
        &target.address,
        &target.token,
        HeadRequest::ListActors,
        timeout,
    )? {
        HeadReply::Actors(actors) => actors,
        other => anyhow::bail!("unexpected reply from the head: {other:?}"),
    };
    if args.json {
        let mut value = to_json(&status);
        if let Some(nodes) = value["nodes"].as_array_mut() {
            for node in nodes {
                let id = node["node_id"].as_str().unwrap_or_default().to_string();
                let alive = actors
                    .iter()
                    .filter(|a| {
                        a.state == shoal_proto::ActorState::Alive && a.node_id.to_string() == id
                    })
                    .count();
                node["actors_alive"] = json!(alive);
            }
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render(&status));
        let alive: Vec<_> = actors
            .iter()
            .filter(|a| a.state == shoal_proto::ActorState::Alive)
            .collect();
        if !alive.is_empty() {
            out_actor_counts(&status, &alive);
        }
    }
    Ok(())
}

fn out_actor_counts(status: &ClusterStatus, alive: &[&shoal_proto::ActorInfo]) {
    println!("\nActors alive: {}", alive.len());
    for node in &status.nodes {
        let n = alive.iter().filter(|a| a.node_id == node.node_id).count();
        if n > 0 {
            println!("  node {}: {n}", node.node_id);
        }
    }
}

/// Asks the head at `address` for the cluster status.
pub fn fetch(address: &str, token: &JoinToken, timeout: Duration) -> Result<ClusterStatus> {
    match ask(address, token, HeadRequest::GetClusterStatus, timeout)? {
        HeadReply::ClusterStatus(status) => Ok(status),
        other => anyhow::bail!("unexpected reply from the head: {other:?}"),
    }
}

/// Sends one request to the head at `address` as a client.
pub fn ask(
    address: &str,
    token: &JoinToken,
    request: HeadRequest,
    timeout: Duration,
) -> Result<HeadReply> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(async {
        let head = HeadConnection::open(address, token, timeout).await?;
        let reply = head.client.call(&request, timeout).await;
        head.close().await;
        reply.context("asking the head")
    })
}

/// A client's connection to the head, for commands that send several
/// requests.
pub struct HeadConnection {
    transport: Transport,
    pub client: RpcClient<HeadRequest, HeadReply>,
}

impl HeadConnection {
    /// Connects to the head at `address` as a client.
    pub async fn open(address: &str, token: &JoinToken, timeout: Duration) -> Result<Self> {
        let addr = shoal_net::host::resolve(address).await?;
        let limits = NetLimits {
            handshake_timeout: timeout,
            ..NetLimits::default()
        };
        let transport = Transport::token_client(
            ClientAuth {
                token: token.clone(),
                role: Role::Client,
            },
            HEAD_SERVER_NAME,
            limits,
        )?;
        let client = transport
            .connect(addr)
            .await
            .with_context(|| format!("connecting to the head at {address}"))?;
        Ok(Self { transport, client })
    }

    /// Closes the connection, waiting for it to finish.
    pub async fn close(self) {
        self.client.close();
        self.transport.wait_idle().await;
    }
}

fn resources_json(set: &ResourceSet) -> Value {
    Value::Object(
        set.iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// The `--json` shape.
pub fn to_json(status: &ClusterStatus) -> Value {
    let nodes: Vec<Value> = status
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id.to_string(),
                "address": n.address,
                "state": match n.state { NodeState::Alive => "ALIVE", NodeState::Dead => "DEAD" },
                "pid": n.pid,
                "hostname": n.hostname,
                "host_id": n.host_id,
                "is_head_node": n.is_head_node,
                "resources_total": resources_json(&n.resources_total),
                "resources_available": resources_json(&n.resources_available),
                "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
                "object_store_used_bytes": n.object_store_used_bytes,
                "objects_pulled": n.objects_pulled,
                "object_store_capacity_bytes": n.object_store_capacity_bytes,
                "metrics_address": n.metrics_address,
                "labels": n.labels,
            })
        })
        .collect();
    json!({
        "cluster_id": status.cluster_id.to_string(),
        "nodes": nodes,
        "handshakes_refused": status.handshakes_refused,
        "infeasible": status.infeasible.iter().map(|r| json!({
            "job_id": r.job_id.to_string(),
            "resources": resources_json(&r.resources),
            "placement": r.placement.to_string(),
        })).collect::<Vec<_>>(),
        "placement_groups": status.placement_groups.iter().map(|g| json!({
            "placement_group_id": g.spec.group_id.to_string(),
            "name": g.spec.name,
            "state": g.state.to_string(),
            "strategy": g.spec.strategy.to_string(),
            "bundles": g.spec.bundles.iter().map(resources_json).collect::<Vec<_>>(),
            "nodes": g.bundle_nodes.iter().map(|n| n.map(|n| n.to_string())).collect::<Vec<_>>(),
            "infeasible": g.infeasible,
            "detached": g.spec.detached,
        })).collect::<Vec<_>>(),
    })
}

fn quantity(name: &str, q: f64) -> String {
    if name == MEMORY {
        format!("{:.1} GiB", q / f64::from(1u32 << 30))
    } else if q.fract() == 0.0 {
        format!("{q:.0}")
    } else {
        format!("{q:.2}")
    }
}

fn used_of_total(name: &str, total: &ResourceSet, available: &ResourceSet) -> String {
    let t = total.get(name);
    let used = (t - available.get(name)).max(0.0);
    format!("{}/{}", quantity(name, used), quantity(name, t))
}

/// A resource set as `CPU: 1, GPU: 1`.
fn shape(set: &ResourceSet) -> String {
    set.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human form.
pub fn render(status: &ClusterStatus) -> String {
    let alive: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Alive)
        .collect();
    let mut out = format!(
        "Cluster {}: {} node(s) alive, {} dead\n\n",
        status.cluster_id,
        alive.len(),
        status.nodes.len() - alive.len()
    );
    out += &format!(
        "{:<32}  {:<5}  {:<21}  {:<21}  {:>7}  {:<9}  {:<9}  {:<19}  {:<19}  {}\n",
        "NODE",
        "STATE",
        "ADDRESS",
        "METRICS",
        "PID",
        "CPU",
        "GPU",
        "MEMORY",
        "OBJECT STORE",
        "OTHER RESOURCES"
    );
    for n in &status.nodes {
        let state = match n.state {
            NodeState::Alive => "ALIVE",
            NodeState::Dead => "DEAD",
        };
        let others: Vec<String> = n
            .resources_total
            .iter()
            .filter(|(k, _)| ![CPU, GPU, MEMORY].contains(k))
            .map(|(k, _)| {
                format!(
                    "{k} {}",
                    used_of_total(k, &n.resources_total, &n.resources_available)
                )
            })
            .collect();
        let head = if n.is_head_node { " (head)" } else { "" };
        out += &format!(
            "{:<32}  {:<5}  {:<21}  {:<21}  {:>7}  {:<9}  {:<9}  {:<19}  {:<19}  {}{}\n",
            n.node_id,
            state,
            n.address,
            n.metrics_address.as_deref().unwrap_or("-"),
            n.pid,
            used_of_total(CPU, &n.resources_total, &n.resources_available),
            used_of_total(GPU, &n.resources_total, &n.resources_available),
            used_of_total(MEMORY, &n.resources_total, &n.resources_available),
            format!(
                "{}/{}",
                quantity(MEMORY, n.object_store_used_bytes as f64),
                quantity(MEMORY, n.object_store_capacity_bytes as f64)
            ),
            others.join(", "),
            head
        );
    }
    // Labels, the node's id left out (it heads the row already).
    let labelled: Vec<String> = status
        .nodes
        .iter()
        .map(|n| {
            let labels: Vec<String> = n
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != NODE_ID_LABEL)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("  {}  {}\n", n.node_id, labels.join(", "))
        })
        .collect();
    out += "\nLabels:\n";
    out += &labelled.concat();
    let mut total = ResourceSet::new();
    let mut available = ResourceSet::new();
    for n in &alive {
        total.add(&n.resources_total);
        available.add(&n.resources_available);
    }
    out += "\nResources in use (live nodes):\n";
    for (name, _) in total.iter() {
        out += &format!("  {name:<12} {}\n", used_of_total(name, &total, &available));
    }
    if !status.placement_groups.is_empty() {
        out += "\nPlacement groups:\n";
        out += &format!(
            "  {:<32}  {:<16}  {:<12}  {:<13}  {}\n",
            "ID", "NAME", "STATE", "STRATEGY", "BUNDLES (NODE)"
        );
        for g in &status.placement_groups {
            let bundles: Vec<String> = g
                .spec
                .bundles
                .iter()
                .zip(&g.bundle_nodes)
                .map(|(b, n)| {
                    let node = n.map_or_else(|| "-".to_string(), |n| n.to_string());
                    format!("{{{}}} ({node})", shape(b))
                })
                .collect();
            out += &format!(
                "  {:<32}  {:<16}  {:<12}  {:<13}  {}\n",
                g.spec.group_id,
                g.spec.name.as_deref().unwrap_or("-"),
                g.state,
                g.spec.strategy,
                bundles.join(", ")
            );
        }
    }
    let infeasible_groups: Vec<_> = status
        .placement_groups
        .iter()
        .filter(|g| g.infeasible)
        .collect();
    if !status.infeasible.is_empty() || !infeasible_groups.is_empty() {
        out += "\nInfeasible requests (no live node can fit them; they wait):\n";
        out += &format!("  {:<32}  {:<32}  {}\n", "JOB", "SHAPE", "STRATEGY");
        for r in &status.infeasible {
            let what = format!("{{{}}}", shape(&r.resources));
            out += &format!("  {:<32}  {what:<32}  {}\n", r.job_id, r.placement);
        }
        for g in infeasible_groups {
            let bundles: Vec<String> = g
                .spec
                .bundles
                .iter()
                .map(|b| format!("{{{}}}", shape(b)))
                .collect();
            out += &format!(
                "  {:<32}  {:<32}  placement group {} ({})\n",
                g.spec.job_id,
                bundles.join(" "),
                g.spec.group_id,
                g.spec.strategy
            );
        }
    }
    if status.handshakes_refused > 0 {
        out += &format!(
            "\nHandshakes refused since the head started: {}\n",
            status.handshakes_refused
        );
    }
    out
}
