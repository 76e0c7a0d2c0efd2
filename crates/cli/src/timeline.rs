//! `shoal timeline`: the tasks the head knows as Chrome trace event JSON
//! (open it in Perfetto, ui.perfetto.dev, or chrome://tracing).
//!
//! A process per node and a track per worker on it; a slice per task or
//! actor call where it ran; a flow arrow from where it was submitted (a
//! short "submit" slice on the owner's track: a driver's, or the worker
//! whose task submitted it) to the slice that ran it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{json, Value as Json};
use shoal_proto::state::{Filter, FilterOp, Row, StateKind, StateQuery, LIST_LIMIT_MAX};
use shoal_proto::HeadRequest;

use crate::list::{int, text};
use crate::status::{HeadArgs, HeadTarget};

#[derive(Debug, clap::Args)]
pub struct TimelineArgs {
    /// Where to write the trace (default: timeline.json in the current
    /// directory; `-` for stdout).
    #[arg(short, long, value_name = "FILE", default_value = "timeline.json")]
    output: PathBuf,
    /// Only this job's tasks.
    #[arg(long, value_name = "ID")]
    job: Option<String>,
    /// Most tasks, newest first (at most 10000).
    #[arg(long, default_value_t = LIST_LIMIT_MAX, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    #[command(flatten)]
    head: HeadArgs,
}

pub fn run(args: TimelineArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    let filters = args
        .job
        .iter()
        .map(|job| Filter {
            key: "job_id".into(),
            op: FilterOp::Eq,
            value: job.clone(),
        })
        .collect();
    let rows = crate::list::query(
        &target,
        HeadRequest::ListState(StateQuery {
            kind: StateKind::Tasks,
            filters,
            limit: args.limit,
            detail: true,
        }),
    )?;
    let trace = trace(&rows.rows);
    let slices = trace["traceEvents"].as_array().map_or(0, |e| {
        e.iter()
            .filter(|e| e["ph"] == "X" && e["cat"] != "submit")
            .count()
    });
    let text = serde_json::to_string(&trace)?;
    if args.output.as_os_str() == "-" {
        println!("{text}");
    } else {
        std::fs::write(&args.output, text)
            .with_context(|| format!("writing {}", args.output.display()))?;
        eprintln!(
            "wrote {} ({slices} task slices of {} tasks); open it in https://ui.perfetto.dev",
            args.output.display(),
            rows.rows.len()
        );
    }
    if rows.truncated {
        eprintln!(
            "the newest {} of {} tasks only (--limit)",
            rows.rows.len(),
            rows.matched
        );
    }
    Ok(())
}

/// Numbers for processes (nodes) and threads (workers), as the trace
/// format wants them, with their names.
#[derive(Default)]
struct Tracks {
    nodes: BTreeMap<String, u64>,
    workers: BTreeMap<String, (u64, u64)>,
}

/// The pseudo-process of owners that ran no task here (drivers).
const DRIVERS: &str = "drivers";

impl Tracks {
    fn node(&mut self, node: &str) -> u64 {
        let next = self.nodes.len() as u64 + 1;
        *self.nodes.entry(node.to_string()).or_insert(next)
    }

    fn worker(&mut self, node: &str, worker: &str) -> (u64, u64) {
        if let Some(at) = self.workers.get(worker) {
            return *at;
        }
        let pid = self.node(node);
        let tid = self.workers.values().filter(|(p, _)| *p == pid).count() as u64 + 1;
        self.workers.insert(worker.to_string(), (pid, tid));
        (pid, tid)
    }

    fn metadata(&self) -> Vec<Json> {
        let mut out = Vec::new();
        for (node, pid) in &self.nodes {
            let name = if node == DRIVERS {
                "drivers".to_string()
            } else {
                format!("node {}", short(node))
            };
            out.push(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}));
        }
        for (worker, (pid, tid)) in &self.workers {
            out.push(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": format!("worker {}", short(worker))}}));
        }
        out
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The trace of `rows` (task rows with every field).
pub fn trace(rows: &[Row]) -> Json {
    let mut tracks = Tracks::default();
    // Workers first, so an owner that is a worker is found on its node.
    for row in rows {
        if let (Some(node), Some(worker)) = (text(row, "node_id"), text(row, "worker_id")) {
            tracks.worker(node, worker);
        }
    }
    let mut events = Vec::new();
    for (flow, row) in rows.iter().enumerate() {
        let (Some(node), Some(worker), Some(start), Some(end)) = (
            text(row, "node_id"),
            text(row, "worker_id"),
            int(row, "start_time_us"),
            int(row, "end_time_us"),
        ) else {
            continue;
        };
        let name = text(row, "name").unwrap_or("?");
        let (pid, tid) = tracks.worker(node, worker);
        let task_id = text(row, "task_id").unwrap_or_default();
        events.push(json!({
            "ph": "X",
            "cat": text(row, "type").unwrap_or("task"),
            "name": name,
            "pid": pid,
            "tid": tid,
            "ts": start,
            "dur": (end - start).max(1),
            "args": {
                "task_id": task_id,
                "state": text(row, "state"),
                "attempt": int(row, "attempt"),
                "error": text(row, "error"),
            },
        }));
        let (Some(owner), Some(submitted)) = (text(row, "owner_id"), int(row, "submitted_us"))
        else {
            continue;
        };
        let (opid, otid) = match tracks.workers.get(owner) {
            Some(at) => *at,
            None => tracks.worker(DRIVERS, owner),
        };
        // The arrow leaves a short slice on the submitter's track.
        events.push(json!({
            "ph": "X", "cat": "submit", "name": format!("submit {name}"),
            "pid": opid, "tid": otid, "ts": submitted, "dur": 1,
        }));
        events.push(json!({
            "ph": "s", "cat": "flow", "name": "submit", "id": flow,
            "pid": opid, "tid": otid, "ts": submitted,
        }));
        events.push(json!({
            "ph": "f", "bp": "e", "cat": "flow", "name": "submit", "id": flow,
            "pid": pid, "tid": tid, "ts": start.max(submitted),
        }));
    }
    let mut all = tracks.metadata();
    all.extend(events);
    json!({"traceEvents": all, "displayTimeUnit": "ms"})
}
