//! The `Host` actor: owns one host's transport session and serializes work on it.
//!
//! It carries requests and maps answers to the safety core's inputs; it decides nothing.
//! Connection failures back off exponentially (100 ms doubling to 5 s) so a dead host is not
//! hammered; a request that arrives during the back-off waits for it, within its own deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tollgate_certs::SpiffeId;
use tollgate_protocol::Shell;
use tollgate_protocol::agent::{
    AgentErrorCode, ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk,
    ProbeRequest as WireProbe, Script,
};
use tollgate_protocol::outcome::ReasonCode;

use crate::config::ProbeScript;
use crate::core::facts::{ProbeFailure, ProbeOutcome};
use crate::core::run::{CheckAnswer, IdempotencyAnswer, StepResult};
use crate::transport::agent::{AgentConnector, AgentLink, LinkError};
use crate::transport::pwsh::{PwshSession, PwshSettings, SessionError};

use super::clock::Clock;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time an execution may take over its own timeout before the answer counts as lost.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);

/// How the host is reached.
#[derive(Debug, Clone)]
pub enum Reach {
    Agent {
        addr: SocketAddr,
        id: SpiffeId,
    },
    /// A supervised `pwsh` session host: PowerShell Remoting (WinRM or SSH), or the local
    /// runspace (the `local` transport).
    Pwsh(Box<PwshSettings>),
    /// A transport this build cannot drive; every request fails typed with this reason.
    Unsupported {
        reason: String,
    },
}

/// A line of output from a step, for progress displays.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct StepOutput {
    pub host: String,
    pub step_id: String,
    pub chunk: OutputChunk,
}

#[derive(Debug)]
pub struct HostActor {
    name: String,
    reach: Reach,
    connector: AgentConnector,
    clock: Clock,
    link: Option<AgentLink>,
    backoff: Duration,
    next_attempt: Option<Instant>,
    /// The pwsh session of a psremoting/local host; moved into each request's future and back
    /// (requests are atomic, so it is here whenever one starts).
    pwsh: Option<PwshSession>,
}

impl HostActor {
    pub fn new(name: String, reach: Reach, connector: AgentConnector, clock: Clock) -> Self {
        let pwsh = match &reach {
            Reach::Pwsh(settings) => {
                Some(PwshSession::new(name.clone(), settings.as_ref().clone()))
            }
            _ => None,
        };
        HostActor {
            pwsh,
            name,
            reach,
            connector,
            clock,
            link: None,
            backoff: BACKOFF_START,
            next_attempt: None,
        }
    }
}

impl Actor for HostActor {
    type Context = Context<Self>;
}

/// Connects if needed, honouring the back-off. Runs inside the actor's atomic section.
async fn ensure_link(
    reach: Reach,
    connector: AgentConnector,
    link: Option<AgentLink>,
    next_attempt: Option<Instant>,
) -> Result<AgentLink, LinkError> {
    if let Some(l) = link.filter(|l| !l.is_closed()) {
        return Ok(l);
    }
    let (addr, id) = match reach {
        Reach::Agent { addr, id } => (addr, id),
        Reach::Pwsh(_) => {
            // Unreachable in practice: pwsh hosts are served by their session, never by a link.
            return Err(LinkError::Unreachable {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                detail: "this host is reached through its pwsh session".into(),
            });
        }
        Reach::Unsupported { reason } => {
            return Err(LinkError::Unreachable {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                detail: reason,
            });
        }
    };
    if let Some(at) = next_attempt {
        let now = Instant::now();
        if at > now {
            tokio::time::sleep(at - now).await;
        }
    }
    connector.connect(addr, &id, CONNECT_TIMEOUT).await
}

/// Records the result of a connection attempt in the actor (back-off bookkeeping).
fn note_link(act: &mut HostActor, res: &Result<AgentLink, LinkError>) {
    match res {
        Ok(l) => {
            act.link = Some(l.clone());
            act.backoff = BACKOFF_START;
            act.next_attempt = None;
        }
        Err(e) => {
            act.link = None;
            if e.is_transient() {
                act.next_attempt = Some(Instant::now() + act.backoff);
                act.backoff = (act.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn probe_failure(e: &LinkError) -> ProbeFailure {
    match e {
        LinkError::Unreachable { detail, .. } if detail.contains("version") => {
            ProbeFailure::VersionMismatch
        }
        LinkError::Unreachable { .. } => ProbeFailure::Unreachable,
        LinkError::Lost(_) => ProbeFailure::SessionBroken,
        LinkError::Timeout(_) => ProbeFailure::TimedOut,
        LinkError::Refused {
            code: AgentErrorCode::ProbeFailed,
            message,
        } => {
            if message.contains("not JSON") || message.contains("JSON object") {
                ProbeFailure::Malformed {
                    detail: message.clone(),
                }
            } else if message.contains("timed out") {
                ProbeFailure::TimedOut
            } else if message.contains("not found") || message.contains("allowed_shells") {
                ProbeFailure::ShellUnavailable
            } else {
                ProbeFailure::Failed {
                    detail: message.clone(),
                }
            }
        }
        LinkError::Refused {
            code: AgentErrorCode::UnsupportedVersion,
            ..
        } => ProbeFailure::VersionMismatch,
        LinkError::Refused { message, .. } => ProbeFailure::Failed {
            detail: message.clone(),
        },
        LinkError::Protocol(d) => ProbeFailure::Malformed { detail: d.clone() },
    }
}

/// Maps an agent's execution result to the core's step result.
pub fn step_result(r: &ExecResult) -> StepResult {
    match &r.status {
        ExecStatus::Exited { code: 0 } => StepResult::Succeeded,
        ExecStatus::Exited { code } => StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            exit_code: Some(*code),
        },
        ExecStatus::Killed { .. } => StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            exit_code: None,
        },
        ExecStatus::TimedOut => StepResult::Permanent {
            reason: ReasonCode::TimedOut,
            exit_code: None,
        },
        ExecStatus::Cancelled => StepResult::Permanent {
            reason: ReasonCode::Cancelled,
            exit_code: None,
        },
        ExecStatus::CapabilityMismatch { .. } => StepResult::Permanent {
            reason: ReasonCode::ShellUnavailable,
            exit_code: None,
        },
        ExecStatus::SpawnFailed { .. } => StepResult::Permanent {
            reason: ReasonCode::SpawnFailed,
            exit_code: None,
        },
        ExecStatus::Interrupted { .. } => StepResult::Permanent {
            reason: ReasonCode::OutcomeUncertain,
            exit_code: None,
        },
        // The agent cannot say whether it ran: let the machine query the key (and fail closed).
        ExecStatus::Uncertain { .. } => StepResult::OutcomeLost,
    }
}

fn link_step_result(e: &LinkError) -> StepResult {
    match e {
        // Nothing was sent: safe to retry.
        LinkError::Unreachable { .. } => StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
        LinkError::Refused {
            code: AgentErrorCode::Busy | AgentErrorCode::ShuttingDown,
            ..
        } => StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
        LinkError::Refused { .. } => StepResult::Permanent {
            reason: ReasonCode::SpawnFailed,
            exit_code: None,
        },
        // Sent, and then the answer never came: unknown outcome.
        LinkError::Lost(_) | LinkError::Timeout(_) | LinkError::Protocol(_) => {
            StepResult::OutcomeLost
        }
    }
}

/// Probe this host.
#[derive(Debug, Message)]
#[rtype(result = "ProbeOutcome")]
pub struct Probe {
    pub script: Option<ProbeScript>,
    pub timeout_ms: u64,
}

impl Handler<Probe> for HostActor {
    type Result = AtomicResponse<Self, ProbeOutcome>;

    fn handle(&mut self, msg: Probe, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(session) = self.pwsh.take() {
            return self.pwsh_probe(session, msg);
        }
        let (reach, connector, link, next) = (
            self.reach.clone(),
            self.connector.clone(),
            self.link.clone(),
            self.next_attempt,
        );
        let clock = self.clock.clone();
        let timeout = Duration::from_millis(msg.timeout_ms.max(1));
        let req = WireProbe {
            script: msg.script.map(|s| Script {
                shell: s.shell,
                body: s.run,
            }),
            timeout_ms: msg.timeout_ms,
        };
        let fut = async move {
            let attempt = async {
                let link = ensure_link(reach, connector, link, next).await;
                let Ok(l) = &link else { return (link, None) };
                let answer = l.probe(req, timeout).await;
                (link, Some(answer))
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(r) => r,
                Err(_) => (Err(LinkError::Timeout(timeout)), None),
            }
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |(link, answer), act, _| {
                note_link(act, &link);
                let answer = match (link, answer) {
                    (Err(e), _) => Err(e),
                    (Ok(_), None) => Err(LinkError::Timeout(timeout)),
                    (Ok(_), Some(a)) => a,
                };
                match answer {
                    Ok(report) => {
                        ProbeOutcome::from_report(report.fingerprint, report.facts, clock.now_ms())
                    }
                    Err(e) => {
                        if matches!(e, LinkError::Lost(_) | LinkError::Timeout(_)) {
                            act.link = None;
                        }
                        tracing::info!(host = %act.name, error = %e, "probe failed");
                        ProbeOutcome::Failed(probe_failure(&e))
                    }
                }
            },
        )))
    }
}

/// Run one step (or one check) on this host.
#[derive(Debug, Message)]
#[rtype(result = "StepResult")]
pub struct Execute {
    pub step_id: String,
    pub idempotency_key: String,
    pub shell: Shell,
    pub script: String,
    pub timeout_ms: u64,
    pub output: Option<Recipient<StepOutput>>,
}

impl Handler<Execute> for HostActor {
    type Result = AtomicResponse<Self, StepResult>;

    fn handle(&mut self, msg: Execute, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(session) = self.pwsh.take() {
            return self.pwsh_execute(session, msg);
        }
        let (reach, connector, link, next) = (
            self.reach.clone(),
            self.connector.clone(),
            self.link.clone(),
            self.next_attempt,
        );
        let host = self.name.clone();
        let limit = Duration::from_millis(msg.timeout_ms) + ANSWER_MARGIN;
        let req = ExecuteRequest {
            idempotency_key: msg.idempotency_key.clone(),
            shell: msg.shell,
            script: msg.script,
            env: BTreeMap::from([
                ("TOLLGATE_HOST".to_string(), host.clone()),
                ("TOLLGATE_STEP".to_string(), msg.step_id.clone()),
            ]),
            working_dir: None,
            timeout_ms: msg.timeout_ms,
        };
        let output = msg.output;
        let step_id = msg.step_id;
        let fut = async move {
            let link = ensure_link(reach, connector, link, next).await;
            let answer = match &link {
                Err(e) => Err(e.clone()),
                Ok(l) => {
                    let on_output = |chunk: OutputChunk| {
                        if let Some(o) = &output {
                            o.do_send(StepOutput {
                                host: host.clone(),
                                step_id: step_id.clone(),
                                chunk,
                            });
                        }
                    };
                    match tokio::time::timeout(limit, l.execute(req, on_output)).await {
                        Ok(r) => r,
                        Err(_) => Err(LinkError::Timeout(limit)),
                    }
                }
            };
            (link, answer)
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            |(link, answer), act, _| {
                note_link(act, &link);
                match answer {
                    Ok(r) => step_result(&r),
                    Err(e) => {
                        if matches!(
                            e,
                            LinkError::Lost(_) | LinkError::Timeout(_) | LinkError::Protocol(_)
                        ) {
                            act.link = None;
                        }
                        tracing::info!(host = %act.name, error = %e, "step did not complete");
                        link_step_result(&e)
                    }
                }
            },
        )))
    }
}

/// Maps a step result of a `check` script to the core's check answer.
pub fn check_answer(r: StepResult) -> CheckAnswer {
    match r {
        StepResult::Succeeded => CheckAnswer::InDesiredState,
        StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            ..
        } => CheckAnswer::NotInDesiredState,
        StepResult::Permanent { reason, .. } | StepResult::Transient { reason } => {
            CheckAnswer::Failed { reason }
        }
        StepResult::OutcomeLost => CheckAnswer::Failed {
            reason: ReasonCode::OutcomeUncertain,
        },
    }
}

/// Ask what became of an idempotency key.
#[derive(Debug, Message)]
#[rtype(result = "IdempotencyAnswer")]
pub struct QueryKey {
    pub key: String,
}

impl Handler<QueryKey> for HostActor {
    type Result = AtomicResponse<Self, IdempotencyAnswer>;

    fn handle(&mut self, msg: QueryKey, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(mut session) = self.pwsh.take() {
            let fut = async move {
                let r = session.query(&msg.key).await;
                (session, r)
            };
            return AtomicResponse::new(Box::pin(fut.into_actor(self).map(
                |(session, r), act, _| {
                    act.pwsh = Some(session);
                    idempotency_answer(r.ok())
                },
            )));
        }
        let (reach, connector, link, next) = (
            self.reach.clone(),
            self.connector.clone(),
            self.link.clone(),
            self.next_attempt,
        );
        let fut = async move {
            let link = ensure_link(reach, connector, link, next).await;
            let answer = match &link {
                Err(e) => Err(e.clone()),
                Ok(l) => tokio::time::timeout(CONNECT_TIMEOUT, l.query(&msg.key))
                    .await
                    .unwrap_or(Err(LinkError::Timeout(CONNECT_TIMEOUT))),
            };
            (link, answer)
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            |(link, answer), act, _| {
                note_link(act, &link);
                if answer.is_err() {
                    act.link = None;
                }
                idempotency_answer(answer.ok())
            },
        )))
    }
}

/// Maps what a host said about a key (`None`: it could not be asked) to the core's answer.
fn idempotency_answer(answer: Option<IdempotencyStatus>) -> IdempotencyAnswer {
    match answer {
        Some(IdempotencyStatus::NotFound) => IdempotencyAnswer::NotFound,
        Some(IdempotencyStatus::Running) => IdempotencyAnswer::Running,
        Some(IdempotencyStatus::Uncertain) => IdempotencyAnswer::Uncertain,
        Some(IdempotencyStatus::Finished(r)) => IdempotencyAnswer::Finished(step_result(&r)),
        None => IdempotencyAnswer::QueryFailed,
    }
}

fn pwsh_probe_failure(e: &SessionError) -> ProbeFailure {
    match e {
        SessionError::PwshMissing { .. } => ProbeFailure::ShellUnavailable,
        SessionError::AuthFailed(_) | SessionError::CredentialUnavailable(_) => {
            ProbeFailure::AuthFailed
        }
        SessionError::Unreachable(_) => ProbeFailure::Unreachable,
        SessionError::Lost(_) => ProbeFailure::SessionBroken,
        SessionError::Timeout(_) => ProbeFailure::TimedOut,
        SessionError::Protocol(d) | SessionError::ProbeMalformed(d) => {
            ProbeFailure::Malformed { detail: d.clone() }
        }
        other => ProbeFailure::Failed {
            detail: other.to_string(),
        },
    }
}

fn pwsh_step_result(e: &SessionError) -> StepResult {
    match e {
        // Nothing was sent, or the host was busy: safe to retry.
        SessionError::Unreachable(_) => StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
        SessionError::Refused { .. } if e.is_transient() => StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
        SessionError::AuthFailed(_) | SessionError::CredentialUnavailable(_) => {
            StepResult::Permanent {
                reason: ReasonCode::AuthFailed,
                exit_code: None,
            }
        }
        SessionError::PwshMissing { .. } => StepResult::Permanent {
            reason: ReasonCode::ShellUnavailable,
            exit_code: None,
        },
        // Sent, and the answer was lost: unknown outcome.
        SessionError::Lost(_) | SessionError::Timeout(_) | SessionError::Protocol(_) => {
            StepResult::OutcomeLost
        }
        _ => StepResult::Permanent {
            reason: ReasonCode::SpawnFailed,
            exit_code: None,
        },
    }
}

/// The pwsh transport: the session is moved into the request's future and put back after.
impl HostActor {
    fn pwsh_probe(
        &mut self,
        mut session: PwshSession,
        msg: Probe,
    ) -> AtomicResponse<Self, ProbeOutcome> {
        let clock = self.clock.clone();
        let timeout = Duration::from_millis(msg.timeout_ms.max(1));
        let req = WireProbe {
            script: msg.script.map(|s| Script {
                shell: s.shell,
                body: s.run,
            }),
            timeout_ms: msg.timeout_ms,
        };
        let fut = async move {
            let r = session.probe(req, timeout).await;
            (session, r)
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |(session, r), act, _| {
                act.pwsh = Some(session);
                match r {
                    Ok(report) => {
                        ProbeOutcome::from_report(report.fingerprint, report.facts, clock.now_ms())
                    }
                    Err(e) => {
                        tracing::info!(host = %act.name, error = %e, "probe failed");
                        ProbeOutcome::Failed(pwsh_probe_failure(&e))
                    }
                }
            },
        )))
    }

    fn pwsh_execute(
        &mut self,
        mut session: PwshSession,
        msg: Execute,
    ) -> AtomicResponse<Self, StepResult> {
        let host = self.name.clone();
        let req = ExecuteRequest {
            idempotency_key: msg.idempotency_key,
            shell: msg.shell,
            script: msg.script,
            env: BTreeMap::from([
                ("TOLLGATE_HOST".to_string(), host.clone()),
                ("TOLLGATE_STEP".to_string(), msg.step_id.clone()),
            ]),
            working_dir: None,
            timeout_ms: msg.timeout_ms,
        };
        let (output, step_id) = (msg.output, msg.step_id);
        let fut = async move {
            let on_output = |chunk: OutputChunk| {
                if let Some(o) = &output {
                    o.do_send(StepOutput {
                        host: host.clone(),
                        step_id: step_id.clone(),
                        chunk,
                    });
                }
            };
            let r = session.execute(req, on_output).await;
            (session, r)
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            |(session, r), act, _| {
                act.pwsh = Some(session);
                match r {
                    Ok(result) => step_result(&result),
                    Err(e) => {
                        tracing::info!(host = %act.name, error = %e, "step did not complete");
                        pwsh_step_result(&e)
                    }
                }
            },
        )))
    }
}
