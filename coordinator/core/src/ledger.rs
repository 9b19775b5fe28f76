//! The run ledger: the life of every run id across coordinator processes (SPEC §3, "A run's
//! whole life").
//!
//! ```text
//!             start                escalate               continue
//!   (none) ──────────► Created ─────────────► Escalated ───────────► Continued
//!                         │ confirm                                     │ confirm
//!                         ▼                                             ▼
//!                  AwaitingApproval ◄───────────────────────────────────┘
//!                         │ token issued
//!                         ▼
//!                      Approved ── token accepted ──► Executing
//!
//!   every stage but Closed ── finish (or a restart) ──► Closed      Closed ── anything ──► error
//! ```
//!
//! Open or closed is decided by the run's own journal, folded through [`transition`]
//! ([`RunRecord::from_journal`]), never by which files exist. A coordinator start closes every
//! run that is not [`Stage::Closed`], whatever its stage ([`on_restart`]), so a token issued
//! before the restart has no open run left to act in. A run id is admitted again only to
//! continue its own escalation, with the same action, in full mode, with the shadow flag it
//! was born with ([`admit`]); an id whose record is unreadable or missing is never reused.

use std::collections::BTreeMap;

use tollgate_protocol::outcome::OutcomeKind;
use tollgate_protocol::{Action, Mode};

use super::timeline::EventKind;

/// Where a run id is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Admitted: probing, planning, or running work that needs no token.
    Created,
    /// Its quick part ended `EscalationRequired`; it may be continued once, in full mode.
    Escalated,
    /// Re-submitted in full mode after its escalation.
    Continued,
    /// A full plan waits for approval.
    AwaitingApproval,
    /// A token was issued for the plan (one live token per plan).
    Approved {
        /// When that token expires (unix ms): until then no second token is issued.
        token_expires_ms: u64,
    },
    /// A token was accepted: destructive work may be under way.
    Executing,
    /// Over. Never reused; its tokens are dead.
    Closed,
}

impl Stage {
    /// The stage's name, as listed and journaled.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Created => "created",
            Stage::Escalated => "escalated",
            Stage::Continued => "continued",
            Stage::AwaitingApproval => "awaiting-approval",
            Stage::Approved { .. } => "approved",
            Stage::Executing => "executing",
            Stage::Closed => "closed",
        }
    }

    /// Whether the run is over.
    pub fn is_closed(self) -> bool {
        self == Stage::Closed
    }

    /// Whether the run holds its hosts (every stage but `Escalated` and `Closed`: an escalated
    /// run waits for a person, and holds nothing until it is continued).
    pub fn holds_hosts(self) -> bool {
        !matches!(self, Stage::Escalated | Stage::Closed)
    }
}

/// What happened to a run, as the ledger sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerEvent {
    /// A `run_started` line: the first, or a continuation after an escalation.
    Started,
    /// The machine asked for a token (`confirmation_requested`).
    ConfirmationRequested,
    /// A token was issued, expiring at `expires_ms` (`token_issued`).
    TokenIssued { expires_ms: u64 },
    /// A token was accepted (`token_judged` allow).
    TokenAccepted,
    /// The run finished with `outcome` (`run_finished`).
    Finished { outcome: OutcomeKind },
}

/// A transition the table does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The run is over: nothing may happen to it any more.
    #[error("run is closed")]
    Closed,
    /// A token is already live for this plan (one live token per plan).
    #[error("the plan is already approved; its token is live until {expires_ms} (unix ms)")]
    AlreadyApproved { expires_ms: u64 },
    /// Any other pair.
    #[error("{event:?} cannot happen to a run that is {stage}")]
    Unexpected {
        stage: &'static str,
        event: LedgerEvent,
    },
}

/// The transition table: `(stage, event, now) -> stage`. `None` is "no such run yet".
pub fn transition(
    stage: Option<Stage>,
    event: LedgerEvent,
    now_ms: u64,
) -> Result<Stage, LedgerError> {
    use LedgerEvent as E;
    use Stage as S;
    let unexpected = |s: Option<Stage>| LedgerError::Unexpected {
        stage: s.map(Stage::as_str).unwrap_or("unknown"),
        event,
    };
    match (stage, event) {
        (Some(S::Closed), _) => Err(LedgerError::Closed),
        (None, E::Started) => Ok(S::Created),
        (Some(S::Escalated), E::Started) => Ok(S::Continued),
        (Some(S::Created | S::Continued), E::ConfirmationRequested) => Ok(S::AwaitingApproval),
        (Some(S::AwaitingApproval), E::TokenIssued { expires_ms }) => Ok(S::Approved {
            token_expires_ms: expires_ms,
        }),
        (Some(S::Approved { token_expires_ms }), E::TokenIssued { expires_ms }) => {
            if now_ms < token_expires_ms {
                Err(LedgerError::AlreadyApproved {
                    expires_ms: token_expires_ms,
                })
            } else {
                Ok(S::Approved {
                    token_expires_ms: expires_ms,
                })
            }
        }
        (Some(S::Approved { .. }), E::TokenAccepted) => Ok(S::Executing),
        // Only the quick part of a run escalates; a continuation never escalates again.
        (
            Some(S::Created),
            E::Finished {
                outcome: OutcomeKind::EscalationRequired,
            },
        ) => Ok(S::Escalated),
        (Some(_), E::Finished { outcome }) if outcome != OutcomeKind::EscalationRequired => {
            Ok(S::Closed)
        }
        (s, _) => Err(unexpected(s)),
    }
}

/// What the ledger knows of one run id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    /// Its action (fixed at birth).
    pub action: Action,
    /// Whether it was born a shadow run (fixed at birth, kept through continuation).
    pub shadow: bool,
    /// Who asked for it (the first submission's requester).
    pub requestor: String,
    /// Where it is.
    pub stage: Stage,
}

/// One journal fact the ledger reads: a line's kind with the inputs the ledger needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalFact {
    /// The ledger event the line means, if any.
    pub event: Option<LedgerEvent>,
    /// For a `run_started` line: its action, shadow flag and requester.
    pub birth: Option<(Action, bool, String)>,
    /// The line's time.
    pub at_ms: u64,
}

/// What one timeline entry (its kind, whether it decided `allow`, its inputs, its time) means
/// to the ledger: the one reading of a journal line, shared by start-up recovery and the
/// model tests. A `run_finished` whose outcome cannot be read counts as a close (never as an
/// escalation), so doubt never reopens a run.
pub fn fact_of(
    kind: Option<EventKind>,
    allowed: bool,
    inputs: &BTreeMap<String, String>,
    at_ms: u64,
) -> JournalFact {
    let input = |k: &str| inputs.get(k).map(String::as_str);
    let mut birth = None;
    let event = match kind {
        Some(EventKind::RunStarted) => {
            let action = match input("action") {
                Some("deploy") => Action::Deploy,
                _ => Action::Teardown,
            };
            birth = Some((
                action,
                input("shadow") == Some("true"),
                input("requestor").unwrap_or_default().to_owned(),
            ));
            Some(LedgerEvent::Started)
        }
        Some(EventKind::ConfirmationRequested) => Some(LedgerEvent::ConfirmationRequested),
        Some(EventKind::TokenIssued) => Some(LedgerEvent::TokenIssued {
            expires_ms: input("expires_at_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX),
        }),
        Some(EventKind::TokenJudged) if allowed => Some(LedgerEvent::TokenAccepted),
        Some(EventKind::RunFinished) => Some(LedgerEvent::Finished {
            outcome: input("outcome")
                .and_then(|o| {
                    serde_json::from_value::<OutcomeKind>(serde_json::Value::String(o.to_owned()))
                        .ok()
                })
                .unwrap_or(OutcomeKind::PolicyBlocked),
        }),
        _ => None,
    };
    JournalFact {
        event,
        birth,
        at_ms,
    }
}

/// A journal the ledger cannot make a run of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No `run_started` line first.
    #[error("the timeline does not begin with run_started")]
    NoStart,
    /// A line the table refuses, at 1-based fact index `at`.
    #[error("fact {at}: {error}")]
    Refused { at: usize, error: LedgerError },
}

impl RunRecord {
    /// Folds a run's journal facts, in order, through [`transition`].
    pub fn from_journal(facts: &[JournalFact]) -> Result<RunRecord, RecordError> {
        let mut record: Option<RunRecord> = None;
        for (i, f) in facts.iter().enumerate() {
            let Some(event) = f.event else { continue };
            let stage = transition(record.as_ref().map(|r| r.stage), event, f.at_ms)
                .map_err(|error| RecordError::Refused { at: i + 1, error })?;
            match &mut record {
                Some(r) => r.stage = stage,
                None => {
                    let (action, shadow, requestor) =
                        f.birth.clone().ok_or(RecordError::NoStart)?;
                    record = Some(RunRecord {
                        action,
                        shadow,
                        requestor,
                        stage,
                    });
                }
            }
        }
        record.ok_or(RecordError::NoStart)
    }
}

/// What a coordinator knows of a run id when an intent names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Its record, from its journal (or the live run).
    Record(RunRecord),
    /// Its record exists but cannot be read or verified.
    Unreadable,
    /// The signed index lists it, but its directory is gone.
    Missing,
}

/// What an intent asks of the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub action: Action,
    pub mode: Mode,
    pub shadow: bool,
}

/// Why a run id is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitRefused {
    #[error("the run is still open ({0})")]
    StillOpen(&'static str),
    #[error("the run is closed; a closed run id is never reused")]
    Closed,
    #[error("the escalated run was a {expected}; a {got} cannot continue it")]
    OtherAction { expected: Action, got: Action },
    #[error("an escalated run continues only in full mode")]
    NotFull,
    #[error(
        "the run was born {}; its continuation must be too (add or remove --shadow)",
        if *born_shadow { "a shadow run" } else { "live" }
    )]
    ShadowMismatch { born_shadow: bool },
    #[error("the run's record cannot be read or verified; its id is never reused")]
    Unreadable,
    #[error(
        "the signed run index lists this run but its directory is missing (deleted or renamed); its id is never reused"
    )]
    Missing,
}

/// Admits an intent for a run id: `None` known is a new run; an escalated run may be
/// continued; everything else is refused.
pub fn admit(known: Option<&Known>, intent: Admission) -> Result<(), AdmitRefused> {
    let record = match known {
        None => return Ok(()),
        Some(Known::Unreadable) => return Err(AdmitRefused::Unreadable),
        Some(Known::Missing) => return Err(AdmitRefused::Missing),
        Some(Known::Record(r)) => r,
    };
    match record.stage {
        Stage::Escalated => {}
        Stage::Closed => return Err(AdmitRefused::Closed),
        other => return Err(AdmitRefused::StillOpen(other.as_str())),
    }
    if record.action != intent.action {
        return Err(AdmitRefused::OtherAction {
            expected: record.action,
            got: intent.action,
        });
    }
    if intent.mode != Mode::Full {
        return Err(AdmitRefused::NotFull);
    }
    if record.shadow != intent.shadow {
        return Err(AdmitRefused::ShadowMismatch {
            born_shadow: record.shadow,
        });
    }
    Ok(())
}

/// What a coordinator start does with a run found in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRestart {
    /// Already closed: adopt it as it is.
    Keep,
    /// Not closed, whatever its stage (escalated, awaiting a token, mid-step): close it.
    Close,
}

/// A restart closes every run that is not closed.
pub fn on_restart(stage: Stage) -> OnRestart {
    if stage.is_closed() {
        OnRestart::Keep
    } else {
        OnRestart::Close
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_STAGES: [Stage; 7] = [
        Stage::Created,
        Stage::Escalated,
        Stage::Continued,
        Stage::AwaitingApproval,
        Stage::Approved {
            token_expires_ms: 100,
        },
        Stage::Executing,
        Stage::Closed,
    ];

    fn events() -> Vec<LedgerEvent> {
        let mut v = vec![
            LedgerEvent::Started,
            LedgerEvent::ConfirmationRequested,
            LedgerEvent::TokenIssued { expires_ms: 200 },
            LedgerEvent::TokenAccepted,
        ];
        for outcome in [
            OutcomeKind::EscalationRequired,
            OutcomeKind::Completed,
            OutcomeKind::PolicyBlocked,
            OutcomeKind::ExecutionFailed,
        ] {
            v.push(LedgerEvent::Finished { outcome });
        }
        v
    }

    /// The whole table, every (stage, event) pair, at a time before and after the live
    /// token's expiry.
    #[test]
    fn the_transition_table() {
        use LedgerEvent as E;
        use Stage as S;
        for now in [50, 150] {
            for stage in std::iter::once(None).chain(ALL_STAGES.into_iter().map(Some)) {
                for event in events() {
                    let got = transition(stage, event, now);
                    let want: Option<Stage> = match (stage, event) {
                        (Some(S::Closed), _) => None,
                        (None, E::Started) => Some(S::Created),
                        (Some(S::Escalated), E::Started) => Some(S::Continued),
                        (Some(S::Created | S::Continued), E::ConfirmationRequested) => {
                            Some(S::AwaitingApproval)
                        }
                        (Some(S::AwaitingApproval), E::TokenIssued { .. }) => Some(S::Approved {
                            token_expires_ms: 200,
                        }),
                        (Some(S::Approved { .. }), E::TokenIssued { .. }) if now >= 100 => {
                            Some(S::Approved {
                                token_expires_ms: 200,
                            })
                        }
                        (Some(S::Approved { .. }), E::TokenAccepted) => Some(S::Executing),
                        (
                            Some(S::Created),
                            E::Finished {
                                outcome: OutcomeKind::EscalationRequired,
                            },
                        ) => Some(S::Escalated),
                        (Some(_), E::Finished { outcome })
                            if outcome != OutcomeKind::EscalationRequired =>
                        {
                            Some(S::Closed)
                        }
                        _ => None,
                    };
                    assert_eq!(got.clone().ok(), want, "{stage:?} + {event:?} at {now}");
                    if stage == Some(S::Closed) {
                        assert_eq!(got, Err(LedgerError::Closed));
                    }
                }
            }
        }
        assert_eq!(
            transition(
                Some(S::Approved {
                    token_expires_ms: 100
                }),
                E::TokenIssued { expires_ms: 300 },
                99
            ),
            Err(LedgerError::AlreadyApproved { expires_ms: 100 })
        );
    }

    fn fact(event: LedgerEvent) -> JournalFact {
        JournalFact {
            event: Some(event),
            birth: matches!(event, LedgerEvent::Started).then(|| {
                (
                    Action::Teardown,
                    true,
                    "spiffe://f/operator/alice".to_owned(),
                )
            }),
            at_ms: 10,
        }
    }

    #[test]
    fn a_journal_folds_into_a_record_and_a_restart_closes_what_is_open() {
        use LedgerEvent as E;
        let escalated = [
            fact(E::Started),
            fact(E::Finished {
                outcome: OutcomeKind::EscalationRequired,
            }),
        ];
        let r = RunRecord::from_journal(&escalated).unwrap();
        assert_eq!(r.stage, Stage::Escalated);
        assert!(r.shadow);
        assert_eq!(on_restart(r.stage), OnRestart::Close);

        let mut continued = escalated.to_vec();
        continued.extend([
            fact(E::Started),
            fact(E::ConfirmationRequested),
            fact(E::TokenIssued { expires_ms: 99 }),
        ]);
        let r = RunRecord::from_journal(&continued).unwrap();
        assert!(matches!(r.stage, Stage::Approved { .. }));
        assert_eq!(on_restart(r.stage), OnRestart::Close);
        // The birth line's shape wins: the continuation's own fields do not change it.
        assert!(r.shadow);

        continued.push(fact(E::Finished {
            outcome: OutcomeKind::PolicyBlocked,
        }));
        let r = RunRecord::from_journal(&continued).unwrap();
        assert_eq!(r.stage, Stage::Closed);
        assert_eq!(on_restart(r.stage), OnRestart::Keep);

        // Anything after the close is refused, and so is a journal with no start.
        continued.push(fact(E::Started));
        assert!(matches!(
            RunRecord::from_journal(&continued),
            Err(RecordError::Refused {
                at: 7,
                error: LedgerError::Closed
            })
        ));
        assert_eq!(
            RunRecord::from_journal(&[fact(E::ConfirmationRequested)]),
            Err(RecordError::Refused {
                at: 1,
                error: LedgerError::Unexpected {
                    stage: "unknown",
                    event: E::ConfirmationRequested
                }
            })
        );
        assert_eq!(RunRecord::from_journal(&[]), Err(RecordError::NoStart));
    }

    #[test]
    fn admission_continues_only_its_own_escalation() {
        let rec = |stage, shadow| {
            Known::Record(RunRecord {
                action: Action::Teardown,
                shadow,
                requestor: String::new(),
                stage,
            })
        };
        let full = |shadow| Admission {
            action: Action::Teardown,
            mode: Mode::Full,
            shadow,
        };
        assert_eq!(admit(None, full(false)), Ok(()));
        assert_eq!(
            admit(Some(&rec(Stage::Escalated, false)), full(false)),
            Ok(())
        );
        assert_eq!(
            admit(Some(&rec(Stage::Escalated, true)), full(true)),
            Ok(())
        );
        assert_eq!(
            admit(Some(&rec(Stage::Escalated, true)), full(false)),
            Err(AdmitRefused::ShadowMismatch { born_shadow: true })
        );
        assert_eq!(
            admit(Some(&rec(Stage::Escalated, false)), full(true)),
            Err(AdmitRefused::ShadowMismatch { born_shadow: false })
        );
        assert_eq!(
            admit(
                Some(&rec(Stage::Escalated, false)),
                Admission {
                    mode: Mode::Quick,
                    ..full(false)
                }
            ),
            Err(AdmitRefused::NotFull)
        );
        assert!(matches!(
            admit(
                Some(&rec(Stage::Escalated, false)),
                Admission {
                    action: Action::Deploy,
                    ..full(false)
                }
            ),
            Err(AdmitRefused::OtherAction { .. })
        ));
        assert_eq!(
            admit(Some(&rec(Stage::Closed, false)), full(false)),
            Err(AdmitRefused::Closed)
        );
        for open in [
            Stage::Created,
            Stage::Continued,
            Stage::AwaitingApproval,
            Stage::Approved {
                token_expires_ms: 1,
            },
            Stage::Executing,
        ] {
            assert_eq!(
                admit(Some(&rec(open, false)), full(false)),
                Err(AdmitRefused::StillOpen(open.as_str()))
            );
        }
        assert_eq!(
            admit(Some(&Known::Unreadable), full(false)),
            Err(AdmitRefused::Unreadable)
        );
        assert_eq!(
            admit(Some(&Known::Missing), full(false)),
            Err(AdmitRefused::Missing)
        );
    }
}
