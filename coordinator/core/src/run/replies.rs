//! What the runtime tells a waiting operator, and what a shadow host answers. The runtime only
//! carries these: the outcome, reason code and rule of every reply are decided here.

use tollgate_protocol::outcome::{Outcome, ReasonCode};
use uuid::Uuid;

use super::{CheckAnswer, Effect, Input, StepResult};
use crate::rules::{R006_DESTRUCTIVE_NEEDS_CONFIRMATION, RuleId};

/// A reply to the operator that is not the run's final result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The outcome the operator reads.
    pub outcome: Outcome,
    /// Its reason code.
    pub reason: ReasonCode,
    /// The rule that decided it, if a rule did.
    pub rule: Option<RuleId>,
    /// One sentence.
    pub detail: String,
}

/// The run's journal could not be written (`error` says why): nothing more may happen in the
/// run, and what was already sent is not known to be recorded, so the outcome is uncertain.
pub fn journal_failed(error: &str) -> Reply {
    Reply {
        outcome: Outcome::PreflightFailed {
            reason: ReasonCode::OutcomeUncertain,
        },
        reason: ReasonCode::OutcomeUncertain,
        rule: None,
        detail: format!("the run journal could not be written ({error}); the run was stopped"),
    }
}

/// The reply an effect of run `run_id` owes the operator who is waiting, if it owes one: the
/// plan awaiting approval, or a refused token (the run goes on waiting for a valid one).
pub fn reply_for(run_id: Uuid, effect: &Effect) -> Option<Reply> {
    match effect {
        Effect::AwaitConfirmation {
            plan,
            operation_hash,
            approvals_required,
            approve_command,
            ..
        } => Some(Reply {
            outcome: Outcome::ConfirmationRequired {
                run_id,
                operation_hash: operation_hash.clone(),
                plan: plan.clone(),
            },
            reason: ReasonCode::TokenMissing,
            rule: Some(R006_DESTRUCTIVE_NEEDS_CONFIRMATION),
            detail: format!(
                "nothing destructive runs until {approvals_required} approver(s) sign this exact plan: {approve_command}"
            ),
        }),
        Effect::TokenRejected {
            reason,
            rule,
            detail,
        } => Some(Reply {
            outcome: Outcome::PolicyBlocked {
                reason: *reason,
                rule: (*rule).to_owned(),
            },
            reason: *reason,
            rule: Some(rule),
            detail: detail.clone(),
        }),
        Effect::Record(_)
        | Effect::Probe { .. }
        | Effect::ConsumeToken { .. }
        | Effect::Check(_)
        | Effect::Dispatch(_)
        | Effect::QueryIdempotency { .. }
        | Effect::WakeAt { .. }
        | Effect::Finish(_) => None,
    }
}

/// In a shadow run nothing is executed: what a host is taken to answer instead. A check
/// says "not in the desired state" (so every step is planned as if it ran) and a dispatched
/// step "succeeded"; every other effect is performed as in a live run (probes are real).
pub fn shadow_answer(effect: &Effect) -> Option<Input> {
    match effect {
        Effect::Check(c) => Some(Input::CheckAnswered {
            host: c.host.clone(),
            step_id: c.step_id.clone(),
            answer: CheckAnswer::NotInDesiredState,
        }),
        Effect::Dispatch(d) => Some(Input::StepAnswered {
            host: d.host.clone(),
            step_id: d.step_id.clone(),
            idempotency_key: d.idempotency_key.clone(),
            result: StepResult::Succeeded,
        }),
        // Named one by one: a new effect that touches a host must be decided here, or a shadow
        // run would perform it for real.
        Effect::Record(_)
        | Effect::Probe { .. }
        | Effect::AwaitConfirmation { .. }
        | Effect::TokenRejected { .. }
        | Effect::ConsumeToken { .. }
        | Effect::QueryIdempotency { .. }
        | Effect::WakeAt { .. }
        | Effect::Finish(_) => None,
    }
}
