//! Request/reply over QUIC streams.
//!
//! Each request opens its own bidirectional stream (on quinn this costs about
//! the same as reusing one, and a slow reply never blocks another): the client
//! writes one [`RequestEnvelope`] frame and finishes its side, the server
//! answers one [`ReplyEnvelope`] frame. Replies are the acknowledgement; the
//! code never waits on transport-level ACKs (`SendStream::stopped` costs a full
//! ACK delay).

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::codec::{self, CodecLimits, LEN_PREFIX};
use shoal_proto::{
    DecodeError, EncodeError, NodeId, ReplyEnvelope, RequestEnvelope, Role, ServiceError,
    ServiceErrorKind,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::close_code;
use crate::error::{ConnectError, RpcError};
use crate::faults::{Fault, Faults};
use crate::handshake::{self, ClientAuth, HandshakeFailure, HandshakeStats, ServerAuth};
use crate::limits::NetLimits;
use crate::transport::Listener;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameReadError {
    /// The connection closed.
    #[error("connection closed: {0}")]
    Connection(quinn::ConnectionError),
    /// The stream ended or was reset.
    #[error("stream: {0}")]
    Stream(String),
    /// The bytes are not an acceptable frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl From<quinn::ReadExactError> for FrameReadError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
                FrameReadError::Connection(c)
            }
            other => FrameReadError::Stream(other.to_string()),
        }
    }
}

/// Reads one frame: the length prefix is checked against `limits` before the
/// body's buffer is allocated.
pub(crate) async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    limits: &CodecLimits,
) -> Result<T, FrameReadError> {
    let body = read_frame_body(recv, limits).await?;
    // Shared: an object's part in the message is a slice of this frame.
    Ok(shoal_proto::decode_shared(
        bytes::Bytes::from(body),
        limits,
    )?)
}

/// Reads one frame's body, undecoded (the handshake judges it with
/// `handshake::judge_hello` and `judge_hello_reply`); the length prefix is
/// checked against `limits` before the body's buffer is allocated.
pub(crate) async fn read_frame_body(
    recv: &mut quinn::RecvStream,
    limits: &CodecLimits,
) -> Result<Vec<u8>, FrameReadError> {
    let mut prefix = [0u8; LEN_PREFIX];
    recv.read_exact(&mut prefix).await?;
    let len = codec::frame_len(prefix, limits).map_err(DecodeError::from)?;
    // Grow the buffer as bytes arrive rather than trusting the claimed
    // length: a peer that claims 16 MiB and sends nothing costs nothing.
    // Past the first MiB, the rest is reserved at once (a large frame is
    // not copied again at each doubling).
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        let want = (len - body.len()).min(1 << 20);
        if body.len() >= 1 << 20 {
            body.reserve_exact(len - body.len());
        }
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(FrameReadError::Stream(format!(
                    "stream ended after {} of {len} bytes",
                    body.len()
                )))
            }
            Err(quinn::ReadError::ConnectionLost(c)) => return Err(FrameReadError::Connection(c)),
            Err(e) => return Err(FrameReadError::Stream(e.to_string())),
        }
    }
    Ok(body)
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameWriteError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Writes one frame. The message is encoded before the first await, so the
/// returned future does not borrow it (and needs no `Sync` bound on it).
pub(crate) fn write_frame<'s, T: Serialize>(
    send: &'s mut quinn::SendStream,
    msg: &T,
    limits: &CodecLimits,
) -> impl Future<Output = Result<(), FrameWriteError>> + Send + 's {
    let mut buf = Vec::with_capacity(128);
    let encoded = codec::encode_frame(msg, limits, &mut buf);
    async move {
        encoded?;
        // Handed over, not copied: a large reply (an object's part) is
        // written from this buffer.
        send.write_chunk(bytes::Bytes::from(buf)).await?;
        Ok(())
    }
}

/// Longest account of an undecodable request that its `BadRequest` reply
/// quotes, in bytes.
pub const UNDECODABLE_REASON_MAX: usize = 1024;

/// The answer to a request that does not decode: the decoder's account,
/// cut to [`UNDECODABLE_REASON_MAX`] bytes. Uncut, it may quote most of
/// the request (a string where an enum's name belongs), and a request
/// near the frame limit would get a reply over it, which is never sent.
pub(crate) fn undecodable(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(
        ServiceErrorKind::BadRequest,
        handshake::cut(e.to_string(), UNDECODABLE_REASON_MAX),
    )
}

/// Who is on the other end of a served connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The role the peer proved.
    pub role: Role,
    /// Its address.
    pub remote: SocketAddr,
    /// Unique among the connections this process has served.
    pub connection_id: u64,
}

pub(crate) static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

impl Peer {
    /// Refuses the request unless the peer's role is one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ServiceError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ServiceError::new(
                ServiceErrorKind::PermissionDenied,
                format!(
                    "a {:?} connection may not make this request (allowed: {roles:?})",
                    self.role
                ),
            ))
        }
    }
}

/// A request/reply service: one request enum in, one reply enum out.
pub trait Service: Send + Sync + 'static {
    /// The service's request enum.
    type Request: DeserializeOwned + Send + 'static;
    /// The service's reply enum.
    type Reply: Serialize + Send + 'static;

    /// Answers one request. Runs concurrently with other requests; the
    /// server drops the future if the request's deadline passes.
    fn handle(
        &self,
        peer: &Peer,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Reply, ServiceError>> + Send;

    /// Whether the request's deadline (capped by `request_timeout_max`)
    /// bounds its handler. False for requests that run user code for as
    /// long as it takes (a task, an actor method): their liveness is judged
    /// by the worker process and its node, never by a reply deadline.
    fn deadline_applies(&self, _request: &Self::Request) -> bool {
        true
    }

    /// Called once when an authenticated connection has closed.
    fn disconnected(&self, _peer: &Peer) {}
}

/// Serves `service` on `listener` until `shutdown` is cancelled: accepts
/// connections, runs the handshake on each, then answers its requests.
/// On shutdown it stops accepting, closes every connection and waits (bounded)
/// for the endpoint to go idle.
///
/// On QUIC, peers on this host may come through a Unix socket instead (see
/// `unix`); it is bound when `serve` is called, so a peer told the address
/// right after finds it. Must be called inside a tokio runtime.
pub fn serve<S: Service>(
    listener: impl Into<Listener>,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match listener.into() {
        Listener::Quic(endpoint) => {
            let bound = endpoint.local_addr().ok();
            let same_host = bound.and_then(|b| crate::unix::listen(b, &limits));
            Box::pin(serve_quic(
                endpoint, same_host, service, auth, limits, stats, shutdown,
            ))
        }
        Listener::Memory(listener) => Box::pin(crate::memory::MemoryNet::serve(
            listener, service, auth, limits, stats, shutdown,
        )),
    }
}

async fn serve_quic<S: Service>(
    endpoint: quinn::Endpoint,
    same_host: Option<crate::unix::Listener>,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let admission = crate::admission::Admission::new(&limits);
    let bound = endpoint.local_addr().ok();
    if let Some(listener) = same_host {
        tracker.spawn(crate::unix::serve_listener(
            listener,
            service.clone(),
            auth.clone(),
            limits.clone(),
            stats.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    loop {
        tokio::select! {
            // Stop accepting first; connections see the cancellation too.
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Bound the peers in their handshake (see `admission`):
                // past a bound, refuse at once (cheap) rather than queue
                // TLS work.
                let admitted = admission.admit(
                    incoming.remote_address().ip(),
                    incoming.remote_address_validated(),
                    incoming.may_retry(),
                );
                let slot = match admitted {
                    crate::admission::Admit::Slot(slot) => slot,
                    crate::admission::Admit::Retry => {
                        stats.retried.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                        continue;
                    }
                    crate::admission::Admit::Refuse => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        incoming.refuse();
                        continue;
                    }
                };
                let conn_task = serve_connection(
                    incoming,
                    bound,
                    slot,
                    service.clone(),
                    auth.clone(),
                    limits.clone(),
                    stats.clone(),
                    shutdown.clone(),
                    tracker.clone(),
                );
                tracker.spawn(conn_task);
            }
        }
    }
    endpoint.close(close_code::SHUTDOWN.into(), b"shutting down");
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S: Service>(
    incoming: quinn::Incoming,
    bound: Option<SocketAddr>,
    handshake_slot: crate::admission::Slot,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let remote = incoming.remote_address();
    // A peer on this host gets the same-host packet sizes (an endpoint on
    // every interface serves both kinds).
    let same_host = bound
        .filter(|_| crate::endpoint::Path::to(remote.ip()) == crate::endpoint::Path::SameHost)
        .and_then(crate::endpoint::same_host_server);
    let setup = async {
        let conn = match same_host {
            Some(config) => incoming.accept_with(config)?.await?,
            None => incoming.accept()?.await?,
        };
        let role = handshake::server_handshake(&conn, &auth, &stats).await;
        Ok::<_, quinn::ConnectionError>((conn, role))
    };
    let (conn, role) = match tokio::time::timeout(limits.handshake_timeout, setup).await {
        Ok(Ok((conn, Ok(role)))) => (conn, role),
        Ok(Ok((conn, Err(HandshakeFailure::Refused(refusal))))) => {
            info!(%remote, %refusal, "handshake refused");
            // Give the peer a moment to read the refusal and close on its
            // side, then close for it.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            conn.close(close_code::HANDSHAKE_REFUSED.into(), b"handshake refused");
            return;
        }
        Ok(Ok((conn, Err(e)))) => {
            info!(%remote, error = %e, "handshake failed");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"handshake failed");
            return;
        }
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "connection setup failed");
            return;
        }
        Err(_) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            info!(%remote, "handshake timed out");
            return;
        }
    };
    drop(handshake_slot);
    crate::endpoint::grant_full_limits(&conn, &limits);
    let peer = Peer {
        role,
        remote,
        connection_id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
    };
    debug!(%remote, ?role, "peer connected");
    loop {
        let (send, recv) = tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(close_code::SHUTDOWN.into(), b"shutting down");
                return;
            }
            stream = conn.accept_bi() => match stream {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%remote, error = %e, "peer gone");
                    service.disconnected(&peer);
                    return;
                }
            },
        };
        let request = serve_request(service.clone(), peer.clone(), send, recv, limits.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            // A handler still running at shutdown is dropped, not awaited.
            shutdown.run_until_cancelled(request).await;
        });
    }
}

async fn serve_request<S: Service>(
    service: Arc<S>,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    limits: NetLimits,
) {
    let codec = limits.codec();
    // A peer that opens a stream and trickles its request is cut off.
    let read = tokio::time::timeout(
        limits.handshake_timeout,
        read_frame::<RequestEnvelope<S::Request>>(&mut recv, &codec),
    );
    let Ok(read) = read.await else {
        debug!(remote = %peer.remote, "request not received in time");
        let _ = recv.stop(close_code::PROTOCOL_ERROR.into());
        return;
    };
    let request = match read {
        Ok(request) => request,
        Err(FrameReadError::Decode(e)) => {
            warn!(remote = %peer.remote, error = %e, "undecodable request");
            let reply: ReplyEnvelope<S::Reply> = ReplyEnvelope {
                id: 0,
                result: Err(undecodable(e)),
            };
            let _ = recv.stop(close_code::PROTOCOL_ERROR.into());
            let _ = write_frame(&mut send, &reply, &codec).await;
            let _ = send.finish();
            return;
        }
        Err(e) => {
            debug!(remote = %peer.remote, error = %e, "request stream failed");
            return;
        }
    };
    let id = request.id;
    let result = answer(&*service, &peer, request, &limits).await;
    let reply = ReplyEnvelope { id, result };
    if let Err(FrameWriteError::Encode(e)) = write_frame(&mut send, &reply, &codec).await {
        warn!(error = %e, "reply cannot be encoded");
        let fallback: ReplyEnvelope<S::Reply> = ReplyEnvelope {
            id,
            result: Err(ServiceError::new(ServiceErrorKind::Internal, e.to_string())),
        };
        let _ = write_frame(&mut send, &fallback, &codec).await;
    }
    let _ = send.finish();
}

/// Where a reply will come from.
enum Awaited {
    /// The request's own QUIC stream.
    Quic(quinn::RecvStream),
    /// The same-host connection, matched by id.
    Unix(crate::unix::Awaiting),
    /// An in-process link ([`crate::memory`]).
    Memory(tokio::sync::oneshot::Receiver<crate::memory::Answer>),
}

/// Answers one decoded request within its deadline (capped by
/// `request_timeout_max`) unless the service says none applies to it,
/// whichever transport brought it.
pub(crate) async fn answer<S: Service>(
    service: &S,
    peer: &Peer,
    request: RequestEnvelope<S::Request>,
    limits: &NetLimits,
) -> Result<S::Reply, ServiceError> {
    if !service.deadline_applies(&request.body) {
        return service.handle(peer, request.body).await;
    }
    let deadline = Duration::from_millis(request.timeout_ms).min(limits.request_timeout_max);
    match tokio::time::timeout(deadline, service.handle(peer, request.body)).await {
        Ok(result) => result,
        Err(_) => Err(ServiceError::new(
            ServiceErrorKind::DeadlineExceeded,
            format!("no answer within the request's {deadline:?}"),
        )),
    }
}

/// Tries of a control request whose exchange failed without an answer
/// ([`RpcClient::call_idempotent`]).
pub const CONTROL_ATTEMPTS: u32 = 4;

/// A request sent, its reply still to come.
pub struct InFlight<Rep> {
    id: u64,
    awaited: Awaited,
    codec: CodecLimits,
    /// An injected reply fault: the reply is awaited, then discarded for
    /// this error's message.
    discard: Option<String>,
    _reply: PhantomData<fn() -> Rep>,
}

impl<Rep: DeserializeOwned> InFlight<Rep> {
    /// Waits for the reply (no deadline of its own: wrap it in one).
    pub async fn reply(self) -> Result<Rep, RpcError> {
        let reply: ReplyEnvelope<Rep> = match self.awaited {
            Awaited::Quic(mut recv) => {
                read_frame(&mut recv, &self.codec)
                    .await
                    .map_err(|e| match e {
                        FrameReadError::Connection(c) => RpcError::Connection(c),
                        FrameReadError::Stream(s) => RpcError::Stream(s),
                        FrameReadError::Decode(d) => RpcError::Decode(d),
                    })?
            }
            Awaited::Unix(mut awaiting) => {
                let body = awaiting.body().await?;
                codec::decode(&body, &self.codec)?
            }
            Awaited::Memory(answer) => {
                let body = answer.await.unwrap_or(Err(quinn::ConnectionError::Reset))?;
                codec::decode(&body, &self.codec)?
            }
        };
        if let Some(message) = self.discard {
            return Err(RpcError::Injected(message));
        }
        unwrap_reply(self.id, reply)
    }
}

/// The reply to request `id`, or the error it carries.
fn unwrap_reply<Rep>(id: u64, reply: ReplyEnvelope<Rep>) -> Result<Rep, RpcError> {
    match reply.result {
        Err(e) => Err(RpcError::Service(e)),
        Ok(_) if reply.id != id => Err(RpcError::IdMismatch {
            expected: id,
            got: reply.id,
        }),
        Ok(rep) => Ok(rep),
    }
}

/// The connection under an [`RpcClient`].
#[derive(Clone)]
enum Link {
    Quic(quinn::Connection),
    /// A Unix socket to a server on this host (see [`crate::unix`]).
    Unix(Arc<crate::unix::Link>),
    /// An in-process link (see [`crate::memory`]).
    Memory(Arc<crate::memory::Link>),
}

/// An authenticated connection that sends `Req` and receives `Rep`.
pub struct RpcClient<Req, Rep> {
    link: Link,
    remote: SocketAddr,
    next_id: Arc<AtomicU64>,
    codec: CodecLimits,
    peer_node: Option<NodeId>,
    /// Faults to inject ([`crate::faults`]): the process's, captured at
    /// connect; `None` (the rule) costs one check per request.
    faults: Option<Arc<Faults>>,
    _types: PhantomData<fn(Req) -> Rep>,
}

impl<Req, Rep> Clone for RpcClient<Req, Rep> {
    fn clone(&self) -> Self {
        Self {
            link: self.link.clone(),
            remote: self.remote,
            next_id: self.next_id.clone(),
            codec: self.codec,
            peer_node: self.peer_node,
            faults: self.faults.clone(),
            _types: PhantomData,
        }
    }
}

impl<Req, Rep> std::fmt::Debug for RpcClient<Req, Rep> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let via = match self.link {
            Link::Quic(_) => "quic",
            Link::Unix(_) => "unix",
            Link::Memory(_) => "memory",
        };
        write!(f, "RpcClient({} via {via})", self.remote)
    }
}

impl<Req: Serialize + Sync, Rep: DeserializeOwned> RpcClient<Req, Rep> {
    /// Opens a connection to `addr` and runs the handshake: over the
    /// server's same-host socket when `addr` is on this host (loopback, or an
    /// address of this network namespace: [`crate::host::is_local_ip`]) and
    /// one answers (not for node daemons, which prove a certificate), else
    /// QUIC. Reached through [`crate::Transport`] only.
    pub(crate) async fn connect(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        auth: &ClientAuth,
        limits: &NetLimits,
    ) -> Result<Self, ConnectError> {
        if limits.same_host_sockets
            && auth.role != Role::Node
            && crate::host::is_local_ip(addr.ip())
        {
            match crate::unix::connect(addr, auth, limits).await {
                Ok((link, peer_node)) => {
                    return Ok(Self::over(Link::Unix(link), addr, peer_node, limits))
                }
                Err(e) => debug!(%addr, error = %e, "no same-host connection; using QUIC"),
            }
        }
        let setup = async {
            let config = crate::endpoint::client_config_to(config, addr, limits);
            let conn = endpoint
                .connect_with(config, addr, server_name)
                .map_err(|source| ConnectError::Connect {
                    addr: addr.to_string(),
                    source,
                })?
                .await
                .map_err(|source| ConnectError::Connection {
                    addr: addr.to_string(),
                    source,
                })?;
            let peer_node = handshake::client_handshake(&conn, auth, addr).await?;
            Ok((conn, peer_node))
        };
        let (conn, peer_node) = tokio::time::timeout(limits.handshake_timeout, setup)
            .await
            .map_err(|_| ConnectError::Timeout {
                what: "handshake",
                addr: addr.to_string(),
            })??;
        Ok(Self::over(Link::Quic(conn), addr, peer_node, limits))
    }

    /// A client over an in-process link.
    pub(crate) fn memory(
        link: crate::memory::Link,
        remote: SocketAddr,
        peer_node: Option<NodeId>,
        limits: &NetLimits,
    ) -> Self {
        Self::over(Link::Memory(Arc::new(link)), remote, peer_node, limits)
    }

    /// A client over an open, authenticated `link` to `remote`, with the
    /// process's faults.
    fn over(link: Link, remote: SocketAddr, peer_node: Option<NodeId>, limits: &NetLimits) -> Self {
        Self {
            link,
            remote,
            next_id: Arc::new(AtomicU64::new(1)),
            codec: limits.codec(),
            peer_node,
            faults: crate::faults::global().cloned(),
            _types: PhantomData,
        }
    }

    /// Replaces the faults this client (and its later clones) injects:
    /// `None` for none. For tests, which give each client its own plan
    /// rather than share the process's.
    #[doc(hidden)]
    pub fn with_faults(mut self, faults: Option<Faults>) -> Self {
        self.faults = faults.map(Arc::new);
        self
    }

    /// Decides whether to inject a fault in this exchange of `request`:
    /// `Err` for a dropped request, `Ok(Some)` with the message for a
    /// reply to discard.
    fn inject(&self, request: &Req) -> Result<Option<String>, RpcError> {
        let Some(faults) = &self.faults else {
            return Ok(None);
        };
        match faults.decide_for(request) {
            None => Ok(None),
            Some((Fault::Request, message)) => Err(RpcError::Injected(message)),
            Some((Fault::Reply, message)) => Ok(Some(message)),
        }
    }

    /// Sends an idempotent `request` (every control request is: see the
    /// reliability rules in the architecture notes), trying again when the
    /// exchange ended without an answer: a request or reply lost (injected
    /// faults too), a timeout, a broken stream. Up to [`CONTROL_ATTEMPTS`]
    /// tries, `timeout` each, with a short backoff. A typed answer from the
    /// service ends it at once, and so does a lost connection (the caller
    /// connects again and decides).
    pub async fn call_idempotent(&self, request: &Req, timeout: Duration) -> Result<Rep, RpcError> {
        let mut backoff = Duration::from_millis(20);
        let mut tried = 1;
        loop {
            match self.call(request, timeout).await {
                Err(e) if tried < CONTROL_ATTEMPTS && e.is_worth_retrying() => {
                    debug!(remote = %self.remote, error = %e, tried, "control request failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    tried += 1;
                }
                other => return other,
            }
        }
    }

    /// [`Self::call_idempotent`], also trying again while the service
    /// answers `Unavailable` (busy for now, as the head is with too many
    /// uploads at once), with a growing pause, for up to `patience`.
    pub async fn call_when_available(
        &self,
        request: &Req,
        timeout: Duration,
        patience: Duration,
    ) -> Result<Rep, RpcError> {
        crate::backoff::while_busy(patience, RpcError::is_busy, || {
            self.call_idempotent(request, timeout)
        })
        .await
    }

    /// Sends `request` and waits up to `timeout` for its reply.
    pub async fn call(&self, request: &Req, timeout: Duration) -> Result<Rep, RpcError> {
        let exchange = async { self.send(request, timeout).await?.reply().await };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RpcError::Timeout(timeout))?
    }

    /// Sends `request` (its stream opened and written, in the order calls
    /// to `send` complete) without waiting for the reply; `timeout` is the
    /// deadline the server is told.
    pub async fn send(&self, request: &Req, timeout: Duration) -> Result<InFlight<Rep>, RpcError> {
        let discard = self.inject(request)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let envelope = RequestEnvelope {
            id,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            body: request,
        };
        let conn = match &self.link {
            Link::Quic(conn) => conn,
            Link::Memory(link) => {
                let body = crate::memory::encode_body(&envelope, &self.codec)?;
                return Ok(InFlight {
                    id,
                    awaited: Awaited::Memory(link.send(body)?),
                    codec: self.codec,
                    discard,
                    _reply: PhantomData,
                });
            }
            Link::Unix(link) => {
                let frame = crate::unix::encode_message(id, &envelope, &self.codec)?;
                return Ok(InFlight {
                    id,
                    awaited: Awaited::Unix(link.send(id, frame)?),
                    codec: self.codec,
                    discard,
                    _reply: PhantomData,
                });
            }
        };
        let (mut send, recv) = conn.open_bi().await?;
        write_frame(&mut send, &envelope, &self.codec)
            .await
            .map_err(|e| match e {
                FrameWriteError::Encode(e) => RpcError::Encode(e),
                FrameWriteError::Stream(e) => RpcError::Stream(e.to_string()),
            })?;
        let _ = send.finish();
        Ok(InFlight {
            id,
            awaited: Awaited::Quic(recv),
            codec: self.codec,
            discard,
            _reply: PhantomData,
        })
    }

    /// On a same-host connection: sends `request`, written from this
    /// thread when the connection is idle, and calls `then` with the reply
    /// (or the connection's end) on the task that reads replies, so the
    /// round trip wakes no other task of this runtime. `then` must be
    /// quick: it holds up the connection's other replies. `None` over QUIC
    /// (nothing is sent); `Some(Err)` when nothing could be sent (and
    /// `then` is not called), as when an injected fault drops the request.
    pub fn send_then<F>(
        &self,
        request: &Req,
        timeout: Duration,
        then: F,
    ) -> Option<Result<(), RpcError>>
    where
        Rep: Send + 'static,
        F: FnOnce(Result<Rep, RpcError>) + Send + 'static,
    {
        let Link::Unix(link) = &self.link else {
            return None;
        };
        let discard = match self.inject(request) {
            Ok(discard) => discard,
            Err(e) => return Some(Err(e)),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let envelope = RequestEnvelope {
            id,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            body: request,
        };
        let frame = match crate::unix::encode_message(id, &envelope, &self.codec) {
            Ok(frame) => frame,
            Err(e) => return Some(Err(e.into())),
        };
        let codec = self.codec;
        let answered = Box::new(move |body: Result<Vec<u8>, quinn::ConnectionError>| {
            let reply = body.map_err(RpcError::from).and_then(|body| {
                if let Some(message) = discard {
                    return Err(RpcError::Injected(message));
                }
                let reply: ReplyEnvelope<Rep> = codec::decode(&body, &codec)?;
                unwrap_reply(id, reply)
            });
            then(reply);
        });
        Some(link.send_then(id, frame, answered).map_err(RpcError::from))
    }

    /// The node id the server announced in its `Welcome`, if it is a node.
    pub fn peer_node(&self) -> Option<NodeId> {
        self.peer_node
    }

    /// The server's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// Whether the connection is a same-host Unix socket rather than QUIC.
    pub fn is_same_host(&self) -> bool {
        matches!(self.link, Link::Unix(_))
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        match &self.link {
            Link::Quic(conn) => conn.close_reason(),
            Link::Unix(link) => link.close_reason(),
            Link::Memory(link) => link.close_reason(),
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        match &self.link {
            Link::Quic(conn) => conn.close(close_code::DONE.into(), b"done"),
            Link::Unix(link) => link.close(),
            Link::Memory(link) => link.close(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClusterIdentity;
    use crate::transport::Transport;
    use crate::{endpoint, tls, ConnectError, HEAD_SERVER_NAME};
    use serde::Deserialize;
    use shoal_proto::HandshakeRefusal;

    /// A request that is one 100 000-byte string: the decoder's account
    /// quotes it whole, the answer only its start.
    #[test]
    fn an_undecodable_request_is_answered_with_a_bounded_account() {
        let mut body = vec![0xdb];
        body.extend(100_000u32.to_be_bytes());
        body.extend(std::iter::repeat_n(b'X', 100_000));
        let e = codec::decode::<RequestEnvelope<shoal_proto::HeadRequest>>(
            &body,
            &CodecLimits::CONTROL,
        )
        .expect_err("undecodable");
        assert!(e.to_string().len() > 100_000, "the account quotes it");
        let answer = undecodable(e);
        assert_eq!(answer.kind, ServiceErrorKind::BadRequest);
        assert!(answer.message.len() <= UNDECODABLE_REASON_MAX);
        assert!(answer.message.ends_with('…'), "{}", answer.message);
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    enum EchoRequest {
        Echo(String),
        Sleep(u64),
        Fail,
    }

    /// Answers requests and counts the ones it handled.
    #[derive(Default)]
    struct Echo {
        handled: AtomicU64,
    }

    impl Service for Echo {
        type Request = EchoRequest;
        type Reply = String;

        async fn handle(&self, peer: &Peer, request: EchoRequest) -> Result<String, ServiceError> {
            self.handled.fetch_add(1, Ordering::SeqCst);
            match request {
                EchoRequest::Echo(s) => Ok(format!("{:?}:{s}", peer.role)),
                EchoRequest::Sleep(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok("slept".into())
                }
                EchoRequest::Fail => Err(ServiceError::new(
                    ServiceErrorKind::NotFound,
                    "no such thing",
                )),
            }
        }
    }

    struct Server {
        addr: SocketAddr,
        limits: NetLimits,
        identity: ClusterIdentity,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        echo: Arc<Echo>,
    }

    /// A server and clients on QUIC only.
    fn start(allowed: Vec<Role>) -> Server {
        start_with(
            allowed,
            NetLimits {
                same_host_sockets: false,
                ..NetLimits::default()
            },
        )
    }

    /// A server that also listens on its same-host socket, and clients that
    /// use it.
    fn start_same_host(allowed: Vec<Role>) -> Server {
        start_with(
            allowed,
            NetLimits {
                same_host_sockets: true,
                ..NetLimits::default()
            },
        )
    }

    fn start_with(allowed: Vec<Role>, limits: NetLimits) -> Server {
        let identity = ClusterIdentity::generate().expect("identity");
        let cert = identity.issue_head_cert().expect("cert");
        let server = endpoint::server_config(tls::server_config(&cert).expect("tls"), &limits)
            .expect("server config");
        let ep = endpoint::endpoint(([127, 0, 0, 1], 0).into(), Some(server), &limits)
            .expect("endpoint");
        let addr = ep.local_addr().expect("addr");
        let auth = Arc::new(ServerAuth::new(identity.token().clone(), allowed));
        let shutdown = CancellationToken::new();
        let echo = Arc::new(Echo::default());
        let task = tokio::spawn(serve(
            ep,
            echo.clone(),
            auth,
            limits.clone(),
            Arc::new(HandshakeStats::default()),
            shutdown.clone(),
        ));
        Server {
            addr,
            limits,
            identity,
            shutdown,
            task,
            echo,
        }
    }

    impl Server {
        async fn client(&self, role: Role) -> Result<RpcClient<EchoRequest, String>, ConnectError> {
            let auth = ClientAuth {
                token: self.identity.token().clone(),
                role,
            };
            let transport = Transport::token_client(auth, HEAD_SERVER_NAME, self.limits.clone())?;
            transport.connect(self.addr).await
        }

        /// How many requests the server's handler has run.
        fn handled(&self) -> u64 {
            self.echo.handled.load(Ordering::SeqCst)
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.expect("server task");
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn requests_round_trip_with_the_proven_role() {
        let server = start(vec![Role::Node, Role::Client]);
        let client = server.client(Role::Client).await.expect("connect");
        for i in 0..20 {
            let reply = client
                .call(&EchoRequest::Echo(i.to_string()), T)
                .await
                .expect("echo");
            assert_eq!(reply, format!("Client:{i}"));
        }
        let err = client.call(&EchoRequest::Fail, T).await.expect_err("fails");
        assert!(matches!(
            err,
            RpcError::Service(ServiceError {
                kind: ServiceErrorKind::NotFound,
                ..
            })
        ));
        client.close();
        server.stop().await;
    }

    #[tokio::test]
    async fn concurrent_requests_on_one_connection() {
        let server = start(vec![Role::Node]);
        let client = server.client(Role::Node).await.expect("connect");
        let calls = (0..200).map(|i| {
            let client = client.clone();
            async move { client.call(&EchoRequest::Echo(i.to_string()), T).await }
        });
        let replies = futures_join_all(calls).await;
        for (i, reply) in replies.into_iter().enumerate() {
            assert_eq!(reply.expect("reply"), format!("Node:{i}"));
        }
        server.stop().await;
    }

    async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.expect("task"));
        }
        out
    }

    #[tokio::test]
    async fn a_slow_reply_times_out_and_the_connection_stays_usable() {
        let server = start(vec![Role::Node]);
        let client = server.client(Role::Node).await.expect("connect");
        let err = client
            .call(&EchoRequest::Sleep(5_000), Duration::from_millis(100))
            .await
            .expect_err("times out");
        assert!(matches!(err, RpcError::Timeout(_)), "{err:?}");
        assert_eq!(
            client
                .call(&EchoRequest::Echo("x".into()), T)
                .await
                .expect("echo"),
            "Node:x"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn a_bad_frame_after_the_handshake_gets_a_typed_error_and_the_connection_lives() {
        let server = start(vec![Role::Node]);
        let client = server.client(Role::Node).await.expect("connect");
        for garbage in [
            &[0xffu8, 0xff, 0xff, 0xff][..],
            &[0, 0, 0, 2, 0xc1, 0xc1][..],
            &[0, 0, 0, 1, 0xc0][..],
        ] {
            let Link::Quic(conn) = &client.link else {
                panic!("a node's connection is QUIC");
            };
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            send.write_all(garbage).await.expect("write");
            let _ = send.finish();
            let reply: ReplyEnvelope<String> = read_frame(&mut recv, &CodecLimits::CONTROL)
                .await
                .expect("a typed reply");
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
        }
        assert_eq!(
            client
                .call(&EchoRequest::Echo("ok".into()), T)
                .await
                .expect("echo"),
            "Node:ok"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn roles_not_allowed_are_refused() {
        let server = start(vec![Role::Node]);
        match server.client(Role::Driver).await {
            Err(ConnectError::Refused {
                refusal: HandshakeRefusal::RoleNotAllowed(Role::Driver),
                ..
            }) => {}
            other => panic!("expected RoleNotAllowed, got {other:?}"),
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn a_client_with_the_wrong_secret_is_refused() {
        let server = start(vec![Role::Node]);
        let impostor = crate::JoinToken::from_parts(server.identity.cluster_id(), [9; 32]);
        let auth = ClientAuth {
            token: impostor,
            role: Role::Node,
        };
        let transport = Transport::token_client(auth, HEAD_SERVER_NAME, NetLimits::default())
            .expect("transport");
        let result: Result<RpcClient<EchoRequest, String>, _> =
            transport.connect(server.addr).await;
        assert!(matches!(
            result,
            Err(ConnectError::Refused {
                refusal: HandshakeRefusal::BadToken,
                ..
            })
        ));
        server.stop().await;
    }

    /// A server that does not hold the token cannot fake its proof: the
    /// client refuses it even though the server "welcomes" everyone.
    #[tokio::test]
    async fn a_server_without_the_token_is_not_trusted() {
        let identity = ClusterIdentity::generate().expect("identity");
        let limits = NetLimits::default();
        let cert = identity.issue_head_cert().expect("cert");
        let server = endpoint::server_config(tls::server_config(&cert).expect("tls"), &limits)
            .expect("server config");
        let ep = endpoint::endpoint(([127, 0, 0, 1], 0).into(), Some(server), &limits)
            .expect("endpoint");
        let addr = ep.local_addr().expect("addr");
        let fake = tokio::spawn(async move {
            let conn = ep
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("connection");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let _hello: shoal_proto::Hello = read_frame(&mut recv, &CodecLimits::HANDSHAKE)
                .await
                .expect("hello");
            let welcome = shoal_proto::HelloReply::Welcome {
                server_proof: vec![0; 32],
                node_id: None,
            };
            write_frame(&mut send, &welcome, &CodecLimits::HANDSHAKE)
                .await
                .expect("reply");
            let _ = send.finish();
            let _ = conn.closed().await;
        });
        let auth = ClientAuth {
            token: identity.token().clone(),
            role: Role::Node,
        };
        let transport = Transport::token_client(auth, HEAD_SERVER_NAME, limits).expect("transport");
        let result: Result<RpcClient<EchoRequest, String>, _> = transport.connect(addr).await;
        assert!(
            matches!(result, Err(ConnectError::ServerNotAuthenticated { .. })),
            "{result:?}"
        );
        fake.await.expect("fake server");
    }

    /// Node-to-node mutual TLS: a node with a certificate from this cluster's
    /// CA gets in; a node with none, or one from another cluster's CA, does
    /// not; a worker needs only the token.
    #[tokio::test]
    async fn mutual_tls_admits_only_this_clusters_certificates() {
        let identity = ClusterIdentity::generate().expect("identity");
        let limits = NetLimits::default();
        let ca = identity.ca_cert_der();
        let node_cert = identity.issue_node_cert(NodeId::random()).expect("cert");
        let server = endpoint::server_config(
            tls::mtls_server_config(&node_cert, &ca).expect("tls"),
            &limits,
        )
        .expect("server config");
        let ep = endpoint::endpoint(([127, 0, 0, 1], 0).into(), Some(server), &limits)
            .expect("endpoint");
        let addr = ep.local_addr().expect("addr");
        let mut auth = ServerAuth::new(identity.token().clone(), vec![Role::Node, Role::Worker]);
        auth.certificate_required = vec![Role::Node];
        let auth = Arc::new(auth);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            ep,
            Arc::new(Echo::default()),
            auth,
            limits.clone(),
            Arc::new(HandshakeStats::default()),
            shutdown.clone(),
        ));
        let client_ep =
            endpoint::endpoint(([127, 0, 0, 1], 0).into(), None, &limits).expect("client endpoint");
        let auth = ClientAuth {
            token: identity.token().clone(),
            role: Role::Node,
        };
        let connect = |tls: rustls::ClientConfig| {
            let config = endpoint::client_config(tls, &limits).expect("client config");
            let client_ep = client_ep.clone();
            let auth = auth.clone();
            let limits = limits.clone();
            async move {
                RpcClient::<EchoRequest, String>::connect(
                    &client_ep,
                    config,
                    addr,
                    crate::NODE_SERVER_NAME,
                    &auth,
                    &limits,
                )
                .await
            }
        };
        let peer_cert = identity
            .issue_node_cert(NodeId::random())
            .expect("peer cert");
        let ok = connect(tls::mtls_client_config(&peer_cert, &ca).expect("tls"))
            .await
            .expect("a peer with this cluster's certificate connects");
        assert_eq!(
            ok.call(&EchoRequest::Echo("hi".into()), T)
                .await
                .expect("echo"),
            "Node:hi"
        );
        assert!(
            connect(tls::token_client_config().expect("tls"))
                .await
                .is_err(),
            "a node without a client certificate"
        );
        let worker = ClientAuth {
            token: identity.token().clone(),
            role: Role::Worker,
        };
        let config = endpoint::client_config(tls::token_client_config().expect("tls"), &limits)
            .expect("client config");
        RpcClient::<EchoRequest, String>::connect(
            &client_ep,
            config,
            addr,
            crate::NODE_SERVER_NAME,
            &worker,
            &limits,
        )
        .await
        .expect("a worker proves the token without a certificate");
        let other = ClusterIdentity::generate().expect("other cluster");
        let foreign = other
            .issue_node_cert(NodeId::random())
            .expect("foreign cert");
        assert!(
            connect(tls::mtls_client_config(&foreign, &other.ca_cert_der()).expect("tls"))
                .await
                .is_err(),
            "a certificate from another cluster's CA"
        );
        shutdown.cancel();
        task.await.expect("server task");
    }

    #[tokio::test]
    async fn shutdown_closes_connections() {
        let server = start(vec![Role::Node]);
        let client = server.client(Role::Node).await.expect("connect");
        server.stop().await;
        let err = client
            .call(&EchoRequest::Echo("late".into()), T)
            .await
            .expect_err("closed");
        assert!(
            err.is_connection_lost() || matches!(err, RpcError::Stream(_)),
            "{err:?}"
        );
    }

    /// A client of a loopback address on this host goes through the server's
    /// Unix socket and sees exactly what a QUIC client sees: replies by id,
    /// typed errors, deadlines, many requests at once. A node daemon's
    /// connection stays on QUIC (it must show its certificate).
    #[tokio::test]
    async fn same_host_clients_use_the_unix_socket_with_the_same_semantics() {
        let server = start_same_host(vec![Role::Driver, Role::Node]);
        let client = server.client(Role::Driver).await.expect("connect");
        assert!(client.is_same_host(), "{client:?}");
        assert_eq!(client.remote_address(), server.addr);
        for i in 0..20 {
            let reply = client
                .call(&EchoRequest::Echo(i.to_string()), T)
                .await
                .expect("echo");
            assert_eq!(reply, format!("Driver:{i}"));
        }
        let err = client.call(&EchoRequest::Fail, T).await.expect_err("fails");
        assert!(
            matches!(
                err,
                RpcError::Service(ServiceError {
                    kind: ServiceErrorKind::NotFound,
                    ..
                })
            ),
            "{err:?}"
        );
        let calls = (0..200).map(|i| {
            let client = client.clone();
            async move { client.call(&EchoRequest::Echo(i.to_string()), T).await }
        });
        for (i, reply) in futures_join_all(calls).await.into_iter().enumerate() {
            assert_eq!(reply.expect("reply"), format!("Driver:{i}"));
        }
        let err = client
            .call(&EchoRequest::Sleep(5_000), Duration::from_millis(100))
            .await
            .expect_err("times out");
        assert!(matches!(err, RpcError::Timeout(_)), "{err:?}");
        assert_eq!(
            client
                .call(&EchoRequest::Echo("after".into()), T)
                .await
                .expect("echo"),
            "Driver:after"
        );
        let node = server.client(Role::Node).await.expect("node connects");
        assert!(!node.is_same_host(), "{node:?}");
        assert_eq!(
            node.call(&EchoRequest::Echo("n".into()), T)
                .await
                .expect("echo"),
            "Node:n"
        );
        client.close();
        assert!(client.close_reason().is_some());
        let err = client
            .call(&EchoRequest::Echo("closed".into()), T)
            .await
            .expect_err("closed");
        assert!(err.is_connection_lost(), "{err:?}");
        server.stop().await;
    }

    /// A server that stops ends its same-host connections: the client sees
    /// the connection lost, as with QUIC, instead of waiting for deadlines.
    #[tokio::test]
    async fn a_stopped_server_ends_its_same_host_connections() {
        let server = start_same_host(vec![Role::Driver]);
        let client = server.client(Role::Driver).await.expect("connect");
        assert!(client.is_same_host());
        let pending = {
            let client = client.clone();
            tokio::spawn(async move { client.call(&EchoRequest::Sleep(60_000), T * 12).await })
        };
        server.stop().await;
        let err = tokio::time::timeout(T, pending)
            .await
            .expect("the pending call ends with the server")
            .expect("task")
            .expect_err("no reply");
        assert!(err.is_connection_lost(), "{err:?}");
        assert!(client.close_reason().is_some());
    }

    fn faulty(spec: &str) -> Option<crate::faults::Faults> {
        Some(crate::faults::Faults::from_spec(spec, 1).expect("spec"))
    }

    fn assert_injected(err: &RpcError, side: &str) {
        match err {
            RpcError::Injected(message) => {
                assert!(message.starts_with(&format!("Echo {side}:")), "{err}");
            }
            other => panic!("expected an injected fault, got {other:?}"),
        }
        assert!(!err.is_connection_lost(), "{err:?}");
    }

    /// A request fault fails the call without sending anything: the
    /// server's handler never runs, and the next request goes through.
    /// Other methods are untouched. Over QUIC and the same-host socket.
    #[tokio::test]
    async fn an_injected_request_fault_never_reaches_the_server() {
        for server in [
            start(vec![Role::Driver]),
            start_same_host(vec![Role::Driver]),
        ] {
            let client = server
                .client(Role::Driver)
                .await
                .expect("connect")
                .with_faults(faulty("Echo=req:1"));
            let err = client
                .call(&EchoRequest::Echo("a".into()), T)
                .await
                .expect_err("dropped");
            assert_injected(&err, "req");
            assert_eq!(server.handled(), 0, "the handler did not run");
            let err = client.call(&EchoRequest::Fail, T).await.expect_err("fails");
            assert!(matches!(err, RpcError::Service(_)), "{err:?}");
            assert_eq!(
                client
                    .call(&EchoRequest::Echo("b".into()), T)
                    .await
                    .expect("the second goes through"),
                "Driver:b"
            );
            assert_eq!(server.handled(), 2);
            server.stop().await;
        }
    }

    /// A reply fault sends the request and lets the handler run, then
    /// discards the reply; the connection stays usable.
    #[tokio::test]
    async fn an_injected_reply_fault_runs_the_handler_and_discards_the_reply() {
        for server in [
            start(vec![Role::Driver]),
            start_same_host(vec![Role::Driver]),
        ] {
            let client = server
                .client(Role::Driver)
                .await
                .expect("connect")
                .with_faults(faulty("Echo=rep:1"));
            let err = client
                .call(&EchoRequest::Echo("a".into()), T)
                .await
                .expect_err("discarded");
            assert_injected(&err, "rep");
            assert_eq!(server.handled(), 1, "the handler ran");
            // Through `send` and `InFlight::reply` too, on a clone sharing
            // the counters: the fault was used up.
            let reply = client
                .clone()
                .send(&EchoRequest::Echo("b".into()), T)
                .await
                .expect("sent")
                .reply()
                .await
                .expect("the second goes through");
            assert_eq!(reply, "Driver:b");
            assert_eq!(server.handled(), 2);
            server.stop().await;
        }
    }

    /// `send_then` (same-host only): a request fault is `Some(Err)` with
    /// the callback never called; a reply fault reaches the callback as an
    /// error after the handler ran.
    #[tokio::test]
    async fn send_then_injects_both_faults() {
        let server = start_same_host(vec![Role::Driver]);
        let client = server
            .client(Role::Driver)
            .await
            .expect("connect")
            .with_faults(faulty("Echo=req:1,rep:1"));
        assert!(client.is_same_host());
        let send_then = |text: &str| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = client.send_then(&EchoRequest::Echo(text.into()), T, move |reply| {
                let _ = tx.send(reply);
            });
            (sent, rx)
        };
        let (sent, rx) = send_then("a");
        assert_injected(&sent.expect("same host").expect_err("dropped"), "req");
        assert!(rx.await.is_err(), "the callback is dropped uncalled");
        assert_eq!(server.handled(), 0);
        let (sent, rx) = send_then("b");
        sent.expect("same host").expect("sent");
        let reply = tokio::time::timeout(T, rx)
            .await
            .expect("answered")
            .expect("callback called");
        assert_injected(&reply.expect_err("discarded"), "rep");
        assert_eq!(server.handled(), 1);
        let (sent, rx) = send_then("c");
        sent.expect("same host").expect("sent");
        let reply = tokio::time::timeout(T, rx)
            .await
            .expect("answered")
            .expect("callback called");
        assert_eq!(reply.expect("goes through"), "Driver:c");
        assert_eq!(server.handled(), 2);
        server.stop().await;
    }

    /// A client told to inject nothing injects nothing, whatever the
    /// process's environment says.
    #[tokio::test]
    async fn a_client_without_faults_is_untouched() {
        let server = start(vec![Role::Driver]);
        let client = server
            .client(Role::Driver)
            .await
            .expect("connect")
            .with_faults(None);
        for i in 0..5 {
            client
                .call(&EchoRequest::Echo(i.to_string()), T)
                .await
                .expect("echo");
        }
        assert_eq!(server.handled(), 5);
        server.stop().await;
    }
}
