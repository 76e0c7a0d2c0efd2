//! The SDK in local mode with thread workers, inside this test process
//! (thread workers need no re-executed binary, so the test harness can be the
//! driver). One Shoal per process: every test shares it.

use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal::prelude::*;

fn shoal() {
    static GUARD: OnceLock<shoal::Shoal> = OnceLock::new();
    GUARD.get_or_init(|| {
        shoal::init(shoal::Config::local().num_cpus(2.0)).expect("local mode starts")
    });
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Point {
    x: f64,
    label: String,
    tags: Vec<u16>,
}

#[shoal::remote]
fn shift(p: Point, by: f64) -> Point {
    Point { x: p.x + by, ..p }
}

#[shoal::remote]
async fn twice_later(x: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(1)).await;
    x * 2
}

#[shoal::remote]
fn length_of_parts(parts: Vec<ObjectRef<String>>) -> usize {
    parts.iter().map(|p| p.get().expect("part").len()).sum()
}

#[shoal::remote]
fn slow() -> u8 {
    std::thread::sleep(Duration::from_secs(3));
    1
}

#[shoal::remote]
fn after(ms: u64, v: u32) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    v
}

#[shoal::remote]
fn where_() -> (String, Option<String>) {
    let c = shoal::context().expect("context");
    (c.node_id.to_string(), c.task_id.map(|t| t.to_string()))
}

/// An actor that measures what it is given.
#[shoal::actor]
#[derive(Default)]
pub struct Measurer {
    calls: u32,
}

#[shoal::actor]
impl Measurer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn length(&mut self, data: shoal::Bytes) -> usize {
        self.calls += 1;
        data.len()
    }

    pub fn total(&mut self, values: Vec<f32>) -> f64 {
        self.calls += 1;
        values.iter().map(|v| f64::from(*v)).sum()
    }
}

/// A value as users write them: a struct holding plain numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Frame {
    id: u64,
    samples: Vec<f32>,
    raw: Vec<u8>,
}

#[shoal::remote]
fn scaled(frame: Frame, by: f32) -> Frame {
    Frame {
        samples: frame.samples.iter().map(|s| s * by).collect(),
        ..frame
    }
}

#[shoal::remote]
fn numbers(n: u64) -> Vec<u64> {
    (0..n).collect()
}

#[test]
fn plain_vecs_larger_than_a_message_travel_as_arguments_and_returns() {
    shoal();
    // 24 MB and 20 MB: over the 16 MiB a message may carry (these failed
    // as "the worker died: encoded message of ... bytes exceeds the limit").
    let frame = Frame {
        id: 7,
        samples: (0..6_000_000).map(|i| (i % 1000) as f32).collect(),
        raw: vec![5u8; 20 << 20],
    };
    let got = scaled::remote(frame.clone(), 2.0).get().expect("task");
    assert_eq!(got.id, 7);
    assert_eq!(got.raw, frame.raw);
    assert!(got
        .samples
        .iter()
        .zip(&frame.samples)
        .all(|(g, s)| *g == s * 2.0));
    let measurer = Measurer::remote().expect("actor");
    let sum: f64 = frame.samples.iter().map(|v| f64::from(*v)).sum();
    assert_eq!(measurer.total(frame.samples).get().expect("call"), sum);
    let n = 3_000_000u64;
    let back = numbers::remote(n).get().expect("a 24 MB return");
    assert_eq!(back.len() as u64, n);
    assert!(back.iter().enumerate().all(|(i, v)| *v == i as u64));
}

#[test]
fn a_large_argument_outlives_the_callers_reference_until_the_actor_has_it() {
    shoal();
    let measurer = Measurer::remote().expect("actor");
    for _ in 0..5 {
        let big = shoal::put(shoal::Bytes(vec![3u8; 2 << 20])).expect("put");
        let length = measurer.length(&big);
        // The caller lets go at once; the call still holds the object.
        drop(big);
        assert_eq!(length.get().expect("the actor read its argument"), 2 << 20);
    }
}

#[test]
fn structs_round_trip_through_tasks_and_put() {
    shoal();
    let p = Point {
        x: 1.5,
        label: "here".into(),
        tags: vec![1, 2, 3],
    };
    let moved = shift::remote(p.clone(), 2.0).get().expect("task");
    assert_eq!(
        moved,
        Point {
            x: 3.5,
            ..p.clone()
        }
    );
    let stored = shoal::put(p.clone()).expect("put");
    assert_eq!(shift::remote(&stored, 0.0).get().expect("task"), p);
    assert_eq!(stored.get().expect("get"), p);
}

#[test]
fn references_inside_values_can_be_read_by_the_receiver() {
    shoal();
    let parts: Vec<ObjectRef<String>> = ["ab", "cde", ""]
        .iter()
        .map(|s| shoal::put(s.to_string()).expect("put"))
        .collect();
    assert_eq!(length_of_parts::remote(parts).get().expect("task"), 5);
}

#[test]
fn get_works_from_threads_and_multi_threaded_runtimes_and_await_works_everywhere() {
    shoal();
    let r = twice_later::remote(21);
    let from_thread = std::thread::spawn({
        let r = r.clone();
        move || r.get()
    });
    assert_eq!(from_thread.join().expect("thread").expect("get"), 42);
    let multi = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert_eq!(
        multi
            .block_on(async { r.get() })
            .expect("blocking get in a multi-threaded runtime"),
        42
    );
    assert_eq!(multi.block_on(async { (&r).await }).expect("await"), 42);
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert!(matches!(
        single.block_on(async { r.get() }),
        Err(Error::BlockingGetInAsync)
    ));
    assert_eq!(
        single
            .block_on(async { r.await })
            .expect("await on one thread"),
        42
    );
}

#[test]
fn get_with_a_deadline_times_out_with_a_typed_error() {
    shoal();
    let r = slow::remote();
    assert!(matches!(
        r.get_timeout(Duration::from_millis(50)),
        Err(Error::Timeout(_))
    ));
    assert_eq!(r.get().expect("eventually"), 1);
}

#[test]
fn an_unknown_function_is_function_not_found() {
    shoal();
    fn never_called(_: shoal::__private::Args) -> shoal::registry::Invocation {
        unreachable!("an unregistered function is never invoked")
    }
    // Not submitted to the registry: the worker must refuse it, not guess.
    static UNREGISTERED: shoal::registry::RemoteFunction = shoal::registry::RemoteFunction {
        name: "nowhere::missing",
        signature: 7,
        invoke: shoal::registry::Invoker::Sync(never_called),
        returns: 1,
        streaming: false,
    };
    let r: ObjectRef<u8> =
        shoal::__private::submit(&UNREGISTERED, shoal::TaskOptions::new(), vec![]);
    match r.get() {
        Err(Error::FunctionNotFound { function, .. }) => assert_eq!(function, "nowhere::missing"),
        other => panic!("expected FunctionNotFound, got {other:?}"),
    }
}

#[test]
fn a_value_that_does_not_decode_is_a_typed_error() {
    shoal();
    let r = shoal::put("not a number".to_string()).expect("put");
    // Reinterpret the reference's type through serialization, as a buggy
    // program could: the mismatch is reported, not a panic.
    let bytes = rmp_serde::to_vec(&r).expect("encode ref");
    let wrong: ObjectRef<u64> = rmp_serde::from_slice(&bytes).expect("decode ref");
    assert!(
        matches!(wrong.get(), Err(Error::Decode { .. })),
        "{:?}",
        wrong.get()
    );
}

#[test]
fn wait_preserves_input_order_and_honours_num_returns() {
    shoal();
    // No CPUs asked: all four run at once, whatever else this process runs.
    let run = |ms, v| after::options().num_cpus(0.0).remote(ms, v);
    let refs = vec![run(2000, 0), run(0, 1), run(0, 2), run(2000, 3)];
    let (ready, pending) = shoal::wait(&refs, 2, Some(Duration::from_secs(1))).expect("wait");
    assert_eq!(ready, vec![refs[1].clone(), refs[2].clone()]);
    assert_eq!(pending, vec![refs[0].clone(), refs[3].clone()]);
    let (ready, pending) = shoal::wait(&refs, 4, None).expect("wait all");
    assert_eq!((ready.len(), pending.len()), (4, 0));
    assert_eq!(shoal::get_all(&ready).expect("values"), vec![0, 1, 2, 3]);
}

#[test]
fn context_says_where_code_runs() {
    shoal();
    let driver = shoal::context().expect("context");
    assert!(driver.task_id.is_none());
    let (node, task) = where_::remote().get().expect("task");
    assert_eq!(node, driver.node_id.to_string(), "one node in local mode");
    assert!(task.is_some());
}
