//! Pure hash-chain logic over journal lines.

use std::collections::BTreeMap;

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::core::timeline::{EventKind, TimelineEvent, Verdict};

/// One journal line as written. Field order is the serialization order, which the hash covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    pub host: Option<String>,
    pub phase: Option<String>,
    pub step: Option<String>,
    pub decision: Option<String>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub inputs: BTreeMap<String, String>,
    pub prev: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Line {
    /// The event kind this line records, if its name is one this build knows.
    pub fn event_kind(&self) -> Option<EventKind> {
        EventKind::parse(&self.kind)
    }

    /// The decision this line records, if it records one this build knows.
    pub fn verdict(&self) -> Option<Verdict> {
        self.decision.as_deref().and_then(Verdict::parse)
    }
}

/// The `prev` of a run's first line: binds the chain to its run, so lines cannot be moved
/// between runs.
pub fn genesis(run_id: Uuid) -> String {
    hex::encode(Sha256::digest(
        format!("tollgate-timeline-v1:{run_id}").as_bytes(),
    ))
}

fn body_hash(line: &Line) -> Result<String, serde_json::Error> {
    let mut body = line.clone();
    body.hash.clear();
    let bytes = serde_json::to_vec(&body)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Builds the line for `event`, chained after `prev`.
pub fn seal(seq: u64, prev: &str, event: &TimelineEvent) -> Result<Line, serde_json::Error> {
    let mut line = Line {
        seq,
        at_ms: event.at_ms,
        kind: event.kind.as_str().to_string(),
        host: event.host.clone(),
        phase: event.phase.clone(),
        step: event.step.clone(),
        decision: event.verdict.map(|v| v.as_str().to_string()),
        rule: event.rule.map(str::to_string),
        reason: event.reason.map(|r| r.as_str().to_string()),
        inputs: event.inputs.clone(),
        prev: prev.to_string(),
        hash: String::new(),
    };
    line.hash = body_hash(&line)?;
    Ok(line)
}

/// The kind of a signed checkpoint line.
pub const CHECKPOINT: &str = "checkpoint";

/// What a checkpoint's signature covers: the run, the number of lines before it, and the hash
/// of the last of them.
pub fn checkpoint_message(run_id: Uuid, covers: u64, head: &str) -> Vec<u8> {
    format!("tollgate-checkpoint-v1\n{run_id}\n{covers}\n{head}").into_bytes()
}

/// The checkpoint line that ends a batch: line `seq`, chained after `prev` (the hash of line
/// `seq - 1`), signed by the coordinator's key. Anyone with the public key can check that every
/// line before it is what the coordinator wrote; recomputing the chain without the key cannot
/// produce it.
pub fn seal_checkpoint(
    seq: u64,
    prev: &str,
    at_ms: u64,
    run_id: Uuid,
    key: &Ed25519KeyPair,
) -> Result<Line, serde_json::Error> {
    let covers = seq - 1;
    let signature = hex::encode(key.sign(&checkpoint_message(run_id, covers, prev)).as_ref());
    let mut line = Line {
        seq,
        at_ms,
        kind: CHECKPOINT.to_string(),
        host: None,
        phase: None,
        step: None,
        decision: None,
        rule: None,
        reason: None,
        inputs: BTreeMap::from([
            ("covers".to_string(), covers.to_string()),
            ("signature".to_string(), signature),
        ]),
        prev: prev.to_string(),
        hash: String::new(),
    };
    line.hash = body_hash(&line)?;
    Ok(line)
}

fn checkpoint_is_signed(run_id: Uuid, line: &Line, public_key: &[u8]) -> bool {
    let covers = line.seq.saturating_sub(1);
    if line.inputs.get("covers") != Some(&covers.to_string()) {
        return false;
    }
    let Some(sig) = line
        .inputs
        .get("signature")
        .and_then(|s| hex::decode(s).ok())
    else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&checkpoint_message(run_id, covers, &line.prev), &sig)
        .is_ok()
}

/// [`verify`], and authenticity: every checkpoint's signature must verify with `public_key`,
/// and every line must be covered by one. `signed` in the answer is the number of lines up to
/// and including the last valid checkpoint before the first problem: the prefix that the
/// coordinator provably wrote.
pub fn verify_signed(
    run_id: Uuid,
    bytes: &[u8],
    anchor: Option<(u64, &str)>,
    public_key: &[u8],
) -> VerifyReport {
    let chain = verify(run_id, bytes, anchor);
    let mut signed = 0u64;
    let mut signed_hash = genesis(run_id);
    for raw in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .take(chain.events as usize)
    {
        let Ok(line) = parse_line(raw) else { break };
        if line.kind != CHECKPOINT {
            continue;
        }
        if !checkpoint_is_signed(run_id, &line, public_key) {
            let problem = if signed + 1 < line.seq {
                format!(
                    "the checkpoint does not verify with the coordinator's key: one of lines {}-{} is not what the coordinator wrote (edited and the chain recomputed), or the checkpoint was forged",
                    signed + 1,
                    line.seq - 1
                )
            } else {
                "the checkpoint does not verify with the coordinator's key (forged)".to_string()
            };
            return VerifyReport {
                ok: false,
                events: line.seq - 1,
                signed,
                first_bad_line: Some(line.seq),
                problem: Some(problem),
                last_hash: signed_hash,
            };
        }
        signed = line.seq;
        signed_hash = line.hash.clone();
    }
    if chain.ok && signed < chain.events {
        return VerifyReport {
            ok: false,
            events: chain.events,
            signed,
            first_bad_line: Some(signed + 1),
            problem: Some(format!(
                "lines {}-{} are not covered by a signed checkpoint (appended without the coordinator's key, or a batch cut short by a crash)",
                signed + 1,
                chain.events
            )),
            last_hash: signed_hash,
        };
    }
    VerifyReport { signed, ..chain }
}

/// The exact bytes of a line in the file, newline included.
pub fn encode(line: &Line) -> Result<Vec<u8>, serde_json::Error> {
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses one line (without its newline) and checks that it is byte-for-byte what Tollgate
/// writes for that content.
pub fn parse_line(text: &[u8]) -> Result<Line, String> {
    let line: Line =
        serde_json::from_slice(text).map_err(|e| format!("not a journal line: {e}"))?;
    let canonical = serde_json::to_vec(&line).map_err(|e| e.to_string())?;
    if canonical != text {
        return Err("not in canonical form (the bytes were edited)".into());
    }
    Ok(line)
}

/// The result of checking a whole timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    /// Lines that verified before the first problem (all of them when `ok`).
    pub events: u64,
    /// Lines covered by a valid signed checkpoint (only [`verify_signed`] counts them; 0 from
    /// [`verify`]).
    pub signed: u64,
    /// 1-based line of the first problem.
    pub first_bad_line: Option<u64>,
    pub problem: Option<String>,
    /// Hash of the last good line (the genesis value when there is none).
    pub last_hash: String,
}

impl VerifyReport {
    /// What the CLI is told about run `run_id`.
    pub fn to_wire(&self, run_id: Uuid) -> tollgate_protocol::ctl::VerifyReport {
        tollgate_protocol::ctl::VerifyReport {
            run_id,
            ok: self.ok,
            events: self.events,
            first_bad_line: self.first_bad_line,
            problem: self.problem.clone(),
        }
    }
}

/// Checks every line of a timeline: canonical form, sequence, chain and hash. When `anchor`
/// (expected event count and last hash, from the signed summary) is given, a shorter or longer
/// file fails too.
pub fn verify(run_id: Uuid, bytes: &[u8], anchor: Option<(u64, &str)>) -> VerifyReport {
    let mut prev = genesis(run_id);
    let mut count = 0u64;
    let fail = |line: u64, count: u64, prev: &str, problem: String| VerifyReport {
        ok: false,
        events: count,
        signed: 0,
        first_bad_line: Some(line),
        problem: Some(problem),
        last_hash: prev.to_string(),
    };
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        let n = bytes.split(|b| *b == b'\n').count() as u64;
        return fail(
            n,
            0,
            &prev,
            "the last line is incomplete (file truncated mid-line)".into(),
        );
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let pieces: Vec<&[u8]> = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|b| *b == b'\n').collect()
    };
    for (i, raw) in pieces.into_iter().enumerate() {
        let lineno = i as u64 + 1;
        if raw.is_empty() {
            return fail(lineno, count, &prev, "empty line".into());
        }
        let line = match parse_line(raw) {
            Ok(l) => l,
            Err(e) => return fail(lineno, count, &prev, e),
        };
        if line.seq != lineno {
            return fail(
                lineno,
                count,
                &prev,
                format!(
                    "sequence {} where {lineno} was expected (lines deleted or reordered)",
                    line.seq
                ),
            );
        }
        if line.prev != prev {
            return fail(lineno, count, &prev, "prev does not match the previous line's hash (lines deleted, inserted or reordered)".into());
        }
        match body_hash(&line) {
            Ok(h) if h == line.hash => {}
            _ => {
                return fail(
                    lineno,
                    count,
                    &prev,
                    "hash does not match the line's content (the line was edited)".into(),
                );
            }
        }
        prev = line.hash;
        count += 1;
    }
    if let Some((events, last)) = anchor
        && (count != events || prev != last)
    {
        let last_short = &last[..last.len().min(12)];
        let problem = format!(
            "the signed summary records {events} events ending in {last_short}, the file has {count}"
        );
        return fail(count + 1, count, &prev, problem);
    }
    VerifyReport {
        ok: true,
        events: count,
        signed: 0,
        first_bad_line: None,
        problem: None,
        last_hash: prev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::{EventKind, TimelineEvent};

    fn timeline(run: Uuid, n: u64) -> Vec<u8> {
        let mut prev = genesis(run);
        let mut out = Vec::new();
        for seq in 1..=n {
            let ev = TimelineEvent::new(1000 + seq, EventKind::StepDispatched)
                .host("web1")
                .input("step", seq);
            let line = seal(seq, &prev, &ev).unwrap();
            prev = line.hash.clone();
            out.extend(encode(&line).unwrap());
        }
        out
    }

    #[test]
    fn untampered_timeline_verifies() {
        let run = Uuid::from_u128(1);
        let t = timeline(run, 5);
        let r = verify(run, &t, None);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.events, 5);
        let anchored = verify(run, &t, Some((5, &r.last_hash)));
        assert!(anchored.ok);
    }

    #[test]
    fn every_single_byte_edit_is_detected_and_located() {
        let run = Uuid::from_u128(2);
        let t = timeline(run, 3);
        let line_of = |pos: usize| t[..pos].iter().filter(|b| **b == b'\n').count() as u64 + 1;
        for pos in 0..t.len() {
            let mut bad = t.clone();
            bad[pos] ^= 0x01;
            let r = verify(run, &bad, Some((3, &verify(run, &t, None).last_hash)));
            assert!(!r.ok, "edit at byte {pos} went unnoticed");
            if t[pos] != b'\n' {
                assert_eq!(
                    r.first_bad_line,
                    Some(line_of(pos)),
                    "edit at byte {pos}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn deletion_reordering_truncation_and_other_runs_are_detected() {
        let run = Uuid::from_u128(3);
        let t = timeline(run, 4);
        let good = verify(run, &t, None);
        let lines: Vec<&[u8]> = t.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        let join = |ls: &[&[u8]]| {
            ls.iter()
                .flat_map(|l| l.iter().copied().chain([b'\n']))
                .collect::<Vec<u8>>()
        };
        let deleted = join(&[lines[0], lines[2], lines[3]]);
        assert_eq!(verify(run, &deleted, None).first_bad_line, Some(2));
        let reordered = join(&[lines[0], lines[2], lines[1], lines[3]]);
        assert_eq!(verify(run, &reordered, None).first_bad_line, Some(2));
        let cut_mid_line = &t[..t.len() - 10];
        assert!(!verify(run, cut_mid_line, None).ok);
        let last_line_dropped = join(&lines[..3]);
        assert!(
            verify(run, &last_line_dropped, None).ok,
            "a clean prefix is a valid chain on its own"
        );
        assert!(
            !verify(run, &last_line_dropped, Some((4, &good.last_hash))).ok,
            "but not against the signed anchor"
        );
        assert_eq!(
            verify(Uuid::from_u128(99), &t, None).first_bad_line,
            Some(1),
            "chains are bound to their run"
        );
    }
}
