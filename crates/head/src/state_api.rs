//! The state API: `shoal list | get | summary` and the dashboard's data.
//!
//! Each kind of record becomes rows of named fields (the same names in
//! `--json`, `--filter` and the dashboard). A listing copies what it needs
//! under the head's lock, then filters, sorts and cuts it outside; tasks are
//! walked newest first under their own lock and the walk stops at the
//! limit. A reply never grows past [`REPLY_BYTES_MAX`].

use std::collections::BTreeMap;

use shoal_proto::head::ObjectInfo;
use shoal_proto::state::{
    Filter, FilterOp, Row, StateKind, StateQuery, StateRows, TaskState, Value, FILTERS_MAX,
    LIST_LIMIT_MAX,
};
use shoal_proto::{ActorInfo, ActorState, NodeState, NodeStatus, ResourceSet};

use crate::tasks::{Task, Tasks};

/// A reply's rows stop short of this many bytes (about; the frame limit
/// is 16 MiB).
pub const REPLY_BYTES_MAX: usize = 8 << 20;

/// The fields of each kind: every one in `--detail`, the first `main` of
/// them otherwise.
struct Fields {
    all: &'static [&'static str],
    main: usize,
}

fn fields(kind: StateKind) -> Fields {
    let (all, main): (&'static [&'static str], usize) = match kind {
        StateKind::Nodes => (
            &[
                "node_id",
                "state",
                "address",
                "hostname",
                "is_head_node",
                "resources_total",
                "resources_available",
                "object_store_used_bytes",
                "object_store_capacity_bytes",
                "pid",
                "host_id",
                "last_heartbeat_ms_ago",
                "objects_pulled",
                "metrics_address",
            ],
            9,
        ),
        StateKind::Jobs => (
            &[
                "job_id",
                "state",
                "type",
                "entrypoint",
                "start_time_us",
                "end_time_us",
                "driver_address",
                "exit_code",
                "message",
                "driver_id",
                "driver_pid",
                "binary_hash",
            ],
            6,
        ),
        StateKind::Tasks => (
            &[
                "task_id",
                "name",
                "state",
                "type",
                "job_id",
                "attempt",
                "node_id",
                "worker_id",
                "actor_id",
                "error",
                "owner_id",
                "submitted_us",
                "start_time_us",
                "end_time_us",
                "duration_ms",
                "events",
            ],
            10,
        ),
        StateKind::Actors => (
            &[
                "actor_id",
                "class",
                "name",
                "namespace",
                "state",
                "job_id",
                "node_id",
                "pid",
                "address",
                "incarnation",
                "num_restarts",
                "max_restarts",
                "detached",
                "worker_id",
                "max_pending_calls",
            ],
            13,
        ),
        StateKind::Workers => (
            &[
                "lease_id",
                "node_id",
                "job_id",
                "owner_id",
                "state",
                "resources",
                "actor_id",
            ],
            7,
        ),
        StateKind::Objects => (&["object_id", "size", "owner", "spilled", "locations"], 5),
        StateKind::PlacementGroups => (
            &[
                "placement_group_id",
                "name",
                "state",
                "strategy",
                "bundles",
                "nodes",
                "infeasible",
                "job_id",
                "detached",
            ],
            7,
        ),
    };
    Fields { all, main }
}

/// Why a query was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A filter names no field of the kind.
    #[error("{kind} have no field {key:?}; filter on one of: {fields}")]
    UnknownField {
        /// What was listed.
        kind: &'static str,
        /// The key given.
        key: String,
        /// The fields there are.
        fields: String,
    },
    /// Too many filters.
    #[error("at most {FILTERS_MAX} filters")]
    TooManyFilters,
}

/// Checks a query's filters against its kind's fields.
pub fn check(query: &StateQuery) -> Result<(), QueryError> {
    if query.filters.len() > FILTERS_MAX {
        return Err(QueryError::TooManyFilters);
    }
    let f = fields(query.kind);
    for filter in &query.filters {
        if !f.all.contains(&filter.key.as_str()) {
            return Err(QueryError::UnknownField {
                kind: query.kind.name(),
                key: filter.key.clone(),
                fields: f.all.join(", "),
            });
        }
    }
    Ok(())
}

fn matches(row: &Row, filters: &[Filter]) -> bool {
    filters.iter().all(|filter| {
        let text = row
            .iter()
            .find(|(k, _)| *k == filter.key)
            .map(|(_, v)| v.as_text())
            .unwrap_or_default();
        let equal = text.eq_ignore_ascii_case(&filter.value);
        match filter.op {
            FilterOp::Eq => equal,
            FilterOp::Ne => !equal,
        }
    })
}

/// About how many bytes a row takes on the wire.
fn size_of(row: &Row) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::Null | Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 9,
            Value::Str(s) => s.len() + 5,
            Value::List(items) => items.iter().map(|s| s.len() + 5).sum::<usize>() + 5,
            Value::Rows(rows) => rows.iter().map(size_of).sum::<usize>() + 5,
        }
    }
    row.iter().map(|(k, v)| k.len() + 2 + value(v)).sum()
}

/// Collects rows that match, up to the query's limit and the reply's size
/// bound; rows beyond either are counted, not kept.
struct Collector<'q> {
    query: &'q StateQuery,
    main: usize,
    limit: usize,
    rows: Vec<Row>,
    bytes: usize,
    matched: u64,
    full: bool,
}

impl<'q> Collector<'q> {
    fn new(query: &'q StateQuery) -> Self {
        let limit = query.limit.clamp(1, LIST_LIMIT_MAX) as usize;
        Self {
            query,
            main: fields(query.kind).main,
            limit,
            rows: Vec::new(),
            bytes: 0,
            matched: 0,
            full: false,
        }
    }

    /// Offers a full row; true while more are wanted.
    fn offer(&mut self, mut row: Row) -> bool {
        if !matches(&row, &self.query.filters) {
            return true;
        }
        self.matched += 1;
        if self.full {
            return true;
        }
        if !self.query.detail {
            row.truncate(self.main);
        }
        let bytes = size_of(&row);
        if self.rows.len() >= self.limit || self.bytes + bytes > REPLY_BYTES_MAX {
            self.full = true;
            return true;
        }
        self.bytes += bytes;
        self.rows.push(row);
        true
    }

    fn finish(self, events_dropped: u64) -> StateRows {
        StateRows {
            truncated: (self.rows.len() as u64) < self.matched,
            rows: self.rows,
            matched: self.matched,
            events_dropped,
        }
    }
}

/// What a listing reads from the head's tables, copied under its lock.
pub(crate) enum Snapshot {
    Nodes(Vec<NodeStatus>),
    Jobs(Vec<(shoal_proto::JobId, crate::jobs::Job)>),
    Actors(Vec<ActorInfo>),
    Workers(Vec<Row>),
    Objects(Vec<ObjectInfo>),
    PlacementGroups(Vec<shoal_proto::placement::PlacementGroupInfo>),
}

/// Lists a snapshot's records (all but tasks).
pub(crate) fn list(query: &StateQuery, snapshot: Snapshot) -> StateRows {
    let mut out = Collector::new(query);
    match snapshot {
        Snapshot::Nodes(nodes) => {
            // Live first, then by address.
            let mut nodes = nodes;
            nodes.sort_by(|a, b| {
                (a.state != NodeState::Alive, &a.address)
                    .cmp(&(b.state != NodeState::Alive, &b.address))
            });
            for node in &nodes {
                out.offer(node_row(node));
            }
        }
        Snapshot::Jobs(mut jobs) => {
            jobs.sort_by_key(|(_, job)| std::cmp::Reverse(job.started_us));
            for (id, job) in &jobs {
                out.offer(job_row(*id, job));
            }
        }
        Snapshot::Actors(mut actors) => {
            actors.sort_by(|a, b| {
                (
                    a.state != ActorState::Alive,
                    &a.namespace,
                    &a.name,
                    a.actor_id,
                )
                    .cmp(&(
                        b.state != ActorState::Alive,
                        &b.namespace,
                        &b.name,
                        b.actor_id,
                    ))
            });
            for actor in &actors {
                out.offer(actor_row(actor));
            }
        }
        Snapshot::Workers(rows) => {
            for row in rows {
                out.offer(row);
            }
        }
        Snapshot::Objects(mut objects) => {
            objects.sort_by_key(|o| o.id);
            for object in &objects {
                out.offer(object_row(object));
            }
        }
        Snapshot::PlacementGroups(groups) => {
            for group in &groups {
                out.offer(group_row(group));
            }
        }
    }
    out.finish(0)
}

/// Lists tasks, newest first (under the task table's lock: the walk stops
/// once the limit is reached and the rest are only counted).
pub(crate) fn list_tasks(query: &StateQuery, tasks: &Tasks) -> StateRows {
    let mut out = Collector::new(query);
    for task in tasks.newest_first() {
        out.offer(task_row(task));
    }
    out.finish(tasks.lost())
}

fn resources(set: &ResourceSet) -> Value {
    let mut parts: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.sort();
    Value::Str(parts.join(" "))
}

fn row(fields: Vec<(&str, Value)>) -> Row {
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn node_row(n: &NodeStatus) -> Row {
    let state = match n.state {
        NodeState::Alive => "ALIVE",
        NodeState::Dead => "DEAD",
    };
    row(vec![
        ("node_id", n.node_id.to_string().into()),
        ("state", state.into()),
        ("address", n.address.clone().into()),
        ("hostname", n.hostname.clone().into()),
        ("is_head_node", n.is_head_node.into()),
        ("resources_total", resources(&n.resources_total)),
        ("resources_available", resources(&n.resources_available)),
        ("object_store_used_bytes", n.object_store_used_bytes.into()),
        (
            "object_store_capacity_bytes",
            n.object_store_capacity_bytes.into(),
        ),
        ("pid", n.pid.into()),
        ("host_id", n.host_id.clone().into()),
        ("last_heartbeat_ms_ago", n.last_heartbeat_ms_ago.into()),
        ("objects_pulled", n.objects_pulled.into()),
        ("metrics_address", n.metrics_address.clone().into()),
    ])
}

fn job_row(id: shoal_proto::JobId, job: &crate::jobs::Job) -> Row {
    // A submitted job is in its driver's state (Ray's names); one a driver
    // started runs until the driver leaves.
    let (kind, state) = match &job.submission {
        Some(s) => ("SUBMISSION", s.status.name()),
        None if job.running => ("DRIVER", "RUNNING"),
        None => ("DRIVER", "FINISHED"),
    };
    let submission = job.submission.as_ref();
    let driver = job.driver.as_ref();
    row(vec![
        ("job_id", id.to_string().into()),
        ("state", state.into()),
        ("type", kind.into()),
        (
            "entrypoint",
            submission.map(|s| s.entrypoint.clone()).into(),
        ),
        ("start_time_us", job.started_us.into()),
        ("end_time_us", job.ended_us.into()),
        ("driver_address", driver.map(|d| d.address.clone()).into()),
        (
            "exit_code",
            submission.and_then(|s| s.exit_code).map(i64::from).into(),
        ),
        ("message", submission.and_then(|s| s.message.clone()).into()),
        ("driver_id", driver.map(|d| d.worker_id.to_string()).into()),
        ("driver_pid", submission.and_then(|s| s.driver_pid).into()),
        ("binary_hash", job.binary_hash.clone().into()),
    ])
}

pub(crate) fn actor_state_name(state: ActorState) -> &'static str {
    match state {
        ActorState::Alive => "ALIVE",
        ActorState::Restarting => "RESTARTING",
        ActorState::Dead => "DEAD",
    }
}

fn actor_row(a: &ActorInfo) -> Row {
    row(vec![
        ("actor_id", a.actor_id.to_string().into()),
        ("class", a.class.clone().into()),
        ("name", a.name.clone().into()),
        ("namespace", a.namespace.clone().into()),
        ("state", actor_state_name(a.state).into()),
        ("job_id", a.job_id.to_string().into()),
        ("node_id", a.node_id.to_string().into()),
        ("pid", a.pid.into()),
        ("address", a.worker.address.clone().into()),
        ("incarnation", a.incarnation.into()),
        ("num_restarts", a.num_restarts.into()),
        ("max_restarts", a.max_restarts.into()),
        ("detached", a.detached.into()),
        ("worker_id", a.worker.worker_id.to_string().into()),
        ("max_pending_calls", a.max_pending_calls.into()),
    ])
}

fn group_row(g: &shoal_proto::placement::PlacementGroupInfo) -> Row {
    let bundles: Vec<String> = g
        .spec
        .bundles
        .iter()
        .map(|b| match resources(b) {
            Value::Str(s) => format!("{{{s}}}"),
            _ => String::new(),
        })
        .collect();
    let nodes: Vec<String> = g
        .bundle_nodes
        .iter()
        .map(|n| n.map_or_else(|| "-".to_string(), |n| n.to_string()))
        .collect();
    row(vec![
        ("placement_group_id", g.spec.group_id.to_string().into()),
        ("name", g.spec.name.clone().into()),
        ("state", g.state.to_string().into()),
        ("strategy", g.spec.strategy.to_string().into()),
        ("bundles", bundles.join(" ").into()),
        ("nodes", Value::List(nodes)),
        ("infeasible", g.infeasible.into()),
        ("job_id", g.spec.job_id.to_string().into()),
        ("detached", g.spec.detached.into()),
    ])
}

/// A leased worker's row.
pub(crate) fn worker_row(
    lease: &crate::scheduler::LeaseView<'_>,
    actor: Option<shoal_proto::ActorId>,
) -> Row {
    let state = if lease.blocked { "BLOCKED" } else { "LEASED" };
    row(vec![
        ("lease_id", lease.lease_id.to_string().into()),
        ("node_id", lease.node_id.to_string().into()),
        ("job_id", lease.job_id.to_string().into()),
        ("owner_id", lease.owner.to_string().into()),
        ("state", state.into()),
        ("resources", resources(lease.resources)),
        ("actor_id", actor.map(|a| a.to_string()).into()),
    ])
}

fn object_row(o: &ObjectInfo) -> Row {
    let place = |spilled: bool| if spilled { "SPILLED" } else { "IN_MEMORY" };
    let locations = o
        .copies
        .iter()
        .map(|c| {
            row(vec![
                ("node_id", c.node_id.to_string().into()),
                ("primary", c.primary.into()),
                ("state", place(c.spilled).into()),
            ])
        })
        .collect();
    row(vec![
        ("object_id", o.id.to_string().into()),
        ("size", o.size.into()),
        ("owner", o.owner.map(|w| w.to_string()).into()),
        (
            "spilled",
            o.copies.iter().any(|c| c.primary && c.spilled).into(),
        ),
        ("locations", Value::Rows(locations)),
    ])
}

fn task_row(t: &Task) -> Row {
    let run = t.run.filter(|r| r.attempt == t.attempt);
    let (start, end) = run.map_or((None, None), |r| (Some(r.ran_us.0), Some(r.ran_us.1)));
    let duration_ms =
        run.map(|r| Value::Float(r.ran_us.1.saturating_sub(r.ran_us.0) as f64 / 1000.0));
    let events = t
        .changes()
        .map(|c| {
            row(vec![
                ("state", c.state.name().into()),
                ("attempt", c.attempt.into()),
                ("at_us", c.at_us.into()),
            ])
        })
        .collect();
    row(vec![
        ("task_id", t.task_id.to_string().into()),
        ("name", t.name.to_string().into()),
        ("state", t.state.name().into()),
        ("type", t.kind.name().into()),
        ("job_id", t.job_id.map(|j| j.to_string()).into()),
        ("attempt", t.attempt.into()),
        ("node_id", t.placed.map(|p| p.node_id.to_string()).into()),
        (
            "worker_id",
            t.placed.map(|p| p.worker_id.to_string()).into(),
        ),
        ("actor_id", t.actor_id.map(|a| a.to_string()).into()),
        ("error", t.error.clone().into()),
        ("owner_id", t.owner.map(|o| o.to_string()).into()),
        ("submitted_us", t.submitted_us.into()),
        ("start_time_us", start.into()),
        ("end_time_us", end.into()),
        ("duration_ms", duration_ms.unwrap_or(Value::Null)),
        ("events", Value::Rows(events)),
    ])
}

/// Task counts by name and state: one row per function (or method).
pub(crate) fn summarize_tasks(tasks: &Tasks) -> StateRows {
    let mut by_name: BTreeMap<(String, &'static str), [u64; 5]> = BTreeMap::new();
    for task in tasks.newest_first() {
        let counts = by_name
            .entry((task.name.to_string(), task.kind.name()))
            .or_default();
        let i = TaskState::ALL
            .iter()
            .position(|s| *s == task.state)
            .unwrap_or(0);
        counts[i] += 1;
    }
    let rows = by_name
        .into_iter()
        .map(|((name, kind), counts)| {
            let mut r = row(vec![("name", name.into()), ("type", kind.into())]);
            for (state, n) in TaskState::ALL.iter().zip(counts) {
                r.push((state.name().to_string(), n.into()));
            }
            r.push(("total".to_string(), counts.iter().sum::<u64>().into()));
            r
        })
        .collect();
    summary(rows, tasks.lost())
}

/// Actor counts by class and state.
pub(crate) fn summarize_actors(actors: &[ActorInfo]) -> StateRows {
    let states = [ActorState::Alive, ActorState::Restarting, ActorState::Dead];
    let mut by_class: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for a in actors {
        let i = states.iter().position(|s| *s == a.state).unwrap_or(0);
        by_class.entry(&a.class).or_default()[i] += 1;
    }
    let rows = by_class
        .into_iter()
        .map(|(class, counts)| {
            let mut r = row(vec![("class", class.into())]);
            for (state, n) in states.iter().zip(counts) {
                r.push((actor_state_name(*state).to_string(), n.into()));
            }
            r.push(("total".to_string(), counts.iter().sum::<u64>().into()));
            r
        })
        .collect();
    summary(rows, 0)
}

/// Object counts and bytes by owner.
pub(crate) fn summarize_objects(objects: &[ObjectInfo]) -> StateRows {
    let mut by_owner: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for o in objects {
        let owner = o.owner.map_or_else(|| "-".to_string(), |w| w.to_string());
        let entry = by_owner.entry(owner).or_default();
        entry.0 += 1;
        entry.1 += o.size;
        entry.2 += u64::from(o.copies.iter().any(|c| c.primary && c.spilled));
    }
    let rows = by_owner
        .into_iter()
        .map(|(owner, (count, bytes, spilled))| {
            row(vec![
                ("owner", owner.into()),
                ("objects", count.into()),
                ("bytes", bytes.into()),
                ("spilled", spilled.into()),
            ])
        })
        .collect();
    summary(rows, 0)
}

fn summary(rows: Vec<Row>, events_dropped: u64) -> StateRows {
    StateRows {
        matched: rows.len() as u64,
        truncated: false,
        rows,
        events_dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::state::{EventBatch, Placed, TaskEvent, TaskInfo, TaskKind};
    use shoal_proto::{JobId, NodeId, TaskId, WorkerId};

    fn tasks(n: usize, name: &str) -> Tasks {
        let mut tasks = Tasks::new();
        let events = (0..n)
            .flat_map(|i| {
                let task_id = TaskId::fresh();
                let first = TaskEvent {
                    task_id,
                    attempt: 0,
                    state: TaskState::PendingArgs,
                    at_us: i as u64,
                    info: Some(TaskInfo {
                        name: 0,
                        kind: TaskKind::Task,
                        actor_id: None,
                    }),
                    placed: None,
                    ran_us: None,
                    error: None,
                    earlier: Vec::new(),
                };
                let state = if i % 2 == 0 {
                    TaskState::Finished
                } else {
                    TaskState::Failed
                };
                let last = TaskEvent {
                    state,
                    info: None,
                    placed: Some(Placed {
                        node_id: NodeId::random(),
                        worker_id: WorkerId::random(),
                    }),
                    ran_us: Some((1, 2)),
                    ..first.clone()
                };
                [first, last]
            })
            .collect();
        tasks.record(EventBatch {
            job_id: JobId::random(),
            owner: WorkerId::random(),
            names: vec![name.into()],
            events,
            dropped: 0,
        });
        tasks
    }

    fn query(filters: &[&str], limit: u32, detail: bool) -> StateQuery {
        StateQuery {
            kind: StateKind::Tasks,
            filters: filters.iter().map(|f| f.parse().expect("filter")).collect(),
            limit,
            detail,
        }
    }

    #[test]
    fn every_row_has_exactly_its_kinds_fields() {
        let t = tasks(1, "f");
        let names = |r: &Row| r.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        let task = t.newest_first().next().expect("a task");
        assert_eq!(names(&task_row(task)), fields(StateKind::Tasks).all);
    }

    #[test]
    fn filters_limit_and_count_what_they_cut() {
        let t = tasks(30, "f");
        let out = list_tasks(&query(&["state=failed"], 5, false), &t);
        assert_eq!(out.matched, 15);
        assert_eq!(out.rows.len(), 5);
        assert!(out.truncated);
        assert!(out.rows.iter().all(|r| r[2].1 == Value::from("FAILED")));
        assert_eq!(out.rows[0].len(), fields(StateKind::Tasks).main);
        let out = list_tasks(&query(&["state!=FAILED", "name=f"], 100, true), &t);
        assert_eq!(
            (out.matched, out.rows.len(), out.truncated),
            (15, 15, false)
        );
        assert_eq!(out.rows[0].len(), fields(StateKind::Tasks).all.len());
    }

    #[test]
    fn an_unknown_field_is_refused_with_the_fields_there_are() {
        let err = check(&query(&["colour=red"], 5, false)).expect_err("refused");
        assert!(err.to_string().contains("task_id, name, state"), "{err}");
        let many: Vec<String> = (0..FILTERS_MAX + 1).map(|_| "state=x".into()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            check(&query(&many, 5, false)),
            Err(QueryError::TooManyFilters)
        );
    }

    #[test]
    fn a_reply_stays_under_its_size_bound() {
        let long = "n".repeat(4000);
        let t = tasks(LIST_LIMIT_MAX as usize, &long);
        let out = list_tasks(&query(&[], LIST_LIMIT_MAX, true), &t);
        let bytes: usize = out.rows.iter().map(size_of).sum();
        assert!(bytes <= REPLY_BYTES_MAX);
        assert!(out.truncated && out.rows.len() < LIST_LIMIT_MAX as usize);
        assert_eq!(out.matched, u64::from(LIST_LIMIT_MAX));
    }

    #[test]
    fn summary_counts_by_name_and_state() {
        let t = tasks(4, "g");
        let out = summarize_tasks(&t);
        assert_eq!(out.rows.len(), 1);
        let get = |k: &str| {
            out.rows[0]
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("FINISHED"), Some(Value::Int(2)));
        assert_eq!(get("FAILED"), Some(Value::Int(2)));
        assert_eq!(get("total"), Some(Value::Int(4)));
    }
}
