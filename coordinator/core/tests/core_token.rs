//! Confirmation tokens: issue, verify, and every way verification refuses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use tollgate_core::config::{Authorization, Role};
use tollgate_core::token::{
    Claims, ScopeField, TokenIssuer, TokenRejection, TokenScope, VerifyContext, verify,
};
use tollgate_protocol::Action;
use tollgate_protocol::outcome::ReasonCode;
use uuid::Uuid;

const ALICE: &str = "spiffe://t/operator/alice";
const BOB: &str = "spiffe://t/operator/bob";
const CAROL: &str = "spiffe://t/operator/carol";
const NOW: u64 = 1_700_000_000_000;
const LIFETIME: u64 = 900_000;

fn authz() -> Authorization {
    let mut g = BTreeMap::new();
    g.insert(
        ALICE.to_owned(),
        BTreeSet::from([Role::Operator, Role::Approver]),
    );
    g.insert(BOB.to_owned(), BTreeSet::from([Role::Approver]));
    g.insert(CAROL.to_owned(), BTreeSet::from([Role::Operator]));
    Authorization::new(g)
}

fn issuer() -> TokenIssuer {
    TokenIssuer::from_seed(&[7; 32]).unwrap()
}

fn hosts() -> Vec<String> {
    vec!["db1".into(), "web1".into()]
}

fn claims() -> Claims {
    Claims {
        run_id: Uuid::from_u128(42),
        hosts: hosts(),
        operation_hash: "ab".repeat(32),
        action: Action::Teardown,
        approvers: vec![ALICE.into()],
        issued_at_ms: NOW,
        expires_at_ms: NOW + LIFETIME,
        nonce: [9; 16],
    }
}

struct Check {
    hosts: Vec<String>,
    approvals_required: u8,
    now_ms: u64,
    consumed: BTreeSet<String>,
    authz: Authorization,
    key: Vec<u8>,
}

impl Check {
    fn new() -> Self {
        Check {
            hosts: hosts(),
            approvals_required: 1,
            now_ms: NOW + 1_000,
            consumed: BTreeSet::new(),
            authz: authz(),
            key: issuer().public_key(),
        }
    }

    fn run(&self, token: Option<&str>) -> Result<Claims, TokenRejection> {
        let hash = "ab".repeat(32);
        verify(
            token,
            &TokenScope {
                run_id: Uuid::from_u128(42),
                hosts: &self.hosts,
                operation_hash: &hash,
                action: Action::Teardown,
                approvals_required: self.approvals_required,
                max_lifetime_ms: LIFETIME,
            },
            &VerifyContext {
                now_ms: self.now_ms,
                public_key: &self.key,
                consumed: &self.consumed,
                authorization: &self.authz,
            },
        )
        .map(|v| v.claims)
    }
}

fn sign(c: &Claims) -> String {
    issuer().issue(c).unwrap()
}

#[test]
fn a_token_for_the_exact_plan_verifies_and_survives_a_shell() {
    let token = sign(&claims());
    assert!(token.starts_with("tg1."));
    assert!(
        token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "{token}"
    );
    assert_eq!(Check::new().run(Some(&token)), Ok(claims()));
    assert_eq!(Claims::decode(&claims().encode()), Ok(claims()));
}

#[test]
fn each_refusal_has_its_own_reason() {
    let scope = |field| move |r: &TokenRejection| matches!(r, TokenRejection::ScopeMismatch { field: f, .. } if *f == field);
    type Case = (
        &'static str,
        Box<dyn Fn(&mut Check) -> Option<String>>,
        ReasonCode,
        Box<dyn Fn(&TokenRejection) -> bool>,
    );
    let with = |f: fn(&mut Claims)| {
        move |_: &mut Check| {
            let mut c = claims();
            f(&mut c);
            Some(sign(&c))
        }
    };
    let cases: Vec<Case> = vec![
        (
            "missing",
            Box::new(|_| None),
            ReasonCode::TokenMissing,
            Box::new(|r| *r == TokenRejection::Missing),
        ),
        (
            "blank",
            Box::new(|_| Some("  ".into())),
            ReasonCode::TokenMissing,
            Box::new(|r| *r == TokenRejection::Missing),
        ),
        (
            "garbage",
            Box::new(|_| Some("hello".into())),
            ReasonCode::TokenMalformed,
            Box::new(|r| matches!(r, TokenRejection::Malformed(_))),
        ),
        (
            "bad base64",
            Box::new(|_| Some("tg1.@@@.AAAA".into())),
            ReasonCode::TokenMalformed,
            Box::new(|r| matches!(r, TokenRejection::Malformed(_))),
        ),
        (
            "short signature",
            Box::new(|_| {
                Some(format!(
                    "tg1.{}.AAAA",
                    URL_SAFE_NO_PAD.encode(claims().encode())
                ))
            }),
            ReasonCode::TokenMalformed,
            Box::new(|r| matches!(r, TokenRejection::Malformed(_))),
        ),
        (
            "oversize",
            Box::new(|_| Some(format!("tg1.{}.x", "A".repeat(9000)))),
            ReasonCode::TokenMalformed,
            Box::new(|r| matches!(r, TokenRejection::Malformed(_))),
        ),
        (
            "signed by another key",
            Box::new(|_| {
                Some(
                    TokenIssuer::from_seed(&[8; 32])
                        .unwrap()
                        .issue(&claims())
                        .unwrap(),
                )
            }),
            ReasonCode::TokenSignatureInvalid,
            Box::new(|r| *r == TokenRejection::SignatureInvalid),
        ),
        (
            "claims tampered after signing",
            Box::new(|_| {
                let token = sign(&claims());
                let sig = token.rsplit('.').next().unwrap().to_owned();
                let mut c = claims();
                c.approvers = vec![BOB.into()];
                Some(format!("tg1.{}.{sig}", URL_SAFE_NO_PAD.encode(c.encode())))
            }),
            ReasonCode::TokenSignatureInvalid,
            Box::new(|r| *r == TokenRejection::SignatureInvalid),
        ),
        (
            "another run",
            Box::new(with(|c| c.run_id = Uuid::from_u128(43))),
            ReasonCode::TokenScopeMismatch,
            Box::new(scope(ScopeField::RunId)),
        ),
        (
            "another host set",
            Box::new(with(|c| c.hosts = vec!["web1".into()])),
            ReasonCode::TokenScopeMismatch,
            Box::new(scope(ScopeField::Hosts)),
        ),
        (
            "another plan",
            Box::new(with(|c| c.operation_hash = "cd".repeat(32))),
            ReasonCode::TokenScopeMismatch,
            Box::new(scope(ScopeField::OperationHash)),
        ),
        (
            "another action",
            Box::new(with(|c| c.action = Action::Deploy)),
            ReasonCode::TokenScopeMismatch,
            Box::new(scope(ScopeField::Action)),
        ),
        (
            "too long a lifetime",
            Box::new(with(|c| c.expires_at_ms = c.issued_at_ms + LIFETIME + 1)),
            ReasonCode::TokenScopeMismatch,
            Box::new(scope(ScopeField::Lifetime)),
        ),
        (
            "expired",
            Box::new(|ch| {
                ch.now_ms = NOW + LIFETIME;
                Some(sign(&claims()))
            }),
            ReasonCode::TokenExpired,
            Box::new(|r| matches!(r, TokenRejection::Expired { .. })),
        ),
        (
            "not yet valid",
            Box::new(|ch| {
                ch.now_ms = NOW - 1;
                Some(sign(&claims()))
            }),
            ReasonCode::TokenExpired,
            Box::new(|r| matches!(r, TokenRejection::NotYetValid { .. })),
        ),
        (
            "replayed",
            Box::new(|ch| {
                ch.consumed.insert(hex::encode([9u8; 16]));
                Some(sign(&claims()))
            }),
            ReasonCode::TokenReplayed,
            Box::new(|r| matches!(r, TokenRejection::Replayed { .. })),
        ),
        (
            "approver without the role",
            Box::new(with(|c| c.approvers = vec![CAROL.into()])),
            ReasonCode::ApproverNotAuthorized,
            Box::new(
                |r| matches!(r, TokenRejection::ApproverNotAuthorized { identity } if identity == CAROL),
            ),
        ),
        (
            "approver unknown",
            Box::new(with(|c| {
                c.approvers = vec!["spiffe://t/operator/mallory".into()]
            })),
            ReasonCode::ApproverNotAuthorized,
            Box::new(|r| matches!(r, TokenRejection::ApproverNotAuthorized { .. })),
        ),
        (
            "approver role revoked since issue",
            Box::new(|ch| {
                ch.authz = Authorization::default();
                Some(sign(&claims()))
            }),
            ReasonCode::ApproverNotAuthorized,
            Box::new(|r| matches!(r, TokenRejection::ApproverNotAuthorized { .. })),
        ),
        (
            "one approver where two are required",
            Box::new(|ch| {
                ch.approvals_required = 2;
                Some(sign(&claims()))
            }),
            ReasonCode::ApprovalsInsufficient,
            Box::new(|r| {
                matches!(
                    r,
                    TokenRejection::ApprovalsInsufficient { have: 1, need: 2 }
                )
            }),
        ),
    ];
    for (name, make, reason, shape) in cases {
        let mut check = Check::new();
        let token = make(&mut check);
        let got = check.run(token.as_deref());
        let Err(rejection) = got else {
            panic!("{name}: accepted")
        };
        assert_eq!(rejection.reason(), reason, "{name}: {rejection}");
        assert!(shape(&rejection), "{name}: {rejection:?}");
    }
}

#[test]
fn two_distinct_approvers_satisfy_a_two_approver_plan() {
    let mut c = claims();
    c.approvers = vec![ALICE.into(), BOB.into()];
    let mut check = Check::new();
    check.approvals_required = 2;
    assert!(check.run(Some(&sign(&c))).is_ok());
}

#[test]
fn checks_run_in_the_documented_order() {
    // A forged token for another plan: signature first, its claims are not believed.
    let mut c = claims();
    c.run_id = Uuid::from_u128(1);
    let forged = TokenIssuer::from_seed(&[8; 32]).unwrap().issue(&c).unwrap();
    assert_eq!(
        Check::new().run(Some(&forged)),
        Err(TokenRejection::SignatureInvalid)
    );
    // Another plan and expired: scope first.
    let mut check = Check::new();
    check.now_ms = NOW + 2 * LIFETIME;
    assert!(matches!(
        check.run(Some(&sign(&c))),
        Err(TokenRejection::ScopeMismatch {
            field: ScopeField::RunId,
            ..
        })
    ));
    // Expired and replayed: expiry first.
    check.consumed.insert(hex::encode([9u8; 16]));
    assert!(matches!(
        check.run(Some(&sign(&claims()))),
        Err(TokenRejection::Expired { .. })
    ));
    // Replayed and approver revoked: replay first.
    check.now_ms = NOW + 1;
    check.authz = Authorization::default();
    assert!(matches!(
        check.run(Some(&sign(&claims()))),
        Err(TokenRejection::Replayed { .. })
    ));
    // Approver revoked and too few approvers: roles first.
    check.consumed.clear();
    check.approvals_required = 2;
    assert!(matches!(
        check.run(Some(&sign(&claims()))),
        Err(TokenRejection::ApproverNotAuthorized { .. })
    ));
}

#[test]
fn issuing_refuses_claims_that_break_the_rules() {
    let bad: Vec<fn(&mut Claims)> = vec![
        |c| c.hosts = vec![],
        |c| c.hosts = vec!["web1".into(), "db1".into()],
        |c| c.hosts = vec!["db1".into(), "db1".into()],
        |c| c.approvers = vec![],
        |c| c.approvers = vec![ALICE.into(), ALICE.into()],
        |c| c.approvers = vec![ALICE.into(), BOB.into(), CAROL.into()],
        |c| c.expires_at_ms = c.issued_at_ms,
        |c| c.operation_hash = String::new(),
    ];
    for (i, f) in bad.into_iter().enumerate() {
        let mut c = claims();
        f(&mut c);
        assert!(issuer().issue(&c).is_err(), "case {i}");
    }
    assert!(TokenIssuer::from_pkcs8(b"not a key").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_verifies(text in "\\PC{0,200}", body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let check = Check::new();
        prop_assert!(check.run(Some(&text)).is_err());
        let crafted = format!("tg1.{}.{}", URL_SAFE_NO_PAD.encode(&body), URL_SAFE_NO_PAD.encode([0u8; 64]));
        prop_assert!(check.run(Some(&crafted)).is_err());
    }

    #[test]
    fn any_single_byte_change_of_a_valid_token_is_refused(pos in 0usize..200, delta in 1u8..=255) {
        let token = sign(&claims());
        let mut bytes = token.into_bytes();
        let i = pos % bytes.len();
        bytes[i] = bytes[i].wrapping_add(delta);
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        // Base64 padding bits can absorb a change of the last character; anything that still
        // verifies must then be the very same claims.
        if let Ok(c) = Check::new().run(Some(&changed)) {
            prop_assert_eq!(c, claims());
        }
    }
}
