//! Measures creating many idle actors in local mode: the creation rate, the
//! time until every actor has answered one call, and the memory each costs.
//!
//! `threads`: workers are threads of this process (each actor has its own
//! worker: an endpoint and a dedicated executor), so the cost is this
//! process's resident growth. `processes`: each actor is its own worker
//! process; the program first creates a probe of 50 actors, measures one
//! idle worker's memory (RSS, PSS and private USS, from `/proc`), threads
//! and file descriptors, says how many would fit in the machine's memory,
//! and creates no more than fit in 60% of it (by PSS) and in 80% of the pid
//! limits (`kernel/pid_max`, `threads-max`, `ulimit -u`: every thread takes
//! a pid). The open-files limit is printed, not applied.
//!
//! Actors are created by CREATORS threads at once (`remote` blocks until its
//! actor is created), for at most BUDGET seconds. Progress is printed every
//! 5 s, so a rate that falls as actors accumulate shows; creation that makes
//! no progress for 120 s is reported and the program exits. Each actor is
//! then called once (twice), and the calls that fail are counted.
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_actors --
//! [threads|processes] [N] [CREATORS] [BUDGET]` (defaults: threads, 10 000, 8,
//! 600).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal::prelude::*;
use shoal_net::sync::MutexExt;

/// An actor that does nothing until called.
#[shoal::actor]
pub struct Idle {
    id: u32,
}

#[shoal::actor]
impl Idle {
    pub fn new(id: u32) -> Self {
        Idle { id }
    }

    pub fn ping(&self) -> u32 {
        self.id
    }
}

/// Actors created to measure one worker process before creating the rest.
const PROBE: usize = 50;
/// Share of the machine's memory the actors may take.
const MEMORY_SHARE: f64 = 0.6;
/// Creation making no progress for this long is reported as a stall.
const STALL: Duration = Duration::from_secs(120);

/// Refuses bad arguments with the usage line (exit 2).
fn usage(why: &str) -> ! {
    eprintln!("bench_actors: {why}\nusage: bench_actors [threads|processes] [N] [CREATORS] [BUDGET_SECONDS]");
    std::process::exit(2)
}

/// Argument `i` as a whole number, `default` if absent.
fn number(args: &[String], i: usize, default: u64) -> u64 {
    match args.get(i) {
        None => default,
        Some(a) => a
            .parse()
            .unwrap_or_else(|_| usage(&format!("argument {i} ({a:?}) is not a whole number"))),
    }
}

#[shoal::main]
fn main() -> shoal::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let processes = match args.get(1).map(String::as_str) {
        None | Some("threads") => false,
        Some("processes") => true,
        Some(other) => usage(&format!("mode {other:?} is neither threads nor processes")),
    };
    let asked = number(&args, 2, 10_000) as usize;
    let creators = number(&args, 3, 8).max(1) as usize;
    let budget = Duration::from_secs(number(&args, 4, 600));
    let _shoal = shoal::init(shoal::Config::local().worker_processes(processes))?;
    let mode = if processes {
        "worker processes"
    } else {
        "thread workers"
    };
    let limits = Limits::read();
    println!("{mode}: {asked} actors asked, {creators} creating threads; {limits}");
    let base = Snapshot::take();

    let handles = Mutex::new(Vec::with_capacity(asked));
    let created = Creation::default();
    let run = |target: usize| {
        let before = handles.locked().len();
        let start = Instant::now();
        created.run(&handles, target, creators, budget);
        let took = start.elapsed();
        let now = handles.locked().len();
        println!(
            "created {} actors in {took:.2?}: {:.0} per second ({now} in all{})",
            now - before,
            (now - before) as f64 / took.as_secs_f64(),
            match created.error.locked().as_ref() {
                Some(e) => format!("; creation ended early: {e}"),
                None => String::new(),
            }
        );
    };
    if processes {
        run(asked.min(PROBE));
        std::thread::sleep(Duration::from_secs(2)); // let the workers settle
        let workers = workers();
        let n = workers.len().max(1) as u64;
        let each = |f: fn(&Worker) -> u64| workers.iter().map(f).sum::<u64>() / n;
        let (rss, pss, uss) = (each(|w| w.rss), each(|w| w.pss), each(|w| w.uss));
        let threads = workers.iter().map(|w| w.threads).sum::<u64>().div_ceil(n);
        let fds = Snapshot::take().fds.saturating_sub(base.fds) as u64 / n;
        let fit = |per: u64| limits.mem_total / per.max(1);
        println!(
            "probe: {n} worker processes; one idle worker: RSS {:.2} MiB, PSS {:.2} MiB, private (USS) {:.2} MiB, {threads} threads, {fds} open files in this process; the machine's {} GiB hold {} by RSS, {} by PSS, {} by USS",
            mib(rss),
            mib(pss),
            mib(uss),
            limits.mem_total >> 30,
            fit(rss),
            fit(pss),
            fit(uss),
        );
        let by_memory = (fit(pss) as f64 * MEMORY_SHARE) as usize;
        let by_pids = limits.tasks_left * 8 / 10 / threads.max(1) as usize;
        let by_procs = limits.nproc.saturating_sub(limits.tasks) * 8 / 10 / threads.max(1) as usize;
        let by_files = limits.nofile.saturating_sub(base.fds) / fds.max(1) as usize;
        let target = asked.min(by_memory).min(by_pids).min(by_procs);
        println!(
            "creating up to {target} (asked {asked}; {:.0}% of memory by PSS allows {by_memory}, 80% of free pids {by_pids}, of ulimit -u {by_procs}; ulimit -n {} would allow about {by_files}, not capped)",
            MEMORY_SHARE * 100.0,
            limits.nofile,
        );
        run(target);
    } else {
        run(asked);
    }
    let handles = std::mem::take(&mut *handles.locked());

    for round in ["first", "second"] {
        let start = Instant::now();
        let refs: Vec<ObjectRef<u32>> = handles.iter().map(|h| h.ping()).collect();
        let (mut answered, mut failed, mut first_error) = (0, 0, None);
        for r in &refs {
            match r.get() {
                Ok(_) => answered += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        let took = start.elapsed();
        println!(
            "{round} call on all {}: {answered} answered in {took:.2?} ({:.0} calls per second){}",
            refs.len(),
            answered as f64 / took.as_secs_f64(),
            match first_error {
                Some(e) => format!("; {failed} FAILED, the first: {e}"),
                None => String::new(),
            }
        );
    }

    let after = Snapshot::take();
    let n = handles.len().max(1) as u64;
    let driver = after.driver_rss.saturating_sub(base.driver_rss);
    let machine = base.mem_available.saturating_sub(after.mem_available);
    print!(
        "memory per actor: this process +{:.1} KiB; machine (MemAvailable drop) {:.1} KiB",
        driver as f64 / 1024.0 / n as f64,
        machine as f64 / 1024.0 / n as f64,
    );
    if processes {
        let workers = workers();
        let rss: u64 = workers.iter().map(|w| w.rss).sum();
        let pss: u64 = workers.iter().map(|w| w.pss).sum();
        let threads: u64 = workers.iter().map(|w| w.threads).sum();
        println!(
            "; {} worker processes: RSS {:.2} GiB in all ({:.1} MiB each), PSS {:.2} GiB ({:.1} MiB each), {threads} threads",
            workers.len(),
            rss as f64 / (1u64 << 30) as f64,
            mib(rss / workers.len().max(1) as u64),
            pss as f64 / (1u64 << 30) as f64,
            mib(pss / workers.len().max(1) as u64),
        );
    } else {
        println!();
    }
    println!(
        "this process: {} threads, {} open files, resident {} MiB",
        after.threads,
        after.fds,
        after.driver_rss >> 20
    );

    let start = Instant::now();
    drop(handles);
    let dropped = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes && !workers().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "dropped every handle in {dropped:.2?}; {} worker processes left {:.2?} later",
        workers().len(),
        start.elapsed()
    );
    Ok(())
}

/// Actors being created by several threads, with a progress line every 5 s.
#[derive(Default)]
struct Creation {
    error: Mutex<Option<String>>,
}

impl Creation {
    /// Creates actors until `handles` holds `target`, or one fails.
    fn run(
        &self,
        handles: &Mutex<Vec<ActorHandle<Idle>>>,
        target: usize,
        creators: usize,
        budget: Duration,
    ) {
        let next = AtomicUsize::new(handles.locked().len());
        let failed = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| self.monitor(handles, start, &done, &failed));
            let creating: Vec<_> = (0..creators)
                .map(|_| {
                    s.spawn(|| {
                        while !failed.load(Ordering::Relaxed) {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= target {
                                break;
                            }
                            if start.elapsed() > budget {
                                let mut error = self.error.locked();
                                error.get_or_insert(format!("stopped at the {budget:?} budget"));
                                break;
                            }
                            match Idle::remote(i as u32) {
                                Ok(h) => handles.locked().push(h),
                                Err(e) => {
                                    failed.store(true, Ordering::Relaxed);
                                    let mut error = self.error.locked();
                                    error.get_or_insert(format!("actor {i}: {e}"));
                                }
                            }
                        }
                    })
                })
                .collect();
            for c in creating {
                let _ = c.join();
            }
            done.store(true, Ordering::Relaxed);
        });
    }

    /// Prints progress every 5 s; exits the program if creation stalls.
    fn monitor(
        &self,
        handles: &Mutex<Vec<ActorHandle<Idle>>>,
        start: Instant,
        done: &AtomicBool,
        failed: &AtomicBool,
    ) {
        let (mut last, mut since) = (handles.locked().len(), Instant::now());
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let now = handles.locked().len();
            if now != last && since.elapsed() >= Duration::from_secs(5) {
                let s = Snapshot::take();
                println!(
                    "  {:>6.1?}: {now} actors, {:.0}/s lately; resident {} MiB, {} threads, {} open files, {} worker processes",
                    start.elapsed(),
                    (now - last) as f64 / since.elapsed().as_secs_f64(),
                    s.driver_rss >> 20,
                    s.threads,
                    s.fds,
                    worker_pids().len(),
                );
                (last, since) = (now, Instant::now());
            } else if now == last && since.elapsed() >= STALL && !failed.load(Ordering::Relaxed) {
                let s = Snapshot::take();
                println!(
                    "STALLED: no actor created for {STALL:?} at {now} actors; resident {} MiB, {} threads, {} open files, {} worker processes; exiting",
                    s.driver_rss >> 20,
                    s.threads,
                    s.fds,
                    worker_pids().len()
                );
                std::process::exit(3);
            }
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// What this process and the machine look like now.
struct Snapshot {
    driver_rss: u64,
    mem_available: u64,
    threads: u64,
    fds: usize,
}

impl Snapshot {
    fn take() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self {
            driver_rss: field(&status, "VmRSS:") * 1024,
            threads: field(&status, "Threads:"),
            mem_available: meminfo("MemAvailable:"),
            fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
        }
    }
}

/// The machine's limits that bound how many worker processes can exist.
struct Limits {
    mem_total: u64,
    /// Pids left for new threads and processes (pid_max, threads-max).
    tasks_left: usize,
    /// `ulimit -u` (counted by thread, as the kernel does; root is exempt).
    nproc: usize,
    /// `ulimit -n`.
    nofile: usize,
    /// Threads on the machine now.
    tasks: usize,
}

impl Limits {
    fn read() -> Self {
        let num = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(usize::MAX)
        };
        let tasks: usize = std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .bytes()
                            .all(|b| b.is_ascii_digit())
                    })
                    .map(|e| std::fs::read_dir(e.path().join("task")).map_or(0, |t| t.count()))
                    .sum()
            })
            .unwrap_or(0);
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        // The soft limit: the first field after the limit's name.
        let soft_limit = |name: &str| {
            limits
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(usize::MAX)
        };
        let (nproc, nofile) = (soft_limit("Max processes"), soft_limit("Max open files"));
        let cap = num("/proc/sys/kernel/pid_max").min(num("/proc/sys/kernel/threads-max"));
        Self {
            mem_total: meminfo("MemTotal:"),
            tasks_left: cap.saturating_sub(tasks),
            nproc,
            nofile,
            tasks,
        }
    }
}

impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "machine: {} GiB memory, {} pids left ({} tasks now), ulimit -u {}, ulimit -n {}",
            self.mem_total >> 30,
            self.tasks_left,
            self.tasks,
            self.nproc,
            self.nofile
        )
    }
}

/// One worker process: a child of this one (the node daemon in this
/// process starts them).
struct Worker {
    rss: u64,
    pss: u64,
    /// Private (unshared) memory: what one more worker adds.
    uss: u64,
    threads: u64,
}

fn worker_pids() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let ppid = stat
                        .rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<u32>().ok());
                    ppid == Some(me)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn workers() -> Vec<Worker> {
    worker_pids()
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            Some(Worker {
                rss: field(&status, "VmRSS:") * 1024,
                pss: field(&rollup, "Pss:") * 1024,
                uss: (field(&rollup, "Private_Clean:") + field(&rollup, "Private_Dirty:")) * 1024,
                threads: field(&status, "Threads:"),
            })
        })
        .collect()
}

/// The number after `key` on its line of a `/proc` file.
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn meminfo(key: &str) -> u64 {
    field(
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        key,
    ) * 1024
}
