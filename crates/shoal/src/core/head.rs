//! The link to the head: one connection, dialled again when it is lost.
//!
//! A head that dies and is restarted (`shoal start --head --recover`) comes
//! back on the same address. Every request to the head goes through
//! [`HeadLink`]: on a lost connection it dials again (capped backoff with
//! jitter) and sends the request again, which is safe for every head
//! request (lease requests carry their id, registrations theirs, the rest
//! read or set a state). A driver registers its job again on the new
//! connection (the head answers with the same job id), so the job goes on.
//!
//! While the head is away, work already leased keeps running (tasks and
//! actor calls go straight to workers), and calls to the head wait for it
//! up to the link's bound (`Config::head_timeout`); past it they fail with
//! [`Error::HeadUnavailable`], as do tasks waiting for a lease
//! ([`HeadLink::unavailable`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use shoal_net::backoff::Backoff;
use shoal_net::sync::MutexExt;
use shoal_net::{RpcError, Transport};
use shoal_proto::head::RegisterJob;
use shoal_proto::{HeadReply, HeadRequest, JobId};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::HeadClient;
use crate::error::Error;

/// Default of `Config::head_timeout` (Ray waits 60 s for its control
/// store too).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between two dials.
const REDIAL_MAX: Duration = Duration::from_secs(1);
/// Longest one dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// New connections one call goes through at most (a head that takes a
/// connection and drops it every time is unavailable too).
const REDIALS_PER_CALL_MAX: u32 = 10;

/// Why a call to the head failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadCallError {
    /// The request failed on a live connection.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The head could not be reached for longer than the bound.
    #[error("the head at {address} has been unreachable for {waited:?}")]
    Unavailable {
        /// Its address.
        address: SocketAddr,
        /// How long it has been unreachable.
        waited: Duration,
    },
}

impl HeadCallError {
    /// True when the call may succeed if made again (a timeout, a fault).
    pub(crate) fn is_worth_retrying(&self) -> bool {
        match self {
            HeadCallError::Rpc(e) => e.is_worth_retrying(),
            HeadCallError::Unavailable { .. } => false,
        }
    }

    /// True when no connection to the head could be had.
    pub(crate) fn is_connection_lost(&self) -> bool {
        match self {
            HeadCallError::Rpc(e) => e.is_connection_lost(),
            HeadCallError::Unavailable { .. } => true,
        }
    }
}

impl From<HeadCallError> for Error {
    fn from(e: HeadCallError) -> Self {
        match e {
            HeadCallError::Rpc(e) => Error::Rpc(e),
            e @ HeadCallError::Unavailable { .. } => Error::HeadUnavailable(e.to_string()),
        }
    }
}

/// The process's link to the head.
pub(crate) struct HeadLink {
    transport: Transport,
    address: SocketAddr,
    /// The connection in use, numbered: a caller that saw number `n` fail
    /// dials again only if nobody replaced `n` already.
    current: Mutex<(u64, HeadClient)>,
    /// Held while dialling, so one caller dials and the others wait.
    dialling: tokio::sync::Mutex<()>,
    /// Since when the head has been unreachable, while it is.
    down: watch::Sender<Option<Instant>>,
    bound: Duration,
    /// A driver's job registration, sent again on every new connection.
    job: OnceLock<(RegisterJob, JobId)>,
    /// The head ended this driver's job while it was away: no use dialling.
    job_ended: AtomicBool,
    /// This process closed the link (it is shutting down): a call still
    /// made fails at once, and nothing is dialled or reported lost.
    closed: AtomicBool,
}

impl HeadLink {
    /// Dials the head once.
    pub(crate) async fn connect(
        transport: Transport,
        address: SocketAddr,
        bound: Duration,
    ) -> Result<Self, shoal_net::ConnectError> {
        let client: HeadClient = transport.connect(address).await?;
        Ok(Self {
            transport,
            address,
            current: Mutex::new((0, client)),
            dialling: tokio::sync::Mutex::new(()),
            down: watch::channel(None).0,
            bound,
            job: OnceLock::new(),
            job_ended: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// After a driver registered its job: register it again on every new
    /// connection.
    pub(crate) fn keep_job(&self, request: RegisterJob, job_id: JobId) {
        let _ = self.job.set((request, job_id));
    }

    fn client(&self) -> (u64, HeadClient) {
        let current = self.current.locked();
        (current.0, current.1.clone())
    }

    /// Sends `request`; on a lost connection dials again and sends it again
    /// (see the module's notes), until the head has been away for the
    /// bound.
    pub(crate) async fn call(
        &self,
        request: &HeadRequest,
        timeout: Duration,
    ) -> Result<HeadReply, HeadCallError> {
        self.send(request, timeout, false).await
    }

    /// [`HeadLink::call`] that also asks again after timeouts and injected
    /// faults (as `RpcClient::call_idempotent`).
    pub(crate) async fn call_idempotent(
        &self,
        request: &HeadRequest,
        timeout: Duration,
    ) -> Result<HeadReply, HeadCallError> {
        self.send(request, timeout, true).await
    }

    /// [`HeadLink::call_idempotent`] that also waits while the head answers
    /// `Unavailable` (busy for now), for up to `patience`.
    pub(crate) async fn call_when_available(
        &self,
        request: &HeadRequest,
        timeout: Duration,
        patience: Duration,
    ) -> Result<HeadReply, HeadCallError> {
        let busy = |e: &HeadCallError| matches!(e, HeadCallError::Rpc(e) if e.is_busy());
        shoal_net::backoff::while_busy(patience, busy, || self.call_idempotent(request, timeout))
            .await
    }

    async fn send(
        &self,
        request: &HeadRequest,
        timeout: Duration,
        idempotent: bool,
    ) -> Result<HeadReply, HeadCallError> {
        let mut redials = 0;
        loop {
            let (n, client) = self.client();
            let answer = if idempotent {
                client.call_idempotent(request, timeout).await
            } else {
                client.call(request, timeout).await
            };
            match answer {
                Err(e) if e.is_connection_lost() && redials < REDIALS_PER_CALL_MAX => {
                    redials += 1;
                    self.redial(n).await?;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Replaces connection `n` (lost) with a new one, unless another caller
    /// did already. Fails once the head has been unreachable for the bound.
    async fn redial(&self, n: u64) -> Result<(), HeadCallError> {
        let _dialling = self.dialling.lock().await;
        if self.closed.load(Ordering::Relaxed) {
            return Err(HeadCallError::Unavailable {
                address: self.address,
                waited: Duration::ZERO,
            });
        }
        if self.current.locked().0 != n {
            return Ok(());
        }
        let since = *self.down.borrow();
        let since = since.unwrap_or_else(|| {
            warn!(head = %self.address, "lost the connection to the head; dialling it again");
            let now = Instant::now();
            self.down.send_replace(Some(now));
            now
        });
        let unavailable = |waited| HeadCallError::Unavailable {
            address: self.address,
            waited,
        };
        let mut backoff = Backoff::new(Duration::from_millis(50), REDIAL_MAX);
        loop {
            if self.job_ended.load(Ordering::Relaxed) {
                return Err(unavailable(since.elapsed()));
            }
            match tokio::time::timeout(DIAL_TIMEOUT, self.transport.connect(self.address)).await {
                Ok(Ok(client)) => {
                    if let Err(e) = self.register_again(&client).await {
                        debug!(error = %e, "registering the job again failed; dialling again");
                    } else {
                        let mut current = self.current.locked();
                        *current = (n + 1, client);
                        drop(current);
                        self.down.send_replace(None);
                        info!(head = %self.address, down_for = ?since.elapsed(), "connected to the head again");
                        return Ok(());
                    }
                }
                Ok(Err(e)) => debug!(error = %e, "the head is still unreachable"),
                Err(_) => debug!("dialling the head timed out"),
            }
            let waited = since.elapsed();
            if waited >= self.bound {
                return Err(unavailable(waited));
            }
            let pause = backoff.next_pause();
            tokio::time::sleep(pause.min(self.bound - waited)).await;
        }
    }

    /// A driver's job, registered on the new connection: the head answers
    /// with the same id while the job runs. A head that ended the job
    /// meanwhile (its driver was away past the head's grace) is as good as
    /// unavailable to this driver: the dialling goes on until the bound,
    /// then everything fails with `HeadUnavailable`.
    async fn register_again(&self, client: &HeadClient) -> Result<(), RpcError> {
        let Some((request, job_id)) = self.job.get() else {
            return Ok(());
        };
        let reply = client
            .call_idempotent(&HeadRequest::RegisterJob(request.clone()), DIAL_TIMEOUT)
            .await?;
        match reply {
            HeadReply::JobRegistered { job_id: same, .. } if same == *job_id => Ok(()),
            HeadReply::JobRegistered { job_id: other, .. } => {
                // The head ended the job while it could not reach us.
                error!(job_id = %job_id, "the head ended this job while it could not reach this driver");
                client
                    .call_idempotent(&HeadRequest::FinishJob { job_id: other }, DIAL_TIMEOUT)
                    .await?;
                self.job_ended.store(true, Ordering::Relaxed);
                Err(RpcError::Stream(format!("the head ended job {job_id}")))
            }
            other => Err(RpcError::Stream(format!(
                "{other:?} in answer to RegisterJob"
            ))),
        }
    }

    /// Resolves once the head has been unreachable for the bound (never
    /// while it is reachable); with how long it has been.
    pub(crate) async fn unavailable(&self) -> Duration {
        let mut down = self.down.subscribe();
        loop {
            let since = *down.borrow_and_update();
            match since {
                Some(since) => {
                    let at = since + self.bound;
                    let now = Instant::now();
                    if now >= at {
                        return since.elapsed();
                    }
                    tokio::select! {
                        () = tokio::time::sleep(at - now) => {}
                        _ = down.changed() => {}
                    }
                }
                None => {
                    if down.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }

    /// The error for a task that waited for a lease past the bound.
    pub(crate) fn unavailable_error(&self, waited: Duration) -> Error {
        HeadCallError::Unavailable {
            address: self.address,
            waited,
        }
        .into()
    }

    /// Closes the connection.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.current.locked().1.close();
    }
}
