//! The state API on the command line: `shoal list`, `shoal get` and
//! `shoal summary`, as tables or `--json`.

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;
use shoal_proto::state::{Filter, Row, StateKind, StateQuery, StateRows, Value};
use shoal_proto::{HeadReply, HeadRequest};

use crate::status::{ask, HeadArgs, HeadTarget};

/// What the state API lists.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    /// Nodes, live and dead: address, resources, object store use.
    Nodes,
    /// Jobs, newest first: state, driver, start and end times.
    Jobs,
    /// Tasks and actor calls, newest first, from their events: state,
    /// node, worker, error.
    Tasks,
    /// Actors: state, class, name, node, pid, restarts.
    Actors,
    /// Leased workers: node, job, owner, resources, the actor hosted.
    Workers,
    /// Objects in node stores: size, owner, copies, spilled or in memory.
    Objects,
    /// Placement groups (none can be made yet: the list is empty).
    PlacementGroups,
}

impl Kind {
    fn state_kind(self) -> StateKind {
        match self {
            Kind::Nodes => StateKind::Nodes,
            Kind::Jobs => StateKind::Jobs,
            Kind::Tasks => StateKind::Tasks,
            Kind::Actors => StateKind::Actors,
            Kind::Workers => StateKind::Workers,
            Kind::Objects => StateKind::Objects,
            Kind::PlacementGroups => StateKind::PlacementGroups,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// What to list.
    #[arg(value_enum)]
    what: Kind,
    /// Keep only records whose FIELD equals (=) or differs from (!=)
    /// VALUE; states and names compare in any case. Repeat to combine.
    /// `--detail --json` shows every field.
    #[arg(long = "filter", short = 'f', value_name = "FIELD=VALUE")]
    filters: Vec<Filter>,
    /// Most records shown (at most 10000); the count of the rest is
    /// printed.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Every field, not only the main ones.
    #[arg(long)]
    detail: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    head: HeadArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GetKind {
    /// A task or actor call, with its state changes.
    Task,
    /// An actor.
    Actor,
    /// A node.
    Node,
    /// A job.
    Job,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// What to show.
    #[arg(value_enum)]
    what: GetKind,
    /// Its id (as listed).
    id: String,
    /// Print JSON instead of fields.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    head: HeadArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SummaryKind {
    /// Tasks by function (or method) and state.
    Tasks,
    /// Actors by class and state.
    Actors,
    /// Objects by owner: count, bytes, spilled.
    Objects,
}

#[derive(Debug, clap::Args)]
pub struct SummaryArgs {
    /// What to count.
    #[arg(value_enum)]
    what: SummaryKind,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    head: HeadArgs,
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a state API request; the rows it answers.
pub fn query(target: &HeadTarget, request: HeadRequest) -> Result<StateRows> {
    match ask(&target.address, &target.token, request, TIMEOUT)? {
        HeadReply::State(rows) => Ok(*rows),
        other => bail!("unexpected reply from the head: {other:?}"),
    }
}

pub fn run(args: ListArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    let request = HeadRequest::ListState(StateQuery {
        kind: args.what.state_kind(),
        filters: args.filters,
        limit: args.limit,
        detail: args.detail,
    });
    let rows = query(&target, request)?;
    print_rows(&rows.rows, args.json)?;
    // Notes go to stderr, so `--json` output stays one document.
    if rows.truncated {
        eprintln!(
            "showing {} of {} matching (--limit, or the reply's size bound)",
            rows.rows.len(),
            rows.matched
        );
    }
    if rows.events_dropped > 0 {
        eprintln!(
            "{} task events were dropped before the head kept them (full buffers, or the oldest tasks forgotten)",
            rows.events_dropped
        );
    }
    Ok(())
}

pub fn get(args: GetArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    let (kind, key) = match args.what {
        GetKind::Task => (StateKind::Tasks, "task_id"),
        GetKind::Actor => (StateKind::Actors, "actor_id"),
        GetKind::Node => (StateKind::Nodes, "node_id"),
        GetKind::Job => (StateKind::Jobs, "job_id"),
    };
    let row = one(&target, kind, key, &args.id)?;
    let row = &row;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&row_json(row))?);
        return Ok(());
    }
    let width = row.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in row {
        match value {
            Value::Rows(inner) => {
                println!("{key:<width$}:");
                for r in inner {
                    let parts: Vec<String> =
                        r.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect();
                    println!("{:width$}  - {}", "", parts.join(" "));
                }
            }
            other => println!("{key:<width$}: {}", cell(other)),
        }
    }
    Ok(())
}

pub fn summary(args: SummaryArgs) -> Result<()> {
    crate::logging::init("warn");
    let target = HeadTarget::from_args(&args.head)?;
    let kind = match args.what {
        SummaryKind::Tasks => StateKind::Tasks,
        SummaryKind::Actors => StateKind::Actors,
        SummaryKind::Objects => StateKind::Objects,
    };
    let rows = query(&target, HeadRequest::Summarize(kind))?;
    print_rows(&rows.rows, args.json)
}

/// Rows as a table, or as a JSON array with `json`.
pub fn print_rows(rows: &[Row], json: bool) -> Result<()> {
    if json {
        let out: Vec<_> = rows.iter().map(row_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(rows);
    }
    Ok(())
}

/// The one record of `kind` whose `key` is `id`, with every field.
pub fn one(target: &HeadTarget, kind: StateKind, key: &str, id: &str) -> Result<Row> {
    let request = HeadRequest::ListState(StateQuery {
        kind,
        filters: vec![Filter {
            key: key.to_string(),
            op: shoal_proto::state::FilterOp::Eq,
            value: id.to_string(),
        }],
        limit: 1,
        detail: true,
    });
    let what = kind.name();
    query(target, request)?
        .rows
        .into_iter()
        .next()
        .ok_or_else(|| {
            let one = what.trim_end_matches('s');
            anyhow::anyhow!("no {one} with id {id} (see `shoal list {what}`)")
        })
}

/// A text field of a record.
pub fn text<'a>(row: &'a Row, key: &str) -> Option<&'a str> {
    match row.iter().find(|(k, _)| k == key) {
        Some((_, Value::Str(s))) => Some(s),
        _ => None,
    }
}

/// A number field of a record.
pub fn int(row: &Row, key: &str) -> Option<i64> {
    match row.iter().find(|(k, _)| k == key) {
        Some((_, Value::Int(i))) => Some(*i),
        _ => None,
    }
}

/// A field's value as JSON.
pub fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Str(s) => json!(s),
        Value::List(items) => json!(items),
        Value::Rows(rows) => serde_json::Value::Array(rows.iter().map(row_json).collect()),
    }
}

/// A record as a JSON object, its fields in order.
pub fn row_json(row: &Row) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = row
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect();
    serde_json::Value::Object(map)
}

/// A field's value in a table cell.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::Rows(rows) => rows
            .iter()
            .map(|r| r.first().map(|(_, v)| cell(v)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(","),
        other => other.as_text(),
    }
}

/// Rows as a table, its columns those of the first row.
fn print_table(rows: &[Row]) {
    let Some(first) = rows.first() else {
        println!("(none)");
        return;
    };
    let headers: Vec<String> = first.iter().map(|(k, _)| k.to_uppercase()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|(_, v)| cell(v)).collect())
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            cells
                .iter()
                .filter_map(|r| r.get(i).map(String::len))
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
                .min(48)
        })
        .collect();
    let line = |fields: &[String]| {
        let parts: Vec<String> = fields
            .iter()
            .zip(&widths)
            .map(|(f, w)| format!("{f:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&headers);
    for r in &cells {
        line(r);
    }
}
