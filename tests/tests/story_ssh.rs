//! The story over PowerShell Remoting on real SSH: three hosts, each a real `sshd` on its own
//! 127.0.0.x with the `powershell` subsystem, reached by `tollgate serve` through its supervised
//! real `pwsh` session hosts (`New-PSSession -HostName`). The inventory names the key and the
//! known_hosts file relative to itself, and coordinator.toml names `pwsh` as `bin/pwsh` relative
//! to itself (serve runs from another working directory). Runs where `pwsh` and `sshd` are present (CI requires
//! both).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tollgate_tests::invariants::approved_teardown;
use tollgate_tests::lab::Lab;

/// Every step is PowerShell, appending to `$env:TOLLGATE_TEST_HOME/markers/<step>`; the probe
/// reads the host's `facts.json`.
const OPERATIONS: &str = r#"
[[deploy.phases]]
name = "install"
[[deploy.phases.steps]]
id = "install"
roles = ["win", "sql"]
run = "Add-Content -LiteralPath (Join-Path $env:TOLLGATE_TEST_HOME 'markers/install') -Value x"
destructive = false

[[teardown.phases]]
name = "drain"
[[teardown.phases.steps]]
id = "drain"
roles = ["win", "sql"]
run = "Add-Content -LiteralPath (Join-Path $env:TOLLGATE_TEST_HOME 'markers/drain') -Value x"
destructive = false

[[teardown.phases]]
name = "remove"
[[teardown.phases.steps]]
id = "remove"
roles = ["win", "sql"]
run = "Add-Content -LiteralPath (Join-Path $env:TOLLGATE_TEST_HOME 'markers/remove') -Value x"
destructive = true

[probes.win]
run = "Get-Content -Raw -LiteralPath (Join-Path $env:TOLLGATE_TEST_HOME 'facts.json')"

[probes.sql]
run = "Get-Content -Raw -LiteralPath (Join-Path $env:TOLLGATE_TEST_HOME 'facts.json')"
"#;

const HOSTS: &[(&str, &str, &str)] = &[
    ("win1", "win", "standard"),
    ("win2", "win", "standard"),
    ("sql1", "sql", "protected"),
];

async fn lab() -> Option<Lab> {
    let (pwsh, sshd) = tollgate_tests::real::pwsh_and_sshd("the SSH-remoting story")?;
    Some(
        Lab::start_ssh(&pwsh, &sshd, HOSTS, OPERATIONS)
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_fleet_deploys_escalates_blocks_a_stale_plan_and_tears_down_once() {
    let Some(lab) = lab().await else { return };
    let ran = |host: &str, step: &str| lab.ran(host, step);

    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    for (h, _, _) in HOSTS {
        assert_eq!(ran(h, "install"), 1, "{h}");
    }
    let status = lab.cli("carol", &["status"]).await.unwrap().json();
    for h in status.as_array().unwrap() {
        assert_eq!(h["transport"], "psremoting", "{h}");
        assert_eq!(h["lifecycle"], "Ready", "{h}");
    }

    // Quick mode never destroys: the destructive phase needs escalation and a token.
    let out = lab.cli("erin", &["teardown"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (10, "EscalationRequired"),
        "{out:?}"
    );
    assert_eq!(ran("win1", "remove"), 0);

    // Approved, then a fact drifts on one host: the barrier's re-probe over SSH blocks it.
    let (run, token, _) = approved_teardown(&lab, "win1,win2,sql1").await.unwrap();
    lab.set_fact("win2", r#"{"app_version":"1.1-hotfix"}"#)
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
    for (h, _, _) in HOSTS {
        assert_eq!(ran(h, "remove"), 0, "nothing destructive ran on {h}");
    }

    // A fresh plan on the new facts: approved by two (sql1 is protected), run once.
    let (run, token, _) = approved_teardown(&lab, "win1,win2,sql1").await.unwrap();
    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    for (h, _, _) in HOSTS {
        assert_eq!(ran(h, "remove"), 1, "{h}");
    }
    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(out.reason(), "TokenReplayed", "{out:?}");
    for (h, _, _) in HOSTS {
        assert_eq!(ran(h, "remove"), 1, "a replay runs nothing on {h}");
    }
}
