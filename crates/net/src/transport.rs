//! The transport seam: every connection a Shoal process opens goes through a
//! [`Transport`], and every service it serves listens on a [`Listener`]
//! ([`crate::rpc::serve`]). Behind them:
//! - QUIC between hosts, with the Unix-socket link between processes of
//!   one host inside it ([`crate::unix`]);
//! - an in-process network that loses, delays and cuts messages from a
//!   seed ([`crate::memory`]), for tests of services under faults.
//!
//! Both carry the same envelopes, handshake checks, codec bounds and
//! deadlines, and give the same [`RpcClient`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::endpoint;
use crate::error::{ConnectError, IdentityError};
use crate::handshake::ClientAuth;
use crate::limits::NetLimits;
use crate::memory::MemoryNet;
use crate::rpc::RpcClient;
use crate::tls;

/// Where a server takes its connections.
#[derive(Debug)]
pub enum Listener {
    /// A QUIC endpoint with a server configuration (and, on its host, the
    /// Unix socket bound beside it).
    Quic(quinn::Endpoint),
    /// An address claimed on an in-process network.
    Memory(crate::memory::Listener),
}

impl Listener {
    /// The address served.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Listener::Quic(endpoint) => endpoint.local_addr(),
            Listener::Memory(listener) => Ok(listener.local_addr()),
        }
    }
}

impl From<quinn::Endpoint> for Listener {
    fn from(endpoint: quinn::Endpoint) -> Self {
        Listener::Quic(endpoint)
    }
}

impl From<crate::memory::Listener> for Listener {
    fn from(listener: crate::memory::Listener) -> Self {
        Listener::Memory(listener)
    }
}

#[derive(Clone, Debug)]
enum Via {
    Quic {
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
    },
    Memory {
        net: MemoryNet,
        /// The host this process is on.
        host: IpAddr,
    },
}

/// Opens authenticated request/reply connections (cheap to clone).
#[derive(Clone, Debug)]
pub struct Transport {
    via: Via,
    server_name: &'static str,
    auth: Arc<ClientAuth>,
    limits: NetLimits,
}

impl Transport {
    /// QUIC from `endpoint` with `config`, proving `auth`; `server_name` is
    /// the name the servers' certificates carry.
    pub fn quic(
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        server_name: &'static str,
        auth: ClientAuth,
        limits: NetLimits,
    ) -> Self {
        Self {
            via: Via::Quic { endpoint, config },
            server_name,
            auth: Arc::new(auth),
            limits,
        }
    }

    /// A token-authenticated QUIC client on its own ephemeral UDP port.
    /// Must be called inside a tokio runtime.
    pub fn token_client(
        auth: ClientAuth,
        server_name: &'static str,
        limits: NetLimits,
    ) -> Result<Self, ConnectError> {
        let tls = tls::token_client_config().map_err(tls_to_connect)?;
        let config = endpoint::client_config(tls, &limits).map_err(tls_to_connect)?;
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = endpoint::endpoint(bind, None, &limits).map_err(ConnectError::Endpoint)?;
        Ok(Self::quic(endpoint, config, server_name, auth, limits))
    }

    /// Over the in-process network `net`, from the host `host`.
    pub fn memory(
        net: MemoryNet,
        host: IpAddr,
        server_name: &'static str,
        auth: ClientAuth,
        limits: NetLimits,
    ) -> Self {
        Self {
            via: Via::Memory { net, host },
            server_name,
            auth: Arc::new(auth),
            limits,
        }
    }

    /// The same transport with another QUIC client configuration (node
    /// daemons present their certificate to each other); unchanged on an
    /// in-process network.
    pub fn with_client_config(
        &self,
        config: quinn::ClientConfig,
        server_name: &'static str,
    ) -> Self {
        let via = match &self.via {
            Via::Quic { endpoint, .. } => Via::Quic {
                endpoint: endpoint.clone(),
                config,
            },
            memory @ Via::Memory { .. } => memory.clone(),
        };
        Self {
            via,
            server_name,
            auth: Arc::clone(&self.auth),
            limits: self.limits.clone(),
        }
    }

    /// The QUIC endpoint (to close it on shutdown), if QUIC.
    pub fn endpoint(&self) -> Option<&quinn::Endpoint> {
        match &self.via {
            Via::Quic { endpoint, .. } => Some(endpoint),
            Via::Memory { .. } => None,
        }
    }

    /// Waits for the connections this transport closed to say so to their
    /// peers (QUIC's close is sent from the endpoint).
    pub async fn wait_idle(&self) {
        if let Some(endpoint) = self.endpoint() {
            endpoint.wait_idle().await;
        }
    }

    /// Connects to the server at `addr` and completes the handshake.
    pub async fn connect<Req, Rep>(
        &self,
        addr: SocketAddr,
    ) -> Result<RpcClient<Req, Rep>, ConnectError>
    where
        Req: Serialize + Sync,
        Rep: DeserializeOwned,
    {
        self.connect_named(addr, self.server_name).await
    }

    /// [`connect`](Self::connect) to a server whose certificate carries
    /// `server_name`.
    pub async fn connect_named<Req, Rep>(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<RpcClient<Req, Rep>, ConnectError>
    where
        Req: Serialize + Sync,
        Rep: DeserializeOwned,
    {
        match &self.via {
            Via::Quic { endpoint, config } => {
                RpcClient::connect(
                    endpoint,
                    config.clone(),
                    addr,
                    server_name,
                    &self.auth,
                    &self.limits,
                )
                .await
            }
            Via::Memory { net, host } => {
                let (link, peer_node) = net.connect(*host, addr, &self.auth, &self.limits).await?;
                Ok(RpcClient::memory(link, addr, peer_node, &self.limits))
            }
        }
    }
}

fn tls_to_connect(e: IdentityError) -> ConnectError {
    ConnectError::Endpoint(std::io::Error::other(e.to_string()))
}
