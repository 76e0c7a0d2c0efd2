//! An authenticated connection to a cluster's head.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_net::handshake::ClientAuth;
use shoal_net::{JoinToken, NetLimits, RpcClient, Transport, HEAD_SERVER_NAME};
use shoal_proto::{ClusterStatus, HeadReply, HeadRequest, Role};

use crate::error::{Error, Result};

/// Deadline of one request to the head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a cluster's head.
#[derive(Debug)]
pub struct ClusterClient {
    transport: Transport,
    head: RpcClient<HeadRequest, HeadReply>,
}

impl ClusterClient {
    /// Connects to the head at `addr` as `role`, proving `token`.
    pub async fn connect(addr: SocketAddr, token: JoinToken, role: Role) -> Result<Self> {
        let transport = Transport::token_client(
            ClientAuth { token, role },
            HEAD_SERVER_NAME,
            NetLimits::default(),
        )?;
        let head = transport.connect(addr).await?;
        Ok(Self { transport, head })
    }

    /// The cluster's node table and resource view.
    pub async fn status(&self) -> Result<ClusterStatus> {
        match self
            .head
            .call(&HeadRequest::GetClusterStatus, REQUEST_TIMEOUT)
            .await?
        {
            HeadReply::ClusterStatus(status) => Ok(status),
            other => Err(Error::Protocol(format!(
                "{other:?} in answer to a status request"
            ))),
        }
    }

    /// Closes the connection and waits for the close to reach the head.
    pub async fn close(self) {
        self.head.close();
        self.transport.wait_idle().await;
    }
}
