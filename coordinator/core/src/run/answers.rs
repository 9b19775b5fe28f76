//! What a host's answers mean to the run machine: an agent's or a session's execution result,
//! a check script's exit, an idempotency query. Every transport hands its answers through
//! these, so "what counts as done, failed or unknown" is decided once, here.

use tollgate_protocol::agent::{ExecResult, ExecStatus, IdempotencyStatus};
use tollgate_protocol::outcome::ReasonCode;

use super::{CheckAnswer, IdempotencyAnswer, StepResult};

/// An execution result as the machine reads it.
pub fn step_result(r: &ExecResult) -> StepResult {
    let permanent = |reason| StepResult::Permanent {
        reason,
        exit_code: None,
    };
    match &r.status {
        ExecStatus::Exited { code: 0 } => StepResult::Succeeded,
        ExecStatus::Exited { code } => StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            exit_code: Some(*code),
        },
        ExecStatus::Killed { .. } => permanent(ReasonCode::NonZeroExit),
        ExecStatus::TimedOut => permanent(ReasonCode::TimedOut),
        ExecStatus::Cancelled => permanent(ReasonCode::Cancelled),
        ExecStatus::CapabilityMismatch { .. } => permanent(ReasonCode::ShellUnavailable),
        ExecStatus::SpawnFailed { .. } => permanent(ReasonCode::SpawnFailed),
        // Stopped by the host's own shutdown: it may have done part of its work.
        ExecStatus::Interrupted { .. } => permanent(ReasonCode::OutcomeUncertain),
        // The host cannot say whether it ran: let the machine query the key (and fail closed).
        ExecStatus::Uncertain { .. } => StepResult::OutcomeLost,
    }
}

/// A `check` script's result: exit 0 is "already in the desired state", a non-zero exit "not
/// yet"; anything else is a failed check, never a guess.
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

/// What a host said about an idempotency key (`None`: it could not be asked).
pub fn idempotency_answer(answer: Option<IdempotencyStatus>) -> IdempotencyAnswer {
    match answer {
        Some(IdempotencyStatus::NotFound) => IdempotencyAnswer::NotFound,
        Some(IdempotencyStatus::Running) => IdempotencyAnswer::Running,
        Some(IdempotencyStatus::Uncertain) => IdempotencyAnswer::Uncertain,
        Some(IdempotencyStatus::Finished(r)) => IdempotencyAnswer::Finished(step_result(&r)),
        None => IdempotencyAnswer::QueryFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: ExecStatus) -> ExecResult {
        ExecResult {
            idempotency_key: "k".into(),
            status,
            duration_ms: 1,
            stdout_truncated: false,
            stderr_truncated: false,
            replayed: false,
        }
    }

    #[test]
    fn every_execution_status_has_one_reading() {
        let table: Vec<(ExecStatus, StepResult, CheckAnswer)> = vec![
            (
                ExecStatus::Exited { code: 0 },
                StepResult::Succeeded,
                CheckAnswer::InDesiredState,
            ),
            (
                ExecStatus::Exited { code: 3 },
                StepResult::Permanent {
                    reason: ReasonCode::NonZeroExit,
                    exit_code: Some(3),
                },
                CheckAnswer::NotInDesiredState,
            ),
            (
                ExecStatus::TimedOut,
                StepResult::Permanent {
                    reason: ReasonCode::TimedOut,
                    exit_code: None,
                },
                CheckAnswer::Failed {
                    reason: ReasonCode::TimedOut,
                },
            ),
            (
                ExecStatus::Interrupted {
                    detail: "agent stopped".into(),
                },
                StepResult::Permanent {
                    reason: ReasonCode::OutcomeUncertain,
                    exit_code: None,
                },
                CheckAnswer::Failed {
                    reason: ReasonCode::OutcomeUncertain,
                },
            ),
            (
                ExecStatus::Uncertain {
                    detail: "earlier process".into(),
                },
                StepResult::OutcomeLost,
                CheckAnswer::Failed {
                    reason: ReasonCode::OutcomeUncertain,
                },
            ),
        ];
        for (status, step, check) in table {
            let got = step_result(&result(status.clone()));
            assert_eq!(got, step, "{status:?}");
            assert_eq!(check_answer(got), check, "{status:?}");
        }
    }

    #[test]
    fn a_key_that_cannot_be_asked_is_a_failed_query_never_not_found() {
        assert_eq!(idempotency_answer(None), IdempotencyAnswer::QueryFailed);
        assert_eq!(
            idempotency_answer(Some(IdempotencyStatus::Finished(result(
                ExecStatus::Exited { code: 0 }
            )))),
            IdempotencyAnswer::Finished(StepResult::Succeeded)
        );
    }
}
