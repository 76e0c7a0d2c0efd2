//! Measures what a queued task costs its owner: submits N tasks that cannot
//! start yet (they ask for a resource no node has, so they wait for one) and
//! reports the driver's resident memory per queued task and the submission
//! rate, then exits (the queued tasks end with the job).
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_scale -- [N]`
//! (default 1 000 000).

use std::time::{Duration, Instant};

use shoal::prelude::*;

#[shoal::remote]
fn noop(i: u32) -> u32 {
    i
}

/// This process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[shoal::main]
fn main() -> shoal::Result<()> {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let before = resident_bytes();
    let start = Instant::now();
    let refs: Vec<ObjectRef<u32>> = (0..n)
        .map(|i| noop::options().resource("absent", 1.0).remote(i))
        .collect();
    let submitted = start.elapsed();
    // The submissions settle into the lease queue on the runtime: measure
    // once the resident size stops growing.
    let mut last = resident_bytes();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = resident_bytes();
        if now <= last + (1 << 20) {
            break;
        }
        last = now;
    }
    let after = resident_bytes();
    let per_task = after.saturating_sub(before) / u64::from(n.max(1));
    println!(
        "{n} tasks queued: submitted in {submitted:.2?} ({:.0} per second); resident {} MiB -> {} MiB, {per_task} bytes per queued task",
        f64::from(n) / submitted.as_secs_f64(),
        before >> 20,
        after >> 20,
    );
    drop(refs);
    Ok(())
}
