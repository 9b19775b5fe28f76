//! Every rule the core can name in a decision, with one sentence each (for `tollgate explain`).
//!
//! `R…` rules are policy (evaluated in order by [`crate::policy::evaluate`]), `B…` rules
//! are barrier checks, `E…` rules are execution decisions of the run machine.

/// A rule's stable id, e.g. `R004-quick-never-destroys`.
pub type RuleId = &'static str;

/// Every target host must be in the inventory.
pub const R001_TARGETS_IN_INVENTORY: RuleId = "R001-targets-in-inventory";
/// A host that is Unknown, has no facts or no valid fingerprint blocks everything.
pub const R002_UNCERTAIN_DATA_NEVER_ALLOWS: RuleId = "R002-uncertain-data-never-allows";
/// No step applies to any target host.
pub const R003_NOTHING_TO_DO: RuleId = "R003-nothing-to-do";
/// Quick mode never runs a destructive step: escalate with the exact next command.
pub const R004_QUICK_NEVER_DESTROYS: RuleId = "R004-quick-never-destroys";
/// Full mode with nothing destructive to do runs as quick, without a token.
pub const R005_FULL_WITHOUT_DESTRUCTIVE_DE_ESCALATES: RuleId =
    "R005-full-without-destructive-de-escalates";
/// Full mode with destructive steps waits for a confirmation token for the exact plan.
pub const R006_DESTRUCTIVE_NEEDS_CONFIRMATION: RuleId = "R006-destructive-needs-confirmation";
/// A destructive phase's barrier needs a token.
pub const R007_BARRIER_NEEDS_TOKEN: RuleId = "R007-barrier-needs-token";
/// A presented token must verify (signature, scope, expiry, single use, approver role).
pub const R008_TOKEN_MUST_VERIFY: RuleId = "R008-token-must-verify";
/// The token carries as many distinct approvers as the host set's classes require.
pub const R009_APPROVALS_SUFFICIENT: RuleId = "R009-approvals-sufficient";
/// Nothing objected.
pub const R010_ALLOW: RuleId = "R010-allow";
/// Separation of duties: a run's requester may not approve it (unless `tokens.self_approval`,
/// and never for a protected host); one live token per plan.
pub const R011_SEPARATION_OF_DUTIES: RuleId = "R011-separation-of-duties";
/// A host belongs to at most one open run at a time.
pub const R012_ONE_OPEN_RUN_PER_HOST: RuleId = "R012-one-open-run-per-host";
/// A run id names one story: it is continued only from its own escalation, with the shape it
/// was born with, and never reused once closed, unreadable or missing.
pub const R013_RUN_ID_NAMES_ONE_STORY: RuleId = "R013-run-id-names-one-story";

/// Every host of every earlier phase succeeded.
pub const B001_CONTAINMENT: RuleId = "B001-previous-phases-succeeded";
/// Every host of the phase was re-probed after the barrier began, recently, successfully,
/// with the fingerprint of the plan.
pub const B002_FRESH_MATCHING_REPROBE: RuleId = "B002-fresh-matching-reprobe";

/// A failed preflight probe sends the host to Unknown and stops the run.
pub const E001_PREFLIGHT_PROBE_FAILED: RuleId = "E001-preflight-probe-failed";
/// A step is dispatched because its phase was admitted (and, if destructive, its barrier
/// allowed it).
pub const E002_DISPATCH_ADMITTED_STEP: RuleId = "E002-dispatch-admitted-step";
/// A step whose check exits 0 is already done and is skipped.
pub const E003_CHECK_SAYS_DONE: RuleId = "E003-check-says-done";
/// A transient failure is retried after backoff while attempts remain.
pub const E004_RETRY_TRANSIENT: RuleId = "E004-retry-transient";
/// A permanent failure, or a transient one without attempts left, fails the host.
pub const E005_FAILURE_STOPS_HOST: RuleId = "E005-failure-stops-host";
/// A lost outcome is never re-sent blindly: its idempotency key is queried.
pub const E006_LOST_OUTCOME_QUERIES_KEY: RuleId = "E006-lost-outcome-queries-key";
/// The key was never seen by the host, so re-sending it (same key) is safe, once.
pub const E007_RESEND_AFTER_NOT_FOUND: RuleId = "E007-resend-after-not-found";
/// An outcome that stays uncertain sends the host to Unknown.
pub const E008_UNCERTAIN_OUTCOME_UNKNOWN: RuleId = "E008-uncertain-outcome-unknown";
/// A phase with a failed host ends the run: later phases run nowhere.
pub const E009_CONTAINMENT_STOPS_RUN: RuleId = "E009-containment-stops-run";
/// Every host finished every step.
pub const E010_RUN_COMPLETED: RuleId = "E010-run-completed";
/// The run was cancelled; nothing new is started.
pub const E011_CANCELLED: RuleId = "E011-cancelled";
/// A check that could not run (or answered garbage) fails the host: doubt is not "done".
pub const E012_CHECK_FAILED: RuleId = "E012-check-failed";
/// A run left open by a stopped coordinator is closed, never resumed.
pub const E013_CLOSED_AFTER_RESTART: RuleId = "E013-closed-after-restart";
/// Timeline lines not covered by a valid signed checkpoint are quarantined, never adopted;
/// the run is closed as tampered.
pub const E014_UNSIGNED_LINES_QUARANTINED: RuleId = "E014-unsigned-lines-quarantined";

/// One catalogue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleInfo {
    /// The id.
    pub id: RuleId,
    /// What it means, as one sentence.
    pub summary: &'static str,
}

/// Every rule, in id order.
pub const CATALOGUE: &[RuleInfo] = &[
    RuleInfo {
        id: R001_TARGETS_IN_INVENTORY,
        summary: "every target host must be in the inventory",
    },
    RuleInfo {
        id: R002_UNCERTAIN_DATA_NEVER_ALLOWS,
        summary: "a host that is Unknown, has no facts or no valid fingerprint blocks the run",
    },
    RuleInfo {
        id: R003_NOTHING_TO_DO,
        summary: "no step applies to any target host, so nothing runs",
    },
    RuleInfo {
        id: R004_QUICK_NEVER_DESTROYS,
        summary: "quick mode never runs a destructive step; the answer is the exact command to escalate",
    },
    RuleInfo {
        id: R005_FULL_WITHOUT_DESTRUCTIVE_DE_ESCALATES,
        summary: "full mode with nothing destructive to do runs as quick, without a token",
    },
    RuleInfo {
        id: R006_DESTRUCTIVE_NEEDS_CONFIRMATION,
        summary: "full mode with destructive steps waits for a confirmation token bound to the exact plan",
    },
    RuleInfo {
        id: R007_BARRIER_NEEDS_TOKEN,
        summary: "a destructive phase never starts without a token",
    },
    RuleInfo {
        id: R008_TOKEN_MUST_VERIFY,
        summary: "a token must carry a valid signature, match the run, hosts, plan and action, be unexpired, unused, and come from current approvers",
    },
    RuleInfo {
        id: R009_APPROVALS_SUFFICIENT,
        summary: "the token must carry as many distinct approvers as the hosts' safety classes require",
    },
    RuleInfo {
        id: R010_ALLOW,
        summary: "no rule objected",
    },
    RuleInfo {
        id: R011_SEPARATION_OF_DUTIES,
        summary: "a run's requester may not approve it (unless tokens.self_approval allows it, never for a protected host), and a plan has at most one live token",
    },
    RuleInfo {
        id: R012_ONE_OPEN_RUN_PER_HOST,
        summary: "a host belongs to at most one open run at a time; another intent for it is refused as HostBusy",
    },
    RuleInfo {
        id: R013_RUN_ID_NAMES_ONE_STORY,
        summary: "a run id is continued only from its own escalation, with the action and shadow flag it was born with, and never reused once closed, unreadable or missing",
    },
    RuleInfo {
        id: B001_CONTAINMENT,
        summary: "a destructive phase starts only if every host of every earlier phase succeeded",
    },
    RuleInfo {
        id: B002_FRESH_MATCHING_REPROBE,
        summary: "a destructive phase starts only if every one of its hosts was just re-probed, successfully, with the plan's fingerprint",
    },
    RuleInfo {
        id: E001_PREFLIGHT_PROBE_FAILED,
        summary: "a failed preflight probe sends the host to Unknown and nothing runs",
    },
    RuleInfo {
        id: E002_DISPATCH_ADMITTED_STEP,
        summary: "a step is sent because its phase was admitted (and its barrier passed, if destructive)",
    },
    RuleInfo {
        id: E003_CHECK_SAYS_DONE,
        summary: "the step's check exited 0: already in the desired state, skipped",
    },
    RuleInfo {
        id: E004_RETRY_TRANSIENT,
        summary: "a transient failure is retried after backoff while attempts remain",
    },
    RuleInfo {
        id: E005_FAILURE_STOPS_HOST,
        summary: "a permanent failure, or a transient one with no attempts left, fails the host",
    },
    RuleInfo {
        id: E006_LOST_OUTCOME_QUERIES_KEY,
        summary: "a step whose outcome was lost is never re-sent blindly: its idempotency key is queried",
    },
    RuleInfo {
        id: E007_RESEND_AFTER_NOT_FOUND,
        summary: "the host never saw the key, so the step is re-sent once with the same key",
    },
    RuleInfo {
        id: E008_UNCERTAIN_OUTCOME_UNKNOWN,
        summary: "an outcome that stays uncertain sends the host to Unknown",
    },
    RuleInfo {
        id: E009_CONTAINMENT_STOPS_RUN,
        summary: "a phase with a failed host ends the run; later phases run nowhere",
    },
    RuleInfo {
        id: E010_RUN_COMPLETED,
        summary: "every host finished every step",
    },
    RuleInfo {
        id: E011_CANCELLED,
        summary: "the run was cancelled; nothing new starts",
    },
    RuleInfo {
        id: E012_CHECK_FAILED,
        summary: "a check that could not give an answer fails the host",
    },
    RuleInfo {
        id: E013_CLOSED_AFTER_RESTART,
        summary: "a run left open by a stopped coordinator is closed, never resumed; its in-flight steps are settled by their idempotency keys",
    },
    RuleInfo {
        id: E014_UNSIGNED_LINES_QUARANTINED,
        summary: "timeline lines not covered by a valid signed checkpoint are quarantined, never adopted, and the run is closed as tampered",
    },
];

/// The sentence for `id`, if it is a known rule.
pub fn explain(id: &str) -> Option<&'static str> {
    CATALOGUE.iter().find(|r| r.id == id).map(|r| r.summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_prefixed_by_their_number() {
        let mut seen = std::collections::BTreeSet::new();
        for r in CATALOGUE {
            assert!(seen.insert(r.id), "duplicate {}", r.id);
            let prefix = &r.id[..4];
            assert!(
                CATALOGUE
                    .iter()
                    .filter(|o| o.id.starts_with(prefix))
                    .count()
                    == 1,
                "number reused: {prefix}"
            );
            assert_eq!(explain(r.id), Some(r.summary));
        }
        assert_eq!(explain("R999-nope"), None);
    }
}
