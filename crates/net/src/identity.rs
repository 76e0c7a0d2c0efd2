//! The cluster identity: id, join token and certificate authority.
//!
//! Made once, at `shoal start --head`, and kept in the session directory:
//! - `token`: the join token, `shoal1.<cluster id>.<256-bit secret>` (mode 0600);
//! - `ca.key`: the CA's private key, PEM (mode 0600);
//! - `ca.crt`: the CA certificate, PEM, for humans and tools.
//!
//! The CA certificate is derived from the key and the cluster id, so a head
//! restarted on the same session directory issues certificates that chain to
//! the same CA.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use ring::rand::SecureRandom;
use shoal_proto::{ClusterId, NodeId};

use crate::error::IdentityError;
use crate::{HEAD_SERVER_NAME, NODE_SERVER_NAME};

/// Length of the join token's secret: 256 bits.
pub const SECRET_LEN: usize = 32;

const TOKEN_PREFIX: &str = "shoal1";
const DRIVER_TOKEN_PREFIX: &str = "shoal1d";
const DRIVER_LABEL: &[u8] = b"shoal driver token v1";

/// What a join token lets its holder be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenScope {
    /// The cluster token, `shoal1.…`: node daemons join with it. The head
    /// and every node hold it; from it the driver token is derived.
    Cluster,
    /// The driver token, `shoal1d.…`: drivers, workers and command-line
    /// clients connect with it. It proves the token in the handshake but
    /// cannot prove the `Node` role, and the cluster token cannot be
    /// derived from it, so its holder cannot join or act as a node.
    Driver,
}

/// What a peer needs to join a cluster: the cluster id and the secret.
///
/// Every handshake proves the driver token's secret; a peer that claims the
/// `Node` role also proves the cluster token's (see `handshake`).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The cluster the token belongs to.
    pub cluster_id: ClusterId,
    secret: [u8; SECRET_LEN],
    scope: TokenScope,
}

impl JoinToken {
    /// A new cluster token with a fresh random secret.
    pub fn generate(cluster_id: ClusterId) -> Result<Self, IdentityError> {
        let mut secret = [0u8; SECRET_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| IdentityError::Random)?;
        Ok(Self::from_parts(cluster_id, secret))
    }

    /// A cluster token from its parts (tests build foreign or wrong tokens
    /// this way).
    pub fn from_parts(cluster_id: ClusterId, secret: [u8; SECRET_LEN]) -> Self {
        Self {
            cluster_id,
            secret,
            scope: TokenScope::Cluster,
        }
    }

    /// What the token lets its holder be.
    pub fn scope(&self) -> TokenScope {
        self.scope
    }

    /// The driver token of this cluster: itself, if it is one; derived
    /// from the cluster token's secret otherwise (HMAC-SHA256 of a label).
    /// This is the token handed to drivers, workers and `shoal job submit`.
    pub fn driver_token(&self) -> JoinToken {
        match self.scope {
            TokenScope::Driver => self.clone(),
            TokenScope::Cluster => {
                let derived = ring::hmac::sign(&self.own_key(), DRIVER_LABEL);
                let mut secret = [0u8; SECRET_LEN];
                secret.copy_from_slice(derived.as_ref());
                Self {
                    cluster_id: self.cluster_id,
                    secret,
                    scope: TokenScope::Driver,
                }
            }
        }
    }

    fn own_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret)
    }

    /// The key every handshake proof is made with: the driver token's
    /// secret, which holders of either token have.
    pub(crate) fn hmac_key(&self) -> ring::hmac::Key {
        self.driver_token().own_key()
    }

    /// The key a `Node` proves its role with: the cluster token's secret;
    /// `None` for a driver token.
    pub(crate) fn node_key(&self) -> Option<ring::hmac::Key> {
        (self.scope == TokenScope::Cluster).then(|| self.own_key())
    }

    /// The key a head signs QUIC stateless resets with, derived from the
    /// secret: the same for every head of the cluster, so a restarted head
    /// resets the connections of the one it replaces and their peers
    /// reconnect at once (instead of after the idle timeout).
    pub fn reset_key(&self) -> ring::hmac::Key {
        let derived = ring::hmac::sign(&self.own_key(), b"shoal quic stateless reset v1");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
    }
}

impl JoinToken {
    /// The dashboard's session cookie: an HMAC of a fixed label under the
    /// driver token's secret, so the cookie proves the token without
    /// carrying it, and either token logs in.
    pub fn dashboard_cookie(&self) -> String {
        let tag = ring::hmac::sign(&self.hmac_key(), DASHBOARD_LABEL);
        shoal_proto::hex::encode(tag.as_ref())
    }

    /// Whether `cookie` is [`JoinToken::dashboard_cookie`] (constant time).
    pub fn dashboard_cookie_matches(&self, cookie: &str) -> bool {
        shoal_proto::hex::decode(cookie.trim())
            .is_some_and(|tag| ring::hmac::verify(&self.hmac_key(), DASHBOARD_LABEL, &tag).is_ok())
    }

    /// Whether `text` is this cluster's cluster or driver token (the
    /// secrets compared in constant time).
    pub fn matches_text(&self, text: &str) -> bool {
        let Ok(given) = text.parse::<JoinToken>() else {
            return false;
        };
        let tag = ring::hmac::sign(&given.hmac_key(), DASHBOARD_LABEL);
        given.cluster_id == self.cluster_id
            && ring::hmac::verify(&self.hmac_key(), DASHBOARD_LABEL, tag.as_ref()).is_ok()
    }
}

const DASHBOARD_LABEL: &[u8] = b"shoal dashboard session v1";

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = shoal_proto::hex::encode(&self.secret);
        let prefix = match self.scope {
            TokenScope::Cluster => TOKEN_PREFIX,
            TokenScope::Driver => DRIVER_TOKEN_PREFIX,
        };
        write!(f, "{prefix}.{}.{secret}", self.cluster_id)
    }
}

impl fmt::Debug for JoinToken {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken({}, {:?}, <secret>)",
            self.cluster_id, self.scope
        )
    }
}

impl FromStr for JoinToken {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(cluster), Some(secret_hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::MalformedToken("wrong number of parts"));
        };
        let scope = match prefix {
            TOKEN_PREFIX => TokenScope::Cluster,
            DRIVER_TOKEN_PREFIX => TokenScope::Driver,
            _ => return Err(IdentityError::MalformedToken("unknown prefix")),
        };
        if cluster.len() != 32 {
            return Err(IdentityError::MalformedToken(
                "cluster id is not 32 hex digits",
            ));
        }
        let cluster_id = cluster
            .parse()
            .map_err(|_| IdentityError::MalformedToken("cluster id is not 32 hex digits"))?;
        let secret: [u8; SECRET_LEN] = shoal_proto::hex::decode(secret_hex)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(IdentityError::MalformedToken("secret is not 64 hex digits"))?;
        Ok(Self {
            cluster_id,
            secret,
            scope,
        })
    }
}

/// A certificate and its private key, DER encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    /// The private key (PKCS#8 DER).
    pub key_der: Vec<u8>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IssuedCert({} byte certificate, <key>)",
            self.cert_der.len()
        )
    }
}

/// Everything the head knows that makes it the cluster's authority.
pub struct ClusterIdentity {
    token: JoinToken,
    ca_key: KeyPair,
    ca_cert: rcgen::Certificate,
}

impl fmt::Debug for ClusterIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterIdentity({})", self.token.cluster_id)
    }
}

impl ClusterIdentity {
    /// A new cluster: fresh id, token and CA.
    pub fn generate() -> Result<Self, IdentityError> {
        let token = JoinToken::generate(ClusterId::random())?;
        let ca_key = KeyPair::generate()?;
        Self::from_parts(token, ca_key)
    }

    fn from_parts(token: JoinToken, ca_key: KeyPair) -> Result<Self, IdentityError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("shoal cluster {} CA", token.cluster_id),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key)?;
        Ok(Self {
            token,
            ca_key,
            ca_cert,
        })
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> ClusterId {
        self.token.cluster_id
    }

    /// The join token.
    pub fn token(&self) -> &JoinToken {
        &self.token
    }

    /// The CA certificate (DER).
    pub fn ca_cert_der(&self) -> Vec<u8> {
        self.ca_cert.der().to_vec()
    }

    /// A certificate for the head's QUIC server.
    pub fn issue_head_cert(&self) -> Result<IssuedCert, IdentityError> {
        self.issue(HEAD_SERVER_NAME, "shoal head".to_string())
    }

    /// A certificate for a node, valid for node-to-node mutual TLS as client
    /// and as server.
    pub fn issue_node_cert(&self, node_id: NodeId) -> Result<IssuedCert, IdentityError> {
        self.issue(NODE_SERVER_NAME, format!("shoal node {node_id}"))
    }

    fn issue(&self, server_name: &str, common_name: String) -> Result<IssuedCert, IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![server_name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok(IssuedCert {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }

    /// Writes `token`, `ca.key` and `ca.crt` into `dir` (secrets mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        write_file(&dir.join("token"), self.token.to_string().as_bytes(), 0o600)?;
        write_file(
            &dir.join("ca.key"),
            self.ca_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file(&dir.join("ca.crt"), self.ca_cert.pem().as_bytes(), 0o644)
    }

    /// Reads an identity saved by [`ClusterIdentity::save`].
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let token = read_token(&dir.join("token"))?;
        let key_path = dir.join("ca.key");
        let pem = fs::read_to_string(&key_path).map_err(|source| IdentityError::Io {
            action: "reading",
            path: key_path.display().to_string(),
            source,
        })?;
        Self::from_parts(token, KeyPair::from_pem(&pem)?)
    }
}

/// Reads a join token file.
pub fn read_token(path: &Path) -> Result<JoinToken, IdentityError> {
    let text = fs::read_to_string(path).map_err(|source| IdentityError::Io {
        action: "reading",
        path: path.display().to_string(),
        source,
    })?;
    text.parse()
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io_err = |source| IdentityError::Io {
        action: "writing",
        path: path.display().to_string(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    file.write_all(bytes).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_cookie_proves_the_token_without_carrying_it() {
        let token = JoinToken::generate(ClusterId::random()).expect("token");
        let other = JoinToken::generate(token.cluster_id).expect("token");
        let cookie = token.dashboard_cookie();
        assert!(!cookie.contains(&token.to_string()[40..]));
        assert!(token.dashboard_cookie_matches(&cookie));
        assert!(!other.dashboard_cookie_matches(&cookie));
        assert!(!token.dashboard_cookie_matches("zz"));
        assert!(!token.dashboard_cookie_matches(""));
        assert!(token.matches_text(&token.to_string()));
        assert!(!token.matches_text(&other.to_string()));
        assert!(!token.matches_text("shoal1.nonsense"));
    }

    #[test]
    fn token_round_trips_and_hides_its_secret() {
        let token = JoinToken::generate(ClusterId::random()).expect("token");
        let text = token.to_string();
        assert!(text.starts_with("shoal1."));
        assert_eq!(text.len(), 6 + 1 + 32 + 1 + 64);
        assert_eq!(text.parse::<JoinToken>().expect("parses"), token);
        assert!(
            !format!("{token:?}").contains(&text[40..]),
            "Debug must not print the secret"
        );
    }

    /// The driver token: its own text, derived the same way every time,
    /// logs in to the dashboard as the cluster token does, and cannot give
    /// back the cluster token's secret (it is an HMAC of it).
    #[test]
    fn the_driver_token_is_derived_and_cannot_make_a_node() {
        let token = JoinToken::generate(ClusterId::random()).expect("token");
        let driver = token.driver_token();
        assert_eq!(token.scope(), TokenScope::Cluster);
        assert_eq!(driver.scope(), TokenScope::Driver);
        assert_eq!(driver, token.driver_token(), "deterministic");
        assert_eq!(driver.driver_token(), driver);
        let text = driver.to_string();
        assert!(text.starts_with("shoal1d."), "{text}");
        assert_eq!(text.parse::<JoinToken>().expect("parses"), driver);
        assert!(
            !text.contains(&token.to_string()[40..]),
            "carries the secret"
        );
        assert!(driver.node_key().is_none());
        assert!(token.node_key().is_some());
        assert_eq!(driver.dashboard_cookie(), token.dashboard_cookie());
        assert!(token.matches_text(&text));
        assert!(driver.matches_text(&token.to_string()));
        let other = JoinToken::generate(token.cluster_id).expect("token");
        assert!(!token.matches_text(&other.driver_token().to_string()));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = JoinToken::generate(ClusterId::random())
            .expect("token")
            .to_string();
        for bad in [
            "",
            "shoal1",
            "shoal2.00000000000000000000000000000000.00",
            &good[..good.len() - 1],
            &format!("{good}.extra"),
            &good.replace("shoal1.", "shoal0."),
            &good.replace("shoal1.", "shoal1x."),
            &format!("{}zz", &good[..good.len() - 2]),
            "shoal1.é0000000000000000000000000000000.0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn saved_identity_loads_with_the_same_token_and_ca_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = ClusterIdentity::generate().expect("identity");
        identity.save(dir.path()).expect("save");
        let loaded = ClusterIdentity::load(dir.path()).expect("load");
        assert_eq!(loaded.token(), identity.token());
        assert_eq!(
            loaded.ca_key.public_key_der(),
            identity.ca_key.public_key_der()
        );
        let mode = fs::metadata(dir.path().join("token"))
            .expect("meta")
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
