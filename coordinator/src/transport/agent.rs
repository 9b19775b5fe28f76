//! The agent transport: a QUIC connection with mutual TLS to one `tollgate-agent`, whose
//! certificate must carry exactly the SPIFFE id the inventory names for that host.
//!
//! `Hello` is exchanged before anything else, so a refused certificate is noticed before any
//! request is sent. Each request is one bidirectional stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{RejectionLog, SpiffeId, TlsIdentity, TrustStore};
use tollgate_protocol::agent::{
    AgentErrorCode, AgentRequest, AgentResponse, ExecResult, ExecuteRequest, Hello,
    IdempotencyStatus, OutputChunk, ProbeReport, ProbeRequest,
};
use tollgate_protocol::io::{read_frame, write_frame};
use tollgate_protocol::{AGENT_ALPN, FrameError, FrameLimits, SUPPORTED};

/// Why talking to an agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// Nothing was sent: the agent could not be reached or refused us during the handshake.
    #[error("cannot reach agent {addr}: {detail}")]
    Unreachable { addr: SocketAddr, detail: String },
    /// The request was sent and the connection broke before the answer: the outcome is unknown.
    #[error("connection to agent lost after the request was sent: {0}")]
    Lost(String),
    /// The agent answered with an error.
    #[error("agent refused the request ({code:?}): {message}")]
    Refused {
        code: AgentErrorCode,
        message: String,
    },
    /// The agent broke the protocol (bad frame, wrong answer).
    #[error("agent protocol error: {0}")]
    Protocol(String),
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
}

impl LinkError {
    /// Transient failures may be retried (with a new connection); others may not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable { .. } | LinkError::Lost(_) | LinkError::Timeout(_)
        ) || matches!(
            self,
            LinkError::Refused {
                code: AgentErrorCode::Busy | AgentErrorCode::ShuttingDown,
                ..
            }
        )
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

/// The coordinator's side of every agent connection: one QUIC endpoint, one identity.
#[derive(Debug, Clone)]
pub struct AgentConnector {
    endpoint: quinn::Endpoint,
    identity: Arc<TlsIdentity>,
    trust: TrustStore,
    log: RejectionLog,
    timeouts: QuicTimeouts,
    pub limits: FrameLimits,
}

impl AgentConnector {
    /// Binds a client endpoint on `bind` (use port 0).
    pub fn new(
        identity: Arc<TlsIdentity>,
        trust: TrustStore,
        bind: SocketAddr,
    ) -> std::io::Result<Self> {
        let endpoint = quinn::Endpoint::client(bind)?;
        Ok(AgentConnector {
            endpoint,
            identity,
            trust,
            log: RejectionLog::new(),
            timeouts: QuicTimeouts::default(),
            limits: FrameLimits::DEFAULT,
        })
    }

    /// Refusals of agent certificates seen so far.
    pub fn rejections(&self) -> &RejectionLog {
        &self.log
    }

    /// Connects to `addr`, requiring its certificate to be `expected`, and says `Hello`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: &SpiffeId,
        timeout: Duration,
    ) -> Result<AgentLink, LinkError> {
        let unreachable = |detail: String| LinkError::Unreachable { addr, detail };
        let cfg = quic::client_config(
            &self.identity,
            &self.trust,
            expected.clone(),
            AGENT_ALPN,
            self.log.clone(),
            self.timeouts,
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let attempt = async {
            let conn = self
                .endpoint
                .connect_with(cfg, addr, &expected.server_name())
                .map_err(|e| unreachable(chain(&e)))?
                .await
                .map_err(|e| unreachable(chain(&e)))?;
            let link = AgentLink {
                conn,
                limits: self.limits,
                peer: expected.clone(),
            };
            let hello = AgentRequest::Hello(Hello {
                versions: SUPPORTED,
                software: software(),
            });
            // Any failure here is before a real request: still "unreachable", never "lost".
            match link
                .round_trip(&hello)
                .await
                .map_err(|e| unreachable(e.to_string()))?
            {
                AgentResponse::HelloAck(_) => Ok(link),
                AgentResponse::Error(e) => Err(LinkError::Refused {
                    code: e.code,
                    message: e.message,
                }),
                other => Err(LinkError::Protocol(format!(
                    "expected HelloAck, got {}",
                    other.name()
                ))),
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }
}

fn software() -> String {
    format!("tollgate {}", env!("CARGO_PKG_VERSION"))
}

/// An established, negotiated connection to one agent.
#[derive(Debug, Clone)]
pub struct AgentLink {
    conn: quinn::Connection,
    limits: FrameLimits,
    peer: SpiffeId,
}

impl AgentLink {
    pub fn peer(&self) -> &SpiffeId {
        &self.peer
    }

    /// Whether the connection has been closed (by either side or by idle timeout).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    async fn open(
        &self,
        req: &AgentRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), LinkError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| LinkError::Lost(chain(&e)))?;
        write_frame(&mut send, req, &self.limits)
            .await
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        send.finish().map_err(|e| LinkError::Lost(e.to_string()))?;
        Ok((send, recv))
    }

    async fn next(&self, recv: &mut quinn::RecvStream) -> Result<AgentResponse, LinkError> {
        match read_frame::<_, AgentResponse>(recv, &self.limits).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(LinkError::Lost("stream ended without an answer".into())),
            Err(FrameError::Io(e)) => Err(LinkError::Lost(chain(&e))),
            Err(FrameError::Truncated { .. }) => Err(LinkError::Lost("answer truncated".into())),
            Err(e) => Err(LinkError::Protocol(e.to_string())),
        }
    }

    async fn round_trip(&self, req: &AgentRequest) -> Result<AgentResponse, LinkError> {
        let (_send, mut recv) = self.open(req).await?;
        self.next(&mut recv).await
    }

    fn refused(resp: AgentResponse, expected: &str) -> LinkError {
        match resp {
            AgentResponse::Error(e) => LinkError::Refused {
                code: e.code,
                message: e.message,
            },
            other => LinkError::Protocol(format!("expected {expected}, got {}", other.name())),
        }
    }

    /// Asks for facts. Bounded by `timeout` (a probe that does not answer is a failed probe).
    pub async fn probe(
        &self,
        req: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReport, LinkError> {
        let call = async {
            match self.round_trip(&AgentRequest::Probe(req)).await? {
                AgentResponse::ProbeReport(r) => Ok(r),
                other => Err(Self::refused(other, "ProbeReport")),
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }

    /// Runs a script; output chunks are handed to `on_output` in order. A broken connection
    /// after the request was sent is [`LinkError::Lost`]: ask [`Self::query`] before anything else.
    pub async fn execute(
        &self,
        req: ExecuteRequest,
        mut on_output: impl FnMut(OutputChunk),
    ) -> Result<ExecResult, LinkError> {
        let (_send, mut recv) = self.open(&AgentRequest::Execute(req)).await?;
        loop {
            match self.next(&mut recv).await? {
                AgentResponse::Output(chunk) => on_output(chunk),
                AgentResponse::ExecResult(r) => return Ok(r),
                other => return Err(Self::refused(other, "Output or ExecResult")),
            }
        }
    }

    pub async fn cancel(&self, key: &str) -> Result<bool, LinkError> {
        match self
            .round_trip(&AgentRequest::Cancel {
                idempotency_key: key.to_string(),
            })
            .await?
        {
            AgentResponse::CancelAck { found } => Ok(found),
            other => Err(Self::refused(other, "CancelAck")),
        }
    }

    pub async fn query(&self, key: &str) -> Result<IdempotencyStatus, LinkError> {
        match self
            .round_trip(&AgentRequest::QueryIdempotency {
                idempotency_key: key.to_string(),
            })
            .await?
        {
            AgentResponse::Idempotency(s) => Ok(s),
            other => Err(Self::refused(other, "Idempotency")),
        }
    }
}
