//! Issue 7, part two: abuse and tampering. Tokens replayed, with one bit flipped, for another
//! plan, expired (the coordinator's clock moved through `TOLLGATE_CLOCK_OFFSET_FILE`), approvals
//! from identities without the approver role and from revoked certificates, and timelines edited,
//! cut and reordered. These need no network faults, so they run on the loopback lab (real agents,
//! real `tollgate serve`, the CLI) and need no root. Choices (hosts, bits, lines, times) come from
//! a printed seed; `TOLLGATE_FAULT_SEED` replays them.
//!
//! The invariants are the namespace suite's (`tollgate_tests::invariants::{check_run,
//! check_settled}`): a refused token starts nothing at all; no step begins twice; every answer is
//! typed; `runs verify` passes on every untampered run and fails, naming a line, on every
//! tampered one.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use tollgate_certs::pki::RevokeTarget;
use tollgate_certs::{Role, SpiffeId};
use tollgate_tests::fleet::FLEET;
use tollgate_tests::invariants::{Tally, check_run, check_settled, is_typed};
use tollgate_tests::lab::{CliOut, DEFAULT_HOSTS, Lab};
use tollgate_tests::operations;
use tollgate_tests::seeds::{self, Rng};

async fn lab_with(extra: &str, env: Vec<(&'static str, String)>) -> Lab {
    Lab::start_with(DEFAULT_HOSTS, &operations::gated(), extra, env)
        .await
        .unwrap()
}

async fn lab() -> Lab {
    lab_with("", Vec::new()).await
}

fn hosts(lab: &Lab) -> Vec<String> {
    lab.agents.keys().cloned().collect()
}

/// A random non-empty set of the lab's hosts, comma-separated and sorted.
fn some_hosts(rng: &mut Rng, lab: &Lab) -> String {
    let all = hosts(lab);
    let mask = 1 + rng.below((1 << all.len()) - 1);
    all.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, h)| h.clone())
        .collect::<Vec<_>>()
        .join(",")
}

fn began_total(b: &BTreeMap<(String, String), usize>) -> usize {
    b.values().sum()
}

/// Presents `token` for `run` and checks that it was refused for one of `reasons` and that
/// nothing at all began on any host.
async fn refused(lab: &Lab, t: &mut Tally, run: &str, token: &str, reasons: &[&str]) -> CliOut {
    let before = lab.markers();
    let out = lab
        .cli("alice", &["execute", run, "--token", token])
        .await
        .unwrap();
    t.runs += 1;
    if is_typed(&out) {
        t.typed += 1;
    } else {
        t.problems.push(format!("{run}: untyped answer {out:?}"));
    }
    let reason = out.reason();
    t.note(format!("{} ({reason})", out.outcome()));
    if out.outcome() != "PolicyBlocked" || !reasons.contains(&reason.as_str()) {
        t.problems.push(format!(
            "{run}: expected PolicyBlocked {reasons:?}, got {out:?}"
        ));
    }
    let began = lab.markers().began_since(&before);
    if began_total(&began) != 0 {
        t.problems
            .push(format!("{run}: a refused token started steps: {began:?}"));
    }
    check_run(t, &lab.runs_dir(), run, &began, &hosts(lab));
    out
}

/// Presents the genuine token: completes, with `remove` beginning exactly once on each host.
async fn completes(lab: &Lab, t: &mut Tally, run: &str, token: &str, on: &str) {
    let before = lab.markers();
    let out = lab
        .cli("alice", &["execute", run, "--token", token])
        .await
        .unwrap();
    t.runs += 1;
    if is_typed(&out) {
        t.typed += 1;
    }
    t.note(out.outcome());
    if out.code != 0 {
        t.problems.push(format!(
            "{run}: the genuine token did not complete: {out:?}"
        ));
    }
    let began = lab.markers().began_since(&before);
    for h in on.split(',') {
        let n = began.get(&(h.to_string(), "remove".to_string())).copied();
        if n != Some(1) {
            t.problems
                .push(format!("{run}: remove began {n:?} times on {h}"));
        }
    }
    check_run(t, &lab.runs_dir(), run, &began, &[]);
}

fn ok(out: &CliOut) -> bool {
    out.code == 0
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_replayed() {
    let name = "token_replayed";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let mut lab = lab().await;
    let mut t = Tally::default();
    assert!(ok(&lab.cli("alice", &["deploy"]).await.unwrap()));
    for _ in 0..3 {
        t.repetitions += 1;
        let on = some_hosts(&mut rng, &lab);
        let (run, token, _) = lab.approved_teardown(&on).await.unwrap();
        completes(&lab, &mut t, &run, &token, &on).await;
        refused(&lab, &mut t, &run, &token, &["TokenReplayed"]).await;
    }
    // Consumed nonces survive a crash: replay after SIGKILL and restart.
    t.repetitions += 1;
    let on = some_hosts(&mut rng, &lab);
    let (run, token, _) = lab.approved_teardown(&on).await.unwrap();
    completes(&lab, &mut t, &run, &token, &on).await;
    lab.serve.as_mut().unwrap().kill().await.unwrap();
    lab.start_serve().await.unwrap();
    refused(&lab, &mut t, &run, &token, &["TokenReplayed"]).await;
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "a consumed token presented again to its run, 3 times, and once more after the coordinator was SIGKILLed and restarted",
        seed,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_one_bit_flipped() {
    let name = "token_with_one_bit_flipped";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let lab = lab().await;
    let mut t = Tally::default();
    assert!(ok(&lab.cli("alice", &["deploy"]).await.unwrap()));
    let on = some_hosts(&mut rng, &lab);
    let (run, token, _) = lab.approved_teardown(&on).await.unwrap();
    for _ in 0..40 {
        t.repetitions += 1;
        let mut bytes = token.clone().into_bytes();
        let i = usize::try_from(rng.below(bytes.len() as u64)).unwrap();
        // Bits 0-5 keep the text printable ASCII without NUL, so it reaches the coordinator.
        bytes[i] ^= 1 << rng.below(6);
        let flipped = String::from_utf8(bytes).unwrap();
        refused(
            &lab,
            &mut t,
            &run,
            &flipped,
            &["TokenMalformed", "TokenSignatureInvalid"],
        )
        .await;
    }
    completes(&lab, &mut t, &run, &token, &on).await;
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "40 copies of a genuine token, each with one random bit (0-5) of one random character flipped, presented before the genuine one",
        seed,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_another_operation_hash() {
    let name = "token_for_another_operation_hash";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let lab = lab().await;
    let mut t = Tally::default();
    assert!(ok(&lab.cli("alice", &["deploy"]).await.unwrap()));
    for i in 0..3 {
        t.repetitions += 1;
        let on = some_hosts(&mut rng, &lab);
        let drifted = on.split(',').next().unwrap().to_string();
        // Plan B: the same hosts, one fingerprint changed, so another operation hash. A host
        // belongs to one open run at a time, so A is cancelled before B is planned; then A's
        // genuine token meets B, and B's meets the closed A.
        let (run_a, token_a, hash_a) = lab.approved_teardown(&on).await.unwrap();
        // Approving A with another hash issues nothing.
        let a = lab
            .cli(
                "bob",
                &["approve", &run_a, "--operation-hash", &"0".repeat(64)],
            )
            .await
            .unwrap();
        if a.code != 4 || a.json()["token"].is_string() {
            t.problems
                .push(format!("approval with another plan's hash: {a:?}"));
        }
        let c = lab.cli("erin", &["cancel", &run_a]).await.unwrap();
        if c.reason() != "Cancelled" {
            t.problems.push(format!("cancel of {run_a}: {c:?}"));
        }
        lab.set_fact(&drifted, &format!(r#"{{"app_version":"2.{i}"}}"#))
            .unwrap();
        let (run_b, token_b, hash_b) = lab.approved_teardown(&on).await.unwrap();
        assert_ne!(hash_a, hash_b, "a changed fingerprint changes the hash");
        // B's token for A, A's for B.
        refused(&lab, &mut t, &run_a, &token_b, &["TokenScopeMismatch"]).await;
        refused(&lab, &mut t, &run_b, &token_a, &["TokenScopeMismatch"]).await;
        // B's own token still works (its hosts probe as planned).
        completes(&lab, &mut t, &run_b, &token_b, &on).await;
        lab.set_fact(&drifted, r#"{"app_version":"1.0"}"#).unwrap();
    }
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "a genuine token of plan B (same hosts, one fingerprint changed) presented to run A and vice versa; A approved with B's hash",
        seed,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expired() {
    let name = "token_expired";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("clock-offset-ms");
    std::fs::write(&clock, "0").unwrap();
    let lab = lab_with(
        "[tokens]\nlifetime = \"10m\"\n",
        vec![("TOLLGATE_CLOCK_OFFSET_FILE", clock.display().to_string())],
    )
    .await;
    let mut t = Tally::default();
    assert!(ok(&lab.cli("alice", &["deploy"]).await.unwrap()));
    for _ in 0..3 {
        t.repetitions += 1;
        let on = some_hosts(&mut rng, &lab);
        let (run, token, _) = lab.approved_teardown(&on).await.unwrap();
        // Past expiry: 10 min + 1 ms .. 1 h later.
        let later = 600_000 + 1 + rng.below(3_000_000);
        std::fs::write(&clock, later.to_string()).unwrap();
        refused(&lab, &mut t, &run, &token, &["TokenExpired"]).await;
        // Before issue (a clock set back): not yet valid, reported as expired.
        let earlier = -(1 + i64::try_from(rng.below(3_600_000)).unwrap());
        std::fs::write(&clock, earlier.to_string()).unwrap();
        refused(&lab, &mut t, &run, &token, &["TokenExpired"]).await;
        // Back to the present, the same token is valid: time was the only reason.
        std::fs::write(&clock, "0").unwrap();
        completes(&lab, &mut t, &run, &token, &on).await;
    }
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "coordinator clock moved (TOLLGATE_CLOCK_OFFSET_FILE) past a 10 min token's expiry by a random 0-50 min, and back before its issue time; then to the present",
        seed,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_without_the_approver_role() {
    let name = "approval_without_the_approver_role";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    // erin: the lab's operator certificate without the approver role.
    let lab = lab().await;
    let mut t = Tally::default();
    assert!(ok(&lab.cli("alice", &["deploy"]).await.unwrap()));
    for _ in 0..3 {
        t.repetitions += 1;
        let on = some_hosts(&mut rng, &lab);
        let run = uuid::Uuid::new_v4().to_string();
        let out = lab
            .cli(
                "erin",
                &["teardown", "--mode", "full", "--hosts", &on, "--run", &run],
            )
            .await
            .unwrap();
        assert_eq!(out.outcome(), "ConfirmationRequired", "{out:?}");
        let hash = out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
            .as_str()
            .unwrap()
            .to_string();
        let before = lab.markers();
        for who in ["erin", "carol", "dave"] {
            let a = lab
                .cli(who, &["approve", &run, "--operation-hash", &hash])
                .await
                .unwrap();
            t.note(format!("approve by {who}: exit {}", a.code));
            if a.code != 4 || a.json()["token"].is_string() {
                t.problems
                    .push(format!("{who} (no approver role) approved: {a:?}"));
            }
        }
        let began = lab.markers().began_since(&before);
        if began_total(&began) != 0 {
            t.problems
                .push(format!("{run}: refused approvals started steps: {began:?}"));
        }
        // The genuine approvers still can, and an operator without approver may execute.
        let mut token = None;
        for who in ["alice", "bob"] {
            let a = lab
                .cli(who, &["approve", &run, "--operation-hash", &hash])
                .await
                .unwrap();
            if let Some(tk) = a.json()["token"].as_str() {
                token = Some(tk.to_string());
                break;
            }
        }
        let token = token.unwrap();
        // A viewer may not execute even with a valid token.
        let v = lab
            .cli("carol", &["execute", &run, "--token", &token])
            .await
            .unwrap();
        if v.code != 4 {
            t.problems
                .push(format!("a viewer executed with a valid token: {v:?}"));
        }
        let before = lab.markers();
        let out = lab
            .cli("erin", &["execute", &run, "--token", &token])
            .await
            .unwrap();
        t.runs += 1;
        if is_typed(&out) && out.code == 0 {
            t.typed += 1;
        } else {
            t.problems
                .push(format!("{run}: approved execution by erin: {out:?}"));
        }
        let began = lab.markers().began_since(&before);
        check_run(&mut t, &lab.runs_dir(), &run, &began, &[]);
    }
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "approval of a full teardown asked of an operator without the approver role (erin), a viewer (carol) and an identity with no role (dave); a viewer executing with a valid token",
        seed,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates() {
    let name = "revoked_certificates";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let mut lab = lab().await;
    let mut t = Tally::default();
    assert!(ok(&lab.cli("alice", &["deploy"]).await.unwrap()));
    // An approver's certificate revoked: the coordinator refuses the connection, approves nothing.
    t.repetitions += 1;
    let bob = SpiffeId::new(FLEET, Role::Operator, Some("bob")).unwrap();
    lab.pki.pki.revoke(&RevokeTarget::Identity(bob)).unwrap();
    lab.serve.as_mut().unwrap().kill().await.unwrap();
    lab.start_serve().await.unwrap();
    let run = uuid::Uuid::new_v4().to_string();
    let out = lab
        .cli(
            "erin",
            &[
                "teardown", "--mode", "full", "--hosts", "db1", "--run", &run,
            ],
        )
        .await
        .unwrap();
    let hash = out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let a = lab
        .cli("alice", &["approve", &run, "--operation-hash", &hash])
        .await
        .unwrap();
    assert_eq!(
        a.code, 12,
        "db1 is protected: a second approver is needed: {a:?}"
    );
    let before = lab.markers();
    let b = lab
        .cli("bob", &["approve", &run, "--operation-hash", &hash])
        .await
        .unwrap();
    t.note(format!("revoked approver: exit {}", b.code));
    if b.code != 3 || b.json()["token"].is_string() {
        t.problems
            .push(format!("a revoked approver was heard: {b:?}"));
    }
    let began = lab.markers().began_since(&before);
    if began_total(&began) != 0 {
        t.problems.push(format!("steps began: {began:?}"));
    }
    // An agent's certificate revoked: the coordinator refuses that agent; nothing runs there.
    t.repetitions += 1;
    let victim = rng.pick(&["web1", "web2"]).to_string();
    let id = SpiffeId::agent(FLEET, &victim).unwrap();
    lab.pki.pki.revoke(&RevokeTarget::Identity(id)).unwrap();
    lab.serve.as_mut().unwrap().kill().await.unwrap();
    lab.start_serve().await.unwrap();
    let before = lab.markers();
    let run = uuid::Uuid::new_v4().to_string();
    let out = lab
        .cli(
            "alice",
            &[
                "teardown", "--mode", "full", "--hosts", &victim, "--run", &run,
            ],
        )
        .await
        .unwrap();
    t.runs += 1;
    if is_typed(&out) && out.code != 0 {
        t.typed += 1;
        t.note(format!(
            "revoked agent: {} ({})",
            out.outcome(),
            out.reason()
        ));
    } else {
        t.problems
            .push(format!("teardown of a revoked agent: {out:?}"));
    }
    let began = lab.markers().began_since(&before);
    if began_total(&began) != 0 {
        t.problems
            .push(format!("steps began on a revoked agent: {began:?}"));
    }
    check_run(&mut t, &lab.runs_dir(), &run, &began, &hosts(&lab));
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "an approver's certificate revoked (CRL re-signed, coordinator restarted) before the second approval of a protected host; a random agent's certificate revoked before its teardown",
        seed,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tampering
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Tamper {
    ByteEdited,
    LineDeleted,
    LinesSwapped,
    TruncatedMidLine,
    TruncatedAtLineEnd,
}

const TAMPERS: &[Tamper] = &[
    Tamper::ByteEdited,
    Tamper::LineDeleted,
    Tamper::LinesSwapped,
    Tamper::TruncatedMidLine,
    Tamper::TruncatedAtLineEnd,
];

fn tamper(rng: &mut Rng, how: Tamper, good: &[u8]) -> Vec<u8> {
    let lines: Vec<&[u8]> = good
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let n = lines.len() as u64;
    assert!(n >= 2, "a timeline has at least two lines");
    let idx = |rng: &mut Rng, below: u64| usize::try_from(rng.below(below)).unwrap();
    let join = |ls: &[&[u8]]| {
        ls.iter()
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect::<Vec<u8>>()
    };
    match how {
        Tamper::ByteEdited => {
            let mut b = good.to_vec();
            let i = idx(rng, b.len() as u64);
            b[i] ^= 1 + u8::try_from(rng.below(255)).unwrap();
            b
        }
        Tamper::LineDeleted => {
            let i = idx(rng, n);
            let mut ls = lines.clone();
            ls.remove(i);
            join(&ls)
        }
        Tamper::LinesSwapped => {
            let i = idx(rng, n - 1);
            let j = i + 1 + idx(rng, n - 1 - i as u64);
            let mut ls = lines.clone();
            ls.swap(i, j);
            join(&ls)
        }
        Tamper::TruncatedMidLine => {
            // Anywhere but just after a newline.
            loop {
                let cut = 1 + idx(rng, good.len() as u64 - 1);
                if good[cut - 1] != b'\n' {
                    return good[..cut].to_vec();
                }
            }
        }
        Tamper::TruncatedAtLineEnd => {
            let keep = idx(rng, n);
            join(&lines[..keep])
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_tampering() {
    let name = "timeline_tampering";
    let seed = seeds::scenario_seed(name);
    let mut rng = Rng::new(seed);
    let lab = lab().await;
    let mut t = Tally::default();
    // Finished runs of every kind: a deploy, a completed teardown, a blocked teardown, an
    // escalation.
    let mut runs = Vec::new();
    let d = lab.cli("alice", &["deploy"]).await.unwrap();
    runs.push(d.json()["run_id"].as_str().unwrap().to_string());
    let (run, token, _) = lab.approved_teardown("web1").await.unwrap();
    assert!(ok(&lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap()));
    runs.push(run);
    let (run, token, _) = lab.approved_teardown("web2").await.unwrap();
    lab.set_fact("web2", r#"{"app_version":"9"}"#).unwrap();
    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(out.reason(), "StalePlan", "{out:?}");
    runs.push(run);
    let e = lab
        .cli("alice", &["teardown", "--hosts", "db1"])
        .await
        .unwrap();
    assert_eq!(e.code, 10, "{e:?}");
    runs.push(e.json()["run_id"].as_str().unwrap().to_string());

    for run in &runs {
        let path = lab.runs_dir().join(run).join("timeline.jsonl");
        let good = std::fs::read(&path).unwrap();
        for how in TAMPERS {
            for _ in 0..2 {
                t.repetitions += 1;
                let bad = tamper(&mut rng, *how, &good);
                assert_ne!(bad, good);
                std::fs::write(&path, &bad).unwrap();
                let v = lab.cli("carol", &["runs", "verify", run]).await.unwrap();
                t.tampered += 1;
                let line = v.json()["first_bad_line"].as_u64();
                if v.code == 5 && v.json()["ok"] == false && line.is_some() {
                    t.tampered_detected += 1;
                } else {
                    t.problems
                        .push(format!("{run}: {how:?} went unnoticed or unlocated: {v:?}"));
                }
                std::fs::write(&path, &good).unwrap();
            }
        }
    }
    check_settled(&lab, &mut t).await.unwrap();
    t.finish(
        name,
        "timelines of 4 finished runs (deploy, completed teardown, blocked teardown, escalation), each: one byte edited, one line deleted, two lines swapped, truncated mid-line, truncated at a line end (random positions, 2 of each)",
        seed,
    )
    .unwrap();
}
