//! Streaming generators, from the user's side: items in order as they are
//! made, the producer held back by the caller, large items stored, a
//! `Stream` producer and consumer, a failure ending the stream, a drop
//! stopping the producer, and a retried producer handing nothing twice.
//!
//! Producers leave marker files in a directory of the scenario's, which
//! the driver reads (tasks run on this host).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal::prelude::*;

use super::super::result;

fn write(dir: &str, name: &str, text: &str) {
    // Written whole, then renamed: a reader never sees half a number.
    let tmp = Path::new(dir).join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).expect("a marker file");
    std::fs::rename(tmp, Path::new(dir).join(name)).expect("a marker file");
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

/// Polls for `name` in `dir` for up to 30 s.
fn await_marker(dir: &Path, name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if read(dir, name).is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Items `i` for `i` in `0..n` (every tenth one 200 KB: stored, not
/// inline); each time it is about to yield, it writes how many it has made
/// to `<tag>-made`.
#[shoal::remote]
fn numbers(dir: String, tag: String, n: u32) -> impl Iterator<Item = (u32, Vec<u8>)> {
    (0..n).map(move |i| {
        write(&dir, &format!("{tag}-made"), &(i + 1).to_string());
        let size = if i % 10 == 9 { 200_000 } else { 8 };
        (i, vec![(i % 251) as u8; size])
    })
}

/// Counts up forever; writes `<tag>-dropped` when the iterator is dropped
/// (its producer stopped).
struct Endless {
    dir: String,
    next: u32,
}

impl Iterator for Endless {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        self.next += 1;
        Some(self.next - 1)
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        write(&self.dir, "endless-dropped", "");
    }
}

#[shoal::remote]
fn endless(dir: String) -> impl Iterator<Item = u32> {
    Endless { dir, next: 0 }
}

/// Three items, then a panic.
#[shoal::remote]
fn three_then_panic() -> impl Iterator<Item = u32> {
    (0..4).inspect(|i| {
        if *i == 3 {
            panic!("the producer broke after three items");
        }
    })
}

/// A `Stream` of `n` items, one per millisecond.
#[shoal::remote]
fn ticks(n: u32) -> impl shoal::Stream<Item = u32> {
    futures_util::StreamExt::then(futures_util::stream::iter(0..n), |i| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        i * 10
    })
}

/// `n` items; the first try's worker process exits after five of them.
#[shoal::remote]
fn dies_once(dir: String, n: u32) -> impl Iterator<Item = u32> {
    (0..n).inspect(move |i| {
        if *i == 5 && read(Path::new(&dir), "died").is_none() {
            write(&dir, "died", "");
            std::process::exit(3);
        }
    })
}

pub fn run() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let processes = std::env::var("SHOAL_ADDRESS").is_ok()
        || std::env::var("SHOAL_WORKER_PROCESSES").as_deref() == Ok("1");
    let dir = std::env::temp_dir().join(format!("shoal-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a marker directory");
    let out = scenario(&dir, processes);
    std::fs::remove_dir_all(&dir).ok();
    result(out?);
    Ok(())
}

fn scenario(dir: &Path, processes: bool) -> shoal::Result<serde_json::Value> {
    let d = dir.display().to_string();
    let n = 60u32;
    let backpressure = 4u32;

    // In order, each as made, the producer never more than `backpressure`
    // items ahead of what was taken.
    let mut items = Vec::new();
    let mut most_ahead = 0u32;
    let generator = numbers::options()
        .generator_backpressure(backpressure)
        .remote(d.clone(), "sync".to_string(), n);
    for (taken, item) in generator.enumerate() {
        let (i, block) = item?.get()?;
        items.push(json!([
            i,
            block.len(),
            block.iter().all(|b| *b == (i % 251) as u8)
        ]));
        // The caller works a little on each item, so the producer can run
        // ahead if nothing holds it back.
        std::thread::sleep(Duration::from_millis(3));
        let made: u32 = read(dir, "sync-made")
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        most_ahead = most_ahead.max(made.saturating_sub(taken as u32 + 1));
    }
    let in_order = items
        .iter()
        .enumerate()
        .all(|(k, item)| item[0] == k as u64 && item[2] == true);
    let stored_sizes: Vec<u64> = items
        .iter()
        .filter_map(|item| item[1].as_u64().filter(|s| *s > 100_000))
        .collect();

    // A failure is the last item.
    let mut outcomes = Vec::new();
    for item in three_then_panic::remote() {
        outcomes.push(match item {
            Ok(r) => json!(r.get()?),
            Err(Error::Task(e)) if e.message.contains("broke after three") => json!("panic"),
            Err(other) => json!(format!("{other}")),
        });
    }

    // Dropping the generator stops its producer.
    let mut forever = endless::remote(d.clone());
    let first: Vec<u32> = (0..3)
        .map(|_| forever.next().expect("an item")?.get())
        .collect::<shoal::Result<_>>()?;
    drop(forever);
    let stopped = await_marker(dir, "endless-dropped");

    // A Stream producer, consumed as a Stream.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let streamed: Vec<u32> = rt.block_on(async {
        let got: shoal::Result<Vec<u32>> = async {
            let mut got = Vec::new();
            let mut stream = ticks::remote(20);
            // `next` is both Iterator's and StreamExt's: named, it is clear.
            while let Some(item) = futures_util::StreamExt::next(&mut stream).await {
                got.push(item?.await?);
            }
            Ok(got)
        }
        .await;
        got
    })?;

    // A producer whose worker dies is run again; nothing is handed twice.
    let retried: Option<Vec<u32>> = if processes {
        Some(
            dies_once::remote(d.clone(), 20)
                .map(|item| item.and_then(|r| r.get()))
                .collect::<shoal::Result<_>>()?,
        )
    } else {
        None
    };

    Ok(json!({
        "count": items.len(), "n": n, "in_order": in_order, "stored_sizes": stored_sizes,
        "most_ahead": most_ahead, "backpressure": backpressure,
        "outcomes": outcomes,
        "first": first, "stopped": stopped,
        "streamed": streamed,
        "retried": retried,
        "died": read(dir, "died").is_some(),
    }))
}
