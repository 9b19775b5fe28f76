//! Typed outcomes per host and per run (SPEC §3), and their conversion to wire types.

use std::collections::BTreeMap;

use tollgate_protocol::outcome::{HostReport, Outcome, OutcomeKind, ReasonCode, RunReport};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

use super::lifecycle::HostState;
use super::rules::RuleId;

/// What a host can lack that a plan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// No protocol version both sides speak.
    ProtocolVersion,
    /// The step's shell is absent or not allowed on the host.
    Shell,
}

impl Capability {
    /// The name reports and journals carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::ProtocolVersion => "protocol-version",
            Capability::Shell => "shell",
        }
    }

    /// The reason code that goes with lacking it.
    pub fn reason(self) -> ReasonCode {
        match self {
            Capability::ProtocolVersion => ReasonCode::VersionMismatch,
            Capability::Shell => ReasonCode::ShellUnavailable,
        }
    }
}

/// How a run or a host ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypedOutcome {
    /// Everything that had to run ran and succeeded (or nothing had to).
    Completed,
    /// Some hosts succeeded, some failed.
    PartialSuccess {
        /// Hosts without a failure.
        succeeded: Vec<String>,
        /// Hosts with one.
        failed: Vec<String>,
    },
    /// Policy (or a barrier) refused.
    PolicyBlocked {
        /// Why.
        reason: ReasonCode,
        /// The rule that refused.
        rule: RuleId,
    },
    /// Quick mode met a destructive step; run `next_command` to continue.
    EscalationRequired {
        /// The rule (`R004-quick-never-destroys`).
        rule: RuleId,
        /// The exact command to run next.
        next_command: String,
    },
    /// A preflight probe gave no usable answer.
    PreflightFailed {
        /// Why.
        reason: ReasonCode,
    },
    /// The host could not be reached.
    TransportUnreachable {
        /// Why.
        reason: ReasonCode,
    },
    /// The host lacks something the plan needs.
    CapabilityMismatch {
        /// What is missing.
        capability: Capability,
    },
    /// A step failed, or its outcome could not be established.
    ExecutionFailed {
        /// Which step.
        step_id: String,
        /// Why.
        reason: ReasonCode,
        /// The exit code, when the script exited by itself.
        exit_code: Option<i32>,
    },
}

impl TypedOutcome {
    /// Its kind.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            TypedOutcome::Completed => OutcomeKind::Completed,
            TypedOutcome::PartialSuccess { .. } => OutcomeKind::PartialSuccess,
            TypedOutcome::PolicyBlocked { .. } => OutcomeKind::PolicyBlocked,
            TypedOutcome::EscalationRequired { .. } => OutcomeKind::EscalationRequired,
            TypedOutcome::PreflightFailed { .. } => OutcomeKind::PreflightFailed,
            TypedOutcome::TransportUnreachable { .. } => OutcomeKind::TransportUnreachable,
            TypedOutcome::CapabilityMismatch { .. } => OutcomeKind::CapabilityMismatch,
            TypedOutcome::ExecutionFailed { .. } => OutcomeKind::ExecutionFailed,
        }
    }

    /// The reason code that goes with it when nothing more specific is known.
    pub fn default_reason(&self) -> ReasonCode {
        match self {
            TypedOutcome::Completed => ReasonCode::AllStepsSucceeded,
            TypedOutcome::PartialSuccess { .. } => ReasonCode::SomeHostsFailed,
            TypedOutcome::PolicyBlocked { reason, .. }
            | TypedOutcome::PreflightFailed { reason }
            | TypedOutcome::TransportUnreachable { reason }
            | TypedOutcome::ExecutionFailed { reason, .. } => *reason,
            TypedOutcome::EscalationRequired { .. } => ReasonCode::QuickModeNonDestructive,
            TypedOutcome::CapabilityMismatch { capability } => capability.reason(),
        }
    }

    /// The rule that decided, if the outcome names one.
    pub fn rule(&self) -> Option<RuleId> {
        match self {
            TypedOutcome::PolicyBlocked { rule, .. }
            | TypedOutcome::EscalationRequired { rule, .. } => Some(rule),
            _ => None,
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> Outcome {
        match self {
            TypedOutcome::Completed => Outcome::Completed,
            TypedOutcome::PartialSuccess { succeeded, failed } => Outcome::PartialSuccess {
                succeeded: succeeded.clone(),
                failed: failed.clone(),
            },
            TypedOutcome::PolicyBlocked { reason, rule } => Outcome::PolicyBlocked {
                reason: *reason,
                rule: (*rule).to_owned(),
            },
            TypedOutcome::EscalationRequired { rule, next_command } => {
                Outcome::EscalationRequired {
                    rule: (*rule).to_owned(),
                    next_command: next_command.clone(),
                }
            }
            TypedOutcome::PreflightFailed { reason } => {
                Outcome::PreflightFailed { reason: *reason }
            }
            TypedOutcome::TransportUnreachable { reason } => {
                Outcome::TransportUnreachable { reason: *reason }
            }
            TypedOutcome::CapabilityMismatch { capability } => Outcome::CapabilityMismatch {
                capability: capability.as_str().to_owned(),
            },
            TypedOutcome::ExecutionFailed {
                step_id,
                reason,
                exit_code,
            } => Outcome::ExecutionFailed {
                step_id: step_id.clone(),
                reason: *reason,
                exit_code: *exit_code,
            },
        }
    }
}

/// How one host ended a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostResult {
    /// The host.
    pub host: String,
    /// Its lifecycle state at the end.
    pub lifecycle: HostState,
    /// Its outcome.
    pub outcome: TypedOutcome,
    /// The reason code reported with it.
    pub reason: ReasonCode,
    /// One sentence.
    pub detail: String,
    /// The facts that led to the outcome.
    pub facts: BTreeMap<String, String>,
}

impl HostResult {
    /// The wire form.
    pub fn to_wire(&self) -> HostReport {
        HostReport {
            host: self.host.clone(),
            lifecycle: self.lifecycle.as_str().to_owned(),
            outcome: self.outcome.to_wire(),
            reason: self.reason,
            detail: self.detail.clone(),
            facts: self.facts.clone(),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// The run.
    pub run_id: Uuid,
    /// What it did.
    pub action: Action,
    /// What the operator asked for.
    pub requested_mode: Mode,
    /// What policy made of it.
    pub effective_mode: Mode,
    /// The run's outcome.
    pub outcome: TypedOutcome,
    /// Its reason code.
    pub reason: ReasonCode,
    /// The rule that decided, if one did.
    pub rule: Option<RuleId>,
    /// One sentence.
    pub detail: String,
    /// Every target host, sorted by name.
    pub hosts: Vec<HostResult>,
}

impl RunResult {
    /// The wire form; `artifacts` is where the run's files are.
    pub fn to_report(&self, artifacts: &str) -> RunReport {
        RunReport {
            run_id: self.run_id,
            action: self.action,
            requested_mode: self.requested_mode,
            effective_mode: self.effective_mode,
            outcome: self.outcome.to_wire(),
            reason: self.reason,
            rule: self.rule.map(str::to_owned),
            detail: self.detail.clone(),
            hosts: self.hosts.iter().map(HostResult::to_wire).collect(),
            artifacts: artifacts.to_owned(),
        }
    }
}

/// The outcome a run's `run_finished` journal line stands for, rebuilt after a restart from what
/// the line keeps: its outcome kind, reason, rule, detail and step. Host lists are not kept, so a
/// partial success comes back without them. A line without a known kind is read as blocked:
/// nothing more may happen in that run.
pub fn outcome_from_journal(
    kind: Option<OutcomeKind>,
    reason: ReasonCode,
    rule: Option<String>,
    detail: String,
    step: Option<String>,
) -> Outcome {
    let blocked = |rule: Option<String>| Outcome::PolicyBlocked {
        reason,
        rule: rule.unwrap_or_default(),
    };
    match kind {
        Some(OutcomeKind::Completed) => Outcome::Completed,
        Some(OutcomeKind::PartialSuccess) => Outcome::PartialSuccess {
            succeeded: Vec::new(),
            failed: Vec::new(),
        },
        Some(OutcomeKind::EscalationRequired) => Outcome::EscalationRequired {
            rule: rule.unwrap_or_default(),
            next_command: detail,
        },
        Some(OutcomeKind::PreflightFailed) => Outcome::PreflightFailed { reason },
        Some(OutcomeKind::TransportUnreachable) => Outcome::TransportUnreachable { reason },
        Some(OutcomeKind::CapabilityMismatch) => Outcome::CapabilityMismatch { capability: detail },
        Some(OutcomeKind::ExecutionFailed) => Outcome::ExecutionFailed {
            step_id: step.unwrap_or_default(),
            reason,
            exit_code: None,
        },
        // A run that finished awaiting approval was closed without its token: it is blocked.
        Some(OutcomeKind::PolicyBlocked | OutcomeKind::ConfirmationRequired) | None => {
            blocked(rule)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_kinds_match() {
        let all = [
            TypedOutcome::Completed,
            TypedOutcome::PartialSuccess {
                succeeded: vec!["a".into()],
                failed: vec!["b".into()],
            },
            TypedOutcome::PolicyBlocked {
                reason: ReasonCode::StalePlan,
                rule: "B002",
            },
            TypedOutcome::EscalationRequired {
                rule: "R004",
                next_command: "tollgate x".into(),
            },
            TypedOutcome::PreflightFailed {
                reason: ReasonCode::ProbeTimeout,
            },
            TypedOutcome::TransportUnreachable {
                reason: ReasonCode::Unreachable,
            },
            TypedOutcome::CapabilityMismatch {
                capability: Capability::Shell,
            },
            TypedOutcome::CapabilityMismatch {
                capability: Capability::ProtocolVersion,
            },
            TypedOutcome::ExecutionFailed {
                step_id: "s".into(),
                reason: ReasonCode::NonZeroExit,
                exit_code: Some(3),
            },
        ];
        for o in all {
            assert_eq!(o.to_wire().kind(), o.kind(), "{o:?}");
        }
    }

    #[test]
    fn every_kind_comes_back_from_the_journal_as_itself_but_an_unapproved_wait_is_blocked() {
        use OutcomeKind as K;
        for kind in [
            K::Completed,
            K::PartialSuccess,
            K::PolicyBlocked,
            K::EscalationRequired,
            K::ConfirmationRequired,
            K::PreflightFailed,
            K::TransportUnreachable,
            K::CapabilityMismatch,
            K::ExecutionFailed,
        ] {
            let back = outcome_from_journal(
                Some(kind),
                ReasonCode::OutcomeUncertain,
                Some("R".into()),
                "d".into(),
                None,
            );
            let want = if kind == K::ConfirmationRequired {
                K::PolicyBlocked
            } else {
                kind
            };
            assert_eq!(back.kind(), want, "{kind:?}");
        }
        let unknown = outcome_from_journal(
            None,
            ReasonCode::OutcomeUncertain,
            None,
            String::new(),
            None,
        );
        assert_eq!(unknown.kind(), K::PolicyBlocked);
    }
}
