//! The head's store in a real `redis-server` (Debian's package; `.ci/run`
//! installs it): rows survive the head, and one head holds the lease at a
//! time.

use std::time::{Duration, Instant};

use shoal_head::redis::Redis;
use shoal_head::store::{Backend, Store, StoreError, Table, Write};
use shoal_integration_tests::redis::RedisServer;
use shoal_proto::ClusterId;

fn rows(snapshot: &shoal_head::store::Snapshot, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut rows = snapshot.get(&table).cloned().unwrap_or_default();
    rows.sort();
    rows
}

#[tokio::test]
async fn rows_written_by_one_head_are_loaded_by_the_next() {
    let server = RedisServer::start();
    let cluster = ClusterId::random();
    let ttl = Duration::from_millis(500);
    {
        let backend = Redis::new(&server.url(), cluster, ttl).expect("backend");
        let (store, snapshot) = Store::start(Box::new(backend), None).expect("start");
        assert!(rows(&snapshot, Table::Jobs).is_empty());
        store.enqueue(vec![Write::Put(Table::Jobs, b"a".to_vec(), b"1".to_vec())]);
        let last = store.enqueue(vec![
            Write::Put(Table::Kv, b"k".to_vec(), vec![0, 1, 2, 255]),
            Write::Delete(Table::Jobs, b"a".to_vec()),
            Write::Put(Table::Jobs, b"b".to_vec(), b"2".to_vec()),
        ]);
        store.durable(last).await.expect("durable");
    }
    // The first head's lease lapses (it stopped renewing); the next takes it.
    let backend = Redis::new(&server.url(), cluster, ttl).expect("backend");
    let (_store, snapshot) = Store::start(Box::new(backend), None).expect("start");
    assert_eq!(
        rows(&snapshot, Table::Jobs),
        vec![(b"b".to_vec(), b"2".to_vec())]
    );
    assert_eq!(
        rows(&snapshot, Table::Kv),
        vec![(b"k".to_vec(), vec![0, 1, 2, 255])]
    );
    // Another cluster's tables are its own.
    let other = Redis::new(&server.url(), ClusterId::random(), ttl).expect("backend");
    let (_other, snapshot) = Store::start(Box::new(other), None).expect("start");
    assert!(rows(&snapshot, Table::Jobs).is_empty());
}

#[test]
fn two_heads_never_hold_the_store_and_a_head_that_lost_it_cannot_write() {
    let server = RedisServer::start();
    let cluster = ClusterId::random();
    let ttl = Duration::from_millis(600);
    let mut first = Redis::new(&server.url(), cluster, ttl).expect("backend");
    first.load().expect("the first head takes the lease");
    first
        .commit(&[Write::Put(Table::Kv, b"k".to_vec(), b"1".to_vec())])
        .expect("the holder writes");
    // While the first renews, the second is refused (after waiting two
    // lease times for it to lapse).
    let renewing = std::thread::scope(|s| {
        let second = s.spawn(|| {
            let mut second = Redis::new(&server.url(), cluster, ttl).expect("backend");
            second.load().map(|_| ())
        });
        let start = Instant::now();
        while !second.is_finished() && start.elapsed() < Duration::from_secs(10) {
            first.keep().expect("the holder renews");
            std::thread::sleep(Duration::from_millis(100));
        }
        second.join().expect("thread")
    });
    assert!(
        matches!(renewing, Err(StoreError::Taken(_))),
        "{renewing:?}"
    );
    // The first stops renewing (paused, or cut off): its lease lapses, the
    // second takes over, and the first can neither write nor renew.
    let mut second = Redis::new(&server.url(), cluster, ttl).expect("backend");
    let loaded = second.load().expect("the second head takes over");
    assert_eq!(
        rows(&loaded, Table::Kv),
        vec![(b"k".to_vec(), b"1".to_vec())]
    );
    let late = first.commit(&[Write::Put(Table::Kv, b"k".to_vec(), b"stale".to_vec())]);
    assert!(matches!(late, Err(StoreError::Taken(_))), "{late:?}");
    assert!(matches!(first.keep(), Err(StoreError::Taken(_))));
    second
        .commit(&[Write::Put(Table::Kv, b"k".to_vec(), b"2".to_vec())])
        .expect("the new holder writes");
}
