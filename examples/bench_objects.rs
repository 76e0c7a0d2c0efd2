//! Measures the object plane: `put` and `get` of 800 MB values of the types
//! users write (`Vec<u8>`, `Vec<f32>`, `Vec<f64>`, `Vec<u64>`, `String`,
//! `bytes::Bytes`, `serde_bytes::ByteBuf`, a struct holding a `Vec<f32>`,
//! and Shoal's own `Buffer`), each next to a plain copy of the same bytes
//! into memory already written and into fresh pages; and (on a cluster) the
//! rate at which one node pulls an object from another.
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_objects`
//! (`-- --only NAME` for one type; on a cluster: prefix
//! `SHOAL_ADDRESS=host:port`, and pass `--remote-resource NAME` with a
//! resource only another node offers, to time a pull by a task placed there)

use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal::Buffer;

const BYTES: usize = 800 << 20;
const ROUNDS: usize = 3;

/// Reads the buffer where the task runs (mapping it, after its node pulled
/// it if it lives elsewhere); returns its length and one byte per page.
#[shoal::remote(num_cpus = 0)]
fn touch(data: Buffer) -> (u64, u64) {
    let sum = data.iter().step_by(4096).map(|b| u64::from(*b)).sum();
    (data.len() as u64, sum)
}

/// A value as users write them: a struct with a large numeric field.
#[derive(Clone, Serialize, Deserialize)]
struct Frame {
    id: u64,
    label: String,
    samples: Vec<f32>,
}

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

fn seconds(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// The two copies every line is read against: into memory written before
/// (what `put` into a warm store can reach) and into fresh pages (what
/// `get` into a new value can reach).
fn copies(source: &[u8]) -> (f64, f64) {
    let mut warm = vec![1u8; source.len()];
    let mut best = (0.0f64, 0.0f64);
    for _ in 0..ROUNDS {
        let t = seconds(|| {
            warm.copy_from_slice(std::hint::black_box(source));
            std::hint::black_box(&mut warm);
        });
        best.0 = best.0.max(gbps(source.len(), t));
        let t = seconds(|| {
            let mut fresh: Vec<u8> = Vec::with_capacity(source.len());
            fresh.extend_from_slice(std::hint::black_box(source));
            std::hint::black_box(&fresh);
        });
        best.1 = best.1.max(gbps(source.len(), t));
    }
    (best.0, best.1)
}

/// Puts and gets `value` `ROUNDS` times; prints each round's rates.
fn measure<T>(name: &str, value: T, bytes: usize) -> shoal::Result<()>
where
    T: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    for round in 0..ROUNDS {
        // The value is cloned before the clock starts: a put's time is its
        // copy into the store, not making or freeing the value.
        let copy = value.clone();
        let start = Instant::now();
        let object = shoal::put(copy)?;
        let put = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let got = object.get()?;
        let get = start.elapsed().as_secs_f64();
        drop(std::hint::black_box(got));
        println!(
            "{name:<22} round {round}: put {:>6.2} GB/s | get {:>6.2} GB/s",
            gbps(bytes, put),
            gbps(bytes, get),
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only = flag("--only");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let source: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
    let (warm, fresh) = copies(&source);
    println!(
        "memcpy of {} MB: {warm:.2} GB/s into memory written before, {fresh:.2} GB/s into fresh pages (best of {ROUNDS})",
        BYTES >> 20
    );
    println!(
        "bars: put at least {:.2} GB/s (half the first), get at least {:.2} GB/s (half the second)",
        warm / 2.0,
        fresh / 2.0
    );
    if wanted("Vec<u8>") {
        measure("Vec<u8>", source.clone(), BYTES)?;
    }
    let floats = || (0..BYTES / 4).map(|i| i as f32).collect::<Vec<f32>>();
    if wanted("Vec<f32>") {
        measure("Vec<f32>", floats(), BYTES)?;
    }
    if wanted("Vec<f64>") {
        let v: Vec<f64> = (0..BYTES / 8).map(|i| i as f64).collect();
        measure("Vec<f64>", v, BYTES)?;
    }
    if wanted("Vec<u64>") {
        let v: Vec<u64> = (0..BYTES as u64 / 8).collect();
        measure("Vec<u64>", v, BYTES)?;
    }
    if wanted("String") {
        let text: String = source.iter().map(|b| (b'a' + b % 26) as char).collect();
        measure("String", text, BYTES)?;
    }
    if wanted("Bytes") {
        measure("bytes::Bytes", bytes::Bytes::from(source.clone()), BYTES)?;
    }
    if wanted("ByteBuf") {
        let v = serde_bytes::ByteBuf::from(source.clone());
        measure("serde_bytes::ByteBuf", v, BYTES)?;
    }
    if wanted("Frame") {
        let frame = Frame {
            id: 7,
            label: "a struct with a Vec<f32> field".into(),
            samples: floats(),
        };
        measure("struct { Vec<f32> }", frame, BYTES)?;
    }
    if wanted("Buffer") {
        let buffer = Buffer::from_vec(source.clone());
        for round in 0..ROUNDS {
            let start = Instant::now();
            let object = shoal::put(buffer.clone())?;
            let put = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let read = object.get()?;
            let get = start.elapsed().as_secs_f64();
            assert_eq!(read.len(), BYTES);
            println!(
                "{:<22} round {round}: put {:>6.2} GB/s | get {:>6.2} GB/s ({})",
                "shoal::Buffer",
                gbps(BYTES, put),
                gbps(BYTES, get),
                if read.is_mapped() {
                    "mapped, no copy"
                } else {
                    "copied"
                },
            );
            if let Some(resource) = flag("--remote-resource") {
                let start = Instant::now();
                let (len, _) = touch::options()
                    .resource(&resource, 0.01)
                    .remote(&object)
                    .get()?;
                let pulled = start.elapsed().as_secs_f64();
                assert_eq!(len as usize, BYTES);
                println!(
                    "round {round}: a task on the node offering {resource:?} pulled and mapped it at {:>6.2} GB/s",
                    gbps(BYTES, pulled)
                );
            }
        }
    }
    Ok(())
}
