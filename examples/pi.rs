//! Monte Carlo estimate of π over many tasks: each task throws darts at the
//! unit square with its own seed and counts the hits inside the quarter
//! circle; the driver adds them up.
//!
//! Run: `cargo run -p shoal-examples --bin pi -- [tasks] [darts per task]`
//! (on a cluster: prefix `SHOAL_ADDRESS=host:port`)

use std::time::Instant;

use shoal::prelude::*;

/// Hits inside the quarter circle among `darts` throws (xorshift64*, seeded).
#[shoal::remote]
fn throw_darts(seed: u64, darts: u64) -> u64 {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..darts)
        .filter(|_| {
            let (x, y) = (next(), next());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let mut args = std::env::args().skip(1);
    let tasks: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let darts: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let start = Instant::now();
    let hits: Vec<ObjectRef<u64>> = (0..tasks)
        .map(|seed| throw_darts::remote(seed, darts))
        .collect();
    let total: u64 = shoal::get_all(&hits)?.iter().sum();
    let pi = 4.0 * total as f64 / (tasks * darts) as f64;
    println!(
        "pi ≈ {pi:.6} from {} darts in {tasks} tasks ({:.2?})",
        tasks * darts,
        start.elapsed()
    );
    println!("error {:.6}", (pi - std::f64::consts::PI).abs());
    Ok(())
}
