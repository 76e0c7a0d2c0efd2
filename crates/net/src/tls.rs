//! rustls configurations for the three kinds of connection.
//!
//! - The head's server: its CA-signed certificate, no client certificates
//!   (peers authenticate with the token in the handshake).
//! - A token-authenticated client (nodes, drivers and `shoal status` talking to
//!   the head): it does not verify the head's certificate chain, because a
//!   joining peer holds only the token; the handshake's server proof
//!   authenticates the head instead. Handshake signatures are still verified,
//!   so the TLS session itself is sound.
//! - Node-to-node mutual TLS: both sides present a head-issued certificate and
//!   verify the other's against the cluster CA.
//!
//! TLS 1.3 only, ALPN `shoal/1`, the `ring` provider.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::IdentityError;
use crate::identity::IssuedCert;
use crate::ALPN;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

fn key_of(cert: &IssuedCert) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone()))
}

fn roots(ca_cert_der: &[u8]) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_cert_der.to_vec()))
        .map_err(tls_err)?;
    Ok(Arc::new(roots))
}

/// The server side of a token-authenticated connection (the head).
pub fn server_config(cert: &IssuedCert) -> Result<rustls::ServerConfig, IdentityError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert_der.clone())],
            key_of(cert),
        )
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The client side of a token-authenticated connection.
pub fn token_client_config() -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(TokenAuthenticatedServer {
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A node's server: a client certificate, when presented, must chain to the
/// cluster CA. Node daemons present one (the handshake requires it of the
/// `Node` role); drivers and workers prove the token only.
pub fn mtls_server_config(
    cert: &IssuedCert,
    ca_cert_der: &[u8],
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_cert_der)?, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(tls_err)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert.cert_der.clone())],
            key_of(cert),
        )
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A node's client to its peers: presents its certificate, verifies theirs
/// against the cluster CA.
pub fn mtls_client_config(
    cert: &IssuedCert,
    ca_cert_der: &[u8],
) -> Result<rustls::ClientConfig, IdentityError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(ca_cert_der)?)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert.cert_der.clone())],
            key_of(cert),
        )
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A self-signed certificate for a server that authenticates by the token
/// alone (a worker's or driver's endpoint).
pub fn self_signed(server_name: &str) -> Result<IssuedCert, IdentityError> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec![server_name.to_string()])?;
    let cert = params.self_signed(&key)?;
    Ok(IssuedCert {
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    })
}

/// Accepts the server's certificate without checking its chain (the token
/// proof in the handshake authenticates the server), but verifies the
/// handshake signature so the session keys belong to the certificate's key.
#[derive(Debug)]
struct TokenAuthenticatedServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for TokenAuthenticatedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never negotiated: the config allows only 1.3.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
