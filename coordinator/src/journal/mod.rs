//! The run journal: `runs/RUN_ID/timeline.jsonl`.
//!
//! One JSON object per line, in order, each with a sequence number, the time, the event kind,
//! host/phase/step, the decision with its rule and reason, the inputs that led to it, and a hash
//! chain: `prev` is the previous line's `hash` (the first line's `prev` is a genesis value bound
//! to the run id), and `hash` is SHA-256 over the line's own JSON without the `hash` field.
//! Lines are appended and fsynced before the action they record takes effect.
//!
//! [`chain`] is pure (bytes in, verdicts out) and is what `tollgate runs verify` and the fuzz
//! target call; [`writer`] owns the file.

pub mod chain;
pub mod index;
pub mod summary;
pub mod writer;

pub use chain::{Line, VerifyReport, genesis, verify, verify_signed};

/// Where start-up moves timeline lines that no valid signed checkpoint covers.
pub const QUARANTINE_FILE: &str = "timeline.quarantined.jsonl";
pub use writer::{Journal, JournalError};

use std::path::Path;

/// Verifies `dir/timeline.jsonl` against the signed anchor in `dir/summary.json` (when the run
/// is closed). `public_key` is the coordinator's token/summary key.
pub fn verify_run_dir(dir: &Path, run_id: uuid::Uuid, public_key: &[u8]) -> VerifyReport {
    verify_run_dir_open(dir, run_id, public_key, None)
}

/// Like [`verify_run_dir`]; for a run still open, `open_head` is the event count and last hash
/// the recorder holds, so a timeline cut at a line boundary is caught too. A run with neither a
/// head nor a signed summary cannot have its end checked and does not verify.
pub fn verify_run_dir_open(
    dir: &Path,
    run_id: uuid::Uuid,
    public_key: &[u8],
    open_head: Option<(u64, String)>,
) -> VerifyReport {
    let not_ok = |problem: String| VerifyReport {
        ok: false,
        events: 0,
        signed: 0,
        first_bad_line: None,
        problem: Some(problem),
        last_hash: String::new(),
    };
    let bytes = match std::fs::read(dir.join(Journal::FILE)) {
        Ok(b) => b,
        Err(e) => return not_ok(format!("{}: {e}", dir.join(Journal::FILE).display())),
    };
    verify_run_bytes(dir, run_id, &bytes, public_key, open_head)
}

/// [`verify_run_dir_open`] over timeline bytes already read, so a caller that goes on to use
/// the lines uses exactly the bytes that were verified (one read, no window between two).
pub fn verify_run_bytes(
    dir: &Path,
    run_id: uuid::Uuid,
    bytes: &[u8],
    public_key: &[u8],
    open_head: Option<(u64, String)>,
) -> VerifyReport {
    let not_ok = |problem: String| VerifyReport {
        ok: false,
        events: 0,
        signed: 0,
        first_bad_line: None,
        problem: Some(problem),
        last_hash: String::new(),
    };
    // A run this coordinator holds open is anchored by its live head (an escalated run that was
    // re-submitted still has the summary of its first part until it finishes again).
    let quarantine = dir.join(QUARANTINE_FILE);
    if quarantine.exists() {
        return not_ok(format!(
            "lines of this timeline were not covered by a valid signed checkpoint at a coordinator start and were quarantined in {} (the run was closed as tampered)",
            quarantine.display()
        ));
    }
    if let Some((events, last)) = open_head {
        return verify_signed(run_id, bytes, Some((events, last.as_str())), public_key);
    }
    // The lines first, so a damaged line is named even when the summary is damaged too.
    let lines = verify_signed(run_id, bytes, None, public_key);
    if !lines.ok {
        return lines;
    }
    let anchor = match std::fs::read(dir.join("summary.json")) {
        Err(_) => {
            let mut r = verify_signed(run_id, bytes, None, public_key);
            if r.ok {
                r.ok = false;
                r.problem = Some(
                    "the run has no signed summary and this coordinator holds no head for it: the end of its timeline cannot be checked"
                        .into(),
                );
            }
            return r;
        }
        Ok(s) => match serde_json::from_slice::<summary::Summary>(&s) {
            Err(e) => return not_ok(format!("summary.json is unreadable: {e}")),
            Ok(s) if s.run_id != run_id => {
                return not_ok("summary.json belongs to another run".into());
            }
            Ok(s) => {
                if !summary::is_signed(&s, public_key) {
                    return not_ok(
                        "summary.json is not signed as a whole by this coordinator (a field was edited, or it was written without the key)".into(),
                    );
                }
                if !summary::anchor_is_signed(public_key, run_id, &s.timeline) {
                    return not_ok(
                        "summary.json's timeline anchor is not signed by this coordinator".into(),
                    );
                }
                Some((s.timeline.events, s.timeline.last_hash))
            }
        },
    };
    verify_signed(
        run_id,
        bytes,
        anchor.as_ref().map(|(n, h)| (*n, h.as_str())),
        public_key,
    )
}

/// What a journal line means to the run ledger ([`crate::core::ledger::fact_of`]): the edge
/// where the wire form of a line becomes the core's plain data.
pub fn ledger_fact(line: &Line) -> crate::core::ledger::JournalFact {
    crate::core::ledger::fact_of(
        line.event_kind(),
        line.verdict() == Some(crate::core::timeline::Verdict::Allow),
        &line.inputs,
        line.at_ms,
    )
}
