//! The policy table: every rule, with tokens end to end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::collections::{BTreeMap, BTreeSet};

use tollgate_core::config::{Authorization, ClassTable, ClassTokenPolicy, Role, SafetyClass};
use tollgate_core::facts::HostFacts;
use tollgate_core::lifecycle::HostState;
use tollgate_core::policy::{
    Decision, HostInput, PolicyConfig, PolicyDecision, PolicyInput, Stage, TokenEvidence, evaluate,
    policy_hash,
};
use tollgate_core::rules;
use tollgate_core::token::{
    Claims, TokenIssuer, TokenRejection, TokenScope, VerifiedToken, VerifyContext, verify,
};
use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

const RUN: Uuid = Uuid::from_u128(0x5eed);
const NOW: u64 = 1_700_000_000_000;
const ALICE: &str = "spiffe://t/operator/alice";
const BOB: &str = "spiffe://t/operator/bob";
const CAROL: &str = "spiffe://t/operator/carol";

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
        freshness_ms: 30_000,
        self_approval: false,
    }
}

fn facts() -> HostFacts {
    HostFacts {
        fingerprint: "f0".repeat(32),
        probed_at_ms: NOW,
        facts: BTreeMap::new(),
    }
}

/// A host as policy sees it: Ready with facts, `steps` steps of which `destructive`.
fn host<'a>(
    name: &'a str,
    class: SafetyClass,
    f: &'a HostFacts,
    steps: usize,
    destructive: usize,
) -> HostInput<'a> {
    HostInput {
        name,
        safety_class: class,
        state: HostState::Ready,
        facts: Some(f),
        steps,
        destructive_steps: destructive,
    }
}

fn run(
    stage: Stage,
    mode: Mode,
    hosts: &[HostInput<'_>],
    token: TokenEvidence<'_>,
) -> PolicyDecision {
    evaluate(&PolicyInput {
        stage,
        run_id: RUN,
        action: Action::Teardown,
        requested_mode: mode,
        shadow: false,
        unknown_targets: &[],
        hosts,
        token,
        config: &config(),
    })
}

fn blocked(d: &PolicyDecision) -> Option<ReasonCode> {
    match d.run.decision {
        Decision::Block { reason } => Some(reason),
        _ => None,
    }
}

#[test]
fn quick_never_allows_a_destructive_step_and_names_the_exact_next_command() {
    let f = facts();
    let hosts = [
        host("web2", SafetyClass::Standard, &f, 2, 1),
        host("web1", SafetyClass::Standard, &f, 1, 0),
    ];
    let d = run(
        Stage::Admission,
        Mode::Quick,
        &hosts,
        TokenEvidence::NotPresented,
    );
    assert_eq!(d.effective_mode, Mode::Quick);
    assert_eq!(d.run.rule, rules::R004_QUICK_NEVER_DESTROYS);
    assert_eq!(d.run.reason(), Some(ReasonCode::QuickModeNonDestructive));
    assert_eq!(
        d.run.decision,
        Decision::Escalate {
            next_command: format!("tollgate teardown --mode full --hosts web1,web2 --run {RUN}")
        }
    );
    let per_host: BTreeMap<&str, &str> =
        d.hosts.iter().map(|(h, r)| (h.as_str(), r.rule)).collect();
    assert_eq!(per_host["web2"], rules::R004_QUICK_NEVER_DESTROYS);
    assert_eq!(
        per_host["web1"],
        rules::R010_ALLOW,
        "web1 alone has nothing destructive"
    );
    // Not even a perfectly valid token makes quick mode destroy.
    let token = valid_token(&[ALICE]);
    for stage in [Stage::Admission, Stage::Barrier { phase: 1 }] {
        let d = run(stage, Mode::Quick, &hosts, TokenEvidence::Verified(&token));
        assert!(!d.run.allows(), "{stage:?}");
        assert_eq!(d.run.rule, rules::R004_QUICK_NEVER_DESTROYS);
    }
}

#[test]
fn full_without_anything_destructive_de_escalates_and_records_it() {
    let f = facts();
    let hosts = [host("web1", SafetyClass::Standard, &f, 3, 0)];
    let d = run(
        Stage::Admission,
        Mode::Full,
        &hosts,
        TokenEvidence::NotPresented,
    );
    assert!(d.run.allows());
    assert_eq!(d.effective_mode, Mode::Quick);
    assert_eq!(
        d.run.rule,
        rules::R005_FULL_WITHOUT_DESTRUCTIVE_DE_ESCALATES
    );
    assert_eq!(d.run.reason(), Some(ReasonCode::DeEscalated));
    assert_eq!(d.approvals_required, 0);
}

#[test]
fn full_with_destructive_steps_waits_for_a_token_sized_by_safety_class() {
    let f = facts();
    let cases = [
        (vec![SafetyClass::Standard], 1, 900_000),
        (vec![SafetyClass::Disposable], 1, 7_200_000),
        (
            vec![SafetyClass::Disposable, SafetyClass::Standard],
            1,
            900_000,
        ),
        (
            vec![SafetyClass::Standard, SafetyClass::Protected],
            2,
            600_000,
        ),
    ];
    let names = ["h0", "h1"];
    for (classes, approvers, lifetime) in cases {
        let hosts: Vec<HostInput<'_>> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| host(names[i], *c, &f, 1, 1))
            .collect();
        let d = run(
            Stage::Admission,
            Mode::Full,
            &hosts,
            TokenEvidence::NotPresented,
        );
        assert_eq!(
            d.run.decision,
            Decision::ConfirmationRequired,
            "{classes:?}"
        );
        assert_eq!(d.run.rule, rules::R006_DESTRUCTIVE_NEEDS_CONFIRMATION);
        assert_eq!(d.effective_mode, Mode::Full);
        assert_eq!(d.approvals_required, approvers, "{classes:?}");
        assert_eq!(d.token_lifetime_ms, lifetime, "{classes:?}");
    }
}

#[test]
fn uncertain_data_never_allows_anything() {
    let f = facts();
    let no_fp = HostFacts {
        fingerprint: String::new(),
        ..facts()
    };
    let bad_fp = HostFacts {
        fingerprint: "XYZ".into(),
        ..facts()
    };
    let token = valid_token(&[ALICE, BOB]);
    let doubtful = [
        HostInput {
            state: HostState::Unknown,
            ..host("web1", SafetyClass::Standard, &f, 1, 0)
        },
        HostInput {
            facts: None,
            ..host("web1", SafetyClass::Standard, &f, 1, 0)
        },
        host("web1", SafetyClass::Standard, &no_fp, 1, 0),
        host("web1", SafetyClass::Standard, &bad_fp, 1, 0),
    ];
    for bad in doubtful {
        for (stage, mode, token) in [
            (Stage::Admission, Mode::Quick, TokenEvidence::NotPresented),
            (
                Stage::Admission,
                Mode::Full,
                TokenEvidence::Verified(&token),
            ),
            (
                Stage::Barrier { phase: 0 },
                Mode::Full,
                TokenEvidence::Verified(&token),
            ),
        ] {
            let hosts = [bad, host("web2", SafetyClass::Standard, &f, 1, 1)];
            let d = run(stage, mode, &hosts, token);
            assert_eq!(
                blocked(&d),
                Some(ReasonCode::HostUnknown),
                "{bad:?} {stage:?}"
            );
            assert_eq!(d.run.rule, rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS);
            let web1 = &d.hosts.iter().find(|(h, _)| h == "web1").unwrap().1;
            assert_eq!(web1.rule, rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS);
        }
    }
}

#[test]
fn unknown_targets_and_empty_work_are_decided_by_their_rules() {
    let f = facts();
    let hosts = [host("web1", SafetyClass::Standard, &f, 1, 0)];
    let unknown = vec!["nope".to_owned()];
    let d = evaluate(&PolicyInput {
        stage: Stage::Admission,
        run_id: RUN,
        action: Action::Deploy,
        requested_mode: Mode::Quick,
        shadow: false,
        unknown_targets: &unknown,
        hosts: &hosts,
        token: TokenEvidence::NotPresented,
        config: &config(),
    });
    assert_eq!(blocked(&d), Some(ReasonCode::UnknownHost));
    assert_eq!(d.run.rule, rules::R001_TARGETS_IN_INVENTORY);
    assert!(
        d.hosts
            .iter()
            .any(|(h, r)| h == "nope" && r.rule == rules::R001_TARGETS_IN_INVENTORY)
    );

    let idle = [host("web1", SafetyClass::Standard, &f, 0, 0)];
    let d = run(
        Stage::Admission,
        Mode::Full,
        &idle,
        TokenEvidence::NotPresented,
    );
    assert_eq!(d.run.decision, Decision::NothingToDo);
    assert_eq!(d.run.rule, rules::R003_NOTHING_TO_DO);
}

// --- Tokens end to end: verify, then evaluate at a barrier. -------------------------------

fn authz() -> Authorization {
    let mut g = BTreeMap::new();
    g.insert(ALICE.to_owned(), BTreeSet::from([Role::Approver]));
    g.insert(BOB.to_owned(), BTreeSet::from([Role::Approver]));
    g.insert(CAROL.to_owned(), BTreeSet::from([Role::Operator]));
    Authorization::new(g)
}

const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn claims(approvers: &[&str]) -> Claims {
    Claims {
        run_id: RUN,
        hosts: vec!["db1".into(), "web1".into()],
        operation_hash: HASH.into(),
        action: Action::Teardown,
        approvers: approvers.iter().map(|a| (*a).to_owned()).collect(),
        issued_at_ms: NOW,
        expires_at_ms: NOW + 600_000,
        nonce: [3; 16],
    }
}

fn issuer() -> TokenIssuer {
    TokenIssuer::from_seed(&[1; 32]).unwrap()
}

fn verify_at(
    token: Option<&str>,
    now: u64,
    consumed: &BTreeSet<String>,
    need: u8,
) -> Result<VerifiedToken, TokenRejection> {
    let hosts = vec!["db1".to_owned(), "web1".to_owned()];
    verify(
        token,
        &TokenScope {
            run_id: RUN,
            hosts: &hosts,
            operation_hash: HASH,
            action: Action::Teardown,
            approvals_required: need,
            max_lifetime_ms: 600_000,
        },
        &VerifyContext {
            now_ms: now,
            public_key: &issuer().public_key(),
            consumed,
            authorization: &authz(),
        },
    )
}

fn valid_token(approvers: &[&str]) -> VerifiedToken {
    let text = issuer().issue(&claims(approvers)).unwrap();
    verify_at(Some(&text), NOW + 1, &BTreeSet::new(), 1).unwrap()
}

/// Verifies `token` (as the run machine does at a barrier) and evaluates policy with it.
fn barrier(
    token: Option<&str>,
    now: u64,
    consumed: &BTreeSet<String>,
    classes: [SafetyClass; 2],
) -> PolicyDecision {
    let f = facts();
    let hosts = [
        host("db1", classes[0], &f, 1, 1),
        host("web1", classes[1], &f, 1, 1),
    ];
    // The token check the run machine does needs the plan's approvals; policy re-checks them.
    let checked = token.map(|t| verify_at(Some(t), now, consumed, 1));
    let evidence = match &checked {
        None => TokenEvidence::NotPresented,
        Some(Ok(v)) => TokenEvidence::Verified(v),
        Some(Err(r)) => TokenEvidence::Rejected(r),
    };
    run(Stage::Barrier { phase: 1 }, Mode::Full, &hosts, evidence)
}

#[test]
fn a_barrier_blocks_every_bad_token_with_its_own_reason() {
    let sign = |c: &Claims| issuer().issue(c).unwrap();
    let std2 = [SafetyClass::Standard, SafetyClass::Standard];
    let good = sign(&claims(&[ALICE]));
    let mut consumed = BTreeSet::new();
    consumed.insert(hex::encode([3u8; 16]));
    let changed = |f: fn(&mut Claims)| {
        let mut c = claims(&[ALICE]);
        f(&mut c);
        sign(&c)
    };
    let other_key = TokenIssuer::from_seed(&[2; 32])
        .unwrap()
        .issue(&claims(&[ALICE]))
        .unwrap();
    type Case = (
        &'static str,
        Option<String>,
        u64,
        BTreeSet<String>,
        ReasonCode,
    );
    let cases: Vec<Case> = vec![
        (
            "no token",
            None,
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenMissing,
        ),
        (
            "expired",
            Some(good.clone()),
            NOW + 600_000,
            BTreeSet::new(),
            ReasonCode::TokenExpired,
        ),
        (
            "run id changed",
            Some(changed(|c| c.run_id = Uuid::from_u128(1))),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenScopeMismatch,
        ),
        (
            "host set changed",
            Some(changed(|c| c.hosts = vec!["db1".into()])),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenScopeMismatch,
        ),
        (
            "operation hash changed",
            Some(changed(|c| c.operation_hash = "ff".repeat(32))),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenScopeMismatch,
        ),
        (
            "action changed",
            Some(changed(|c| c.action = Action::Deploy)),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenScopeMismatch,
        ),
        (
            "approver changed to a non-approver",
            Some(changed(|c| c.approvers = vec![CAROL.into()])),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::ApproverNotAuthorized,
        ),
        (
            "replayed",
            Some(good.clone()),
            NOW + 1,
            consumed,
            ReasonCode::TokenReplayed,
        ),
        (
            "signed by another key",
            Some(other_key),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenSignatureInvalid,
        ),
        (
            "not a token",
            Some("tg1.nope".into()),
            NOW + 1,
            BTreeSet::new(),
            ReasonCode::TokenMalformed,
        ),
    ];
    let mut reasons = BTreeSet::new();
    for (name, token, now, consumed, want) in cases {
        let d = barrier(token.as_deref(), now, &consumed, std2);
        assert_eq!(blocked(&d), Some(want), "{name}: {:?}", d.run);
        let rule = if want == ReasonCode::TokenMissing {
            rules::R007_BARRIER_NEEDS_TOKEN
        } else {
            rules::R008_TOKEN_MUST_VERIFY
        };
        assert_eq!(d.run.rule, rule, "{name}");
        assert!(
            d.hosts.iter().all(|(_, r)| !r.allows()),
            "{name}: every host is blocked"
        );
        reasons.insert(want);
    }
    assert_eq!(
        reasons.len(),
        7,
        "each kind of failure has its own reason code"
    );
    // And the good token passes.
    let d = barrier(Some(&good), NOW + 1, &BTreeSet::new(), std2);
    assert!(d.run.allows(), "{:?}", d.run);
    assert_eq!(d.run.rule, rules::R010_ALLOW);
}

#[test]
fn protected_hosts_need_two_distinct_approvers() {
    let classes = [SafetyClass::Protected, SafetyClass::Standard];
    let one = issuer().issue(&claims(&[ALICE])).unwrap();
    let d = barrier(Some(&one), NOW + 1, &BTreeSet::new(), classes);
    assert_eq!(blocked(&d), Some(ReasonCode::ApprovalsInsufficient));
    assert_eq!(d.run.rule, rules::R009_APPROVALS_SUFFICIENT);
    let per_host: BTreeMap<&str, bool> = d
        .hosts
        .iter()
        .map(|(h, r)| (h.as_str(), r.allows()))
        .collect();
    assert!(!per_host["db1"], "the protected host is blocked");
    assert!(per_host["web1"], "the standard host alone would pass");
    let two = issuer().issue(&claims(&[ALICE, BOB])).unwrap();
    assert!(
        barrier(Some(&two), NOW + 1, &BTreeSet::new(), classes)
            .run
            .allows()
    );
}

#[test]
fn the_policy_hash_covers_every_setting_and_nothing_else() {
    let base = policy_hash(&config());
    assert_eq!(base, policy_hash(&config()));
    assert_eq!(base.len(), 64);
    let variants: Vec<fn(&mut PolicyConfig)> = vec![
        |c| c.freshness_ms += 1,
        |c| c.tokens.protected.approvers = 1,
        |c| c.tokens.disposable.lifetime_ms += 1,
        |c| c.tokens.standard.lifetime_ms -= 1,
        |c| c.tokens.standard.approvers = 2,
    ];
    let mut seen = BTreeSet::from([base]);
    for f in variants {
        let mut c = config();
        f(&mut c);
        assert!(
            seen.insert(policy_hash(&c)),
            "every change gives a new hash"
        );
    }
}
