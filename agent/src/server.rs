//! The agent's QUIC endpoint: mutual TLS accepting only the configured coordinator, `Hello`
//! first, then one request per bidirectional stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{Expectation, RejectionLog, SpiffeId, TlsIdentity, TrustStore};
use tollgate_protocol::agent::{
    AgentError as WireError, AgentErrorCode, AgentRequest, AgentResponse, ExecResult, ExecStatus,
    ExecuteRequest, HelloAck, OutputChunk,
};
use tollgate_protocol::io::{read_frame, write_frame};
use tollgate_protocol::{AGENT_ALPN, ConfigError, FrameError, FrameLimits, SUPPORTED, negotiate};

use crate::AgentError;
use crate::config::AgentConfig;
use crate::exec::{self, ExecSpec};
use crate::probe::Prober;
use crate::shells::Shells;
use crate::store::{Begin, Store, Ticket};

/// QUIC application close code for a peer that broke the protocol.
const CLOSE_PROTOCOL_VIOLATION: u32 = 0x10;
const CLOSE_SHUTDOWN: u32 = 0x11;

#[derive(Debug)]
struct State {
    store: Arc<Store>,
    /// The CRL in force; every accepted connection is watched by it.
    trust: TrustStore,
    prober: Prober,
    shells: Shells,
    scripts_dir: PathBuf,
    limits: FrameLimits,
    retention: usize,
    exec_slots: Arc<Semaphore>,
    max_concurrent: u32,
    /// True once shutdown began: new executions are refused.
    draining: watch::Receiver<bool>,
    /// True once the grace period is over: running executions are stopped.
    interrupt: watch::Receiver<bool>,
}

/// A bound, not yet serving agent.
#[derive(Debug)]
pub struct Listening {
    pub addr: SocketAddr,
    pub id: SpiffeId,
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    draining: watch::Sender<bool>,
    interrupt: watch::Sender<bool>,
    grace: Duration,
    crl_check: Duration,
}

fn software() -> String {
    format!("tollgate-agent {}", env!("CARGO_PKG_VERSION"))
}

/// Loads certificates, opens the store and binds the endpoint.
pub fn bind(cfg: &AgentConfig) -> Result<Listening, AgentError> {
    let identity = TlsIdentity::load(&cfg.tls.cert, &cfg.tls.key)?;
    if identity.id.role() != tollgate_certs::Role::Agent {
        return Err(ConfigError::invalid(
            &cfg.source.display().to_string(),
            "tls.cert",
            format!(
                "{} is not an agent certificate: an agent runs only as spiffe://FLEET/agent/HOST",
                identity.id
            ),
        )
        .into());
    }
    let trust = TrustStore::load(&cfg.tls.ca, &cfg.tls.crl)?;
    let server_cfg = quic::server_config(
        &identity,
        &trust,
        Expectation::Exactly(cfg.coordinator_id.clone()),
        AGENT_ALPN,
        RejectionLog::new(),
        QuicTimeouts::default(),
    )?;
    let store = Arc::new(Store::open(&cfg.state_dir.join("idempotency"))?);
    let scripts_dir = cfg.state_dir.join("scripts");
    std::fs::create_dir_all(&scripts_dir).map_err(|e| AgentError::io(&scripts_dir, e))?;
    let endpoint =
        quinn::Endpoint::server(server_cfg, cfg.listen).map_err(|source| AgentError::Bind {
            addr: cfg.listen.to_string(),
            source,
        })?;
    let addr = endpoint.local_addr().map_err(|source| AgentError::Bind {
        addr: cfg.listen.to_string(),
        source,
    })?;
    let shells = Shells::new(cfg.allowed_shells.clone(), cfg.pwsh_path.clone());
    let (draining, draining_rx) = watch::channel(false);
    let (interrupt, interrupt_rx) = watch::channel(false);
    let max_concurrent = cfg.max_concurrent as u32;
    let state = Arc::new(State {
        store,
        trust,
        prober: Prober::new(
            identity.id.to_string(),
            cfg.state_dir.clone(),
            scripts_dir.clone(),
            shells.clone(),
        ),
        shells,
        scripts_dir,
        limits: FrameLimits {
            max_frame: cfg.max_frame_bytes,
            ..FrameLimits::DEFAULT
        },
        retention: cfg.output_retention_bytes,
        exec_slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
        max_concurrent,
        draining: draining_rx,
        interrupt: interrupt_rx,
    });
    Ok(Listening {
        addr,
        id: identity.id,
        endpoint,
        state,
        draining,
        interrupt,
        grace: cfg.shutdown_grace,
        crl_check: cfg.tls.crl_check,
    })
}

impl Listening {
    /// Learns the shells' own facts (see [`Prober::learn_shells`]) before serving, so the
    /// first probe is as fast as every later one.
    pub async fn learn_shells(&self) -> std::collections::BTreeMap<String, String> {
        self.state.prober.learn_shells().await
    }

    /// Serves until `shutdown` resolves, then drains: no new executions; running ones get the
    /// grace period, then are stopped and their outcome (`Interrupted`) recorded.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        // A revoked coordinator is refused and cut off while the agent runs (see certs::trust).
        let crl = tokio::spawn(tollgate_certs::trust::watch(
            self.state.trust.clone(),
            self.crl_check,
        ));
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => { tokio::spawn(connection(self.state.clone(), incoming)); }
                    None => break,
                },
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: refusing new executions");
        let _ = self.draining.send(true);
        let all = self.state.max_concurrent;
        if tokio::time::timeout(self.grace, self.state.exec_slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("grace period over: stopping running executions");
            let _ = self.interrupt.send(true);
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                self.state.exec_slots.acquire_many(all),
            )
            .await;
        }
        crl.abort();
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        Ok(())
    }
}

fn wire_error(code: AgentErrorCode, message: impl Into<String>) -> AgentResponse {
    AgentResponse::Error(WireError {
        code,
        message: message.into(),
    })
}

fn frame_error_code(e: &FrameError) -> AgentErrorCode {
    match e {
        FrameError::Oversize { .. } => AgentErrorCode::Oversize,
        FrameError::UnsupportedVersion { .. } | FrameError::NoCommonVersion { .. } => {
            AgentErrorCode::UnsupportedVersion
        }
        _ => AgentErrorCode::Malformed,
    }
}

async fn connection(state: Arc<State>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, error = %e, "connection refused");
            return;
        }
    };
    // Closed at once if the coordinator's certificate is revoked while it is open. Executions
    // already running own their tickets: they finish and are recorded; nothing new starts.
    state.trust.watch_client(&conn);
    let peer = quic::peer_id(&conn)
        .map(|p| p.to_string())
        .unwrap_or_default();
    tracing::info!(%remote, %peer, "coordinator connected");
    // Hello first.
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let answer = match read_frame::<_, AgentRequest>(&mut recv, &state.limits).await {
        Ok(Some(AgentRequest::Hello(h))) => match negotiate(SUPPORTED, h.versions) {
            Ok(version) => Ok(AgentResponse::HelloAck(HelloAck {
                version,
                software: software(),
            })),
            Err(e) => Err(wire_error(
                AgentErrorCode::UnsupportedVersion,
                e.to_string(),
            )),
        },
        Ok(Some(other)) => Err(wire_error(
            AgentErrorCode::HelloRequired,
            format!("expected Hello, got {}", other.name()),
        )),
        Ok(None) => return,
        Err(e) => Err(wire_error(frame_error_code(&e), e.to_string())),
    };
    let ok = answer.is_ok();
    let answer = answer.unwrap_or_else(|e| e);
    let _ = write_frame(&mut send, &answer, &state.limits).await;
    let _ = send.finish();
    if !ok {
        let _ = send.stopped().await;
        conn.close(CLOSE_PROTOCOL_VIOLATION.into(), b"hello failed");
        return;
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(stream(state.clone(), conn.clone(), send, recv));
    }
}

async fn stream(
    state: Arc<State>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match read_frame::<_, AgentRequest>(&mut recv, &state.limits).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(peer = %conn.remote_address(), error = %e, "bad frame: closing the connection");
            let _ = write_frame(
                &mut send,
                &wire_error(frame_error_code(&e), e.to_string()),
                &state.limits,
            )
            .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(CLOSE_PROTOCOL_VIOLATION.into(), e.to_string().as_bytes());
            return;
        }
    };
    let answer = match req {
        AgentRequest::Hello(h) => match negotiate(SUPPORTED, h.versions) {
            Ok(version) => AgentResponse::HelloAck(HelloAck {
                version,
                software: software(),
            }),
            Err(e) => wire_error(AgentErrorCode::UnsupportedVersion, e.to_string()),
        },
        AgentRequest::Probe(p) => match state.prober.probe(&p).await {
            Ok(report) => AgentResponse::ProbeReport(report),
            Err(e) => wire_error(e.code, e.message),
        },
        AgentRequest::Cancel { idempotency_key } => AgentResponse::CancelAck {
            found: state.store.cancel(&idempotency_key),
        },
        AgentRequest::QueryIdempotency { idempotency_key } => {
            AgentResponse::Idempotency(state.store.query(&idempotency_key))
        }
        AgentRequest::Execute(req) => execute(&state, req, &mut send).await,
    };
    let _ = write_frame(&mut send, &answer, &state.limits).await;
    let _ = send.finish();
}

/// SHA-256 over the canonical encoding of everything that defines an execution: a key reused
/// for a different request is refused, never replayed.
fn request_hash(req: &ExecuteRequest) -> String {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    part(req.shell.as_str().as_bytes());
    part(req.script.as_bytes());
    for (k, v) in &req.env {
        part(k.as_bytes());
        part(v.as_bytes());
    }
    part(req.working_dir.as_deref().unwrap_or("").as_bytes());
    part(&req.timeout_ms.to_be_bytes());
    part(req.errors.as_str().as_bytes());
    hex::encode(h.finalize())
}

fn result_of(key: &str, status: ExecStatus, replayed: bool) -> ExecResult {
    ExecResult {
        idempotency_key: key.to_string(),
        status,
        duration_ms: 0,
        stdout_truncated: false,
        stderr_truncated: false,
        replayed,
    }
}

async fn execute(
    state: &Arc<State>,
    req: ExecuteRequest,
    send: &mut quinn::SendStream,
) -> AgentResponse {
    let key = req.idempotency_key.clone();
    if *state.draining.borrow() {
        return wire_error(AgentErrorCode::ShuttingDown, "the agent is shutting down");
    }
    let program = match state.shells.resolve(req.shell) {
        Ok(p) => p,
        Err(detail) => {
            return AgentResponse::ExecResult(result_of(
                &key,
                ExecStatus::CapabilityMismatch {
                    shell: req.shell,
                    detail,
                },
                false,
            ));
        }
    };
    let hash = request_hash(&req);
    let store = state.store.clone();
    let k = key.clone();
    let begin = match tokio::task::spawn_blocking(move || store.begin(&k, &hash)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return wire_error(AgentErrorCode::Internal, e.to_string()),
        Err(e) => return wire_error(AgentErrorCode::Internal, e.to_string()),
    };
    match begin {
        Begin::Fresh(ticket) => {
            let (out_tx, mut out_rx) = mpsc::channel::<OutputChunk>(64);
            let (done_tx, done_rx) = oneshot::channel();
            let spec = ExecSpec {
                shell: req.shell,
                program,
                script: req.script,
                env: {
                    let mut env = crate::probe::script_env(&state.prober.identity, &state.prober.state_dir);
                    env.extend(req.env);
                    env
                },
                working_dir: req.working_dir.map(PathBuf::from),
                timeout: Duration::from_millis(req.timeout_ms.max(1)),
                retention: state.retention,
                errors: req.errors,
            };
            // The execution owns its ticket: it finishes and is recorded even if this stream dies.
            tokio::spawn(run_ticket(state.clone(), ticket, spec, out_tx, done_tx));
            while let Some(chunk) = out_rx.recv().await {
                if write_frame(send, &AgentResponse::Output(chunk), &state.limits).await.is_err() {
                    break;
                }
            }
            match done_rx.await {
                Ok(result) => AgentResponse::ExecResult(result),
                Err(_) => wire_error(AgentErrorCode::Internal, "execution task ended without a result"),
            }
        }
        Begin::Attach(running) => {
            let (mut output, mut result) = running.attach();
            loop {
                tokio::select! {
                    chunk = output.recv() => match chunk {
                        Ok(c) => { let _ = write_frame(send, &AgentResponse::Output(c), &state.limits).await; }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                    },
                    changed = result.changed() => {
                        let value = result.borrow().clone();
                        match (changed, value) {
                            (_, Some(mut r)) => { r.replayed = true; break AgentResponse::ExecResult(r); }
                            (Err(_), None) => break wire_error(AgentErrorCode::Internal, "execution vanished"),
                            (Ok(()), None) => {}
                        }
                    }
                }
            }
        }
        Begin::Done(result) => AgentResponse::ExecResult(result),
        Begin::Uncertain => AgentResponse::ExecResult(result_of(
            &key,
            ExecStatus::Uncertain {
                detail: "this key was started by an earlier agent process that stopped before recording a result; \
                         it is never run again"
                    .into(),
            },
            true,
        )),
        Begin::Conflict => wire_error(
            AgentErrorCode::IdempotencyConflict,
            format!("idempotency key {key:?} was already used for a different request"),
        ),
    }
}

async fn run_ticket(
    state: Arc<State>,
    ticket: Ticket,
    spec: ExecSpec,
    origin: mpsc::Sender<OutputChunk>,
    done: oneshot::Sender<ExecResult>,
) {
    let permit = state.exec_slots.clone().acquire_owned().await;
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    let fanout = {
        let broadcast = ticket.output.clone();
        async move {
            let mut origin_open = true;
            while let Some(chunk) = rx.recv().await {
                let _ = broadcast.send(chunk.clone());
                if origin_open && origin.send(chunk).await.is_err() {
                    origin_open = false;
                }
            }
        }
    };
    let run = exec::run(
        spec,
        &state.scripts_dir,
        tx,
        ticket.cancel.clone(),
        state.interrupt.clone(),
    );
    let (outcome, ()) = tokio::join!(run, fanout);
    let result = ExecResult {
        idempotency_key: ticket.key.clone(),
        status: outcome.status,
        duration_ms: outcome.duration.as_millis() as u64,
        stdout_truncated: outcome.stdout_truncated,
        stderr_truncated: outcome.stderr_truncated,
        replayed: false,
    };
    let store = state.store.clone();
    let recorded = result.clone();
    // Durable before anyone is told.
    match tokio::task::spawn_blocking(move || store.finish(ticket, recorded)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not record a result; the key will read Uncertain")
        }
        Err(e) => tracing::error!(error = %e, "recording task failed"),
    }
    drop(permit);
    let _ = done.send(result);
}
