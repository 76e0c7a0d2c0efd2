//! The transport seam: daemons reach each other through [`Transport`], so a
//! later in-memory or simulated transport (turmoil-style) can stand in for
//! QUIC without touching their logic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::endpoint;
use crate::error::{ConnectError, IdentityError};
use crate::handshake::ClientAuth;
use crate::limits::NetLimits;
use crate::rpc::RpcClient;
use crate::tls;

/// Opens authenticated request/reply connections.
pub trait Transport: Send + Sync + 'static {
    /// Connects to the server at `addr` and completes the handshake.
    fn connect<Req, Rep>(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<RpcClient<Req, Rep>, ConnectError>> + Send
    where
        Req: Serialize + Sync + 'static,
        Rep: DeserializeOwned + 'static;
}

/// The QUIC transport: one client endpoint, token-authenticated connections.
#[derive(Clone, Debug)]
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server_name: &'static str,
    auth: Arc<ClientAuth>,
    limits: NetLimits,
}

impl QuicTransport {
    /// A token-authenticated client on its own ephemeral UDP port. Must be
    /// called inside a tokio runtime.
    pub fn token_client(
        auth: ClientAuth,
        server_name: &'static str,
        limits: NetLimits,
    ) -> Result<Self, ConnectError> {
        let tls = tls::token_client_config().map_err(tls_to_connect)?;
        let config = endpoint::client_config(tls, &limits).map_err(tls_to_connect)?;
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = endpoint::endpoint(bind, None, &limits).map_err(ConnectError::Endpoint)?;
        Ok(Self {
            endpoint,
            config,
            server_name,
            auth: Arc::new(auth),
            limits,
        })
    }

    /// The local endpoint (to close it on shutdown).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

fn tls_to_connect(e: IdentityError) -> ConnectError {
    ConnectError::Endpoint(std::io::Error::other(e.to_string()))
}

impl Transport for QuicTransport {
    async fn connect<Req, Rep>(&self, addr: SocketAddr) -> Result<RpcClient<Req, Rep>, ConnectError>
    where
        Req: Serialize + Sync + 'static,
        Rep: DeserializeOwned + 'static,
    {
        RpcClient::connect(
            &self.endpoint,
            self.config.clone(),
            addr,
            self.server_name,
            &self.auth,
            &self.limits,
        )
        .await
    }
}
