//! Request/reply between processes of one host over Unix-domain sockets.
//!
//! A QUIC round trip on loopback costs about 50 us here, most of it packet
//! protection, acknowledgements and the connection's timers: more than the
//! rest of a small task. Every server that [`crate::rpc::serve`]s therefore
//! also listens on an abstract Unix socket named after its bound address
//! (`\0shoal/1/0.0.0.0:PORT`), and [`crate::rpc::RpcClient::connect`] to an
//! address on this host (loopback, or one of this network namespace's
//! interfaces) tries it first. Abstract names live in the network
//! namespace, as those addresses do, so the socket is reachable exactly
//! where a connection to the address would stay on this host; they leave no
//! file behind when a process dies.
//!
//! The handshake is the QUIC one with the TLS binding replaced: the server
//! sends a fresh 32-byte nonce, the client one of its own and its `Hello`;
//! both proofs are HMACs over SHA-256(label, nonces, role), so a proof is
//! good for one connection only. Roles that must show a certificate (nodes
//! talking to nodes) are refused here; node daemons keep to QUIC.
//!
//! After the handshake each message is one frame: the request id (8 bytes),
//! the usual length prefix and a [`RequestEnvelope`] or [`ReplyEnvelope`]
//! body. Requests are served concurrently (up to `streams_max` per
//! connection, then the server stops reading); replies go back as they are
//! ready, matched by id. One task per direction writes, gathering whatever
//! frames are queued into one `write` call. A client may instead write a
//! request straight from its own thread when nothing is queued or being
//! written ([`Link::send_then`]), and have the reply handed to a callback
//! on the reading task: a round trip then wakes no task of the client's
//! runtime but the reader.
//!
//! `NetLimits::same_host_sockets` (off with `SHOAL_LOCAL_SOCKETS=0`) turns the
//! whole path off: QUIC everywhere.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::codec::{self, CodecLimits, LEN_PREFIX};
use shoal_proto::{
    DecodeError, HandshakeRefusal, Hello, HelloReply, NodeId, ReplyEnvelope, RequestEnvelope,
    ServiceError, ServiceErrorKind, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::ConnectError;
use crate::handshake::{
    self, ClientAuth, HandshakeFailure, HandshakeStats, ServerAuth, CLIENT_SIDE, SERVER_SIDE,
};
use crate::limits::NetLimits;
use crate::rpc::{Peer, Service, NEXT_CONNECTION_ID};
use crate::sync::MutexExt;

const NONCE_LEN: usize = 32;
const BINDING_LABEL: &[u8] = b"shoal unix hello v1";
/// Request id plus length prefix.
const HEADER_LEN: usize = 8 + LEN_PREFIX;
/// Frames gathered into one write, at most.
const GATHER_BYTES: usize = 256 << 10;

/// The abstract socket name of the server on `addr` (leading NUL: tokio binds
/// and connects such paths in the abstract namespace).
fn socket_name(addr: SocketAddr) -> String {
    format!("\0shoal/1/{addr}")
}

/// A same-host listener and the name it is bound to.
pub(crate) struct Listener {
    listener: UnixListener,
    name: Arc<str>,
}

/// Listens beside a QUIC server bound to `bound`. `None` when turned off,
/// or the name is taken (another server answers for it; clients will use
/// QUIC).
pub(crate) fn listen(bound: SocketAddr, limits: &NetLimits) -> Option<Listener> {
    if !limits.same_host_sockets {
        return None;
    }
    let name = socket_name(bound);
    match UnixListener::bind(&name) {
        Ok(listener) => Some(Listener {
            listener,
            name: name.into(),
        }),
        Err(e) => {
            debug!(%bound, error = %e, "no same-host socket; QUIC only");
            None
        }
    }
}

/// The names a client tries for a server on this host's address `addr`:
/// the address itself, then the unspecified address of its family (a server
/// bound to `0.0.0.0:PORT` answers on `127.0.0.1:PORT` and on every address
/// of the host).
fn candidates(addr: SocketAddr) -> [String; 2] {
    let any: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    [
        socket_name(addr),
        socket_name(SocketAddr::new(any, addr.port())),
    ]
}

/// What the proofs are bound to: the socket name as each side knows it (the
/// name the client connected to, the name the server bound), so a process
/// that binds a name the server left free and relays to the real one gets
/// proofs that do not match; the nonces, so a proof is good for one
/// connection; and the role.
fn binding(
    name: &str,
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    role: u8,
) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(BINDING_LABEL);
    ctx.update(&(name.len() as u64).to_be_bytes());
    ctx.update(name.as_bytes());
    ctx.update(server_nonce);
    ctx.update(client_nonce);
    ctx.update(&[role]);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// This process's user id (the owner of `/proc/self`).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    static UID: OnceLock<Option<u32>> = OnceLock::new();
    *UID.get_or_init(|| std::fs::metadata("/proc/self").ok().map(|m| m.uid()))
}

/// Whether the process at the other end of `stream` runs as this user:
/// the only peers either side takes on this path (another user's process
/// that took a name first is not talked to; QUIC with TLS remains).
fn same_user(stream: &UnixStream) -> bool {
    match (stream.peer_cred(), own_uid()) {
        (Ok(peer), Some(me)) => peer.uid() == me,
        _ => false,
    }
}

fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| std::io::Error::other("no system randomness"))?;
    Ok(out)
}

/// Why a frame could not be read.
#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Decode(DecodeError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Decode(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one plain frame (length prefix and body), as in the handshake.
async fn read_plain<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
    limits: &CodecLimits,
) -> Result<T, ReadError> {
    let mut prefix = [0u8; LEN_PREFIX];
    io.read_exact(&mut prefix).await.map_err(ReadError::Io)?;
    let len = codec::frame_len(prefix, limits).map_err(|e| ReadError::Decode(e.into()))?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.map_err(ReadError::Io)?;
    codec::decode(&body, limits).map_err(ReadError::Decode)
}

async fn write_plain<T: Serialize>(
    io: &mut (impl AsyncWrite + Unpin),
    msg: &T,
    limits: &CodecLimits,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(128);
    codec::encode_frame(msg, limits, &mut buf).map_err(std::io::Error::other)?;
    io.write_all(&buf).await
}

/// Reads one message frame: its id and body. The length is checked against
/// `limits` before the body's buffer is allocated.
async fn read_message(
    io: &mut (impl AsyncRead + Unpin),
    limits: &CodecLimits,
) -> Result<(u64, Vec<u8>), ReadError> {
    let mut header = [0u8; HEADER_LEN];
    io.read_exact(&mut header).await.map_err(ReadError::Io)?;
    let (id, prefix) = header.split_at(8);
    let id = u64::from_be_bytes(id.try_into().unwrap_or_default());
    let len = codec::frame_len(prefix.try_into().unwrap_or_default(), limits)
        .map_err(|e| ReadError::Decode(e.into()))?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.map_err(ReadError::Io)?;
    Ok((id, body))
}

/// Encodes one message frame.
pub(crate) fn encode_message<T: Serialize>(
    id: u64,
    msg: &T,
    limits: &CodecLimits,
) -> Result<Vec<u8>, shoal_proto::EncodeError> {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&id.to_be_bytes());
    codec::encode_frame(msg, limits, &mut buf)?;
    Ok(buf)
}

/// A frame queued for writing, with what must live until it is written.
struct Outgoing {
    frame: Vec<u8>,
    /// On a server: the in-flight slot of the request this answers, so a
    /// peer that does not read its replies stops getting requests served
    /// instead of piling replies up here.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The rest of a frame whose start was written directly: written
    /// whatever happens, or the stream would be cut mid-frame.
    rest: bool,
}

/// The writing side of a connection, shared by its writer task and (on a
/// client) the threads that write requests directly.
struct Writer {
    io: OwnedWriteHalf,
    state: Mutex<WriterState>,
}

#[derive(Default)]
struct WriterState {
    /// Frames in the writer task's queue.
    queued: usize,
    /// The writer task is writing (its frames are not all out yet).
    writing: bool,
}

impl Writer {
    fn new(io: OwnedWriteHalf) -> Arc<Self> {
        Arc::new(Self {
            io,
            state: Mutex::new(WriterState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.locked()
    }

    /// Writes all of `bytes` (the writer task's way).
    async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            self.io.writable().await?;
            match self.io.try_write(bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues `out` for the writer task, or, when `direct` and nothing is
    /// queued or being written, writes it from this thread (what the
    /// socket does not take at once is queued). False if the writer task
    /// has ended.
    fn send(
        &self,
        queue: &mpsc::UnboundedSender<Outgoing>,
        mut out: Outgoing,
        direct: bool,
    ) -> bool {
        let mut state = self.state();
        if direct && state.queued == 0 && !state.writing {
            match self.io.try_write(&out.frame) {
                Ok(n) if n == out.frame.len() => return true,
                Ok(n) => {
                    out.frame.drain(..n);
                    out.rest = n > 0;
                }
                // Full, or failed: the writer task finds out and ends.
                Err(_) => {}
            }
        }
        state.queued += 1;
        queue.send(out).is_ok()
    }
}

/// Writes queued frames until the queue closes, `stop` is cancelled or the
/// socket fails; then cancels `stop` so the reading side ends too. On a
/// client, `awaited` says which requests are still waited for: one given up
/// (its deadline passed while queued) is not sent, as with QUIC, where its
/// stream would not have opened either, so it cannot run after a retry.
async fn write_loop(
    io: Arc<Writer>,
    mut frames: mpsc::UnboundedReceiver<Outgoing>,
    stop: CancellationToken,
    awaited: Option<Arc<Shared>>,
) {
    let wanted = |out: &Outgoing| match (&awaited, out.frame.first_chunk::<8>()) {
        _ if out.rest => true,
        (Some(shared), Some(id)) => shared.pending().contains_key(&u64::from_be_bytes(*id)),
        _ => true,
    };
    // Takes the next queued frame, marking the writer busy with it.
    let take = |frame: Option<Outgoing>| {
        if frame.is_some() {
            let mut state = io.state();
            state.queued = state.queued.saturating_sub(1);
            state.writing = true;
        }
        frame
    };
    let mut gathered = Vec::new();
    let mut written = Vec::new();
    loop {
        io.state().writing = false;
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            first = frames.recv() => match take(first) {
                Some(first) => first,
                None => break,
            },
        };
        // One frame alone (a round trip's): written as it is, no copy.
        let second = match take(frames.try_recv().ok()) {
            Some(second) => second,
            None => {
                if wanted(&first) && io.write_all(&first.frame).await.is_err() {
                    break;
                }
                continue;
            }
        };
        gathered.clear();
        if wanted(&first) {
            gathered.extend_from_slice(&first.frame);
            written.push(first);
        }
        let mut next = Some(second);
        while let Some(out) = next.take() {
            if wanted(&out) {
                gathered.extend_from_slice(&out.frame);
                written.push(out);
            }
            if gathered.len() < GATHER_BYTES {
                next = take(frames.try_recv().ok());
            }
        }
        if gathered.is_empty() {
            continue;
        }
        if io.write_all(&gathered).await.is_err() {
            break;
        }
        // Written: their slots are free again.
        written.clear();
        if gathered.capacity() > 4 * GATHER_BYTES {
            gathered = Vec::new();
        }
    }
    stop.cancel();
}

// ---------------------------------------------------------------- server

/// Accepts same-host connections until `shutdown`, serving each like a QUIC
/// connection (see [`crate::rpc::serve`]).
pub(crate) async fn serve_listener<S: Service>(
    listener: Listener,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let handshakes = Arc::new(Semaphore::new(limits.handshakes_max.max(1)));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    warn!(error = %e, "cannot accept a same-host connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !same_user(&stream) {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            info!("same-host connection from another user refused");
            continue;
        }
        let Ok(slot) = handshakes.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tracker.spawn(serve_connection(
            stream,
            Arc::clone(&listener.name),
            slot,
            service.clone(),
            auth.clone(),
            limits.clone(),
            stats.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
}

async fn server_handshake(
    stream: &mut UnixStream,
    name: &str,
    auth: &ServerAuth,
    stats: &HandshakeStats,
) -> Result<shoal_proto::Role, HandshakeFailure> {
    let server_nonce = nonce().map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
    stream
        .write_all(&server_nonce)
        .await
        .map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
    let mut client_nonce = [0u8; NONCE_LEN];
    let read = async {
        stream
            .read_exact(&mut client_nonce)
            .await
            .map_err(ReadError::Io)?;
        read_plain::<Hello>(stream, &CodecLimits::HANDSHAKE).await
    };
    let verdict = match read.await {
        Ok(hello) => {
            let bound = binding(name, &server_nonce, &client_nonce, hello.role.tag());
            handshake::check_hello(auth, &hello, false, Some(bound)).map(|()| hello.role)
        }
        Err(ReadError::Decode(e)) => Err(HandshakeRefusal::Malformed(e.to_string())),
        Err(ReadError::Io(e)) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(HandshakeFailure::Stream(e.to_string()));
        }
    };
    let reply = match &verdict {
        Ok(role) => HelloReply::Welcome {
            server_proof: handshake::proof(
                &auth.token,
                SERVER_SIDE,
                &binding(name, &server_nonce, &client_nonce, role.tag()),
            ),
            node_id: auth.node_id(),
        },
        Err(refusal) => HelloReply::Refused(refusal.clone()),
    };
    let sent = write_plain(stream, &reply, &CodecLimits::HANDSHAKE).await;
    match verdict {
        Ok(role) => {
            sent.map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(role)
        }
        Err(refusal) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            Err(HandshakeFailure::Refused(refusal))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S: Service>(
    mut stream: UnixStream,
    name: Arc<str>,
    handshake_slot: tokio::sync::OwnedSemaphorePermit,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let shaken = tokio::time::timeout(
        limits.handshake_timeout,
        server_handshake(&mut stream, &name, &auth, &stats),
    );
    let role = match shaken.await {
        Ok(Ok(role)) => role,
        Ok(Err(e)) => {
            info!(error = %e, "same-host handshake failed");
            return;
        }
        Err(_) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            info!("same-host handshake timed out");
            return;
        }
    };
    drop(handshake_slot);
    let peer = Peer {
        role,
        remote: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
        connection_id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
    };
    debug!(?role, "same-host peer connected");
    let (read, write) = stream.into_split();
    let (replies, queued) = mpsc::unbounded_channel();
    let writer = Writer::new(write);
    let stop = shutdown.child_token();
    tracker.spawn(write_loop(writer.clone(), queued, stop.clone(), None));
    let codec = limits.codec();
    let in_flight = Arc::new(Semaphore::new(limits.streams_max.max(1) as usize));
    let mut read = BufReader::with_capacity(64 << 10, read);
    loop {
        // Past `streams_max` requests in flight, stop reading: the peer's
        // writes block, as a QUIC peer's `open_bi` would.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = in_flight.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = read_message(&mut read, &codec) => message,
        };
        let (id, body) = match message {
            Ok(message) => message,
            Err(ReadError::Io(e)) => {
                debug!(error = %e, "same-host peer gone");
                break;
            }
            Err(ReadError::Decode(e)) => {
                // The framing itself is broken: nothing after it can be trusted.
                warn!(error = %e, "bad frame from a same-host peer; closing");
                break;
            }
        };
        let request = serve_request(service.clone(), peer.clone(), id, body, limits.clone());
        // Weak: a request still running after the connection ended must not
        // keep its socket open.
        let (replies, writer) = (replies.clone(), Arc::downgrade(&writer));
        // As over QUIC, a request runs to its end (or its deadline) even if
        // the peer goes: only the server's shutdown cuts it short.
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Some(frame) = shutdown.run_until_cancelled(request).await {
                let out = Outgoing {
                    frame,
                    _slot: Some(permit),
                    rest: false,
                };
                if let Some(writer) = writer.upgrade() {
                    writer.send(&replies, out, false);
                }
            }
        });
    }
    stop.cancel();
    service.disconnected(&peer);
}

/// Answers one request; returns the reply frame.
async fn serve_request<S: Service>(
    service: Arc<S>,
    peer: Peer,
    id: u64,
    body: Vec<u8>,
    limits: NetLimits,
) -> Vec<u8> {
    let codec = limits.codec();
    let decoded = codec::decode::<RequestEnvelope<S::Request>>(&body, &codec);
    drop(body);
    let result = match decoded {
        Err(e) => {
            warn!(error = %e, "undecodable same-host request");
            Err(ServiceError::new(
                ServiceErrorKind::BadRequest,
                e.to_string(),
            ))
        }
        Ok(request) => crate::rpc::answer(&*service, &peer, request, &limits).await,
    };
    let reply = ReplyEnvelope { id, result };
    match encode_message(id, &reply, &codec) {
        Ok(frame) => frame,
        Err(e) => {
            warn!(error = %e, "reply cannot be encoded");
            let fallback: ReplyEnvelope<S::Reply> = ReplyEnvelope {
                id,
                result: Err(ServiceError::new(ServiceErrorKind::Internal, e.to_string())),
            };
            // An error reply is small; if even it fails the caller times out.
            encode_message(id, &fallback, &codec).unwrap_or_default()
        }
    }
}

// ---------------------------------------------------------------- client

/// Called on the reading task with a reply's body, or why the connection
/// ended first.
pub(crate) type Then = Box<dyn FnOnce(Result<Vec<u8>, quinn::ConnectionError>) + Send>;

/// Who gets a reply.
enum Waiter {
    /// A task awaiting [`Awaiting::body`].
    Task(oneshot::Sender<Vec<u8>>),
    /// A callback ([`Link::send_then`]).
    Then(Then),
}

/// What the client's reading task shares with senders.
#[derive(Default)]
struct Shared {
    /// Reply bodies awaited, by request id.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Why the connection ended, once it has.
    lost: OnceLock<quinn::ConnectionError>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.pending.locked()
    }

    /// Hands a reply to its waiter (outside the table's lock).
    fn answer(&self, id: u64, body: Vec<u8>) {
        let waiter = self.pending().remove(&id);
        match waiter {
            Some(Waiter::Task(tx)) => {
                let _ = tx.send(body);
            }
            Some(Waiter::Then(then)) => then(Ok(body)),
            None => {}
        }
    }

    /// Marks the connection lost and fails every waiting request.
    fn end(&self, why: quinn::ConnectionError) {
        let _ = self.lost.set(why.clone());
        let waiters: Vec<Waiter> = self.pending().drain().map(|(_, w)| w).collect();
        for waiter in waiters {
            if let Waiter::Then(then) = waiter {
                then(Err(why.clone()));
            }
        }
    }
}

/// A client's same-host connection; dropping the last handle closes it.
pub(crate) struct Link {
    shared: Arc<Shared>,
    frames: mpsc::UnboundedSender<Outgoing>,
    writer: Arc<Writer>,
    stop: CancellationToken,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A reply still to come on a [`Link`].
pub(crate) struct Awaiting {
    link: Arc<Link>,
    id: u64,
    reply: oneshot::Receiver<Vec<u8>>,
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        // Given up (a deadline): do not keep a slot for a reply nobody reads.
        self.link.shared.pending().remove(&self.id);
    }
}

impl Awaiting {
    /// The reply's body, or why the connection ended.
    pub(crate) async fn body(&mut self) -> Result<Vec<u8>, quinn::ConnectionError> {
        match (&mut self.reply).await {
            Ok(body) => Ok(body),
            Err(_) => Err(self.link.lost()),
        }
    }
}

impl Link {
    fn lost(&self) -> quinn::ConnectionError {
        self.shared
            .lost
            .get()
            .cloned()
            .unwrap_or(quinn::ConnectionError::LocallyClosed)
    }

    /// Why the connection ended, once it has.
    pub(crate) fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.shared.lost.get().cloned()
    }

    /// Queues a request frame; the reply arrives through the returned handle.
    pub(crate) fn send(
        self: &Arc<Self>,
        id: u64,
        frame: Vec<u8>,
    ) -> Result<Awaiting, quinn::ConnectionError> {
        let (tx, rx) = oneshot::channel();
        // Register before checking for loss: the reader marks the loss
        // before it clears the table, so a request is never left waiting.
        self.shared.pending().insert(id, Waiter::Task(tx));
        let awaiting = Awaiting {
            link: self.clone(),
            id,
            reply: rx,
        };
        self.write(frame, false)?;
        Ok(awaiting)
    }

    /// Sends a request frame, written from this thread when the connection
    /// is idle, and has `then` called on the reading task with the reply
    /// (or with why the connection ended). `then` is not called when this
    /// returns an error: nothing was sent.
    pub(crate) fn send_then(
        &self,
        id: u64,
        frame: Vec<u8>,
        then: Then,
    ) -> Result<(), quinn::ConnectionError> {
        self.shared.pending().insert(id, Waiter::Then(then));
        let Err(e) = self.write(frame, true) else {
            return Ok(());
        };
        // Not sent: take the callback back, unless the reader has already
        // called it with the connection's end (then that was the answer).
        let taken = self.shared.pending().remove(&id);
        match taken {
            Some(_) => Err(e),
            None => Ok(()),
        }
    }

    fn write(&self, frame: Vec<u8>, direct: bool) -> Result<(), quinn::ConnectionError> {
        if let Some(lost) = self.close_reason() {
            return Err(lost);
        }
        let out = Outgoing {
            frame,
            _slot: None,
            rest: false,
        };
        if self.writer.send(&self.frames, out, direct) {
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    /// Closes the connection; waiting requests fail.
    pub(crate) fn close(&self) {
        self.shared.end(quinn::ConnectionError::LocallyClosed);
        self.stop.cancel();
    }
}

/// Connects to the same-host socket of the server on loopback `addr` and runs
/// the handshake. Errors mean "use QUIC": no such socket, or it failed.
pub(crate) async fn connect(
    addr: SocketAddr,
    auth: &ClientAuth,
    limits: &NetLimits,
) -> Result<(Arc<Link>, Option<NodeId>), ConnectError> {
    let failed = |reason: String| ConnectError::Handshake {
        addr: addr.to_string(),
        reason,
    };
    let mut found = None;
    for name in candidates(addr) {
        match UnixStream::connect(&name).await {
            Ok(stream) if same_user(&stream) => {
                found = Some((stream, name));
                break;
            }
            Ok(_) => debug!(%addr, "a same-host socket of another user; not used"),
            Err(_) => {}
        }
    }
    let (mut stream, name) = found.ok_or_else(|| failed("no same-host socket".into()))?;
    let shake = async {
        let mut server_nonce = [0u8; NONCE_LEN];
        stream
            .read_exact(&mut server_nonce)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let client_nonce = nonce().map_err(|e| failed(e.to_string()))?;
        let bound = binding(&name, &server_nonce, &client_nonce, auth.role.tag());
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: auth.token.cluster_id,
            role: auth.role,
            token_proof: handshake::proof(&auth.token, CLIENT_SIDE, &bound),
        };
        let mut out = client_nonce.to_vec();
        codec::encode_frame(&hello, &CodecLimits::HANDSHAKE, &mut out)
            .map_err(|e| failed(e.to_string()))?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let reply: HelloReply = read_plain(&mut stream, &CodecLimits::HANDSHAKE)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match reply {
            HelloReply::Welcome {
                server_proof,
                node_id,
            } if handshake::proof_matches(&auth.token, SERVER_SIDE, &bound, &server_proof) => {
                Ok(node_id)
            }
            HelloReply::Welcome { .. } => Err(ConnectError::ServerNotAuthenticated {
                addr: addr.to_string(),
            }),
            HelloReply::Refused(refusal) => Err(ConnectError::Refused {
                addr: addr.to_string(),
                refusal,
            }),
        }
    };
    let node_id = tokio::time::timeout(limits.handshake_timeout, shake)
        .await
        .map_err(|_| ConnectError::Timeout {
            what: "handshake",
            addr: addr.to_string(),
        })??;
    let (read, write) = stream.into_split();
    let (frames, queued) = mpsc::unbounded_channel();
    let writer = Writer::new(write);
    let stop = CancellationToken::new();
    let shared = Arc::new(Shared::default());
    tokio::spawn(write_loop(
        writer.clone(),
        queued,
        stop.clone(),
        Some(shared.clone()),
    ));
    tokio::spawn(read_replies(
        read,
        shared.clone(),
        stop.clone(),
        limits.codec(),
    ));
    let link = Arc::new(Link {
        shared,
        frames,
        writer,
        stop,
    });
    Ok((link, node_id))
}

/// Hands each reply to its waiting request until the connection ends.
async fn read_replies(
    read: OwnedReadHalf,
    shared: Arc<Shared>,
    stop: CancellationToken,
    codec: CodecLimits,
) {
    let mut read = BufReader::with_capacity(64 << 10, read);
    let why = loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break quinn::ConnectionError::LocallyClosed,
            message = read_message(&mut read, &codec) => message,
        };
        match message {
            Ok((id, body)) => shared.answer(id, body),
            Err(e) => {
                debug!(error = %e, "same-host connection ended");
                break quinn::ConnectionError::Reset;
            }
        }
    };
    stop.cancel();
    shared.end(why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClusterIdentity;
    use shoal_proto::Role;

    struct Upper;

    impl Service for Upper {
        type Request = String;
        type Reply = String;

        async fn handle(&self, _peer: &Peer, request: String) -> Result<String, ServiceError> {
            Ok(request.to_uppercase())
        }
    }

    const T: Duration = Duration::from_secs(5);

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
        let identity = ClusterIdentity::generate().expect("identity");
        let limits = NetLimits {
            same_host_sockets: true,
            ..NetLimits::default()
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
}
