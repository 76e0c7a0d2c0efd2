//! SEC-2 for the worker service (the head's and nodes' are in the
//! integration tests, `roles.rs`): here, beside `Core`, because the
//! service is generic over the process type and `Core` is the real one.

use proptest::arbitrary::any;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use shoal_net::{Peer, Service};
use shoal_proto::{Role, ServiceErrorKind, WorkerRequest, WORKER_RPCS};

use crate::worker::service::WorkerService;

/// One request of every kind, sent as every role `WORKER_RPCS` does not
/// allow, is refused before anything runs.
#[tokio::test]
async fn every_request_is_refused_to_every_role_its_table_does_not_allow() {
    let service = WorkerService::<super::Core>::new(None);
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::HashSet::new();
    let mut refused = 0;
    for _ in 0..50_000 {
        if seen.len() == WORKER_RPCS.len() {
            break;
        }
        let request = any::<WorkerRequest>()
            .new_tree(&mut runner)
            .expect("a value")
            .current();
        let rpc = request.rpc();
        if !seen.insert(rpc.name) {
            continue;
        }
        for role in [Role::Node, Role::Driver, Role::Worker, Role::Client] {
            if rpc.allows(role) {
                continue;
            }
            let peer = Peer {
                role,
                remote: ([198, 18, 0, 1], 1).into(),
                connection_id: 1,
            };
            let answer = service.handle(&peer, request.clone()).await;
            assert!(
                matches!(&answer, Err(e) if e.kind == ServiceErrorKind::PermissionDenied),
                "{} as {role:?}: {answer:?}",
                rpc.name
            );
            refused += 1;
        }
    }
    assert_eq!(seen.len(), WORKER_RPCS.len(), "a request of every kind");
    let expected: usize = WORKER_RPCS.iter().map(|r| 4 - r.roles.len()).sum();
    assert_eq!(refused, expected);
}
