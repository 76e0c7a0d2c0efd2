//! Word count as MapReduce: map tasks count the words of text chunks and
//! shuffle their counts by key hash into R partitions, each `put` as its own
//! object; R reduce tasks each receive the references to their partition from
//! every mapper and merge them. The driver checks the result against a
//! sequential count and prints the top words.
//!
//! Run: `cargo run -p shoal-examples --bin wordcount -- [file] [--mappers M] [--reducers R]`
//! With no file it generates a text (about 8 MB) on the spot.

use std::collections::HashMap;
use std::time::Instant;

use shoal::prelude::*;

type Counts = HashMap<String, u64>;

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
}

fn partition_of(word: &str, reducers: u64) -> usize {
    let hash = word.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % reducers) as usize
}

/// Counts a chunk's words and returns one object per reducer.
#[shoal::remote]
fn map_chunk(chunk: String, reducers: u64) -> Vec<ObjectRef<Counts>> {
    let mut partitions: Vec<Counts> = vec![HashMap::new(); reducers as usize];
    for word in words(&chunk) {
        let p = partition_of(&word, reducers);
        *partitions[p].entry(word).or_default() += 1;
    }
    partitions
        .into_iter()
        .map(|p| shoal::put(p).expect("put partition"))
        .collect()
}

/// Merges one partition from every mapper.
#[shoal::remote]
fn reduce(parts: Vec<ObjectRef<Counts>>) -> Counts {
    let mut total = Counts::new();
    for part in parts {
        for (word, n) in part.get().expect("partition") {
            *total.entry(word).or_default() += n;
        }
    }
    total
}

/// A deterministic text with a skewed vocabulary, like natural language.
fn generated_text(bytes: usize) -> String {
    const VOCABULARY: &[&str] = &[
        "the", "of", "and", "to", "a", "in", "that", "it", "is", "was", "he", "for", "on", "with",
        "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word",
        "but", "what", "some", "shoal", "fish", "river", "stone", "cluster", "actor", "task",
        "object", "node", "head", "ocean", "wave",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut text = String::with_capacity(bytes + 16);
    while text.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Squaring a uniform index skews it toward the common words.
        let u = (state % 10_000) as f64 / 10_000.0;
        let index = ((u * u) * VOCABULARY.len() as f64) as usize;
        text.push_str(VOCABULARY[index.min(VOCABULARY.len() - 1)]);
        text.push(if state.is_multiple_of(17) { '\n' } else { ' ' });
    }
    text
}

/// Splits `text` into about `n` chunks at whitespace.
fn chunks(text: &str, n: usize) -> Vec<String> {
    let size = text.len().div_ceil(n.max(1));
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        while end < text.len() && !text.as_bytes()[end].is_ascii_whitespace() {
            end += 1;
        }
        out.push(text[start..end].to_string());
        start = end;
    }
    out
}

fn main() -> shoal::Result<()> {
    let _shoal = shoal::init(shoal::Config::from_env())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let option = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (mappers, reducers) = (option("--mappers", 16), option("--reducers", 4));
    let file = args.first().filter(|a| !a.starts_with("--"));
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Error::NotFound(format!("reading {path}: {e}")))?,
        None => generated_text(8 << 20),
    };
    println!(
        "counting words in {:.1} MB with {mappers} mappers and {reducers} reducers",
        text.len() as f64 / 1e6
    );

    let start = Instant::now();
    let mapped: Vec<ObjectRef<Vec<ObjectRef<Counts>>>> = chunks(&text, mappers)
        .into_iter()
        .map(|chunk| map_chunk::remote(chunk, reducers as u64))
        .collect();
    let partitions: Vec<Vec<ObjectRef<Counts>>> = shoal::get_all(&mapped)?;
    let reduced: Vec<ObjectRef<Counts>> = (0..reducers)
        .map(|r| reduce::remote(partitions.iter().map(|p| p[r].clone()).collect::<Vec<_>>()))
        .collect();
    let mut counts = Counts::new();
    for part in shoal::get_all(&reduced)? {
        counts.extend(part);
    }
    let took = start.elapsed();

    let mut sequential = Counts::new();
    for word in words(&text) {
        *sequential.entry(word).or_default() += 1;
    }
    assert_eq!(
        counts, sequential,
        "the distributed count must equal the sequential one"
    );

    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!("top words:");
    for (word, n) in top.iter().take(10) {
        println!("  {word:<10} {n}");
    }
    let total: u64 = counts.values().sum();
    println!(
        "{total} words, {} distinct, counted in {took:.2?}; matches the sequential count",
        counts.len()
    );
    Ok(())
}
