//! Scenarios of Ray's core API that Shoal matches: worker environments,
//! cancellation and timeouts, multiple returns, actor concurrency groups,
//! streaming generators and borrowed references. Each prints one `RESULT {json}` line.

use serde_json::json;
use shoal::prelude::*;

use super::{pause, result};

#[path = "cancel.rs"]
mod cancel;
#[path = "stream.rs"]
mod stream;

/// The values of `names` in this worker's environment, and its pid.
#[shoal::remote]
fn read_env(names: Vec<String>) -> (Vec<Option<String>>, u32) {
    let values = names.iter().map(|n| std::env::var(n).ok()).collect();
    (values, std::process::id())
}

/// `read_env` of `K` run as a task of this task (which inherits its
/// environment).
#[shoal::remote]
fn read_env_nested() -> Option<String> {
    let (values, _) = read_env::remote(vec!["K".to_string()])
        .get()
        .expect("the nested task runs");
    values.into_iter().next().flatten()
}

/// An actor that reports its worker's environment.
#[shoal::actor]
pub struct EnvReader;

#[shoal::actor]
impl EnvReader {
    pub fn new() -> Self {
        EnvReader
    }

    pub fn read(&self, name: String) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Runs the scenario `name` if it is one of these (each initialises Shoal
/// itself); `None` otherwise.
pub fn run(name: &str) -> Option<shoal::Result<()>> {
    match name {
        "env" => Some(env()),
        "cancel" => Some(cancel::run()),
        "returns" => Some(returns()),
        "groups" => Some(groups()),
        "stream" => Some(stream::run()),
        "borrow" => Some(borrow()),
        _ => None,
    }
}

/// Worker environments: a job default, task and actor variables over it,
/// inheritance by nested tasks, no worker shared between environments, and
/// bad names refused.
fn env() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env().env_var("JOB_LEVEL", "job"))?;
    let names = || vec!["K".to_string(), "JOB_LEVEL".to_string()];
    let with_k = |v: &str| read_env::options().env_var("K", v);
    // Interleaved, so that a shared worker would show up.
    let mut refs = Vec::new();
    for _ in 0..6 {
        refs.push(("V1", with_k("V1").remote(names())));
        refs.push(("V2", with_k("V2").remote(names())));
        refs.push(("none", read_env::remote(names())));
    }
    let mut seen = serde_json::Map::new();
    let mut pids: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> =
        Default::default();
    for (tag, r) in refs {
        let (values, pid) = r.get()?;
        seen.insert(tag.to_string(), json!(values));
        pids.entry(tag).or_default().insert(pid);
    }
    let shared = pids["V1"].intersection(&pids["V2"]).count()
        + pids["V1"].intersection(&pids["none"]).count()
        + pids["V2"].intersection(&pids["none"]).count();
    let (overridden, _) = read_env::options()
        .env_var("JOB_LEVEL", "task")
        .remote(names())
        .get()?;
    let nested = read_env_nested::options()
        .env_var("K", "V3")
        .remote()
        .get()?;
    let actor = EnvReader::options().env_var("K", "actor").remote()?;
    let in_actor = actor.read("K".to_string()).get()?;
    let actor_job = actor.read("JOB_LEVEL".to_string()).get()?;
    let refused = |name: &str| match read_env::options().env_var(name, "1").remote(names()).get() {
        Err(Error::InvalidOptions(m)) => json!(m),
        other => json!(format!("not refused: {other:?}")),
    };
    let actor_refused = matches!(
        EnvReader::options().env_var("SHOAL_TOKEN", "x").remote(),
        Err(Error::InvalidOptions(_))
    );
    result(json!({
        "seen": seen,
        "shared_workers": shared,
        "driver_pid": std::process::id(),
        "pids_v1": pids["V1"],
        "pids_v2": pids["V2"],
        "overridden": overridden,
        "nested": nested,
        "actor": in_actor,
        "actor_job": actor_job,
        "refused_shoal": refused("SHOAL_X"),
        "refused_digit": refused("1BAD"),
        "actor_refused": actor_refused,
    }));
    Ok(())
}

/// Two returns: a large block and a short text about it.
#[shoal::remote(num_returns = 2)]
fn split(n: u64) -> (Vec<u8>, String) {
    (vec![7u8; n as usize], format!("{n} bytes"))
}

/// Three returns, or an error for all three.
#[shoal::remote(num_returns = 3)]
fn three(fail: bool) -> Result<(u32, String, Vec<u64>), String> {
    if fail {
        return Err("asked to fail".into());
    }
    Ok((1, "two".into(), vec![3, 3, 3]))
}

/// Two returns, after a long wait (to be cancelled).
#[shoal::remote(num_returns = 2)]
async fn slow_pair() -> (u32, u32) {
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    (1, 2)
}

/// The sum of the bytes.
#[shoal::remote]
fn total(v: Vec<u8>) -> u64 {
    v.iter().map(|b| u64::from(*b)).sum()
}

/// Multiple returns: each its own object (the large one stored, the small
/// one inline: the test lists the store between `HELD` and its go-ahead),
/// usable as arguments, failed together, cancelled together.
fn returns() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let n: u64 = 8 << 20;
    let (big, small) = split::remote(n);
    let text = small.get()?;
    let sum = total::remote(big.clone()).get()?;
    let len = big.get()?.len();
    pause(
        "HELD",
        json!({"big": big.id().to_string(), "small": small.id().to_string()}),
    );
    drop(small);
    let still = big.get()?.len();
    let (a, b, c) = three::remote(false);
    let values = json!([a.get()?, b.get()?, c.get()?]);
    let (a, b, c) = three::remote(true);
    let failed = [a.get().err(), b.get().err(), c.get().err()]
        .iter()
        .map(|e| matches!(e, Some(Error::Task(t)) if t.message.contains("asked to fail")))
        .collect::<Vec<bool>>();
    let (x, y) = slow_pair::remote();
    shoal::cancel(&y)?;
    let cancelled = [x.get(), y.get()]
        .iter()
        .map(|r| matches!(r, Err(Error::Cancelled { .. })))
        .collect::<Vec<bool>>();
    result(json!({
        "text": text, "sum": sum, "len": len, "still": still, "n": n,
        "values": values, "failed": failed, "cancelled": cancelled,
        "distinct": big.id() != x.id(),
    }));
    Ok(())
}

/// An actor with two concurrency groups, counting how many of each
/// group's calls run at once.
#[shoal::actor]
#[derive(Default)]
pub struct Grouped {
    io: Gauge,
    compute: Gauge,
    released: std::sync::atomic::AtomicBool,
}

/// Calls running now, and the most at once.
#[derive(Default)]
struct Gauge {
    now: std::sync::atomic::AtomicU32,
    max: std::sync::atomic::AtomicU32,
}

impl Gauge {
    fn enter(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(now, SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[shoal::actor(concurrency_groups(io = 2, compute = 1))]
impl Grouped {
    pub fn new() -> Self {
        Self::default()
    }

    #[shoal::method(concurrency_group = "io")]
    pub async fn fetch(&self, ms: u64) -> u32 {
        self.io.enter();
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        self.io.leave();
        1
    }

    #[shoal::method(concurrency_group = "compute")]
    pub fn crunch(&self, ms: u64) -> u32 {
        self.compute.enter();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        self.compute.leave();
        1
    }

    /// Holds the compute group until `release` (or 30 s): true if
    /// released.
    #[shoal::method(concurrency_group = "compute")]
    pub fn hold(&self) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if self.released.load(std::sync::atomic::Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }

    #[shoal::method(concurrency_group = "io")]
    pub fn release(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The most io and compute calls that ran at once (default group).
    pub fn maxima(&self) -> (u32, u32) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.io.max.load(SeqCst), self.compute.max.load(SeqCst))
    }
}

/// Concurrency groups: a busy group does not hold up another's calls (from
/// the same handle), and each group runs at most its size at once.
fn groups() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let actor = Grouped::remote()?;
    let held = actor.hold();
    actor.release().get()?;
    let released = held.get()?;
    let io: Vec<_> = (0..6).map(|_| actor.fetch(150)).collect();
    let compute: Vec<_> = (0..3).map(|_| actor.crunch(100)).collect();
    shoal::get_all(&io)?;
    shoal::get_all(&compute)?;
    let (io_max, compute_max) = actor.maxima().get()?;
    result(json!({"released": released, "io_max": io_max, "compute_max": compute_max}));
    Ok(())
}

/// A long-lived service that reads the blocks it is handed, and may hold
/// the last few.
#[shoal::actor]
#[derive(Default)]
pub struct BlockService {
    bytes: u64,
    held: std::collections::VecDeque<ObjectRef<shoal::Bytes>>,
}

#[shoal::actor]
impl BlockService {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads each block and drops its reference.
    pub fn consume(&mut self, blocks: Vec<ObjectRef<shoal::Bytes>>) -> u64 {
        for block in blocks {
            self.bytes += block.get().map_or(0, |b| b.0.len() as u64);
        }
        self.bytes
    }

    /// Reads each block and holds the last three references.
    pub fn hold(&mut self, blocks: Vec<ObjectRef<shoal::Bytes>>) -> usize {
        for block in blocks {
            self.bytes += block.get().map_or(0, |b| b.0.len() as u64);
            self.held.push_back(block);
            if self.held.len() > 3 {
                self.held.pop_front();
            }
        }
        self.held.len()
    }

    /// Lets go of what it holds.
    pub fn release(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        n
    }
}

/// Borrowed references freed: a detached service is handed `n` blocks of
/// 10 MB, one at a time, each inside a `Vec` (the driver drops its own
/// reference after each call); then blocks it holds on to for a while,
/// then lets go of (`RELEASED`: the test checks the store meanwhile).
fn borrow() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let block = 10usize << 20;
    let service = BlockService::options()
        .name(&format!("blocks-{}", std::process::id()))
        .lifetime_detached()
        .remote()?;
    let started = std::time::Instant::now();
    let mut read = 0;
    for i in 0..n {
        let r = shoal::put(shoal::Bytes(vec![i as u8; block]))?;
        read = service.consume(vec![r.clone()]).get()?;
        drop(r);
    }
    let consume_secs = started.elapsed().as_secs_f64();
    let mut held = 0;
    for i in 0..20 {
        let r = shoal::put(shoal::Bytes(vec![i as u8; block]))?;
        held = service.hold(vec![r.clone()]).get()?;
        drop(r);
    }
    pause("HOLDING", json!({"held": held}));
    let released = service.release().get()?;
    pause("RELEASED", json!({"released": released}));
    shoal::kill(&service, true)?;
    result(json!({
        "read": read, "expected": (n * block) as u64, "held": held, "released": released,
        "consume_secs": consume_secs,
    }));
    Ok(())
}
