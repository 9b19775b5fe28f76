//! The CLI's side of the control port: `client.toml`, a mutual-TLS QUIC connection to the
//! coordinator, and request helpers.
//!
//! ```toml
//! coordinator = "127.0.0.1:7440"                 # where `tollgate serve` listens
//! coordinator_id = "spiffe://prod/coordinator"   # the only server identity accepted
//! [tls]
//! ca = "pki/ca.crt"
//! cert = "pki/operator-alice.crt"
//! key = "pki/operator-alice.key"
//! crl = "pki/crl.pem"
//! ```
//!
//! Relative paths are relative to the file. The CLI finds it with `--client FILE` or the
//! `TOLLGATE_CLIENT` environment variable.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{RejectionLog, SpiffeId, TlsIdentity, TrustStore};
use tollgate_protocol::agent::Hello;
use tollgate_protocol::ctl::{CtlRequest, CtlResponse, ProgressEvent};
use tollgate_protocol::io::{read_frame, write_frame};
use tollgate_protocol::{CTL_ALPN, ConfigError, FrameLimits, SUPPORTED};

use tollgate_protocol::error_chain::chain;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Certs(#[from] tollgate_certs::CertError),
    #[error("cannot reach the coordinator at {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("connection to the coordinator lost: {0}")]
    Lost(String),
    #[error("coordinator protocol error: {0}")]
    Protocol(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    coordinator: String,
    coordinator_id: String,
    tls: RawTls,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    crl: PathBuf,
}

/// A validated `client.toml`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub coordinator: SocketAddr,
    pub coordinator_id: SpiffeId,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: PathBuf,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let file = path.display().to_string();
        let bad =
            |key: &str, reason: String| ClientError::from(ConfigError::invalid(&file, key, reason));
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let raw: RawClient =
            toml::from_str(&text).map_err(|e| bad("(document)", e.message().to_string()))?;
        let coordinator = raw
            .coordinator
            .to_socket_addrs()
            .map_err(|e| bad("coordinator", format!("{:?}: {e}", raw.coordinator)))?
            .next()
            .ok_or_else(|| bad("coordinator", "resolves to nothing".into()))?;
        let coordinator_id: SpiffeId = raw
            .coordinator_id
            .parse()
            .map_err(|e| bad("coordinator_id", format!("{e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let r = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(ClientConfig {
            coordinator,
            coordinator_id,
            ca: r(raw.tls.ca),
            cert: r(raw.tls.cert),
            key: r(raw.tls.key),
            crl: r(raw.tls.crl),
        })
    }

    /// The text of a `client.toml` (used by the demo to write one per operator).
    pub fn render(
        coordinator: SocketAddr,
        coordinator_id: &SpiffeId,
        ca: &Path,
        cert: &Path,
        key: &Path,
        crl: &Path,
    ) -> String {
        format!(
            "coordinator = \"{coordinator}\"\ncoordinator_id = \"{coordinator_id}\"\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\ncrl = {crl:?}\n"
        )
    }
}

/// A negotiated connection to the coordinator.
#[derive(Debug)]
pub struct Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    pub identity: SpiffeId,
}

const LIMITS: FrameLimits = FrameLimits::DEFAULT;

impl Client {
    pub async fn connect(cfg: &ClientConfig) -> Result<Client, ClientError> {
        let identity = Arc::new(TlsIdentity::load(&cfg.cert, &cfg.key)?);
        let trust = TrustStore::load(&cfg.ca, &cfg.crl)?;
        let qcfg = quic::client_config(
            &identity,
            &trust,
            cfg.coordinator_id.clone(),
            CTL_ALPN,
            RejectionLog::new(),
            QuicTimeouts::default(),
        )?;
        let bind: SocketAddr = if cfg.coordinator.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| ClientError::Protocol("bad bind address".into()))?;
        let addr = cfg.coordinator;
        let connect_err = |detail: String| ClientError::Connect { addr, detail };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(10), async {
            endpoint
                .connect_with(qcfg, addr, &cfg.coordinator_id.server_name())
                .map_err(|e| connect_err(e.to_string()))?
                .await
                .map_err(|e| connect_err(e.to_string()))
        })
        .await
        .map_err(|_| connect_err("timed out".into()))??;
        let client = Client {
            _endpoint: endpoint,
            conn,
            identity: identity.id.clone(),
        };
        // Nothing is sent before the coordinator has answered at the application level.
        match client
            .call(CtlRequest::Hello(Hello {
                versions: SUPPORTED,
                software: format!("tollgate {}", env!("CARGO_PKG_VERSION")),
            }))
            .await
        {
            Ok(CtlResponse::HelloAck(_)) => Ok(client),
            Ok(other) => Err(ClientError::Protocol(format!(
                "expected HelloAck, got {other:?}"
            ))),
            Err(ClientError::Lost(d)) => Err(connect_err(d)),
            Err(e) => Err(e),
        }
    }

    /// One request, one answer.
    pub async fn call(&self, req: CtlRequest) -> Result<CtlResponse, ClientError> {
        self.stream(req, |_| {}).await
    }

    /// One request; progress events go to `on_progress`, the first other answer is returned.
    pub async fn stream(
        &self,
        req: CtlRequest,
        mut on_progress: impl FnMut(&ProgressEvent),
    ) -> Result<CtlResponse, ClientError> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| ClientError::Lost(chain(&e)))?;
        write_frame(&mut send, &req, &LIMITS)
            .await
            .map_err(|e| ClientError::Lost(chain(&e)))?;
        send.finish()
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        loop {
            match read_frame::<_, CtlResponse>(&mut recv, &LIMITS).await {
                Ok(Some(CtlResponse::Progress(p))) => on_progress(&p),
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => {
                    return Err(ClientError::Lost(
                        "the coordinator closed the stream without answering".into(),
                    ));
                }
                Err(tollgate_protocol::FrameError::Io(e)) => {
                    return Err(ClientError::Lost(chain(&e)));
                }
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }
}
