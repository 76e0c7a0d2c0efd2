//! MapReduce word count over a generated text of `--mb` MB (1 000 by
//! default), the job `make bench-wordcount` times: the same text, byte for
//! byte, as the Python scripts in `bench/` generate for Ray, Dask and
//! `multiprocessing` (defined in bench/README.md), counted
//! - by one sequential loop on one core (the baseline), then
//! - as a Shoal job `--repeat` times: the driver splits the text into
//!   `--mappers` chunks, each a `Vec<u8>` argument of a map task that
//!   counts its words and `put`s one partition of the counts per reducer;
//!   `--reducers` reduce tasks merge one partition each.
//!
//! Text generation is not timed; a run is timed from the text in the
//! driver's memory to the merged counts in the driver. Each prints one JSON
//! line like the Python scripts (`words`, `distinct` and `digest` must match
//! theirs for the same `--mb` and `--seed`), and the Shoal runs are checked
//! against the sequential count.
//!
//! Run: `cargo run --release -p shoal-examples --bin bench_wordcount --
//! [--mb N] [--mappers M] [--reducers R] [--seed S] [--repeat K]` (the
//! mode is the environment's: threads, `SHOAL_WORKER_PROCESSES=1`, or a
//! cluster with `SHOAL_ADDRESS`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use shoal::prelude::*;

#[path = "flags.rs"]
mod flags;

/// A fast hasher for short keys: FxHash's multiply-rotate per 8 bytes, and
/// a final mix so that the low bits (the table's index) depend on every
/// byte.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

type FastMap<K> = HashMap<K, u64, BuildHasherDefault<Fx>>;

/// A partition of the counts, as it travels between tasks.
type Counts = HashMap<String, u64>;

const VOCABULARY: usize = 50_000;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `k`: k + 1 in bijective base 26, most significant letter first.
fn word_of(k: usize) -> Vec<u8> {
    let (mut n, mut out) = (k + 1, Vec::new());
    while n > 0 {
        n -= 1;
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    out.reverse();
    out
}

/// The benchmark's text (bench/README.md, "The text").
fn generate(target: usize, seed: u64) -> Vec<u8> {
    let words: Vec<Vec<u8>> = (0..VOCABULARY).map(word_of).collect();
    let mut text = Vec::with_capacity(target + 8);
    let mut i: u64 = 0;
    loop {
        let h = mix(seed.wrapping_add((i + 1).wrapping_mul(GOLDEN)));
        let u = (h >> 11) as f64 * (-53f64).exp2();
        let k = ((((u * u) * u) * VOCABULARY as f64) as usize).min(VOCABULARY - 1);
        text.extend_from_slice(&words[k]);
        text.push(if (h >> 4) & 15 == 0 { b'\n' } else { b' ' });
        i += 1;
        if text.len() >= target {
            return text;
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Counts the words of `text` (separated by spaces and newlines).
fn count(text: &[u8]) -> FastMap<&[u8]> {
    let mut counts = FastMap::default();
    for word in text
        .split(|b| *b == b' ' || *b == b'\n')
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word).or_default() += 1;
    }
    counts
}

/// Counts a chunk's words and `put`s one partition per reducer.
#[shoal::remote]
fn map_chunk(chunk: Vec<u8>, reducers: u64) -> Vec<ObjectRef<Counts>> {
    let mut parts: Vec<Counts> = vec![Counts::new(); reducers as usize];
    for (word, n) in count(&chunk) {
        let part = (fnv1a(word) % reducers) as usize;
        let word = String::from_utf8_lossy(word).into_owned();
        parts[part].insert(word, n);
    }
    parts
        .into_iter()
        .map(|p| shoal::put(p).expect("put a partition"))
        .collect()
}

/// Merges one partition from every mapper.
#[shoal::remote]
fn reduce(parts: Vec<ObjectRef<Counts>>) -> Counts {
    let mut total = Counts::new();
    for part in shoal::get_all(&parts).expect("partitions") {
        for (word, n) in part {
            *total.entry(word).or_default() += n;
        }
    }
    total
}

/// Splits `text` into about `n` pieces, each ending at a separator.
fn chunks(text: &[u8], n: usize) -> Vec<Vec<u8>> {
    let size = text.len().div_ceil(n.max(1));
    let (mut out, mut start) = (Vec::new(), 0);
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        while end < text.len() && text[end] != b' ' && text[end] != b'\n' {
            end += 1;
        }
        out.push(text[start..end].to_vec());
        start = end;
    }
    out
}

/// Total words, distinct words and the digest (bench/README.md).
fn summary<'a>(counts: impl Iterator<Item = (&'a [u8], u64)>) -> (u64, usize, u64) {
    counts.fold((0, 0, 0), |(words, distinct, digest), (w, n)| {
        (
            words + n,
            distinct + 1,
            digest.wrapping_add(fnv1a(w).wrapping_mul(n)),
        )
    })
}

#[shoal::main]
fn main() -> shoal::Result<()> {
    let flags = flags::Flags::parse(
        "bench_wordcount",
        &["--mb", "--mappers", "--reducers", "--seed", "--repeat"],
        "bench_wordcount [--mb N] [--mappers M] [--reducers R] [--seed S] [--repeat K]",
    );
    let option = |flag: &str, default: u64| flags.get(flag, default);
    let (mb, mappers, reducers, seed, repeat) = (
        option("--mb", 1000),
        option("--mappers", 32) as usize,
        option("--reducers", 4),
        option("--seed", 42),
        option("--repeat", 3),
    );
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let mode = if std::env::var_os("SHOAL_ADDRESS").is_some() {
        "cluster"
    } else if std::env::var("SHOAL_WORKER_PROCESSES").is_ok_and(|v| v == "1") {
        "local, worker processes"
    } else {
        "local, thread workers"
    };

    let start = Instant::now();
    let text = generate((mb * 1_000_000) as usize, seed);
    eprintln!(
        "generated {} bytes in {:.2?}; first bytes {:?}",
        text.len(),
        start.elapsed(),
        String::from_utf8_lossy(&text[..text.len().min(60)])
    );
    let line = |system: &str,
                run: u64,
                seconds: f64,
                (words, distinct, digest): (u64, usize, u64)| {
        println!(
            "{{\"system\": \"{system}\", \"mb\": {mb}, \"mappers\": {mappers}, \"reducers\": {reducers}, \"run\": {run}, \"seconds\": {seconds:.3}, \"mb_per_s\": {:.1}, \"words\": {words}, \"distinct\": {distinct}, \"digest\": {digest}}}",
            text.len() as f64 / 1e6 / seconds
        );
    };

    let start = Instant::now();
    let sequential = count(&text);
    let seconds = start.elapsed().as_secs_f64();
    let expected = summary(sequential.iter().map(|(w, n)| (*w, *n)));
    line("rust-sequential", 1, seconds, expected);

    for run in 1..=repeat {
        let start = Instant::now();
        let mapped: Vec<ObjectRef<Vec<ObjectRef<Counts>>>> = chunks(&text, mappers)
            .into_iter()
            .map(|chunk| map_chunk::remote(chunk, reducers))
            .collect();
        let partitions = shoal::get_all(&mapped)?;
        let reduced: Vec<ObjectRef<Counts>> = (0..reducers as usize)
            .map(|r| reduce::remote(partitions.iter().map(|p| p[r].clone()).collect::<Vec<_>>()))
            .collect();
        let merged: Vec<Counts> = shoal::get_all(&reduced)?;
        let seconds = start.elapsed().as_secs_f64();
        let got = summary(
            merged
                .iter()
                .flat_map(|c| c.iter().map(|(w, n)| (w.as_bytes(), *n))),
        );
        assert_eq!(
            got, expected,
            "the job's counts differ from the sequential count"
        );
        line(&format!("shoal ({mode})"), run, seconds, got);
    }
    Ok(())
}
