//! Typed outcomes and reason codes (SPEC §3), as they cross the wire.
//!
//! The coordinator's safety core has its own types; it converts to these at the edge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::StepErrors;

/// Why something was blocked, failed, or escalated. One closed list, so every answer names
/// exactly one code and the CLI can map codes to exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReasonCode {
    // Tokens (SPEC §3, confirmation tokens).
    TokenMissing,
    TokenExpired,
    TokenScopeMismatch,
    TokenReplayed,
    TokenSignatureInvalid,
    TokenMalformed,
    ApproverNotAuthorized,
    ApprovalsInsufficient,
    // Barriers and freshness.
    StalePlan,
    ContainmentFailed,
    HostUnknown,
    // Policy.
    QuickModeNonDestructive,
    DeEscalated,
    NotAuthorized,
    UnknownHost,
    NothingToDo,
    RolloutGateFailed,
    // Preflight and transport.
    AuthFailed,
    ProbeFailed,
    ProbeTimeout,
    MalformedFacts,
    Unreachable,
    SessionBroken,
    VersionMismatch,
    ShellUnavailable,
    // Execution.
    NonZeroExit,
    TimedOut,
    Cancelled,
    OutcomeUncertain,
    SpawnFailed,
    // Journal authenticity.
    TimelineTampered,
    // Success.
    AllStepsSucceeded,
    SomeHostsFailed,
}

impl ReasonCode {
    /// The code's name as written in journals and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::TokenMissing => "TokenMissing",
            ReasonCode::TokenExpired => "TokenExpired",
            ReasonCode::TokenScopeMismatch => "TokenScopeMismatch",
            ReasonCode::TokenReplayed => "TokenReplayed",
            ReasonCode::TokenSignatureInvalid => "TokenSignatureInvalid",
            ReasonCode::TokenMalformed => "TokenMalformed",
            ReasonCode::ApproverNotAuthorized => "ApproverNotAuthorized",
            ReasonCode::ApprovalsInsufficient => "ApprovalsInsufficient",
            ReasonCode::StalePlan => "StalePlan",
            ReasonCode::ContainmentFailed => "ContainmentFailed",
            ReasonCode::HostUnknown => "HostUnknown",
            ReasonCode::QuickModeNonDestructive => "QuickModeNonDestructive",
            ReasonCode::DeEscalated => "DeEscalated",
            ReasonCode::NotAuthorized => "NotAuthorized",
            ReasonCode::UnknownHost => "UnknownHost",
            ReasonCode::NothingToDo => "NothingToDo",
            ReasonCode::RolloutGateFailed => "RolloutGateFailed",
            ReasonCode::AuthFailed => "AuthFailed",
            ReasonCode::ProbeFailed => "ProbeFailed",
            ReasonCode::ProbeTimeout => "ProbeTimeout",
            ReasonCode::MalformedFacts => "MalformedFacts",
            ReasonCode::Unreachable => "Unreachable",
            ReasonCode::SessionBroken => "SessionBroken",
            ReasonCode::VersionMismatch => "VersionMismatch",
            ReasonCode::ShellUnavailable => "ShellUnavailable",
            ReasonCode::NonZeroExit => "NonZeroExit",
            ReasonCode::TimedOut => "TimedOut",
            ReasonCode::Cancelled => "Cancelled",
            ReasonCode::OutcomeUncertain => "OutcomeUncertain",
            ReasonCode::SpawnFailed => "SpawnFailed",
            ReasonCode::TimelineTampered => "TimelineTampered",
            ReasonCode::AllStepsSucceeded => "AllStepsSucceeded",
            ReasonCode::SomeHostsFailed => "SomeHostsFailed",
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a typed outcome (SPEC §3), for a run or for one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OutcomeKind {
    Completed,
    PartialSuccess,
    PolicyBlocked,
    EscalationRequired,
    ConfirmationRequired,
    PreflightFailed,
    TransportUnreachable,
    CapabilityMismatch,
    ExecutionFailed,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Completed => "Completed",
            OutcomeKind::PartialSuccess => "PartialSuccess",
            OutcomeKind::PolicyBlocked => "PolicyBlocked",
            OutcomeKind::EscalationRequired => "EscalationRequired",
            OutcomeKind::ConfirmationRequired => "ConfirmationRequired",
            OutcomeKind::PreflightFailed => "PreflightFailed",
            OutcomeKind::TransportUnreachable => "TransportUnreachable",
            OutcomeKind::CapabilityMismatch => "CapabilityMismatch",
            OutcomeKind::ExecutionFailed => "ExecutionFailed",
        }
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a plan as shown to an operator before approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStepView {
    pub phase: String,
    pub step_id: String,
    pub hosts: Vec<String>,
    pub destructive: bool,
    /// A barrier (containment + re-probe + policy + token) runs before this step's phase.
    pub barrier_before: bool,
    /// What the step's PowerShell errors mean; shown (and written) only when it opts out
    /// with `continue`.
    #[serde(default, skip_serializing_if = "StepErrors::is_stop")]
    pub errors: StepErrors,
}

/// A plan as shown to an operator: what would run where, and what it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    pub operation_hash: String,
    pub hosts: Vec<String>,
    pub steps: Vec<PlanStepView>,
    /// Distinct approvers a token for this plan needs (2 when a protected host requires it).
    pub approvals_required: u8,
    /// Whether the run's requester may be one of them (`tokens.self_approval`, never with a
    /// protected host in the plan).
    #[serde(default)]
    pub self_approval: bool,
}

/// The typed outcome of a run or a host, with the data each kind needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Completed,
    PartialSuccess {
        succeeded: Vec<String>,
        failed: Vec<String>,
    },
    PolicyBlocked {
        reason: ReasonCode,
        rule: String,
    },
    /// Quick mode met a destructive step: run exactly `next_command` to continue.
    EscalationRequired {
        rule: String,
        next_command: String,
    },
    /// Full mode: nothing destructive runs until a token for this exact plan is presented.
    ConfirmationRequired {
        run_id: uuid::Uuid,
        operation_hash: String,
        plan: PlanView,
    },
    PreflightFailed {
        reason: ReasonCode,
    },
    TransportUnreachable {
        reason: ReasonCode,
    },
    CapabilityMismatch {
        capability: String,
    },
    ExecutionFailed {
        step_id: String,
        reason: ReasonCode,
        exit_code: Option<i32>,
    },
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Completed => OutcomeKind::Completed,
            Outcome::PartialSuccess { .. } => OutcomeKind::PartialSuccess,
            Outcome::PolicyBlocked { .. } => OutcomeKind::PolicyBlocked,
            Outcome::EscalationRequired { .. } => OutcomeKind::EscalationRequired,
            Outcome::ConfirmationRequired { .. } => OutcomeKind::ConfirmationRequired,
            Outcome::PreflightFailed { .. } => OutcomeKind::PreflightFailed,
            Outcome::TransportUnreachable { .. } => OutcomeKind::TransportUnreachable,
            Outcome::CapabilityMismatch { .. } => OutcomeKind::CapabilityMismatch,
            Outcome::ExecutionFailed { .. } => OutcomeKind::ExecutionFailed,
        }
    }
}

/// The outcome of one host within a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    /// Lifecycle state after the run (`Unknown`, `Ready`, ...).
    pub lifecycle: String,
    pub outcome: Outcome,
    pub reason: ReasonCode,
    /// One human sentence.
    pub detail: String,
    /// The facts that led to the outcome.
    pub facts: BTreeMap<String, String>,
}

/// The answer to an intent, an approval-gated execution, or a status query about a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: uuid::Uuid,
    pub action: crate::Action,
    pub requested_mode: crate::Mode,
    pub effective_mode: crate::Mode,
    pub outcome: Outcome,
    pub reason: ReasonCode,
    /// The policy rule that decided, if one did.
    pub rule: Option<String>,
    pub detail: String,
    pub hosts: Vec<HostReport>,
    /// Where the run's artifacts are on the coordinator.
    pub artifacts: String,
}
