//! Cancellation and timeouts, from the user's side: what runs sees
//! `is_cancelled`, async work is dropped, work not started never starts,
//! forced cancels stop the worker, cancels reach nested tasks and actor
//! calls, and every cancelled reference answers within a second.
//!
//! Tasks leave marker files in a directory of the scenario's, which the
//! driver polls for (tasks run on this host, in local mode or on a
//! single-host cluster).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal::prelude::*;

use super::super::result;

fn mark(dir: &str, name: &str, text: &str) {
    std::fs::write(Path::new(dir).join(name), text).expect("a marker file");
}

fn marker(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

/// Polls for `name` in `dir` for up to 30 s.
fn await_marker(dir: &Path, name: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(text) = marker(dir, name) {
            return Some(text);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `<tag>-started`, then waits (up to 60 s) for `is_cancelled`,
/// and writes `<tag>-saw-cancel` when it turns true.
#[shoal::remote]
fn spin(dir: String, tag: String) -> u32 {
    mark(
        &dir,
        &format!("{tag}-started"),
        &std::process::id().to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if shoal::is_cancelled() {
            mark(&dir, &format!("{tag}-saw-cancel"), "");
            return 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    0
}

/// Writes `<tag>-dropped` when dropped.
struct DropMark(String, String);

impl Drop for DropMark {
    fn drop(&mut self) {
        mark(&self.0, &format!("{}-dropped", self.1), "");
    }
}

/// Starts, then sleeps 60 s: a cancel drops it (`<tag>-dropped`).
#[shoal::remote]
async fn sleepy(dir: String, tag: String) -> u32 {
    let _guard = DropMark(dir.clone(), tag.clone());
    mark(
        &dir,
        &format!("{tag}-started"),
        &std::process::id().to_string(),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    mark(&dir, &format!("{tag}-finished"), "");
    0
}

/// Ignores cancels: sleeps 60 s (a forced cancel stops its process).
#[shoal::remote]
fn stubborn(dir: String) -> u32 {
    mark(&dir, "stubborn-started", &std::process::id().to_string());
    std::thread::sleep(Duration::from_secs(60));
    0
}

/// Runs `spin` as a task of its own and waits for it.
#[shoal::remote]
fn parent(dir: String) -> u32 {
    spin::remote(dir, "child".to_string()).get().unwrap_or(7)
}

/// Submits a task that cannot start (no node offers its resource), marks
/// `queued-child-submitted`, waits for it, and marks `queued-child` with
/// how its `get` answered.
#[shoal::remote]
fn waits_on_queued(dir: String) -> u32 {
    let child = spin::options()
        .resource("nowhere", 1.0)
        .remote(dir.clone(), "queued-child-ran".to_string());
    mark(&dir, "queued-child-submitted", "");
    let answered = match child.get() {
        Err(Error::Cancelled { .. }) => "cancelled".to_string(),
        other => format!("{other:?}"),
    };
    mark(&dir, "queued-child", &answered);
    0
}

/// Cancels the task behind the first reference (a process that does not
/// own it).
#[shoal::remote]
fn canceller(refs: Vec<ObjectRef<u32>>) -> bool {
    shoal::cancel(&refs[0]).is_ok()
}

#[shoal::remote]
fn quick(x: u32) -> u32 {
    x + 1
}

/// An actor whose calls record what ran.
#[shoal::actor]
pub struct Recorder {
    ran: Vec<String>,
}

#[shoal::actor]
impl Recorder {
    pub fn new() -> Self {
        Recorder { ran: Vec::new() }
    }

    /// Blocks until cancelled (or 60 s).
    pub fn block(&mut self, dir: String) -> u32 {
        mark(&dir, "block-started", "");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !shoal::is_cancelled() {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ran.push("block".into());
        0
    }

    pub fn record(&mut self, what: String) -> u32 {
        self.ran.push(what);
        0
    }

    pub fn ran(&self) -> Vec<String> {
        self.ran.clone()
    }
}

/// An async actor.
#[shoal::actor]
pub struct Sleeper;

#[shoal::actor]
impl Sleeper {
    pub fn new() -> Self {
        Sleeper
    }

    pub async fn sleepy(&self, dir: String, tag: String) -> u32 {
        let _guard = DropMark(dir.clone(), tag.clone());
        mark(&dir, &format!("{tag}-started"), "");
        tokio::time::sleep(Duration::from_secs(60)).await;
        0
    }
}

/// How a cancelled reference answered: the error's kind and how long the
/// `get` after the cancel took.
fn answer(r: &ObjectRef<u32>, since: Instant) -> serde_json::Value {
    let got = r.get();
    let ms = since.elapsed().as_millis() as u64;
    let kind = match &got {
        Err(Error::Cancelled { .. }) => "cancelled".to_string(),
        Err(Error::Timeout(after)) => format!("timeout {}ms", after.as_millis()),
        other => format!("{other:?}"),
    };
    json!({"kind": kind, "ms": ms})
}

/// Cancels `r` (forced or not) and says how its reference answered.
fn cancel_and_answer(r: &ObjectRef<u32>, force: bool) -> shoal::Result<serde_json::Value> {
    let t = Instant::now();
    if force {
        shoal::cancel_force(r)?;
    } else {
        shoal::cancel(r)?;
    }
    Ok(answer(r, t))
}

pub fn run() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let dir = std::env::temp_dir().join(format!("shoal-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a marker directory");
    let out = scenario(&dir);
    std::fs::remove_dir_all(&dir).ok();
    result(out?);
    Ok(())
}

fn scenario(dir: &Path) -> shoal::Result<serde_json::Value> {
    let d = dir.display().to_string();
    let s = |t: &str| t.to_string();

    // A running sync task sees is_cancelled.
    let running = spin::remote(d.clone(), s("sync"));
    let started = await_marker(dir, "sync-started").is_some();
    let sync = cancel_and_answer(&running, false)?;
    let saw = await_marker(dir, "sync-saw-cancel").is_some();

    // A running async task is dropped.
    let asleep = sleepy::remote(d.clone(), s("async"));
    await_marker(dir, "async-started");
    let async_ = cancel_and_answer(&asleep, false)?;
    let dropped = await_marker(dir, "async-dropped").is_some();

    // A task that cannot start yet (no node offers its resource) never does.
    let waiting = spin::options()
        .resource("nowhere", 1.0)
        .remote(d.clone(), s("never"));
    let never = cancel_and_answer(&waiting, false)?;

    // Recursive: the nested task sees the cancel too.
    let tree = parent::remote(d.clone());
    await_marker(dir, "child-started");
    let nested = cancel_and_answer(&tree, false)?;
    let child_saw = await_marker(dir, "child-saw-cancel").is_some();

    // From a process that does not own the reference.
    let target = spin::remote(d.clone(), s("remote"));
    await_marker(dir, "remote-started");
    let t = Instant::now();
    let cancelled_elsewhere = canceller::remote(vec![target.clone()]).get()?;
    let remote = answer(&target, t);
    let remote_saw = await_marker(dir, "remote-saw-cancel").is_some();

    // A task waiting for a place, from a process that does not own it.
    let unplaced = spin::options()
        .resource("nowhere", 1.0)
        .remote(d.clone(), s("queued-remote"));
    let t = Instant::now();
    let queued_cancelled_elsewhere = canceller::remote(vec![unplaced.clone()]).get()?;
    let queued_remote = answer(&unplaced, t);

    // A task waiting for a place, submitted by a task that is cancelled.
    let waiter = waits_on_queued::remote(d.clone());
    await_marker(dir, "queued-child-submitted");
    let queued_parent = cancel_and_answer(&waiter, false)?;
    let queued_child = await_marker(dir, "queued-child");

    // Forced: the worker process stops, though the task never looks.
    let forced = stubborn::remote(d.clone());
    let pid: i32 = await_marker(dir, "stubborn-started")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let force = cancel_and_answer(&forced, true)?;
    let own_process = pid == std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut worker_stopped = false;
    while !own_process && Instant::now() < deadline {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            worker_stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // Timeouts.
    let timed = spin::options()
        .timeout(Duration::from_millis(300))
        .remote(d.clone(), s("timed"));
    let timeout = answer(&timed, Instant::now());
    let timed_saw = await_marker(dir, "timed-saw-cancel").is_some();

    // A task that ended is left as it is.
    let done = quick::remote(1);
    let value = done.get()?;
    shoal::cancel(&done)?;
    let after_done = done.get()?;

    // Actor calls: a call waiting for its turn never runs; the running one
    // sees is_cancelled.
    let recorder = Recorder::remote()?;
    let blocking = recorder.block(d.clone());
    await_marker(dir, "block-started");
    let queued = recorder.record(s("queued"));
    let call_queued = cancel_and_answer(&queued, false)?;
    let call_running = cancel_and_answer(&blocking, false)?;
    recorder.record(s("after")).get()?;
    let ran = recorder.ran().get()?;

    // A running async method is dropped; a call past its timeout too.
    let sleeper = Sleeper::remote()?;
    let call = sleeper.sleepy(d.clone(), s("method"));
    await_marker(dir, "method-started");
    let call_async = cancel_and_answer(&call, false)?;
    let method_dropped = await_marker(dir, "method-dropped").is_some();
    let timed_call = sleeper
        .timeout(Duration::from_millis(300))
        .sleepy(d.clone(), s("timed-method"));
    let call_timeout = answer(&timed_call, Instant::now());
    let timed_method_dropped = await_marker(dir, "timed-method-dropped").is_some();

    Ok(json!({
        "started": started,
        "sync": sync, "saw": saw,
        "async": async_, "dropped": dropped,
        "never": never,
        "never_started": marker(dir, "never-started").is_none(),
        "nested": nested, "child_saw": child_saw,
        "cancelled_elsewhere": cancelled_elsewhere, "remote": remote, "remote_saw": remote_saw,
        "queued_cancelled_elsewhere": queued_cancelled_elsewhere, "queued_remote": queued_remote,
        "queued_parent": queued_parent, "queued_child": queued_child,
        "force": force, "own_process": own_process, "worker_stopped": worker_stopped,
        "timeout": timeout, "timed_saw": timed_saw,
        "value": value, "after_done": after_done,
        "call_queued": call_queued, "call_running": call_running, "ran": ran,
        "call_async": call_async, "method_dropped": method_dropped,
        "call_timeout": call_timeout, "timed_method_dropped": timed_method_dropped,
    }))
}
