//! A session's failures as the core's typed answers, by variant, never by wording.

use tollgate_protocol::outcome::ReasonCode;

use crate::core::facts::ProbeFailure;
use crate::core::run::StepResult;

use super::{RefusalCode, SessionError};

/// A failed probe's typed cause.
pub fn probe_failure(e: &SessionError) -> ProbeFailure {
    match e {
        SessionError::PwshMissing { .. } | SessionError::PwshTooOld(_) => {
            ProbeFailure::ShellUnavailable {
                detail: e.to_string(),
            }
        }
        SessionError::AuthFailed(_)
        | SessionError::CredentialUnavailable(_)
        | SessionError::HostKeyUnknown(_)
        | SessionError::HostKeyChanged(_) => ProbeFailure::AuthFailed,
        SessionError::Unreachable(_) => ProbeFailure::Unreachable,
        SessionError::Lost(_) => ProbeFailure::SessionBroken,
        SessionError::Timeout(_) => ProbeFailure::TimedOut,
        SessionError::Protocol(d) | SessionError::ProbeMalformed(d) => {
            ProbeFailure::Malformed { detail: d.clone() }
        }
        SessionError::Refused {
            code: RefusalCode::UnsupportedVersion,
            ..
        } => ProbeFailure::VersionMismatch,
        SessionError::InvalidSettings(_)
        | SessionError::Setup(_)
        | SessionError::IdempotencyConflict(_)
        | SessionError::ProbeFailed(_)
        | SessionError::Refused { .. } => ProbeFailure::Failed {
            detail: e.to_string(),
        },
    }
}

/// What a failed execution means: nothing sent or busy (retry), refused (permanent), or sent
/// and then lost (the outcome is unknown; the machine queries the key).
pub fn step_failure(e: &SessionError) -> StepResult {
    match e {
        SessionError::Unreachable(_) => StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
        SessionError::Refused {
            code: RefusalCode::Busy,
            ..
        } => StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
        SessionError::AuthFailed(_)
        | SessionError::CredentialUnavailable(_)
        | SessionError::HostKeyUnknown(_)
        | SessionError::HostKeyChanged(_) => StepResult::Permanent {
            reason: ReasonCode::AuthFailed,
            exit_code: None,
        },
        SessionError::PwshMissing { .. } | SessionError::PwshTooOld(_) => StepResult::Permanent {
            reason: ReasonCode::ShellUnavailable,
            exit_code: None,
        },
        SessionError::Lost(_) | SessionError::Timeout(_) | SessionError::Protocol(_) => {
            StepResult::OutcomeLost
        }
        SessionError::Refused {
            code: RefusalCode::UnsupportedVersion,
            ..
        } => StepResult::Permanent {
            reason: ReasonCode::VersionMismatch,
            exit_code: None,
        },
        SessionError::InvalidSettings(_)
        | SessionError::Setup(_)
        | SessionError::IdempotencyConflict(_)
        | SessionError::ProbeFailed(_)
        | SessionError::ProbeMalformed(_)
        | SessionError::Refused { .. } => StepResult::Permanent {
            reason: ReasonCode::SpawnFailed,
            exit_code: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: RefusalCode) -> SessionError {
        SessionError::Refused {
            code,
            message: "busy; unsupported_version".into(),
        }
    }

    #[test]
    fn only_a_busy_session_host_is_retried_and_the_words_never_decide() {
        let transient = StepResult::Transient {
            reason: ReasonCode::Unreachable,
        };
        let permanent = StepResult::Permanent {
            reason: ReasonCode::SpawnFailed,
            exit_code: None,
        };
        let table = [
            (RefusalCode::Busy, &transient),
            (RefusalCode::BadRequest, &permanent),
            (
                RefusalCode::UnsupportedVersion,
                &StepResult::Permanent {
                    reason: ReasonCode::VersionMismatch,
                    exit_code: None,
                },
            ),
            (RefusalCode::Internal, &permanent),
            (RefusalCode::Other, &permanent),
        ];
        for (code, want) in table {
            let e = refused(code);
            assert_eq!(&step_failure(&e), want, "{code:?}");
            // The session's own view of a refusal agrees with the core's.
            assert_eq!(e.is_transient(), want == &transient, "{code:?}");
        }
    }

    #[test]
    fn a_session_host_speaking_no_common_version_is_a_version_mismatch_not_a_failure() {
        assert_eq!(
            probe_failure(&refused(RefusalCode::UnsupportedVersion)),
            ProbeFailure::VersionMismatch
        );
        assert!(matches!(
            probe_failure(&refused(RefusalCode::Internal)),
            ProbeFailure::Failed { .. }
        ));
    }
}
