//! Timeline events: what the run machine decided and observed, with the rule and the inputs.
//!
//! The core builds them; the recorder (runtime) numbers, hash-chains, writes and fsyncs them
//! before performing the effects that follow them in the same batch.

use std::collections::BTreeMap;

use tollgate_protocol::outcome::ReasonCode;

use super::rules::RuleId;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// The run began.
    RunStarted,
    /// Probes were requested (preflight or barrier).
    ProbeRequested,
    /// A probe answered.
    ProbeReported,
    /// Policy decided (run or host).
    PolicyEvaluated,
    /// The plan was fixed and hashed.
    PlanSealed,
    /// The run waits for a token.
    ConfirmationRequested,
    /// A token was issued for the plan (by the approvers' approval).
    TokenIssued,
    /// A token was presented and judged.
    TokenJudged,
    /// A barrier began (containment checked, re-probes requested).
    BarrierStarted,
    /// A barrier decided.
    BarrierEvaluated,
    /// A step's check was requested.
    CheckRequested,
    /// A check answered.
    CheckReported,
    /// A step was sent.
    StepDispatched,
    /// A step answered.
    StepReported,
    /// A retry was scheduled.
    RetryScheduled,
    /// A step was skipped.
    StepSkipped,
    /// An idempotency key was queried.
    OutcomeQueried,
    /// An idempotency query answered.
    IdempotencyAnswered,
    /// A host's lifecycle state changed.
    HostStateChanged,
    /// A host gave up (failure or uncertainty).
    HostFailed,
    /// A phase ended.
    PhaseCompleted,
    /// A cancel was asked for mid-execution (in-flight steps finish first; `run_finished`
    /// follows).
    CancelRequested,
    /// The run ended.
    RunFinished,
    /// A signed checkpoint over every line before it (written by the journal, not the machine).
    Checkpoint,
}

impl EventKind {
    /// The name written in journals.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RunStarted => "run_started",
            EventKind::ProbeRequested => "probe_requested",
            EventKind::ProbeReported => "probe_reported",
            EventKind::PolicyEvaluated => "policy_evaluated",
            EventKind::PlanSealed => "plan_sealed",
            EventKind::ConfirmationRequested => "confirmation_requested",
            EventKind::TokenIssued => "token_issued",
            EventKind::TokenJudged => "token_judged",
            EventKind::BarrierStarted => "barrier_started",
            EventKind::BarrierEvaluated => "barrier_evaluated",
            EventKind::CheckRequested => "check_requested",
            EventKind::CheckReported => "check_reported",
            EventKind::StepDispatched => "step_dispatched",
            EventKind::StepReported => "step_reported",
            EventKind::RetryScheduled => "retry_scheduled",
            EventKind::StepSkipped => "step_skipped",
            EventKind::OutcomeQueried => "outcome_queried",
            EventKind::IdempotencyAnswered => "idempotency_answered",
            EventKind::HostStateChanged => "host_state_changed",
            EventKind::HostFailed => "host_failed",
            EventKind::PhaseCompleted => "phase_completed",
            EventKind::CancelRequested => "cancel_requested",
            EventKind::RunFinished => "run_finished",
            EventKind::Checkpoint => "checkpoint",
        }
    }

    /// Every kind, in journal order of first appearance.
    pub const ALL: [EventKind; 24] = [
        EventKind::RunStarted,
        EventKind::ProbeRequested,
        EventKind::ProbeReported,
        EventKind::PolicyEvaluated,
        EventKind::PlanSealed,
        EventKind::ConfirmationRequested,
        EventKind::TokenIssued,
        EventKind::TokenJudged,
        EventKind::BarrierStarted,
        EventKind::BarrierEvaluated,
        EventKind::CheckRequested,
        EventKind::CheckReported,
        EventKind::StepDispatched,
        EventKind::StepReported,
        EventKind::RetryScheduled,
        EventKind::StepSkipped,
        EventKind::OutcomeQueried,
        EventKind::IdempotencyAnswered,
        EventKind::HostStateChanged,
        EventKind::HostFailed,
        EventKind::PhaseCompleted,
        EventKind::CancelRequested,
        EventKind::RunFinished,
        EventKind::Checkpoint,
    ];

    /// The kind a journal name stands for.
    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// The decision an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Refused.
    Block,
    /// Quick mode cannot do it: escalate.
    Escalate,
    /// Full mode: wait for a token.
    AwaitConfirmation,
    /// Try again after backoff.
    Retry,
    /// Not needed (check says done).
    Skip,
    /// Ask the host what became of a step.
    Query,
    /// The host (or run) failed.
    Fail,
    /// Finished successfully.
    Complete,
}

impl Verdict {
    /// The name written in journals.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Block => "block",
            Verdict::Escalate => "escalate",
            Verdict::AwaitConfirmation => "await_confirmation",
            Verdict::Retry => "retry",
            Verdict::Skip => "skip",
            Verdict::Query => "query",
            Verdict::Fail => "fail",
            Verdict::Complete => "complete",
        }
    }

    /// Every verdict.
    pub const ALL: [Verdict; 9] = [
        Verdict::Allow,
        Verdict::Block,
        Verdict::Escalate,
        Verdict::AwaitConfirmation,
        Verdict::Retry,
        Verdict::Skip,
        Verdict::Query,
        Verdict::Fail,
        Verdict::Complete,
    ];

    /// The verdict a journal name stands for.
    pub fn parse(name: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == name)
    }
}

/// One timeline entry (sequence number and hash chain are added by the recorder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineEvent {
    /// Unix milliseconds (the time passed in with the input that caused it).
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// The host it is about, if one.
    pub host: Option<String>,
    /// The phase, if one.
    pub phase: Option<String>,
    /// The step, if one.
    pub step: Option<String>,
    /// The decision, if the event is one.
    pub verdict: Option<Verdict>,
    /// The rule behind the decision.
    pub rule: Option<RuleId>,
    /// The reason code, if any.
    pub reason: Option<ReasonCode>,
    /// The inputs the decision was computed from, as text.
    pub inputs: BTreeMap<String, String>,
}

impl TimelineEvent {
    /// A new event of `kind` at `at_ms`.
    pub fn new(at_ms: u64, kind: EventKind) -> Self {
        TimelineEvent {
            at_ms,
            kind,
            host: None,
            phase: None,
            step: None,
            verdict: None,
            rule: None,
            reason: None,
            inputs: BTreeMap::new(),
        }
    }

    /// About `host`.
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_owned());
        self
    }

    /// About `phase`.
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = Some(phase.to_owned());
        self
    }

    /// About `step`.
    pub fn step(mut self, step: &str) -> Self {
        self.step = Some(step.to_owned());
        self
    }

    /// Records a decision and its rule.
    pub fn decided(mut self, verdict: Verdict, rule: RuleId) -> Self {
        self.verdict = Some(verdict);
        self.rule = Some(rule);
        self
    }

    /// With a reason code.
    pub fn reason(mut self, reason: ReasonCode) -> Self {
        self.reason = Some(reason);
        self
    }

    /// With one input.
    pub fn input(mut self, key: &str, value: impl ToString) -> Self {
        self.inputs.insert(key.to_owned(), value.to_string());
        self
    }

    /// Whether this event records a decision (it then always names a rule).
    pub fn is_decision(&self) -> bool {
        self.verdict.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A verdict missing from `ALL` would not parse back from a journal, and its lines would
    /// drop out of `explain`. A new variant stops this match compiling; the count then wants it
    /// in `ALL`.
    #[test]
    fn every_verdict_is_listed_once_and_parses_back() {
        let listed = |v: Verdict| match v {
            Verdict::Allow
            | Verdict::Block
            | Verdict::Escalate
            | Verdict::AwaitConfirmation
            | Verdict::Retry
            | Verdict::Skip
            | Verdict::Query
            | Verdict::Fail
            | Verdict::Complete => Verdict::ALL.iter().filter(|w| **w == v).count(),
        };
        for v in Verdict::ALL {
            assert_eq!(listed(v), 1, "{v:?}");
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
        }
        assert_eq!(Verdict::ALL.len(), 9);
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Verdict::parse("maybe"), None);
    }
}
