//! `shoal microbenchmark`: Ray's microbenchmark metric set, on a local
//! cluster with worker processes (this binary re-run in worker mode).
//!
//! Method (as Ray's): each metric runs its operation in a loop for a 1 s
//! warm-up, then 4 rounds of 2 s (both scaled by `--duration-scale`); a
//! round's rate is operations x the metric's multiplier / seconds. Printed
//! as `NAME per second MEAN +- SD`. `SHOAL_BENCH_FILTER=substring` runs the
//! metrics whose name contains it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use shoal::prelude::*;
use shoal::{ActorHandle, Buffer};

#[derive(Debug, clap::Args)]
pub struct MicrobenchmarkArgs {
    /// Print the figures as JSON (one object with a row per metric).
    #[arg(long)]
    json: bool,
    /// Scale every duration (warm-up and rounds) by this factor, above 0;
    /// a small one (0.01) only proves each metric runs.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = factor)]
    duration_scale: f64,
    /// Scale the number of calls, tasks and puts in one operation (at least
    /// one each), in (0, 1]; the figures stay per call. Below 1 only for
    /// smoke runs: the metrics are defined at 1.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = batch_factor)]
    batch_scale: f64,
}

/// Every metric, in the order they run (Ray's).
const METRICS: &[&str] = &[
    "single client get calls (Plasma Store)",
    "single client put calls (Plasma Store)",
    "multi client put calls (Plasma Store)",
    "single client put gigabytes",
    "single client tasks and get batch",
    "multi client put gigabytes",
    "single client get object containing 10k refs",
    "single client wait 1k refs",
    "single client tasks sync",
    "single client tasks async",
    "multi client tasks async",
    "1:1 actor calls sync",
    "1:1 actor calls async",
    "1:1 actor calls concurrent",
    "1:n actor calls async",
    "n:n actor calls async",
    "n:n actor calls with arg async",
    "1:1 async-actor calls sync",
    "1:1 async-actor calls async",
    "1:1 async-actor calls with args async",
    "1:n async-actor calls async",
    "n:n async-actor calls async",
    PLACEMENT_GROUPS,
];

/// Placement groups created, awaited and removed.
const PLACEMENT_GROUPS: &str = "placement group create/removal";

// Flag parsers of this binary: anyhow, as everywhere in it (clap prints
// the message).
fn factor(s: &str) -> Result<f64> {
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f > 0.0)
        .ok_or_else(|| anyhow::anyhow!("{s:?} is not a number above 0"))
}

fn batch_factor(s: &str) -> Result<f64> {
    match factor(s)? {
        f if f > 1.0 => anyhow::bail!("{s} is above 1 (the metrics are defined at 1)"),
        f => Ok(f),
    }
}

/// The small value Ray's workloads return.
fn ok() -> Vec<u8> {
    b"ok".to_vec()
}

#[shoal::remote]
fn small_value() -> Vec<u8> {
    ok()
}

#[shoal::remote]
fn small_value_arg(_x: Buffer) -> Vec<u8> {
    ok()
}

#[shoal::remote(num_cpus = 0)]
fn do_puts(n: u32) -> u32 {
    for _ in 0..n {
        drop(shoal::put(0u64).expect("put"));
    }
    n
}

#[shoal::remote(num_cpus = 0)]
fn do_large_puts(n: u32, bytes: u64) -> u32 {
    for _ in 0..n {
        // As numpy's zeros in Ray's: zero memory on huge pages.
        let zeros = shoal::BufferMut::zeroed(bytes as usize).expect("memory");
        drop(shoal::put(zeros.freeze()).expect("put"));
    }
    n
}

/// `calls` calls of `call` spread over `actors` in turn, then gets them.
fn round_robin<A>(actors: &[A], calls: u32, call: impl Fn(&A) -> ObjectRef<Vec<u8>>) -> u32 {
    let refs: Vec<_> = (0..calls)
        .map(|i| call(&actors[i as usize % actors.len()]))
        .collect();
    shoal::get_all(&refs).expect("calls").len() as u32
}

#[shoal::remote(num_cpus = 0)]
fn call_actors(actors: Vec<ActorHandle<Sink>>, calls: u32) -> u32 {
    round_robin(&actors, calls, |a| a.small_value())
}

#[shoal::remote(num_cpus = 0)]
fn call_async_actors(actors: Vec<ActorHandle<AsyncSink>>, calls: u32) -> u32 {
    round_robin(&actors, calls, |a| a.small_value())
}

/// An actor whose methods return the small value.
#[shoal::actor]
pub struct Sink;

#[shoal::actor]
impl Sink {
    pub fn new() -> Self {
        Sink
    }

    pub fn small_value(&self) -> Vec<u8> {
        ok()
    }

    pub fn small_value_arg(&self, _x: Buffer) -> Vec<u8> {
        ok()
    }
}

/// The same with `async fn` methods.
#[shoal::actor]
pub struct AsyncSink;

#[shoal::actor]
impl AsyncSink {
    pub fn new() -> Self {
        AsyncSink
    }

    pub async fn small_value(&self) -> Vec<u8> {
        ok()
    }

    pub async fn small_value_arg(&self, _x: Buffer) -> Vec<u8> {
        ok()
    }
}

/// An actor that calls other actors, or submits tasks, from its process.
#[shoal::actor]
pub struct Client {
    sinks: Vec<ActorHandle<Sink>>,
    async_sinks: Vec<ActorHandle<AsyncSink>>,
}

#[shoal::actor]
impl Client {
    pub fn new(sinks: Vec<ActorHandle<Sink>>, async_sinks: Vec<ActorHandle<AsyncSink>>) -> Self {
        Client { sinks, async_sinks }
    }

    /// `calls` calls to each sink, then get them all.
    pub fn call_each(&self, calls: u32) -> u32 {
        let mut refs = Vec::new();
        for sink in &self.sinks {
            refs.extend((0..calls).map(|_| sink.small_value()));
        }
        let mut async_refs = Vec::new();
        for sink in &self.async_sinks {
            async_refs.extend((0..calls).map(|_| sink.small_value()));
        }
        (shoal::get_all(&refs).expect("calls").len()
            + shoal::get_all(&async_refs).expect("calls").len()) as u32
    }

    /// `calls` calls with a put object as argument to each sink.
    pub fn call_each_with_arg(&self, calls: u32) -> u32 {
        let arg = shoal::put(Buffer::from_vec(vec![0u8; 1024])).expect("put");
        let mut refs = Vec::new();
        for sink in &self.sinks {
            refs.extend((0..calls).map(|_| sink.small_value_arg(&arg)));
        }
        shoal::get_all(&refs).expect("calls").len() as u32
    }

    /// Submits `n` small tasks and gets them.
    pub fn submit_tasks(&self, n: u32) -> u32 {
        let refs: Vec<_> = (0..n).map(|_| small_value::remote()).collect();
        shoal::get_all(&refs).expect("tasks").len() as u32
    }
}

/// One metric's result.
struct Figure {
    name: String,
    mean: f64,
    sd: f64,
}

struct Bench {
    scale: f64,
    filter: Option<String>,
    figures: Vec<Figure>,
    json: bool,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| name.contains(f.as_str()))
    }

    /// Runs `op` (worth `multiplier` of the metric's unit) for the warm-up
    /// and the 4 rounds; each round runs it at least once.
    fn run(
        &mut self,
        name: &str,
        multiplier: f64,
        mut op: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        debug_assert!(METRICS.contains(&name), "{name} is missing from METRICS");
        if !self.wanted(name) {
            return Ok(());
        }
        let timed = |secs: f64, op: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let limit = Duration::from_secs_f64(secs * self.scale);
            let start = Instant::now();
            let mut count = 0u64;
            while count == 0 || start.elapsed() < limit {
                op().with_context(|| name.to_string())?;
                count += 1;
            }
            Ok(count as f64 * multiplier / start.elapsed().as_secs_f64())
        };
        timed(1.0, &mut op)?;
        let rounds = (0..4)
            .map(|_| timed(2.0, &mut op))
            .collect::<Result<Vec<f64>>>()?;
        let mean = rounds.iter().sum::<f64>() / rounds.len() as f64;
        let var = rounds.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rounds.len() as f64;
        let figure = Figure {
            name: name.to_string(),
            mean,
            sd: var.sqrt(),
        };
        if !self.json {
            println!(
                "{} per second {:.2} +- {:.2}",
                figure.name, figure.mean, figure.sd
            );
        }
        self.figures.push(figure);
        Ok(())
    }
}

fn get_ok<T: serde::de::DeserializeOwned + Send + 'static>(r: ObjectRef<T>) -> Result<()> {
    r.get()?;
    Ok(())
}

/// Submits everything `refs` makes, then gets them all.
fn all_ok<T: serde::de::DeserializeOwned + Send + 'static>(
    refs: impl IntoIterator<Item = ObjectRef<T>>,
) -> Result<()> {
    let refs: Vec<_> = refs.into_iter().collect();
    shoal::get_all(&refs)?;
    Ok(())
}

pub fn run(args: MicrobenchmarkArgs) -> Result<()> {
    let filter = std::env::var("SHOAL_BENCH_FILTER")
        .ok()
        .filter(|f| !f.is_empty());
    if let Some(f) = &filter {
        anyhow::ensure!(
            METRICS.iter().any(|m| m.contains(f.as_str())),
            "SHOAL_BENCH_FILTER={f:?} matches no metric; the metrics are:\n  {}",
            METRICS.join("\n  ")
        );
    }
    let cpus = shoal_node::machine::detect_cpus().max(2);
    let _shoal = shoal::init(shoal::Config::local().worker_processes(true))
        .context("starting a local cluster")?;
    let mut b = Bench {
        scale: args.duration_scale,
        filter,
        figures: Vec::new(),
        json: args.json,
    };
    let n = (cpus / 2).max(1);
    let batch = args.batch_scale;
    let k = |count: u32| ((f64::from(count) * batch).round() as u32).max(1);
    let (k10, k100, k1000, k5000, k10k) = (k(10), k(100), k(1000), k(5000), k(10_000));

    // Objects.
    let small = shoal::put(ok())?;
    b.run("single client get calls (Plasma Store)", 1.0, || {
        small.get()?;
        Ok(())
    })?;
    b.run("single client put calls (Plasma Store)", 1.0, || {
        drop(shoal::put(0u64)?);
        Ok(())
    })?;
    b.run(
        "multi client put calls (Plasma Store)",
        f64::from(k10 * k100),
        || all_ok((0..k10).map(|_| do_puts::remote(k100))),
    )?;
    if b.wanted("single client put gigabytes") {
        // As Ray's: one buffer made before the loop, put again and again.
        let buffer = Buffer::from_vec(vec![0u8; 800_000_000]);
        b.run("single client put gigabytes", 0.8, || {
            drop(shoal::put(buffer.clone())?);
            Ok(())
        })?;
    }
    b.run("single client tasks and get batch", 1.0, || {
        all_ok((0..k1000).map(|_| small_value::remote()))
    })?;
    b.run(
        "multi client put gigabytes",
        f64::from(k10 * k10) * 0.08,
        || all_ok((0..k10).map(|_| do_large_puts::remote(k10, 80_000_000u64))),
    )?;
    if b.wanted("single client get object containing 10k refs") {
        let refs: Vec<ObjectRef<Vec<u8>>> = (0..k10k)
            .map(|_| shoal::put(ok()))
            .collect::<shoal::Result<_>>()?;
        let holder = shoal::put(refs)?;
        b.run("single client get object containing 10k refs", 1.0, || {
            let got: Vec<ObjectRef<Vec<u8>>> = holder.get()?;
            anyhow::ensure!(got.len() == k10k as usize, "got {} refs", got.len());
            Ok(())
        })?;
    }
    b.run("single client wait 1k refs", 1.0, || {
        let mut pending: Vec<_> = (0..k1000).map(|_| small_value::remote()).collect();
        while !pending.is_empty() {
            let (_, rest) = shoal::wait(&pending, 1, None)?;
            pending = rest;
        }
        Ok(())
    })?;

    // Tasks.
    b.run("single client tasks sync", 1.0, || {
        get_ok(small_value::remote())
    })?;
    b.run("single client tasks async", f64::from(k1000), || {
        all_ok((0..k1000).map(|_| small_value::remote()))
    })?;
    if b.wanted("multi client tasks async") {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                Client::remote(
                    Vec::<ActorHandle<Sink>>::new(),
                    Vec::<ActorHandle<AsyncSink>>::new(),
                )
            })
            .collect::<shoal::Result<_>>()?;
        b.run("multi client tasks async", f64::from(4 * k10k), || {
            all_ok(clients.iter().map(|c| c.submit_tasks(k10k)))
        })?;
    }

    // Actors.
    let sink = Sink::remote()?;
    b.run("1:1 actor calls sync", 1.0, || get_ok(sink.small_value()))?;
    b.run("1:1 actor calls async", f64::from(k1000), || {
        all_ok((0..k1000).map(|_| sink.small_value()))
    })?;
    if b.wanted("1:1 actor calls concurrent") {
        let concurrent = Sink::options().max_concurrency(16).remote()?;
        b.run("1:1 actor calls concurrent", f64::from(k1000), || {
            all_ok((0..k1000).map(|_| concurrent.small_value()))
        })?;
    }
    if b.wanted("1:n actor calls async") {
        let sinks: Vec<_> = (0..n)
            .map(|_| Sink::remote())
            .collect::<shoal::Result<_>>()?;
        let client = Client::remote(sinks, Vec::<ActorHandle<AsyncSink>>::new())?;
        b.run("1:n actor calls async", f64::from(k5000) * n as f64, || {
            get_ok(client.call_each(k5000))
        })?;
    }
    if b.wanted("n:n actor calls async") {
        let sinks: Vec<_> = (0..n)
            .map(|_| Sink::remote())
            .collect::<shoal::Result<_>>()?;
        b.run("n:n actor calls async", f64::from(4 * k5000), || {
            all_ok((0..4).map(|_| call_actors::remote(sinks.clone(), k5000)))
        })?;
    }
    if b.wanted("n:n actor calls with arg async") {
        let clients: Vec<_> = (0..n)
            .map(|_| Client::remote(vec![Sink::remote()?], Vec::<ActorHandle<AsyncSink>>::new()))
            .collect::<shoal::Result<_>>()?;
        b.run(
            "n:n actor calls with arg async",
            f64::from(k1000) * n as f64,
            || all_ok(clients.iter().map(|c| c.call_each_with_arg(k1000))),
        )?;
    }
    let async_sink = AsyncSink::remote()?;
    b.run("1:1 async-actor calls sync", 1.0, || {
        get_ok(async_sink.small_value())
    })?;
    b.run("1:1 async-actor calls async", f64::from(k1000), || {
        all_ok((0..k1000).map(|_| async_sink.small_value()))
    })?;
    if b.wanted("1:1 async-actor calls with args async") {
        let arg = shoal::put(Buffer::from_vec(vec![0u8; 1024]))?;
        b.run(
            "1:1 async-actor calls with args async",
            f64::from(k1000),
            || all_ok((0..k1000).map(|_| async_sink.small_value_arg(&arg))),
        )?;
    }
    if b.wanted("1:n async-actor calls async") {
        let sinks: Vec<_> = (0..n)
            .map(|_| AsyncSink::remote())
            .collect::<shoal::Result<_>>()?;
        let client = Client::remote(Vec::<ActorHandle<Sink>>::new(), sinks)?;
        b.run(
            "1:n async-actor calls async",
            f64::from(k5000) * n as f64,
            || get_ok(client.call_each(k5000)),
        )?;
    }
    if b.wanted("n:n async-actor calls async") {
        let sinks: Vec<_> = (0..n)
            .map(|_| AsyncSink::remote())
            .collect::<shoal::Result<_>>()?;
        b.run("n:n async-actor calls async", f64::from(4 * k5000), || {
            all_ok((0..4).map(|_| call_async_actors::remote(sinks.clone(), k5000)))
        })?;
    }
    // As Ray's: 100 one-bundle groups created, each waited for, then each
    // removed.
    b.run(PLACEMENT_GROUPS, f64::from(k100), || {
        let groups: Vec<_> = (0..k100)
            .map(|_| {
                shoal::placement_group(
                    vec![shoal::Bundle::new().cpus(0.001)],
                    shoal::PlacementStrategy::Pack,
                )
            })
            .collect::<shoal::Result<_>>()?;
        for group in &groups {
            anyhow::ensure!(
                group.wait(Duration::from_secs(30))?,
                "placement group {} was not created within 30 s",
                group.id()
            );
        }
        for group in &groups {
            shoal::remove_placement_group(group)?;
        }
        Ok(())
    })?;
    if args.json {
        let rows: Vec<_> = b
            .figures
            .iter()
            .map(|f| json!({"name": f.name, "per_second": f.mean, "sd": f.sd}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"metrics": rows}))?
        );
    }
    Ok(())
}
