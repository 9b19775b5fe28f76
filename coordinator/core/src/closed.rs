//! Runs that are over, or that a stopped coordinator left open.
//!
//! * [`judge`]: why a token presented to a run that no longer waits for one is refused, by
//!   the same checks, in the same order, as [`super::token::verify`].
//! * [`close_after_restart`]: closes a run found open in its journal after a restart. It is
//!   never resumed (its token, barriers and facts are stale): every in-flight step is settled by
//!   the answer to its idempotency key, anything uncertain leaves its host `Unknown`, and nothing
//!   else runs (SPEC §7: no step runs twice; unknown outcomes fail closed).

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

use super::lifecycle::HostState;
use super::outcome::{HostResult, RunResult, TypedOutcome};
use super::rules::{self, RuleId};
use super::run::{IdempotencyAnswer, StepResult};
use super::timeline::{EventKind, TimelineEvent, Verdict};
use super::token::{self, ScopeField, TokenRejection, TokenScope, VerifyContext};
use crate::config::Authorization;

/// A step the journal shows dispatched with no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The host.
    pub host: String,
    /// The step.
    pub step: String,
    /// Its idempotency key.
    pub key: String,
    /// Whether it is destructive.
    pub destructive: bool,
}

/// What a journal line says about a step's key, for [`in_flight`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepFact {
    /// The step was sent (`step_dispatched`).
    Dispatched(InFlight),
    /// Its outcome is known (`step_reported` or `idempotency_answered` with `settled = true`:
    /// a result, or "never ran").
    Settled { key: String },
    /// It answered without settling (an outcome lost, a key still running or uncertain).
    Unsettled { key: String },
}

/// What one timeline entry says about a step's key, if anything: the one reading shared by
/// start-up recovery and the model tests. A report or answer without `settled = true`
/// settles nothing (fail closed).
pub fn step_fact(
    kind: Option<EventKind>,
    host: Option<&str>,
    step: Option<&str>,
    inputs: &BTreeMap<String, String>,
) -> Option<StepFact> {
    let key = inputs.get("idempotency_key")?.clone();
    let settled = inputs.get("settled").is_some_and(|s| s == "true");
    match kind? {
        EventKind::StepDispatched => Some(StepFact::Dispatched(InFlight {
            host: host?.to_owned(),
            step: step.unwrap_or_default().to_owned(),
            key,
            destructive: inputs.get("destructive").is_some_and(|d| d == "true"),
        })),
        EventKind::StepReported | EventKind::IdempotencyAnswered if settled => {
            Some(StepFact::Settled { key })
        }
        EventKind::StepReported | EventKind::IdempotencyAnswered => {
            Some(StepFact::Unsettled { key })
        }
        _ => None,
    }
}

/// The steps of a run whose outcome its journal leaves unknown: sent and never settled since,
/// in the order they were first sent. A lost outcome or an unanswered query settles nothing
/// (fail closed: such a step is asked about at restart, never assumed not to have run); a
/// "never ran" answer settles it until it is sent again.
pub fn in_flight(facts: impl IntoIterator<Item = StepFact>) -> Vec<InFlight> {
    let mut open: Vec<InFlight> = Vec::new();
    for f in facts {
        match f {
            StepFact::Dispatched(s) => {
                if !open.iter().any(|o| o.key == s.key) {
                    open.push(s);
                }
            }
            StepFact::Settled { key } => open.retain(|o| o.key != key),
            StepFact::Unsettled { .. } => {}
        }
    }
    open
}

/// What the journal of an open run says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRun {
    /// The run.
    pub run_id: Uuid,
    /// Its action.
    pub action: Action,
    /// The mode asked for.
    pub requested_mode: Mode,
    /// Its target hosts.
    pub targets: Vec<String>,
    /// Steps dispatched without a recorded result.
    pub in_flight: Vec<InFlight>,
    /// Why lines after the last valid signed checkpoint were quarantined, if they were: the
    /// run then closes as tampered (`E014`), whatever its steps say.
    pub quarantined: Option<String>,
}

/// Closes `open`: the timeline events to journal (in order) and the run's result. `answers`
/// holds, per idempotency key, what the host's store said; a missing answer counts as
/// `QueryFailed`.
///
/// Per in-flight step: `Finished` with a failure fails the host (`E005`); `Finished` with
/// success or `NotFound` (it never ran) leaves the host stopped; anything else (`Running`,
/// `Uncertain`, `QueryFailed`, no answer) sends it `Unknown` with `OutcomeUncertain` (`E008`).
/// Every other target is stopped. The run ends `ExecutionFailed` if a host failed or is
/// uncertain, else `PolicyBlocked(Cancelled)`, always under rule `E013`. Every host ends
/// `Unknown`: nothing about it is fresh any more.
pub fn close_after_restart(
    now_ms: u64,
    open: &OpenRun,
    answers: &BTreeMap<String, IdempotencyAnswer>,
) -> (Vec<TimelineEvent>, RunResult) {
    let rule = rules::E013_CLOSED_AFTER_RESTART;
    let stopped = |detail: String| {
        (
            TypedOutcome::PolicyBlocked {
                reason: ReasonCode::Cancelled,
                rule,
            },
            ReasonCode::Cancelled,
            detail,
        )
    };
    let mut events = Vec::new();
    let mut ends: BTreeMap<String, (TypedOutcome, ReasonCode, String)> = BTreeMap::new();
    let mut failed: Vec<String> = Vec::new();
    for f in &open.in_flight {
        let answer = answers
            .get(&f.key)
            .cloned()
            .unwrap_or(IdempotencyAnswer::QueryFailed);
        events.push(
            TimelineEvent::new(now_ms, EventKind::IdempotencyAnswered)
                .host(&f.host)
                .step(&f.step)
                .input("idempotency_key", &f.key)
                .input("destructive", f.destructive)
                .input("answer", format!("{answer:?}"))
                .input("after_restart", true),
        );
        let failure = match &answer {
            IdempotencyAnswer::Finished(StepResult::Succeeded) => None,
            IdempotencyAnswer::NotFound => None,
            IdempotencyAnswer::Finished(StepResult::Permanent { reason, exit_code }) => {
                Some((*reason, *exit_code, rules::E005_FAILURE_STOPS_HOST))
            }
            IdempotencyAnswer::Finished(StepResult::Transient { reason }) => {
                Some((*reason, None, rules::E005_FAILURE_STOPS_HOST))
            }
            _ => Some((
                ReasonCode::OutcomeUncertain,
                None,
                rules::E008_UNCERTAIN_OUTCOME_UNKNOWN,
            )),
        };
        let end = match failure {
            None => stopped(format!(
                "{} was settled by its key after a coordinator restart; the run was closed",
                f.step
            )),
            Some((reason, exit_code, host_rule)) => {
                events.push(
                    TimelineEvent::new(now_ms, EventKind::HostFailed)
                        .host(&f.host)
                        .step(&f.step)
                        .decided(Verdict::Fail, host_rule)
                        .reason(reason)
                        .input("idempotency_key", &f.key),
                );
                failed.push(f.host.clone());
                (
                    TypedOutcome::ExecutionFailed {
                        step_id: f.step.clone(),
                        reason,
                        exit_code,
                    },
                    reason,
                    format!("{} after a coordinator restart: {reason}", f.step),
                )
            }
        };
        // A host with a failure keeps it even if another of its steps settled fine.
        let keep = ends
            .get(&f.host)
            .is_some_and(|(o, _, _)| matches!(o, TypedOutcome::ExecutionFailed { .. }));
        if !keep {
            ends.insert(f.host.clone(), end);
        }
    }
    let mut hosts: BTreeSet<&str> = open.targets.iter().map(String::as_str).collect();
    hosts.extend(open.in_flight.iter().map(|f| f.host.as_str()));
    let hosts: Vec<HostResult> = hosts
        .into_iter()
        .map(|h| {
            let (outcome, reason, detail) = ends.remove(h).unwrap_or_else(|| {
                stopped("the run was closed after a coordinator restart".to_owned())
            });
            HostResult {
                host: h.to_owned(),
                lifecycle: HostState::Unknown,
                outcome,
                reason,
                detail,
                facts: BTreeMap::new(),
            }
        })
        .collect();
    let first_failure = hosts
        .iter()
        .find(|h| matches!(h.outcome, TypedOutcome::ExecutionFailed { .. }));
    let rule = if open.quarantined.is_some() {
        rules::E014_UNSIGNED_LINES_QUARANTINED
    } else {
        rule
    };
    let (outcome, reason, verdict) = match first_failure {
        _ if open.quarantined.is_some() => (
            TypedOutcome::PolicyBlocked {
                reason: ReasonCode::TimelineTampered,
                rule,
            },
            ReasonCode::TimelineTampered,
            Verdict::Block,
        ),
        Some(h) => (h.outcome.clone(), h.reason, Verdict::Fail),
        None => (
            TypedOutcome::PolicyBlocked {
                reason: ReasonCode::Cancelled,
                rule,
            },
            ReasonCode::Cancelled,
            Verdict::Block,
        ),
    };
    failed.sort();
    failed.dedup();
    let detail = if let Some(why) = &open.quarantined {
        format!("closed after a coordinator restart as tampered: {why}")
    } else if failed.is_empty() {
        format!(
            "closed after a coordinator restart; {} in-flight step(s) settled, nothing else ran",
            open.in_flight.len()
        )
    } else {
        format!(
            "closed after a coordinator restart; failed or uncertain on {}",
            failed.join(", ")
        )
    };
    events.push(
        TimelineEvent::new(now_ms, EventKind::RunFinished)
            .decided(verdict, rule)
            .reason(reason)
            .input("outcome", outcome.kind())
            .input("detail", &detail),
    );
    let result = RunResult {
        run_id: open.run_id,
        action: open.action,
        requested_mode: open.requested_mode,
        effective_mode: open.requested_mode,
        outcome,
        reason,
        rule: Some(rule),
        detail,
        hosts,
    };
    (events, result)
}

/// Why `token`, presented for the closed run `run_id`, is refused: reason code, rule
/// (`R008-token-must-verify`) and one sentence.
///
/// Order: parse and signature; the run it names; then, scoped to the token's own hosts, plan
/// and action, expiry, replay (its nonce is in `consumed`) and approver roles. A token that
/// passes all of them is still refused (`TokenScopeMismatch`): its run is over.
pub fn judge(
    token: &str,
    run_id: Uuid,
    now_ms: u64,
    public_key: &[u8],
    consumed: &BTreeSet<String>,
    authorization: &Authorization,
) -> (ReasonCode, RuleId, String) {
    let rule = rules::R008_TOKEN_MUST_VERIFY;
    let refuse = |r: TokenRejection| (r.reason(), rule, r.to_string());
    let claims = match token::authenticate(Some(token), public_key) {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };
    if claims.run_id != run_id {
        return refuse(TokenRejection::ScopeMismatch {
            field: ScopeField::RunId,
            expected: run_id.to_string(),
            actual: claims.run_id.to_string(),
        });
    }
    let scope = TokenScope {
        run_id,
        hosts: &claims.hosts,
        operation_hash: &claims.operation_hash,
        action: claims.action,
        approvals_required: 1,
        max_lifetime_ms: u64::MAX,
    };
    let ctx = VerifyContext {
        now_ms,
        public_key,
        consumed,
        authorization,
    };
    match token::verify(Some(token), &scope, &ctx) {
        Err(r) => refuse(r),
        Ok(_) => (
            ReasonCode::TokenScopeMismatch,
            rule,
            format!("run {run_id} is no longer waiting for a token; nothing can run under it"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tollgate_protocol::Action;

    use super::*;
    use crate::config::Role;
    use crate::token::{Claims, TokenIssuer};

    #[test]
    fn an_open_run_is_closed_by_its_keys_and_uncertainty_fails_closed() {
        let f = |host: &str, step: &str, key: &str| InFlight {
            host: host.into(),
            step: step.into(),
            key: key.into(),
            destructive: true,
        };
        let open = OpenRun {
            run_id: Uuid::from_u128(1),
            action: Action::Teardown,
            requested_mode: Mode::Full,
            targets: vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()],
            in_flight: vec![
                f("a", "rm", "k1"),
                f("b", "rm", "k2"),
                f("c", "rm", "k3"),
                f("d", "rm", "k4"),
            ],
            quarantined: None,
        };
        let answers = BTreeMap::from([
            (
                "k1".to_owned(),
                IdempotencyAnswer::Finished(StepResult::Succeeded),
            ),
            ("k2".to_owned(), IdempotencyAnswer::NotFound),
            ("k3".to_owned(), IdempotencyAnswer::Running),
            (
                "k4".to_owned(),
                IdempotencyAnswer::Finished(StepResult::Permanent {
                    reason: ReasonCode::NonZeroExit,
                    exit_code: Some(2),
                }),
            ),
        ]);
        let (events, result) = close_after_restart(9, &open, &answers);
        let outcome = |h: &str| {
            result
                .hosts
                .iter()
                .find(|r| r.host == h)
                .unwrap()
                .outcome
                .clone()
        };
        let stopped = TypedOutcome::PolicyBlocked {
            reason: ReasonCode::Cancelled,
            rule: rules::E013_CLOSED_AFTER_RESTART,
        };
        assert_eq!(outcome("a"), stopped);
        assert_eq!(outcome("b"), stopped);
        assert!(matches!(
            outcome("c"),
            TypedOutcome::ExecutionFailed {
                reason: ReasonCode::OutcomeUncertain,
                ..
            }
        ));
        assert!(matches!(
            outcome("d"),
            TypedOutcome::ExecutionFailed {
                reason: ReasonCode::NonZeroExit,
                exit_code: Some(2),
                ..
            }
        ));
        assert_eq!(outcome("e"), stopped);
        assert!(
            result
                .hosts
                .iter()
                .all(|h| h.lifecycle == HostState::Unknown)
        );
        assert_eq!(result.rule, Some(rules::E013_CLOSED_AFTER_RESTART));
        assert_eq!(
            result.outcome.kind(),
            tollgate_protocol::outcome::OutcomeKind::ExecutionFailed
        );
        let last = events.last().unwrap();
        assert_eq!(
            (last.kind, last.verdict, last.rule),
            (
                EventKind::RunFinished,
                Some(Verdict::Fail),
                Some(rules::E013_CLOSED_AFTER_RESTART)
            )
        );
        assert!(
            events
                .iter()
                .all(|e| e.verdict.is_some() == e.rule.is_some())
        );

        // Nothing in flight, nothing failed: the run is simply closed. No answer = uncertain.
        let quiet = OpenRun {
            in_flight: vec![],
            ..open.clone()
        };
        assert_eq!(
            close_after_restart(9, &quiet, &BTreeMap::new()).1.outcome,
            stopped
        );
        let unanswered = OpenRun {
            in_flight: vec![f("a", "rm", "k9")],
            ..open
        };
        let (_, r) = close_after_restart(9, &unanswered, &BTreeMap::new());
        assert!(matches!(
            r.outcome,
            TypedOutcome::ExecutionFailed {
                reason: ReasonCode::OutcomeUncertain,
                ..
            }
        ));
        // Quarantined lines: closed as tampered, whatever the steps say.
        let tampered = OpenRun {
            quarantined: Some("lines 7-9 unsigned".into()),
            ..unanswered
        };
        let (events, r) = close_after_restart(9, &tampered, &BTreeMap::new());
        assert_eq!(
            r.outcome,
            TypedOutcome::PolicyBlocked {
                reason: ReasonCode::TimelineTampered,
                rule: rules::E014_UNSIGNED_LINES_QUARANTINED
            }
        );
        assert_eq!(
            events.last().unwrap().rule,
            Some(rules::E014_UNSIGNED_LINES_QUARANTINED)
        );
    }

    #[test]
    fn a_lost_outcome_or_an_open_query_keeps_a_step_in_flight() {
        let sent = |key: &str| {
            StepFact::Dispatched(InFlight {
                host: "h".into(),
                step: "rm".into(),
                key: key.into(),
                destructive: true,
            })
        };
        let settled = |key: &str| StepFact::Settled { key: key.into() };
        let unsettled = |key: &str| StepFact::Unsettled { key: key.into() };
        let keys = |facts: Vec<StepFact>| -> Vec<String> {
            in_flight(facts).into_iter().map(|f| f.key).collect()
        };
        // Sent, answered: settled. Sent, lost: in flight. Lost then queried "running": still.
        assert!(keys(vec![sent("a"), settled("a")]).is_empty());
        assert_eq!(keys(vec![sent("a"), unsettled("a")]), ["a"]);
        assert_eq!(keys(vec![sent("a"), unsettled("a"), unsettled("a")]), ["a"]);
        // Lost, "never ran", sent again under the same key: in flight again.
        assert_eq!(
            keys(vec![sent("a"), unsettled("a"), settled("a"), sent("a")]),
            ["a"]
        );
        assert!(keys(vec![sent("a"), unsettled("a"), settled("a")]).is_empty());
    }

    #[test]
    fn says_why_a_token_for_a_closed_run_is_refused() {
        let issuer = TokenIssuer::from_seed(&[3; 32]).unwrap();
        let key = issuer.public_key();
        let alice = "spiffe://f/operator/alice".to_owned();
        let authz = Authorization::new(BTreeMap::from([(
            alice.clone(),
            BTreeSet::from([Role::Approver]),
        )]));
        let run = Uuid::from_u128(5);
        let claims = Claims {
            run_id: run,
            hosts: vec!["web1".into()],
            operation_hash: "ab".into(),
            action: Action::Teardown,
            approvers: vec![alice],
            issued_at_ms: 1_000,
            expires_at_ms: 2_000,
            nonce: [1; 16],
        };
        let token = issuer.issue(&claims).unwrap();
        let judge_at = |token: &str, run, now, consumed: &BTreeSet<String>| {
            judge(token, run, now, &key, consumed, &authz).0
        };
        let none = BTreeSet::new();
        let used = BTreeSet::from([claims.nonce_hex()]);
        assert_eq!(
            judge_at("junk", run, 1_500, &none),
            ReasonCode::TokenMalformed
        );
        assert_eq!(
            judge_at(&token, Uuid::nil(), 1_500, &none),
            ReasonCode::TokenScopeMismatch
        );
        assert_eq!(
            judge_at(&token, run, 1_500, &used),
            ReasonCode::TokenReplayed
        );
        assert_eq!(
            judge_at(&token, run, 2_000, &used),
            ReasonCode::TokenExpired
        );
        let (reason, rule, detail) = judge(&token, run, 1_500, &key, &none, &authz);
        assert_eq!(
            (reason, rule),
            (
                ReasonCode::TokenScopeMismatch,
                rules::R008_TOKEN_MUST_VERIFY
            )
        );
        assert!(detail.contains("no longer waiting"));
        let other = TokenIssuer::from_seed(&[4; 32])
            .unwrap()
            .issue(&claims)
            .unwrap();
        assert_eq!(
            judge_at(&other, run, 1_500, &none),
            ReasonCode::TokenSignatureInvalid
        );
    }
}
