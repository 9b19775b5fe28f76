//! Confirmation tokens: Ed25519-signed, single-use authorizations for one plan.
//!
//! # Text form
//!
//! `tg1.<base64url-nopad(claims)>.<base64url-nopad(signature)>` — only `[A-Za-z0-9_.-]`, so it
//! survives any shell unquoted. The signature is Ed25519 over the claims bytes.
//!
//! # Claims encoding
//!
//! [`super::canon`] with domain `tollgate/token/v1`, then in order: run id (16 bytes), hosts
//! (list, sorted, unique), operation hash (text), action (text), approvers (list of 1 or 2,
//! sorted, distinct), issued-at ms (`u64`), expires-at ms (`u64`), nonce (16 bytes).
//!
//! # Verification order, and why
//!
//! 1. **parse** (`TokenMissing`, `TokenMalformed`): nothing else can be looked at.
//! 2. **signature** (`TokenSignatureInvalid`): unauthenticated claims are meaningless, so no
//!    field of a forged token is ever compared or reported.
//! 3. **scope** (`TokenScopeMismatch` naming the field): run id, host set, operation hash,
//!    action, and a lifetime no longer than the plan allows. A token for another plan is the
//!    most useful thing to tell an operator, and it does not depend on time.
//! 4. **expiry** (`TokenExpired`): a genuine token for this plan that is too old (or not yet
//!    valid).
//! 5. **replay** (`TokenReplayed`): checked against the consumed-nonce set only for a token that
//!    is otherwise valid now, so an expired or foreign token is reported as such.
//! 6. **approver roles** (`ApproverNotAuthorized`): the authorization table may have changed
//!    since issue; each approver must still hold `approver`.
//! 7. **approval count** (`ApprovalsInsufficient`): as many distinct approvers as the plan needs.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use tollgate_protocol::Action;
use tollgate_protocol::outcome::ReasonCode;
use uuid::Uuid;

use super::canon::{Decoder, Encoder};
use crate::config::{Authorization, Role};

const PREFIX: &str = "tg1";
const DOMAIN: &str = "tollgate/token/v1";
/// Longest token text accepted, checked before decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a token binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The run.
    pub run_id: Uuid,
    /// The exact host set, sorted and unique.
    pub hosts: Vec<String>,
    /// The plan's operation hash.
    pub operation_hash: String,
    /// The action.
    pub action: Action,
    /// One or two distinct approver identities, sorted.
    pub approvers: Vec<String>,
    /// Issue time, unix ms.
    pub issued_at_ms: u64,
    /// Expiry, unix ms (exclusive).
    pub expires_at_ms: u64,
    /// Random nonce chosen by the issuer; makes the token single-use.
    pub nonce: [u8; 16],
}

impl Claims {
    /// The nonce as lowercase hex (the form kept in the consumed set).
    pub fn nonce_hex(&self) -> String {
        hex::encode(self.nonce)
    }

    fn check(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("no hosts".into());
        }
        if self.hosts.windows(2).any(|w| w[0] >= w[1]) {
            return Err("hosts are not sorted and unique".into());
        }
        if !(1..=2).contains(&self.approvers.len()) {
            return Err(format!(
                "{} approvers (1 or 2 allowed)",
                self.approvers.len()
            ));
        }
        if self.approvers.windows(2).any(|w| w[0] >= w[1]) {
            return Err("approvers are not sorted and distinct".into());
        }
        if self.expires_at_ms <= self.issued_at_ms {
            return Err("expires before it is issued".into());
        }
        if self.operation_hash.is_empty() {
            return Err("empty operation hash".into());
        }
        Ok(())
    }

    /// The canonical bytes (the signed message).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(DOMAIN);
        e.bytes(self.run_id.as_bytes())
            .strs(self.hosts.iter().map(String::as_str))
            .str(&self.operation_hash)
            .str(self.action.as_str())
            .strs(self.approvers.iter().map(String::as_str))
            .u64(self.issued_at_ms)
            .u64(self.expires_at_ms)
            .bytes(&self.nonce);
        e.finish()
    }

    /// Decodes and checks canonical bytes.
    pub fn decode(bytes: &[u8]) -> Result<Claims, String> {
        let mut d = Decoder::new(bytes, DOMAIN).map_err(|e| e.to_string())?;
        let run_id = Uuid::from_slice(d.bytes().map_err(|e| e.to_string())?)
            .map_err(|_| "run id is not 16 bytes".to_owned())?;
        let hosts = owned(d.strs("hosts").map_err(|e| e.to_string())?);
        let operation_hash = d
            .str("operation_hash")
            .map_err(|e| e.to_string())?
            .to_owned();
        let action = match d.str("action").map_err(|e| e.to_string())? {
            "deploy" => Action::Deploy,
            "teardown" => Action::Teardown,
            other => return Err(format!("unknown action {other:?}")),
        };
        let approvers = owned(d.strs("approvers").map_err(|e| e.to_string())?);
        let issued_at_ms = d.u64().map_err(|e| e.to_string())?;
        let expires_at_ms = d.u64().map_err(|e| e.to_string())?;
        let nonce: [u8; 16] = d
            .bytes()
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|_| "nonce is not 16 bytes".to_owned())?;
        d.finish().map_err(|e| e.to_string())?;
        let claims = Claims {
            run_id,
            hosts,
            operation_hash,
            action,
            approvers,
            issued_at_ms,
            expires_at_ms,
            nonce,
        };
        claims.check()?;
        Ok(claims)
    }
}

fn owned(v: Vec<&str>) -> Vec<String> {
    v.into_iter().map(str::to_owned).collect()
}

/// Why a token could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The signing key is not a valid Ed25519 key.
    #[error("invalid Ed25519 signing key: {0}")]
    BadKey(String),
    /// The claims break a rule (unsorted hosts, three approvers, ...).
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
}

/// The coordinator's token signer.
#[derive(Debug)]
pub struct TokenIssuer {
    key: Ed25519KeyPair,
}

impl TokenIssuer {
    /// From a PKCS#8 v1/v2 document (what `Ed25519KeyPair::generate_pkcs8` writes).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TokenError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|key| TokenIssuer { key })
            .map_err(|e| TokenError::BadKey(e.to_string()))
    }

    /// From a 32-byte seed (deterministic; for tests and demos).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, TokenError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(|key| TokenIssuer { key })
            .map_err(|e| TokenError::BadKey(e.to_string()))
    }

    /// The public key verifiers need.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// Signs `claims` and returns the text form.
    pub fn issue(&self, claims: &Claims) -> Result<String, TokenError> {
        claims.check().map_err(TokenError::InvalidClaims)?;
        let body = claims.encode();
        let sig = self.key.sign(&body);
        Ok(format!(
            "{PREFIX}.{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

/// A bound field that did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeField {
    /// Another run.
    RunId,
    /// Another host set.
    Hosts,
    /// Another plan.
    OperationHash,
    /// Another action.
    Action,
    /// A lifetime longer than the plan's hosts allow.
    Lifetime,
}

impl ScopeField {
    /// The field's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeField::RunId => "run_id",
            ScopeField::Hosts => "hosts",
            ScopeField::OperationHash => "operation_hash",
            ScopeField::Action => "action",
            ScopeField::Lifetime => "lifetime",
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// No token was presented.
    #[error("no token was presented")]
    Missing,
    /// The text is not a token.
    #[error("not a token: {0}")]
    Malformed(String),
    /// The signature does not verify with the coordinator's key.
    #[error("the signature does not verify")]
    SignatureInvalid,
    /// A bound field differs from the plan's.
    #[error("the token is for another {}: expected {expected}, token has {actual}", field.as_str())]
    ScopeMismatch {
        /// Which field.
        field: ScopeField,
        /// The plan's value.
        expected: String,
        /// The token's value.
        actual: String,
    },
    /// Too old.
    #[error("expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        /// Expiry.
        expires_at_ms: u64,
        /// Now.
        now_ms: u64,
    },
    /// Issued in the future (clock went back, or forged time).
    #[error("not valid before {issued_at_ms} (now {now_ms})")]
    NotYetValid {
        /// Issue time.
        issued_at_ms: u64,
        /// Now.
        now_ms: u64,
    },
    /// Its nonce was already consumed.
    #[error("nonce {nonce} was already used")]
    Replayed {
        /// The nonce, hex.
        nonce: String,
    },
    /// An approver no longer (or never) held the approver role.
    #[error("{identity} does not hold the approver role")]
    ApproverNotAuthorized {
        /// Who.
        identity: String,
    },
    /// Fewer distinct approvers than required.
    #[error("{have} distinct approver(s), {need} required")]
    ApprovalsInsufficient {
        /// Present.
        have: usize,
        /// Required.
        need: u8,
    },
}

impl TokenRejection {
    /// The reason code it is reported with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            TokenRejection::Missing => ReasonCode::TokenMissing,
            TokenRejection::Malformed(_) => ReasonCode::TokenMalformed,
            TokenRejection::SignatureInvalid => ReasonCode::TokenSignatureInvalid,
            TokenRejection::ScopeMismatch { .. } => ReasonCode::TokenScopeMismatch,
            TokenRejection::Expired { .. } | TokenRejection::NotYetValid { .. } => {
                ReasonCode::TokenExpired
            }
            TokenRejection::Replayed { .. } => ReasonCode::TokenReplayed,
            TokenRejection::ApproverNotAuthorized { .. } => ReasonCode::ApproverNotAuthorized,
            TokenRejection::ApprovalsInsufficient { .. } => ReasonCode::ApprovalsInsufficient,
        }
    }
}

/// What a token must match.
#[derive(Debug, Clone, Copy)]
pub struct TokenScope<'a> {
    /// The run.
    pub run_id: Uuid,
    /// The plan's hosts, sorted.
    pub hosts: &'a [String],
    /// The plan's operation hash.
    pub operation_hash: &'a str,
    /// The action.
    pub action: Action,
    /// Distinct approvers required.
    pub approvals_required: u8,
    /// Longest lifetime the plan's hosts allow.
    pub max_lifetime_ms: u64,
}

/// Everything verification needs besides the token and its scope.
#[derive(Debug, Clone, Copy)]
pub struct VerifyContext<'a> {
    /// Now, unix ms.
    pub now_ms: u64,
    /// The coordinator's Ed25519 public key.
    pub public_key: &'a [u8],
    /// Nonces (hex) already consumed.
    pub consumed: &'a BTreeSet<String>,
    /// The current authorization table.
    pub authorization: &'a Authorization,
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Its claims.
    pub claims: Claims,
    /// Its text (kept to re-verify at later barriers).
    pub text: String,
}

/// Steps 1 and 2 only: parses `token` and checks its signature; returns its claims.
pub fn authenticate(token: Option<&str>, public_key: &[u8]) -> Result<Claims, TokenRejection> {
    let text = token.map(str::trim).unwrap_or("");
    if text.is_empty() {
        return Err(TokenRejection::Missing);
    }
    // 1. parse
    if text.len() > MAX_TOKEN_LEN {
        return Err(TokenRejection::Malformed(format!(
            "{} bytes, at most {MAX_TOKEN_LEN}",
            text.len()
        )));
    }
    let mut parts = text.split('.');
    let (Some(PREFIX), Some(body64), Some(sig64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenRejection::Malformed(format!(
            "expected {PREFIX}.<claims>.<signature>"
        )));
    };
    let body = URL_SAFE_NO_PAD
        .decode(body64)
        .map_err(|e| TokenRejection::Malformed(format!("claims: {e}")))?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig64)
        .map_err(|e| TokenRejection::Malformed(format!("signature: {e}")))?;
    if sig.len() != 64 {
        return Err(TokenRejection::Malformed(format!(
            "signature is {} bytes, not 64",
            sig.len()
        )));
    }
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&body, &sig)
        .map_err(|_| TokenRejection::SignatureInvalid)?;
    Claims::decode(&body).map_err(TokenRejection::Malformed)
}

/// Verifies `token` against `scope`, in the documented order.
pub fn verify(
    token: Option<&str>,
    scope: &TokenScope<'_>,
    ctx: &VerifyContext<'_>,
) -> Result<VerifiedToken, TokenRejection> {
    // 1. parse, 2. signature (before any claim is believed)
    let claims = authenticate(token, ctx.public_key)?;
    let text = token.map(str::trim).unwrap_or("");
    // 3. scope
    let mismatch = |field, expected: String, actual: String| {
        Err(TokenRejection::ScopeMismatch {
            field,
            expected,
            actual,
        })
    };
    if claims.run_id != scope.run_id {
        return mismatch(
            ScopeField::RunId,
            scope.run_id.to_string(),
            claims.run_id.to_string(),
        );
    }
    if claims.hosts != scope.hosts {
        return mismatch(
            ScopeField::Hosts,
            scope.hosts.join(","),
            claims.hosts.join(","),
        );
    }
    if claims.operation_hash != scope.operation_hash {
        return mismatch(
            ScopeField::OperationHash,
            scope.operation_hash.to_owned(),
            claims.operation_hash.clone(),
        );
    }
    if claims.action != scope.action {
        return mismatch(
            ScopeField::Action,
            scope.action.to_string(),
            claims.action.to_string(),
        );
    }
    let lifetime = claims.expires_at_ms - claims.issued_at_ms;
    if lifetime > scope.max_lifetime_ms {
        return mismatch(
            ScopeField::Lifetime,
            format!("at most {} ms", scope.max_lifetime_ms),
            format!("{lifetime} ms"),
        );
    }
    // 4. expiry
    if ctx.now_ms >= claims.expires_at_ms {
        return Err(TokenRejection::Expired {
            expires_at_ms: claims.expires_at_ms,
            now_ms: ctx.now_ms,
        });
    }
    if ctx.now_ms < claims.issued_at_ms {
        return Err(TokenRejection::NotYetValid {
            issued_at_ms: claims.issued_at_ms,
            now_ms: ctx.now_ms,
        });
    }
    // 5. replay
    let nonce = claims.nonce_hex();
    if ctx.consumed.contains(&nonce) {
        return Err(TokenRejection::Replayed { nonce });
    }
    // 6. approver roles
    if let Some(identity) = claims
        .approvers
        .iter()
        .find(|a| !ctx.authorization.has_role(a, Role::Approver))
    {
        return Err(TokenRejection::ApproverNotAuthorized {
            identity: identity.clone(),
        });
    }
    // 7. approval count
    if claims.approvers.len() < usize::from(scope.approvals_required) {
        return Err(TokenRejection::ApprovalsInsufficient {
            have: claims.approvers.len(),
            need: scope.approvals_required,
        });
    }
    Ok(VerifiedToken {
        claims,
        text: text.to_owned(),
    })
}
