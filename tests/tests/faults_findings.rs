//! Issue 7's findings: product gaps the fault and abuse suites found, each shown by a test that
//! fails until the product is fixed (see tests/README.md, "Findings"). Kept apart from the suites
//! so that they stay green and this file alone is red.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tollgate_tests::invariants::{Tally, check_settled};
use tollgate_tests::lab::{DEFAULT_HOSTS, Lab};
use tollgate_tests::operations;
use tollgate_tests::seeds::{self, Rng};

/// A run still open (awaiting its token) has no signed summary yet, so nothing anchors the end of
/// its timeline: `runs verify` checks the chain alone, and a clean prefix is a valid chain. The
/// README promises that verify finds any truncation; for open runs it does not, although the
/// coordinator that holds the run open knows its event count and last hash.
///
/// Where: `coordinator/src/service/ctl.rs`, `CtlRequest::RunsVerify`, calls
/// `journal::verify_run_dir`, which anchors only on `summary.json`.
/// Should: verify an open run against the recorder's event count and last hash (or a signed
/// interim anchor), and fail naming the first missing line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_run_timeline_truncated_at_a_line_end() {
    let name = "open_run_timeline_truncated_at_a_line_end";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let lab = Lab::start_with(DEFAULT_HOSTS, &operations::gated(), "", Vec::new())
        .await
        .unwrap();
    let mut t = Tally::default();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);
    let on = *rng.pick(&["web1", "web2", "web1,web2"]);
    let (run, _token, _) = lab.approved_teardown(on).await.unwrap();
    let path = lab.runs_dir().join(&run).join("timeline.jsonl");
    let good = std::fs::read(&path).unwrap();
    let lines: Vec<&[u8]> = good.split_inclusive(|b| *b == b'\n').collect();
    // Every clean prefix: 0 .. n-1 whole lines kept.
    for keep in 0..lines.len() {
        t.repetitions += 1;
        t.tampered += 1;
        std::fs::write(&path, lines[..keep].concat()).unwrap();
        let v = lab.cli("carol", &["runs", "verify", &run]).await.unwrap();
        if v.code == 5 && v.json()["first_bad_line"].is_u64() {
            t.tampered_detected += 1;
        } else {
            t.problems.push(format!(
                "the open run {run} cut to its first {keep} of {} lines verifies: {}",
                lines.len(),
                v.stdout.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
        std::fs::write(&path, &good).unwrap();
    }
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "the timeline of a run awaiting its token cut at each line end in turn",
        seed,
    )
    .unwrap();
}
