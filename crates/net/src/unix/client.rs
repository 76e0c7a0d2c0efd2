//! The client's side of a same-host connection: the handshake, the
//! [`Link`] requests go out on, its keep-alives and the task that hands
//! replies to their waiters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use shoal_proto::codec::{self, CodecLimits};
use shoal_proto::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    binding, candidates, nonce, read_message, read_plain_body, same_user, write_loop, Outgoing,
    Writer, NONCE_LEN, PING,
};
use crate::error::ConnectError;
use crate::handshake::{self, ClientAuth, ReplyRejected};
use crate::limits::NetLimits;
use crate::sync::MutexExt;

/// Called on the reading task with a reply's body, or why the connection
/// ended first.
pub(crate) type Then = Box<dyn FnOnce(Result<Vec<u8>, quinn::ConnectionError>) + Send>;

/// Who gets a reply.
pub(super) enum Waiter {
    /// A task awaiting [`Awaiting::body`].
    Task(oneshot::Sender<Vec<u8>>),
    /// A callback ([`Link::send_then`]).
    Then(Then),
}

/// What the client's reading task shares with senders.
#[derive(Default)]
pub(super) struct Shared {
    /// Reply bodies awaited, by request id.
    pending: Mutex<HashMap<u64, Waiter>>,
    /// Why the connection ended, once it has.
    lost: OnceLock<quinn::ConnectionError>,
}

impl Shared {
    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
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
    let failed = |reason: String| ConnectError::handshake(addr, reason);
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
    let node_id = tokio::time::timeout(
        limits.handshake_timeout,
        client_handshake(&mut stream, &name, auth, addr),
    )
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
    tokio::spawn(keep_alive(
        writer.clone(),
        frames.clone(),
        stop.clone(),
        limits.keep_alive_interval,
    ));
    let link = Arc::new(Link {
        shared,
        frames,
        writer,
        stop,
    });
    Ok((link, node_id))
}

/// The client's side of the handshake on `stream`, connected to `name` for
/// the server on `addr`: the server's `node_id` if it proved the token.
pub(super) async fn client_handshake(
    stream: &mut UnixStream,
    name: &str,
    auth: &ClientAuth,
    addr: SocketAddr,
) -> Result<Option<NodeId>, ConnectError> {
    let failed = |reason: String| ConnectError::handshake(addr, reason);
    let mut server_nonce = [0u8; NONCE_LEN];
    stream
        .read_exact(&mut server_nonce)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let client_nonce = nonce().map_err(|e| failed(e.to_string()))?;
    let bound = binding(name, &server_nonce, &client_nonce, auth.role.tag());
    let hello = handshake::client_hello(auth, &bound);
    let mut out = client_nonce.to_vec();
    codec::encode_frame(&hello, &CodecLimits::HANDSHAKE, &mut out)
        .map_err(|e| failed(e.to_string()))?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let body = read_plain_body(stream, &CodecLimits::HANDSHAKE)
        .await
        .map_err(|e| failed(e.to_string()))?;
    match handshake::judge_hello_reply(&auth.token, &body, &bound) {
        Ok(node_id) => Ok(node_id),
        Err(ReplyRejected::Malformed(e)) => Err(failed(e.to_string())),
        Err(ReplyRejected::NotAuthenticated) => Err(ConnectError::ServerNotAuthenticated {
            addr: addr.to_string(),
        }),
        Err(ReplyRejected::Refused(refusal)) => Err(ConnectError::Refused {
            addr: addr.to_string(),
            refusal,
        }),
    }
}

/// Queues a [`PING`] every `every` until the connection ends, so the server
/// does not take a quiet client for a gone one (QUIC's keep-alives). Queued,
/// never written directly: it cannot land inside another frame.
async fn keep_alive(
    writer: Arc<Writer>,
    frames: mpsc::UnboundedSender<Outgoing>,
    stop: CancellationToken,
    every: Duration,
) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now: the handshake was traffic enough.
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let ping = Outgoing {
            frame: PING.to_vec(),
            _slot: None,
            rest: false,
        };
        if !writer.send(&frames, ping, false) {
            return;
        }
    }
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
            message = read_message(&mut read, &codec, None) => message,
        };
        match message {
            Ok((_, body)) if body.is_empty() => {}
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
