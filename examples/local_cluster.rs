//! A whole Shoal cluster inside one process: a head, its node and two more
//! node daemons on loopback. The program shows the cluster, kills one node
//! without warning, waits for the head to notice (failure detection), and
//! starts a replacement, which joins as a new node.
//!
//! Run: `cargo run -p shoal-examples --bin local_cluster`

use std::time::{Duration, Instant};

use shoal::{LocalCluster, LocalClusterExt, LocalConfig, NodeState, ResourceSet};

fn cpus(n: f64) -> ResourceSet {
    let mut r = ResourceSet::new();
    r.set("CPU", n);
    r
}

fn show(status: &shoal::ClusterStatus) {
    for n in &status.nodes {
        let state = match n.state {
            NodeState::Alive => "ALIVE",
            NodeState::Dead => "DEAD ",
        };
        let head = if n.is_head_node { " (head)" } else { "" };
        println!(
            "  {} {state} CPU {}{head}",
            n.node_id,
            n.resources_total.get("CPU")
        );
    }
}

#[tokio::main]
async fn main() -> shoal::Result<()> {
    let config = LocalConfig {
        head_node_cpus: 1.0,
        heartbeat_interval: Duration::from_millis(200),
        node_timeout: Duration::from_secs(2),
        ..LocalConfig::default()
    };
    let timeout = config.node_timeout;
    let mut cluster = LocalCluster::start(config).await?;
    let a = cluster.add_node(cpus(2.0)).await?;
    cluster.add_node(cpus(2.0)).await?;
    let client = cluster.client().await?;
    println!(
        "cluster {} at {}:",
        cluster.token().cluster_id,
        cluster.address()
    );
    show(&client.status().await?);

    let killed = cluster.kill_node(a).await?;
    println!("killed node {killed}; waiting for the head to notice (timeout {timeout:?})");
    let started = Instant::now();
    loop {
        let status = client.status().await?;
        if status
            .nodes
            .iter()
            .any(|n| n.node_id == killed && n.state == NodeState::Dead)
        {
            println!("declared dead after {:?}", started.elapsed());
            break;
        }
        if started.elapsed() > timeout * 10 {
            return Err(shoal::Error::NotFound(format!(
                "node {killed} was never declared dead"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replacement = cluster.add_node(cpus(2.0)).await?;
    println!(
        "replacement joined as node {}",
        cluster
            .node_id(replacement)
            .map(|id| id.to_string())
            .unwrap_or_default()
    );
    show(&client.status().await?);
    client.close().await;
    cluster.shutdown().await;
    Ok(())
}
