//! rustls configurations: the only place in the workspace that builds them.
//!
//! Both directions use mutual TLS 1.3 on the ring provider. Chain, validity, key usage and
//! revocation are checked by webpki with the fleet CA as the only root and the fleet CRL
//! (expired CRLs rejected). On top of that, the peer's SPIFFE id must match what the caller
//! expects ([`Expectation`]): webpki ties a certificate to a CA, never to a host or a role.
//! Every refusal is classified as a [`PeerRejection`], logged with `tracing`, and kept in a
//! [`RejectionLog`] the caller can read. 0-RTT is never offered or accepted.

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::CertError;
use crate::identity::{Role, SpiffeId};
pub use crate::trust::TrustStore;

/// The crypto provider every Tollgate config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = crate::files::read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::bad(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::bad(path, "no certificate in file"));
    }
    Ok(certs)
}

/// This process's certificate chain and key, and the identity they carry.
#[derive(Debug)]
pub struct TlsIdentity {
    pub id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let chain = load_certs(cert_path)?;
        let key_bytes = crate::files::read(key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| CertError::bad(key_path, format!("not a PEM private key: {e}")))?;
        let id = SpiffeId::from_cert(&chain[0]).map_err(|e| CertError::bad(cert_path, e))?;
        Ok(TlsIdentity { id, chain, key })
    }

    fn parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }
}

/// Which peers a config accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expectation {
    /// Exactly this identity (an agent accepts only its coordinator; the coordinator accepts
    /// only the agent it dialled).
    Exactly(SpiffeId),
    /// Any holder of this role in this fleet (the coordinator's control port accepts any
    /// operator; authorization happens afterwards).
    AnyOf { fleet: String, role: Role },
}

impl Expectation {
    /// Decides whether `got` is acceptable.
    pub fn check(&self, got: &SpiffeId) -> Result<(), PeerRejection> {
        let (fleet, role) = match self {
            Expectation::Exactly(id) => (id.fleet(), id.role()),
            Expectation::AnyOf { fleet, role } => (fleet.as_str(), *role),
        };
        if got.fleet() != fleet {
            return Err(PeerRejection::WrongFleet {
                expected: fleet.to_string(),
                got: got.to_string(),
            });
        }
        if got.role() != role {
            return Err(PeerRejection::WrongRole {
                expected: role,
                got: got.to_string(),
            });
        }
        if let Expectation::Exactly(id) = self
            && id != got
        {
            return Err(PeerRejection::WrongIdentity {
                expected: id.to_string(),
                got: got.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expectation::Exactly(id) => write!(f, "{id}"),
            Expectation::AnyOf { fleet, role } => write!(f, "spiffe://{fleet}/{role}/*"),
        }
    }
}

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRejection {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("certificate is not signed by the fleet CA")]
    UnknownIssuer,
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("certificate has been revoked")]
    Revoked,
    #[error("the fleet CRL has expired; re-sign it with `tollgate certs crl`")]
    RevocationListExpired,
    #[error("revocation status unknown (no CRL covers this certificate)")]
    RevocationStatusUnknown,
    #[error("certificate is for the wrong role: expected {expected}, got {got}")]
    WrongRole { expected: Role, got: String },
    #[error("certificate is for another identity: expected {expected}, got {got}")]
    WrongIdentity { expected: String, got: String },
    #[error("certificate is for another fleet: expected {expected}, got {got}")]
    WrongFleet { expected: String, got: String },
    #[error("certificate carries no usable SPIFFE id: {0}")]
    NoSpiffeId(String),
    #[error("certificate rejected: {0}")]
    Other(String),
}

impl PeerRejection {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            self,
        ))))
    }
}

/// Maps a webpki verification failure to its cause.
pub(crate) fn classify(err: &rustls::Error) -> PeerRejection {
    match err {
        rustls::Error::NoCertificatesPresented => PeerRejection::NoCertificate,
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                PeerRejection::UnknownIssuer
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                PeerRejection::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                PeerRejection::NotYetValid
            }
            CertificateError::Revoked => PeerRejection::Revoked,
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => {
                PeerRejection::RevocationListExpired
            }
            CertificateError::UnknownRevocationStatus => PeerRejection::RevocationStatusUnknown,
            other => PeerRejection::Other(format!("{other:?}")),
        },
        other => PeerRejection::Other(other.to_string()),
    }
}

/// The most recent refusals of one config, newest last (at most 64 kept).
#[derive(Debug, Clone, Default)]
pub struct RejectionLog {
    inner: Arc<Mutex<VecDeque<PeerRejection>>>,
}

impl RejectionLog {
    const CAP: usize = 64;

    pub fn new() -> Self {
        Self::default()
    }

    fn record(&self, r: &PeerRejection, side: &str) {
        tracing::warn!(side, reason = %r, "refused peer certificate");
        if let Ok(mut q) = self.inner.lock() {
            if q.len() == Self::CAP {
                q.pop_front();
            }
            q.push_back(r.clone());
        }
    }

    pub fn snapshot(&self) -> Vec<PeerRejection> {
        self.inner
            .lock()
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn last(&self) -> Option<PeerRejection> {
        self.inner.lock().ok().and_then(|q| q.back().cloned())
    }
}

/// Runs webpki, then the SPIFFE expectation; classifies and logs any refusal.
fn verify_identity(
    webpki: Result<(), rustls::Error>,
    end_entity: &CertificateDer<'_>,
    expect: &Expectation,
    log: &RejectionLog,
    side: &str,
) -> Result<(), rustls::Error> {
    let presented = SpiffeId::from_cert(end_entity);
    if let Err(err) = webpki {
        let mut reason = classify(&err);
        // A key usage or server name that does not fit is, at bottom, the wrong identity
        // (an agent certificate used as a client, web2 answering for web1): name that cause.
        let mut renamed = false;
        if let (PeerRejection::Other(_), Ok(id)) = (&reason, &presented)
            && let Err(identity_reason) = expect.check(id)
        {
            reason = identity_reason;
            renamed = true;
        }
        log.record(&reason, side);
        return Err(if renamed { reason.into_rustls() } else { err });
    }
    let id = presented.map_err(|e| {
        let r = PeerRejection::NoSpiffeId(e.to_string());
        log.record(&r, side);
        r.into_rustls()
    })?;
    expect.check(&id).map_err(|r| {
        log.record(&r, side);
        r.into_rustls()
    })
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    /// Asked for the verifier of the CRL in force at every handshake.
    trust: TrustStore,
    /// The CA's subjects (the CA is fixed for the life of the store).
    hints: Vec<DistinguishedName>,
    expect: Expectation,
    log: RejectionLog,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let webpki = self
            .trust
            .client_verifier()
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ());
        verify_identity(webpki, end_entity, &self.expect, &self.log, "server")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .client_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .client_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.client_verifier().supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    /// Asked for the verifier of the CRL in force at every handshake.
    trust: TrustStore,
    expect: Expectation,
    log: RejectionLog,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let webpki = self
            .trust
            .server_verifier()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map(|_| ());
        verify_identity(webpki, end_entity, &self.expect, &self.log, "client")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .server_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust
            .server_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.server_verifier().supported_verify_schemes()
    }
}

fn tls_err(e: impl fmt::Display) -> CertError {
    CertError::Tls(e.to_string())
}

/// A server config: TLS 1.3, client certificate required and matched against `expect`.
pub fn server_config(
    identity: &TlsIdentity,
    trust: &TrustStore,
    expect: Expectation,
    alpn: &[u8],
    log: RejectionLog,
) -> Result<rustls::ServerConfig, CertError> {
    let provider = provider();
    let hints = trust.client_verifier().root_hint_subjects().to_vec();
    let verifier = Arc::new(SpiffeClientVerifier {
        trust: trust.clone(),
        hints,
        expect,
        log,
    });
    let (chain, key) = identity.parts();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.max_early_data_size = 0; // never accept 0-RTT: it can be replayed
    // No resumption: a resumed session would skip the client certificate, and so the CRL.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A client config that presents `identity` and accepts only a server that is `expect`.
pub fn client_config(
    identity: &TlsIdentity,
    trust: &TrustStore,
    expect: SpiffeId,
    alpn: &[u8],
    log: RejectionLog,
) -> Result<rustls::ClientConfig, CertError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: trust.clone(),
        expect: Expectation::Exactly(expect),
        log,
    });
    let (chain, key) = identity.parts();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.enable_early_data = false;
    // Every connection is a full handshake: its certificates and the CRL are checked each
    // time. (A config is built per connection, so a session cache could never be reused; the
    // default one costs ~4.7 KB per agent link, held for the link's life.)
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}
