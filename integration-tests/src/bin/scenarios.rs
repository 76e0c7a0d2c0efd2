//! Driver programs the integration tests run against a cluster (or in local
//! mode): each scenario submits real tasks and prints one `RESULT {json}`
//! line that the test checks. Workers are this executable re-run in worker
//! mode, so the remote functions below are what they run.
//!
//! Run: `SHOAL_ADDRESS=host:port scenarios <name> [args]` (no address: local mode).

#[path = "scenarios/parity.rs"]
mod parity;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal::prelude::*;
use shoal_net::sync::MutexExt;

/// The node this task runs on.
#[shoal::remote]
fn where_am_i(i: u64) -> (u64, String) {
    let node = shoal::context()
        .map(|c| c.node_id.to_string())
        .unwrap_or_default();
    (i, node)
}

/// Marks `dir/me` and waits (at most 30 s) for `dir/other`: true when the
/// other task was running at the same time.
#[shoal::remote]
fn meet(dir: String, me: u32, other: u32) -> bool {
    let dir = std::path::Path::new(&dir);
    if std::fs::write(dir.join(me.to_string()), b"here").is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join(other.to_string()).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// `size` bytes of a known pattern.
#[shoal::remote]
fn make_blob(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect()
}

/// A checksum of the bytes, and where it was computed.
#[shoal::remote]
fn checksum(data: Vec<u8>) -> (u64, u64, String) {
    let node = shoal::context()
        .map(|c| c.node_id.to_string())
        .unwrap_or_default();
    (data.len() as u64, fnv(&data), node)
}

/// The bytes of object `seed`, `mb` MiB: every 8-byte word differs.
fn pattern(seed: u64, mb: u64) -> Vec<u8> {
    let words = (mb << 20) / 8;
    let mut v = Vec::with_capacity((mb << 20) as usize);
    for i in 0..words {
        v.extend_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).to_le_bytes());
    }
    v
}

/// A fast checksum: the wrapping sum of the 8-byte words, weighted by place.
fn word_sum(data: &[u8]) -> u64 {
    data.chunks_exact(8)
        .enumerate()
        .fold(data.len() as u64, |acc, (i, w)| {
            let word = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            acc.wrapping_add(word.wrapping_mul(i as u64 | 1))
        })
}

#[shoal::remote]
fn make_buffer(seed: u64, mb: u64) -> shoal::Buffer {
    shoal::Buffer::from_vec(pattern(seed, mb))
}

/// The buffer's length and checksum, where it was read, and whether it
/// was mapped from the node's store.
#[shoal::remote]
fn read_buffer(data: shoal::Buffer) -> (u64, u64, String, bool) {
    let node = shoal::context()
        .map(|c| c.node_id.to_string())
        .unwrap_or_default();
    (data.len() as u64, word_sum(&data), node, data.is_mapped())
}

/// A buffer made where the task ran, tagged with that node.
#[shoal::remote]
fn make_tagged(seed: u64, mb: u64) -> (String, shoal::Buffer) {
    let node = shoal::context()
        .map(|c| c.node_id.to_string())
        .unwrap_or_default();
    (node, shoal::Buffer::from_vec(pattern(seed, mb)))
}

/// Puts an object (this worker owns it) and returns the reference.
#[shoal::remote]
fn put_inside(mb: u64) -> (u32, ObjectRef<shoal::Buffer>) {
    let object = shoal::put(shoal::Buffer::from_vec(pattern(3, mb))).expect("put");
    (std::process::id(), object)
}

/// The total length of the objects behind references passed inside a
/// value (nested: the task borrows them from the caller).
#[shoal::remote]
fn nested_len(refs: Vec<ObjectRef<shoal::Bytes>>) -> u64 {
    refs.iter()
        .map(|r| r.get().map(|b| b.0.len() as u64).unwrap_or(0))
        .sum()
}

/// Keeps a reference passed inside a value past its own end, in a thread
/// that reads it later: the caller must not free the object meanwhile.
#[shoal::remote]
fn nested_keep(refs: Vec<ObjectRef<shoal::Bytes>>, dir: String) -> u64 {
    let n = refs.len() as u64;
    std::thread::spawn(move || {
        let go = std::path::Path::new(&dir).join("go");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !go.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let read: u64 = refs
            .iter()
            .map(|r| r.get().map(|b| b.0.len() as u64).unwrap_or(0))
            .sum();
        let _ = std::fs::write(std::path::Path::new(&dir).join("read"), read.to_string());
    });
    n
}

/// The length of a tagged buffer.
#[shoal::remote]
fn tagged_len(tagged: (String, shoal::Buffer)) -> u64 {
    tagged.1.len() as u64
}

/// The nodes holding a copy of `id`, from `shoal list objects` (polled
/// until the head has heard of at least one).
fn object_locations(id: shoal::ObjectId) -> Vec<String> {
    let Ok(shoal_bin) = std::env::var("SHOAL_BIN") else {
        return Vec::new();
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = std::process::Command::new(&shoal_bin)
            .args(["list", "objects", "--json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
        let nodes: Vec<String> = listed
            .as_ref()
            .and_then(|l| l.as_array())
            .and_then(|l| l.iter().find(|o| o["object_id"] == id.to_string()))
            .and_then(|o| o["locations"].as_array())
            .map(|l| {
                l.iter()
                    .filter_map(|c| c["node_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if !nodes.is_empty() || Instant::now() > deadline {
            return nodes;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug)]
struct Boom(String);

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "boom: {}", self.0)
    }
}

#[shoal::remote]
fn fails(what: String) -> std::result::Result<u32, Boom> {
    Err(Boom(what))
}

#[shoal::remote]
fn panics_deep_inside(n: u32) -> u32 {
    fn inner_helper_that_panics(n: u32) -> u32 {
        if n > 0 {
            panic!("deliberate panic with n = {n}");
        }
        n
    }
    inner_helper_that_panics(n)
}

/// Records an attempt in `file`, then kills its own worker.
#[shoal::remote]
fn crash_worker(file: String) -> u32 {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .expect("attempts file");
    writeln!(f, "attempt by pid {}", std::process::id()).expect("record attempt");
    drop(f);
    std::process::abort();
}

/// Kills its worker the first time (when `file` does not exist yet), then
/// returns 7: a task that succeeds on its retry.
#[shoal::remote]
fn crash_once(file: String) -> u32 {
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .is_ok()
    {
        std::process::abort();
    }
    7
}

#[shoal::remote]
fn say(n: u32) -> u32 {
    println!("hello from task {n}");
    eprintln!("warning from task {n}");
    n
}

#[shoal::remote]
fn sleep_then(ms: u64, value: u32) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    value
}

#[shoal::remote]
fn level3(x: i64) -> i64 {
    x + 1
}

/// Does nothing.
#[shoal::remote]
fn noop() {}

/// Appends `line` to this process's file in `$CHAOS_DIR`: the chaos suite
/// counts how often each task ran.
fn log_run(line: &str) {
    let Ok(dir) = std::env::var("CHAOS_DIR") else {
        return;
    };
    let path = std::path::Path::new(&dir).join(std::process::id().to_string());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Milliseconds since the Unix epoch (the chaos suite compares the times
/// of its kills with the driver's).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An inner task of the chaos job: its value says which it is.
#[shoal::remote]
fn chaos_inner(i: u64, j: u64) -> u64 {
    log_run(&format!("i {i} {j}"));
    std::thread::sleep(Duration::from_millis(5));
    i * 1000 + j
}

/// An outer task of the chaos job: submits `k` inner tasks and sums them.
#[shoal::remote]
fn chaos_outer(i: u64, k: u64) -> u64 {
    log_run(&format!("o {i}"));
    let inner: Vec<_> = (0..k).map(|j| chaos_inner::remote(i, j)).collect();
    shoal::get_all(&inner).expect("inner tasks").iter().sum()
}

/// The `n`th Fibonacci number, as a tree of nested tasks each blocking in
/// `get` on its two children.
#[shoal::remote]
fn fib(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let (a, b) = (fib::remote(n - 1), fib::remote(n - 2));
    a.get().expect("fib(n - 1)") + b.get().expect("fib(n - 2)")
}

#[shoal::remote]
fn level2(x: i64) -> i64 {
    level3::remote(x).get().expect("level 3") * 2
}

#[shoal::remote]
async fn level1(x: i64) -> i64 {
    level2::remote(x).await.expect("level 2") + 100
}

/// An actor that says where it runs and counts.
#[shoal::actor]
pub struct Placed {
    n: u64,
}

#[shoal::actor]
impl Placed {
    pub fn new(start: u64) -> Self {
        Placed { n: start }
    }

    /// The node and host this actor lives on.
    pub fn whereabouts(&self) -> (String, String) {
        let node = shoal::context()
            .map(|c| c.node_id.to_string())
            .unwrap_or_default();
        (node, shoal_net::host::hostname())
    }

    pub fn add(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }

    /// Adds after `ms` milliseconds, marking `file` each time it runs.
    pub fn slow_add(&mut self, by: u64, ms: u64, file: String) -> u64 {
        mark(&file);
        std::thread::sleep(Duration::from_millis(ms));
        self.n += by;
        self.n
    }
}

/// Appends a line to `file`: how many times something ran.
fn mark(file: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = writeln!(f, "ran");
    }
}

/// Returns `value` after `ms` milliseconds, marking `file` each time it runs.
#[shoal::remote]
fn long_task(ms: u64, value: u64, file: String) -> u64 {
    mark(&file);
    std::thread::sleep(Duration::from_millis(ms));
    value
}

/// Calls the actor from a task; says where the task ran and the driver
/// address its worker was handed.
#[shoal::remote]
fn add_from_task(actor: ActorHandle<Placed>, by: u64) -> (u64, String, String) {
    let total = actor.add(by).get().unwrap_or(0);
    let driver = std::env::var("SHOAL_DRIVER_ADDRESS").unwrap_or_default();
    (total, shoal_net::host::hostname(), driver)
}

/// The resource names a placed scenario pins its work with: `maker` and
/// `user`, or `MAKER_RESOURCE` and `USER_RESOURCE`.
fn placed_on() -> (String, String) {
    let name = |key: &str, default: &str| std::env::var(key).unwrap_or_else(|_| default.into());
    (
        name("MAKER_RESOURCE", "maker"),
        name("USER_RESOURCE", "user"),
    )
}

/// An actor whose constructor panics when asked to.
#[shoal::actor]
pub struct Fragile;

#[shoal::actor]
impl Fragile {
    pub fn new(fail: bool) -> Self {
        assert!(!fail, "constructor refused on purpose");
        Fragile
    }

    pub fn ping(&self) -> u32 {
        1
    }
}

/// Holders running `hold(true)` right now, and whether `ping` has come
/// (local mode with threads: the actors live in the driver's process).
static HOLDING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static PINGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A sync actor whose `hold(true)` keeps its thread until some actor's
/// `ping` has run (or 60 s pass: then it answers false).
#[shoal::actor]
#[derive(Default)]
pub struct Holder;

#[shoal::actor]
impl Holder {
    pub fn new() -> Self {
        Holder
    }

    pub fn hold(&self, wait: bool) -> bool {
        if !wait {
            return true;
        }
        HOLDING.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !PINGED.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    pub fn ping(&self) -> bool {
        PINGED.store(true, Ordering::SeqCst);
        true
    }
}

/// An actor with a sync method that waits for another call of the same
/// caller (`max_concurrency` 2), and an async method, so sync methods run
/// outside a lane.
#[shoal::actor]
#[derive(Default)]
pub struct Flagged {
    flag: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

#[shoal::actor]
impl Flagged {
    pub fn new() -> Self {
        Flagged::default()
    }

    /// With `wait`, waits (up to 60 s) until `set` has run; true if it did.
    pub fn wait(&self, wait: bool) -> bool {
        if !wait {
            return true;
        }
        let (lock, cond) = &*self.flag;
        let guard = lock.locked();
        let (set, _) = shoal_net::sync::recover(cond.wait_timeout_while(
            guard,
            Duration::from_secs(60),
            |set| !*set,
        ));
        *set
    }

    pub fn set(&self) -> bool {
        let (lock, cond) = &*self.flag;
        *lock.locked() = true;
        cond.notify_all();
        true
    }

    pub async fn ping(&self) -> bool {
        true
    }
}

/// Records calls per caller, to check each caller's order.
#[shoal::actor]
pub struct Recorder {
    seen: std::collections::HashMap<u32, Vec<u32>>,
    barrier: std::sync::Arc<std::sync::Barrier>,
    async_barrier: std::sync::Arc<tokio::sync::Barrier>,
}

#[shoal::actor]
impl Recorder {
    pub fn new(parties: u32) -> Self {
        Recorder {
            seen: Default::default(),
            barrier: std::sync::Arc::new(std::sync::Barrier::new(parties as usize)),
            async_barrier: std::sync::Arc::new(tokio::sync::Barrier::new(parties as usize)),
        }
    }

    pub fn record(&mut self, caller: u32, i: u32) -> u32 {
        self.seen.entry(caller).or_default().push(i);
        i
    }

    /// For each caller, whether it recorded 0, 1, 2, ... in order, and how many.
    pub fn orders(&self) -> Vec<(u32, bool, usize)> {
        let mut out: Vec<_> = self
            .seen
            .iter()
            .map(|(c, v)| {
                (
                    *c,
                    v.iter().enumerate().all(|(i, x)| *x as usize == i),
                    v.len(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Returns once `parties` calls are inside at the same time.
    pub fn meet(&self) -> bool {
        self.barrier.wait();
        true
    }

    pub async fn meet_async(&self) -> bool {
        self.async_barrier.wait().await;
        true
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    pub fn nap(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// Returns once `path` exists (polled, at most a minute): a gate the
    /// driver opens when it is ready. `&mut self`: no other call runs
    /// meanwhile.
    pub fn wait_for_file(&mut self, path: String) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::path::Path::new(&path).exists() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    pub fn explode(&self, why: String) -> u32 {
        panic!("actor method exploded: {why}");
    }
}

/// Makes `n` calls on the recorder as caller `caller`, from a task.
#[shoal::remote]
fn record_from_task(recorder: ActorHandle<Recorder>, caller: u32, n: u32) -> u32 {
    let refs: Vec<_> = (0..n).map(|i| recorder.record(caller, i)).collect();
    shoal::get_all(&refs).expect("records").len() as u32
}

/// An actor that calls another through a handle it was given.
#[shoal::actor]
pub struct Relay {
    target: ActorHandle<Recorder>,
}

#[shoal::actor]
impl Relay {
    pub fn new(target: ActorHandle<Recorder>) -> Self {
        Relay { target }
    }

    pub fn relay(&self, caller: u32, i: u32) -> u32 {
        self.target.record(caller, i).get().expect("relayed call")
    }
}

/// An actor whose constructor marks a file each time it runs.
#[shoal::actor]
pub struct Counted {
    n: u64,
}

#[shoal::actor]
impl Counted {
    pub fn new(file: String) -> Self {
        mark(&file);
        Counted { n: 0 }
    }

    pub fn add(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// Marks `file`, then returns after `ms` milliseconds.
    pub fn marked_nap(&self, ms: u64, file: String) -> u64 {
        mark(&file);
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// This process's id, after `ms` milliseconds.
    pub fn slow_pid(&self, ms: u64) -> u32 {
        std::thread::sleep(Duration::from_millis(ms));
        std::process::id()
    }

    /// The node this actor lives on.
    pub fn node(&self) -> String {
        shoal::context()
            .map(|c| c.node_id.to_string())
            .unwrap_or_default()
    }
}

/// Lines in `file`: how many times something ran.
fn runs(file: &str) -> usize {
    std::fs::read_to_string(file)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// This process's private (anonymous) resident memory, in KiB.
fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn result(value: serde_json::Value) {
    println!("RESULT {value}");
}

/// Prints `TAG {value}` and waits for a line on stdin (the test's go-ahead).
fn pause(tag: &str, value: serde_json::Value) {
    println!("{tag} {value}");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok();
}

/// Where a task ran, and the GPUs it saw (`CUDA_VISIBLE_DEVICES` and
/// `shoal::context()`'s), after sleeping `ms` (so that tasks submitted
/// together run at once).
#[shoal::remote]
fn placed_gpus(ms: u64) -> (String, String, Vec<u32>) {
    std::thread::sleep(Duration::from_millis(ms));
    let context = shoal::context().ok();
    let node = context
        .as_ref()
        .map(|c| c.node_id.to_string())
        .unwrap_or_default();
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
    (
        node,
        visible,
        context.map(|c| c.gpu_ids).unwrap_or_default(),
    )
}

/// [`placed_gpus`] once the other task of the pair is running too (see
/// [`meet`]): GPU tasks that hold their devices at the same time.
#[shoal::remote]
fn gpus_together(dir: String, me: u32, other: u32) -> (String, String, Vec<u32>) {
    let _ = std::fs::create_dir_all(&dir);
    let met = meet(dir, me, other);
    let (node, visible, ids) = placed_gpus(0);
    (node, if met { visible } else { "did not meet".into() }, ids)
}

/// [`placed_gpus`] once `n` tasks of `tag` have all started, met through
/// the cluster's key-value table (every host reaches it; they share no
/// files): tasks that run at the same time wherever they are placed.
#[shoal::remote]
fn placed_together(tag: String, me: u32, n: u32) -> (String, String, Vec<u32>) {
    let here = shoal::kv::put("meet", &format!("{tag}/{me}"), b"here", true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let met = here.is_ok()
        && loop {
            match shoal::kv::keys("meet", &format!("{tag}/")) {
                Ok(keys) if keys.len() >= n as usize => break true,
                Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => break false,
            }
        };
    let (node, visible, ids) = placed_gpus(0);
    (node, if met { visible } else { "did not meet".into() }, ids)
}

/// The node ids of `refs`' results, in order.
fn nodes_of(refs: &[ObjectRef<(String, String, Vec<u32>)>]) -> shoal::Result<Vec<String>> {
    Ok(shoal::get_all(refs)?
        .into_iter()
        .map(|(n, _, _)| n)
        .collect())
}

/// The node id in environment variable `key`.
fn node_env(key: &str) -> shoal::NodeId {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} must hold a node id"))
}

/// The scheduling options at work on a cluster whose nodes B and G (labels
/// zone=gpu, two GPUs) are named by `NODE_B` and `NODE_G`: spread, node
/// affinity, label selectors, GPU devices and locality. Prints `WAITING`
/// with the results, then holds a task no node's labels match until a line
/// arrives on stdin, then prints `RESULT`.
fn scheduling_live() -> shoal::Result<()> {
    use shoal::Strategy;
    let (node_b, node_g) = (node_env("NODE_B"), node_env("NODE_G"));
    // Three tasks of half a CPU that all run at once (none ends before the
    // last has started, so none reuses another's worker): by default the
    // first node would take two (packing fills a node to half its CPUs
    // first); spread, one each.
    let tag = format!("spread-{}", std::process::id());
    let spread: Vec<_> = (0..3)
        .map(|me| {
            placed_together::options()
                .num_cpus(0.5)
                .scheduling(Strategy::Spread)
                .remote(tag.clone(), me, 3)
        })
        .collect();
    let spread = shoal::get_all(&spread)?;
    let spread_met = spread.iter().all(|(_, seen, _)| seen != "did not meet");
    let spread: Vec<String> = spread.into_iter().map(|(node, _, _)| node).collect();
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for node in &spread {
        *per_node.entry(node.clone()).or_default() += 1;
    }
    let pinned: Vec<_> = (0..6)
        .map(|_| {
            placed_gpus::options()
                .scheduling(Strategy::node_affinity(node_b, false))
                .remote(0)
        })
        .collect();
    let zone_gpu: Vec<_> = (0..4)
        .map(|_| {
            placed_gpus::options()
                .label_selector(&[("zone", "gpu")])
                .remote(0)
        })
        .collect();
    let not_gpu: Vec<_> = (0..4)
        .map(|_| {
            placed_gpus::options()
                .label_selector(&[("zone", "!gpu")])
                .remote(0)
        })
        .collect();
    let pair = |gpus: f64, name: &str| {
        let dir = format!("/tmp/shoal-gpus-{name}-{}", std::process::id());
        let refs: Vec<_> = (0..2)
            .map(|me| {
                gpus_together::options()
                    .num_gpus(gpus)
                    .remote(dir.clone(), me, 1 - me)
            })
            .collect();
        shoal::get_all(&refs)
    };
    let whole = pair(1.0, "whole")?;
    let halves = pair(0.5, "halves")?;
    let no_gpu = placed_gpus::remote(0).get()?;
    // 50 MB made on B (and on G), then used by a task with no placement
    // asked: it runs where its argument is.
    let mut near = Vec::new();
    for node in [node_b, node_g] {
        let blob = make_blob::options()
            .scheduling(Strategy::node_affinity(node, false))
            .remote(50 << 20);
        let (len, _, used_on) = checksum::remote(&blob).get()?;
        near.push(json!({"made_on": node.to_string(), "used_on": used_on, "len": len}));
    }
    let bad_selector = placed_gpus::options()
        .label_selector(&[("zone", "in(a")])
        .remote(0)
        .get();
    let nowhere = placed_gpus::options()
        .label_selector(&[("zone", "in(x,y)")])
        .remote(0);
    pause(
        "WAITING",
        json!({
            "spread": per_node,
            "spread_met": spread_met,
            "pinned": nodes_of(&pinned)?,
            "zone_gpu": nodes_of(&zone_gpu)?,
            "not_gpu": nodes_of(&not_gpu)?,
            "whole": whole,
            "halves": halves,
            "no_gpu": no_gpu,
            "near": near,
            "bad_selector_refused": matches!(bad_selector, Err(Error::InvalidOptions(_))),
        }),
    );
    let waited = matches!(
        nowhere.get_timeout(Duration::from_millis(100)),
        Err(Error::Timeout(_))
    );
    result(json!({"nowhere_waited": waited}));
    Ok(())
}

/// Placement groups on a cluster of three 2-CPU nodes: STRICT_SPREAD of 3
/// bundles (and a task in each), of 4 (it waits: `WAITING`, until a line on
/// stdin), then both removed; then a group whose actor (restartable)
/// stays in it when its node dies (`PLACED`, then a line on stdin once the
/// test killed that node). Prints `RESULT`.
fn placement_groups() -> shoal::Result<()> {
    use shoal::{Bundle, PlacementStrategy, Strategy};
    let one_cpu = || Bundle::new().cpus(1.0);
    let three = shoal::placement_group(vec![one_cpu(); 3], PlacementStrategy::StrictSpread)?;
    let three_ready = three.wait(Duration::from_secs(60))?;
    let bundle_nodes: Vec<String> = three
        .info()?
        .bundle_nodes
        .iter()
        .map(|n| n.map(|n| n.to_string()).unwrap_or_default())
        .collect();
    let in_bundles: Vec<_> = (0..3)
        .map(|b| {
            placed_gpus::options()
                .scheduling(Strategy::placement_group(&three, Some(b)))
                .remote(0)
        })
        .collect();
    let ran_on = nodes_of(&in_bundles)?;
    let four = shoal::placement_group_with(
        vec![one_cpu(); 4],
        PlacementStrategy::StrictSpread,
        shoal::PlacementGroupOptions::new().name("four"),
    )?;
    let four_ready = four.wait(Duration::from_secs(2))?;
    let found = shoal::get_placement_group("four")?.id() == four.id();
    pause(
        "WAITING",
        json!({"three": three.id().to_string(), "four": four.id().to_string()}),
    );
    // A task waiting in the group fails once the group is removed.
    let queued = placed_gpus::options()
        .scheduling(Strategy::placement_group(&four, None))
        .remote(0);
    shoal::remove_placement_group(&four)?;
    shoal::remove_placement_group(&three)?;
    let queued_failed = matches!(queued.get(), Err(Error::Unschedulable(_)));
    let after_removal = matches!(
        placed_gpus::options()
            .scheduling(Strategy::placement_group(&three, Some(0)))
            .remote(0)
            .get(),
        Err(Error::Unschedulable(_))
    );
    // An actor in a group whose node dies: the bundle is placed again and
    // the actor restarts in it.
    let kept = shoal::placement_group(vec![one_cpu()], PlacementStrategy::StrictPack)?;
    let kept_ready = kept.wait(Duration::from_secs(60))?;
    let actor = Placed::options()
        .num_cpus(1.0)
        .max_restarts(1)
        .max_task_retries(1)
        .scheduling(Strategy::placement_group(&kept, Some(0)))
        .remote(0)?;
    let (first_node, _) = actor.whereabouts().get()?;
    pause("PLACED", json!({"node": first_node}));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut moved_to = String::new();
    while Instant::now() < deadline {
        if let Ok((node, _)) = actor.whereabouts().get() {
            if node != first_node {
                moved_to = node;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let regrouped = kept.info()?.bundle_nodes[0].map(|n| n.to_string());
    result(json!({
        "three_ready": three_ready,
        "bundle_nodes": bundle_nodes,
        "ran_on": ran_on,
        "four_ready": four_ready,
        "found_by_name": found,
        "queued_failed": queued_failed,
        "refused_after_removal": after_removal,
        "kept_ready": kept_ready,
        "actor_first_node": first_node,
        "actor_moved_to": moved_to,
        "bundle_now_on": regrouped,
    }));
    Ok(())
}

/// Node affinity to the node `NODE_DEAD`, which has died: soft runs
/// elsewhere, hard fails with `Error::Unschedulable`.
fn scheduling_dead() -> shoal::Result<()> {
    use shoal::Strategy;
    let dead = node_env("NODE_DEAD");
    let soft = placed_gpus::options()
        .scheduling(Strategy::node_affinity(dead, true))
        .remote(0)
        .get()?;
    let hard = placed_gpus::options()
        .scheduling(Strategy::node_affinity(dead, false))
        .remote(0)
        .get();
    result(json!({
        "soft_ran_on": soft.0,
        "hard": match hard {
            Err(Error::Unschedulable(why)) => format!("unschedulable: {why}"),
            other => format!("{other:?}"),
        },
    }));
    Ok(())
}

fn flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Makes `n` numbered calls on the recorder as caller `caller`, from a
/// task: each `Ok` answer counted, each error's text kept. Half are
/// pipelined, half made one at a time (a call, then its `get`).
#[shoal::remote]
fn record_numbers(recorder: ActorHandle<Recorder>, caller: u32, n: u32) -> (u32, Vec<String>) {
    calls_in_order(&recorder, caller, n)
}

fn calls_in_order(recorder: &ActorHandle<Recorder>, caller: u32, n: u32) -> (u32, Vec<String>) {
    let (mut answered, mut errors) = (0, Vec::new());
    let mut tally = |got: shoal::Result<u32>, i: u32| match got {
        Ok(v) if v == i => answered += 1,
        Ok(v) => errors.push(format!("call {i} answered {v}")),
        Err(e) => errors.push(e.to_string()),
    };
    let half = n / 2;
    let refs: Vec<_> = (0..half).map(|i| recorder.record(caller, i)).collect();
    for (i, r) in refs.iter().enumerate() {
        tally(r.get(), i as u32);
    }
    for i in half..n {
        tally(recorder.record(caller, i).get(), i);
    }
    (answered, errors)
}

/// Records numbered calls per caller, duplicates and all.
#[shoal::actor]
#[derive(Default)]
pub struct Sequences {
    seen: std::collections::BTreeMap<u32, Vec<u32>>,
}

#[shoal::actor]
impl Sequences {
    pub fn new() -> Self {
        Sequences::default()
    }

    pub fn record(&mut self, caller: u32, i: u32) -> u32 {
        self.seen.entry(caller).or_default().push(i);
        i
    }

    /// Numbers recorded, all callers together.
    pub fn count(&self) -> usize {
        self.seen.values().map(Vec::len).sum()
    }

    /// Each caller's numbers, in the order they were recorded.
    pub fn sequences(&self) -> Vec<(u32, Vec<u32>)> {
        self.seen.iter().map(|(c, v)| (*c, v.clone())).collect()
    }
}

/// Forwards numbered calls to a recorder, after a short nap; restartable
/// (its recorder is not restarted with it).
#[shoal::actor]
pub struct Forwarder {
    target: ActorHandle<Sequences>,
}

#[shoal::actor]
impl Forwarder {
    pub fn new(target: ActorHandle<Sequences>) -> Self {
        Forwarder { target }
    }

    pub fn forward(&mut self, caller: u32, i: u32) -> u32 {
        std::thread::sleep(Duration::from_millis(2));
        self.target.record(caller, i).get().expect("recorded")
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }
}

/// Makes `n` numbered calls on the forwarder as caller `caller`, one
/// every 4 ms without waiting for answers (so calls are made while
/// its worker is dead and restarting), then waits for them all: the count
/// of `Ok` answers and each error's text.
#[shoal::remote]
fn forward_numbers(forwarder: ActorHandle<Forwarder>, caller: u32, n: u32) -> (u32, Vec<String>) {
    forward_in_order(&forwarder, caller, n)
}

fn forward_in_order(forwarder: &ActorHandle<Forwarder>, caller: u32, n: u32) -> (u32, Vec<String>) {
    let refs: Vec<_> = (0..n)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(4));
            forwarder.forward(caller, i)
        })
        .collect();
    let (mut answered, mut errors) = (0, Vec::new());
    for (i, r) in refs.iter().enumerate() {
        match r.get() {
            Ok(v) if v as usize == i => answered += 1,
            Ok(v) => errors.push(format!("call {i} answered {v}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (answered, errors)
}

/// Whether one caller's recorded numbers `0..n` kept its order across at
/// most `restarts` restarts. Each incarnation runs the calls it gets in
/// order, so the record is at most `restarts + 1` increasing runs: the
/// first is 0, 1, 2, ... with no gap (nothing is lost while the actor
/// lives); each later one starts at or before where the last one ended
/// (calls that may have run are sent again, ahead of later calls); every
/// number appears. Returns (in order, runs, duplicates).
fn runs_in_order(seen: &[u32], n: u32, restarts: usize) -> (bool, usize, usize) {
    let mut runs: Vec<&[u32]> = Vec::new();
    let mut start = 0;
    for i in 1..=seen.len() {
        if i == seen.len() || seen[i] <= seen[i - 1] {
            runs.push(&seen[start..i]);
            start = i;
        }
    }
    let first_ok = runs
        .first()
        .is_some_and(|run| run.iter().enumerate().all(|(i, x)| *x as usize == i));
    let later_ok = runs.windows(2).all(|pair| {
        let ended = pair[0].last().copied().unwrap_or(0);
        pair[1].first().is_some_and(|first| *first <= ended + 1)
    });
    let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
    let all = distinct.len() == n as usize && seen.iter().all(|x| *x < n);
    let ok = first_ok && later_ok && all && runs.len() <= restarts + 1;
    (ok, runs.len(), seen.len() - distinct.len())
}

/// Makes `n` numbered calls as caller `caller`, 100 at a time every 10 ms
/// without waiting, then waits for them all: the count of right answers
/// and the first errors.
fn paced_calls(recorder: &ActorHandle<Recorder>, caller: u32, n: u32) -> (u32, Vec<String>) {
    let mut refs = Vec::new();
    for i in 0..n {
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        refs.push(recorder.record(caller, i));
    }
    let (mut answered, mut errors) = (0, Vec::new());
    for (i, r) in refs.iter().enumerate() {
        match r.get() {
            Ok(v) if v as usize == i => answered += 1,
            Ok(v) => errors.push(format!("call {i} answered {v}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.truncate(10);
    (answered, errors)
}

fn main() -> shoal::Result<()> {
    if let Some(done) = parity::run(&std::env::args().nth(1).unwrap_or_default()) {
        return done;
    }
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "many" => {
            let n: u64 = arg(1).parse().unwrap_or(1000);
            let start = Instant::now();
            let refs: Vec<_> = (0..n).map(where_am_i::remote).collect();
            let out = shoal::get_all(&refs)?;
            let secs = start.elapsed().as_secs_f64();
            let in_order = out.iter().enumerate().all(|(i, (j, _))| i as u64 == *j);
            let nodes: BTreeSet<&String> = out.iter().map(|(_, node)| node).collect();
            result(
                json!({"count": out.len(), "in_order": in_order, "nodes": nodes.len(), "tasks_per_second": n as f64 / secs}),
            );
        }
        "flagged" => {
            // A quick sync method turned waiting for the caller's next
            // call: that call must still run (it was woken on the thread
            // the method then holds).
            let mut waited = Vec::new();
            for _ in 0..20 {
                let actor = Flagged::options().max_concurrency(2).remote()?;
                actor.ping().get()?;
                actor.wait(false).get()?;
                let wait = actor.wait(true);
                let set = actor.set();
                waited.push(wait.get()? && set.get()?);
            }
            result(json!({"all_released": waited.iter().all(|w| *w), "waited": waited}));
        }
        "held" => {
            // Two actors' quick method turns slow at once: the runtime must
            // still serve a third actor's call (it is what ends the wait).
            let (a, b, c) = (Holder::remote()?, Holder::remote()?, Holder::remote()?);
            let quick = (a.hold(false).get()?, b.hold(false).get()?);
            let held = (a.hold(true), b.hold(true));
            let deadline = Instant::now() + Duration::from_secs(60);
            while HOLDING.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let both_holding = HOLDING.load(Ordering::SeqCst) == 2;
            let pinged = c.ping().get()?;
            let released = (held.0.get()?, held.1.get()?);
            result(json!({
                "quick": quick.0 && quick.1,
                "both_holding": both_holding,
                "pinged": pinged,
                "released_by_the_ping": released.0 && released.1,
            }));
        }
        "meet" => {
            // Two 1-CPU tasks on a cluster with 2 free CPUs: each waits to
            // see the other start, so they meet only if they run at once
            // (not queued one behind the other on a single worker).
            let dir = std::env::temp_dir().join(format!("shoal-meet-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            let path = dir.display().to_string();
            let a = meet::remote(path.clone(), 0, 1);
            let b = meet::remote(path, 1, 0);
            let met = (a.get()?, b.get()?);
            let _ = std::fs::remove_dir_all(&dir);
            result(json!({"met": met.0 && met.1, "each": [met.0, met.1]}));
        }
        "big-object" => {
            let mb: u64 = arg(1).parse().unwrap_or(50);
            let size = mb << 20;
            // With PLACE=1 the cluster has nodes offering "maker" and "user".
            let (maker, user) = if flag("PLACE") {
                let (on, by) = placed_on();
                (
                    make_blob::options().resource(&on, 0.01),
                    checksum::options().resource(&by, 0.01),
                )
            } else {
                (make_blob::options(), checksum::options())
            };
            let blob = maker.remote(size);
            let (len, sum, used_on) = user.remote(&blob).get()?;
            let expected: Vec<u8> = (0..size)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
                .collect();
            let local = blob.get()?;
            result(json!({
                "len": len,
                "identical": len == size && sum == fnv(&expected),
                "driver_copy_identical": local == expected,
                "used_on": used_on,
            }));
        }
        "long" => {
            // A task and an actor method that each run `ms`, longer than
            // the request cap the test sets (SHOAL_REQUEST_TIMEOUT_MAX):
            // both return their value, each having run once.
            let ms: u64 = arg(1).parse().unwrap_or(3000);
            let dir = std::env::temp_dir().join(format!("shoal-long-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            let (task_file, method_file) = (
                dir.join("task").display().to_string(),
                dir.join("method").display().to_string(),
            );
            let task = long_task::options()
                .max_retries(0)
                .remote(ms, 42, task_file.clone());
            let actor = Placed::options().max_task_retries(0).remote(0)?;
            let method = actor.slow_add(5, ms, method_file.clone());
            let (task, method) = (task.get(), method.get());
            let runs = |file: &str| {
                std::fs::read_to_string(file)
                    .map(|s| s.lines().count())
                    .unwrap_or(0)
            };
            let out = json!({
                "task": format!("{task:?}"),
                "method": format!("{method:?}"),
                "task_runs": runs(&task_file),
                "method_runs": runs(&method_file),
            });
            let _ = std::fs::remove_dir_all(&dir);
            result(out);
        }
        "actor-placed" => {
            // An actor pinned to the "maker" resource's host, called by this
            // driver and by a task pinned to the "user" resource's host.
            let (on, by) = placed_on();
            let actor = Placed::options().resource(&on, 0.01).remote(0)?;
            let (actor_node, actor_host) = actor.whereabouts().get()?;
            let first = actor.add(1).get()?;
            let (from_task, task_host, driver_address) = add_from_task::options()
                .resource(&by, 0.01)
                .remote(actor.clone(), 10)
                .get()?;
            let last = actor.add(100).get()?;
            // Where the head says the actor's worker is reached.
            let listed = std::env::var("SHOAL_BIN").ok().and_then(|bin| {
                let out = std::process::Command::new(bin)
                    .args(["list", "actors", "--json"])
                    .output()
                    .ok()?;
                let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                rows.as_array()?
                    .iter()
                    .find(|a| {
                        a["class"].as_str().is_some_and(|c| c.ends_with("Placed"))
                            && a["state"] == "ALIVE"
                    })
                    .and_then(|a| a["address"].as_str().map(str::to_string))
            });
            result(json!({
                "actor_node": actor_node,
                "actor_host": actor_host,
                "actor_address": listed,
                "task_host": task_host,
                "driver_address_seen_by_worker": driver_address,
                "driver_host": shoal_net::host::hostname(),
                "totals": [first, from_task, last],
            }));
        }
        "errors" => {
            let err = fails::remote("the reason".to_string()).get();
            let Err(Error::Task(e)) = err else {
                panic!("expected Error::Task, got {err:?}")
            };
            let panicked = panics_deep_inside::remote(3).get();
            let Err(Error::Task(p)) = panicked else {
                panic!("expected Error::Task, got {panicked:?}")
            };
            result(json!({
                "error_function": e.function,
                "error_message": e.message,
                "error_has_ids": e.node_id.is_some() && e.task_id.to_string().len() == 32,
                "error_panicked": e.panicked,
                "panic_function": p.function,
                "panic_message": p.message,
                "panic_panicked": p.panicked,
                "panic_backtrace_names_the_function": p.backtrace.as_deref().is_some_and(|b| b.contains("inner_helper_that_panics")),
                "display": p.to_string(),
            }));
        }
        "retries" => {
            let file = arg(1);
            let retries: u32 = arg(2).parse().unwrap_or(2);
            let out = crash_worker::options()
                .max_retries(retries)
                .remote(file.clone())
                .get();
            let attempts = std::fs::read_to_string(&file)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            let (kind, reported) = match &out {
                Err(Error::WorkerCrashed { attempts, .. }) => ("WorkerCrashed", *attempts),
                other => panic!("expected WorkerCrashed, got {other:?}"),
            };
            result(
                json!({"error": kind, "attempts_recorded": attempts, "attempts_reported": reported}),
            );
        }
        "wait" => {
            let fast: Vec<_> = (0..3).map(|i| sleep_then::remote(0, i)).collect();
            shoal::get_all(&fast)?;
            let slow: Vec<_> = (0..2).map(|i| sleep_then::remote(20_000, 10 + i)).collect();
            let refs: Vec<_> = slow
                .iter()
                .take(1)
                .chain(fast.iter())
                .chain(slow.iter().skip(1))
                .cloned()
                .collect();
            let start = Instant::now();
            let (ready, pending) =
                shoal::wait(&refs, refs.len(), Some(Duration::from_millis(1500)))?;
            let waited = start.elapsed().as_secs_f64();
            let ready_values = shoal::get_all(&ready)?;
            let ids =
                |v: &[ObjectRef<u32>]| v.iter().map(|r| r.id().to_string()).collect::<Vec<_>>();
            let (all_ready, _) = shoal::wait(&fast, 2, None)?;
            result(json!({
                "ready": ready_values,
                "pending_in_order": ids(&pending) == vec![refs[0].id().to_string(), refs[4].id().to_string()],
                "waited_seconds": waited,
                "returned_before_the_slow_tasks": waited < 15.0,
                "num_returns_respected": all_ready.len() == 2 && ids(&all_ready) == ids(&fast[..2]),
            }));
        }
        "control-faults" => {
            // Every kind of control request once: run with requests and
            // replies dropped (SHOAL_TESTING_RPC_FAILURE), each operation
            // must still happen exactly once.
            let dir = std::env::temp_dir().join(format!("shoal-faults-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            let file = |name: String| dir.join(name).display().to_string();
            // Tasks that must not run twice.
            let refs: Vec<_> = (0..20u64)
                .map(|i| {
                    long_task::options()
                        .max_retries(0)
                        .remote(0, i, file(format!("task-{i}")))
                })
                .collect();
            let values = shoal::get_all(&refs)?;
            let tasks_ran_once = (0..20).all(|i| runs(&file(format!("task-{i}"))) == 1);
            // Nested tasks block in get (WorkerBlocked, LeaseBlocked).
            let nested = shoal::get_all(&(0..4).map(level1::remote).collect::<Vec<_>>())?;
            // Objects: a put read back, a large result made on the node
            // offering `user` and pulled here.
            let blob = pattern(7, 10);
            let put = shoal::put(blob.clone())?;
            let put_back: Vec<u8> = put.get()?;
            let (_, by) = placed_on();
            let made = make_blob::options().resource(&by, 1.0).remote(24 << 20);
            let made_len = made.get()?.len();
            // A named actor with one restart: created once, restarted once
            // by kill(no_restart = false), then ended.
            let ctor = file("ctor".into());
            let actor = Counted::options()
                .name("faulty")
                .max_restarts(1)
                .remote(ctor.clone())?;
            actor.add(2).get()?;
            let named: ActorHandle<Counted> = shoal::get_actor("faulty", "default")?;
            let through_name = named.add(3).get()?;
            let first_pid = actor.pid().get()?;
            shoal::kill(&actor, false)?;
            let second_pid = actor.pid().get()?;
            let after_restart = actor.add(1).get()?;
            shoal::kill(&actor, true)?;
            let ended = actor.add(1).get();
            // The job still runs: the test checks that every lease is back
            // (none leaked by a lost grant or release), then lets us end.
            println!("IDLE");
            std::io::stdout().flush().expect("stdout");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .expect("the test's go-ahead");
            let out = json!({
                "values_in_order": values == (0..20).collect::<Vec<u64>>(),
                "tasks_ran_once": tasks_ran_once,
                "nested": nested,
                "put_intact": put_back == blob,
                "made_len": made_len,
                "through_name": through_name,
                "restarted": second_pid != first_pid,
                "after_restart": after_restart,
                "constructor_runs": runs(&ctor),
                "ended": matches!(ended, Err(Error::ActorDied { .. })),
            });
            let _ = std::fs::remove_dir_all(&dir);
            result(out);
        }
        "chaos-nested" => {
            // FT-1: n outer tasks of k inner ones each, while the test kills
            // node daemons; every result must be right.
            let n: u64 = arg(1).parse().unwrap_or(1000);
            let k: u64 = arg(2).parse().unwrap_or(9);
            let refs: Vec<_> = (0..n).map(|i| chaos_outer::remote(i, k)).collect();
            println!("STARTED");
            std::io::stdout().flush().expect("stdout");
            let start = Instant::now();
            let mut outcomes = Vec::with_capacity(refs.len());
            for (i, r) in refs.iter().enumerate() {
                let i = i as u64;
                let expected = (0..k).map(|j| i * 1000 + j).sum::<u64>();
                outcomes.push(match r.get() {
                    Ok(v) if v == expected => "ok".to_string(),
                    Ok(v) => format!("wrong: {v}, not {expected}"),
                    Err(e) => format!("error: {e}"),
                });
            }
            println!("DONE {}", unix_ms());
            std::io::stdout().flush().expect("stdout");
            // The test checks the ledger while the job still runs.
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .expect("the test's go-ahead");
            result(json!({
                "outcomes": outcomes,
                "seconds": start.elapsed().as_secs_f64(),
            }));
        }
        "chaos-actors" => {
            // FT-2: f restartable forwarders (on nodes the test kills) each
            // send m numbered calls to a recorder on a node never killed.
            let f: u32 = arg(1).parse().unwrap_or(4);
            let m: u32 = arg(2).parse().unwrap_or(500);
            let recorder = Sequences::options().resource("stable", 1.0).remote()?;
            let forwarders = (0..f)
                .map(|_| {
                    Forwarder::options()
                        .resource("chaos", 1.0)
                        .max_restarts(1000)
                        .max_task_retries(1000)
                        .remote(recorder.clone())
                })
                .collect::<shoal::Result<Vec<_>>>()?;
            let calls: Vec<Vec<_>> = forwarders
                .iter()
                .enumerate()
                .map(|(c, fw)| (0..m).map(|i| fw.forward(c as u32, i)).collect())
                .collect();
            println!("STARTED");
            std::io::stdout().flush().expect("stdout");
            let mut acks = Vec::new();
            let mut errors = Vec::new();
            for per_caller in &calls {
                let mut caller_acks = Vec::new();
                for call in per_caller {
                    match call.get() {
                        Ok(_) => caller_acks.push(true),
                        Err(e) => {
                            caller_acks.push(false);
                            if errors.len() < 20 {
                                errors.push(e.to_string());
                            }
                        }
                    }
                }
                acks.push(caller_acks);
            }
            let answered_ms = unix_ms();
            let seen = recorder.sequences().get()?;
            result(
                json!({"acks": acks, "seen": seen, "errors": errors, "answered_ms": answered_ms}),
            );
        }
        "chaos-actor-death" => {
            // FT-3: an actor (default retries) killed mid-call: the caller
            // gets ActorDied long before the call would have ended, and the
            // method body ran at most once.
            let file = std::env::temp_dir()
                .join(format!("shoal-ft3-{}", std::process::id()))
                .display()
                .to_string();
            let actor = Counted::remote(format!("{file}.ctor"))?;
            let pid = actor.pid().get()?;
            let call = actor.marked_nap(60_000, file.clone());
            let deadline = Instant::now() + Duration::from_secs(30);
            while runs(&file) == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill the actor's worker");
            let killed = Instant::now();
            let answer = call.get();
            let seconds = killed.elapsed().as_secs_f64();
            let body_runs = runs(&file);
            let _ = std::fs::remove_file(&file);
            let _ = std::fs::remove_file(format!("{file}.ctor"));
            result(json!({
                "actor_died": matches!(answer, Err(Error::ActorDied { .. })),
                "answer": format!("{answer:?}"),
                "seconds_to_error": seconds,
                "body_runs": body_runs,
            }));
        }
        "queued" => {
            // RL-4: n no-op tasks submitted at once; they queue in this
            // driver (the head sees a few lease requests, not n tasks).
            // Reports the driver's memory per pending task.
            let n: usize = arg(1).parse().unwrap_or(1_000_000);
            // The test measures the head once this job is registered (its
            // executable uploaded), before any task.
            println!("READY");
            std::io::stdout().flush().expect("stdout");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .expect("the test's go-ahead");
            let before = rss_anon_kib();
            let start = Instant::now();
            let refs: Vec<ObjectRef<()>> = (0..n).map(|_| noop::remote()).collect();
            let submitted = start.elapsed().as_secs_f64();
            let pending = rss_anon_kib();
            println!("QUEUED {n}");
            std::io::stdout().flush().expect("stdout");
            // Wait in slices, so a reference is freed once its task is done.
            let mut done = 0usize;
            for chunk in refs.chunks(10_000) {
                done += shoal::get_all(chunk)?.len();
            }
            let seconds = start.elapsed().as_secs_f64();
            let bytes = pending.saturating_sub(before) as f64 * 1024.0;
            result(json!({
                "tasks": n,
                "done": done,
                "submit_seconds": submitted,
                "seconds": seconds,
                "tasks_per_second": n as f64 / seconds,
                "rss_before_kib": before,
                "rss_pending_kib": pending,
                "bytes_per_pending_task": bytes / n as f64,
            }));
        }
        "fence" => {
            // An actor on the node the test stops (SIGSTOP) with a slow call
            // in flight: once the head declares the node dead the call is
            // answered by the actor's next incarnation, never by the old
            // instance (which still runs, and answers later).
            let ctor = std::env::temp_dir()
                .join(format!("shoal-fence-{}", std::process::id()))
                .display()
                .to_string();
            let actor = Counted::options()
                .resource("spot", 1.0)
                .max_restarts(1)
                .max_task_retries(1)
                .remote(ctor.clone())?;
            let (node, old_pid) = (actor.node().get()?, actor.pid().get()?);
            let slow = actor.slow_pid(8000);
            println!("ACTOR {node} {old_pid}");
            std::io::stdout().flush().expect("stdout");
            let answered = slow.get();
            let (new_node, new_pid) = (actor.node().get()?, actor.pid().get()?);
            let _ = std::fs::remove_file(&ctor);
            result(json!({
                "old_pid": old_pid,
                "new_pid": new_pid,
                "old_node": node,
                "new_node": new_node,
                "slow_answered_by": format!("{answered:?}"),
                "slow_answered_by_new": matches!(answered, Ok(p) if p == new_pid),
            }));
            // The job goes on while the test looks at the fenced node.
            std::io::stdout().flush().expect("stdout");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .expect("the test's go-ahead");
        }
        "head-of-line" => {
            // Rounds of wait(2) over tasks of 1500, 10 and 300 ms (on 2
            // CPUs): the 300 ms task must not queue behind the 1500 ms one
            // while the 10 ms one's worker is free, so every round's first
            // two are [10, 300]. Then fib(12) submitted while a long task
            // runs must finish first (queued behind it, it waited for it).
            let rounds: u32 = arg(1).parse().unwrap_or(5);
            let mut firsts = Vec::new();
            let mut seconds = Vec::new();
            for _ in 0..rounds {
                let refs: Vec<_> = [1500u64, 10, 300]
                    .iter()
                    .map(|&ms| sleep_then::remote(ms, ms as u32))
                    .collect();
                let start = Instant::now();
                let (ready, _) = shoal::wait(&refs, 2, Some(Duration::from_secs(10)))?;
                seconds.push(start.elapsed().as_secs_f64());
                firsts.push(shoal::get_all(&ready)?);
                shoal::get_all(&refs)?;
            }
            // Long enough that fib(12) finishes first even with worker
            // processes on a loaded machine; its end is not waited for.
            let sleeper = sleep_then::remote(60_000, 60);
            let start = Instant::now();
            let fib12 = fib::remote(12);
            shoal::wait(
                std::slice::from_ref(&fib12),
                1,
                Some(Duration::from_secs(60)),
            )?;
            let fib_seconds = start.elapsed().as_secs_f64();
            let (sleeper_done, _) =
                shoal::wait(std::slice::from_ref(&sleeper), 1, Some(Duration::ZERO))?;
            let fib_first = sleeper_done.is_empty();
            let fib_value = fib12.get()?;
            result(json!({
                "firsts": firsts,
                "seconds": seconds,
                "fib": fib_value,
                "fib_before_the_sleeper": fib_first,
                "fib_seconds": fib_seconds,
            }));
        }
        "nested" => {
            let refs: Vec<_> = (0..4).map(level1::remote).collect();
            result(json!({"values": shoal::get_all(&refs)?}));
        }
        "slow-many" => {
            let n: u32 = arg(1).parse().unwrap_or(1000);
            let ms: u64 = arg(2).parse().unwrap_or(20);
            let refs: Vec<_> = (0..n).map(|i| sleep_then::remote(ms, i)).collect();
            // Tell the test the job is under way, then wait for everything.
            let _ = shoal::wait(&refs, (n / 10) as usize, None)?;
            println!("STARTED");
            std::io::stdout().flush().ok();
            let values = shoal::get_all(&refs)?;
            let correct = values.iter().enumerate().all(|(i, v)| *v == i as u32);
            result(json!({"count": values.len(), "correct": correct}));
        }
        "put-drop" => {
            let rounds: u32 = arg(1).parse().unwrap_or(1000);
            let mb: usize = arg(2).parse().unwrap_or(10);
            let start = Instant::now();
            for i in 0..rounds {
                let object = shoal::put(shoal::Bytes(vec![i as u8; mb << 20]))?;
                drop(object);
            }
            result(json!({"rounds": rounds, "seconds": start.elapsed().as_secs_f64()}));
        }
        "nested-drop" => {
            // Objects passed only inside task arguments, then dropped: the
            // task borrowed them and kept nothing, so each is freed when
            // the task is done (with no spilling, a store that keeps them
            // fills within a dozen rounds).
            let rounds: u32 = arg(1).parse().unwrap_or(20);
            let mb: usize = arg(2).parse().unwrap_or(10);
            let mut read = 0;
            for i in 0..rounds {
                let object = shoal::put(shoal::Bytes(vec![i as u8; mb << 20]))?;
                read += nested_len::remote(vec![object]).get()?;
            }
            // A borrower that keeps the reference after its task ended:
            // the object outlives the caller's reference and is read.
            let dir = std::env::temp_dir().join(format!("shoal-borrow-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch directory");
            let object = shoal::put(shoal::Bytes(vec![1; mb << 20]))?;
            let kept = nested_keep::remote(vec![object], dir.display().to_string()).get()?;
            std::fs::write(dir.join("go"), b"go").expect("the go file");
            let deadline = Instant::now() + Duration::from_secs(60);
            let late = loop {
                match std::fs::read_to_string(dir.join("read")) {
                    Ok(read) => break read.parse::<u64>().unwrap_or(0),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => break 0,
                }
            };
            let _ = std::fs::remove_dir_all(&dir);
            result(json!({"rounds": rounds, "read": read, "kept": kept, "late_read": late}));
        }
        "transfer" => {
            // An object made on the "maker" node, read by `readers` tasks at
            // once on the "user" node (or those of `placed_on`).
            let mb: u64 = arg(1).parse().unwrap_or(1024);
            let readers: usize = arg(2).parse().unwrap_or(8);
            let expected = word_sum(&pattern(7, mb));
            let (on, by) = placed_on();
            let made = make_buffer::options().resource(&on, 0.01).remote(7u64, mb);
            shoal::wait(std::slice::from_ref(&made), 1, None)?;
            let started = Instant::now();
            let reads: Vec<_> = (0..readers)
                .map(|_| {
                    read_buffer::options()
                        .resource(&by, 0.01)
                        .num_cpus(0.1)
                        .remote(&made)
                })
                .collect();
            let out = shoal::get_all(&reads)?;
            let seconds = started.elapsed().as_secs_f64();
            let nodes: BTreeSet<&String> = out.iter().map(|r| &r.2).collect();
            // The head's directory lists both copies.
            let mut copies = 0;
            if let Ok(shoal_bin) = std::env::var("SHOAL_BIN") {
                let deadline = Instant::now() + Duration::from_secs(20);
                while copies < 2 && Instant::now() < deadline {
                    let listed = std::process::Command::new(&shoal_bin)
                        .args(["list", "objects", "--json"])
                        .output()
                        .ok()
                        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
                    copies = listed
                        .as_ref()
                        .and_then(|l| l.as_array())
                        .and_then(|l| {
                            l.iter()
                                .find(|o| o["object_id"] == made.id().to_string())
                                .and_then(|o| o["locations"].as_array().map(Vec::len))
                        })
                        .unwrap_or(0);
                    if copies < 2 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            let local = made.get()?;
            result(json!({
                "readers": out.len(),
                "identical": out.iter().all(|r| r.0 == mb << 20 && r.1 == expected),
                "mapped": out.iter().all(|r| r.3),
                "read_on": nodes.into_iter().collect::<Vec<_>>(),
                "driver_copy_identical": word_sum(&local) == expected,
                "listed_copies": copies,
                "seconds": seconds,
                "gb_per_second": (mb as f64 / 1024.0) / seconds,
            }));
        }
        "copy-survives" => {
            // A result made on the "maker" host with no retries, read by a
            // task on the "user" host (which pulls a copy there). The test
            // then kills the maker's host: the owner's read must find the
            // copy that survives (lineage cannot rebuild it).
            let (on, by) = placed_on();
            let mb: u64 = arg(1).parse().unwrap_or(24);
            let made = make_buffer::options()
                .resource(&on, 0.01)
                .max_retries(0)
                .remote(9u64, mb);
            let read = read_buffer::options()
                .resource(&by, 0.01)
                .remote(&made)
                .get()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while object_locations(made.id()).len() < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            println!("READY {}", object_locations(made.id()).len());
            std::io::stdout().flush().expect("stdout");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .expect("the test's go-ahead");
            let expected = word_sum(&pattern(9, mb));
            let got = made.get();
            result(json!({
                "read_on_user": read.2,
                "identical": matches!(&got, Ok(b) if word_sum(b) == expected),
                "got": format!("{:?}", got.as_ref().map(|b| b.len())),
            }));
        }
        "lineage" => {
            // Two 10 MiB task results on one node: one may be retried, one
            // not. The test kills their node; reading them again rebuilds
            // the first by running its task again, and loses the second.
            let retried = make_tagged::remote(1u64, 10u64);
            shoal::wait(std::slice::from_ref(&retried), 1, None)?;
            let node = object_locations(retried.id())
                .first()
                .cloned()
                .unwrap_or_default();
            let mut single = None;
            for _ in 0..40 {
                let candidate = make_tagged::options().max_retries(0).remote(2u64, 10u64);
                shoal::wait(std::slice::from_ref(&candidate), 1, None)?;
                if object_locations(candidate.id()).contains(&node) {
                    single = Some(candidate);
                    break;
                }
            }
            let single = single.expect("a result on the same node");
            println!("VICTIM {node}");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .expect("the test's go-ahead");
            // A task given the lost result as its argument: rebuilt first.
            let used_as_argument = tagged_len::remote(&retried).get();
            let rebuilt = retried.get();
            let lost = single.get();
            result(json!({
                "victim": node,
                "rebuilt_identical": matches!(&rebuilt, Ok((_, b)) if word_sum(b) == word_sum(&pattern(1, 10))),
                "rebuilt_on": rebuilt.as_ref().map(|(n, _)| n.clone()).unwrap_or_default(),
                "rebuilt": format!("{:?}", rebuilt.as_ref().map(|(n, b)| (n, b.len()))),
                "argument_rebuilt": matches!(used_as_argument, Ok(n) if n == 10 << 20),
                "argument": format!("{used_as_argument:?}"),
                "lost": matches!(lost, Err(Error::ObjectLost { .. })),
                "lost_error": format!("{:?}", lost.map(|(n, _)| n)),
            }));
        }
        "owner-died" => {
            // A worker puts an object and hands us the reference, then dies:
            // the object died with its owner.
            let (pid, object) = put_inside::remote(2u64).get()?;
            let before = object.get().map(|b| b.len());
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill the owner");
            // The copies go within a few heartbeats.
            let deadline = Instant::now() + Duration::from_secs(30);
            let after = loop {
                let after = object.get();
                if after.is_err() || Instant::now() > deadline {
                    break after;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            result(json!({
                "read_while_owner_lived": matches!(before, Ok(n) if n == 2 << 20),
                "owner_died": matches!(after, Err(Error::OwnerDied { .. })),
                "after": format!("{:?}", after.map(|b| b.len())),
            }));
        }
        "spill" => {
            // Keeps `count` objects of `mb` MiB, each with its own bytes,
            // then reads every one back.
            let count: u32 = arg(1).parse().unwrap_or(30);
            let mb: usize = arg(2).parse().unwrap_or(10);
            let pattern = |i: u32| -> Vec<u8> {
                (0..mb << 20)
                    .map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8)
                    .collect()
            };
            let mut kept = Vec::new();
            for i in 0..count {
                kept.push(shoal::put(shoal::Buffer::from_vec(pattern(i)))?);
            }
            let mut identical = 0;
            for (i, object) in kept.iter().enumerate() {
                if *object.get()? == *pattern(i as u32) {
                    identical += 1;
                }
            }
            result(json!({"kept": kept.len(), "identical": identical}));
        }
        "zero-copy" => {
            // A large buffer read back on its own node maps the object: the
            // reader's private memory does not grow by its size.
            let mb: usize = arg(1).parse().unwrap_or(200);
            let bytes: Vec<u8> = (0..mb << 20).map(|j| (j % 251) as u8).collect();
            let sum: u64 = bytes.iter().map(|b| u64::from(*b)).sum();
            let object = shoal::put(shoal::Buffer::from_vec(bytes))?;
            let before = rss_anon_kib();
            let buffer = object.get()?;
            let after_get = rss_anon_kib();
            let read_sum: u64 = buffer.iter().map(|b| u64::from(*b)).sum();
            let after_read = rss_anon_kib();
            result(json!({
                "mapped": buffer.is_mapped(),
                "len": buffer.len(),
                "identical": read_sum == sum,
                "anon_growth_kib": after_read.saturating_sub(before),
                "anon_growth_at_get_kib": after_get.saturating_sub(before),
            }));
        }
        "freed-while-mapped" => {
            // A buffer mapped from an object stays intact after the object
            // is freed and the store makes new objects (it reuses freed
            // objects' files): the store must not reuse a mapped file.
            let mb: u64 = arg(1).parse().unwrap_or(20);
            let bytes = pattern(7, mb);
            let object = shoal::put(shoal::Buffer::from_vec(bytes.clone()))?;
            let buffer = object.get()?;
            let name = format!("/{}", object.id());
            drop(object);
            let deadline = Instant::now() + Duration::from_secs(30);
            let freed = loop {
                let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
                if !maps.lines().any(|l| l.ends_with(&name)) {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            // Smaller, equal and larger objects: any reused file is
            // resized and overwritten.
            let mut made = Vec::new();
            for size in [mb / 2, mb, mb / 4, mb * 2] {
                made.push(shoal::put(shoal::Buffer::from_vec(vec![
                    0xee;
                    (size << 20)
                        as usize
                ]))?);
            }
            drop(made);
            for size in [mb / 2, mb] {
                drop(shoal::put(shoal::Buffer::from_vec(vec![
                    0x11;
                    (size << 20)
                        as usize
                ]))?);
            }
            result(json!({
                "mapped": buffer.is_mapped(),
                "freed": freed,
                "intact": *buffer == *bytes,
            }));
        }
        "fill" => {
            // Keeps every object: the store must refuse, with a typed error.
            let mb: usize = arg(1).parse().unwrap_or(10);
            let mut kept = Vec::new();
            let outcome = loop {
                match shoal::put(shoal::Bytes(vec![1u8; mb << 20])) {
                    Ok(object) => kept.push(object),
                    Err(e) => break e,
                }
                if kept.len() > 10_000 {
                    panic!("the store never filled");
                }
            };
            let full = matches!(outcome, Error::ObjectStoreFull(_));
            result(
                json!({"kept": kept.len(), "object_store_full": full, "error": outcome.to_string()}),
            );
        }
        "print" => {
            // Workers' output is streamed here; stay up until the test has
            // seen it (it closes our stdin).
            let refs: Vec<_> = (0..3).map(say::remote).collect();
            shoal::get_all(&refs)?;
            println!("WAITING");
            std::io::stdout().flush().ok();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        "actor-blip" => {
            // This process's connections to workers are closed (as a
            // network blip would) while numbered calls are in flight to a
            // live actor with no restarts: they are sent again on a new
            // connection, each answered and run once, in order, and the
            // handle still works after.
            let n: u32 = arg(1).parse().unwrap_or(2000);
            let recorder = Recorder::options().max_restarts(0).remote(1)?;
            recorder.orders().get()?;
            let blips = std::thread::spawn(|| {
                (0..10)
                    .map(|_| {
                        std::thread::sleep(Duration::from_millis(15));
                        shoal::__private::testing_close_worker_connections()
                    })
                    .sum::<usize>()
            });
            let (answered, errors) = paced_calls(&recorder, 0, n);
            let closed = blips.join().expect("the blip thread");
            let after = recorder.record(1, 0).get().is_ok();
            let orders = recorder.orders().get()?;
            result(json!({
                "n": n,
                "answered": answered,
                "errors": errors,
                "orders": orders,
                "closed": closed,
                "after": after,
            }));
        }
        "actor-replies-lost" => {
            // Meant to run with SHOAL_TESTING_RPC_FAILURE="ActorCall=rep:0.2":
            // a fifth of the actor calls' replies are discarded after the
            // actor ran the call. No restarts: each call must still be
            // answered, and run exactly once, in its caller's order.
            let n: u32 = arg(1).parse().unwrap_or(400);
            let recorder = Recorder::options().max_restarts(0).remote(1)?;
            // Two more callers: tasks that each got the handle.
            let tasks: Vec<_> = (1..=2)
                .map(|c| {
                    record_numbers::options()
                        .max_retries(0)
                        .remote(recorder.clone(), c, n)
                })
                .collect();
            let mut answered = vec![];
            let mut errors = vec![];
            let (mine, my_errors) = calls_in_order(&recorder, 0, n);
            answered.push(mine);
            errors.extend(my_errors);
            for task in &tasks {
                let (theirs, their_errors) = task.get()?;
                answered.push(theirs);
                errors.extend(their_errors);
            }
            let orders = recorder.orders().get()?;
            errors.truncate(10);
            result(json!({"n": n, "answered": answered, "errors": errors, "orders": orders}));
        }
        "actor-restart-order" => {
            // A forwarder with one restart and call retries, killed while
            // numbered calls from three callers are in flight (and more are
            // being made); the recorder it forwards to lives on.
            let n: u32 = arg(1).parse().unwrap_or(300);
            let recorder = Sequences::remote()?;
            let forwarder = Forwarder::options()
                .max_restarts(1)
                .max_task_retries(3)
                .remote(recorder.clone())?;
            let first_pid = forwarder.pid().get()?;
            let tasks: Vec<_> = (1..=2)
                .map(|c| {
                    forward_numbers::options()
                        .max_retries(0)
                        .remote(forwarder.clone(), c, n)
                })
                .collect();
            let killer = {
                let recorder = recorder.clone();
                std::thread::spawn(move || {
                    // Once a third of the calls are recorded.
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while Instant::now() < deadline {
                        let recorded = recorder.count().get().unwrap_or(0);
                        if recorded >= n as usize {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(first_pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .expect("kill the forwarder's worker");
                })
            };
            let mut answered = vec![];
            let mut errors = vec![];
            let (mine, my_errors) = forward_in_order(&forwarder, 0, n);
            answered.push(mine);
            errors.extend(my_errors);
            for task in &tasks {
                let (theirs, their_errors) = task.get()?;
                answered.push(theirs);
                errors.extend(their_errors);
            }
            killer.join().expect("the killer thread");
            let second_pid = forwarder.pid().get()?;
            let seen = recorder.sequences().get()?;
            let callers: Vec<_> = seen
                .iter()
                .map(|(caller, numbers)| {
                    let (in_order, runs, duplicates) = runs_in_order(numbers, n, 1);
                    json!({"caller": caller, "in_order": in_order, "runs": runs, "duplicates": duplicates, "recorded": numbers.len()})
                })
                .collect();
            let out_of_order: Vec<_> = seen
                .iter()
                .filter(|(_, numbers)| !runs_in_order(numbers, n, 1).0)
                .map(|(caller, numbers)| json!([caller, numbers]))
                .collect();
            errors.truncate(10);
            result(json!({
                "n": n,
                "answered": answered,
                "errors": errors,
                "callers": callers,
                "restarted": second_pid != first_pid,
                "out_of_order": out_of_order,
            }));
        }
        "actor-order" => {
            let n: u32 = arg(1).parse().unwrap_or(10_000);
            let recorder = Recorder::remote(1)?;
            let refs: Vec<_> = (0..n).map(|i| recorder.record(0, i)).collect();
            let values = shoal::get_all(&refs)?;
            let one_caller_in_order = values.iter().enumerate().all(|(i, v)| *v as usize == i);
            // Four more callers: tasks that each got the handle.
            let tasks: Vec<_> = (1..=4)
                .map(|c| record_from_task::remote(recorder.clone(), c, 1000))
                .collect();
            shoal::get_all(&tasks)?;
            let orders = recorder.orders().get()?;
            result(json!({"one_caller_in_order": one_caller_in_order, "orders": orders}));
        }
        "actor-concurrency" => {
            let parties = 4;
            let four = Recorder::options().max_concurrency(4).remote(parties)?;
            let sync_met = shoal::get_all(&(0..4).map(|_| four.meet()).collect::<Vec<_>>())?;
            let async_met = shoal::get_all(&(0..4).map(|_| four.meet_async()).collect::<Vec<_>>())?;
            let two = Recorder::options().max_concurrency(2).remote(parties)?;
            let stuck: Vec<_> = (0..4).map(|_| two.meet()).collect();
            let (ready, _) = shoal::wait(&stuck, 4, Some(Duration::from_secs(3)))?;
            result(json!({
                "met_with_4": sync_met.iter().all(|m| *m) && sync_met.len() == 4,
                "met_async_with_4": async_met.iter().all(|m| *m) && async_met.len() == 4,
                "met_with_2": ready.len() == 4,
            }));
        }
        "actor-errors" => {
            let recorder = Recorder::remote(1)?;
            let boom = recorder.explode("on purpose".to_string()).get();
            let Err(Error::Task(e)) = boom else {
                panic!("expected Error::Task, got {boom:?}")
            };
            let after = recorder.record(0, 0).get()?;
            let relay = Relay::remote(recorder.clone())?;
            let relayed = relay.relay(9, 0).get()?;
            let orders = recorder.orders().get()?;
            let constructor = match Fragile::remote(true) {
                Ok(_) => "created".to_string(),
                Err(e) => e.to_string(),
            };
            result(json!({
                "constructor_error": constructor,
                "panic_message": e.message,
                "panicked": e.panicked,
                "function": e.function,
                "still_serving": after == 0,
                "relayed": relayed == 0 && orders.iter().any(|(c, ok, n)| *c == 9 && *ok && *n == 1),
            }));
        }
        "scheduling" => scheduling_live()?,
        "scheduling-dead" => scheduling_dead()?,
        "placement-groups" => placement_groups()?,
        "actor-pending" => {
            let recorder = Recorder::options().max_pending_calls(100).remote(1)?;
            // The first call holds the actor until every call is made, so
            // none is answered meanwhile: exactly 100 are accepted.
            let gate = std::env::temp_dir().join(format!("shoal-gate-{}", std::process::id()));
            let _ = std::fs::remove_file(&gate);
            let held = recorder.wait_for_file(gate.display().to_string());
            let calls: Vec<_> = (1..1000).map(|_| recorder.nap(1)).collect();
            std::fs::write(&gate, b"open").expect("open the gate");
            let (mut ok, mut refused, mut other) = (0, 0, Vec::new());
            match held.get() {
                Ok(true) => ok += 1,
                Ok(false) => other.push("the gate never opened".to_string()),
                Err(e) => other.push(e.to_string()),
            }
            let _ = std::fs::remove_file(&gate);
            for call in &calls {
                match call.get() {
                    Ok(_) => ok += 1,
                    Err(Error::PendingCallsExceeded { .. }) => refused += 1,
                    Err(e) => other.push(e.to_string()),
                }
            }
            let after = recorder.nap(1).get().is_ok();
            result(json!({"ok": ok, "refused": refused, "other": other, "accepts_again": after}));
        }
        "actor-kill" => {
            let recorder = Recorder::remote(1)?;
            let pid = recorder.pid().get()?;
            let in_flight = recorder.nap(30_000);
            // Make sure the long call is running before the worker dies.
            let _ = recorder
                .record(0, 0)
                .get_timeout(Duration::from_millis(300));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill the actor's worker");
            let started = Instant::now();
            let during = in_flight.get();
            let after = recorder.record(0, 1).get();
            result(json!({
                "in_flight_died": matches!(during, Err(Error::ActorDied { .. })),
                "later_call_died": matches!(after, Err(Error::ActorDied { .. })),
                "noticed_within_seconds": started.elapsed().as_secs_f64(),
                "in_flight": format!("{during:?}"),
            }));
        }
        "actor-restart" => {
            let sigkill = |pid: u32| {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .expect("kill the actor's worker")
            };
            // One restart, no call retries: the call in flight dies, later
            // calls reach the new incarnation (its constructor re-run).
            let recorder = Recorder::options().max_restarts(1).remote(1)?;
            recorder.record(0, 0).get()?;
            let first_pid = recorder.pid().get()?;
            let in_flight = recorder.nap(30_000);
            let _ = recorder
                .record(0, 1)
                .get_timeout(Duration::from_millis(300));
            sigkill(first_pid);
            let during = in_flight.get();
            let second_pid = recorder.pid().get();
            let orders_after = recorder.orders().get();
            // No restarts left: the next death is final.
            let second_pid_value = *second_pid.as_ref().unwrap_or(&0);
            if second_pid_value != 0 {
                sigkill(second_pid_value);
            }
            let after_last = recorder.pid().get();
            // A call in flight is resent to the new incarnation when
            // max_task_retries allows.
            let retried = Recorder::options()
                .max_restarts(1)
                .max_task_retries(1)
                .remote(1)?;
            let retried_pid = retried.pid().get()?;
            let resent = retried.nap(1500);
            let _ = retried.record(0, 0).get_timeout(Duration::from_millis(300));
            sigkill(retried_pid);
            let resent = resent.get();
            let retried_new_pid = retried.pid().get();
            // kill without no_restart restarts the actor, as a crash does.
            let killed = Recorder::options().max_restarts(1).remote(1)?;
            let killed_pid = killed.pid().get()?;
            shoal::kill(&killed, false)?;
            let killed_new_pid = killed.pid().get();
            shoal::kill(&killed, true)?;
            let killed_for_good = killed.pid().get();
            result(json!({
                "in_flight_died": matches!(during, Err(Error::ActorDied { .. })),
                "restarted_with_new_pid": matches!(second_pid, Ok(p) if p != first_pid),
                "state_is_new": matches!(&orders_after, Ok(o) if o.is_empty()),
                "died_after_last_restart": matches!(after_last, Err(Error::ActorDied { .. })),
                "resent_call": format!("{resent:?}"),
                "resent_on_new_pid": matches!(retried_new_pid, Ok(p) if p != retried_pid),
                "kill_restarts": matches!(killed_new_pid, Ok(p) if p != killed_pid),
                "kill_no_restart_final": matches!(killed_for_good, Err(Error::ActorDied { .. })),
                "debug": format!("{second_pid:?} {orders_after:?} {after_last:?} {killed_new_pid:?}"),
            }));
        }
        "observe" => {
            // Tasks that finish, fail and are retried, and actor calls, for
            // the state API and the timeline.
            let n: u32 = arg(1).parse().unwrap_or(20);
            let file = arg(2);
            let said: Vec<_> = (0..n).map(say::remote).collect();
            let said = shoal::get_all(&said)?;
            let failed = fails::remote("on purpose".to_string());
            let failed_task = failed.id().task_id().to_string();
            let failed_ok = failed.get().is_ok();
            let retried = crash_once::options().max_retries(2).remote(file);
            let retried_task = retried.id().task_id().to_string();
            let retried_value = retried.get()?;
            let recorder = Recorder::remote(1)?;
            let calls: Vec<_> = (0..3).map(|i| recorder.record(0, i)).collect();
            let call_task = calls[0].id().task_id().to_string();
            let recorded = shoal::get_all(&calls)?;
            result(json!({
                "said": said.len(),
                "failed_task": failed_task,
                "failed_ok": failed_ok,
                "retried_task": retried_task,
                "retried_value": retried_value,
                "call_task": call_task,
                "recorded": recorded,
            }));
        }
        "submitted" => {
            // Run by `shoal job submit`: reads its working directory and
            // environment, and runs tasks as the submitted job.
            let input = std::fs::read_to_string("input.txt").unwrap_or_default();
            let refs: Vec<_> = (0..10).map(where_am_i::remote).collect();
            let count = shoal::get_all(&refs)?.len();
            let job = shoal::context()?.job_id.to_string();
            result(json!({
                "input": input.trim(),
                "greeting": std::env::var("GREETING").unwrap_or_default(),
                "count": count,
                "job_id": job,
            }));
        }
        "spans" => {
            // One task and one actor call, for a test reading the debug log.
            let said = say::remote(3).get()?;
            let recorder = Recorder::remote(1)?;
            let recorded = recorder.record(0, 0).get()?;
            result(json!({"said": said, "recorded": recorded}));
        }
        "recover-job" => {
            // FT-8: a named detached actor holding state, then a job of
            // short tasks in waves of 50; the test kills the head after the
            // PROGRESS line and recovers it while the waves go on.
            let name = arg(1);
            let n: u32 = arg(2).parse().unwrap_or(2000);
            let recorder = Recorder::options()
                .name(&name)
                .namespace("tests")
                .lifetime_detached()
                .remote(1)?;
            for i in 0..10 {
                recorder.record(7, i).get()?;
            }
            println!("READY");
            let mut correct = true;
            let mut waves = Vec::new();
            for wave in 0..n / 50 {
                let refs: Vec<_> = (0..50)
                    .map(|j| sleep_then::remote(10, wave * 50 + j))
                    .collect();
                let out = shoal::get_all(&refs)?;
                correct &= out
                    .iter()
                    .enumerate()
                    .all(|(j, v)| *v == wave * 50 + j as u32);
                waves.push(unix_ms());
                if wave == 4 {
                    println!("PROGRESS {}", (wave + 1) * 50);
                    std::io::stdout().flush().expect("stdout");
                }
            }
            let orders = recorder.orders().get()?;
            result(json!({
                "count": waves.len() * 50,
                "correct": correct,
                "wave_done_ms": waves,
                "orders": orders,
            }));
        }
        "recover-use" => {
            // After the recovery: the actor by name with its state, and a
            // new job that runs.
            let name = arg(1);
            let recorder: ActorHandle<Recorder> = shoal::get_actor(&name, "tests")?;
            recorder.record(7, 10).get()?;
            let orders = recorder.orders().get()?;
            let refs: Vec<_> = (0..100).map(|i| sleep_then::remote(1, i)).collect();
            let sum: u32 = shoal::get_all(&refs)?.into_iter().sum();
            shoal::kill(&recorder, true)?;
            result(json!({"orders": orders, "sum": sum}));
        }
        "head-gone" => {
            // The head dies and stays dead: a new task and an actor lookup
            // fail with HeadUnavailable (SHOAL_HEAD_TIMEOUT bounds them).
            say::remote(1).get()?;
            println!("READY");
            std::io::stdout().flush().expect("stdout");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).expect("stdin");
            let start = Instant::now();
            let task = sleep_then::options().num_cpus(2.0).remote(1, 1).get();
            let task_s = start.elapsed().as_secs_f64();
            let lookup = shoal::get_actor::<Recorder>("nobody", "tests");
            let kind = |e: &Error| match e {
                Error::HeadUnavailable(_) => "HeadUnavailable".to_string(),
                other => format!("{other:?}"),
            };
            result(json!({
                "task": task.as_ref().map_or_else(kind, |v| v.to_string()),
                "task_s": task_s,
                "lookup": lookup.as_ref().err().map(kind),
            }));
        }
        "kv-many" => {
            // Puts 0..N one by one; each put that returned is acknowledged
            // (the head may die between a write and its reply meanwhile).
            let n: u32 = arg(1).parse().unwrap_or(100);
            let mut acked = Vec::new();
            for i in 0..n {
                shoal::kv::put("tests", &format!("k{i:04}"), i.to_string().as_bytes(), true)?;
                acked.push(i);
            }
            let keys = shoal::kv::keys("tests", "k")?;
            // Bad input is refused with a typed error, the head serving on.
            let too_large = shoal::kv::put("tests", "big", &vec![0; (1 << 20) + 1], true);
            let bad_namespace = shoal::kv::put("te\0sts", "k", b"v", true);
            let refused = |r: &shoal::Result<bool>| {
                matches!(r, Err(Error::Rpc(shoal_net::RpcError::Service(e)))
                    if e.kind == shoal_proto::ServiceErrorKind::BadRequest)
            };
            let bad_input_refused = refused(&too_large) && refused(&bad_namespace);
            let mut values_ok = true;
            for i in &acked {
                let v = shoal::kv::get("tests", &format!("k{i:04}"))?;
                values_ok &= v == Some(i.to_string().into_bytes());
            }
            result(json!({
                "acked": acked.len(),
                "keys": keys.len(),
                "values_ok": values_ok,
                "bad_input_refused": bad_input_refused,
            }));
        }
        "detached-create" => {
            let name = arg(1);
            let recorder = Recorder::options()
                .name(&name)
                .namespace("tests")
                .lifetime_detached()
                .remote(1)?;
            recorder.record(0, 0).get()?;
            // A second actor with the same name is refused while this one lives.
            let taken = matches!(
                Recorder::options().name(&name).namespace("tests").remote(1),
                Err(Error::ActorNameTaken(_))
            );
            result(json!({"created": recorder.id().to_string(), "name_taken": taken}));
        }
        "detached-use" => {
            let name = arg(1);
            let recorder: ActorHandle<Recorder> = shoal::get_actor(&name, "tests")?;
            recorder.record(0, 1).get()?;
            let orders = recorder.orders().get()?;
            let wrong_class = shoal::get_actor::<Relay>(&name, "tests").is_err();
            shoal::kill(&recorder, true)?;
            let after_kill = recorder.record(0, 2).get();
            let gone = shoal::get_actor::<Recorder>(&name, "tests").is_err();
            let again = Recorder::options()
                .name(&name)
                .namespace("tests")
                .remote(1)?;
            let reused = again.record(0, 0).get().is_ok();
            shoal::kill(&again, true)?;
            result(json!({
                "id": recorder.id().to_string(),
                "orders": orders,
                "wrong_class_refused": wrong_class,
                "dead_after_kill": matches!(after_kill, Err(Error::ActorDied { .. })),
                "name_free_after_kill": gone,
                "name_reused": reused,
            }));
        }
        "infeasible" => {
            // No node offers this: the task waits, reported as infeasible.
            let never = where_am_i::options().resource("unobtainium", 1.0).remote(0);
            let waited = never.get_timeout(Duration::from_secs(600));
            result(json!({"finished": waited.is_ok()}));
        }
        other => {
            eprintln!("unknown scenario {other:?}");
            std::process::exit(2);
        }
    }
    Ok(())
}
