//! Shadow mode (SPEC §8): the whole pipeline decides, records and answers as usual, and nothing
//! is executed on any host. Steps append to marker files, so "nothing ran" is read from the hosts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tollgate_tests::lab::{CliOut, DEFAULT_HOSTS, Lab};

/// The timeline of the run that answered `out`, one JSON value per line.
fn timeline(lab: &Lab, out: &CliOut) -> Vec<serde_json::Value> {
    let run = out.json()["run_id"].as_str().unwrap().to_string();
    std::fs::read_to_string(lab.runs_dir().join(&run).join("timeline.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(lab: &Lab, out: &CliOut) -> serde_json::Value {
    let run = out.json()["run_id"].as_str().unwrap().to_string();
    serde_json::from_slice(&std::fs::read(lab.runs_dir().join(&run).join("summary.json")).unwrap())
        .unwrap()
}

fn count(events: &[serde_json::Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_deploy_decides_everything_and_runs_nothing() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    let out = lab.cli("alice", &["deploy", "--shadow"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    assert_eq!(
        lab.ran_anywhere("prepare") + lab.ran_anywhere("install"),
        0,
        "a shadow run executes nothing"
    );
    let events = timeline(&lab, &out);
    // Every host was really probed, and every step was decided and recorded as dispatched.
    assert_eq!(count(&events, "probe_reported"), 3, "{events:#?}");
    assert!(
        events
            .iter()
            .filter(|e| e["kind"] == "probe_reported")
            .all(|e| e["inputs"]["failure"].is_null()),
        "{events:#?}"
    );
    assert_eq!(count(&events, "step_dispatched"), 6, "2 steps x 3 hosts");
    assert_eq!(count(&events, "step_reported"), 6);
    let s = summary(&lab, &out);
    assert_eq!(s["shadow"], true, "{s}");
    assert_eq!(lab.validate_summaries().unwrap(), 1);

    // The same deploy for real runs each step once on each host: shadow left nothing behind
    // that would make the real run skip or replay anything.
    let shadow_run = out.json()["run_id"].as_str().unwrap().to_string();
    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(out.outcome(), "Completed", "{out:?}");
    for h in ["web1", "web2", "db1"] {
        assert_eq!(
            (lab.ran(h, "prepare"), lab.ran(h, "install")),
            (1, 1),
            "{h}"
        );
    }
    assert_eq!(summary(&lab, &out)["shadow"], false);
    let real_run = out.json()["run_id"].as_str().unwrap().to_string();

    // Parity: the shadow run took exactly the decisions the real one took.
    let d = lab
        .cli("carol", &["runs", "diff", &shadow_run, &real_run])
        .await
        .unwrap();
    assert_eq!(
        (d.code, d.json()["parity"].as_bool()),
        (0, Some(true)),
        "{d:?}"
    );
    assert!(d.json()["decisions_a"].as_u64().unwrap() >= 10, "{d:?}");
    assert_eq!(d.json()["decisions_a"], d.json()["decisions_b"]);

    // A run over fewer hosts differs, and the diff names the host where they part.
    let partial = lab
        .cli("alice", &["deploy", "--shadow", "--hosts", "web1,web2"])
        .await
        .unwrap();
    let partial_run = partial.json()["run_id"].as_str().unwrap().to_string();
    let d = lab
        .cli("carol", &["runs", "diff", &real_run, &partial_run])
        .await
        .unwrap();
    assert_eq!(
        (d.code, d.json()["parity"].as_bool()),
        (6, Some(false)),
        "{d:?}"
    );
    let diffs = d.json()["differences"].as_array().unwrap().clone();
    assert!(
        diffs
            .iter()
            .any(|x| x["scope"] == "db1" && x["index"] == 1 && x["b"].is_null()),
        "{diffs:#?}"
    );
    assert!(
        diffs
            .iter()
            .all(|x| x["scope"] != "web1" && x["scope"] != "web2"),
        "web1 and web2 decided the same in both: {diffs:#?}"
    );

    // A tampered timeline is not compared.
    let tl = lab.runs_dir().join(&real_run).join("timeline.jsonl");
    let text = std::fs::read_to_string(&tl).unwrap();
    std::fs::write(&tl, text.replacen("\"allow\"", "\"block\"", 1)).unwrap();
    let d = lab
        .cli("carol", &["runs", "diff", &shadow_run, &real_run])
        .await
        .unwrap();
    assert_eq!(
        (d.code, d.json()["parity"].as_bool()),
        (5, Some(false)),
        "{d:?}"
    );
    assert!(
        d.json()["problem"].as_str().unwrap().contains(&real_run),
        "{d:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_teardown_still_needs_its_token_and_passes_its_barrier_without_destroying() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    let submit = |run: String| {
        let lab = &lab;
        async move {
            let args = [
                "teardown",
                "--mode",
                "full",
                "--hosts",
                "web1,web2",
                "--run",
                &run,
                "--shadow",
            ];
            lab.cli("erin", &args).await.unwrap()
        }
    };
    // Without a token, a shadow run is blocked exactly like a real one.
    let first = uuid::Uuid::new_v4().to_string();
    let out = submit(first.clone()).await;
    assert_eq!(out.outcome(), "ConfirmationRequired", "{out:?}");
    let blocked = lab
        .cli("alice", &["execute", &first, "--token", ""])
        .await
        .unwrap();
    assert_eq!(
        (blocked.outcome().as_str(), blocked.reason().as_str()),
        ("PolicyBlocked", "TokenMissing"),
        "{blocked:?}"
    );
    // It still holds web1 and web2 until it is cancelled.
    let busy = submit(uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(busy.json()["code"], "HostBusy", "{busy:?}");
    let cancelled = lab.cli("erin", &["cancel", &first]).await.unwrap();
    assert_eq!(
        (cancelled.outcome().as_str(), cancelled.reason().as_str()),
        ("PolicyBlocked", "Cancelled"),
        "{cancelled:?}"
    );

    let run = uuid::Uuid::new_v4().to_string();
    let out = submit(run.clone()).await;
    assert_eq!(out.outcome(), "ConfirmationRequired", "{out:?}");
    let hash = out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let mut token = None;
    for who in ["alice", "bob"] {
        let a = lab
            .cli(who, &["approve", &run, "--operation-hash", &hash])
            .await
            .unwrap();
        token = a.json()["token"].as_str().map(str::to_string).or(token);
    }
    let token = token.expect("two approvals issue a token");
    let done = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(
        (done.code, done.outcome().as_str()),
        (0, "Completed"),
        "{done:?}"
    );
    assert_eq!(
        lab.ran_anywhere("drain") + lab.ran_anywhere("remove"),
        0,
        "nothing destructive (nothing at all) ran"
    );
    let events = timeline(&lab, &done);
    let destructive: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "step_dispatched" && e["inputs"]["destructive"] == "true")
        .collect();
    assert_eq!(destructive.len(), 2, "remove on web1 and web2: {events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "barrier_evaluated" && e["decision"] == "allow"),
        "the barrier re-probed and decided: {events:#?}"
    );
    assert_eq!(summary(&lab, &done)["shadow"], true);
}
