//! The one error type of the certs crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("invalid SPIFFE id {value:?}: {reason}")]
    InvalidSpiffeId { value: String, reason: String },
    #[error("{path}: already exists; refusing to overwrite it (pass --force to replace it)")]
    AlreadyExists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("certificate {path} has no SPIFFE id in its URI SAN")]
    NoSpiffeId { path: PathBuf },
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("peer presented no usable certificate: {0}")]
    PeerCertificate(String),
}

impl CertError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CertError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        CertError::BadFile {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e.to_string())
    }
}
