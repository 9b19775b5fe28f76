//! The tamper suite (SPEC §7, issue 12): the attacker has every file of the state directory
//! but not the coordinator's signing key. Recomputed hash chains, forged summaries, swapped,
//! renamed and deleted run directories, and lines appended to a consistent chain: each is
//! detected, with the line or the file named, across a coordinator restart, and the run id is
//! never reused. `runs verify --dir --key` gives the same verdict offline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tollgate_coordinator::journal::chain::{Line, encode, parse_line};
use tollgate_tests::lab::{CliOut, DEFAULT_HOSTS, Lab};

/// A completed quick deploy of one host: its run id.
async fn deployed(lab: &Lab, host: &str) -> String {
    let run = uuid::Uuid::new_v4().to_string();
    let out = lab
        .cli("alice", &["deploy", "--hosts", host, "--run", &run])
        .await
        .unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    run
}

fn timeline(lab: &Lab, run: &str) -> PathBuf {
    lab.runs_dir().join(run).join("timeline.jsonl")
}

fn lines(path: &Path) -> Vec<Line> {
    std::fs::read(path)
        .unwrap()
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| parse_line(l).unwrap())
        .collect()
}

/// Writes `lines` back with every `prev` and `hash` recomputed, exactly as the journal writer
/// hashes (SHA-256 over the line's JSON without its `hash`): what an attacker without the key
/// can do.
fn rechain(path: &Path, run: &str, mut lines: Vec<Line>) {
    let mut prev = hex::encode(Sha256::digest(
        format!("tollgate-timeline-v1:{run}").as_bytes(),
    ));
    let mut out = Vec::new();
    for l in &mut lines {
        l.prev = prev.clone();
        l.hash.clear();
        let body = serde_json::to_vec(&*l).unwrap();
        l.hash = hex::encode(Sha256::digest(&body));
        out.extend(encode(l).unwrap());
        prev = l.hash.clone();
    }
    std::fs::write(path, out).unwrap();
}

fn public_key(lab: &Lab) -> PathBuf {
    lab.runs_dir().parent().unwrap().join("token-signing.pub")
}

async fn verify(lab: &Lab, run: &str) -> CliOut {
    lab.cli("carol", &["runs", "verify", run]).await.unwrap()
}

async fn verify_offline(lab: &Lab, run: &str) -> CliOut {
    let dir = lab.runs_dir().join(run);
    let key = public_key(lab);
    lab.cli(
        "carol",
        &[
            "runs",
            "verify",
            "--dir",
            dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
    .await
    .unwrap()
}

async fn restart(lab: &mut Lab) {
    lab.serve.as_mut().unwrap().kill().await.unwrap();
    lab.start_serve().await.unwrap();
}

/// The id is never reused: a deploy under it is refused with `code`.
async fn not_reusable(lab: &Lab, run: &str, code: &str) {
    let out = lab
        .cli("alice", &["deploy", "--hosts", "web1", "--run", run])
        .await
        .unwrap();
    assert_eq!(out.json()["code"], code, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edit_without_the_key_is_detected_and_named() {
    let mut lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    let intact = deployed(&lab, "web1").await;
    let recomputed = deployed(&lab, "web2").await;
    let forged_summary = deployed(&lab, "db1").await;
    let appended = deployed(&lab, "web1").await;
    let (swap_a, swap_b) = (deployed(&lab, "web2").await, deployed(&lab, "db1").await);
    let renamed = deployed(&lab, "web1").await;
    let deleted = deployed(&lab, "web2").await;
    for r in [&intact, &recomputed, &forged_summary, &appended, &renamed] {
        let v = verify_offline(&lab, r).await;
        assert_eq!(v.code, 0, "offline verify of an untouched run: {v:?}");
    }

    // 1. A decision edited, the chain recomputed, summary.json deleted.
    let path = timeline(&lab, &recomputed);
    let mut ls = lines(&path);
    let edited = ls
        .iter()
        .position(|l| l.kind == "policy_evaluated")
        .unwrap();
    ls[edited].decision = Some("block".into());
    rechain(&path, &recomputed, ls);
    std::fs::remove_file(lab.runs_dir().join(&recomputed).join("summary.json")).unwrap();
    let v = verify_offline(&lab, &recomputed).await;
    assert_eq!(v.code, 5, "{v:?}");
    let bad = v.json()["first_bad_line"].as_u64().unwrap();
    assert!(
        bad > edited as u64 + 1,
        "the checkpoint after the edited line {} is named: {v:?}",
        edited + 1
    );
    let problem = v.json()["problem"].as_str().unwrap().to_string();
    let range = problem
        .split("lines ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or_else(|| panic!("no line range in {problem:?}"));
    assert!(
        range.0 <= edited + 1 && edited < range.1,
        "the range {range:?} holds the edited line {}: {v:?}",
        edited + 1
    );

    // 2. summary.json's outcome edited (the anchor untouched).
    let sp = lab.runs_dir().join(&forged_summary).join("summary.json");
    let text = std::fs::read_to_string(&sp).unwrap();
    std::fs::write(&sp, text.replace("\"Completed\"", "\"PolicyBlocked\"")).unwrap();
    let v = verify_offline(&lab, &forged_summary).await;
    assert_eq!(v.code, 5, "{v:?}");
    assert!(
        v.json()["problem"]
            .as_str()
            .unwrap()
            .contains("summary.json"),
        "{v:?}"
    );

    // 3. A line appended to a consistent chain (hash and prev right, no signature).
    let path = timeline(&lab, &appended);
    let mut ls = lines(&path);
    let n = ls.len();
    let mut forged = ls[n - 2].clone();
    forged.seq = n as u64 + 1;
    ls.push(forged);
    rechain(&path, &appended, ls);
    std::fs::remove_file(lab.runs_dir().join(&appended).join("summary.json")).unwrap();
    let v = verify_offline(&lab, &appended).await;
    assert_eq!(
        (v.code, v.json()["first_bad_line"].as_u64()),
        (5, Some(n as u64 + 1)),
        "the forged line itself is named, not one past the end: {v:?}"
    );

    // 4. Two run directories swapped, 5. one renamed to a fresh id, 6. one deleted.
    let (da, db) = (lab.runs_dir().join(&swap_a), lab.runs_dir().join(&swap_b));
    let tmp = lab.runs_dir().join("swap-tmp");
    std::fs::rename(&da, &tmp).unwrap();
    std::fs::rename(&db, &da).unwrap();
    std::fs::rename(&tmp, &db).unwrap();
    let planted = uuid::Uuid::new_v4().to_string();
    std::fs::rename(lab.runs_dir().join(&renamed), lab.runs_dir().join(&planted)).unwrap();
    std::fs::remove_dir_all(lab.runs_dir().join(&deleted)).unwrap();

    restart(&mut lab).await;

    let v = verify(&lab, &intact).await;
    assert_eq!(v.code, 0, "an untouched run still verifies: {v:?}");
    for r in [&recomputed, &appended] {
        let v = verify(&lab, r).await;
        assert_eq!(v.code, 5, "{r}: {v:?}");
        assert!(
            v.json()["problem"]
                .as_str()
                .unwrap()
                .contains("quarantined"),
            "{r}: unsigned lines were quarantined, not adopted: {v:?}"
        );
        assert!(
            lab.runs_dir()
                .join(r)
                .join("timeline.quarantined.jsonl")
                .exists()
        );
    }
    let v = verify(&lab, &forged_summary).await;
    assert_eq!(
        v.code,
        5,
        "{v:?}\n{}",
        std::fs::read_to_string(
            lab.runs_dir()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("coordinator.log")
        )
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&forged_summary))
        .collect::<Vec<_>>()
        .join("\n")
    );
    for r in [&swap_a, &swap_b] {
        let v = verify(&lab, r).await;
        assert_eq!(
            (v.code, v.json()["first_bad_line"].as_u64()),
            (5, Some(1)),
            "a swapped directory fails at its first line (chains are bound to their run): {v:?}"
        );
    }
    for r in [&renamed, &deleted] {
        let v = verify(&lab, r).await;
        assert_eq!(
            (v.code, v.json()["code"].as_str()),
            (5, Some("RunMissing")),
            "{r}: a deleted or renamed run is missing, not unknown: {v:?}"
        );
    }
    // No damaged id is ever reused, whatever the files say.
    for r in [&recomputed, &forged_summary, &appended] {
        not_reusable(&lab, r, "RunNotReusable").await;
    }
    for r in [&swap_a, &swap_b, &planted] {
        not_reusable(&lab, r, "RunUnreadable").await;
    }
    for r in [&renamed, &deleted] {
        not_reusable(&lab, r, "RunMissing").await;
    }
    // A second restart reads the same (quarantine is not re-done, nothing is re-signed).
    restart(&mut lab).await;
    for r in [&recomputed, &appended] {
        assert_eq!(verify(&lab, r).await.code, 5);
    }
    assert_eq!(verify(&lab, &intact).await.code, 0);
    let v = verify_offline(&lab, &intact).await;
    assert_eq!(v.code, 0, "{v:?}");
}
