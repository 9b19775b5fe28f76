//! The barrier before a destructive phase: containment, fresh matching re-probes, policy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::collections::{BTreeMap, BTreeSet};

use tollgate_core::barrier::{BarrierDecision, BarrierInput, HostPhaseResult, evaluate_barrier};
use tollgate_core::config::{
    Authorization, ClassTable, ClassTokenPolicy, Inventory, Operations, Role, parse_inventory,
    parse_operations,
};
use tollgate_core::facts::{HostFacts, ProbeFailure, ProbeOutcome};
use tollgate_core::lifecycle::HostState;
use tollgate_core::plan::{Draft, Intent, Plan};
use tollgate_core::policy::{Decision, PolicyConfig, PolicyDecision, Ruling, TokenEvidence};
use tollgate_core::rules;
use tollgate_core::token::{
    Claims, TokenIssuer, TokenRejection, TokenScope, VerifiedToken, VerifyContext, verify,
};
use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

const START: u64 = 1_700_000_000_000;
const NOW: u64 = START + 2_000;
const FRESH: u64 = 30_000;
const ALICE: &str = "spiffe://t/operator/alice";
const BOB: &str = "spiffe://t/operator/bob";

fn config() -> PolicyConfig {
    PolicyConfig {
        tokens: ClassTable {
            disposable: ClassTokenPolicy {
                lifetime_ms: 7_200_000,
                approvers: 1,
            },
            standard: ClassTokenPolicy {
                lifetime_ms: 900_000,
                approvers: 1,
            },
            protected: ClassTokenPolicy {
                lifetime_ms: 600_000,
                approvers: 2,
            },
        },
        freshness_ms: FRESH,
        self_approval: false,
    }
}

fn fp(host: &str) -> String {
    hex::encode(folded(host))
}

/// A stable 32-byte value per host name (stands in for a real facts hash).
fn folded(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in s.bytes().enumerate() {
        out[i % 32] ^= b;
    }
    out
}

fn plan() -> Plan {
    let inv: Inventory =
        parse_inventory(include_str!("../../tests/data/fleet/inventory.toml"), "inv").unwrap();
    let mut ops: Operations = parse_operations(
        include_str!("../../tests/data/fleet/operations.toml"),
        "ops",
    )
    .unwrap();
    ops.resolve_run_files(|_| Ok("rm -rf /opt/app".into()))
        .unwrap();
    let intent = Intent {
        run_id: Uuid::from_u128(9),
        action: Action::Teardown,
        requested_mode: Mode::Full,
        targets: vec![],
        shadow: false,
    };
    let facts = ["db1", "web1", "web2"]
        .iter()
        .map(|h| {
            (
                (*h).to_owned(),
                HostFacts {
                    fingerprint: fp(h),
                    probed_at_ms: START - 10_000,
                    facts: BTreeMap::new(),
                },
            )
        })
        .collect();
    let decision = PolicyDecision {
        effective_mode: Mode::Full,
        run: Ruling {
            decision: Decision::ConfirmationRequired,
            rule: rules::R006_DESTRUCTIVE_NEEDS_CONFIRMATION,
            detail: String::new(),
        },
        hosts: vec![],
        approvals_required: 2,
        token_lifetime_ms: 600_000,
        self_approval: false,
    };
    Draft::new(&intent, &inv, &ops)
        .unwrap()
        .seal(Mode::Full, &facts, &decision, "policy")
        .unwrap()
}

fn token(plan: &Plan, now: u64) -> Result<VerifiedToken, TokenRejection> {
    let issuer = TokenIssuer::from_seed(&[5; 32]).unwrap();
    let text = issuer
        .issue(&Claims {
            run_id: plan.run_id(),
            hosts: plan.host_names(),
            operation_hash: plan.operation_hash().to_owned(),
            action: Action::Teardown,
            approvers: vec![ALICE.into(), BOB.into()],
            issued_at_ms: START - 60_000,
            expires_at_ms: START - 60_000 + 600_000,
            nonce: [1; 16],
        })
        .unwrap();
    let mut g = BTreeMap::new();
    g.insert(ALICE.to_owned(), BTreeSet::from([Role::Approver]));
    g.insert(BOB.to_owned(), BTreeSet::from([Role::Approver]));
    let hosts = plan.host_names();
    verify(
        Some(&text),
        &TokenScope {
            run_id: plan.run_id(),
            hosts: &hosts,
            operation_hash: plan.operation_hash(),
            action: Action::Teardown,
            approvals_required: plan.approvals_required(),
            max_lifetime_ms: plan.token_lifetime_ms(),
        },
        &VerifyContext {
            now_ms: now,
            public_key: &issuer.public_key(),
            consumed: &BTreeSet::new(),
            authorization: &Authorization::new(g),
        },
    )
}

struct World {
    plan: Plan,
    previous: Vec<BTreeMap<String, HostPhaseResult>>,
    reprobes: BTreeMap<String, ProbeOutcome>,
    states: BTreeMap<String, HostState>,
    now: u64,
    token: Option<Result<VerifiedToken, TokenRejection>>,
}

impl World {
    fn good() -> Self {
        let plan = plan();
        let drain = plan
            .phase_hosts(0)
            .into_iter()
            .map(|h| (h.to_owned(), HostPhaseResult::Succeeded))
            .collect();
        let reprobes = plan
            .phase_hosts(1)
            .into_iter()
            .map(|h| {
                (
                    h.to_owned(),
                    ProbeOutcome::Reported(HostFacts {
                        fingerprint: fp(h),
                        probed_at_ms: START + 1_000,
                        facts: BTreeMap::new(),
                    }),
                )
            })
            .collect();
        let states = plan
            .host_names()
            .into_iter()
            .map(|h| (h, HostState::Running))
            .collect();
        let token = Some(token(&plan, NOW));
        World {
            plan,
            previous: vec![drain],
            reprobes,
            states,
            now: NOW,
            token,
        }
    }

    fn decide(&self) -> BarrierDecision {
        let evidence = match &self.token {
            None => TokenEvidence::NotPresented,
            Some(Ok(t)) => TokenEvidence::Verified(t),
            Some(Err(r)) => TokenEvidence::Rejected(r),
        };
        evaluate_barrier(&BarrierInput {
            plan: &self.plan,
            phase: 1,
            previous: &self.previous,
            reprobes: &self.reprobes,
            states: &self.states,
            barrier_started_ms: START,
            now_ms: self.now,
            requested_mode: Mode::Full,
            token: evidence,
            config: &config(),
        })
    }

    fn facts_mut(&mut self, host: &str) -> &mut HostFacts {
        match self.reprobes.get_mut(host) {
            Some(ProbeOutcome::Reported(f)) => f,
            _ => panic!("no facts"),
        }
    }
}

fn block(d: &BarrierDecision) -> (ReasonCode, &'static str, Vec<String>) {
    match d {
        BarrierDecision::Block {
            reason,
            rule,
            hosts,
            ..
        } => (*reason, rule, hosts.clone()),
        BarrierDecision::Allow { .. } => panic!("allowed"),
    }
}

#[test]
fn fresh_matching_reprobes_containment_and_a_valid_token_allow() {
    let w = World::good();
    assert_eq!(
        w.plan.phase_hosts(1),
        BTreeSet::from(["db1", "web1", "web2"])
    );
    let BarrierDecision::Allow { ruling } = w.decide() else {
        panic!("{:?}", w.decide())
    };
    assert_eq!(ruling.rule, rules::R010_ALLOW);
}

#[test]
fn any_doubt_about_any_host_blocks_the_whole_phase_as_stale() {
    type Edit = fn(&mut World, &str);
    let defects: Vec<(&str, Edit)> = vec![
        ("no answer", |w, h| {
            w.reprobes.remove(h);
        }),
        ("unreachable", |w, h| {
            w.reprobes
                .insert(h.into(), ProbeOutcome::Failed(ProbeFailure::Unreachable));
        }),
        ("timed out", |w, h| {
            w.reprobes
                .insert(h.into(), ProbeOutcome::Failed(ProbeFailure::TimedOut));
        }),
        ("malformed", |w, h| {
            w.reprobes.insert(
                h.into(),
                ProbeOutcome::Failed(ProbeFailure::Malformed { detail: "x".into() }),
            );
        }),
        ("no fingerprint", |w, h| w.facts_mut(h).fingerprint.clear()),
        ("drifted", |w, h| {
            w.facts_mut(h).fingerprint = "00".repeat(32)
        }),
        ("taken before the barrier", |w, h| {
            w.facts_mut(h).probed_at_ms = START - 1
        }),
        ("from the future", |w, h| {
            w.facts_mut(h).probed_at_ms = NOW + 1
        }),
        ("too old", |w, _| w.now = START + 1_000 + FRESH + 1),
    ];
    for host in ["db1", "web1", "web2"] {
        for (name, edit) in &defects {
            let mut w = World::good();
            edit(&mut w, host);
            let (reason, rule, hosts) = block(&w.decide());
            assert_eq!(reason, ReasonCode::StalePlan, "{host} {name}");
            assert_eq!(rule, rules::B002_FRESH_MATCHING_REPROBE, "{host} {name}");
            if *name != "too old" {
                assert_eq!(
                    hosts,
                    vec![host.to_owned()],
                    "{host} {name}: the host at fault is named"
                );
            }
        }
    }
}

#[test]
fn containment_comes_first() {
    for bad in [
        HostPhaseResult::Failed,
        HostPhaseResult::Uncertain,
        HostPhaseResult::NotRun,
    ] {
        let mut w = World::good();
        w.previous[0].insert("web2".into(), bad);
        w.reprobes.clear(); // would be stale too; containment is reported first
        let (reason, rule, hosts) = block(&w.decide());
        assert_eq!(
            (reason, rule),
            (ReasonCode::ContainmentFailed, rules::B001_CONTAINMENT)
        );
        assert_eq!(hosts, vec!["web2".to_owned()]);
    }
    let mut w = World::good();
    w.previous.clear();
    assert_eq!(block(&w.decide()).0, ReasonCode::ContainmentFailed);
}

#[test]
fn policy_is_re_evaluated_with_the_fresh_facts_and_the_token() {
    let mut w = World::good();
    w.token = None;
    let (reason, rule, _) = block(&w.decide());
    assert_eq!(
        (reason, rule),
        (ReasonCode::TokenMissing, rules::R007_BARRIER_NEEDS_TOKEN)
    );

    // The same token, checked at a later `now`, has expired.
    let mut w = World::good();
    w.token = Some(token(&w.plan, START - 60_000 + 600_000));
    let (reason, rule, _) = block(&w.decide());
    assert_eq!(
        (reason, rule),
        (ReasonCode::TokenExpired, rules::R008_TOKEN_MUST_VERIFY)
    );

    // A host the run machine holds as Unknown is never allowed, fresh facts or not.
    let mut w = World::good();
    w.states.insert("db1".into(), HostState::Unknown);
    let (reason, rule, hosts) = block(&w.decide());
    assert_eq!(
        (reason, rule),
        (
            ReasonCode::HostUnknown,
            rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS
        )
    );
    assert_eq!(hosts, vec!["db1".to_owned()]);
}
