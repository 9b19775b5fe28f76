//! The agent transport: a QUIC connection with mutual TLS to one `tollgate-agent`, whose
//! certificate must carry exactly the SPIFFE id the inventory names for that host.
//!
//! `Hello` is exchanged before anything else, so a refused certificate is noticed before any
//! request is sent. Each request is one bidirectional stream. [`host::AgentHost`] is one agent
//! host as the Host actor sees it (dialling, back-off, typed answers).

pub mod host;
mod reach;

pub use reach::reach;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{RejectionLog, SpiffeId, TlsIdentity, TrustStore};
use tollgate_protocol::agent::{
    AgentErrorCode, AgentRequest, AgentResponse, ExecResult, ExecuteRequest, Hello,
    IdempotencyStatus, OutputChunk, ProbeReport, ProbeRequest,
};
use tollgate_protocol::io::{read_frame, write_frame};
use tollgate_protocol::{AGENT_ALPN, FrameError, FrameLimits, SUPPORTED};

use tollgate_protocol::error_chain::chain;

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
    /// The agent speaks no protocol version this coordinator does (found at `Hello`, or in a
    /// frame's header).
    #[error("agent speaks another protocol version: {0}")]
    VersionMismatch(String),
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

/// Socket buffer the coordinator asks for on its one UDP socket. Every agent's answers arrive
/// there; with the 208 KiB Linux default, a fleet of hundreds answering a probe at once overflows
/// it, and each dropped datagram costs a QUIC retransmission timeout (hundreds of ms). The kernel
/// caps the request at `net.core.rmem_max` / `wmem_max`; the size obtained is logged.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Handshakes (QUIC + mutual TLS) in progress at once. Dialling a whole fleet at the same
/// instant makes every handshake slow and some time out; a bounded number completes each
/// quickly. A dial waits for a slot before its own connect timeout starts.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// The longest a handshake keeps its slot. Live agents on a LAN finish well within it; a silent
/// (dead, partitioned) host gives its slot back after it, while its own connect timeout runs on.
pub const HANDSHAKE_SLOT_LEASE: Duration = Duration::from_millis(500);

/// The coordinator's side of every agent connection: one QUIC endpoint, one identity.
#[derive(Debug, Clone)]
pub struct AgentConnector {
    endpoint: quinn::Endpoint,
    identity: Arc<TlsIdentity>,
    trust: TrustStore,
    log: RejectionLog,
    timeouts: QuicTimeouts,
    handshakes: Arc<Semaphore>,
    slot_lease: Duration,
    buffers: SocketBuffers,
    pub limits: FrameLimits,
}

/// What the operating system granted for the client socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    pub receive: usize,
    pub send: usize,
}

/// A client endpoint on `bind` whose socket buffers are raised towards `bytes` (best effort).
fn client_endpoint(
    bind: SocketAddr,
    bytes: usize,
) -> std::io::Result<(quinn::Endpoint, SocketBuffers)> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), bytes) {
        tracing::debug!(error = %e, "could not raise the UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), bytes) {
        tracing::debug!(error = %e, "could not raise the UDP send buffer");
    }
    let buffers = SocketBuffers {
        receive: state.recv_buffer_size((&socket).into()).unwrap_or(0),
        send: state.send_buffer_size((&socket).into()).unwrap_or(0),
    };
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, buffers))
}

impl AgentConnector {
    /// Binds a client endpoint on `bind` (use port 0), asking for [`UDP_BUFFER_BYTES`] of socket
    /// buffer; warns when the system grants less (raise `net.core.rmem_max` for large fleets).
    pub fn new(
        identity: Arc<TlsIdentity>,
        trust: TrustStore,
        bind: SocketAddr,
    ) -> std::io::Result<Self> {
        let (endpoint, buffers) = client_endpoint(bind, UDP_BUFFER_BYTES)?;
        if buffers.receive < UDP_BUFFER_BYTES {
            tracing::warn!(
                granted = buffers.receive,
                wanted = UDP_BUFFER_BYTES,
                "the UDP receive buffer is smaller than asked (net.core.rmem_max): probes of a large fleet may lose packets and answer late"
            );
        } else {
            tracing::debug!(
                receive = buffers.receive,
                send = buffers.send,
                "agent socket buffers"
            );
        }
        Ok(AgentConnector {
            endpoint,
            identity,
            trust,
            log: RejectionLog::new(),
            timeouts: QuicTimeouts::default(),
            handshakes: Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES)),
            slot_lease: HANDSHAKE_SLOT_LEASE,
            buffers,
            limits: FrameLimits::DEFAULT,
        })
    }

    /// The same connector with at most `n` handshakes at once (at least one), each keeping its
    /// slot for at most `lease`.
    pub fn with_handshake_limit(mut self, n: usize, lease: Duration) -> Self {
        self.handshakes = Arc::new(Semaphore::new(n.max(1)));
        self.slot_lease = lease;
        self
    }

    /// Handshake slots free right now (for diagnostics and tests).
    pub fn free_handshake_slots(&self) -> usize {
        self.handshakes.available_permits()
    }

    /// The socket buffers the system granted (for diagnostics and tests).
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// Refusals of agent certificates seen so far.
    pub fn rejections(&self) -> &RejectionLog {
        &self.log
    }

    /// Connects to `addr`, requiring its certificate to be `expected`, and says `Hello`. Waits
    /// for one of the [`MAX_CONCURRENT_HANDSHAKES`] slots first; `timeout` starts once it has one,
    /// and the slot is held until the handshake ends or [`HANDSHAKE_SLOT_LEASE`] passes.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: &SpiffeId,
        timeout: Duration,
    ) -> Result<AgentLink, LinkError> {
        let unreachable = |detail: String| LinkError::Unreachable { addr, detail };
        let slot = self
            .handshakes
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let cfg = quic::client_config(
            &self.identity,
            &self.trust,
            expected.clone(),
            AGENT_ALPN,
            self.log.clone(),
            self.timeouts,
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let lease = self.slot_lease;
        let attempt = async {
            let connecting = self
                .endpoint
                .connect_with(cfg, addr, &expected.server_name())
                .map_err(|e| unreachable(chain(&e)))?;
            // The slot is given back when the QUIC + TLS handshake ends, or after its lease if
            // the peer is silent: a dead host must not keep live ones waiting for seconds.
            let conn = hold_for(slot, lease, connecting)
                .await
                .map_err(|e| unreachable(chain(&e)))?;
            // Closed at once if the agent's certificate is revoked while the link is open.
            self.trust.watch_server(&conn, expected);
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
            // In TLS 1.3 the server judges our certificate after our side of the handshake is
            // done, so a refusal can arrive as the close of this first stream: name its reason.
            match link.round_trip(&hello).await.map_err(|e| {
                match (e, link.conn.close_reason()) {
                    (e @ LinkError::VersionMismatch(_), _) => e,
                    (e, Some(why)) => unreachable(format!("{e}: {}", chain(&why))),
                    (e, None) => unreachable(e.to_string()),
                }
            })? {
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

/// Awaits `fut` holding `slot` until it completes or `lease` passes, whichever comes first.
async fn hold_for<F: std::future::Future>(
    slot: OwnedSemaphorePermit,
    lease: Duration,
    fut: F,
) -> F::Output {
    let mut slot = Some(slot);
    let mut fut = std::pin::pin!(fut);
    let mut expiry = std::pin::pin!(tokio::time::sleep(lease));
    loop {
        tokio::select! {
            out = &mut fut => return out,
            () = &mut expiry, if slot.is_some() => slot = None,
        }
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

    /// Resolves when the connection closes, with why (for diagnostics and tests).
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
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
            Err(
                e @ (FrameError::UnsupportedVersion { .. } | FrameError::NoCommonVersion { .. }),
            ) => Err(LinkError::VersionMismatch(e.to_string())),
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
