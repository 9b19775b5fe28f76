//! What probes report, and how a failed probe is classified.

use std::collections::BTreeMap;

use tollgate_protocol::outcome::ReasonCode;

use super::lifecycle::LifecycleEvent;
use super::outcome::{Capability, TypedOutcome};

/// A fingerprint is the lowercase hex SHA-256 of a host's non-volatile facts (64 characters;
/// see `tollgate_protocol::agent::fingerprint`). Anything else counts as missing. That a
/// report's fingerprint matches its facts is checked by the runtime when the report arrives.
pub fn is_valid_fingerprint(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A successful probe's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Hex SHA-256 of the non-volatile facts, as reported.
    pub fingerprint: String,
    /// When the probe answered (coordinator clock, unix ms).
    pub probed_at_ms: u64,
    /// Non-volatile facts.
    pub facts: BTreeMap<String, String>,
}

impl HostFacts {
    /// Whether the fingerprint is present and well formed.
    pub fn has_valid_fingerprint(&self) -> bool {
        is_valid_fingerprint(&self.fingerprint)
    }
}

/// Why a probe gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The host could not be reached.
    Unreachable,
    /// The session broke during the probe.
    SessionBroken,
    /// No answer in time.
    TimedOut,
    /// An answer that is not facts (bad JSON, missing fingerprint, ...).
    Malformed {
        /// What was wrong.
        detail: String,
    },
    /// Authentication was refused (not transient).
    AuthFailed,
    /// No common protocol version.
    VersionMismatch,
    /// The probe's shell is not available on the host, or too old for the transport.
    ShellUnavailable {
        /// What was found and what is needed (e.g. the pwsh version found and the one needed).
        detail: String,
    },
    /// The probe script failed.
    Failed {
        /// What the host said.
        detail: String,
    },
}

impl ProbeFailure {
    /// The reason code it is reported with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            ProbeFailure::Unreachable => ReasonCode::Unreachable,
            ProbeFailure::SessionBroken => ReasonCode::SessionBroken,
            ProbeFailure::TimedOut => ReasonCode::ProbeTimeout,
            ProbeFailure::Malformed { .. } => ReasonCode::MalformedFacts,
            ProbeFailure::AuthFailed => ReasonCode::AuthFailed,
            ProbeFailure::VersionMismatch => ReasonCode::VersionMismatch,
            ProbeFailure::ShellUnavailable { .. } => ReasonCode::ShellUnavailable,
            ProbeFailure::Failed { .. } => ReasonCode::ProbeFailed,
        }
    }

    /// The lifecycle event it causes (always one that leads to `Unknown`).
    pub fn lifecycle_event(&self) -> LifecycleEvent {
        match self {
            ProbeFailure::TimedOut => LifecycleEvent::ProbeTimedOut,
            ProbeFailure::Malformed { .. } => LifecycleEvent::FactsMalformed,
            _ => LifecycleEvent::ProbeFailed,
        }
    }

    /// The typed outcome of a host whose preflight probe failed like this.
    pub fn outcome(&self) -> TypedOutcome {
        match self {
            ProbeFailure::Unreachable | ProbeFailure::SessionBroken => {
                TypedOutcome::TransportUnreachable {
                    reason: self.reason(),
                }
            }
            ProbeFailure::VersionMismatch => TypedOutcome::CapabilityMismatch {
                capability: Capability::ProtocolVersion,
            },
            ProbeFailure::ShellUnavailable { .. } => TypedOutcome::CapabilityMismatch {
                capability: Capability::Shell,
            },
            _ => TypedOutcome::PreflightFailed {
                reason: self.reason(),
            },
        }
    }

    /// Short text for timelines.
    pub fn describe(&self) -> String {
        match self {
            ProbeFailure::Malformed { detail }
            | ProbeFailure::Failed { detail }
            | ProbeFailure::ShellUnavailable { detail } => {
                format!("{}: {detail}", self.reason())
            }
            _ => self.reason().to_string(),
        }
    }
}

/// A probe's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Facts were reported (the fingerprint may still be missing or malformed).
    Reported(HostFacts),
    /// No usable answer.
    Failed(ProbeFailure),
}

impl ProbeOutcome {
    /// The outcome of a probe answer: its facts count only if the reported fingerprint is the
    /// canonical fingerprint of the reported facts; anything else is a malformed report.
    pub fn from_report(
        fingerprint: String,
        facts: BTreeMap<String, String>,
        probed_at_ms: u64,
    ) -> ProbeOutcome {
        if tollgate_protocol::agent::fingerprint(&facts) != fingerprint {
            return ProbeOutcome::Failed(ProbeFailure::Malformed {
                detail: "the reported fingerprint does not match the reported facts".into(),
            });
        }
        ProbeOutcome::Reported(HostFacts {
            fingerprint,
            probed_at_ms,
            facts,
        })
    }

    /// The facts if the probe succeeded with a valid fingerprint; `None` means doubt.
    pub fn usable(&self) -> Option<&HostFacts> {
        match self {
            ProbeOutcome::Reported(f) if f.has_valid_fingerprint() => Some(f),
            _ => None,
        }
    }

    /// The failure this answer amounts to, if it is not usable.
    pub fn failure(&self) -> Option<ProbeFailure> {
        match self {
            ProbeOutcome::Reported(f) if f.has_valid_fingerprint() => None,
            ProbeOutcome::Reported(f) => Some(ProbeFailure::Malformed {
                detail: format!("fingerprint {:?} is not 64 lowercase hex", f.fingerprint),
            }),
            ProbeOutcome::Failed(e) => Some(e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_must_be_full_lowercase_hex() {
        assert!(is_valid_fingerprint(&"ab".repeat(32)));
        assert!(!is_valid_fingerprint(""));
        assert!(!is_valid_fingerprint(&"AB".repeat(32)));
        assert!(!is_valid_fingerprint(&"ab".repeat(31)));
        assert!(!is_valid_fingerprint(&"zz".repeat(32)));
    }

    #[test]
    fn a_report_without_a_valid_fingerprint_is_a_malformed_failure() {
        let facts = HostFacts {
            fingerprint: String::new(),
            probed_at_ms: 1,
            facts: BTreeMap::new(),
        };
        let outcome = ProbeOutcome::Reported(facts);
        assert!(outcome.usable().is_none());
        assert_eq!(
            outcome.failure().map(|f| f.reason()),
            Some(ReasonCode::MalformedFacts)
        );
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn a_report_counts_only_if_its_fingerprint_matches_its_facts() {
        let facts = BTreeMap::from([("host.name".to_string(), "web1".to_string())]);
        let good = tollgate_protocol::agent::fingerprint(&facts);
        match ProbeOutcome::from_report(good.clone(), facts.clone(), 7) {
            ProbeOutcome::Reported(f) => assert_eq!((f.fingerprint, f.probed_at_ms), (good, 7)),
            other => panic!("{other:?}"),
        }
        let mut drifted = facts;
        drifted.insert("probe.app".into(), "1.1".into());
        assert!(matches!(
            ProbeOutcome::from_report(
                tollgate_protocol::agent::fingerprint(&BTreeMap::new()),
                drifted,
                7
            ),
            ProbeOutcome::Failed(ProbeFailure::Malformed { .. })
        ));
    }
}
