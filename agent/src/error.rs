//! The one error type of the agent library.

use std::path::PathBuf;

use tollgate_protocol::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A configuration problem, naming the file, the key and the reason.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("idempotency store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error(transparent)]
    Certs(#[from] tollgate_certs::CertError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

impl AgentError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io {
            path: path.into(),
            source,
        }
    }
}
