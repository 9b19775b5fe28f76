//! The lifecycle table, checked for every (state, event) pair.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use tollgate_core::lifecycle::{HostState, LifecycleEvent, TransitionError, transition};

use HostState::*;
use LifecycleEvent::*;

/// What the table must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    To(HostState),
    /// `Unknown` allows nothing but a probe.
    Unknown,
    /// Needs a verified token (never inferred).
    Token,
    /// Makes no sense here.
    No,
}

use Want::{No, To, Token, Unknown as UnknownOnly};

const FAILURES: [LifecycleEvent; 7] = [
    ProbeFailed,
    ProbeTimedOut,
    FactsMalformed,
    FingerprintDrift,
    InventoryChanged,
    StepFailed,
    OutcomeUncertain,
];

/// The non-failure events, in this column order.
const COLUMNS: [LifecycleEvent; 8] = [
    ProbeSucceeded,
    PolicyAdmitted,
    ExecutionStarted,
    StepDispatched,
    PhaseCompleted,
    TokenVerifiedForTeardown,
    TeardownFinished,
    RunFinished,
];

/// One row per state, one column per event of `COLUMNS`.
const TABLE: [(HostState, [Want; 8]); 6] = [
    //            ProbeSucceeded     PolicyAdmitted  ExecutionStarted StepDispatched           PhaseCompleted           TokenVerifiedForTeardown TeardownFinished         RunFinished
    (
        Unknown,
        [
            To(Probed),
            UnknownOnly,
            UnknownOnly,
            UnknownOnly,
            UnknownOnly,
            UnknownOnly,
            UnknownOnly,
            UnknownOnly,
        ],
    ),
    (Probed, [To(Probed), To(Ready), No, No, No, No, Token, No]),
    (Ready, [To(Ready), No, To(Running), No, No, No, Token, No]),
    (
        Running,
        [
            To(Running),
            No,
            No,
            To(Running),
            To(Running),
            To(TeardownPending),
            Token,
            To(Ready),
        ],
    ),
    (
        TeardownPending,
        [
            To(TeardownPending),
            No,
            No,
            To(TeardownPending),
            To(TeardownPending),
            No,
            To(TeardownComplete),
            No,
        ],
    ),
    (TeardownComplete, [To(Probed), No, No, No, No, No, No, No]),
];

#[test]
fn every_state_event_pair_is_decided_by_the_table() {
    let mut checked = 0;
    for (state, row) in TABLE {
        for (event, want) in COLUMNS.iter().copied().zip(row) {
            let got = transition(state, event);
            match want {
                To(next) => assert_eq!(got, Ok(next), "{state} + {event}"),
                UnknownOnly => assert_eq!(
                    got,
                    Err(TransitionError::HostUnknown { event }),
                    "{state} + {event}"
                ),
                Token => assert_eq!(
                    got,
                    Err(TransitionError::TokenRequired { from: state, event }),
                    "{state} + {event}"
                ),
                No => assert_eq!(
                    got,
                    Err(TransitionError::NotAllowed { from: state, event }),
                    "{state} + {event}"
                ),
            }
            checked += 1;
        }
        for event in FAILURES {
            assert_eq!(
                transition(state, event),
                Ok(Unknown),
                "{state} + {event} fails closed"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, HostState::ALL.len() * LifecycleEvent::ALL.len());
}

#[test]
fn the_table_covers_every_state_and_event_exactly_once() {
    let states: Vec<HostState> = TABLE.iter().map(|(s, _)| *s).collect();
    assert_eq!(states, HostState::ALL.to_vec());
    let mut events: Vec<LifecycleEvent> = COLUMNS.iter().chain(FAILURES.iter()).copied().collect();
    events.sort();
    let mut all = LifecycleEvent::ALL.to_vec();
    all.sort();
    assert_eq!(events, all);
    for e in LifecycleEvent::ALL {
        assert_eq!(e.is_failure(), FAILURES.contains(&e), "{e}");
    }
}

#[test]
fn teardown_is_reachable_only_through_a_verified_token() {
    // Walk every path of length <= 6 from Unknown avoiding TokenVerifiedForTeardown: none
    // reaches TeardownPending or TeardownComplete.
    let mut frontier = vec![Unknown];
    for _ in 0..6 {
        let mut next = Vec::new();
        for s in frontier {
            for e in LifecycleEvent::ALL {
                if e == TokenVerifiedForTeardown {
                    continue;
                }
                if let Ok(t) = transition(s, e) {
                    assert!(
                        !matches!(t, TeardownPending | TeardownComplete),
                        "{s} + {e} reached {t} without a token"
                    );
                    next.push(t);
                }
            }
        }
        next.sort();
        next.dedup();
        frontier = next;
    }
}
