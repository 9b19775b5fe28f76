//! Properties of the lifecycle table (the table itself is `tests/testdata/lifecycle/table.txt`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use tollgate_core::lifecycle::{HostState, LifecycleEvent, TransitionError, transition};

use HostState::*;
use LifecycleEvent::*;

/// The events after which a host is Unknown from any state (fail closed).
const FAILURES: [LifecycleEvent; 7] = [
    ProbeFailed,
    ProbeTimedOut,
    FactsMalformed,
    FingerprintDrift,
    InventoryChanged,
    StepFailed,
    OutcomeUncertain,
];

// The whole (state, event) table is `tests/testdata/lifecycle/table.txt`, checked by
// `tests/testdata.rs`; these are the properties a table edit must keep.

#[test]
fn every_failure_sends_every_state_to_unknown_and_only_failures_are_failures() {
    for state in HostState::ALL {
        for event in FAILURES {
            assert_eq!(transition(state, event), Ok(Unknown), "{state} + {event}");
        }
    }
    for e in LifecycleEvent::ALL {
        assert_eq!(e.is_failure(), FAILURES.contains(&e), "{e}");
    }
}

#[test]
fn an_unknown_host_allows_nothing_but_a_probe() {
    for event in LifecycleEvent::ALL {
        let got = transition(Unknown, event);
        if event == ProbeSucceeded {
            assert_eq!(got, Ok(Probed));
        } else if !event.is_failure() {
            assert_eq!(got, Err(TransitionError::HostUnknown { event }), "{event}");
        }
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
