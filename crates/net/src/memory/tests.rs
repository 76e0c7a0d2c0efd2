//! The in-process network: the handshake, losses drawn from the seed,
//! cuts and heals, and a server that stops.

use std::sync::atomic::AtomicU64;

use shoal_proto::{ClusterId, HandshakeRefusal, Role};

use super::*;
use crate::{JoinToken, RpcClient, RpcError, Transport};

const SERVER: &str = "198.18.0.1:7000";

/// Adds one to each number (taking `n` ms over it from 1000 up); counts
/// what it handled and the links that ended.
#[derive(Default)]
struct AddOne {
    handled: AtomicU64,
    disconnected: AtomicU64,
}

impl Service for AddOne {
    type Request = u64;
    type Reply = (u64, Role);

    async fn handle(&self, peer: &Peer, n: u64) -> Result<(u64, Role), ServiceError> {
        if n >= 1000 {
            tokio::time::sleep(Duration::from_millis(n)).await;
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok((n + 1, peer.role))
    }

    fn disconnected(&self, _peer: &Peer) {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
    }
}

fn limits() -> NetLimits {
    NetLimits {
        handshake_timeout: Duration::from_millis(100),
        ..NetLimits::default()
    }
}

struct World {
    net: MemoryNet,
    token: JoinToken,
    service: Arc<AddOne>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl World {
    async fn new(seed: u64) -> Self {
        let net = MemoryNet::new(seed);
        let token = JoinToken::generate(ClusterId::random()).expect("token");
        let service = Arc::new(AddOne::default());
        let shutdown = CancellationToken::new();
        let listener = net.listen(SERVER.parse().expect("addr")).expect("listen");
        let auth = Arc::new(ServerAuth::new(token.clone(), vec![Role::Driver]));
        let server = tokio::spawn(crate::rpc::serve(
            listener,
            Arc::clone(&service),
            auth,
            limits(),
            Arc::default(),
            shutdown.clone(),
        ));
        // The server registers when its task first runs.
        tokio::task::yield_now().await;
        Self {
            net,
            token,
            service,
            shutdown,
            server,
        }
    }

    fn transport(&self, host: &str, token: JoinToken, role: Role) -> Transport {
        let auth = ClientAuth { token, role };
        let host = host.parse().expect("ip");
        Transport::memory(self.net.clone(), host, "shoal-test", auth, limits())
    }

    async fn client(&self, host: &str) -> RpcClient<u64, (u64, Role)> {
        self.transport(host, self.token.clone(), Role::Driver)
            .connect(SERVER.parse().expect("addr"))
            .await
            .expect("connect")
    }
}

#[tokio::test]
async fn a_call_goes_through_the_handshake_to_the_service_and_back() {
    let world = World::new(1).await;
    let client = world.client("198.18.0.2").await;
    let reply = client
        .call(&41, Duration::from_secs(5))
        .await
        .expect("call");
    assert_eq!(reply, (42, Role::Driver), "the role the client proved");
    assert!(!client.is_same_host());
    assert_eq!(world.service.handled.load(Ordering::SeqCst), 1);

    // A wrong token, or a role the server does not take, is refused.
    let stranger = JoinToken::generate(world.token.cluster_id).expect("token");
    let refused = world
        .transport("198.18.0.3", stranger, Role::Driver)
        .connect::<u64, (u64, Role)>(SERVER.parse().expect("addr"))
        .await;
    assert!(
        matches!(
            refused,
            Err(ConnectError::Refused {
                refusal: HandshakeRefusal::BadToken,
                ..
            })
        ),
        "{refused:?}"
    );
    let refused = world
        .transport("198.18.0.3", world.token.clone(), Role::Node)
        .connect::<u64, (u64, Role)>(SERVER.parse().expect("addr"))
        .await;
    assert!(
        matches!(
            refused,
            Err(ConnectError::Refused {
                refusal: HandshakeRefusal::RoleNotAllowed(Role::Node),
                ..
            })
        ),
        "{refused:?}"
    );
    world.shutdown.cancel();
    world.server.await.expect("server");
}

/// What each of `calls` calls gets through a network losing about a
/// third of its messages: true for an answer.
async fn answered_under_loss(seed: u64, calls: u64) -> Vec<bool> {
    let world = World::new(seed).await;
    world.net.set_loss(300_000);
    let client = world.client("198.18.0.2").await;
    let mut out = Vec::new();
    for n in 0..calls {
        // Long enough that each exchange has drawn its fates before the
        // next begins, on a loaded machine too.
        match client.call(&n, Duration::from_millis(100)).await {
            Ok(reply) => {
                assert_eq!(reply.0, n + 1);
                out.push(true);
            }
            Err(RpcError::Timeout(_)) => out.push(false),
            Err(e) => panic!("a lost message is a timeout, not {e}"),
        }
    }
    world.shutdown.cancel();
    out
}

#[tokio::test]
async fn losses_are_drawn_from_the_seed_the_same_way_every_run() {
    let first = answered_under_loss(7, 24).await;
    let again = answered_under_loss(7, 24).await;
    assert_eq!(first, again, "the same seed loses the same messages");
    let lost = first.iter().filter(|ok| !**ok).count();
    // A call needs its request and its reply: about half are lost.
    assert!((4..=20).contains(&lost), "{lost} of 24 lost");
    assert_ne!(
        first,
        answered_under_loss(8, 24).await,
        "another seed, other losses"
    );
}

#[tokio::test]
async fn a_retried_control_request_gets_through_a_lossy_network() {
    let world = World::new(3).await;
    world.net.set_loss(300_000);
    let client = world.client("198.18.0.2").await;
    let mut answered = 0;
    for n in 0..20 {
        if client
            .call_idempotent(&n, Duration::from_millis(20))
            .await
            .is_ok()
        {
            answered += 1;
        }
    }
    // Four tries each: a call fails only when all four lose a message.
    assert!(answered >= 15, "{answered} of 20 answered");
    world.shutdown.cancel();
}

#[tokio::test]
async fn a_link_closed_or_dropped_by_its_client_is_reported_to_the_service_once() {
    let world = World::new(4).await;
    let closed = world.client("198.18.0.2").await;
    let dropped = world.client("198.18.0.3").await;
    let clone = dropped.clone();
    closed.close();
    closed.close();
    assert_eq!(world.service.disconnected.load(Ordering::SeqCst), 1);
    let after = closed.call(&1, Duration::from_secs(5)).await;
    assert!(matches!(after, Err(RpcError::Connection(_))), "{after:?}");
    drop(dropped);
    assert_eq!(
        world.service.disconnected.load(Ordering::SeqCst),
        1,
        "a clone is left"
    );
    drop(clone);
    assert_eq!(world.service.disconnected.load(Ordering::SeqCst), 2);
    world.shutdown.cancel();
}

#[tokio::test]
async fn a_cut_loses_everything_between_two_hosts_until_healed() {
    let world = World::new(5).await;
    let (near, far) = ("198.18.0.2", "198.18.0.3");
    let client = world.client(near).await;
    let other = world.client(far).await;
    world.net.cut(
        near.parse().expect("ip"),
        SERVER.parse::<SocketAddr>().expect("addr").ip(),
    );
    let cut = client.call(&1, Duration::from_millis(50)).await;
    assert!(matches!(cut, Err(RpcError::Timeout(_))), "{cut:?}");
    assert_eq!(
        other
            .call(&1, Duration::from_secs(5))
            .await
            .expect("other host")
            .0,
        2
    );
    let across = world
        .transport(near, world.token.clone(), Role::Driver)
        .connect::<u64, (u64, Role)>(SERVER.parse().expect("addr"))
        .await;
    assert!(
        matches!(across, Err(ConnectError::Timeout { .. })),
        "{across:?}"
    );
    world.net.heal(
        near.parse().expect("ip"),
        SERVER.parse::<SocketAddr>().expect("addr").ip(),
    );
    assert_eq!(
        client
            .call(&2, Duration::from_secs(5))
            .await
            .expect("healed")
            .0,
        3
    );
    world.shutdown.cancel();
}

#[tokio::test]
async fn a_stopped_server_resets_its_connections_and_its_address_is_free_again() {
    let world = World::new(9).await;
    let client = world.client("198.18.0.2").await;
    // A request in hand when the server stops: its handler ends with it.
    let slow = client
        .send(&60_000, Duration::from_secs(120))
        .await
        .expect("sent");
    world.shutdown.cancel();
    let reset = slow.reply().await;
    assert!(matches!(reset, Err(RpcError::Connection(_))), "{reset:?}");
    assert_eq!(world.service.handled.load(Ordering::SeqCst), 0);
    world.server.await.expect("server");
    assert!(client.close_reason().is_some());
    let after = client.call(&1, Duration::from_secs(5)).await;
    assert!(matches!(after, Err(RpcError::Connection(_))), "{after:?}");
    assert!(world.net.listen(SERVER.parse().expect("addr")).is_ok());
    let taken = world
        .net
        .listen("198.18.0.1:0".parse().expect("addr"))
        .expect("any port");
    assert_ne!(taken.local_addr().port(), 0);
}
