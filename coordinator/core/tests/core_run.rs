//! The run machine, scenario by scenario, on the test fleet (`tests/data/fleet`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::collections::{BTreeMap, BTreeSet};

use tollgate_core::config::{parse_coordinator, parse_inventory, parse_operations};
use tollgate_core::facts::{HostFacts, ProbeFailure, ProbeOutcome};
use tollgate_core::lifecycle::HostState;
use tollgate_core::outcome::{RunResult, TypedOutcome};
use tollgate_core::plan::Intent;
use tollgate_core::rules;
use tollgate_core::run::{
    CheckAnswer, Dispatch, Effect, IdempotencyAnswer, Input, ProbePurpose, RunError, RunMachine,
    RunSettings, RunSpec, StepResult,
};
use tollgate_core::timeline::{EventKind, TimelineEvent, Verdict};
use tollgate_core::token::{Claims, TokenIssuer};
use tollgate_protocol::outcome::{OutcomeKind, ReasonCode};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

const T0: u64 = 1_700_000_000_000;
const RUN: Uuid = Uuid::from_u128(0xabc);
const ALICE: &str = "spiffe://test.fleet/operator/alice";
const BOB: &str = "spiffe://test.fleet/operator/bob";

fn fp(host: &str) -> String {
    hex::encode([host.len() as u8 + host.as_bytes()[host.len() - 1]; 32])
}

fn issuer() -> TokenIssuer {
    TokenIssuer::from_seed(&[4; 32]).unwrap()
}

struct Run {
    m: RunMachine,
    now: u64,
    all: Vec<Effect>,
}

impl Run {
    fn new(action: Action, mode: Mode, targets: &[&str]) -> Self {
        let inv = parse_inventory(
            include_str!("../../tests/data/fleet/inventory.toml"),
            "inventory.toml",
        )
        .unwrap();
        let mut ops = parse_operations(
            include_str!("../../tests/data/fleet/operations.toml"),
            "operations.toml",
        )
        .unwrap();
        ops.resolve_run_files(|_| {
            Ok(include_str!("../../tests/data/fleet/scripts/remove.sh").to_owned())
        })
        .unwrap();
        let cfg = parse_coordinator(
            include_str!("../../tests/data/fleet/coordinator.toml"),
            "coordinator.toml",
        )
        .unwrap();
        let m = RunMachine::new(RunSpec {
            intent: Intent {
                run_id: RUN,
                action,
                requested_mode: mode,
                targets: targets.iter().map(|t| (*t).to_owned()).collect(),
                shadow: false,
            },
            requestor: ALICE.into(),
            inventory: inv,
            operations: ops,
            settings: RunSettings::from_config(&cfg, issuer().public_key(), 7),
        })
        .unwrap();
        Run {
            m,
            now: T0,
            all: Vec::new(),
        }
    }

    fn step(&mut self, input: Input) -> Vec<Effect> {
        let effects = self.m.step(self.now, input).unwrap();
        self.all.extend(effects.iter().cloned());
        effects
    }

    /// Starts the run and answers every preflight probe with the host's fingerprint.
    fn start_and_probe(&mut self) -> Vec<Effect> {
        let effects = self.step(Input::Start);
        let hosts = probed_hosts(&effects, ProbePurpose::Preflight);
        let mut last = Vec::new();
        for h in hosts {
            last = self.step(Input::Probed {
                host: h.clone(),
                outcome: ok(&h, self.now),
            });
        }
        last
    }

    fn token(&self, approvers: &[&str], lifetime: u64) -> String {
        let plan = self.m.plan().unwrap();
        issuer()
            .issue(&Claims {
                run_id: RUN,
                hosts: plan.host_names(),
                operation_hash: plan.operation_hash().to_owned(),
                action: plan.action(),
                approvers: approvers.iter().map(|a| (*a).to_owned()).collect(),
                issued_at_ms: self.now,
                expires_at_ms: self.now + lifetime,
                nonce: [self.all.len() as u8; 16],
            })
            .unwrap()
    }

    fn present(&mut self, token: String) -> Vec<Effect> {
        self.step(Input::TokenPresented {
            token,
            consumed_nonces: BTreeSet::new(),
        })
    }

    fn succeed(&mut self, d: &Dispatch) -> Vec<Effect> {
        self.answer(d, StepResult::Succeeded)
    }

    fn answer(&mut self, d: &Dispatch, result: StepResult) -> Vec<Effect> {
        self.step(Input::StepAnswered {
            host: d.host.clone(),
            step_id: d.step_id.clone(),
            idempotency_key: d.idempotency_key.clone(),
            result,
        })
    }

    fn reprobe_all(
        &mut self,
        effects: &[Effect],
        phase: usize,
        spoil: Option<(&str, ProbeOutcome)>,
    ) -> Vec<Effect> {
        let mut last = Vec::new();
        for h in probed_hosts(effects, ProbePurpose::Barrier { phase }) {
            let outcome = match &spoil {
                Some((bad, o)) if *bad == h => o.clone(),
                _ => ok(&h, self.now),
            };
            last = self.step(Input::Reprobed {
                phase,
                host: h,
                outcome,
            });
        }
        last
    }

    fn records(&self, kind: EventKind) -> Vec<&TimelineEvent> {
        self.all
            .iter()
            .filter_map(|e| match e {
                Effect::Record(r) if r.kind == kind => Some(r),
                _ => None,
            })
            .collect()
    }

    fn state(&self, host: &str) -> HostState {
        self.m.host_states()[host]
    }
}

fn ok(host: &str, at: u64) -> ProbeOutcome {
    ProbeOutcome::Reported(HostFacts {
        fingerprint: fp(host),
        probed_at_ms: at,
        facts: BTreeMap::new(),
    })
}

fn probed_hosts(effects: &[Effect], purpose: ProbePurpose) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Probe {
                purpose: p,
                requests,
                ..
            } if *p == purpose => Some(requests.iter().map(|r| r.host.clone()).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn dispatches(effects: &[Effect]) -> Vec<Dispatch> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn checks(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Check(c) => Some((c.host.clone(), c.step_id.clone())),
            _ => None,
        })
        .collect()
}

fn finish(effects: &[Effect]) -> Option<RunResult> {
    effects.iter().find_map(|e| match e {
        Effect::Finish(r) => Some(r.clone()),
        _ => None,
    })
}

fn host_outcome(r: &RunResult, host: &str) -> TypedOutcome {
    r.hosts
        .iter()
        .find(|h| h.host == host)
        .unwrap()
        .outcome
        .clone()
}

#[test]
fn quick_deploy_probes_checks_skips_runs_and_completes() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &[]);
    let start = run.step(Input::Start);
    let Some(Effect::Probe { requests, .. }) =
        start.iter().find(|e| matches!(e, Effect::Probe { .. }))
    else {
        panic!("no probe")
    };
    let scripts: BTreeMap<&str, bool> = requests
        .iter()
        .map(|r| (r.host.as_str(), r.script.is_some()))
        .collect();
    assert_eq!(
        scripts,
        BTreeMap::from([("db1", false), ("web1", true), ("web2", true)]),
        "web hosts get their role's probe script"
    );

    let mut e = Vec::new();
    for h in ["db1", "web1", "web2"] {
        e = run.step(Input::Probed {
            host: h.into(),
            outcome: ok(h, T0),
        });
    }
    let policy = &run.records(EventKind::PolicyEvaluated)[0];
    assert_eq!(
        (policy.verdict, policy.rule),
        (Some(Verdict::Allow), Some(rules::R010_ALLOW))
    );
    // Two hosts at a time (per_phase = 2); `install` has a check.
    assert_eq!(
        checks(&e),
        vec![
            ("db1".into(), "install".into()),
            ("web1".into(), "install".into())
        ]
    );
    let e = run.step(Input::CheckAnswered {
        host: "db1".into(),
        step_id: "install".into(),
        answer: CheckAnswer::InDesiredState,
    });
    assert!(e.iter().any(|x| matches!(x, Effect::Record(r) if r.kind == EventKind::StepSkipped && r.verdict == Some(Verdict::Skip) && r.rule == Some(rules::E003_CHECK_SAYS_DONE))));
    assert_eq!(
        checks(&e),
        vec![("web2".into(), "install".into())],
        "db1's slot goes to web2"
    );
    let mut out = Vec::new();
    for h in ["web1", "web2"] {
        let e = run.step(Input::CheckAnswered {
            host: h.into(),
            step_id: "install".into(),
            answer: CheckAnswer::NotInDesiredState,
        });
        out.extend(dispatches(&e));
    }
    assert_eq!(out.len(), 2);
    assert!(
        out.iter()
            .all(|d| !d.destructive && d.attempt == 1 && d.idempotency_key.ends_with("-1"))
    );
    run.succeed(&out[0]);
    let e = run.succeed(&out[1]);
    let start: Vec<Dispatch> = dispatches(&e);
    assert_eq!(
        start
            .iter()
            .map(|d| (d.host.as_str(), d.step_id.as_str()))
            .collect::<Vec<_>>(),
        vec![("web1", "start-web"), ("web2", "start-web")]
    );
    run.succeed(&start[0]);
    let e = run.succeed(&start[1]);
    let r = finish(&e).expect("finished");
    assert_eq!(r.outcome, TypedOutcome::Completed);
    assert_eq!(
        (r.reason, r.rule),
        (
            ReasonCode::AllStepsSucceeded,
            Some(rules::E010_RUN_COMPLETED)
        )
    );
    assert_eq!(r.effective_mode, Mode::Quick);
    assert!(
        r.hosts
            .iter()
            .all(|h| h.lifecycle == HostState::Ready && h.outcome == TypedOutcome::Completed)
    );
    let report = r.to_report("runs/x");
    assert_eq!(report.outcome.kind(), OutcomeKind::Completed);
    assert_eq!(report.hosts.len(), 3);
    assert!(run.m.is_finished());
}

#[test]
fn quick_teardown_escalates_with_the_exact_command_and_runs_nothing() {
    let mut run = Run::new(Action::Teardown, Mode::Quick, &["web2", "web1"]);
    let e = run.start_and_probe();
    let r = finish(&e).expect("finished");
    let next = format!("tollgate teardown --mode full --hosts web1,web2 --run {RUN}");
    assert_eq!(
        r.outcome,
        TypedOutcome::EscalationRequired {
            rule: rules::R004_QUICK_NEVER_DESTROYS,
            next_command: next
        }
    );
    assert_eq!(r.reason, ReasonCode::QuickModeNonDestructive);
    assert!(dispatches(&run.all).is_empty() && checks(&run.all).is_empty());
    let rec = run.records(EventKind::RunFinished)[0];
    assert_eq!(rec.verdict, Some(Verdict::Escalate));
}

#[test]
fn full_teardown_waits_for_two_approvers_then_passes_its_barrier_and_completes() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &[]);
    let e = run.start_and_probe();
    let Some(Effect::AwaitConfirmation {
        plan,
        approvals_required,
        token_lifetime_ms,
        approve_command,
        ..
    }) = e
        .iter()
        .find(|x| matches!(x, Effect::AwaitConfirmation { .. }))
    else {
        panic!("no confirmation request: {e:?}")
    };
    assert_eq!(*approvals_required, 2, "db1 is protected");
    assert_eq!(*token_lifetime_ms, 600_000, "the shortest class lifetime");
    assert_eq!(
        approve_command,
        &format!(
            "tollgate approve {RUN} --operation-hash {}",
            plan.operation_hash
        )
    );
    assert!(
        dispatches(&run.all).is_empty(),
        "nothing runs before the token"
    );

    // One approver is not enough; the run keeps waiting.
    let e = run.present(run.token(&[ALICE], 600_000));
    assert!(
        matches!(
            e.last(),
            Some(Effect::TokenRejected {
                reason: ReasonCode::ApprovalsInsufficient,
                ..
            })
        ),
        "{e:?}"
    );
    assert_eq!(run.m.stage_name(), "awaiting a token");

    let e = run.present(run.token(&[ALICE, BOB], 600_000));
    assert!(e.iter().any(|x| matches!(x, Effect::ConsumeToken { .. })));
    let drain = dispatches(&e);
    assert_eq!(
        drain.iter().map(|d| d.host.as_str()).collect::<Vec<_>>(),
        vec!["web1", "web2"]
    );
    run.succeed(&drain[0]);
    let e = run.succeed(&drain[1]);
    assert_eq!(
        probed_hosts(&e, ProbePurpose::Barrier { phase: 1 }),
        vec!["db1", "web1", "web2"]
    );
    assert!(
        dispatches(&e).is_empty(),
        "nothing destructive before the re-probes"
    );

    run.now += 1_000;
    let e = run.reprobe_all(&e, 1, None);
    let barrier = run.records(EventKind::BarrierEvaluated)[0];
    assert_eq!(barrier.verdict, Some(Verdict::Allow));
    assert_eq!(run.state("db1"), HostState::TeardownPending);
    let remove = dispatches(&e);
    assert_eq!(
        remove
            .iter()
            .map(|d| (d.host.as_str(), d.destructive))
            .collect::<Vec<_>>(),
        vec![("db1", true), ("web1", true)]
    );
    // db1 finishing frees its slot for web2.
    let next = dispatches(&run.succeed(&remove[0]));
    assert_eq!(
        (next[0].host.as_str(), next[0].step_id.as_str()),
        ("web2", "remove-web")
    );
    run.succeed(&remove[1]);
    let e = run.succeed(&next[0]);
    let r = finish(&e).unwrap();
    assert_eq!(r.outcome, TypedOutcome::Completed);
    assert_eq!(r.effective_mode, Mode::Full);
    for h in ["db1", "web1", "web2"] {
        assert_eq!(run.state(h), HostState::TeardownComplete, "{h}");
    }
}

#[test]
fn a_drifted_host_blocks_the_whole_destructive_phase_as_stale() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &[]);
    run.start_and_probe();
    let e = run.present(run.token(&[ALICE, BOB], 600_000));
    for d in dispatches(&e) {
        let e2 = run.succeed(&d);
        if !probed_hosts(&e2, ProbePurpose::Barrier { phase: 1 }).is_empty() {
            let drift = ProbeOutcome::Reported(HostFacts {
                fingerprint: "99".repeat(32),
                probed_at_ms: run.now,
                facts: BTreeMap::new(),
            });
            let e3 = run.reprobe_all(&e2, 1, Some(("web2", drift)));
            let r = finish(&e3).expect("finished");
            assert_eq!(
                r.outcome,
                TypedOutcome::PolicyBlocked {
                    reason: ReasonCode::StalePlan,
                    rule: rules::B002_FRESH_MATCHING_REPROBE
                }
            );
            for h in ["db1", "web1", "web2"] {
                assert!(
                    matches!(
                        host_outcome(&r, h),
                        TypedOutcome::PolicyBlocked {
                            reason: ReasonCode::StalePlan,
                            ..
                        }
                    ),
                    "{h}"
                );
            }
            assert_eq!(
                run.state("web2"),
                HostState::Unknown,
                "drift sends the host to Unknown"
            );
            assert_eq!(run.state("web1"), HostState::Ready);
            assert!(dispatches(&run.all).iter().all(|d| !d.destructive));
            return;
        }
    }
    panic!("never reached the barrier");
}

#[test]
fn a_token_that_expires_before_the_barrier_blocks_it() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &["web1"]);
    run.start_and_probe();
    let e = run.present(run.token(&[ALICE], 900_000));
    let drain = dispatches(&e);
    run.now += 900_000;
    let e = run.succeed(&drain[0]);
    let e = run.reprobe_all(&e, 1, None);
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::TokenExpired,
            rule: rules::R008_TOKEN_MUST_VERIFY
        }
    );
    assert!(dispatches(&run.all).iter().all(|d| !d.destructive));
}

#[test]
fn a_lost_destructive_outcome_is_queried_resent_once_by_key_then_given_up() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &["web1"]);
    run.start_and_probe();
    let e = run.present(run.token(&[ALICE], 900_000));
    let e = run.succeed(&dispatches(&e)[0]);
    let e = run.reprobe_all(&e, 1, None);
    let rm = dispatches(&e)[0].clone();
    assert!(rm.destructive);

    let e = run.answer(&rm, StepResult::OutcomeLost);
    assert!(dispatches(&e).is_empty(), "never re-sent blindly");
    assert!(
        matches!(e.last(), Some(Effect::QueryIdempotency { idempotency_key, .. }) if *idempotency_key == rm.idempotency_key)
    );
    let query = |answer| Input::IdempotencyAnswered {
        host: "web1".into(),
        step_id: "remove-web".into(),
        idempotency_key: rm.idempotency_key.clone(),
        answer,
    };
    let e = run.step(query(IdempotencyAnswer::NotFound));
    let again = dispatches(&e);
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].idempotency_key.as_str(), again[0].attempt),
        (rm.idempotency_key.as_str(), 1),
        "same key, same attempt"
    );
    assert!(
        run.records(EventKind::StepDispatched)
            .iter()
            .any(|r| r.rule == Some(rules::E007_RESEND_AFTER_NOT_FOUND))
    );

    run.answer(&again[0], StepResult::OutcomeLost);
    let e = run.step(query(IdempotencyAnswer::NotFound));
    assert!(dispatches(&e).is_empty(), "only one re-send");
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::ExecutionFailed {
            step_id: "remove-web".into(),
            reason: ReasonCode::OutcomeUncertain,
            exit_code: None
        }
    );
    assert_eq!(run.state("web1"), HostState::Unknown);
    let failed = run.records(EventKind::HostFailed);
    assert_eq!(failed[0].rule, Some(rules::E008_UNCERTAIN_OUTCOME_UNKNOWN));
}

#[test]
fn a_still_running_step_is_asked_again_later_and_its_result_used() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &["web1"]);
    let e = run.start_and_probe();
    assert_eq!(checks(&e).len(), 1);
    let e = run.step(Input::CheckAnswered {
        host: "web1".into(),
        step_id: "install".into(),
        answer: CheckAnswer::NotInDesiredState,
    });
    let d = dispatches(&e)[0].clone();
    run.answer(&d, StepResult::OutcomeLost);
    let q = |answer| Input::IdempotencyAnswered {
        host: "web1".into(),
        step_id: "install".into(),
        idempotency_key: d.idempotency_key.clone(),
        answer,
    };
    let e = run.step(q(IdempotencyAnswer::Running));
    let Some(Effect::WakeAt { at_ms }) = e.last() else {
        panic!("{e:?}")
    };
    assert!(run.step(Input::Tick).is_empty(), "not yet");
    run.now = *at_ms;
    let e = run.step(Input::Tick);
    assert!(matches!(e.last(), Some(Effect::QueryIdempotency { .. })));
    let e = run.step(q(IdempotencyAnswer::Finished(StepResult::Succeeded)));
    assert_eq!(
        dispatches(&e)[0].step_id,
        "start-web",
        "the finished result moves the host on"
    );
}

#[test]
fn transient_failures_retry_with_backoff_and_new_keys_until_attempts_run_out() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &["web1"]);
    run.start_and_probe();
    let e = run.step(Input::CheckAnswered {
        host: "web1".into(),
        step_id: "install".into(),
        answer: CheckAnswer::NotInDesiredState,
    });
    let mut d = dispatches(&e)[0].clone();
    let mut keys = BTreeSet::from([d.idempotency_key.clone()]);
    for attempt in 1..=2u32 {
        let e = run.answer(
            &d,
            StepResult::Transient {
                reason: ReasonCode::Unreachable,
            },
        );
        let Some(Effect::WakeAt { at_ms }) = e.last() else {
            panic!("{e:?}")
        };
        let rec = run.records(EventKind::RetryScheduled);
        assert_eq!(rec.last().unwrap().rule, Some(rules::E004_RETRY_TRANSIENT));
        let delay = at_ms - run.now;
        let base = 100u64 << (attempt - 1);
        assert!(
            (base / 2..=base).contains(&delay),
            "attempt {attempt}: {delay}"
        );
        run.now = at_ms - 1;
        assert!(run.step(Input::Tick).is_empty());
        run.now = *at_ms;
        d = dispatches(&run.step(Input::Tick))[0].clone();
        assert_eq!(d.attempt, attempt + 1);
        assert!(
            keys.insert(d.idempotency_key.clone()),
            "a retry after a definite failure uses a new key"
        );
    }
    let e = run.answer(
        &d,
        StepResult::Transient {
            reason: ReasonCode::Unreachable,
        },
    );
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::ExecutionFailed {
            step_id: "install".into(),
            reason: ReasonCode::Unreachable,
            exit_code: None
        }
    );
    assert_eq!(run.state("web1"), HostState::Unknown);
}

#[test]
fn a_failed_host_stops_later_phases_everywhere() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &["web1", "web2"]);
    let e = run.start_and_probe();
    assert_eq!(checks(&e).len(), 2);
    let mut out = Vec::new();
    for h in ["web1", "web2"] {
        out.extend(dispatches(&run.step(Input::CheckAnswered {
            host: h.into(),
            step_id: "install".into(),
            answer: CheckAnswer::NotInDesiredState,
        })));
    }
    run.answer(
        &out[0],
        StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            exit_code: Some(2),
        },
    );
    let e = run.succeed(&out[1]);
    assert!(dispatches(&e).is_empty(), "phase `start` does not run");
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::ExecutionFailed {
            step_id: "install".into(),
            reason: ReasonCode::NonZeroExit,
            exit_code: Some(2)
        }
    );
    assert_eq!(r.rule, Some(rules::E009_CONTAINMENT_STOPS_RUN));
    assert_eq!(
        host_outcome(&r, "web2"),
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::ContainmentFailed,
            rule: rules::E009_CONTAINMENT_STOPS_RUN
        }
    );
}

#[test]
fn after_a_failure_only_hosts_with_no_later_steps_count_as_succeeded() {
    // db1 runs only `install`; web1 and web2 also have `start-web` in the next phase.
    let mut run = Run::new(Action::Deploy, Mode::Quick, &[]);
    run.start_and_probe();
    let not_done = |h: &str| Input::CheckAnswered {
        host: h.into(),
        step_id: "install".into(),
        answer: CheckAnswer::NotInDesiredState,
    };
    let db1 = dispatches(&run.step(not_done("db1")));
    let web1 = dispatches(&run.step(not_done("web1")));
    let e = run.succeed(&db1[0]);
    assert_eq!(checks(&e), vec![("web2".into(), "install".into())]);
    let web2 = dispatches(&run.step(not_done("web2")));
    run.answer(
        &web1[0],
        StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            exit_code: Some(1),
        },
    );
    let r = finish(&run.succeed(&web2[0])).expect("finished");
    assert_eq!(
        r.outcome,
        TypedOutcome::PartialSuccess {
            succeeded: vec!["db1".into()],
            failed: vec!["web1".into()],
        }
    );
    assert_eq!(host_outcome(&r, "db1"), TypedOutcome::Completed);
    assert!(
        matches!(host_outcome(&r, "web2"), TypedOutcome::PolicyBlocked { .. }),
        "web2 still had `start-web` to run"
    );
}

#[test]
fn a_failed_preflight_probe_stops_everything_with_its_typed_outcome() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &[]);
    run.step(Input::Start);
    run.step(Input::Probed {
        host: "web1".into(),
        outcome: ok("web1", T0),
    });
    run.step(Input::Probed {
        host: "web2".into(),
        outcome: ok("web2", T0),
    });
    let e = run.step(Input::Probed {
        host: "db1".into(),
        outcome: ProbeOutcome::Failed(ProbeFailure::Unreachable),
    });
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::TransportUnreachable {
            reason: ReasonCode::Unreachable
        }
    );
    assert_eq!(r.rule, Some(rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS));
    assert_eq!(
        host_outcome(&r, "db1"),
        TypedOutcome::TransportUnreachable {
            reason: ReasonCode::Unreachable
        }
    );
    assert_eq!(
        host_outcome(&r, "web1"),
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::HostUnknown,
            rule: rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS
        }
    );
    assert_eq!(run.state("db1"), HostState::Unknown);
    assert!(dispatches(&run.all).is_empty());
}

#[test]
fn full_mode_with_nothing_destructive_de_escalates_and_runs_without_a_token() {
    let mut run = Run::new(Action::Deploy, Mode::Full, &["web1"]);
    let e = run.start_and_probe();
    let policy = run.records(EventKind::PolicyEvaluated)[0];
    assert_eq!(
        policy.rule,
        Some(rules::R005_FULL_WITHOUT_DESTRUCTIVE_DE_ESCALATES)
    );
    assert_eq!(policy.reason, Some(ReasonCode::DeEscalated));
    assert_eq!(policy.inputs["effective_mode"], "quick");
    assert!(
        !e.iter()
            .any(|x| matches!(x, Effect::AwaitConfirmation { .. }))
    );
    assert_eq!(checks(&e).len(), 1, "work starts at once");
}

#[test]
fn unknown_targets_are_blocked_before_any_probe() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &["web1", "nope"]);
    let e = run.step(Input::Start);
    assert!(probed_hosts(&e, ProbePurpose::Preflight).is_empty());
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::UnknownHost,
            rule: rules::R001_TARGETS_IN_INVENTORY
        }
    );
    assert_eq!(
        host_outcome(&r, "nope"),
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::UnknownHost,
            rule: rules::R001_TARGETS_IN_INVENTORY
        }
    );
}

#[test]
fn cancelling_while_waiting_for_a_token_ends_the_run() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &["web1"]);
    run.start_and_probe();
    let e = run.step(Input::Cancel {
        reason: "changed my mind".into(),
    });
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::Cancelled,
            rule: rules::E011_CANCELLED
        }
    );
}

#[test]
fn inputs_out_of_place_are_refused_without_effects() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &["web1"]);
    let bogus = Input::StepAnswered {
        host: "web1".into(),
        step_id: "drain-web".into(),
        idempotency_key: "k".into(),
        result: StepResult::Succeeded,
    };
    assert!(matches!(
        run.m.step(T0, bogus.clone()),
        Err(RunError::Unexpected { .. })
    ));
    assert_eq!(run.step(Input::Tick), vec![], "ticks are harmless anywhere");
    run.step(Input::Start);
    run.step(Input::Probed {
        host: "web1".into(),
        outcome: ok("web1", T0),
    });
    assert!(matches!(
        run.m.step(
            T0,
            Input::Probed {
                host: "web1".into(),
                outcome: ok("web1", T0)
            }
        ),
        Err(RunError::Unexpected { .. })
    ));
    let token = run.token(&[ALICE], 900_000);
    let e = run.present(token.clone());
    let d = dispatches(&e)[0].clone();
    assert!(matches!(
        run.m.step(
            T0,
            Input::TokenPresented {
                token,
                consumed_nonces: BTreeSet::new()
            }
        ),
        Err(RunError::Unexpected { .. })
    ));
    let wrong_key = Input::StepAnswered {
        host: d.host.clone(),
        step_id: d.step_id.clone(),
        idempotency_key: "other".into(),
        result: StepResult::Succeeded,
    };
    assert!(matches!(
        run.m.step(T0, wrong_key),
        Err(RunError::NotAwaited { .. })
    ));
    let e = run.answer(
        &d,
        StepResult::Permanent {
            reason: ReasonCode::NonZeroExit,
            exit_code: Some(1),
        },
    );
    assert!(finish(&e).is_some());
    assert!(matches!(
        run.m.step(T0, Input::Tick),
        Err(RunError::Finished { .. })
    ));
}

#[test]
fn every_decision_is_recorded_with_a_known_rule_before_its_effect() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &[]);
    run.start_and_probe();
    run.present(run.token(&[ALICE], 600_000));
    let e = run.present(run.token(&[ALICE, BOB], 600_000));
    let mut pending = dispatches(&e);
    while let Some(d) = pending.pop() {
        let e = run.succeed(&d);
        pending.extend(dispatches(&e));
        if !probed_hosts(&e, ProbePurpose::Barrier { phase: 1 }).is_empty() {
            let e = run.reprobe_all(&e, 1, None);
            pending.extend(dispatches(&e));
        }
    }
    assert!(run.m.is_finished());
    for (i, e) in run.all.iter().enumerate() {
        if let Effect::Record(r) = e {
            assert_eq!(r.verdict.is_some(), r.rule.is_some(), "{r:?}");
            if let Some(rule) = r.rule {
                assert!(rules::explain(rule).is_some(), "{rule}");
            }
        }
        let decided = |want: &[Verdict]| {
            run.all[..i]
                .iter()
                .rev()
                .find_map(|x| match x {
                    Effect::Record(r) if r.verdict.is_some() => r.verdict,
                    _ => None,
                })
                .is_some_and(|v| want.contains(&v))
        };
        match e {
            Effect::Dispatch(_) => assert!(decided(&[Verdict::Allow]), "dispatch {i}"),
            Effect::AwaitConfirmation { .. } => assert!(decided(&[Verdict::AwaitConfirmation])),
            Effect::TokenRejected { .. } => assert!(decided(&[Verdict::Block])),
            Effect::ConsumeToken { .. } => assert!(decided(&[Verdict::Allow])),
            Effect::Finish(_) => assert!(decided(&[Verdict::Complete])),
            _ => {}
        }
    }
}

#[test]
fn an_inventory_change_before_execution_ends_the_run() {
    let mut run = Run::new(Action::Teardown, Mode::Full, &["web1"]);
    run.start_and_probe();
    assert_eq!(
        run.step(Input::InventoryChanged {
            hosts: vec!["db1".into()]
        }),
        vec![],
        "not a target: no effect"
    );
    let e = run.step(Input::InventoryChanged {
        hosts: vec!["web1".into()],
    });
    let r = finish(&e).unwrap();
    assert_eq!(
        r.outcome,
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::HostUnknown,
            rule: rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS
        }
    );
    assert_eq!(run.state("web1"), HostState::Unknown);
}

#[test]
fn an_inventory_change_during_execution_stops_the_host_after_its_answer() {
    let mut run = Run::new(Action::Deploy, Mode::Quick, &["web1", "web2"]);
    run.start_and_probe();
    let mut out = Vec::new();
    for h in ["web1", "web2"] {
        out.extend(dispatches(&run.step(Input::CheckAnswered {
            host: h.into(),
            step_id: "install".into(),
            answer: CheckAnswer::NotInDesiredState,
        })));
    }
    assert!(
        run.step(Input::InventoryChanged {
            hosts: vec!["web1".into()]
        })
        .iter()
        .all(|e| !matches!(e, Effect::Dispatch(_) | Effect::Check(_)))
    );
    assert_eq!(run.state("web1"), HostState::Unknown);
    // Its in-flight answer is taken, and then it gets nothing more.
    let e = run.succeed(&out[0]);
    assert!(dispatches(&e).is_empty());
    let e = run.succeed(&out[1]);
    assert!(
        dispatches(&e).is_empty(),
        "the phase had a host go Unknown: containment"
    );
    let r = finish(&e).unwrap();
    assert_eq!(
        host_outcome(&r, "web1"),
        TypedOutcome::PolicyBlocked {
            reason: ReasonCode::HostUnknown,
            rule: rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS
        }
    );
}
