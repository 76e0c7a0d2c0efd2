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
//! The bounds are the QUIC path's. A frame's length is checked against the
//! limits and its buffer grows as the bytes arrive. A server takes at most
//! `handshakes_max` connections in their handshake and
//! `same_host_connections_max` in all, closing others at once (their
//! clients use QUIC); the handshake must finish within `handshake_timeout`,
//! and a connection on which nothing arrives for `idle_timeout` is closed.
//! Clients keep theirs alive: every `keep_alive_interval` they send a frame
//! with an empty body (a [`PING`]), which the server skips. The client side
//! is in `client`.
//!
//! `NetLimits::same_host_sockets` (off with `SHOAL_LOCAL_SOCKETS=0`) turns the
//! whole path off: QUIC everywhere.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use shoal_proto::codec::{self, CodecLimits, LEN_PREFIX};
use shoal_proto::{DecodeError, ReplyEnvelope, RequestEnvelope, ServiceError, ServiceErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::handshake::{self, HandshakeFailure, HandshakeStats, ServerAuth};
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
pub(crate) fn binding(
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
    /// No byte arrived for this long.
    Idle(Duration),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Decode(e) => write!(f, "{e}"),
            ReadError::Idle(after) => write!(f, "nothing received for {after:?}"),
        }
    }
}

/// A keep-alive: a message frame with an empty body (no request or reply
/// encodes to nothing). Clients send one every `keep_alive_interval`; the
/// server reads it as traffic and skips it.
const PING: [u8; HEADER_LEN] = [0; HEADER_LEN];

/// Buffer for a frame's body before any of it has arrived.
const BODY_FIRST_BYTES: usize = 64 << 10;
/// Past this much of a body, the rest is reserved at once.
const BODY_RESERVE_AFTER_BYTES: usize = 1 << 20;

/// Awaits one read of at least a byte, failing after `idle` without one.
async fn within(
    idle: Option<Duration>,
    read: impl std::future::Future<Output = std::io::Result<usize>>,
) -> Result<usize, ReadError> {
    let n = match idle {
        Some(after) => tokio::time::timeout(after, read)
            .await
            .map_err(|_| ReadError::Idle(after))?,
        None => read.await,
    }
    .map_err(ReadError::Io)?;
    if n == 0 {
        return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(n)
}

/// Fills `buf` from `io`.
async fn read_full(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
    idle: Option<Duration>,
) -> Result<(), ReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        filled += within(idle, io.read(&mut buf[filled..])).await?;
    }
    Ok(())
}

/// Reads a body of `len` bytes (already checked against the limits),
/// growing the buffer as bytes arrive rather than trusting the claimed
/// length, as `rpc::read_frame` does: a peer that claims 16 MiB and sends
/// nothing costs 64 KiB. Past the first MiB the rest is reserved at once
/// (a large body is not copied again at each doubling).
async fn read_body(
    io: &mut (impl AsyncRead + Unpin),
    len: usize,
    idle: Option<Duration>,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::with_capacity(len.min(BODY_FIRST_BYTES));
    while body.len() < len {
        let rest = len - body.len();
        if body.len() >= BODY_RESERVE_AFTER_BYTES {
            body.reserve_exact(rest);
        } else if body.len() == body.capacity() {
            body.reserve_exact(rest.min(body.len()));
        }
        let want = rest.min(body.capacity() - body.len());
        // Into the spare capacity, no further: the next frame's bytes stay
        // in `io`.
        let mut limited = (&mut *io).take(want as u64);
        within(idle, limited.read_buf(&mut body)).await?;
    }
    Ok(body)
}

/// Reads one plain frame's body (after its length prefix), as in the
/// handshake, undecoded: `handshake::judge_same_host_hello` and
/// `judge_hello_reply` decode and judge it.
async fn read_plain_body(
    io: &mut (impl AsyncRead + Unpin),
    limits: &CodecLimits,
) -> Result<Vec<u8>, ReadError> {
    let mut prefix = [0u8; LEN_PREFIX];
    read_full(io, &mut prefix, None).await?;
    let len = codec::frame_len(prefix, limits).map_err(|e| ReadError::Decode(e.into()))?;
    read_body(io, len, None).await
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

/// Reads one message frame: its id and body (empty for a [`PING`]). The
/// length is checked against `limits` before any of the body is read.
/// With `idle`, fails when no byte arrives for that long.
async fn read_message(
    io: &mut (impl AsyncRead + Unpin),
    limits: &CodecLimits,
    idle: Option<Duration>,
) -> Result<(u64, Vec<u8>), ReadError> {
    let mut header = [0u8; HEADER_LEN];
    read_full(io, &mut header, idle).await?;
    let (id, prefix) = header.split_at(8);
    let id = u64::from_be_bytes(id.try_into().unwrap_or_default());
    let len = codec::frame_len(prefix.try_into().unwrap_or_default(), limits)
        .map_err(|e| ReadError::Decode(e.into()))?;
    let body = read_body(io, len, idle).await?;
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
/// stream would not have opened either, so it cannot run after a retry
/// (keep-alives always are).
async fn write_loop(
    io: Arc<Writer>,
    mut frames: mpsc::UnboundedReceiver<Outgoing>,
    stop: CancellationToken,
    awaited: Option<Arc<Shared>>,
) {
    let wanted = |out: &Outgoing| match (&awaited, out.frame.first_chunk::<8>()) {
        _ if out.rest || out.frame.len() == HEADER_LEN => true,
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
/// connection (see [`crate::rpc::serve`]). As there, at most
/// `handshakes_max` are in their handshake at once and each must finish it
/// within `handshake_timeout`; at most `same_host_connections_max` are open
/// at once. A connection past either bound is closed at once (its client
/// goes on over QUIC).
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
    let open = Arc::new(Semaphore::new(limits.same_host_connections_max.max(1)));
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
        // Dropping the stream closes it: the peer reads the end at once.
        let Ok(held) = open.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!("same-host connection refused: too many open");
            continue;
        };
        let Ok(slot) = handshakes.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!("same-host connection refused: too many in their handshake");
            continue;
        };
        tracker.spawn(serve_connection(
            stream,
            Arc::clone(&listener.name),
            Slots {
                handshake: slot,
                _open: held,
            },
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
        read_plain_body(stream, &CodecLimits::HANDSHAKE).await
    };
    let verdict = match read.await {
        Ok(body) => {
            handshake::judge_same_host_hello(auth, name, &server_nonce, &client_nonce, &body)
        }
        Err(ReadError::Decode(e)) => Err(handshake::malformed(e)),
        Err(e) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(HandshakeFailure::Stream(e.to_string()));
        }
    };
    let reply = handshake::server_reply(auth, &verdict);
    let sent = write_plain(stream, &reply, &CodecLimits::HANDSHAKE).await;
    match verdict {
        Ok(accepted) => {
            sent.map_err(|e| HandshakeFailure::Stream(e.to_string()))?;
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            Ok(accepted.role)
        }
        Err(refusal) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            Err(HandshakeFailure::Refused(refusal))
        }
    }
}

/// What a connection holds of the listener's bounds.
struct Slots {
    /// Given back when the handshake ends.
    handshake: tokio::sync::OwnedSemaphorePermit,
    /// Given back when the connection ends.
    _open: tokio::sync::OwnedSemaphorePermit,
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S: Service>(
    mut stream: UnixStream,
    name: Arc<str>,
    slots: Slots,
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
    drop(slots.handshake);
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
    // A peer that sends nothing, not even its keep-alives, for this long is
    // gone (as QUIC's idle timeout decides). Only reading counts: while
    // `streams_max` requests are in flight nothing is read and nothing
    // times out.
    let idle = Some(limits.idle_timeout).filter(|t| !t.is_zero());
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
            message = read_message(&mut read, &codec, idle) => message,
        };
        let (id, body) = match message {
            // A keep-alive.
            Ok((_, body)) if body.is_empty() => continue,
            Ok(message) => message,
            Err(ReadError::Io(e)) => {
                debug!(error = %e, "same-host peer gone");
                break;
            }
            Err(e @ ReadError::Idle(_)) => {
                info!(error = %e, "same-host peer idle; closing");
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
            Err(crate::rpc::undecodable(e))
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

mod client;

use client::Shared;
pub(crate) use client::{connect, Awaiting, Link};

#[cfg(test)]
mod tests;
