//! A tree of nested tasks: each task below the leaves submits `fanout`
//! children and adds up what they return; the root's value is the number of
//! leaves. Parents wait for their children while holding no CPU (a blocked
//! task lends its CPU back), so the tree finishes on any number of cores.
//!
//! Run: `cargo run -p shoal-examples --bin fanout -- [depth] [fanout]`

use std::time::Instant;

use shoal::prelude::*;

/// Leaves under this node of the tree.
#[shoal::remote]
fn subtree(depth: u32, fanout: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    let children: Vec<ObjectRef<u64>> = (0..fanout)
        .map(|_| subtree::remote(depth - 1, fanout))
        .collect();
    shoal::get_all(&children).expect("children").iter().sum()
}

// `#[shoal::main]` runs the worker loop before the body when this program is
// started as a worker, so `init` may come later (here, after parsing args).
#[shoal::main]
fn main() -> shoal::Result<()> {
    let mut args = std::env::args().skip(1);
    let depth: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let fanout: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let start = Instant::now();
    let leaves = subtree::remote(depth, fanout).get()?;
    let tasks: u64 = (0..=depth).map(|d| u64::from(fanout).pow(d)).sum();
    assert_eq!(leaves, u64::from(fanout).pow(depth));
    println!(
        "a tree of depth {depth} and fanout {fanout}: {leaves} leaves, {tasks} tasks, in {:.2?}",
        start.elapsed()
    );
    Ok(())
}
