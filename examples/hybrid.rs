//! One job, three kinds of work, and when each model pays off:
//! - I/O-bound work (simulated by timers) as an `async fn`: one task awaits
//!   many requests at once, so 100 requests of 20 ms take about 20 ms, not
//!   2 s; the same loop in a sync task waits for each in turn.
//! - CPU-bound work as many sync tasks: they spread over every core of every
//!   node, so k tasks take about k / cores times one task.
//! - A task that uses threads inside (`std::thread::scope`) and asks for 2
//!   CPUs: parallelism inside one task, with no serialization between the
//!   threads, for data already in one place.
//!
//! Run: `cargo run -p shoal-examples --bin hybrid`

use std::time::{Duration, Instant};

/// `n` requests of `ms` each, awaited concurrently.
#[shoal::remote]
async fn fetch_concurrently(n: u32, ms: u64) -> u32 {
    let requests = (0..n).map(|i| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        i
    });
    futures_join(requests).await.len() as u32
}

async fn futures_join<F: std::future::Future<Output = u32> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<u32> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("request"));
    }
    out
}

/// The same `n` requests, one after another.
#[shoal::remote]
fn fetch_sequentially(n: u32, ms: u64) -> u32 {
    (0..n)
        .map(|_| std::thread::sleep(Duration::from_millis(ms)))
        .count() as u32
}

/// Primes below `limit`, by trial division: pure CPU.
#[shoal::remote]
fn count_primes(from: u64, to: u64) -> u64 {
    (from..to)
        .filter(|n| *n >= 2 && (2..).take_while(|d| d * d <= *n).all(|d| n % d != 0))
        .count() as u64
}

/// Sum of squares over `data`, split over two threads inside the task.
#[shoal::remote(num_cpus = 2)]
fn sum_of_squares_threaded(data: Vec<u32>) -> u64 {
    let (left, right) = data.split_at(data.len() / 2);
    let square_sum = |part: &[u32]| {
        part.iter()
            .map(|x| u64::from(*x) * u64::from(*x))
            .sum::<u64>()
    };
    std::thread::scope(|s| {
        let l = s.spawn(|| square_sum(left));
        let r = square_sum(right);
        l.join().expect("thread") + r
    })
}

fn timed<T>(what: &str, f: impl FnOnce() -> shoal::Result<T>) -> shoal::Result<T> {
    let start = Instant::now();
    let out = f()?;
    println!("  {what:<48} {:>9.1?}", start.elapsed());
    Ok(out)
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    println!("I/O-bound: 100 requests of 20 ms");
    let a = timed("async task, requests awaited together", || {
        fetch_concurrently::remote(100, 20).get()
    })?;
    let b = timed("sync task, requests one after another", || {
        fetch_sequentially::remote(100, 20).get()
    })?;
    assert_eq!((a, b), (100, 100));

    println!("CPU-bound: primes below 400 000");
    let one = timed("one task", || count_primes::remote(0, 400_000).get())?;
    let split = timed("8 tasks over the cluster's cores", || {
        let parts: Vec<_> = (0..8)
            .map(|i| count_primes::remote(i * 50_000, (i + 1) * 50_000))
            .collect();
        Ok(shoal::get_all(&parts)?.iter().sum::<u64>())
    })?;
    assert_eq!(one, split);
    println!("  {one} primes either way");

    println!("Threads inside one task: sum of squares of 1 M numbers");
    let data: Vec<u32> = (0..1_000_000u32).map(|i| i % 1000).collect();
    let expected: u64 = data.iter().map(|x| u64::from(*x) * u64::from(*x)).sum();
    let got = timed("one task, two threads (num_cpus = 2)", || {
        sum_of_squares_threaded::remote(data).get()
    })?;
    assert_eq!(got, expected);
    println!("all results check out");
    Ok(())
}
