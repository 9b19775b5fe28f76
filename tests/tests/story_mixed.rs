//! The runtime's story on a mixed fleet: two agent hosts and one PowerShell Remoting host whose
//! `pwsh` is the stand-in that speaks the session-host contract (this machine has no pwsh).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use tollgate_tests::evidence::finished;
use tollgate_tests::lab::Lab;

/// Agent hosts run `sh` steps; the ps host runs the stand-in's line language (in production,
/// PowerShell). Every step appends to `<home>/markers/<step>`.
fn operations(ps_home: &Path) -> String {
    let h = r#"H=\"$TOLLGATE_AGENT_STATE/..\"; mkdir -p \"$H/markers\""#;
    let m = |step: &str| ps_home.join("markers").join(step).display().to_string();
    format!(
        r#"[[deploy.phases]]
name = "install"
[[deploy.phases.steps]]
id = "install"
roles = ["web"]
shell = "sh"
run = "{h}; echo x >> \"$H/markers/install\""
destructive = false
[[deploy.phases.steps]]
id = "install-win"
roles = ["win"]
run = "append {install} x"
destructive = false

[[teardown.phases]]
name = "drain"
[[teardown.phases.steps]]
id = "drain"
roles = ["web"]
shell = "sh"
run = "{h}; echo x >> \"$H/markers/drain\""
destructive = false
[[teardown.phases.steps]]
id = "drain-win"
roles = ["win"]
run = "append {drain} x"
destructive = false

[[teardown.phases]]
name = "remove"
[[teardown.phases.steps]]
id = "remove"
roles = ["web"]
shell = "sh"
run = "{h}; echo x >> \"$H/markers/remove\""
destructive = true
[[teardown.phases.steps]]
id = "remove-win"
roles = ["win"]
run = "append {remove} x"
destructive = true

[probes.web]
shell = "sh"
run = "cat \"$TOLLGATE_AGENT_STATE/../facts.json\""

[probes.win]
run = "out {{\"app_version\":\"1.0\"}}"
"#,
        install = m("install-win"),
        drain = m("drain-win"),
        remove = m("remove-win"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_deploys_escalates_and_tears_down_once() {
    // The ps host's markers live in a directory the test owns.
    let ps_home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ps_home.path().join("markers")).unwrap();
    let win_ran = |step: &str| finished(ps_home.path(), step);
    let hosts = [("web1", "web", "standard"), ("web2", "web", "standard")];
    let ps = [("win1", "win", "standard")];
    let lab = Lab::start_mixed(&hosts, &ps, &operations(ps_home.path()), "", Vec::new())
        .await
        .unwrap();

    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    assert_eq!(
        (
            lab.ran("web1", "install"),
            lab.ran("web2", "install"),
            win_ran("install-win")
        ),
        (1, 1, 1)
    );
    let win1 = out.json()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "win1")
        .unwrap()
        .clone();
    assert_eq!(win1["lifecycle"], "Ready", "{win1}");

    let out = lab.cli("erin", &["teardown"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (10, "EscalationRequired"),
        "{out:?}"
    );
    let next = out.json()["outcome"]["EscalationRequired"]["next_command"]
        .as_str()
        .unwrap()
        .to_string();
    let args: Vec<&str> = next.split_whitespace().skip(1).collect();
    let out = lab.cli("erin", &args).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (11, "ConfirmationRequired"),
        "{out:?}"
    );
    let run = out.json()["run_id"].as_str().unwrap().to_string();
    let hash = out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let approval = lab
        .cli("alice", &["approve", &run, "--operation-hash", &hash])
        .await
        .unwrap();
    let token = approval.json()["token"].as_str().unwrap().to_string();
    assert_eq!(
        win_ran("remove-win"),
        0,
        "nothing destructive before the token"
    );

    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
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
            win_ran("remove-win")
        ),
        (1, 1, 1)
    );
    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(out.reason(), "TokenReplayed", "{out:?}");
    assert_eq!(
        win_ran("remove-win"),
        1,
        "a replay runs nothing on the ps host either"
    );
    let hosts = lab.cli("carol", &["status"]).await.unwrap().json();
    let win1 = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "win1")
        .unwrap()
        .clone();
    assert_eq!(
        (win1["transport"].as_str(), win1["lifecycle"].as_str()),
        (Some("psremoting"), Some("TeardownComplete")),
        "{win1}"
    );
    lab.validate_summaries().unwrap();
}

/// A step's `errors` travels from `operations.toml` through `tollgate serve` to the session
/// host: `tolerant` (errors = "continue") writes an error record and goes on; `strict` (the
/// default, "stop") writes one and stops there, failing the run typed. The markers show what
/// ran, and the confirmation-free deploy reports the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_errors_setting_reaches_the_host_through_serve() {
    let ps_home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ps_home.path().join("markers")).unwrap();
    let m = |step: &str| {
        ps_home
            .path()
            .join("markers")
            .join(step)
            .display()
            .to_string()
    };
    let ops = format!(
        r#"[[deploy.phases]]
name = "first"
[[deploy.phases.steps]]
id = "tolerant"
roles = ["win"]
run = "err expected noise\nappend {tolerant} x"
destructive = false
errors = "continue"

[[deploy.phases]]
name = "second"
[[deploy.phases.steps]]
id = "strict"
roles = ["win"]
run = "err copy failed\nappend {strict} x"
destructive = false

[[teardown.phases]]
name = "drain"
[[teardown.phases.steps]]
id = "drain-win"
roles = ["win"]
run = "out drained"
destructive = false

[probes.win]
run = "out {{\"app_version\":\"1.0\"}}"
"#,
        tolerant = m("tolerant"),
        strict = m("strict"),
    );
    let ps = [("win1", "win", "standard")];
    let lab = Lab::start_mixed(&[], &ps, &ops, "", Vec::new())
        .await
        .unwrap();
    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(out.outcome(), "ExecutionFailed", "{out:?}");
    assert_ne!(out.code, 0, "{out:?}");
    assert_eq!(
        finished(ps_home.path(), "tolerant"),
        1,
        "errors = \"continue\": the record did not stop it"
    );
    assert_eq!(
        finished(ps_home.path(), "strict"),
        0,
        "errors = \"stop\": the record stopped it before its next line"
    );
}
