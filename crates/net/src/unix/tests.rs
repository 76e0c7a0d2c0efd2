use tokio::sync::oneshot;

use super::client::{client_handshake, Then};
use super::*;
use crate::error::ConnectError;
use crate::handshake::ClientAuth;
use crate::identity::ClusterIdentity;
use serde::de::DeserializeOwned;
use shoal_proto::{HandshakeRefusal, Hello, HelloReply, Role};

/// Reads one plain frame (length prefix and body), as in the handshake.
async fn read_plain<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
    limits: &CodecLimits,
) -> Result<T, ReadError> {
    let body = read_plain_body(io, limits).await?;
    codec::decode(&body, limits).map_err(ReadError::Decode)
}

struct Upper;

impl Service for Upper {
    type Request = String;
    type Reply = String;

    async fn handle(&self, _peer: &Peer, request: String) -> Result<String, ServiceError> {
        Ok(request.to_uppercase())
    }
}

const T: Duration = Duration::from_secs(5);

/// Echoes, and counts the peers it sees leave.
struct Counting(Arc<std::sync::atomic::AtomicU32>);

impl Service for Counting {
    type Request = String;
    type Reply = String;
    async fn handle(&self, _: &Peer, r: String) -> Result<String, ServiceError> {
        Ok(r)
    }
    fn disconnected(&self, _peer: &Peer) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

struct Server {
    /// The QUIC address the socket is named after (nothing listens on it).
    addr: SocketAddr,
    identity: ClusterIdentity,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A free loopback address (of a UDP socket just closed) to name a
/// listener after.
fn free_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

/// A same-host listener for a made-up loopback address.
fn start() -> Server {
    start_on(free_addr(), Upper)
}

/// `service` on a same-host listener named after `addr`, admitting
/// drivers.
fn start_on<S: Service>(addr: SocketAddr, service: S) -> Server {
    start_with(addr, service, NetLimits::default())
}

/// As [`start_on`], with `limits` (for the server and its clients).
fn start_with<S: Service>(addr: SocketAddr, service: S, limits: NetLimits) -> Server {
    let identity = ClusterIdentity::generate().expect("identity");
    let limits = NetLimits {
        same_host_sockets: true,
        ..limits
    };
    let listener = listen(addr, &limits).expect("listener");
    let stats = Arc::new(HandshakeStats::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_listener(
        listener,
        Arc::new(service),
        Arc::new(ServerAuth::new(
            identity.token().clone(),
            vec![Role::Driver],
        )),
        limits.clone(),
        stats.clone(),
        shutdown.clone(),
        TaskTracker::new(),
    ));
    Server {
        addr,
        identity,
        limits,
        stats,
        shutdown,
    }
}

impl Server {
    async fn connect(&self, role: Role) -> Result<Arc<Link>, ConnectError> {
        let auth = ClientAuth {
            token: self.identity.token().clone(),
            role,
        };
        connect(self.addr, &auth, &self.limits)
            .await
            .map(|(link, _)| link)
    }

    async fn raw(&self) -> UnixStream {
        UnixStream::connect(socket_name(self.addr))
            .await
            .expect("raw connect")
    }

    /// A raw stream past a genuine handshake, to send anything or nothing.
    async fn raw_authenticated(&self) -> UnixStream {
        let mut stream = self.raw().await;
        let auth = ClientAuth {
            token: self.identity.token().clone(),
            role: Role::Driver,
        };
        client_handshake(&mut stream, &socket_name(self.addr), &auth, self.addr)
            .await
            .expect("welcome");
        stream
    }
}

/// Reads `stream` until the server closes it (within `T`); what it sent.
async fn closed_by_server(stream: &mut UnixStream) -> Vec<u8> {
    let mut sent = Vec::new();
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut sent))
        .await
        .expect("closed by the server in time");
    sent
}

async fn call(link: &Arc<Link>, id: u64, text: &str) -> ReplyEnvelope<String> {
    let envelope = RequestEnvelope {
        id,
        timeout_ms: 5_000,
        body: text.to_string(),
    };
    let frame = encode_message(id, &envelope, &CodecLimits::CONTROL).expect("encode");
    reply_to(link, id, frame).await
}

async fn reply_to(link: &Arc<Link>, id: u64, frame: Vec<u8>) -> ReplyEnvelope<String> {
    let mut awaiting = link.send(id, frame).expect("send");
    let body = tokio::time::timeout(T, awaiting.body())
        .await
        .expect("a reply in time")
        .expect("connection alive");
    codec::decode(&body, &CodecLimits::CONTROL).expect("a reply envelope")
}

fn frame_of(id: u64, text: &str) -> Vec<u8> {
    let envelope = RequestEnvelope {
        id,
        timeout_ms: 5_000,
        body: text.to_string(),
    };
    encode_message(id, &envelope, &CodecLimits::CONTROL).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_queued_requests_interleave_without_mixing_frames() {
    let server = start();
    let link = server.connect(Role::Driver).await.expect("connect");
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Plain threads write directly (a large body now and then, which the
    // socket may take in part) while tasks queue theirs.
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (link, tx) = (link.clone(), tx.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..500u64 {
                let id = (t << 32) | i;
                let text = if i % 50 == 0 {
                    "z".repeat(300_000)
                } else {
                    format!("d{id}")
                };
                let tx = tx.clone();
                let expected = text.to_uppercase();
                let then: Then = Box::new(move |body| {
                    let reply: ReplyEnvelope<String> =
                        codec::decode(&body.expect("alive"), &CodecLimits::CONTROL)
                            .expect("envelope");
                    let _ = tx.send((id, reply.id, reply.result == Ok(expected)));
                });
                link.send_then(id, frame_of(id, &text), then).expect("sent");
            }
        }));
    }
    let queued: Vec<_> = (0..4u64)
        .map(|t| {
            let link = link.clone();
            tokio::spawn(async move {
                for i in 0..500u64 {
                    let id = ((t + 4) << 32) | i;
                    let reply = reply_to(&link, id, frame_of(id, &format!("q{id}"))).await;
                    assert_eq!((reply.id, reply.result), (id, Ok(format!("Q{id}"))));
                }
            })
        })
        .collect();
    for task in queued {
        task.await.expect("queued requests answered");
    }
    for thread in threads {
        thread.join().expect("direct requests sent");
    }
    drop(tx);
    let mut answered = 0;
    while let Some((id, reply_id, right)) = tokio::time::timeout(T, rx.recv())
        .await
        .expect("replies in time")
    {
        assert_eq!(id, reply_id);
        assert!(right, "reply {id} is its request's");
        answered += 1;
    }
    assert_eq!(answered, 2000);
}

#[tokio::test]
async fn a_callback_learns_of_the_connection_ending() {
    struct Never;
    impl Service for Never {
        type Request = String;
        type Reply = String;
        async fn handle(&self, _: &Peer, _: String) -> Result<String, ServiceError> {
            std::future::pending().await
        }
    }
    let server = start_on(free_addr(), Never);
    let link = server.connect(Role::Driver).await.expect("connect");
    let (tx, rx) = oneshot::channel();
    let then: Then = Box::new(move |body| {
        let _ = tx.send(body.is_err());
    });
    link.send_then(1, frame_of(1, "x"), then).expect("sent");
    drop(server);
    let failed = tokio::time::timeout(T, rx).await.expect("called in time");
    assert_eq!(failed, Ok(true), "called with the connection's end");
    // Once the connection is gone nothing is sent, and the callback is
    // given back unused rather than called.
    let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = called.clone();
    let then: Then = Box::new(move |_| flag.store(true, Ordering::SeqCst));
    assert!(link.send_then(2, frame_of(2, "y"), then).is_err());
    assert!(!called.load(Ordering::SeqCst));
}

#[tokio::test]
async fn the_token_proof_is_checked_both_ways() {
    let server = start();
    let link = server.connect(Role::Driver).await.expect("welcome");
    assert_eq!(call(&link, 1, "hi").await.result, Ok("HI".to_string()));

    let impostor = ClientAuth {
        token: crate::JoinToken::from_parts(server.identity.cluster_id(), [9; 32]),
        role: Role::Driver,
    };
    match connect(server.addr, &impostor, &server.limits).await {
        Err(ConnectError::Refused {
            refusal: HandshakeRefusal::BadToken,
            ..
        }) => {}
        other => panic!("expected BadToken, got {:?}", other.map(|_| ())),
    }
    match server.connect(Role::Client).await {
        Err(ConnectError::Refused {
            refusal: HandshakeRefusal::RoleNotAllowed(Role::Client),
            ..
        }) => {}
        other => panic!("expected RoleNotAllowed, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.stats.refused.load(Ordering::Relaxed), 2);
    // The first connection is untouched.
    assert_eq!(
        call(&link, 2, "still").await.result,
        Ok("STILL".to_string())
    );
}

/// A process that takes the name a client tries first and relays the
/// bytes to the real server (bound under another name) gets nowhere:
/// the proofs are bound to the name each side used.
#[tokio::test]
async fn a_relay_under_another_name_is_refused() {
    // The real server is bound to the unspecified address of a port.
    let held = std::net::UdpSocket::bind("0.0.0.0:0").expect("a free port");
    let port = held.local_addr().expect("addr").port();
    let real = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
    let server = start_on(real, Upper);
    let (limits, stats) = (&server.limits, &server.stats);
    let asked = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let auth = ClientAuth {
        token: server.identity.token().clone(),
        role: Role::Driver,
    };
    // Without the relay the client finds the real server by the
    // unspecified address's name.
    let (link, _) = connect(asked, &auth, limits).await.expect("direct");
    assert_eq!(
        call(&link, 1, "direct").await.result,
        Ok("DIRECT".to_string())
    );
    // The relay takes the name tried first.
    let relay = UnixListener::bind(socket_name(asked)).expect("relay bind");
    let relaying = tokio::spawn(async move {
        let (mut client, _) = relay.accept().await.expect("accept");
        let mut server = UnixStream::connect(socket_name(real))
            .await
            .expect("connect");
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    let result = connect(asked, &auth, limits).await;
    assert!(
        matches!(
            result,
            Err(ConnectError::Refused {
                refusal: HandshakeRefusal::BadToken,
                ..
            })
        ),
        "{:?}",
        result.map(|_| ())
    );
    assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
    relaying.abort();
    drop(server);
}

/// A listener that does not hold the token cannot fake its proof.
#[tokio::test]
async fn a_socket_without_the_token_is_not_trusted() {
    let identity = ClusterIdentity::generate().expect("identity");
    let addr = free_addr();
    let listener = UnixListener::bind(socket_name(addr)).expect("bind");
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.write_all(&[7; NONCE_LEN]).await.expect("nonce");
        let mut nonce = [0u8; NONCE_LEN];
        stream.read_exact(&mut nonce).await.expect("client nonce");
        let _hello: Hello = read_plain(&mut stream, &CodecLimits::HANDSHAKE)
            .await
            .expect("hello");
        let welcome = HelloReply::Welcome {
            server_proof: vec![0; 32],
            node_id: None,
        };
        write_plain(&mut stream, &welcome, &CodecLimits::HANDSHAKE)
            .await
            .expect("reply");
    });
    let auth = ClientAuth {
        token: identity.token().clone(),
        role: Role::Driver,
    };
    let result = connect(addr, &auth, &NetLimits::default()).await;
    assert!(
        matches!(result, Err(ConnectError::ServerNotAuthenticated { .. })),
        "{:?}",
        result.map(|_| ())
    );
    fake.await.expect("fake server");
}

/// Garbage before the handshake, an undecodable request and an oversized
/// frame: each gets a typed answer or a closed connection, and the server
/// goes on serving everyone else.
#[tokio::test]
async fn bad_bytes_never_stop_the_server() {
    let server = start();
    // Garbage instead of a handshake, then gone.
    let mut raw = server.raw().await;
    let mut nonce = [0u8; NONCE_LEN];
    raw.read_exact(&mut nonce).await.expect("server nonce");
    raw.write_all(&[0xff; 300]).await.expect("garbage");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, raw.read_to_end(&mut rest)).await;
    drop(raw);
    // A peer that connects and says nothing.
    let _silent = server.raw().await;

    let link = server.connect(Role::Driver).await.expect("welcome");
    // A well-framed request whose body is not a request: BadRequest,
    // with the request's id, on a connection that stays up.
    let mut frame = 41u64.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 0, 0, 2, 0xc1, 0xc1]);
    let reply = reply_to(&link, 41, frame).await;
    assert!(
        matches!(
            &reply.result,
            Err(ServiceError {
                kind: ServiceErrorKind::BadRequest,
                ..
            })
        ),
        "{reply:?}"
    );
    assert_eq!(call(&link, 42, "ok").await.result, Ok("OK".to_string()));

    // A frame longer than the limit: the framing cannot be trusted after
    // it, so that connection is closed; the waiting request is told.
    let mut frame = 43u64.to_be_bytes().to_vec();
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut awaiting = link.send(43, frame).expect("send");
    let lost = tokio::time::timeout(T, awaiting.body())
        .await
        .expect("ended in time")
        .expect_err("connection closed");
    assert!(matches!(lost, quinn::ConnectionError::Reset), "{lost:?}");

    let fresh = server.connect(Role::Driver).await.expect("welcome again");
    assert_eq!(call(&fresh, 1, "fine").await.result, Ok("FINE".to_string()));
}

/// Dropping every handle of a client's connection closes it: the
/// server sees the peer leave.
#[tokio::test]
async fn dropping_the_link_closes_the_connection() {
    let gone = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let server = start_on(free_addr(), Counting(gone.clone()));
    let link = server.connect(Role::Driver).await.expect("connect");
    assert_eq!(call(&link, 1, "x").await.result, Ok("x".to_string()));
    drop(link);
    let deadline = std::time::Instant::now() + T;
    while gone.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "server never saw the peer go"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(server);
}

/// A reader that hands out `data` `step` bytes at a time, then has nothing
/// more (and is never woken: polled once, by `poll_once`). It records the
/// largest buffer a read offered it, the memory its caller committed.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
    largest: usize,
}

impl Trickle {
    fn new(data: Vec<u8>, step: usize) -> Self {
        Self {
            data,
            at: 0,
            step,
            largest: 0,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.largest = this.largest.max(buf.remaining());
        let n = (this.data.len() - this.at)
            .min(this.step)
            .min(buf.remaining());
        if n == 0 {
            return std::task::Poll::Pending;
        }
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Polls `read` once; `None` if it is not done.
fn poll_once<F: std::future::Future>(read: F) -> Option<F::Output> {
    let mut read = std::pin::pin!(read);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match read.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// A frame's claimed length is checked but not trusted: the buffer grows
/// with the bytes that arrive, for messages and for plain frames alike.
/// A frame that does arrive, in pieces and past the first MiB, is read
/// whole and not a byte further.
#[test]
fn a_claimed_length_is_not_allocated_before_its_bytes_arrive() {
    let claim = CodecLimits::CONTROL.frame_bytes_max;
    let mut message = 7u64.to_be_bytes().to_vec();
    message.extend_from_slice(&claim.to_be_bytes());
    message.extend_from_slice(&[1; 10]);
    let mut peer = Trickle::new(message, usize::MAX);
    assert!(poll_once(read_message(&mut peer, &CodecLimits::CONTROL, None)).is_none());
    assert_eq!(peer.at, peer.data.len(), "what came was read");
    assert!(
        peer.largest <= BODY_FIRST_BYTES,
        "{} bytes committed for a frame claiming {claim} of which 10 came",
        peer.largest
    );

    let mut plain = claim.to_be_bytes().to_vec();
    plain.extend_from_slice(&[1; 10]);
    let mut peer = Trickle::new(plain, usize::MAX);
    let read = read_plain::<String>(&mut peer, &CodecLimits::CONTROL);
    assert!(poll_once(read).is_none());
    assert!(peer.largest <= BODY_FIRST_BYTES, "{}", peer.largest);

    // Too long for the limits: refused before any of the body is read.
    let mut over = 1u64.to_be_bytes().to_vec();
    over.extend_from_slice(&(claim + 1).to_be_bytes());
    over.extend_from_slice(&[1; 10]);
    let mut peer = Trickle::new(over, usize::MAX);
    let read = poll_once(read_message(&mut peer, &CodecLimits::CONTROL, None));
    assert!(matches!(read, Some(Err(ReadError::Decode(_)))), "{read:?}");
    assert_eq!(peer.largest, HEADER_LEN);

    // Two whole frames, 100 kB a read: the first is 3 MiB and a bit.
    let big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 251) as u8).collect();
    let mut stream = encode_message(1, &big, &CodecLimits::CONTROL).expect("encode");
    stream.extend_from_slice(&encode_message(2, &"next", &CodecLimits::CONTROL).expect("encode"));
    let mut peer = Trickle::new(stream, 100_000);
    let (id, body) = poll_once(read_message(&mut peer, &CodecLimits::CONTROL, None))
        .expect("all there")
        .expect("a frame");
    assert_eq!(id, 1);
    let back: Vec<u8> = codec::decode(&body, &CodecLimits::CONTROL).expect("decodes");
    assert!(back == big, "the body is the one sent");
    let (id, body) = poll_once(read_message(&mut peer, &CodecLimits::CONTROL, None))
        .expect("all there")
        .expect("a frame");
    let next: String = codec::decode(&body, &CodecLimits::CONTROL).expect("decodes");
    assert_eq!((id, next.as_str()), (2, "next"));
}

/// An authenticated peer that claims a frame of the largest size, sends a
/// little of it and stalls holds nothing for long: the server goes on
/// serving others and closes it once nothing came for `idle_timeout`.
#[tokio::test]
async fn a_peer_stalled_inside_a_large_frame_is_closed_when_idle() {
    let idle = Duration::from_millis(300);
    let limits = NetLimits {
        idle_timeout: idle,
        keep_alive_interval: Duration::from_millis(50),
        ..NetLimits::default()
    };
    let server = start_with(free_addr(), Upper, limits);
    let mut stalled = server.raw_authenticated().await;
    let mut header = 1u64.to_be_bytes().to_vec();
    header.extend_from_slice(&server.limits.frame_bytes_max.to_be_bytes());
    header.extend_from_slice(&[0; 10]);
    stalled.write_all(&header).await.expect("header");
    let since = std::time::Instant::now();

    let link = server.connect(Role::Driver).await.expect("connect");
    assert_eq!(call(&link, 1, "on").await.result, Ok("ON".to_string()));

    assert!(closed_by_server(&mut stalled).await.is_empty());
    assert!(
        since.elapsed() >= idle,
        "closed after {:?}",
        since.elapsed()
    );
    assert_eq!(
        call(&link, 2, "still").await.result,
        Ok("STILL".to_string())
    );
}

/// A peer that connects and never finishes its `Hello` (nothing at all, or
/// part of one) is cut off at `handshake_timeout`.
#[tokio::test]
async fn a_peer_that_never_finishes_the_handshake_is_disconnected_in_time() {
    let timeout = Duration::from_millis(300);
    let limits = NetLimits {
        handshake_timeout: timeout,
        ..NetLimits::default()
    };
    let server = start_with(free_addr(), Upper, limits);
    let mut silent = server.raw().await;
    let mut partial = server.raw().await;
    let since = std::time::Instant::now();
    let mut nonce = [0u8; NONCE_LEN];
    partial.read_exact(&mut nonce).await.expect("server nonce");
    // Its nonce and a `Hello` claiming 4 KiB, of which one byte.
    partial.write_all(&[3; NONCE_LEN]).await.expect("nonce");
    let claim = CodecLimits::HANDSHAKE.frame_bytes_max.to_be_bytes();
    partial.write_all(&claim).await.expect("prefix");
    partial.write_all(&[0x80]).await.expect("a byte");

    assert_eq!(closed_by_server(&mut silent).await.len(), NONCE_LEN);
    assert!(closed_by_server(&mut partial).await.is_empty());
    assert!(
        since.elapsed() >= timeout,
        "closed after {:?}",
        since.elapsed()
    );
    assert_eq!(server.stats.refused.load(Ordering::Relaxed), 2);
    // The server is still serving.
    let link = server.connect(Role::Driver).await.expect("connect");
    assert_eq!(call(&link, 1, "up").await.result, Ok("UP".to_string()));
}

/// Connects a genuine client, retrying until the server has room (within
/// `T`).
async fn connect_once_there_is_room(server: &Server) -> Arc<Link> {
    let deadline = std::time::Instant::now() + T;
    loop {
        match server.connect(Role::Driver).await {
            Ok(link) => return link,
            Err(e) => assert!(std::time::Instant::now() < deadline, "no room in time: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Past `handshakes_max` peers in their handshake, a new connection is
/// closed at once (without a nonce); once the stuck peers time out a
/// genuine client gets in.
#[tokio::test]
async fn handshake_slots_are_bounded_and_free_again_when_stuck_peers_time_out() {
    let limits = NetLimits {
        handshakes_max: 2,
        handshake_timeout: Duration::from_secs(2),
        ..NetLimits::default()
    };
    let server = start_with(free_addr(), Upper, limits);
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let mut raw = server.raw().await;
        // The nonce comes from the connection's task: it holds a slot.
        let mut nonce = [0u8; NONCE_LEN];
        raw.read_exact(&mut nonce).await.expect("server nonce");
        stuck.push(raw);
    }
    let mut extra = server.raw().await;
    assert!(
        closed_by_server(&mut extra).await.is_empty(),
        "no slot, no nonce"
    );
    let refused = server.connect(Role::Driver).await;
    assert!(
        matches!(refused, Err(ConnectError::Handshake { .. })),
        "{:?}",
        refused.map(|_| ())
    );
    for raw in &mut stuck {
        assert!(closed_by_server(raw).await.is_empty());
    }
    let link = connect_once_there_is_room(&server).await;
    assert_eq!(call(&link, 1, "in").await.result, Ok("IN".to_string()));
}

/// Past `same_host_connections_max` open connections a new one is closed
/// at once; when one ends its place is taken again, and the others are
/// untouched.
#[tokio::test]
async fn open_connections_are_capped_and_a_place_frees_when_one_ends() {
    let limits = NetLimits {
        same_host_connections_max: 2,
        ..NetLimits::default()
    };
    let server = start_with(free_addr(), Upper, limits);
    let first = server.connect(Role::Driver).await.expect("first");
    let second = server.connect(Role::Driver).await.expect("second");
    assert_eq!(call(&first, 1, "a").await.result, Ok("A".to_string()));
    assert_eq!(call(&second, 1, "b").await.result, Ok("B".to_string()));

    let mut extra = server.raw().await;
    assert!(
        closed_by_server(&mut extra).await.is_empty(),
        "refused at once"
    );
    let refused = server.connect(Role::Driver).await;
    assert!(
        matches!(refused, Err(ConnectError::Handshake { .. })),
        "{:?}",
        refused.map(|_| ())
    );
    assert_eq!(server.stats.refused.load(Ordering::Relaxed), 2);

    drop(first);
    let third = connect_once_there_is_room(&server).await;
    assert_eq!(call(&third, 1, "c").await.result, Ok("C".to_string()));
    assert_eq!(call(&second, 2, "b").await.result, Ok("B".to_string()));
}

/// A client with nothing to ask for longer than `idle_timeout` keeps its
/// connection (its keep-alives are traffic); a peer past the handshake
/// that sends nothing is closed, and only it is seen to leave.
#[tokio::test]
async fn an_idle_client_keeps_its_connection_and_a_silent_peer_loses_it() {
    let idle = Duration::from_millis(400);
    let limits = NetLimits {
        idle_timeout: idle,
        keep_alive_interval: Duration::from_millis(50),
        ..NetLimits::default()
    };
    let gone = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let server = start_with(free_addr(), Counting(gone.clone()), limits);
    let link = server.connect(Role::Driver).await.expect("connect");
    let quiet_since = std::time::Instant::now();
    let mut silent = server.raw_authenticated().await;

    assert!(closed_by_server(&mut silent).await.is_empty());
    let deadline = std::time::Instant::now() + T;
    while gone.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "never seen to leave");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Quiet for two idle timeouts at least (not waiting for a state: for
    // one that must not come).
    tokio::time::sleep((2 * idle).saturating_sub(quiet_since.elapsed())).await;
    assert!(link.close_reason().is_none(), "{:?}", link.close_reason());
    assert_eq!(call(&link, 1, "here").await.result, Ok("here".to_string()));
    assert_eq!(gone.load(Ordering::Relaxed), 1, "only the silent peer left");
}
