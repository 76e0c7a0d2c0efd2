//! Measures the object plane: `put` and `get` of an 800 MB buffer next to a
//! plain copy of the same buffer, and (on a cluster) the rate at which one
//! node pulls an object from another.
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_objects`
//! (on a cluster: prefix `SHOAL_ADDRESS=host:port`, and pass
//! `--remote-resource NAME` with a resource only another node offers, to
//! time a pull by a task placed there)

use std::time::Instant;

use shoal::Buffer;

const MB: usize = 800;

/// Reads the buffer where the task runs (mapping it, after its node pulled
/// it if it lives elsewhere); returns its length and one byte per page.
#[shoal::remote(num_cpus = 0)]
fn touch(data: Buffer) -> (u64, u64) {
    let sum = data.iter().step_by(4096).map(|b| u64::from(*b)).sum();
    (data.len() as u64, sum)
}

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let args: Vec<String> = std::env::args().collect();
    let remote_resource = args
        .iter()
        .position(|a| a == "--remote-resource")
        .and_then(|i| args.get(i + 1).cloned());
    let bytes = MB << 20;
    let source: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    // The copy's destination is written once first, so the timed copy
    // measures copying, not page faults.
    let mut copy = vec![1u8; bytes];
    // One buffer put again and again (as the microbenchmark does): a put's
    // time is its copy into the store, not freeing the value afterwards.
    let buffer = Buffer::from_vec(source.clone());
    for round in 0..3 {
        let start = Instant::now();
        copy.copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&copy);
        let memcpy = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let object = shoal::put(buffer.clone())?;
        let put = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let read = object.get()?;
        let get = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let sum: u64 = read.chunks(8).map(|c| u64::from(c[0])).sum();
        let scan = start.elapsed().as_secs_f64();
        assert_eq!(read.len(), bytes);
        println!(
            "round {round}: memcpy {:>6.2} GB/s | put {:>6.2} GB/s | get {:>8.2} GB/s ({}) | first read of the got buffer {:>6.2} GB/s (checksum {sum})",
            gbps(bytes, memcpy),
            gbps(bytes, put),
            gbps(bytes, get),
            if read.is_mapped() { "mapped" } else { "copied" },
            gbps(bytes, scan),
        );
        if let Some(resource) = &remote_resource {
            let start = Instant::now();
            let (len, _) = touch::options()
                .resource(resource, 0.01)
                .remote(&object)
                .get()?;
            let pulled = start.elapsed().as_secs_f64();
            assert_eq!(len as usize, bytes);
            println!(
                "round {round}: a task on the node offering {resource:?} pulled and mapped it at {:>6.2} GB/s",
                gbps(bytes, pulled)
            );
        }
    }
    Ok(())
}
