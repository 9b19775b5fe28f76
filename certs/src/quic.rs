//! quinn wrappers around the rustls configs of [`crate::tls`], and the identity of a live peer.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use crate::CertError;
use crate::identity::SpiffeId;
use crate::tls::{self, Expectation, RejectionLog, TlsIdentity, TrustStore};

/// Liveness settings of a QUIC connection.
#[derive(Debug, Clone, Copy)]
pub struct QuicTimeouts {
    /// A connection with no traffic for this long is dead.
    pub idle: Duration,
    /// Keep-alive pings, well under `idle`.
    pub keep_alive: Duration,
}

impl Default for QuicTimeouts {
    fn default() -> Self {
        QuicTimeouts {
            idle: Duration::from_secs(15),
            keep_alive: Duration::from_secs(3),
        }
    }
}

fn transport(t: QuicTimeouts) -> Result<Arc<quinn::TransportConfig>, CertError> {
    let mut cfg = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(t.idle).map_err(|e| CertError::Tls(e.to_string()))?;
    cfg.max_idle_timeout(Some(idle));
    cfg.keep_alive_interval(Some(t.keep_alive));
    Ok(Arc::new(cfg))
}

/// A quinn server config requiring client certificates that match `expect`.
pub fn server_config(
    identity: &TlsIdentity,
    trust: &TrustStore,
    expect: Expectation,
    alpn: &[u8],
    log: RejectionLog,
    timeouts: QuicTimeouts,
) -> Result<quinn::ServerConfig, CertError> {
    let tls = tls::server_config(identity, trust, expect, alpn, log)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(timeouts)?);
    Ok(cfg)
}

/// A quinn client config that accepts only the server `expect`. Dial it with
/// `expect.server_name()` as the server name.
pub fn client_config(
    identity: &TlsIdentity,
    trust: &TrustStore,
    expect: SpiffeId,
    alpn: &[u8],
    log: RejectionLog,
    timeouts: QuicTimeouts,
) -> Result<quinn::ClientConfig, CertError> {
    let tls = tls::client_config(identity, trust, expect, alpn, log)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(timeouts)?);
    Ok(cfg)
}

/// The SPIFFE id of the peer of an established connection (already verified by the config).
pub fn peer_id(conn: &quinn::Connection) -> Result<SpiffeId, CertError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| CertError::PeerCertificate("connection has no peer identity".into()))?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| {
            CertError::PeerCertificate("peer identity is not a certificate chain".into())
        })?;
    let leaf = certs
        .first()
        .ok_or_else(|| CertError::PeerCertificate("empty certificate chain".into()))?;
    SpiffeId::from_cert(leaf)
}
