//! Every exit status of the `tollgate` CLI, in one place. README's "Exit codes" table lists
//! exactly these (`coordinator/tests/exit_codes.rs` checks it).

use tollgate_protocol::ctl::CtlErrorCode;
use tollgate_protocol::outcome::OutcomeKind;

/// `Completed`, or a query answered.
pub const OK: u8 = 0;
/// Bad usage or configuration.
pub const USAGE: u8 = 2;
/// The coordinator could not be reached, refused our certificate, or went away mid-run.
pub const UNREACHABLE: u8 = 3;
/// The coordinator refused the request.
pub const REFUSED: u8 = 4;
/// A damaged or tampered timeline, or a missing or unreadable run.
pub const TAMPERED: u8 = 5;
/// `runs diff`: the two runs took different decisions.
pub const DIFFERENT: u8 = 6;
/// An approval was recorded; another distinct approver is needed.
pub const APPROVAL_PENDING: u8 = 12;

/// Every outcome kind, in the README's order.
pub const OUTCOMES: [OutcomeKind; 9] = [
    OutcomeKind::Completed,
    OutcomeKind::EscalationRequired,
    OutcomeKind::ConfirmationRequired,
    OutcomeKind::PolicyBlocked,
    OutcomeKind::PreflightFailed,
    OutcomeKind::TransportUnreachable,
    OutcomeKind::CapabilityMismatch,
    OutcomeKind::ExecutionFailed,
    OutcomeKind::PartialSuccess,
];

/// The exit status for an outcome.
pub fn for_outcome(kind: OutcomeKind) -> u8 {
    match kind {
        OutcomeKind::Completed => OK,
        OutcomeKind::EscalationRequired => 10,
        OutcomeKind::ConfirmationRequired => 11,
        OutcomeKind::PolicyBlocked => 20,
        OutcomeKind::PreflightFailed => 21,
        OutcomeKind::TransportUnreachable => 22,
        OutcomeKind::CapabilityMismatch => 23,
        OutcomeKind::ExecutionFailed => 24,
        OutcomeKind::PartialSuccess => 25,
    }
}

/// The exit status for a refusal: a run whose record is missing or does not verify is
/// reported as damage ([`TAMPERED`]), any other refusal as [`REFUSED`].
pub fn for_error(code: CtlErrorCode) -> u8 {
    match code {
        CtlErrorCode::RunMissing | CtlErrorCode::RunUnreadable => TAMPERED,
        _ => REFUSED,
    }
}

/// Every status the CLI can exit with, sorted.
pub fn all() -> Vec<u8> {
    let mut v: Vec<u8> = [
        USAGE,
        UNREACHABLE,
        REFUSED,
        TAMPERED,
        DIFFERENT,
        APPROVAL_PENDING,
    ]
    .into_iter()
    .chain(OUTCOMES.iter().map(|k| for_outcome(*k)))
    .collect();
    v.sort_unstable();
    v.dedup();
    v
}
