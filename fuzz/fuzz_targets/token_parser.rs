//! Feeds arbitrary text to the confirmation-token parser and verifier, and arbitrary bytes to the
//! claims decoder. Any panic (an overflow, a slice out of range, an unwrap) is a bug; so is a
//! token that verifies without having been signed by the coordinator's key, and a signed token
//! whose claims do not read back exactly as they were issued.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate_coordinator::config::{Authorization, Role};
use tollgate_coordinator::core::token::{
    Claims, TokenIssuer, TokenScope, VerifyContext, authenticate, verify,
};
use tollgate_protocol::Action;
use uuid::Uuid;

struct Fixture {
    issuer: TokenIssuer,
    public_key: Vec<u8>,
    authorization: Authorization,
    consumed: BTreeSet<String>,
    hosts: Vec<String>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let issuer = TokenIssuer::from_seed(&[7; 32]).expect("fixed seed");
        let public_key = issuer.public_key();
        let mut grants = BTreeMap::new();
        grants.insert(
            "spiffe://fuzz/operator/alice".to_string(),
            BTreeSet::from([Role::Approver, Role::Operator]),
        );
        Fixture {
            issuer,
            public_key,
            authorization: Authorization::new(grants),
            consumed: BTreeSet::from(["00".repeat(16)]),
            hosts: vec!["web1".to_string(), "web2".to_string()],
        }
    })
}

fn check(text: &str, f: &Fixture) -> Result<(), tollgate_coordinator::core::token::TokenRejection> {
    let scope = TokenScope {
        run_id: Uuid::from_u128(1),
        hosts: &f.hosts,
        operation_hash: "ab",
        action: Action::Teardown,
        approvals_required: 1,
        max_lifetime_ms: 900_000,
    };
    let ctx = VerifyContext {
        now_ms: 1_700_000_000_000,
        public_key: &f.public_key,
        consumed: &f.consumed,
        authorization: &f.authorization,
    };
    verify(Some(text), &scope, &ctx).map(|_| ())
}

/// Claims built from arbitrary bytes (most of them valid), so the verifier's later steps run on
/// genuinely signed tokens every time, not only when the fuzzer finds the canonical encoding.
fn claims_from(data: &[u8]) -> Option<(Claims, u64)> {
    let mut it = data.iter().copied();
    let mut take = |n: usize| -> Vec<u8> { (&mut it).take(n).collect() };
    let word = |b: Vec<u8>| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    let run_id = Uuid::from_u128(u128::from(word(take(2))));
    let flags = word(take(1));
    let names = ["db1", "web1", "web2", "web3"];
    let pick = |mask: u64, of: &[&str]| -> Vec<String> {
        of.iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, s)| s.to_string())
            .collect()
    };
    let hosts = pick(word(take(1)), &names);
    let approvers = pick(
        word(take(1)),
        &[
            "spiffe://fuzz/operator/alice",
            "spiffe://fuzz/operator/bob",
            "spiffe://fuzz/operator/carol",
        ],
    );
    let issued_at_ms = 1_700_000_000_000 + word(take(3));
    let expires_at_ms = issued_at_ms + word(take(3));
    let now_ms = 1_700_000_000_000 + word(take(4));
    let mut nonce = [0u8; 16];
    nonce[0] = word(take(1)) as u8 & 1;
    let claims = Claims {
        run_id,
        hosts,
        operation_hash: if flags & 1 == 0 {
            "ab".into()
        } else {
            "cd".into()
        },
        action: if flags & 2 == 0 {
            Action::Teardown
        } else {
            Action::Deploy
        },
        approvers,
        issued_at_ms,
        expires_at_ms,
        nonce,
    };
    Some((claims, now_ms))
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // A genuinely signed token for claims steered by the input: every check of verify runs, and
    // whatever it accepts really satisfies every rule.
    if let Some((claims, now_ms)) = claims_from(data)
        && let Ok(token) = f.issuer.issue(&claims)
    {
        let back =
            authenticate(Some(&token), &f.public_key).expect("a token we signed authenticates");
        assert_eq!(back, claims);
        let scope = TokenScope {
            run_id: Uuid::from_u128(1),
            hosts: &f.hosts,
            operation_hash: "ab",
            action: Action::Teardown,
            approvals_required: 1,
            max_lifetime_ms: 900_000,
        };
        let ctx = VerifyContext {
            now_ms,
            public_key: &f.public_key,
            consumed: &f.consumed,
            authorization: &f.authorization,
        };
        if let Ok(v) = verify(Some(&token), &scope, &ctx) {
            let c = &v.claims;
            assert_eq!(c.run_id, scope.run_id);
            assert_eq!(c.hosts, *scope.hosts);
            assert_eq!(c.operation_hash, scope.operation_hash);
            assert_eq!(c.action, scope.action);
            assert!(
                c.issued_at_ms <= now_ms && now_ms < c.expires_at_ms,
                "accepted outside its lifetime"
            );
            assert!(c.expires_at_ms - c.issued_at_ms <= scope.max_lifetime_ms);
            assert!(
                !f.consumed.contains(&c.nonce_hex()),
                "accepted a consumed nonce"
            );
            assert!(
                c.approvers.iter().all(|a| a.ends_with("/alice")),
                "accepted a non-approver"
            );
        }
    }
    // Arbitrary text: never accepted (nothing here was signed by the fixture's key, except by
    // forging Ed25519), never a panic.
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(
            authenticate(Some(text), &f.public_key).is_err(),
            "unsigned text authenticated: {text:?}"
        );
        assert!(check(text, f).is_err());
    }
    // Arbitrary claims bytes: decode, and when they decode, sign them and read them back.
    if let Ok(claims) = Claims::decode(data) {
        assert_eq!(
            claims.encode(),
            data,
            "claims decode but do not re-encode to the same bytes"
        );
        let token = f
            .issuer
            .issue(&claims)
            .expect("decoded claims are valid claims");
        let back =
            authenticate(Some(&token), &f.public_key).expect("a token we signed authenticates");
        assert_eq!(back, claims);
        // Every verification step runs on a genuinely signed token; it must answer, not panic.
        let _ = check(&token, f);
        // One bit flipped anywhere in the text is never accepted.
        let mut bytes = token.into_bytes();
        let i = data.len() % bytes.len();
        bytes[i] ^= 1 << (data.len() % 7);
        if let Ok(flipped) = String::from_utf8(bytes) {
            assert!(
                authenticate(Some(&flipped), &f.public_key).is_err(),
                "a token with one bit flipped authenticated: {flipped:?}"
            );
        }
    }
});
