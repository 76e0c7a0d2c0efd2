//! Measures two job shapes users write, in whatever mode the environment
//! picks (local mode with thread workers by default; worker processes with
//! `SHOAL_WORKER_PROCESSES=1`; a cluster with `SHOAL_ADDRESS`):
//! - nested tasks: recursive `fib(n)`, a tree of tasks each blocking in
//!   `get` on its two children (465 tasks for n = 12);
//! - fan-out: N small tasks submitted at once by the driver, then got.
//!
//! Each is run once to warm up (workers started, code paged in), then
//! `--runs` times; each run's time is printed, then the median.
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_shapes --
//! [--fib N] [--fanout N] [--runs K]`

use std::time::Instant;

#[path = "flags.rs"]
mod flags;

/// The `n`th Fibonacci number, as a tree of nested tasks.
#[shoal::remote]
fn fib(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let (a, b) = (fib::remote(n - 1), fib::remote(n - 2));
    a.get().expect("fib(n - 1)") + b.get().expect("fib(n - 2)")
}

#[shoal::remote]
fn noop(i: u32) -> u32 {
    i
}

fn fib_tasks(n: u64) -> u64 {
    if n < 2 {
        1
    } else {
        1 + fib_tasks(n - 1) + fib_tasks(n - 2)
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[shoal::main]
fn main() -> shoal::Result<()> {
    let flags = flags::Flags::parse(
        "bench_shapes",
        &["--fib", "--fanout", "--runs"],
        "bench_shapes [--fib N] [--fanout N] [--runs K]",
    );
    let option = |flag: &str, default: u64| flags.get(flag, default);
    let (n, fanout, runs) = (
        option("--fib", 12),
        option("--fanout", 20_000),
        option("--runs", 5),
    );
    let _shoal = shoal::init(shoal::Config::from_env())?;
    if n > 0 {
        let mut times = Vec::new();
        for run in 0..=runs {
            let start = Instant::now();
            let value = fib::remote(n).get()?;
            let took = start.elapsed().as_secs_f64();
            assert_eq!(value, (1..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).1);
            let what = if run == 0 { "warm-up" } else { "run" };
            println!("fib({n}), {} tasks: {what} {took:.3} s", fib_tasks(n));
            if run > 0 {
                times.push(took);
            }
        }
        println!("fib({n}): median {:.3} s", median(times));
    }
    if fanout > 0 {
        let mut rates = Vec::new();
        for run in 0..=runs {
            let start = Instant::now();
            let refs: Vec<_> = (0..fanout as u32).map(noop::remote).collect();
            let got = shoal::get_all(&refs)?;
            let took = start.elapsed().as_secs_f64();
            assert_eq!(got.len(), fanout as usize);
            let rate = fanout as f64 / took;
            let what = if run == 0 { "warm-up" } else { "run" };
            println!("fan-out of {fanout} tasks: {what} {rate:.0} tasks/s");
            if run > 0 {
                rates.push(rate);
            }
        }
        println!("fan-out of {fanout}: median {:.0} tasks/s", median(rates));
    }
    Ok(())
}
