//! An actor: a counter living in its own worker, called through a typed
//! handle. Calls from one caller run in order; `&self` reads may run side by
//! side; an `async` method awaits a timer without blocking the others.
//!
//! Run: `cargo run -p shoal-examples --bin counter`

use std::time::Duration;

use shoal::prelude::*;

#[shoal::actor]
pub struct Counter {
    n: u64,
}

#[shoal::actor]
impl Counter {
    pub fn new(start: u64) -> Self {
        Counter { n: start }
    }

    pub fn incr(&mut self, by: u64) -> u64 {
        self.n += by;
        self.n
    }

    pub fn read(&self) -> u64 {
        self.n
    }

    pub async fn slow_read(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.n
    }
}

/// A task that is handed the counter and calls it directly.
#[shoal::remote]
fn add_from_a_task(counter: ActorHandle<Counter>, times: u64) -> u64 {
    let mut last = 0;
    for _ in 0..times {
        last = counter.incr(1).get().expect("incr from a task");
    }
    last
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let c: ActorHandle<Counter> = Counter::remote(0)?;
    let r: ObjectRef<u64> = c.incr(5);
    println!("incr(5) = {}", r.get()?);
    let results: Vec<ObjectRef<u64>> = (0..100).map(|_| c.incr(1)).collect();
    let seen = shoal::get_all(&results)?;
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "calls from one caller run in order"
    );
    println!("100 increments in order, last {}", seen[99]);
    println!("slow_read = {}", c.slow_read(20).get()?);
    let from_task = add_from_a_task::remote(c.clone(), 10).get()?;
    println!("a task holding the handle counted to {from_task}");
    println!("final value {}", c.read().get()?);
    assert_eq!(c.read().get()?, 115);
    Ok(())
}
