//! Host lifecycle: `Unknown -> Probed -> Ready -> Running -> TeardownPending -> TeardownComplete`,
//! as one explicit table.
//!
//! * Every failure-type event (probe failed / timed out / malformed facts, fingerprint drift,
//!   inventory change, step failure, uncertain outcome) leads to `Unknown` from any state
//!   (fail closed).
//! * `Unknown` allows nothing but a probe ([`TransitionError::HostUnknown`]).
//! * `Running -> TeardownPending` happens only on [`LifecycleEvent::TokenVerifiedForTeardown`];
//!   `TeardownPending -> TeardownComplete` only on [`LifecycleEvent::TeardownFinished`]; neither
//!   is ever inferred from another event.

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostState {
    /// No trustworthy facts. Only a probe is allowed.
    Unknown,
    /// Facts are fresh; policy has not admitted the host yet.
    Probed,
    /// Admitted by policy for the current plan.
    Ready,
    /// Executing steps of a run.
    Running,
    /// A verified token authorized its teardown; destructive steps may run.
    TeardownPending,
    /// Teardown finished.
    TeardownComplete,
}

impl HostState {
    /// Every state.
    pub const ALL: [HostState; 6] = [
        HostState::Unknown,
        HostState::Probed,
        HostState::Ready,
        HostState::Running,
        HostState::TeardownPending,
        HostState::TeardownComplete,
    ];

    /// The name shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Unknown => "Unknown",
            HostState::Probed => "Probed",
            HostState::Ready => "Ready",
            HostState::Running => "Running",
            HostState::TeardownPending => "TeardownPending",
            HostState::TeardownComplete => "TeardownComplete",
        }
    }
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LifecycleEvent {
    /// A probe answered with well-formed facts (and, mid-run, the plan's fingerprint).
    ProbeSucceeded,
    /// A probe failed (unreachable, auth, script error...).
    ProbeFailed,
    /// A probe did not answer in time (or its answer was too old to use).
    ProbeTimedOut,
    /// A probe answered with facts that cannot be trusted (bad shape, no fingerprint).
    FactsMalformed,
    /// A re-probe answered with a fingerprint other than the plan's.
    FingerprintDrift,
    /// The host's inventory entry changed.
    InventoryChanged,
    /// A step failed on the host.
    StepFailed,
    /// Whether a dispatched step ran could not be established.
    OutcomeUncertain,
    /// Policy admitted the host for a plan.
    PolicyAdmitted,
    /// Execution of an admitted plan began.
    ExecutionStarted,
    /// A step was sent to the host.
    StepDispatched,
    /// The host finished a phase.
    PhaseCompleted,
    /// A verified confirmation token authorized the host's teardown.
    TokenVerifiedForTeardown,
    /// The teardown run finished on the host.
    TeardownFinished,
    /// A non-teardown run finished on the host.
    RunFinished,
}

impl LifecycleEvent {
    /// Every event.
    pub const ALL: [LifecycleEvent; 15] = [
        LifecycleEvent::ProbeSucceeded,
        LifecycleEvent::ProbeFailed,
        LifecycleEvent::ProbeTimedOut,
        LifecycleEvent::FactsMalformed,
        LifecycleEvent::FingerprintDrift,
        LifecycleEvent::InventoryChanged,
        LifecycleEvent::StepFailed,
        LifecycleEvent::OutcomeUncertain,
        LifecycleEvent::PolicyAdmitted,
        LifecycleEvent::ExecutionStarted,
        LifecycleEvent::StepDispatched,
        LifecycleEvent::PhaseCompleted,
        LifecycleEvent::TokenVerifiedForTeardown,
        LifecycleEvent::TeardownFinished,
        LifecycleEvent::RunFinished,
    ];

    /// Whether the event means doubt (and so leads to `Unknown` from anywhere).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            LifecycleEvent::ProbeFailed
                | LifecycleEvent::ProbeTimedOut
                | LifecycleEvent::FactsMalformed
                | LifecycleEvent::FingerprintDrift
                | LifecycleEvent::InventoryChanged
                | LifecycleEvent::StepFailed
                | LifecycleEvent::OutcomeUncertain
        )
    }

    /// The event's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::ProbeSucceeded => "ProbeSucceeded",
            LifecycleEvent::ProbeFailed => "ProbeFailed",
            LifecycleEvent::ProbeTimedOut => "ProbeTimedOut",
            LifecycleEvent::FactsMalformed => "FactsMalformed",
            LifecycleEvent::FingerprintDrift => "FingerprintDrift",
            LifecycleEvent::InventoryChanged => "InventoryChanged",
            LifecycleEvent::StepFailed => "StepFailed",
            LifecycleEvent::OutcomeUncertain => "OutcomeUncertain",
            LifecycleEvent::PolicyAdmitted => "PolicyAdmitted",
            LifecycleEvent::ExecutionStarted => "ExecutionStarted",
            LifecycleEvent::StepDispatched => "StepDispatched",
            LifecycleEvent::PhaseCompleted => "PhaseCompleted",
            LifecycleEvent::TokenVerifiedForTeardown => "TokenVerifiedForTeardown",
            LifecycleEvent::TeardownFinished => "TeardownFinished",
            LifecycleEvent::RunFinished => "RunFinished",
        }
    }
}

impl std::fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The host is `Unknown`: only a probe may happen.
    #[error("host is Unknown: only a probe is allowed, not {event}")]
    HostUnknown {
        /// The refused event.
        event: LifecycleEvent,
    },
    /// The event needs a verified confirmation token first (teardown is never inferred).
    #[error("{event} in state {from} needs a verified confirmation token first")]
    TokenRequired {
        /// The state the host was in.
        from: HostState,
        /// The refused event.
        event: LifecycleEvent,
    },
    /// The event makes no sense in this state.
    #[error("{event} is not allowed in state {from}")]
    NotAllowed {
        /// The state the host was in.
        from: HostState,
        /// The refused event.
        event: LifecycleEvent,
    },
}

/// The lifecycle table: the state after `event`, or why the event is refused.
pub fn transition(state: HostState, event: LifecycleEvent) -> Result<HostState, TransitionError> {
    use HostState as S;
    use LifecycleEvent as E;
    if event.is_failure() {
        return Ok(S::Unknown);
    }
    let next = match (state, event) {
        (S::Unknown, E::ProbeSucceeded) => S::Probed,
        (S::Unknown, event) => return Err(TransitionError::HostUnknown { event }),

        (S::Probed, E::ProbeSucceeded) => S::Probed,
        (S::Probed, E::PolicyAdmitted) => S::Ready,

        (S::Ready, E::ProbeSucceeded) => S::Ready,
        (S::Ready, E::ExecutionStarted) => S::Running,

        (S::Running, E::ProbeSucceeded | E::StepDispatched | E::PhaseCompleted) => S::Running,
        (S::Running, E::TokenVerifiedForTeardown) => S::TeardownPending,
        (S::Running, E::RunFinished) => S::Ready,

        (S::TeardownPending, E::ProbeSucceeded | E::StepDispatched | E::PhaseCompleted) => {
            S::TeardownPending
        }
        (S::TeardownPending, E::TeardownFinished) => S::TeardownComplete,

        (S::TeardownComplete, E::ProbeSucceeded) => S::Probed,

        (from @ (S::Probed | S::Ready | S::Running), event @ E::TeardownFinished) => {
            return Err(TransitionError::TokenRequired { from, event });
        }
        (from, event) => return Err(TransitionError::NotAllowed { from, event }),
    };
    Ok(next)
}
