//! Issue 5's story, end to end: three real agents, a real `tollgate serve`, and the `tollgate`
//! CLI. Steps append to marker files, so "nothing destructive ran" is read from the hosts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tollgate_tests::lab::{DEFAULT_HOSTS, Lab};
use tollgate_tests::proc::eventually;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_deploy_then_escalation_command_reaches_confirmation() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    for h in ["web1", "web2", "db1"] {
        assert_eq!(
            (lab.ran(h, "prepare"), lab.ran(h, "install")),
            (1, 1),
            "{h}"
        );
    }

    let out = lab
        .cli("alice", &["teardown", "--hosts", "web1,web2"])
        .await
        .unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (10, "EscalationRequired"),
        "{out:?}"
    );
    let next = out.json()["outcome"]["EscalationRequired"]["next_command"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        next.starts_with("tollgate teardown --mode full --hosts web1,web2 --run "),
        "{next}"
    );
    // Nothing at all ran: quick mode stops before any step of a plan that would destroy.
    assert_eq!(lab.ran_anywhere("drain") + lab.ran_anywhere("remove"), 0);

    // Run the printed command, as printed.
    let args: Vec<&str> = next.split_whitespace().skip(1).collect();
    let out = lab.cli("alice", &args).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (11, "ConfirmationRequired"),
        "{out:?}"
    );
    let plan = &out.json()["outcome"]["ConfirmationRequired"]["plan"];
    assert_eq!(plan["hosts"], serde_json::json!(["web1", "web2"]));
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["destructive"] == true && s["barrier_before"] == true)
    );
    assert_eq!(lab.ran_anywhere("remove"), 0);
    assert_eq!(
        lab.validate_summaries().unwrap(),
        2,
        "deploy and the escalated run's first part"
    );
    // The re-submitted run is open again, awaiting its token: it verifies against the live head,
    // not the summary of its escalated first part.
    let run = next.split_whitespace().last().unwrap();
    let v = lab.cli("carol", &["runs", "verify", run]).await.unwrap();
    assert_eq!((v.code, v.json()["ok"].as_bool()), (0, Some(true)), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_replayed_and_foreign_tokens_are_blocked_and_nothing_destructive_runs() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);

    // No token.
    let (run_a, token_a, _) = lab.approved_teardown("web1,web2").await.unwrap();
    let out = lab
        .cli("alice", &["execute", &run_a, "--token", ""])
        .await
        .unwrap();
    assert_eq!(
        (out.outcome().as_str(), out.reason().as_str()),
        ("PolicyBlocked", "TokenMissing"),
        "{out:?}"
    );
    assert_eq!(out.code, 20);

    // A token for another run and host set: approve db1 (web1 and web2 belong to run A until
    // it closes), present it to the web1,web2 run.
    let (_run_b, token_b, _) = lab.approved_teardown("db1").await.unwrap();
    let out = lab
        .cli("alice", &["execute", &run_a, "--token", &token_b])
        .await
        .unwrap();
    assert_eq!(
        (out.outcome().as_str(), out.reason().as_str()),
        ("PolicyBlocked", "TokenScopeMismatch"),
        "{out:?}"
    );
    assert_eq!(lab.ran_anywhere("remove"), 0, "nothing destructive ran");
    assert_eq!(
        lab.ran_anywhere("drain"),
        0,
        "a refused token starts nothing"
    );

    // The right token works once...
    let out = lab
        .cli("alice", &["execute", &run_a, "--token", &token_a])
        .await
        .unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    assert_eq!(
        (
            lab.ran("web1", "remove"),
            lab.ran("web2", "remove"),
            lab.ran("db1", "remove")
        ),
        (1, 1, 0)
    );
    // ...and is refused as a replay after that.
    let out = lab
        .cli("alice", &["execute", &run_a, "--token", &token_a])
        .await
        .unwrap();
    assert_eq!(
        (out.outcome().as_str(), out.reason().as_str()),
        ("PolicyBlocked", "TokenReplayed"),
        "{out:?}"
    );
    assert_eq!(
        (lab.ran("web1", "remove"), lab.ran("web2", "remove")),
        (1, 1),
        "replay ran nothing"
    );

    // An operator without the approver role cannot approve; a viewer cannot submit.
    let run = uuid::Uuid::new_v4().to_string();
    let out = lab
        .cli(
            "carol",
            &[
                "teardown", "--mode", "full", "--hosts", "web1", "--run", &run,
            ],
        )
        .await
        .unwrap();
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stdout.contains("NotAuthorized") || out.stderr.contains("NotAuthorized"),
        "{out:?}"
    );
    let out = lab.cli("dave", &["status"]).await.unwrap();
    assert_eq!(out.code, 4, "no role at all: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_fact_changed_after_approval_blocks_stale_plan_everywhere() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);
    let (run, token, _) = lab.approved_teardown("web1,web2").await.unwrap();
    lab.set_fact("web2", r#"{"app_version":"1.1-hotfix"}"#)
        .unwrap();
    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str(), out.reason().as_str()),
        (20, "PolicyBlocked", "StalePlan"),
        "{out:?}"
    );
    assert_eq!(
        lab.ran_anywhere("remove"),
        0,
        "nothing destructive ran on any host"
    );

    // explain names the rule and the facts.
    let out = lab.cli("alice", &["explain", &run]).await.unwrap();
    let text = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("B002-fresh-matching-reprobe"), "{text}");
    assert!(text.contains("StalePlan"), "{text}");
    assert!(text.contains("fingerprint drifted"), "{text}");
    assert!(text.contains("web2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_phase_stops_the_next_destructive_phase_everywhere() {
    let mut lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);
    let (run, token, _) = lab.approved_teardown("web1,web2").await.unwrap();
    std::fs::write(lab.home("web2").join("slow-drain"), "").unwrap();
    let started = lab.home("web2").join("started-drain");
    let exec = lab.spawn_cli("alice", &["execute", &run, "--token", &token]);
    assert!(
        eventually(WAIT, || started.exists()).await,
        "web2's drain never started"
    );
    lab.agents.get_mut("web2").unwrap().kill().await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(90), exec)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let json = out.json();
    let outcome = out.outcome();
    assert!(
        [
            "PartialSuccess",
            "PolicyBlocked",
            "TransportUnreachable",
            "ExecutionFailed"
        ]
        .contains(&outcome.as_str()),
        "{json}"
    );
    let web2 = json["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "web2")
        .unwrap()
        .clone();
    assert_eq!(
        web2["lifecycle"], "Unknown",
        "the killed host is Unknown: {web2}"
    );
    assert_eq!(
        lab.ran_anywhere("remove"),
        0,
        "the destructive phase ran nowhere: {json}"
    );
    assert_eq!(lab.ran("web1", "drain"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkill_mid_run_closes_typed_and_journals_verify() {
    let mut lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);
    let (run, token, _) = lab.approved_teardown("web1,web2").await.unwrap();
    std::fs::write(lab.home("web1").join("slow-drain"), "").unwrap();
    let started = lab.home("web1").join("started-drain");
    let exec = lab.spawn_cli("alice", &["execute", &run, "--token", &token]);
    assert!(
        eventually(WAIT, || started.exists()).await,
        "drain never started"
    );
    lab.serve.as_mut().unwrap().kill().await.unwrap();
    lab.start_serve().await.unwrap();
    let out = lab.cli("alice", &["runs", "list"]).await.unwrap();
    let runs = out.json();
    let entry = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == run.as_str())
        .unwrap()
        .clone();
    assert!(
        !tollgate_tests::lab::is_open_state(entry["state"].as_str().unwrap()),
        "the open run was closed typed: {entry}"
    );
    let summary = lab.cli("alice", &["runs", "show", &run]).await.unwrap();
    let summary: serde_json::Value = serde_json::from_str(&summary.stdout).unwrap();
    assert_eq!(
        summary["outcome"]["rule"], "E013-closed-after-restart",
        "{summary}"
    );
    let web1 = summary["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "web1")
        .unwrap()
        .clone();
    assert_eq!(
        web1["lifecycle"], "Unknown",
        "web1's drain was still running: its outcome is unknown: {web1}"
    );
    assert_eq!(
        lab.ran_anywhere("remove"),
        0,
        "nothing destructive ran, before or after the restart"
    );
    assert!(
        lab.ran("web2", "drain") <= 1 && lab.ran("web1", "drain") <= 1,
        "each step at most once"
    );

    // Every run's journal verifies...
    for r in runs.as_array().unwrap() {
        let id = r["run_id"].as_str().unwrap();
        let v = lab.cli("carol", &["runs", "verify", id]).await.unwrap();
        assert_eq!(
            (v.code, v.json()["ok"].as_bool()),
            (0, Some(true)),
            "{id}: {v:?}"
        );
    }
    // ...until one byte of a timeline is edited: verify fails and names the line.
    let timeline = lab.runs_dir().join(&run).join("timeline.jsonl");
    let mut bytes = std::fs::read(&timeline).unwrap();
    let third_line = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(1)
        .unwrap()
        .0
        + 1;
    let pos = third_line
        + bytes[third_line..]
            .iter()
            .position(|b| *b == b'x' || *b == b'a')
            .unwrap();
    bytes[pos] = if bytes[pos] == b'x' { b'y' } else { b'b' };
    std::fs::write(&timeline, bytes).unwrap();
    let v = lab.cli("carol", &["runs", "verify", &run]).await.unwrap();
    assert_eq!(v.code, 5, "{v:?}");
    assert_eq!(v.json()["ok"], false);
    assert_eq!(v.json()["first_bad_line"], 3, "{v:?}");
    assert!(
        lab.validate_summaries().unwrap() >= 2,
        "summaries written at restart match the schema too"
    );
    // The CLI that was following the run saw its coordinator die: exit 3, not a hang.
    let cli = tokio::time::timeout(Duration::from_secs(60), exec)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(cli.code, 3, "{cli:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_runs_show_what_happened() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    let out = lab.cli("carol", &["status"]).await.unwrap();
    let hosts = out.json();
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{out:?}");
    assert!(
        hosts
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["lifecycle"] == "Unknown"),
        "nothing probed yet: {hosts}"
    );
    let deploy = lab
        .cli("alice", &["deploy", "--hosts", "web1"])
        .await
        .unwrap();
    assert_eq!(deploy.code, 0, "{deploy:?}");
    let run = deploy.json()["run_id"].as_str().unwrap().to_string();
    let hosts = lab.cli("carol", &["status"]).await.unwrap().json();
    let web1 = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "web1")
        .unwrap()
        .clone();
    assert_eq!(web1["lifecycle"], "Ready", "{web1}");
    assert_eq!(web1["fingerprint"].as_str().unwrap().len(), 64);
    let summary: serde_json::Value = serde_json::from_str(
        &lab.cli("carol", &["runs", "show", &run])
            .await
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(summary["schema"], "tollgate.summary/v1");
    assert_eq!(summary["requestor"], "spiffe://test/operator/alice");
    assert_eq!(summary["outcome"]["kind"], "Completed");
    assert!(
        summary["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["rule"].is_string()),
        "every decision names its rule"
    );
}
