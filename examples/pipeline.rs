//! A pipeline of actors: batches flow through three stages, each an actor,
//! passed from one stage to the next as object references (a stage's result
//! is the next stage's argument, resolved where that stage runs).
//!
//! Run: `cargo run -p shoal-examples --bin pipeline -- [batches]`

/// Stage 1: parse raw lines into numbers.
#[shoal::actor]
#[derive(Default)]
pub struct Parse {
    seen: u64,
}

#[shoal::actor]
impl Parse {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn run(&mut self, lines: Vec<String>) -> Vec<i64> {
        self.seen += lines.len() as u64;
        lines.iter().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

/// Stage 2: a transform with state (a running offset).
#[shoal::actor]
pub struct Transform {
    offset: i64,
}

#[shoal::actor]
impl Transform {
    pub fn new(offset: i64) -> Self {
        Transform { offset }
    }

    pub fn run(&mut self, values: Vec<i64>) -> Vec<i64> {
        values.into_iter().map(|v| v * 2 + self.offset).collect()
    }
}

/// Stage 3: aggregate everything it has been sent.
#[shoal::actor]
#[derive(Default)]
pub struct Sink {
    total: i64,
    count: u64,
}

#[shoal::actor]
impl Sink {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn absorb(&mut self, values: Vec<i64>) -> u64 {
        self.total += values.iter().sum::<i64>();
        self.count += values.len() as u64;
        self.count
    }

    pub fn summary(&self) -> (i64, u64) {
        (self.total, self.count)
    }
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let batches: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let (parse, transform, sink) = (Parse::remote()?, Transform::remote(7)?, Sink::remote()?);
    let mut last = None;
    for b in 0..batches {
        let lines: Vec<String> = (0..100).map(|i| format!(" {} ", b * 100 + i)).collect();
        let parsed = parse.run(lines);
        let transformed = transform.run(parsed);
        last = Some(sink.absorb(transformed));
    }
    if let Some(last) = last {
        last.get()?;
    }
    let (total, count) = sink.summary().get()?;
    let expected: i64 = (0..batches * 100).map(|v| v * 2 + 7).sum();
    println!(
        "{batches} batches, {count} values through 3 actors; total {total} (expected {expected})"
    );
    assert_eq!((total, count), (expected, batches as u64 * 100));
    println!("pipeline result matches");
    Ok(())
}
