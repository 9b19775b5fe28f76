//! Model test: random runs of the real `RunMachine` on a model fleet.
//!
//! Each case builds a random fleet (1-4 hosts, random roles and safety classes), a random
//! intent (action, mode, targets), and a random script of runtime behaviour: which pending
//! request is answered next and how (probe failures, fingerprint drift, stale probes,
//! transient / permanent failures, lost outcomes, idempotency answers), clock steps, tokens of
//! every kind (valid, expired, for another run / host set / plan / action, unauthorized
//! approver, other key, replayed, garbage), cancels and stray inputs. When the script runs out
//! the driver answers everything successfully until the run finishes (it must).
//!
//! The driver is an oracle: it knows which tokens it forged and which probe answers it
//! spoiled, and checks SPEC §3's invariants on every effect the machine emits:
//!
//! 1. a destructive step is dispatched only after a valid token was accepted, inside a phase
//!    whose barrier allowed it, where every host of the phase answered that barrier's re-probe
//!    with the plan's fingerprint, freshly, before the Allow was computed; and a barrier allows
//!    exactly when all of that holds;
//! 2. missing or uncertain data never allows: a bad preflight answer means nothing runs; a host
//!    that failed or went Unknown never gets another request; quick mode never destroys;
//! 3. a lost outcome is never re-sent blindly: the key is queried next, and the same key is
//!    re-sent only after a `NotFound`; no new attempt is started while the outcome is unknown;
//! 4. every decision is a timeline record with a known rule, placed before the effect it
//!    decides.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tollgate_core::config::{
    Authorization, ClassTable, ClassTokenPolicy, Inventory, Operations, RetryPolicy, Role,
    parse_inventory, parse_operations,
};
use tollgate_core::facts::{HostFacts, ProbeFailure, ProbeOutcome};
use tollgate_core::lifecycle::HostState;
use tollgate_core::outcome::TypedOutcome;
use tollgate_core::plan::Intent;
use tollgate_core::policy::PolicyConfig;
use tollgate_core::rules;
use tollgate_core::run::{
    CheckAnswer, Effect, IdempotencyAnswer, Input, ProbePurpose, RunError, RunMachine, RunSettings,
    RunSpec, StepResult,
};
use tollgate_core::timeline::{EventKind, TimelineEvent, Verdict};
use tollgate_core::token::{Claims, TokenIssuer};
use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

const FRESHNESS: u64 = 30_000;
const ALICE: &str = "spiffe://m/operator/alice";
const BOB: &str = "spiffe://m/operator/bob";
const CAROL: &str = "spiffe://m/operator/carol";
const ROLES: [&str; 2] = ["web", "db"];
const CLASSES: [&str; 3] = ["disposable", "standard", "protected"];

/// Deploy has no destructive step; teardown has two destructive phases (two barriers).
const OPS_A: &str = r#"
[[deploy.phases]]
name = "a"
[[deploy.phases.steps]]
id = "install"
roles = ["web", "db"]
run = "install"
destructive = false
retries = 2
check = "test installed"
[[deploy.phases]]
name = "b"
[[deploy.phases.steps]]
id = "start"
roles = ["web"]
run = "start"
destructive = false

[[teardown.phases]]
name = "drain"
[[teardown.phases.steps]]
id = "drain"
roles = ["web"]
run = "drain"
destructive = false
[[teardown.phases]]
name = "rm"
[[teardown.phases.steps]]
id = "rm-web"
roles = ["web"]
run = "rm web"
destructive = true
retries = 2
[[teardown.phases.steps]]
id = "note-db"
roles = ["db"]
run = "note"
destructive = false
check = "test noted"
[[teardown.phases]]
name = "purge"
[[teardown.phases.steps]]
id = "purge-db"
roles = ["db"]
run = "purge"
destructive = true
"#;

/// Deploy starts with a destructive phase (reimage); teardown has nothing destructive.
const OPS_B: &str = r#"
[[deploy.phases]]
name = "reimage"
[[deploy.phases.steps]]
id = "wipe"
roles = ["web", "db"]
run = "wipe"
destructive = true
retries = 1
check = "test wiped"
[[deploy.phases]]
name = "configure"
[[deploy.phases.steps]]
id = "configure"
roles = ["db"]
run = "configure"
destructive = false
retries = 1

[[teardown.phases]]
name = "stop"
[[teardown.phases.steps]]
id = "stop"
roles = ["web"]
run = "stop"
destructive = false
"#;

fn fingerprint(host: &str) -> String {
    let b = host
        .bytes()
        .fold(7u8, |a, x| a.wrapping_mul(31).wrapping_add(x));
    hex::encode([b; 32])
}

fn drifted() -> String {
    hex::encode([0xee; 32])
}

/// What the random part of a case decides up front.
#[derive(Debug, Clone)]
struct Setup {
    hosts: Vec<(usize, usize)>,
    ops_b: bool,
    action: Action,
    mode: Mode,
    target_mask: u8,
    unknown_target: bool,
    per_phase: usize,
    seed: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        proptest::collection::vec((0usize..2, 0usize..3), 1..=4),
        any::<bool>(),
        prop_oneof![Just(Action::Deploy), Just(Action::Teardown)],
        prop_oneof![Just(Mode::Quick), Just(Mode::Full)],
        any::<u8>(),
        proptest::bool::weighted(0.05),
        1usize..=3,
        any::<u64>(),
    )
        .prop_map(
            |(hosts, ops_b, action, mode, target_mask, unknown_target, per_phase, seed)| Setup {
                hosts,
                ops_b,
                action,
                mode,
                target_mask,
                unknown_target,
                per_phase,
                seed,
            },
        )
}

/// Token kinds the driver can present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Valid,
    OneApprover,
    Expired,
    TooLong,
    OtherRun,
    OtherHosts,
    OtherPlan,
    OtherAction,
    Unauthorized,
    OtherKey,
    Replayed,
    Garbage,
}

const TOKEN_KINDS: [TokenKind; 12] = [
    TokenKind::Valid,
    TokenKind::OneApprover,
    TokenKind::Expired,
    TokenKind::TooLong,
    TokenKind::OtherRun,
    TokenKind::OtherHosts,
    TokenKind::OtherPlan,
    TokenKind::OtherAction,
    TokenKind::Unauthorized,
    TokenKind::OtherKey,
    TokenKind::Replayed,
    TokenKind::Garbage,
];

#[derive(Debug, Clone)]
struct Awaiting {
    hosts: Vec<String>,
    operation_hash: String,
    approvals: u8,
    lifetime: u64,
}

#[derive(Debug, Clone, Default)]
struct Round {
    started: u64,
    hosts: BTreeSet<String>,
    /// host -> (answer is a fresh-able success with the plan's fingerprint, probed_at)
    answers: BTreeMap<String, (bool, u64)>,
    allowed_at: Option<u64>,
    blocked: bool,
}

#[derive(Debug, Clone)]
struct InFlight {
    host: String,
    step: String,
    key: String,
}

#[derive(Debug, Default)]
struct Stats {
    tokens_rejected: usize,
    lost: usize,
    resent: usize,
    retries: usize,
    skips: usize,
}

struct Driver {
    stats: Stats,
    m: RunMachine,
    setup: Setup,
    run_id: Uuid,
    targets: Vec<String>,
    now: u64,
    started: bool,
    issuer: TokenIssuer,
    other: TokenIssuer,
    nonce: u64,
    // Outstanding requests.
    probes: Vec<(ProbePurpose, String)>,
    checks: Vec<(String, String)>,
    inflight: Vec<InFlight>,
    queries: Vec<(String, String, String)>,
    wakes: BTreeSet<u64>,
    awaiting: Option<Awaiting>,
    finished: Option<tollgate_core::outcome::RunResult>,
    // Oracle state.
    planned_fp: BTreeMap<String, String>,
    preflight_bad: bool,
    token_accepted: Option<u64>,
    last_token_valid: Option<(bool, u64)>,
    consumed: BTreeSet<String>,
    rounds: BTreeMap<usize, Round>,
    failed_hosts: BTreeSet<String>,
    /// (host, step) whose outcome is unknown -> key, and whether NotFound was answered for it.
    unknown_outcome: BTreeMap<(String, String), (String, bool)>,
    /// key -> may be re-sent (NotFound answered since its last dispatch).
    sent_keys: BTreeMap<String, bool>,
    destructive_dispatches: usize,
    dispatches: usize,
    /// The earliest phase in which a host failed: no later phase may run (containment).
    failed_phase: Option<usize>,
}

fn inventory_text(hosts: &[(usize, usize)]) -> String {
    let mut s = String::new();
    for (i, (role, class)) in hosts.iter().enumerate() {
        s.push_str(&format!(
            "[[hosts]]\nname = \"h{i}\"\nrole = \"{}\"\nsafety_class = \"{}\"\ntransport.local = {{}}\n",
            ROLES[*role], CLASSES[*class]
        ));
    }
    s
}

impl Driver {
    fn new(setup: Setup) -> Self {
        let inv: Inventory = parse_inventory(&inventory_text(&setup.hosts), "inv").unwrap();
        let ops: Operations =
            parse_operations(if setup.ops_b { OPS_B } else { OPS_A }, "ops").unwrap();
        let mut targets: Vec<String> = inv
            .hosts()
            .iter()
            .enumerate()
            .filter(|(i, _)| setup.target_mask & (1 << i) != 0)
            .map(|(_, h)| h.name.clone())
            .collect();
        if setup.target_mask & 0x80 != 0 {
            targets.clear(); // every host
        }
        if setup.unknown_target {
            targets.push("ghost".into());
        }
        let issuer = TokenIssuer::from_seed(&[11; 32]).unwrap();
        let mut grants = BTreeMap::new();
        grants.insert(
            ALICE.to_owned(),
            BTreeSet::from([Role::Approver, Role::Operator]),
        );
        grants.insert(BOB.to_owned(), BTreeSet::from([Role::Approver]));
        grants.insert(CAROL.to_owned(), BTreeSet::from([Role::Operator]));
        let run_id = Uuid::from_u64_pair(setup.seed, 1);
        let settings = RunSettings {
            policy: PolicyConfig {
                tokens: ClassTable {
                    disposable: ClassTokenPolicy {
                        lifetime_ms: 3_600_000,
                        approvers: 1,
                    },
                    standard: ClassTokenPolicy {
                        lifetime_ms: 300_000,
                        approvers: 1,
                    },
                    protected: ClassTokenPolicy {
                        lifetime_ms: 120_000,
                        approvers: 2,
                    },
                },
                freshness_ms: FRESHNESS,
                self_approval: false,
            },
            retry: RetryPolicy {
                max_attempts: 3,
                base_backoff_ms: 500,
                max_backoff_ms: 4_000,
            },
            max_parallel_hosts: setup.per_phase,
            probe_timeout_ms: 5_000,
            authorization: Authorization::new(grants),
            token_public_key: issuer.public_key(),
            jitter_seed: setup.seed,
        };
        let m = RunMachine::new(RunSpec {
            intent: Intent {
                run_id,
                action: setup.action,
                requested_mode: setup.mode,
                targets: targets.clone(),
                shadow: false,
            },
            requestor: ALICE.into(),
            inventory: inv,
            operations: ops,
            settings,
        })
        .unwrap();
        Driver {
            stats: Stats::default(),
            m,
            run_id,
            targets,
            now: 1_700_000_000_000,
            started: false,
            issuer,
            other: TokenIssuer::from_seed(&[12; 32]).unwrap(),
            nonce: 0,
            probes: Vec::new(),
            checks: Vec::new(),
            inflight: Vec::new(),
            queries: Vec::new(),
            wakes: BTreeSet::new(),
            awaiting: None,
            finished: None,
            planned_fp: BTreeMap::new(),
            preflight_bad: false,
            token_accepted: None,
            last_token_valid: None,
            consumed: BTreeSet::new(),
            rounds: BTreeMap::new(),
            failed_hosts: BTreeSet::new(),
            unknown_outcome: BTreeMap::new(),
            sent_keys: BTreeMap::new(),
            destructive_dispatches: 0,
            dispatches: 0,
            failed_phase: None,
            setup,
        }
    }

    /// Feeds an input and checks every effect.
    fn feed(&mut self, input: Input) -> Result<(), TestCaseError> {
        let was_finished = self.finished.is_some();
        let result = self.m.step(self.now, input.clone());

        let effects = match result {
            Ok(e) => e,
            Err(e) => {
                if was_finished {
                    prop_assert!(matches!(e, RunError::Finished { .. }), "{e}");
                }
                return Ok(());
            }
        };
        prop_assert!(
            !was_finished,
            "a finished run produced effects for {input:?}"
        );
        let lost_before: Vec<(String, String)> = match &input {
            Input::StepAnswered {
                host,
                step_id,
                result: StepResult::OutcomeLost,
                ..
            } => vec![(host.clone(), step_id.clone())],
            Input::IdempotencyAnswered {
                host,
                step_id,
                answer: IdempotencyAnswer::Finished(StepResult::OutcomeLost),
                ..
            } => {
                vec![(host.clone(), step_id.clone())]
            }
            _ => vec![],
        };
        // Invariant 3: after a lost outcome the very next request about that step is a query.
        for (host, step) in &lost_before {
            let next = effects.iter().find(|e| match e {
                Effect::Dispatch(d) => d.host == *host && d.step_id == *step,
                Effect::QueryIdempotency {
                    host: h,
                    step_id: s,
                    ..
                } => h == host && s == step,
                Effect::Check(c) => c.host == *host,
                _ => false,
            });
            if let Some(e) = next {
                prop_assert!(
                    matches!(e, Effect::QueryIdempotency { .. }),
                    "lost outcome of {host}/{step} followed by {e:?}"
                );
            }
        }
        for (i, effect) in effects.iter().enumerate() {
            let prev = if i > 0 { effects.get(i - 1) } else { None };
            let prev_record = |kind: EventKind| -> Option<&TimelineEvent> {
                effects[..i].iter().rev().find_map(|e| match e {
                    Effect::Record(ev) if ev.kind == kind => Some(ev),
                    _ => None,
                })
            };
            match effect {
                Effect::Record(ev) => {
                    if let Some(rule) = ev.rule {
                        prop_assert!(rules::explain(rule).is_some(), "unknown rule {rule}");
                    }
                    prop_assert_eq!(
                        ev.verdict.is_some(),
                        ev.rule.is_some(),
                        "verdict without rule or rule without verdict: {:?}",
                        ev
                    );
                    self.on_record(ev)?;
                }
                Effect::Probe {
                    purpose, requests, ..
                } => {
                    prop_assert!(
                        requests
                            .iter()
                            .all(|r| !self.failed_hosts.contains(&r.host)),
                        "probe of a failed host"
                    );
                    if let ProbePurpose::Barrier { phase } = purpose {
                        let round = Round {
                            started: self.now,
                            hosts: requests.iter().map(|r| r.host.clone()).collect(),
                            ..Round::default()
                        };
                        self.rounds.insert(*phase, round);
                    }
                    for r in requests {
                        self.probes.push((*purpose, r.host.clone()));
                    }
                }
                Effect::AwaitConfirmation {
                    plan,
                    operation_hash,
                    approvals_required,
                    token_lifetime_ms,
                    approve_command,
                } => {
                    let rec = prev_record(EventKind::PolicyEvaluated);
                    prop_assert!(
                        rec.is_some_and(|r| r.verdict == Some(Verdict::AwaitConfirmation)),
                        "await without its decision"
                    );
                    prop_assert_eq!(self.setup.mode, Mode::Full);
                    prop_assert!(approve_command.contains(operation_hash.as_str()));
                    prop_assert!(plan.steps.iter().any(|s| s.destructive));
                    for s in &plan.steps {
                        prop_assert!(
                            !s.destructive || s.barrier_before,
                            "destructive step without a barrier: {:?}",
                            s
                        );
                    }
                    self.awaiting = Some(Awaiting {
                        hosts: plan.hosts.clone(),
                        operation_hash: operation_hash.clone(),
                        approvals: *approvals_required,
                        lifetime: *token_lifetime_ms,
                    });
                }
                Effect::TokenRejected { reason, .. } => {
                    let rec = prev_record(EventKind::TokenJudged);
                    prop_assert!(
                        rec.is_some_and(|r| r.verdict == Some(Verdict::Block)),
                        "rejection without its decision"
                    );
                    prop_assert_eq!(
                        self.last_token_valid.map(|v| v.0),
                        Some(false),
                        "a valid token was rejected: {:?}",
                        reason
                    );
                    self.stats.tokens_rejected += 1;
                }
                Effect::ConsumeToken { nonce } => {
                    prop_assert!(
                        matches!(prev, Some(Effect::Record(r)) if r.kind == EventKind::TokenJudged && r.verdict == Some(Verdict::Allow))
                    );
                    let Some((valid, expires)) = self.last_token_valid else {
                        return Err(TestCaseError::fail("token consumed without one presented"));
                    };
                    prop_assert!(valid, "an invalid token was accepted");
                    prop_assert!(self.consumed.insert(nonce.clone()), "nonce consumed twice");
                    self.token_accepted = Some(expires);
                    self.awaiting = None;
                }
                Effect::Check(c) => {
                    prop_assert!(
                        !self.failed_hosts.contains(&c.host),
                        "check on failed host {}",
                        c.host
                    );
                    prop_assert!(
                        !self.preflight_bad,
                        "a check ran although a preflight probe failed"
                    );
                    self.checks.push((c.host.clone(), c.step_id.clone()));
                }
                Effect::Dispatch(d) => {
                    // Invariant 4: the decision is recorded right before.
                    let Some(Effect::Record(rec)) = prev else {
                        return Err(TestCaseError::fail(format!(
                            "dispatch without a record: {d:?}"
                        )));
                    };
                    prop_assert_eq!(rec.kind, EventKind::StepDispatched);
                    prop_assert_eq!(rec.verdict, Some(Verdict::Allow));
                    prop_assert_eq!(rec.host.as_deref(), Some(d.host.as_str()));
                    prop_assert_eq!(rec.inputs.get("idempotency_key"), Some(&d.idempotency_key));
                    // Invariant 2.
                    prop_assert!(
                        !self.preflight_bad,
                        "dispatch although a preflight probe failed"
                    );
                    prop_assert!(
                        !self.failed_hosts.contains(&d.host),
                        "dispatch to failed host {}",
                        d.host
                    );
                    prop_assert!(
                        !self.targets.iter().any(|t| t == "ghost"),
                        "dispatch in a run with an unknown target"
                    );
                    if let Some(p) = self.failed_phase {
                        prop_assert!(
                            d.phase <= p,
                            "phase {} started although a host failed in phase {p}",
                            d.phase
                        );
                    }
                    // Invariant 3.
                    if let Some((key, not_found)) = self
                        .unknown_outcome
                        .get(&(d.host.clone(), d.step_id.clone()))
                    {
                        prop_assert_eq!(
                            key,
                            &d.idempotency_key,
                            "new attempt while the outcome of the last is unknown"
                        );
                        prop_assert!(*not_found, "blind re-send of a lost outcome");
                    }
                    if let Some(may_resend) = self.sent_keys.get(&d.idempotency_key) {
                        prop_assert!(
                            *may_resend,
                            "key {} re-sent without a NotFound",
                            d.idempotency_key
                        );
                        self.stats.resent += 1;
                    }
                    self.sent_keys.insert(d.idempotency_key.clone(), false);
                    self.unknown_outcome
                        .remove(&(d.host.clone(), d.step_id.clone()));
                    // Invariant 1.
                    if d.destructive {
                        self.check_destructive(d.phase, &d.host)?;
                        self.destructive_dispatches += 1;
                    }
                    self.dispatches += 1;
                    self.inflight.push(InFlight {
                        host: d.host.clone(),
                        step: d.step_id.clone(),
                        key: d.idempotency_key.clone(),
                    });
                    // Concurrency: hosts with something out never exceed the per-phase limit.
                    let busy: BTreeSet<&String> = self
                        .inflight
                        .iter()
                        .map(|f| &f.host)
                        .chain(self.checks.iter().map(|c| &c.0))
                        .chain(self.queries.iter().map(|q| &q.0))
                        .collect();
                    prop_assert!(
                        busy.len() <= self.setup.per_phase,
                        "{} hosts busy, limit {}",
                        busy.len(),
                        self.setup.per_phase
                    );
                }
                Effect::QueryIdempotency {
                    host,
                    step_id,
                    idempotency_key,
                } => {
                    let Some(Effect::Record(rec)) = prev else {
                        return Err(TestCaseError::fail("query without a record"));
                    };
                    prop_assert_eq!(rec.verdict, Some(Verdict::Query));
                    prop_assert_eq!(rec.rule, Some(rules::E006_LOST_OUTCOME_QUERIES_KEY));
                    prop_assert!(
                        self.unknown_outcome
                            .contains_key(&(host.clone(), step_id.clone())),
                        "query without a lost outcome"
                    );
                    self.queries
                        .push((host.clone(), step_id.clone(), idempotency_key.clone()));
                }
                Effect::WakeAt { at_ms } => {
                    let Some(Effect::Record(rec)) = prev else {
                        return Err(TestCaseError::fail("wake without a record"));
                    };
                    prop_assert!(
                        matches!(rec.verdict, Some(Verdict::Retry | Verdict::Query)),
                        "wake after {rec:?}"
                    );
                    prop_assert!(*at_ms > self.now);
                    self.wakes.insert(*at_ms);
                }
                Effect::Finish(result) => {
                    let Some(Effect::Record(rec)) = prev else {
                        return Err(TestCaseError::fail("finish without a record"));
                    };
                    prop_assert_eq!(rec.kind, EventKind::RunFinished);
                    prop_assert!(rec.verdict.is_some() && rec.rule.is_some());
                    prop_assert_eq!(result.rule, rec.rule);
                    self.check_finish(result)?;
                    self.finished = Some(result.clone());
                }
            }
        }
        Ok(())
    }

    fn on_record(&mut self, ev: &TimelineEvent) -> Result<(), TestCaseError> {
        match ev.kind {
            EventKind::BarrierEvaluated => {
                let phase: usize = ev
                    .inputs
                    .get("phase_index")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(usize::MAX);
                let now = self.now;
                let token_ok = self.token_accepted.is_some_and(|expires| now < expires);
                let Some(round) = self.rounds.get_mut(&phase) else {
                    return Err(TestCaseError::fail(
                        "barrier decision without a barrier probe",
                    ));
                };
                let all_answered = round.hosts.iter().all(|h| round.answers.contains_key(h));
                let all_good = all_answered
                    && round.answers.values().all(|(good, at)| {
                        *good && *at >= round.started && *at <= now && now - *at <= FRESHNESS
                    });
                let allow = ev.verdict == Some(Verdict::Allow);
                prop_assert!(
                    !allow || all_answered,
                    "barrier allowed before every host answered"
                );
                // Containment holds whenever a barrier is reached (the run stops at failures).
                prop_assert_eq!(
                    allow,
                    all_good && token_ok,
                    "barrier decision {:?} but oracle says reprobes good={} token ok={}",
                    ev,
                    all_good,
                    token_ok
                );
                if allow {
                    round.allowed_at = Some(now);
                } else {
                    round.blocked = true;
                }
            }
            EventKind::HostFailed => {
                if let Some(h) = &ev.host {
                    self.failed_hosts.insert(h.clone());
                }
                // Preflight failures carry no phase; execution failures do.
                if let Some(p) = ev
                    .inputs
                    .get("phase_index")
                    .and_then(|p| p.parse::<usize>().ok())
                {
                    self.failed_phase = Some(self.failed_phase.map_or(p, |f| f.min(p)));
                }
            }
            EventKind::RetryScheduled => self.stats.retries += 1,
            EventKind::StepSkipped => {
                self.stats.skips += 1;
                prop_assert_eq!(ev.verdict, Some(Verdict::Skip));
            }
            _ => {}
        }
        Ok(())
    }

    fn check_destructive(&self, phase: usize, host: &str) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            self.setup.mode,
            Mode::Full,
            "quick mode dispatched a destructive step"
        );
        prop_assert!(
            self.token_accepted.is_some(),
            "destructive dispatch without an accepted token"
        );
        let Some(round) = self.rounds.get(&phase) else {
            return Err(TestCaseError::fail(
                "destructive dispatch without a barrier",
            ));
        };
        let Some(allowed_at) = round.allowed_at else {
            return Err(TestCaseError::fail(
                "destructive dispatch without a barrier Allow",
            ));
        };
        prop_assert!(!round.blocked);
        let Some((good, at)) = round.answers.get(host) else {
            return Err(TestCaseError::fail(
                "destructive dispatch to a host that was not re-probed",
            ));
        };
        prop_assert!(
            *good && *at >= round.started && *at <= allowed_at && allowed_at - *at <= FRESHNESS
        );
        Ok(())
    }

    fn check_finish(&self, r: &tollgate_core::outcome::RunResult) -> Result<(), TestCaseError> {
        prop_assert_eq!(r.run_id, self.run_id);
        if self.preflight_bad || self.targets.iter().any(|t| t == "ghost") {
            prop_assert!(
                !matches!(r.outcome, TypedOutcome::Completed),
                "completed with uncertain data: {:?}",
                r.outcome
            );
            prop_assert_eq!(self.dispatches, 0);
        }
        if let TypedOutcome::EscalationRequired { next_command, rule } = &r.outcome {
            prop_assert_eq!(self.setup.mode, Mode::Quick);
            prop_assert_eq!(*rule, rules::R004_QUICK_NEVER_DESTROYS);
            let mut hosts: Vec<String> = self.m.host_states().keys().cloned().collect();
            hosts.sort();
            prop_assert_eq!(
                next_command,
                &format!(
                    "tollgate {} --mode full --hosts {} --run {}",
                    self.setup.action,
                    hosts.join(","),
                    self.run_id
                )
            );
        }
        if self.setup.mode == Mode::Quick {
            prop_assert_eq!(self.destructive_dispatches, 0);
        }
        for h in &r.hosts {
            if matches!(
                h.outcome,
                TypedOutcome::ExecutionFailed {
                    reason: ReasonCode::OutcomeUncertain,
                    ..
                }
            ) {
                prop_assert_eq!(
                    h.lifecycle,
                    HostState::Unknown,
                    "uncertain outcome must leave {} Unknown",
                    h.host
                );
            }
            if matches!(r.outcome, TypedOutcome::Completed)
                && r.reason == ReasonCode::AllStepsSucceeded
            {
                prop_assert!(
                    matches!(h.lifecycle, HostState::Ready | HostState::TeardownComplete),
                    "{} ended {:?}",
                    h.host,
                    h.lifecycle
                );
            }
        }
        if let TypedOutcome::Completed = r.outcome {
            prop_assert!(
                self.inflight.is_empty() && self.checks.is_empty() && self.queries.is_empty(),
                "completed with requests out"
            );
        }
        Ok(())
    }

    fn token(&mut self, kind: TokenKind) -> (String, BTreeSet<String>) {
        let Some(a) = self.awaiting.clone() else {
            return ("tg1.x.y".into(), self.consumed.clone());
        };
        self.nonce += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.nonce.to_be_bytes());
        let approvers = if a.approvals >= 2 {
            vec![ALICE.to_owned(), BOB.to_owned()]
        } else {
            vec![ALICE.to_owned()]
        };
        let mut c = Claims {
            run_id: self.run_id,
            hosts: a.hosts.clone(),
            operation_hash: a.operation_hash.clone(),
            action: self.setup.action,
            approvers,
            issued_at_ms: self.now,
            expires_at_ms: self.now + a.lifetime,
            nonce,
        };
        let mut consumed = self.consumed.clone();
        let mut valid = true;
        let mut issuer = &self.issuer;
        match kind {
            TokenKind::Valid => {}
            TokenKind::OneApprover => {
                c.approvers = vec![BOB.to_owned()];
                valid = a.approvals <= 1;
            }
            TokenKind::Expired => {
                c.issued_at_ms = self.now - a.lifetime - 1;
                c.expires_at_ms = self.now - 1;
                valid = false;
            }
            TokenKind::TooLong => {
                c.expires_at_ms += 1;
                valid = false;
            }
            TokenKind::OtherRun => {
                c.run_id = Uuid::from_u128(7);
                valid = false;
            }
            TokenKind::OtherHosts => {
                if c.hosts.len() > 1 {
                    c.hosts.remove(0);
                } else {
                    c.hosts.push("zz-extra".into());
                }
                valid = false;
            }
            TokenKind::OtherPlan => {
                c.operation_hash = "00".repeat(32);
                valid = false;
            }
            TokenKind::OtherAction => {
                c.action = match c.action {
                    Action::Deploy => Action::Teardown,
                    Action::Teardown => Action::Deploy,
                };
                valid = false;
            }
            TokenKind::Unauthorized => {
                c.approvers = vec![CAROL.to_owned()];
                valid = false;
            }
            TokenKind::OtherKey => {
                issuer = &self.other;
                valid = false;
            }
            TokenKind::Replayed => {
                consumed.insert(hex::encode(nonce));
                valid = false;
            }
            TokenKind::Garbage => {
                self.last_token_valid = Some((false, 0));
                return ("tg1.garbage.garbage".into(), consumed);
            }
        }
        self.last_token_valid = Some((valid, c.expires_at_ms));
        (issuer.issue(&c).unwrap(), consumed)
    }

    fn probe_answer(&mut self, index: usize, fault: u16) -> Input {
        let (purpose, host) = self.probes.remove(index);
        let usual = match purpose {
            ProbePurpose::Preflight => fingerprint(&host),
            ProbePurpose::Barrier { .. } => self.planned_fp.get(&host).cloned().unwrap_or_default(),
        };
        let now = self.now;
        let facts = |fp: String, at: u64| {
            ProbeOutcome::Reported(HostFacts {
                fingerprint: fp,
                probed_at_ms: at,
                facts: BTreeMap::new(),
            })
        };
        let outcome = match fault % 40 {
            0 => ProbeOutcome::Failed(ProbeFailure::Unreachable),
            1 => ProbeOutcome::Failed(ProbeFailure::TimedOut),
            2 => ProbeOutcome::Failed(ProbeFailure::Malformed {
                detail: "bad json".into(),
            }),
            3 => facts(String::new(), now),
            4 => facts(drifted(), now),
            5 => facts(usual, now.saturating_sub(FRESHNESS + 5_000)),
            6 => facts(usual, now + 10_000),
            _ => facts(usual, now),
        };
        let usable = match &outcome {
            ProbeOutcome::Reported(f) if f.fingerprint.len() == 64 => {
                Some((f.fingerprint.clone(), f.probed_at_ms))
            }
            _ => None,
        };
        match purpose {
            ProbePurpose::Preflight => {
                // Any well-formed fingerprint at preflight becomes the plan's (age is not
                // judged at preflight: the plan binds the fingerprint, barriers judge freshness).
                match usable {
                    Some((fp, _)) => {
                        self.planned_fp.insert(host.clone(), fp);
                    }
                    None => self.preflight_bad = true,
                }
                Input::Probed { host, outcome }
            }
            ProbePurpose::Barrier { phase } => {
                let planned = self.planned_fp.get(&host);
                let (good, at) = match &usable {
                    Some((fp, at)) => (Some(fp) == planned, *at),
                    None => (false, now),
                };
                if let Some(r) = self.rounds.get_mut(&phase) {
                    r.answers.insert(host.clone(), (good, at));
                }
                Input::Reprobed {
                    phase,
                    host,
                    outcome,
                }
            }
        }
    }

    fn step_answer(&mut self, index: usize, fault: u16) -> Input {
        let f = self.inflight.remove(index);
        let result = match fault % 20 {
            0 | 1 => StepResult::Transient {
                reason: ReasonCode::Unreachable,
            },
            2 => StepResult::Permanent {
                reason: ReasonCode::NonZeroExit,
                exit_code: Some(3),
            },
            3 | 4 => StepResult::OutcomeLost,
            _ => StepResult::Succeeded,
        };
        self.note_result(&f.host, &f.step, &f.key, &result);
        Input::StepAnswered {
            host: f.host,
            step_id: f.step,
            idempotency_key: f.key,
            result,
        }
    }

    fn note_result(&mut self, host: &str, step: &str, key: &str, result: &StepResult) {
        match result {
            StepResult::OutcomeLost => {
                self.stats.lost += 1;
                self.unknown_outcome
                    .insert((host.to_owned(), step.to_owned()), (key.to_owned(), false));
            }
            _ => {
                self.unknown_outcome
                    .remove(&(host.to_owned(), step.to_owned()));
            }
        }
    }

    fn query_answer(&mut self, index: usize, fault: u16) -> Input {
        let (host, step, key) = self.queries.remove(index);
        let answer = match fault % 12 {
            0..=2 => IdempotencyAnswer::NotFound,
            3 | 4 => IdempotencyAnswer::Running,
            5 => IdempotencyAnswer::Uncertain,
            6 => IdempotencyAnswer::QueryFailed,
            7 => IdempotencyAnswer::Finished(StepResult::Permanent {
                reason: ReasonCode::NonZeroExit,
                exit_code: Some(1),
            }),
            8 => IdempotencyAnswer::Finished(StepResult::Transient {
                reason: ReasonCode::SpawnFailed,
            }),
            9 => IdempotencyAnswer::Finished(StepResult::OutcomeLost),
            _ => IdempotencyAnswer::Finished(StepResult::Succeeded),
        };
        match &answer {
            IdempotencyAnswer::NotFound => {
                if let Some(entry) = self.unknown_outcome.get_mut(&(host.clone(), step.clone())) {
                    entry.1 = true;
                }
                self.sent_keys.insert(key.clone(), true);
            }
            IdempotencyAnswer::Finished(r) => self.note_result(&host, &step, &key, r),
            _ => {}
        }
        Input::IdempotencyAnswered {
            host,
            step_id: step,
            idempotency_key: key,
            answer,
        }
    }

    fn check_answer(&mut self, index: usize, fault: u16) -> Input {
        let (host, step) = self.checks.remove(index);
        let answer = match fault % 10 {
            0..=2 => CheckAnswer::InDesiredState,
            3 => CheckAnswer::Failed {
                reason: ReasonCode::TimedOut,
            },
            _ => CheckAnswer::NotInDesiredState,
        };
        Input::CheckAnswered {
            host,
            step_id: step,
            answer,
        }
    }

    /// One random move, among the moves that make sense now.
    fn play(&mut self, choice: u8, arg: u8, fault: u16) -> Result<(), TestCaseError> {
        #[derive(Clone, Copy)]
        enum Move {
            Probe,
            Step,
            Check,
            Query,
            Clock,
            Token,
            Cancel,
            Stray,
        }
        if !self.started {
            self.started = true;
            return self.feed(Input::Start);
        }
        let mut moves = vec![Move::Clock];
        if !self.probes.is_empty() {
            moves.extend([Move::Probe, Move::Probe, Move::Probe]);
        }
        if !self.inflight.is_empty() {
            moves.extend([Move::Step, Move::Step, Move::Step]);
        }
        if !self.checks.is_empty() {
            moves.extend([Move::Check, Move::Check]);
        }
        if !self.queries.is_empty() {
            moves.extend([Move::Query, Move::Query]);
        }
        if self.awaiting.is_some() {
            moves.extend([Move::Token, Move::Token]);
        }
        if fault.is_multiple_of(61) {
            moves.push(Move::Cancel);
        }
        if fault.is_multiple_of(13) {
            moves.extend([Move::Stray, Move::Token]);
        }
        let arg = arg as usize;
        match moves[choice as usize % moves.len()] {
            Move::Probe => {
                let input = self.probe_answer(arg % self.probes.len(), fault);
                self.feed(input)
            }
            Move::Step => {
                let input = self.step_answer(arg % self.inflight.len(), fault);
                self.feed(input)
            }
            Move::Check => {
                let input = self.check_answer(arg % self.checks.len(), fault);
                self.feed(input)
            }
            Move::Query => {
                let input = self.query_answer(arg % self.queries.len(), fault);
                self.feed(input)
            }
            Move::Clock => {
                self.now += u64::from(fault % 45) * 1_000;
                let now = self.now;
                self.wakes.retain(|w| *w > now);
                self.feed(Input::Tick)
            }
            Move::Token => {
                let kind = TOKEN_KINDS[arg % TOKEN_KINDS.len()];
                let (token, consumed_nonces) = self.token(kind);
                self.feed(Input::TokenPresented {
                    token,
                    consumed_nonces,
                })
            }
            Move::Cancel => self.feed(Input::Cancel {
                reason: "operator".into(),
            }),
            Move::Stray => {
                // A stray answer (wrong key): refused without effect or state change.
                let before = self.m.host_states().clone();
                let stage = self.m.stage_name();
                let r = self.m.step(
                    self.now,
                    Input::StepAnswered {
                        host: "h0".into(),
                        step_id: "install".into(),
                        idempotency_key: "bogus".into(),
                        result: StepResult::Succeeded,
                    },
                );
                prop_assert!(r.is_err(), "stray answer accepted");
                prop_assert_eq!(&before, self.m.host_states());
                prop_assert_eq!(stage, self.m.stage_name());
                Ok(())
            }
        }
    }

    /// One move of the "everything goes well" runtime; false when nothing is left to do.
    fn drain_one(&mut self) -> Result<(), TestCaseError> {
        if !self.probes.is_empty() {
            let input = self.probe_answer(0, 39);
            return self.feed(input);
        }
        if !self.checks.is_empty() {
            let input = self.check_answer(0, 9);
            return self.feed(input);
        }
        if !self.inflight.is_empty() {
            let input = self.step_answer(0, 19);
            return self.feed(input);
        }
        if !self.queries.is_empty() {
            let input = self.query_answer(0, 11);
            return self.feed(input);
        }
        if self.awaiting.is_some() {
            let (token, consumed_nonces) = self.token(TokenKind::Valid);
            return self.feed(Input::TokenPresented {
                token,
                consumed_nonces,
            });
        }
        if let Some(w) = self.wakes.pop_first() {
            self.now = self.now.max(w);
            return self.feed(Input::Tick);
        }
        Err(TestCaseError::fail(format!(
            "run is stuck in stage {}",
            self.m.stage_name()
        )))
    }
}

/// How often each interesting path was taken across all cases (a generator that stops
/// reaching a path makes the test fail rather than pass vacuously).
#[derive(Debug, Default)]
struct Coverage {
    runs: usize,
    destructive_dispatches: usize,
    barrier_allows: usize,
    barrier_blocks: usize,
    tokens_rejected: usize,
    tokens_accepted: usize,
    escalations: usize,
    preflight_failures: usize,
    lost_outcomes: usize,
    resent_after_not_found: usize,
    retries: usize,
    skips: usize,
    partial_or_failed: usize,
    completed: usize,
    cancelled: usize,
}

fn play_case(
    setup: Setup,
    moves: &[(u8, u8, u16)],
    cov: &RefCell<Coverage>,
) -> Result<(), TestCaseError> {
    let mut d = Driver::new(setup);
    for (choice, arg, fault) in moves {
        if d.finished.is_some() {
            break;
        }
        d.play(*choice, *arg, *fault)?;
    }
    if !d.started {
        d.started = true;
        d.feed(Input::Start)?;
    }
    let mut budget = 400;
    while d.finished.is_none() {
        budget -= 1;
        prop_assert!(budget > 0, "run did not finish");
        d.drain_one()?;
    }
    // After the end, everything is refused.
    prop_assert!(d.m.is_finished());
    prop_assert!(
        matches!(d.m.step(d.now, Input::Tick), Err(RunError::Finished { .. })),
        "finished runs refuse input"
    );
    let mut c = cov.borrow_mut();
    c.runs += 1;
    c.destructive_dispatches += usize::from(d.destructive_dispatches > 0);
    c.barrier_allows += usize::from(d.rounds.values().any(|r| r.allowed_at.is_some()));
    c.barrier_blocks += usize::from(d.rounds.values().any(|r| r.blocked));
    c.tokens_rejected += d.stats.tokens_rejected;
    c.tokens_accepted += usize::from(d.token_accepted.is_some());
    c.preflight_failures += usize::from(d.preflight_bad);
    c.lost_outcomes += d.stats.lost;
    c.resent_after_not_found += d.stats.resent;
    c.retries += d.stats.retries;
    c.skips += d.stats.skips;
    if let Some(r) = &d.finished {
        match r.outcome {
            TypedOutcome::EscalationRequired { .. } => c.escalations += 1,
            TypedOutcome::PartialSuccess { .. } | TypedOutcome::ExecutionFailed { .. } => {
                c.partial_or_failed += 1
            }
            TypedOutcome::Completed => c.completed += 1,
            TypedOutcome::PolicyBlocked {
                reason: ReasonCode::Cancelled,
                ..
            } => c.cancelled += 1,
            _ => {}
        }
    }
    Ok(())
}

#[test]
fn safety_invariants_hold_on_random_runs() {
    let config = ProptestConfig {
        cases: 10_000,
        max_shrink_iters: 2_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let cov = RefCell::new(Coverage::default());
    let strategy = (
        setup(),
        proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u16>()), 0..60),
    );
    let result =
        TestRunner::new(config).run(&strategy, |(setup, moves)| play_case(setup, &moves, &cov));
    if let Err(e) = result {
        panic!("{e}");
    }
    let c = cov.into_inner();
    eprintln!("{c:#?}");
    assert!(c.runs >= 10_000);
    for (name, n) in [
        ("destructive dispatches", c.destructive_dispatches),
        ("barrier allows", c.barrier_allows),
        ("barrier blocks", c.barrier_blocks),
        ("token rejections", c.tokens_rejected),
        ("token acceptances", c.tokens_accepted),
        ("escalations", c.escalations),
        ("preflight failures", c.preflight_failures),
        ("lost outcomes", c.lost_outcomes),
        ("re-sends after NotFound", c.resent_after_not_found),
        ("retries", c.retries),
        ("skips", c.skips),
        ("partial or failed runs", c.partial_or_failed),
        ("completed runs", c.completed),
        ("cancelled runs", c.cancelled),
    ] {
        assert!(n >= 100, "only {n} cases reached {name}");
    }
}
