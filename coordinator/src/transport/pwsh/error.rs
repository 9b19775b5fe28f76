//! Why a session could not do what was asked ([`SessionError`]), how each failure classifies
//! (transient or not, its reason code), and how the session host's `fail` codes map to it.

use std::path::PathBuf;
use std::time::Duration;

use tollgate_protocol::outcome::ReasonCode;

use super::contract::FailCode;

/// Why a session could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The `pwsh` program is not there; nothing was started. A capability mismatch for the host.
    #[error("pwsh not found: {detail}")]
    PwshMissing { path: PathBuf, detail: String },
    /// The settings cannot make a valid command line; nothing was started.
    #[error("invalid pwsh session settings: {0}")]
    InvalidSettings(String),
    /// The session host script could not be written on this machine; nothing was started.
    #[error("cannot prepare the session host: {0}")]
    Setup(String),
    /// The credential reference does not resolve; nothing was sent to the target.
    #[error("credential unavailable: {0}")]
    CredentialUnavailable(String),
    /// The target refused the credential. Not transient: retrying will not fix it.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// SSH: the target's host key is not in the named known_hosts file; no connection was
    /// made. Not transient: a person checks the key out of band and adds it.
    #[error("host key unknown: {0}")]
    HostKeyUnknown(String),
    /// SSH: the target offers a host key other than the one pinned for it: reinstalled, or a
    /// machine in between. Not transient; nothing was authenticated.
    #[error("host key changed: {0}")]
    HostKeyChanged(String),
    /// The `pwsh` found cannot do what the mode needs (the message names the version found and
    /// the version needed); nothing was sent. A capability mismatch for the host.
    #[error("pwsh too old: {0}")]
    PwshTooOld(String),
    /// The target could not be reached and nothing was sent (or nothing ran): safe to retry.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request was sent and the session broke before its answer: the outcome is unknown.
    #[error("session lost: {0}")]
    Lost(String),
    /// The child wrote something that is not the contract; it was killed.
    #[error("session host broke the contract: {0}")]
    Protocol(String),
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The idempotency key was used before for a different request; nothing ran.
    #[error("idempotency conflict: {0}")]
    IdempotencyConflict(String),
    /// The probe script failed.
    #[error("probe failed: {0}")]
    ProbeFailed(String),
    /// The probe answered something that is not facts.
    #[error("probe output is not facts: {0}")]
    ProbeMalformed(String),
    /// The session host refused the request (`busy`, `bad_request`, `unsupported_version`,
    /// `internal`, ...).
    #[error("session host refused the request ({code}): {message}")]
    Refused { code: RefusalCode, message: String },
}

/// Why the session host refused a request: the contract's `fail` codes that are no other
/// [`SessionError`]. Decisions read this, never the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// The request was not a contract request.
    BadRequest,
    /// The session host does not speak this contract version.
    UnsupportedVersion,
    /// Another request is running; nothing ran (transient).
    Busy,
    /// The session host failed on its own.
    Internal,
    /// A code this coordinator does not know (a newer session host).
    Other,
}

impl RefusalCode {
    /// The contract's code for this refusal.
    pub fn fail_code(self) -> FailCode {
        match self {
            RefusalCode::BadRequest => FailCode::BadRequest,
            RefusalCode::UnsupportedVersion => FailCode::UnsupportedVersion,
            RefusalCode::Busy => FailCode::Busy,
            RefusalCode::Internal => FailCode::Internal,
            RefusalCode::Other => FailCode::Other,
        }
    }
}

/// The code as the contract spells it (`busy`, `bad_request`, ...).
impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.fail_code().as_str())
    }
}

impl SessionError {
    /// Transient failures may be retried (a new child is started when needed); others need a
    /// person: a missing program, bad settings, a refused credential, a broken contract.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SessionError::Unreachable(_)
                | SessionError::Lost(_)
                | SessionError::Timeout(_)
                | SessionError::Refused {
                    code: RefusalCode::Busy,
                    ..
                }
        )
    }

    /// The reason code this failure suggests (the caller may refine it, e.g. `ProbeTimeout`).
    pub fn reason(&self) -> ReasonCode {
        match self {
            SessionError::PwshMissing { .. } | SessionError::PwshTooOld(_) => {
                ReasonCode::ShellUnavailable
            }
            SessionError::InvalidSettings(_) | SessionError::Setup(_) => ReasonCode::SpawnFailed,
            SessionError::CredentialUnavailable(_)
            | SessionError::AuthFailed(_)
            | SessionError::HostKeyUnknown(_)
            | SessionError::HostKeyChanged(_) => ReasonCode::AuthFailed,
            SessionError::Unreachable(_) => ReasonCode::Unreachable,
            SessionError::Lost(_) | SessionError::Protocol(_) => ReasonCode::SessionBroken,
            SessionError::Timeout(_) => ReasonCode::TimedOut,
            SessionError::IdempotencyConflict(_) => ReasonCode::SpawnFailed,
            SessionError::ProbeFailed(_) => ReasonCode::ProbeFailed,
            SessionError::ProbeMalformed(_) => ReasonCode::MalformedFacts,
            SessionError::Refused {
                code: RefusalCode::UnsupportedVersion,
                ..
            } => ReasonCode::VersionMismatch,
            SessionError::Refused { .. } => ReasonCode::SpawnFailed,
        }
    }
}

/// The error for a session host's `fail` answer.
pub(super) fn fail_error(
    host: &str,
    code: FailCode,
    message: String,
    timeout: Duration,
) -> SessionError {
    match code {
        FailCode::AuthFailed => SessionError::AuthFailed(format!("{host}: {message}")),
        FailCode::Unreachable => SessionError::Unreachable(format!("{host}: {message}")),
        FailCode::HostKeyUnknown => SessionError::HostKeyUnknown(format!("{host}: {message}")),
        FailCode::HostKeyChanged => SessionError::HostKeyChanged(format!("{host}: {message}")),
        FailCode::PwshTooOld => SessionError::PwshTooOld(format!("{host}: {message}")),
        FailCode::CredentialUnavailable => {
            SessionError::CredentialUnavailable(format!("{host}: {message}"))
        }
        FailCode::SessionLost => SessionError::Lost(format!("{host}: {message}")),
        FailCode::IdempotencyConflict => SessionError::IdempotencyConflict(message),
        FailCode::ProbeFailed => SessionError::ProbeFailed(message),
        FailCode::TimedOut => SessionError::Timeout(timeout),
        FailCode::BadRequest => refused(RefusalCode::BadRequest, message),
        FailCode::UnsupportedVersion => refused(RefusalCode::UnsupportedVersion, message),
        FailCode::Busy => refused(RefusalCode::Busy, message),
        FailCode::Internal => refused(RefusalCode::Internal, message),
        FailCode::Other => refused(RefusalCode::Other, message),
    }
}

fn refused(code: RefusalCode, message: String) -> SessionError {
    SessionError::Refused { code, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transience_follows_the_brief() {
        assert!(SessionError::Unreachable("x".into()).is_transient());
        assert!(SessionError::Lost("x".into()).is_transient());
        assert!(SessionError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(!SessionError::AuthFailed("x".into()).is_transient());
        assert!(!SessionError::Protocol("x".into()).is_transient());
        assert_eq!(
            SessionError::AuthFailed("x".into()).reason(),
            ReasonCode::AuthFailed
        );
    }

    #[test]
    fn refusals_follow_the_code_not_the_words() {
        // Words that name other codes; only the code may decide.
        let words = "busy; unsupported_version; timed out";
        let table = [
            (
                FailCode::Busy,
                RefusalCode::Busy,
                true,
                ReasonCode::SpawnFailed,
            ),
            (
                FailCode::BadRequest,
                RefusalCode::BadRequest,
                false,
                ReasonCode::SpawnFailed,
            ),
            (
                FailCode::UnsupportedVersion,
                RefusalCode::UnsupportedVersion,
                false,
                ReasonCode::VersionMismatch,
            ),
            (
                FailCode::Internal,
                RefusalCode::Internal,
                false,
                ReasonCode::SpawnFailed,
            ),
            (
                FailCode::Other,
                RefusalCode::Other,
                false,
                ReasonCode::SpawnFailed,
            ),
        ];
        for (fail, code, transient, reason) in table {
            let e = fail_error("web1", fail, words.into(), Duration::ZERO);
            assert_eq!(
                e,
                SessionError::Refused {
                    code,
                    message: words.into()
                }
            );
            assert_eq!(code.fail_code(), fail);
            assert_eq!(e.is_transient(), transient, "{code:?}");
            assert_eq!(e.reason(), reason, "{code:?}");
        }
        let busy = fail_error(
            "web1",
            FailCode::Busy,
            "request 3 is still running".into(),
            Duration::ZERO,
        );
        assert_eq!(
            busy.to_string(),
            "session host refused the request (busy): request 3 is still running"
        );
    }
}
