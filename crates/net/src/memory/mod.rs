//! An in-process network behind the transport seam: servers listen on
//! addresses of made-up hosts, and clients on other made-up hosts reach
//! them with no socket. What it carries goes through the same envelopes,
//! codec bounds, handshake checks and deadlines as QUIC, and it loses,
//! delays and cuts messages as it is told, drawing every choice from one
//! seed (for tests of how a service and its callers behave under faults).
//!
//! - A lost request is never handled; a lost reply is handled and then
//!   discarded. Either way the caller hears nothing until its deadline, as
//!   with a packet loss QUIC gave up on.
//! - A cut between two hosts loses everything between them, both ways,
//!   until it is healed; a connection attempt across it times out (losses
//!   alone only delay one, as QUIC sends its handshake again).
//! - A server that stops resets its connections and ends the handlers in
//!   hand, as QUIC's close does; a link closed by its client, or whose last
//!   client is dropped, is reported to the service (`disconnected`).
//! - Every chance is drawn when a request is sent, so one caller's calls,
//!   made one at a time, meet the same fates on every run; with delays,
//!   timers run on the runtime's clock (paused time makes them repeat).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::codec::{self, CodecLimits};
use shoal_proto::{Hello, NodeId, ReplyEnvelope, RequestEnvelope, ServiceError, ServiceErrorKind};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ConnectError;
use crate::handshake::{self, ClientAuth, HandshakeStats, ServerAuth};
use crate::limits::NetLimits;
use crate::rpc::{Peer, Service, NEXT_CONNECTION_ID};
use crate::sync::MutexExt;

/// A reply's bytes, or why none will come.
pub(crate) type Answer = Result<Vec<u8>, quinn::ConnectionError>;

type Handling = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// A served service, as the network reaches it.
trait Serving: Send + Sync {
    /// Checks a client's `Hello` over `binding`: the role it proved.
    fn admit(&self, hello: &Hello, binding: [u8; 32]) -> Result<(), shoal_proto::HandshakeRefusal>;
    /// The node id the server announces.
    fn node_id(&self) -> Option<NodeId>;
    /// Answers one encoded request envelope with an encoded reply envelope.
    fn handle(&self, peer: Peer, request: Vec<u8>) -> Handling;
    /// Runs `work` among the server's tasks (waited for when it stops).
    fn spawn(&self, work: Pin<Box<dyn Future<Output = ()> + Send>>);
    /// Cancelled when the server stops.
    fn stopped(&self) -> &CancellationToken;
    /// A link to the server ended (closed, or its last client dropped).
    fn disconnected(&self, peer: &Peer);
}

struct Server<S: Service> {
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl<S: Service> Serving for Server<S> {
    fn admit(&self, hello: &Hello, binding: [u8; 32]) -> Result<(), shoal_proto::HandshakeRefusal> {
        let verdict = handshake::check_hello(&self.auth, hello, false, Some(binding));
        let counter = match verdict {
            Ok(()) => &self.stats.accepted,
            Err(_) => &self.stats.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        verdict
    }

    fn node_id(&self) -> Option<NodeId> {
        self.auth.node_id()
    }

    fn handle(&self, peer: Peer, request: Vec<u8>) -> Handling {
        let (service, limits) = (Arc::clone(&self.service), self.limits.clone());
        Box::pin(async move {
            let codec = limits.codec();
            let decoded = codec::decode::<RequestEnvelope<S::Request>>(&request, &codec);
            let (id, result) = match decoded {
                Err(e) => (0, Err(crate::rpc::undecodable(e))),
                Ok(request) => (
                    request.id,
                    crate::rpc::answer(&*service, &peer, request, &limits).await,
                ),
            };
            encode_reply::<S>(id, result, &codec)
        })
    }

    fn spawn(&self, work: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.tasks.spawn(work);
    }

    fn stopped(&self) -> &CancellationToken {
        &self.stop
    }

    fn disconnected(&self, peer: &Peer) {
        self.service.disconnected(peer);
    }
}

/// A reply envelope's bytes; an error reply if the reply cannot be encoded
/// (and nothing, for the caller to time out on, if even that fails).
fn encode_reply<S: Service>(
    id: u64,
    result: Result<S::Reply, ServiceError>,
    codec: &CodecLimits,
) -> Vec<u8> {
    match encode_body(&ReplyEnvelope { id, result }, codec) {
        Ok(bytes) => bytes,
        Err(e) => {
            let fallback: ReplyEnvelope<S::Reply> = ReplyEnvelope {
                id,
                result: Err(ServiceError::new(ServiceErrorKind::Internal, e.to_string())),
            };
            encode_body(&fallback, codec).unwrap_or_default()
        }
    }
}

/// A message's body, within the frame bound as on every other link.
pub(crate) fn encode_body<T: serde::Serialize>(
    msg: &T,
    limits: &CodecLimits,
) -> Result<Vec<u8>, shoal_proto::EncodeError> {
    let body = codec::encode(msg)?;
    if body.len() > limits.frame_bytes_max as usize {
        return Err(shoal_proto::EncodeError::TooLarge {
            len: body.len(),
            max: limits.frame_bytes_max,
        });
    }
    Ok(body)
}

/// Waits out a message's delay (none: no timer at all).
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// What becomes of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Deliver(Duration),
    Lose,
}

/// The network's faults, drawn from its seed.
struct Weather {
    rng: u64,
    /// Chance of losing each message, per million.
    loss_per_million: u32,
    /// Each message is delayed by up to this.
    delay_max: Duration,
    /// Pairs of hosts that cannot reach each other (stored both ways).
    cuts: HashSet<(IpAddr, IpAddr)>,
}

impl Weather {
    /// SplitMix64: small, and the same on every platform.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A message's fate by chance alone (cuts are checked as it leaves).
    fn draw(&mut self) -> Fate {
        if self.loss_per_million > 0 && self.next() % 1_000_000 < u64::from(self.loss_per_million) {
            return Fate::Lose;
        }
        Fate::Deliver(self.delay())
    }

    fn delay(&mut self) -> Duration {
        let max = u64::try_from(self.delay_max.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(match max.checked_add(1) {
            Some(span) if max > 0 => self.next() % span,
            _ => 0,
        })
    }

    /// A connection attempt: lost only across a cut (QUIC sends its
    /// handshake again through mere losses).
    fn handshake(&mut self, from: IpAddr, to: IpAddr) -> Fate {
        if self.cuts.contains(&(from, to)) || self.cuts.contains(&(to, from)) {
            return Fate::Lose;
        }
        Fate::Deliver(self.delay())
    }
}

/// A claimed address: its server, once it serves.
type Claim = tokio::sync::watch::Sender<Option<Arc<dyn Serving>>>;

struct Net {
    /// Addresses claimed by a [`Listener`]; connections to one wait (as
    /// QUIC's do on a bound endpoint) until it serves.
    servers: Mutex<HashMap<SocketAddr, Claim>>,
    weather: Mutex<Weather>,
}

/// An in-process network (cheap to clone: clones are the same network).
#[derive(Clone)]
pub struct MemoryNet {
    net: Arc<Net>,
}

impl std::fmt::Debug for MemoryNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers = self.net.servers.locked().len();
        write!(f, "MemoryNet({servers} servers)")
    }
}

impl MemoryNet {
    /// A network that delivers everything at once until told otherwise;
    /// its losses and delays are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            net: Arc::new(Net {
                servers: Mutex::new(HashMap::new()),
                weather: Mutex::new(Weather {
                    rng: seed,
                    loss_per_million: 0,
                    delay_max: Duration::ZERO,
                    cuts: HashSet::new(),
                }),
            }),
        }
    }

    /// Loses each message (request or reply) with this chance, per million.
    pub fn set_loss(&self, per_million: u32) {
        self.net.weather.locked().loss_per_million = per_million.min(1_000_000);
    }

    /// Delays each message by up to `max`.
    pub fn set_delay(&self, max: Duration) {
        self.net.weather.locked().delay_max = max;
    }

    /// Cuts the hosts `a` and `b` off from each other.
    pub fn cut(&self, a: IpAddr, b: IpAddr) {
        let mut weather = self.net.weather.locked();
        weather.cuts.insert((a, b));
        weather.cuts.insert((b, a));
    }

    /// Heals a [`cut`](Self::cut).
    pub fn heal(&self, a: IpAddr, b: IpAddr) {
        let mut weather = self.net.weather.locked();
        weather.cuts.remove(&(a, b));
        weather.cuts.remove(&(b, a));
    }

    /// Whether `from` is cut off from `to` now.
    fn is_cut(&self, from: IpAddr, to: IpAddr) -> bool {
        self.net.weather.locked().cuts.contains(&(from, to))
    }

    /// The fates of a request from `from` to `to` and of its reply, both
    /// drawn now (so the order sends are made in, not the order their
    /// tasks run in, decides them).
    fn exchange_fates(&self, from: IpAddr, to: IpAddr) -> (Fate, Fate) {
        let mut weather = self.net.weather.locked();
        let (there, back) = (weather.draw(), weather.draw());
        if weather.cuts.contains(&(from, to)) {
            return (Fate::Lose, back);
        }
        (there, back)
    }

    /// Claims `addr` for a server ([`crate::rpc::serve`] it); port 0 picks
    /// a free one.
    pub fn listen(&self, mut addr: SocketAddr) -> std::io::Result<Listener> {
        let mut servers = self.net.servers.locked();
        if addr.port() == 0 {
            let free =
                (1024..=u16::MAX).find(|p| !servers.contains_key(&SocketAddr::new(addr.ip(), *p)));
            let Some(port) = free else {
                return Err(std::io::ErrorKind::AddrInUse.into());
            };
            addr.set_port(port);
        }
        if servers.contains_key(&addr) {
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        servers.insert(addr, tokio::sync::watch::channel(None).0);
        Ok(Listener {
            net: self.clone(),
            addr,
        })
    }

    /// Serves `service` at the listener's address until `shutdown`; then
    /// resets its connections and waits for the requests in hand.
    pub(crate) async fn serve<S: Service>(
        listener: Listener,
        service: Arc<S>,
        auth: Arc<ServerAuth>,
        limits: NetLimits,
        stats: Arc<HandshakeStats>,
        shutdown: CancellationToken,
    ) {
        let server = Arc::new(Server {
            service,
            auth,
            limits,
            stats,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        if let Some(claim) = listener.net.net.servers.locked().get(&listener.addr) {
            claim.send_replace(Some(Arc::clone(&server) as Arc<dyn Serving>));
        }
        shutdown.cancelled().await;
        drop(listener);
        server.stop.cancel();
        server.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), server.tasks.wait()).await;
    }

    /// Connects from host `from` to the server at `to` and runs the
    /// handshake (the token proof checked as over QUIC).
    pub(crate) async fn connect(
        &self,
        from: IpAddr,
        to: SocketAddr,
        auth: &ClientAuth,
        limits: &NetLimits,
    ) -> Result<(Link, Option<NodeId>), ConnectError> {
        let timeout = || ConnectError::Timeout {
            what: "handshake",
            addr: to.to_string(),
        };
        let claim = self.net.servers.locked().get(&to).map(|c| c.subscribe());
        // Across a cut, or to no server at all: nothing answers.
        let fate = self.net.weather.locked().handshake(from, to.ip());
        let (Some(mut claim), Fate::Deliver(delay)) = (claim, fate) else {
            tokio::time::sleep(limits.handshake_timeout).await;
            return Err(timeout());
        };
        let serving =
            tokio::time::timeout(limits.handshake_timeout, claim.wait_for(Option::is_some));
        let server = match serving.await {
            Ok(Ok(server)) => server.clone().ok_or_else(timeout)?,
            _ => return Err(timeout()),
        };
        pause(delay).await;
        let connection_id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
        let binding = link_binding(connection_id, auth.role.tag());
        let hello = handshake::client_hello(auth, &binding);
        server
            .admit(&hello, binding)
            .map_err(|refusal| ConnectError::Refused {
                addr: to.to_string(),
                refusal,
            })?;
        let peer = Peer {
            role: auth.role,
            remote: SocketAddr::new(from, 0),
            connection_id,
        };
        let node_id = server.node_id();
        let link = Link {
            net: self.clone(),
            from,
            to,
            server,
            peer,
            closed: CancellationToken::new(),
            told: false.into(),
        };
        Ok((link, node_id))
    }
}

/// What ties a `Hello`'s token proof to one link (over QUIC: keying
/// material exported from the TLS session).
fn link_binding(connection_id: u64, role: u8) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"shoal memory link");
    ctx.update(&connection_id.to_be_bytes());
    ctx.update(&[role]);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// An address claimed on a [`MemoryNet`], to serve on.
#[derive(Debug)]
pub struct Listener {
    net: MemoryNet,
    addr: SocketAddr,
}

impl Listener {
    /// The address claimed.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    /// The address is free again (its server, if any, has stopped).
    fn drop(&mut self) {
        self.net.net.servers.locked().remove(&self.addr);
    }
}

/// A client's connection over a [`MemoryNet`].
pub(crate) struct Link {
    net: MemoryNet,
    from: IpAddr,
    to: SocketAddr,
    server: Arc<dyn Serving>,
    peer: Peer,
    closed: CancellationToken,
    /// The server was told the link ended.
    told: std::sync::atomic::AtomicBool,
}

impl Link {
    /// Why the connection ended, once it has.
    pub(crate) fn close_reason(&self) -> Option<quinn::ConnectionError> {
        if self.closed.is_cancelled() {
            Some(quinn::ConnectionError::LocallyClosed)
        } else if self.server.stopped().is_cancelled() {
            Some(quinn::ConnectionError::Reset)
        } else {
            None
        }
    }

    /// Sends an encoded request envelope; the reply comes on the receiver.
    pub(crate) fn send(
        &self,
        request: Vec<u8>,
    ) -> Result<oneshot::Receiver<Answer>, quinn::ConnectionError> {
        if let Some(reason) = self.close_reason() {
            return Err(reason);
        }
        let (mut tx, rx) = oneshot::channel();
        let (net, from, to) = (self.net.clone(), self.from, self.to.ip());
        let (there, back) = net.exchange_fates(from, to);
        let (server, peer) = (Arc::clone(&self.server), self.peer.clone());
        let (closed, stopped) = (self.closed.clone(), self.server.stopped().clone());
        let exchange = async move {
            let answer = match there {
                Fate::Lose => held(&mut tx, &closed, &stopped).await.map(Err),
                Fate::Deliver(delay) => {
                    // The server's handlers end with it, as over QUIC.
                    let handled = async {
                        pause(delay).await;
                        server.handle(peer, request).await
                    };
                    let reply = tokio::select! {
                        reply = handled => reply,
                        reason = ended(&closed, &stopped) => {
                            let _ = tx.send(Err(reason));
                            return;
                        }
                    };
                    let back = if net.is_cut(to, from) {
                        Fate::Lose
                    } else {
                        back
                    };
                    match back {
                        Fate::Lose => held(&mut tx, &closed, &stopped).await.map(Err),
                        Fate::Deliver(delay) => Some(tokio::select! {
                            () = pause(delay) => Ok(reply),
                            reason = ended(&closed, &stopped) => Err(reason),
                        }),
                    }
                }
            };
            if let Some(answer) = answer {
                let _ = tx.send(answer);
            }
        };
        self.server.spawn(Box::pin(exchange));
        Ok(rx)
    }

    /// Closes the connection.
    pub(crate) fn close(&self) {
        self.closed.cancel();
        self.gone();
    }

    /// Tells the server once that this link has ended.
    fn gone(&self) {
        if !self.told.swap(true, Ordering::AcqRel) {
            self.server.disconnected(&self.peer);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.gone();
    }
}

/// Waits until the link ends (its reason), as a caller waits for a lost
/// message; `None` when the caller stopped waiting first.
async fn held(
    tx: &mut oneshot::Sender<Answer>,
    closed: &CancellationToken,
    stopped: &CancellationToken,
) -> Option<quinn::ConnectionError> {
    tokio::select! {
        reason = ended(closed, stopped) => Some(reason),
        () = tx.closed() => None,
    }
}

/// The link's end: closed by its client, or reset by its server stopping.
async fn ended(closed: &CancellationToken, stopped: &CancellationToken) -> quinn::ConnectionError {
    tokio::select! {
        () = closed.cancelled() => quinn::ConnectionError::LocallyClosed,
        () = stopped.cancelled() => quinn::ConnectionError::Reset,
    }
}

#[cfg(test)]
mod tests;
