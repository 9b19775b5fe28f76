//! One agent host as the Host actor sees it: a link that is dialled when needed, with
//! exponential back-off (100 ms doubling to 5 s) after a failed dial so a dead host is not
//! hammered, and every failure mapped to the core's typed answers by its variant and the
//! agent's error code, never by its wording.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tollgate_certs::SpiffeId;
use tollgate_protocol::agent::{
    AgentErrorCode, ExecResult, ExecuteRequest, IdempotencyStatus, OutputChunk, ProbeReport,
    ProbeRequest,
};
use tollgate_protocol::outcome::ReasonCode;

use crate::core::facts::ProbeFailure;
use crate::core::run::StepResult;

use super::{AgentConnector, AgentLink, LinkError};

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An agent host: where it is, who it must be, and the link to it (if one is open).
#[derive(Debug)]
pub struct AgentHost {
    addr: SocketAddr,
    id: SpiffeId,
    connector: AgentConnector,
    link: Option<AgentLink>,
    backoff: Duration,
    next_attempt: Option<Instant>,
}

impl AgentHost {
    pub fn new(addr: SocketAddr, id: SpiffeId, connector: AgentConnector) -> Self {
        AgentHost {
            addr,
            id,
            connector,
            link: None,
            backoff: BACKOFF_START,
            next_attempt: None,
        }
    }

    /// The open link, or a new one (after the back-off, if the last dial failed).
    async fn link(&mut self) -> Result<AgentLink, LinkError> {
        if let Some(l) = self.link.as_ref().filter(|l| !l.is_closed()) {
            return Ok(l.clone());
        }
        if let Some(at) = self.next_attempt {
            let now = Instant::now();
            if at > now {
                tokio::time::sleep(at - now).await;
            }
        }
        let res = self
            .connector
            .connect(self.addr, &self.id, CONNECT_TIMEOUT)
            .await;
        match &res {
            Ok(l) => {
                self.link = Some(l.clone());
                self.backoff = BACKOFF_START;
                self.next_attempt = None;
            }
            Err(e) => {
                self.link = None;
                if e.is_transient() {
                    self.next_attempt = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        res
    }

    /// Forgets a link that may be broken (anything but a clean refusal or a failed dial, which
    /// left no link): the next request dials again.
    fn drop_link_after(&mut self, e: &LinkError) {
        if !matches!(e, LinkError::Refused { .. } | LinkError::Unreachable { .. }) {
            self.link = None;
        }
    }

    /// Asks for facts; the whole probe, dialling included, is bounded by `timeout`.
    pub async fn probe(
        &mut self,
        req: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReport, ProbeFailure> {
        let attempt = async {
            let link = self.link().await?;
            link.probe(req, timeout).await
        };
        let answer = tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(Err(LinkError::Timeout(timeout)));
        answer.map_err(|e| {
            self.drop_link_after(&e);
            tracing::debug!(agent = %self.id, error = %e, "probe failed");
            probe_failure(&e)
        })
    }

    /// Runs one step; its answer must come within `limit`.
    pub async fn execute(
        &mut self,
        req: ExecuteRequest,
        on_output: impl FnMut(OutputChunk),
        limit: Duration,
    ) -> Result<ExecResult, StepResult> {
        let link = self.link().await.map_err(|e| step_failure(&e))?;
        let answer = tokio::time::timeout(limit, link.execute(req, on_output))
            .await
            .unwrap_or(Err(LinkError::Timeout(limit)));
        answer.map_err(|e| {
            self.drop_link_after(&e);
            tracing::debug!(agent = %self.id, error = %e, "step did not complete");
            step_failure(&e)
        })
    }

    /// Asks what became of an idempotency key; `None` if the agent could not be asked.
    pub async fn query(&mut self, key: &str) -> Option<IdempotencyStatus> {
        let link = self.link().await.ok()?;
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, link.query(key))
            .await
            .unwrap_or(Err(LinkError::Timeout(CONNECT_TIMEOUT)));
        match answer {
            Ok(s) => Some(s),
            Err(_) => {
                self.link = None;
                None
            }
        }
    }
}

/// A failed probe's typed cause.
pub fn probe_failure(e: &LinkError) -> ProbeFailure {
    match e {
        LinkError::VersionMismatch(_) => ProbeFailure::VersionMismatch,
        LinkError::Unreachable { .. } => ProbeFailure::Unreachable,
        LinkError::Lost(_) => ProbeFailure::SessionBroken,
        LinkError::Timeout(_) => ProbeFailure::TimedOut,
        LinkError::Refused { code, message } => match code {
            AgentErrorCode::ProbeMalformed => ProbeFailure::Malformed {
                detail: message.clone(),
            },
            AgentErrorCode::ProbeTimedOut => ProbeFailure::TimedOut,
            AgentErrorCode::CapabilityMismatch => ProbeFailure::ShellUnavailable {
                detail: message.clone(),
            },
            AgentErrorCode::UnsupportedVersion => ProbeFailure::VersionMismatch,
            _ => ProbeFailure::Failed {
                detail: message.clone(),
            },
        },
        LinkError::Protocol(d) => ProbeFailure::Malformed { detail: d.clone() },
    }
}

/// What a failed execution means: nothing sent (retry), refused (permanent), or sent and then
/// lost (the outcome is unknown; the machine queries the key).
pub fn step_failure(e: &LinkError) -> StepResult {
    match e {
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
        LinkError::Lost(_)
        | LinkError::Timeout(_)
        | LinkError::Protocol(_)
        | LinkError::VersionMismatch(_) => StepResult::OutcomeLost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: AgentErrorCode, message: &str) -> LinkError {
        LinkError::Refused {
            code,
            message: message.into(),
        }
    }

    #[test]
    fn probe_failures_follow_the_code_not_the_words() {
        // The same words under different codes read differently; the words never decide.
        let words = "probe output is not JSON: timed out; pwsh not found (allowed_shells)";
        let table = [
            (AgentErrorCode::ProbeMalformed, "Malformed"),
            (AgentErrorCode::ProbeTimedOut, "TimedOut"),
            (AgentErrorCode::CapabilityMismatch, "ShellUnavailable"),
            (AgentErrorCode::UnsupportedVersion, "VersionMismatch"),
            (AgentErrorCode::ProbeFailed, "Failed"),
            (AgentErrorCode::Internal, "Failed"),
        ];
        for (code, want) in table {
            let got = format!("{:?}", probe_failure(&refused(code, words)));
            assert!(got.starts_with(want), "{code:?}: {got}");
        }
        let unreachable = LinkError::Unreachable {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            detail: "unsupported version 9".into(),
        };
        assert_eq!(probe_failure(&unreachable), ProbeFailure::Unreachable);
        assert_eq!(
            probe_failure(&LinkError::VersionMismatch("v9".into())),
            ProbeFailure::VersionMismatch
        );
    }

    #[test]
    fn a_step_sent_and_then_lost_is_never_called_failed_or_retried() {
        for e in [
            LinkError::Lost("reset".into()),
            LinkError::Timeout(Duration::from_secs(1)),
            LinkError::Protocol("bad frame".into()),
            LinkError::VersionMismatch("v9".into()),
        ] {
            assert_eq!(step_failure(&e), StepResult::OutcomeLost, "{e}");
        }
        assert!(matches!(
            step_failure(&refused(AgentErrorCode::Busy, "")),
            StepResult::Transient { .. }
        ));
        assert!(matches!(
            step_failure(&refused(AgentErrorCode::IdempotencyConflict, "")),
            StepResult::Permanent { .. }
        ));
    }
}
