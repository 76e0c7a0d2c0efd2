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
use crate::handshake::{self, ClientAuth, HandshakeFailure, HandshakeStats, ServerAuth};
use crate::limits::NetLimits;

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
    let mut prefix = [0u8; LEN_PREFIX];
    recv.read_exact(&mut prefix).await?;
    let len = codec::frame_len(prefix, limits).map_err(DecodeError::from)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(codec::decode(&body, limits)?)
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
        send.write_all(&buf).await?;
        Ok(())
    }
}

/// Who is on the other end of a served connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The role the peer proved.
    pub role: Role,
    /// Its address.
    pub remote: SocketAddr,
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
}

/// Serves `service` on `endpoint` until `shutdown` is cancelled: accepts
/// connections, runs the handshake on each, then answers its requests.
/// On shutdown it stops accepting, closes every connection and waits (bounded)
/// for the endpoint to go idle.
pub async fn serve<S: Service>(
    endpoint: quinn::Endpoint,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            // Stop accepting first; connections see the cancellation too.
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let conn_task = serve_connection(
                    incoming,
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

async fn serve_connection<S: Service>(
    incoming: quinn::Incoming,
    service: Arc<S>,
    auth: Arc<ServerAuth>,
    limits: NetLimits,
    stats: Arc<HandshakeStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let remote = incoming.remote_address();
    let setup = async {
        let conn = incoming.accept().map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let role = handshake::server_handshake(&conn, &auth, &stats).await;
        Ok::<_, String>((conn, role))
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
    let peer = Peer { role, remote };
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
                    return;
                }
            },
        };
        tracker.spawn(serve_request(service.clone(), peer.clone(), send, recv, limits.clone()));
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
    let request = match read_frame::<RequestEnvelope<S::Request>>(&mut recv, &codec).await {
        Ok(request) => request,
        Err(FrameReadError::Decode(e)) => {
            warn!(remote = %peer.remote, error = %e, "undecodable request");
            let reply: ReplyEnvelope<S::Reply> = ReplyEnvelope {
                id: 0,
                result: Err(ServiceError::new(ServiceErrorKind::BadRequest, e.to_string())),
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
    let deadline = Duration::from_millis(request.timeout_ms).min(limits.request_timeout_max);
    let result = match tokio::time::timeout(deadline, service.handle(&peer, request.body)).await {
        Ok(result) => result,
        Err(_) => Err(ServiceError::new(
            ServiceErrorKind::DeadlineExceeded,
            format!("no answer within the request's {deadline:?}"),
        )),
    };
    let reply = ReplyEnvelope { id: request.id, result };
    if let Err(e) = write_frame(&mut send, &reply, &codec).await {
        if let FrameWriteError::Encode(e) = &e {
            warn!(error = %e, "reply cannot be encoded");
            let fallback: ReplyEnvelope<S::Reply> = ReplyEnvelope {
                id: request.id,
                result: Err(ServiceError::new(ServiceErrorKind::Internal, e.to_string())),
            };
            let _ = write_frame(&mut send, &fallback, &codec).await;
        }
    }
    let _ = send.finish();
}

/// An authenticated connection that sends `Req` and receives `Rep`.
pub struct RpcClient<Req, Rep> {
    conn: quinn::Connection,
    next_id: Arc<AtomicU64>,
    codec: CodecLimits,
    peer_node: Option<NodeId>,
    _types: PhantomData<fn(Req) -> Rep>,
}

impl<Req, Rep> Clone for RpcClient<Req, Rep> {
    fn clone(&self) -> Self {
        Self {
            conn: self.conn.clone(),
            next_id: self.next_id.clone(),
            codec: self.codec,
            peer_node: self.peer_node,
            _types: PhantomData,
        }
    }
}

impl<Req, Rep> std::fmt::Debug for RpcClient<Req, Rep> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RpcClient({})", self.conn.remote_address())
    }
}

impl<Req: Serialize + Sync, Rep: DeserializeOwned> RpcClient<Req, Rep> {
    /// Opens a QUIC connection to `addr` and runs the handshake.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        auth: &ClientAuth,
        limits: &NetLimits,
    ) -> Result<Self, ConnectError> {
        let setup = async {
            let conn = endpoint
                .connect_with(config, addr, server_name)
                .map_err(|source| ConnectError::Connect { addr: addr.to_string(), source })?
                .await
                .map_err(|source| ConnectError::Connection { addr: addr.to_string(), source })?;
            let peer_node = handshake::client_handshake(&conn, auth, addr).await?;
            Ok((conn, peer_node))
        };
        let (conn, peer_node) = tokio::time::timeout(limits.handshake_timeout, setup)
            .await
            .map_err(|_| ConnectError::Timeout { what: "handshake", addr: addr.to_string() })??;
        Ok(Self {
            conn,
            next_id: Arc::new(AtomicU64::new(1)),
            codec: limits.codec(),
            peer_node,
            _types: PhantomData,
        })
    }

    /// Sends `request` and waits up to `timeout` for its reply.
    pub async fn call(&self, request: &Req, timeout: Duration) -> Result<Rep, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await?;
            let envelope = RequestEnvelope {
                id,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                body: request,
            };
            write_frame(&mut send, &envelope, &self.codec).await.map_err(|e| match e {
                FrameWriteError::Encode(e) => RpcError::Encode(e),
                FrameWriteError::Stream(e) => RpcError::Stream(e.to_string()),
            })?;
            let _ = send.finish();
            let reply: ReplyEnvelope<Rep> =
                read_frame(&mut recv, &self.codec).await.map_err(|e| match e {
                    FrameReadError::Connection(c) => RpcError::Connection(c),
                    FrameReadError::Stream(s) => RpcError::Stream(s),
                    FrameReadError::Decode(d) => RpcError::Decode(d),
                })?;
            match reply.result {
                Err(e) => Err(RpcError::Service(e)),
                Ok(_) if reply.id != id => Err(RpcError::IdMismatch { expected: id, got: reply.id }),
                Ok(rep) => Ok(rep),
            }
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| RpcError::Timeout(timeout))?
    }

    /// The node id the server announced in its `Welcome`, if it is a node.
    pub fn peer_node(&self) -> Option<NodeId> {
        self.peer_node
    }

    /// The server's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.conn.close_reason()
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(close_code::DONE.into(), b"done");
    }
}
