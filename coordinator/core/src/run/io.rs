//! What the run machine consumes ([`Input`]) and emits ([`Effect`]).

use std::collections::BTreeSet;

use tollgate_protocol::outcome::{PlanView, ReasonCode};
use tollgate_protocol::{Shell, StepErrors};

use crate::config::ProbeScript;
use crate::facts::ProbeOutcome;
use crate::outcome::RunResult;
use crate::rules::RuleId;
use crate::timeline::TimelineEvent;

/// Something that happened, fed to [`super::RunMachine::step`] with the current time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Begin the run.
    Start,
    /// A preflight probe answered.
    Probed {
        /// The host.
        host: String,
        /// Its answer.
        outcome: ProbeOutcome,
    },
    /// An operator presented a token (`tollgate execute RUN --token T`).
    TokenPresented {
        /// The token text.
        token: String,
        /// Nonces (hex) consumed so far, from the journal.
        consumed_nonces: BTreeSet<String>,
    },
    /// A barrier re-probe answered.
    Reprobed {
        /// The destructive phase whose barrier asked.
        phase: usize,
        /// The host.
        host: String,
        /// Its answer.
        outcome: ProbeOutcome,
    },
    /// A step's check answered.
    CheckAnswered {
        /// The host.
        host: String,
        /// The step.
        step_id: String,
        /// Its answer.
        answer: CheckAnswer,
    },
    /// A dispatched step answered.
    StepAnswered {
        /// The host.
        host: String,
        /// The step.
        step_id: String,
        /// The key it was dispatched with.
        idempotency_key: String,
        /// The result.
        result: StepResult,
    },
    /// An idempotency query answered.
    IdempotencyAnswered {
        /// The host.
        host: String,
        /// The step.
        step_id: String,
        /// The key queried.
        idempotency_key: String,
        /// What the host's store says.
        answer: IdempotencyAnswer,
    },
    /// These hosts' inventory entries changed or were removed: they go `Unknown`. Before
    /// execution this ends the run (its plan no longer describes the fleet); during execution
    /// they get no further request and the run stops at the end of the phase.
    InventoryChanged {
        /// The hosts.
        hosts: Vec<String>,
    },
    /// Time passed (answer to [`Effect::WakeAt`]; harmless at any time).
    Tick,
    /// Stop starting new work; finish once nothing is in flight.
    Cancel {
        /// Why, for the timeline.
        reason: String,
    },
}

impl Input {
    /// The input's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Input::Start => "Start",
            Input::Probed { .. } => "Probed",
            Input::TokenPresented { .. } => "TokenPresented",
            Input::Reprobed { .. } => "Reprobed",
            Input::CheckAnswered { .. } => "CheckAnswered",
            Input::StepAnswered { .. } => "StepAnswered",
            Input::IdempotencyAnswered { .. } => "IdempotencyAnswered",
            Input::InventoryChanged { .. } => "InventoryChanged",
            Input::Tick => "Tick",
            Input::Cancel { .. } => "Cancel",
        }
    }
}

/// A check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckAnswer {
    /// Exit 0: already in the desired state.
    InDesiredState,
    /// Non-zero exit: the step must run.
    NotInDesiredState,
    /// The check could not run or its outcome is unknown.
    Failed {
        /// Why.
        reason: ReasonCode,
    },
}

/// A step's result as the runtime observed it.
///
/// The runtime classifies: `Transient` only when the step certainly did not run to any effect
/// (connection refused before sending, spawn failed, agent busy); `OutcomeLost` whenever the
/// request may have reached the host but no result came back (connection cut after send, agent
/// reported `Uncertain`); everything else is `Permanent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// Exit 0.
    Succeeded,
    /// Failed without effect; may be retried.
    Transient {
        /// Why.
        reason: ReasonCode,
    },
    /// Failed; never retried.
    Permanent {
        /// Why.
        reason: ReasonCode,
        /// Exit code, if the script exited by itself.
        exit_code: Option<i32>,
    },
    /// Sent, and then the answer was lost.
    OutcomeLost,
}

/// What a host's idempotency store says about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyAnswer {
    /// Never seen: the step did not start.
    NotFound,
    /// Still running.
    Running,
    /// Finished with this result.
    Finished(StepResult),
    /// Started, result unknown (agent restarted mid-run).
    Uncertain,
    /// The query itself failed (host unreachable, transport without a store).
    QueryFailed,
}

/// Why probes are requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbePurpose {
    /// Before planning.
    Preflight,
    /// For the barrier before destructive phase `phase`.
    Barrier {
        /// Phase index.
        phase: usize,
    },
}

/// One host to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    /// The host.
    pub host: String,
    /// Its role's probe script, if `operations.toml` has one.
    pub script: Option<ProbeScript>,
}

/// A step's check to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    /// The host.
    pub host: String,
    /// Phase index.
    pub phase: usize,
    /// The step.
    pub step_id: String,
    /// Interpreter.
    pub shell: Shell,
    /// Check script.
    pub script: String,
    /// Time limit.
    pub timeout_ms: u64,
    /// What its PowerShell errors mean (the step's `errors`).
    pub errors: StepErrors,
}

/// A step to send to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// The host.
    pub host: String,
    /// Phase index.
    pub phase: usize,
    /// Phase name.
    pub phase_name: String,
    /// The step.
    pub step_id: String,
    /// Interpreter.
    pub shell: Shell,
    /// Script text.
    pub script: String,
    /// Time limit of this attempt.
    pub timeout_ms: u64,
    /// Idempotency key (same key = same attempt; the host runs it at most once).
    pub idempotency_key: String,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Whether the step is destructive.
    pub destructive: bool,
    /// What its PowerShell errors mean (`errors`).
    pub errors: StepErrors,
}

/// Something the runtime must do, in order. A [`Effect::Record`] must be journaled (fsynced)
/// before any effect after it is performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Append to the run's timeline.
    Record(TimelineEvent),
    /// Probe these hosts and feed back [`Input::Probed`] / [`Input::Reprobed`] for each.
    Probe {
        /// Why.
        purpose: ProbePurpose,
        /// Hosts and scripts.
        requests: Vec<ProbeRequest>,
        /// Time limit per probe.
        timeout_ms: u64,
    },
    /// The plan waits for a token: show it and the approve command.
    AwaitConfirmation {
        /// The plan.
        plan: PlanView,
        /// Its operation hash.
        operation_hash: String,
        /// Distinct approvers needed.
        approvals_required: u8,
        /// Lifetime a token may have.
        token_lifetime_ms: u64,
        /// `tollgate approve RUN --operation-hash H`.
        approve_command: String,
    },
    /// A presented token was refused; the run still waits for a valid one.
    TokenRejected {
        /// Why.
        reason: ReasonCode,
        /// The rule.
        rule: RuleId,
        /// One sentence.
        detail: String,
    },
    /// Journal this nonce as consumed (single use) before anything after it.
    ConsumeToken {
        /// Nonce, hex.
        nonce: String,
    },
    /// Run a step's check; answer with [`Input::CheckAnswered`].
    Check(CheckRequest),
    /// Send a step; answer with [`Input::StepAnswered`].
    Dispatch(Dispatch),
    /// Ask the host what became of a key; answer with [`Input::IdempotencyAnswered`].
    QueryIdempotency {
        /// The host.
        host: String,
        /// The step.
        step_id: String,
        /// The key.
        idempotency_key: String,
    },
    /// Call [`super::RunMachine::step`] with [`Input::Tick`] at or after this time.
    WakeAt {
        /// Unix ms.
        at_ms: u64,
    },
    /// The run is over.
    Finish(RunResult),
}
