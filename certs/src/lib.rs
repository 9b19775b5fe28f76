//! Tollgate fleet PKI, and the only place in the workspace that builds rustls configs.
//!
//! * [`identity`]: SPIFFE-style identities `spiffe://FLEET/ROLE[/NAME]`, read from and written to
//!   certificates' URI SAN.
//! * [`pki`]: a fleet CA on disk (`tollgate certs init|issue|revoke|crl`): keys 0600, atomic
//!   writes, nothing overwritten silently, CRLs re-signed on every revocation.
//! * [`tls`]: rustls server and client configs: TLS 1.3 only, ring provider, client certificates
//!   required, CRLs enforced (expired CRLs rejected), and the peer's SPIFFE id matched against
//!   the role and name the caller expects. Every refusal is a typed [`tls::PeerRejection`].
//! * [`trust`]: the fleet CA and the CRL in force, re-read while the process runs: new
//!   handshakes of a revoked peer are refused and its open connections closed, no restart.
//! * [`quic`]: the same configs wrapped for quinn, and the peer identity of a live connection.

pub mod error;
pub mod files;
pub mod identity;
pub mod pki;
pub mod quic;
pub mod tls;
pub mod trust;

pub use error::CertError;
pub use identity::{Role, SpiffeId};
pub use tls::{Expectation, PeerRejection, RejectionLog, TlsIdentity, TrustStore};
