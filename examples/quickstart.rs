//! The SDK tour: remote functions, references as arguments, get / get_all /
//! wait / put, options, and errors, in local mode or on a cluster.
//!
//! Run: `cargo run -p shoal-examples --bin quickstart`
//! (on a cluster: `SHOAL_ADDRESS=127.0.0.1:6380 cargo run -p shoal-examples --bin quickstart`)

use std::time::Duration;

use shoal::prelude::*;

#[shoal::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[shoal::remote(num_cpus = 1, max_retries = 3)]
async fn fetch(n: u32) -> std::result::Result<Vec<u8>, String> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    if n == 0 {
        return Err("nothing to fetch".to_string());
    }
    Ok(vec![n as u8; n as usize])
}

#[shoal::remote]
fn total(data: Vec<u8>) -> u64 {
    data.iter().map(|b| u64::from(*b)).sum()
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let x: ObjectRef<i64> = add::remote(1, 2);
    let y = add::remote(x.clone(), 10);
    assert_eq!(y.get()?, 13);
    println!("add(add(1, 2), 10) = {}", y.get()?);

    let refs: Vec<ObjectRef<i64>> = (0..100).map(|i| add::remote(i, i)).collect();
    let all: Vec<i64> = shoal::get_all(&refs)?;
    assert_eq!(all, (0..100).map(|i| 2 * i).collect::<Vec<_>>());
    let (ready, pending) = shoal::wait(&refs, 10, Some(Duration::from_secs(5)))?;
    println!("wait: {} ready, {} pending", ready.len(), pending.len());

    let big = shoal::put(vec![7u8; 4 << 20])?;
    println!("sum of a 4 MiB put object: {}", total::remote(&big).get()?);
    let z = add::options().num_cpus(1.0).max_retries(0).remote(1, 2);
    println!("with options: {}", z.get()?);

    println!("fetch(3) = {:?}", fetch::remote(3).get()?);
    match fetch::remote(0).get() {
        Err(Error::Task(e)) => println!("fetch(0) failed as expected: {e}"),
        other => panic!("expected a task error, got {other:?}"),
    }
    Ok(())
}
