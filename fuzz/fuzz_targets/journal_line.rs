//! Feeds arbitrary bytes to the journal line parser and the timeline verifier. Any panic is a bug;
//! so is a line that parses but does not re-encode to the exact bytes read (the parser promises
//! canonical form), a report that contradicts itself, or an edit of a valid chain that verifies.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate_coordinator::core::timeline::{EventKind, TimelineEvent};
use tollgate_coordinator::journal::chain::{encode, genesis, parse_line, seal, verify};
use uuid::Uuid;

const RUN: Uuid = Uuid::from_u128(0x7011_6a7e);

/// A valid three-line chain for RUN, and its anchor (event count, last hash).
fn chain() -> &'static (Vec<u8>, u64, String) {
    static CHAIN: OnceLock<(Vec<u8>, u64, String)> = OnceLock::new();
    CHAIN.get_or_init(|| {
        let good = build_chain();
        let report = verify(RUN, &good, None);
        assert!(report.ok);
        (good, report.events, report.last_hash)
    })
}

fn build_chain() -> Vec<u8> {
    let mut prev = genesis(RUN);
    let mut out = Vec::new();
    for (seq, kind) in [
        (1, EventKind::RunStarted),
        (2, EventKind::StepDispatched),
        (3, EventKind::RunFinished),
    ] {
        let ev = TimelineEvent::new(1_000 + seq, kind)
            .host("web1")
            .input("n", seq);
        let line = seal(seq, &prev, &ev).expect("seal");
        prev = line.hash.clone();
        out.extend(encode(&line).expect("encode"));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // One line.
    if let Ok(line) = parse_line(data) {
        let mut again = encode(&line).expect("a parsed line encodes");
        assert_eq!(again.pop(), Some(b'\n'));
        assert_eq!(
            again, data,
            "parse_line accepted bytes that are not canonical"
        );
    }
    // A whole timeline.
    let report = verify(RUN, data, None);
    let lines = data.iter().filter(|b| **b == b'\n').count() as u64;
    if report.ok {
        assert!(report.first_bad_line.is_none() && report.problem.is_none());
        // (A file holding a lone newline reads as an empty timeline: 0 events.)
        let expected = if data == b"\n" { 0 } else { lines };
        assert_eq!(
            report.events, expected,
            "ok, but not every line was counted"
        );
    } else {
        let bad = report.first_bad_line.expect("a failed report names a line");
        assert!(bad >= 1 && bad <= lines + 1, "line {bad} of {lines}");
        assert!(report.events < bad);
    }
    // An edit of a valid chain, steered by the input, never verifies against its anchor.
    if data.len() >= 3 {
        let (good, events, last_hash) = chain();
        let pos = usize::from(u16::from_le_bytes([data[0], data[1]])) % good.len();
        let mut edited = good.clone();
        match data[2] % 4 {
            0 => edited[pos] ^= data.get(3).copied().unwrap_or(1).max(1),
            1 => edited.truncate(pos),
            2 => {
                edited.splice(pos..pos, data[3..].iter().copied());
            }
            _ => {
                edited.remove(pos);
            }
        }
        if edited != *good {
            let r = verify(RUN, &edited, Some((*events, last_hash)));
            assert!(
                !r.ok,
                "an edited timeline verified: {:?}",
                String::from_utf8_lossy(&edited)
            );
        }
    }
});
