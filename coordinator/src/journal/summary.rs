//! `runs/RUN_ID/summary.json`: what a run was asked, what was decided and why, how each host
//! ended, and a signed anchor of the timeline (event count and last hash) so that a truncated
//! or rewritten timeline fails `tollgate runs verify`. Its JSON Schema is
//! `coordinator/schema/summary.schema.json`.

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use tollgate_protocol::outcome::RunReport;
use uuid::Uuid;

use super::chain::Line;

pub const SCHEMA_ID: &str = "tollgate.summary/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub schema: String,
    pub run_id: Uuid,
    pub action: String,
    pub requestor: String,
    pub requested_mode: String,
    pub effective_mode: String,
    pub shadow: bool,
    pub outcome: OutcomeDoc,
    pub decisions: Vec<DecisionDoc>,
    pub hosts: Vec<HostDoc>,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub timeline: Anchor,
    /// Hex Ed25519 signature over the whole document ([`signed_bytes`]): editing any field
    /// (outcome, requester, decisions, hosts) is detected.
    #[serde(default)]
    pub signature: String,
}

/// What the whole-document signature covers: the summary serialized compactly (field order
/// is the struct's) with `signature` empty.
pub fn signed_bytes(doc: &Summary) -> Vec<u8> {
    let mut body = doc.clone();
    body.signature.clear();
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Signs `doc` as a whole.
pub fn sign(mut doc: Summary, key: &Ed25519KeyPair) -> Summary {
    doc.signature = hex::encode(key.sign(&signed_bytes(&doc)).as_ref());
    doc
}

/// Whether `doc` is signed, as a whole, by `public_key`.
pub fn is_signed(doc: &Summary, public_key: &[u8]) -> bool {
    let Ok(sig) = hex::decode(&doc.signature) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed_bytes(doc), &sig)
        .is_ok()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeDoc {
    pub kind: String,
    pub reason: String,
    pub rule: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionDoc {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    pub host: Option<String>,
    pub step: Option<String>,
    pub decision: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDoc {
    pub host: String,
    pub lifecycle: String,
    pub outcome: String,
    pub reason: String,
    pub detail: String,
    pub facts: std::collections::BTreeMap<String, String>,
}

/// The signed anchor of a timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub file: String,
    pub events: u64,
    pub last_hash: String,
    /// Hex Ed25519 signature by the coordinator over [`anchor_message`].
    pub signature: String,
}

/// What the anchor signature covers.
pub fn anchor_message(run_id: Uuid, events: u64, last_hash: &str) -> Vec<u8> {
    format!("tollgate-summary-v1\n{run_id}\n{events}\n{last_hash}").into_bytes()
}

pub fn sign_anchor(key: &Ed25519KeyPair, run_id: Uuid, events: u64, last_hash: &str) -> Anchor {
    let sig = key.sign(&anchor_message(run_id, events, last_hash));
    Anchor {
        file: super::Journal::FILE.to_string(),
        events,
        last_hash: last_hash.to_string(),
        signature: hex::encode(sig.as_ref()),
    }
}

/// Checks the anchor's signature with the coordinator's public key.
pub fn anchor_is_signed(public_key: &[u8], run_id: Uuid, anchor: &Anchor) -> bool {
    let Ok(sig) = hex::decode(&anchor.signature) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(
            &anchor_message(run_id, anchor.events, &anchor.last_hash),
            &sig,
        )
        .is_ok()
}

/// Builds the summary of a finished run.
pub fn build(
    report: &RunReport,
    requestor: &str,
    shadow: bool,
    decisions: &[Line],
    started_ms: u64,
    finished_ms: u64,
    anchor: Anchor,
) -> Summary {
    Summary {
        schema: SCHEMA_ID.to_string(),
        run_id: report.run_id,
        action: report.action.to_string(),
        requestor: requestor.to_string(),
        requested_mode: report.requested_mode.to_string(),
        effective_mode: report.effective_mode.to_string(),
        shadow,
        outcome: OutcomeDoc {
            kind: report.outcome.kind().to_string(),
            reason: report.reason.to_string(),
            rule: report.rule.clone(),
            detail: report.detail.clone(),
        },
        decisions: decisions
            .iter()
            .filter_map(|l| {
                Some(DecisionDoc {
                    seq: l.seq,
                    at_ms: l.at_ms,
                    kind: l.kind.clone(),
                    host: l.host.clone(),
                    step: l.step.clone(),
                    decision: l.decision.clone()?,
                    rule: l.rule.clone(),
                    reason: l.reason.clone(),
                })
            })
            .collect(),
        hosts: report
            .hosts
            .iter()
            .map(|h| HostDoc {
                host: h.host.clone(),
                lifecycle: h.lifecycle.clone(),
                outcome: h.outcome.kind().to_string(),
                reason: h.reason.to_string(),
                detail: h.detail.clone(),
                facts: h.facts.clone(),
            })
            .collect(),
        started_ms,
        finished_ms,
        timeline: anchor,
        signature: String::new(),
    }
}
