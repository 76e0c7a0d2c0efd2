//! `shoal-sim`: runs the cluster simulation for one seed or many.

use clap::Parser;

/// Runs the deterministic simulation of a Shoal cluster (head, nodes,
/// owners, workers, an actor) under faults drawn from a seed, and checks its
/// invariants at every step. The same seed gives the same trace hash.
#[derive(Parser, Debug)]
#[command(name = "shoal-sim", version)]
struct Args {
    /// Run this one seed; the last line says `seed N: trace <hex>, <k>
    /// events, invariants ok` (or the broken invariant and its step).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run seeds FIRST..FIRST+N and list the failing ones.
    #[arg(long)]
    seeds: Option<u64>,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// With `--seeds`: print only the failing seeds and the summary.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let args = Args::parse();
    if let Some(count) = args.seeds {
        let mut failed = Vec::new();
        for seed in args.first..args.first + count {
            let report = shoal_sim::run(seed);
            if report.violation.is_some() {
                failed.push(seed);
                println!("{report}");
            } else if !args.quiet {
                println!("{report}");
            }
        }
        if failed.is_empty() {
            println!("{count} seeds from {}: all invariants ok", args.first);
        } else {
            println!("{} of {count} seeds failed: {failed:?}", failed.len());
            std::process::exit(1);
        }
        return;
    }
    let seed = args.seed.unwrap_or(0);
    let report = shoal_sim::run(seed);
    println!("{report}");
    if report.violation.is_some() {
        std::process::exit(1);
    }
}
