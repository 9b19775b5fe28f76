//! A real `tollgate-agent` process whose `pwsh` shell is the real `pwsh`, driven by the
//! coordinator's agent client: what the probe says about pwsh, and how a pwsh step's exit code,
//! terminating errors, last native exit code and idempotency reach the result. Runs only where
//! `pwsh` is on PATH; elsewhere each test says it did not run, and why, and passes, unless
//! `TOLLGATE_REQUIRE_PWSH=1`: then a missing pwsh fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_coordinator::transport::agent::AgentLink;
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk, ProbeRequest, Script,
    Stream,
};
use tollgate_protocol::{Shell, StepErrors};
use tollgate_tests::fleet::{AgentOptions, AgentProcess, TestPki};
use tollgate_tests::pwsh::{ps_path, stream_text};

/// A pwsh process start costs seconds on a cold, shared machine.
const LIMIT: Duration = Duration::from_secs(90);

/// An agent allowed both shells, whose `pwsh` is `pwsh`.
async fn agent(pki: &TestPki, name: &str, octet: u8, pwsh: &Path) -> (AgentProcess, AgentLink) {
    let opts = AgentOptions::new(name, octet)
        .with("allowed_shells = [\"pwsh\", \"sh\"]")
        .with(&format!("pwsh_path = {:?}", pwsh.display().to_string()));
    let agent = AgentProcess::start(pki, &opts).await.unwrap();
    let link = agent.connect(&pki.coordinator().unwrap()).await.unwrap();
    (agent, link)
}

fn pwsh_step(key: &str, script: &str) -> ExecuteRequest {
    tollgate_tests::pwsh::step(key, Shell::Pwsh, script, 60_000)
}

async fn run(link: &AgentLink, req: ExecuteRequest) -> (ExecResult, Vec<OutputChunk>) {
    let mut chunks = Vec::new();
    let r = tokio::time::timeout(LIMIT, link.execute(req, |c| chunks.push(c)))
        .await
        .expect("in time")
        .expect("executed");
    (r, chunks)
}

/// `$PSVersionTable.PSVersion` of `pwsh`, asked directly.
async fn ps_version(pwsh: &PathBuf) -> String {
    let out = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new(pwsh)
            .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-Command"])
            .arg("$PSVersionTable.PSVersion.ToString()")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pwsh answered in time")
    .expect("pwsh ran");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_pwsh_present_and_its_real_version() {
    let Some(pwsh) = tollgate_tests::real::pwsh("agent_pwsh_real probe") else {
        return;
    };
    let pki = TestPki::new().unwrap();
    let (_agent, link) = agent(&pki, "ps1", 41, &pwsh).await;
    let want = ps_version(&pwsh).await;
    assert!(
        want.split('.').count() >= 3 && want.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "{want:?}"
    );

    let plain = ProbeRequest {
        script: None,
        timeout_ms: 30_000,
    };
    let r = link.probe(plain, LIMIT).await.unwrap();
    assert_eq!(r.facts["pwsh.present"], "true", "{:?}", r.facts);
    assert_eq!(r.facts["pwsh.version"], want, "{:?}", r.facts);

    // A pwsh probe script deeper than ConvertTo-Json's default depth: the agent passes its text
    // through, so what it serialised is what the facts say.
    let deep = ProbeRequest {
        script: Some(Script {
            shell: Shell::Pwsh,
            body: "[ordered]@{ role = 'web'; nest = [ordered]@{ a = [ordered]@{ b = [ordered]@{ c = 'deep' } } } } | ConvertTo-Json -Depth 10 -Compress".into(),
        }),
        timeout_ms: 60_000,
    };
    let d = link.probe(deep, LIMIT).await.unwrap();
    assert_eq!(d.facts["probe.role"], "web");
    assert_eq!(d.facts["probe.nest"], r#"{"a":{"b":{"c":"deep"}}}"#);
    assert_eq!(
        d.facts["pwsh.version"], want,
        "the same version after a script"
    );

    // The same without -Depth: ConvertTo-Json's default depth of 2 would cut `b` to a type name,
    // silently (Windows PowerShell 5.1 does not even warn). The agent's pwsh runs with a default
    // depth that keeps it whole.
    let shallow = ProbeRequest {
        script: Some(Script {
            shell: Shell::Pwsh,
            body: "[ordered]@{ role = 'web'; nest = [ordered]@{ a = [ordered]@{ b = [ordered]@{ c = 'deep' } } } } | ConvertTo-Json -Compress".into(),
        }),
        timeout_ms: 60_000,
    };
    let s = link.probe(shallow, LIMIT).await.unwrap();
    assert_eq!(s.facts["probe.nest"], r#"{"a":{"b":{"c":"deep"}}}"#);
    assert_eq!(s.fingerprint, d.fingerprint, "the same facts either way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pwsh_step_exit_code_and_output_reach_the_result() {
    let Some(pwsh) = tollgate_tests::real::pwsh("agent_pwsh_real exit code") else {
        return;
    };
    let pki = TestPki::new().unwrap();
    let (_agent, link) = agent(&pki, "ps2", 42, &pwsh).await;
    let script = "Write-Output 'one'\nWrite-Output \"agent=$env:TOLLGATE_AGENT_ID\"\nexit 3";
    let (r, chunks) = run(&link, pwsh_step("ps/exit3", script)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 3 });
    assert!(!r.replayed);
    let out = stream_text(&chunks, Stream::Stdout);
    assert!(
        out.contains("one") && out.contains("agent=spiffe://test/agent/ps2"),
        "{out}"
    );
    let (ok, _) = run(&link, pwsh_step("ps/exit0", "Write-Output 'fine'")).await;
    assert_eq!(ok.status, ExecStatus::Exited { code: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_action_stop_fails_the_step_with_the_error_on_stderr() {
    let Some(pwsh) = tollgate_tests::real::pwsh("agent_pwsh_real ErrorActionPreference") else {
        return;
    };
    let pki = TestPki::new().unwrap();
    let (_agent, link) = agent(&pki, "ps3", 43, &pwsh).await;
    let missing = pki.root().join("not-here-at-all");
    let script = format!(
        "$ErrorActionPreference = 'Stop'\nWrite-Output 'before'\nGet-Item -LiteralPath {}\nWrite-Output 'after'",
        ps_path(&missing)
    );
    let (r, chunks) = run(&link, pwsh_step("ps/stop", &script)).await;
    match r.status {
        ExecStatus::Exited { code } => assert_ne!(code, 0, "a failed cmdlet under Stop"),
        other => panic!("expected a non-zero exit, got {other:?}"),
    }
    let out = stream_text(&chunks, Stream::Stdout);
    let err = stream_text(&chunks, Stream::Stderr);
    assert!(out.contains("before") && !out.contains("after"), "{out}");
    // PowerShell wraps the message at the host's width; the words are there, in plain text.
    assert!(
        err.contains("Cannot find path") && err.contains("not-here-at-all"),
        "{err}"
    );
    assert!(!err.contains('\u{1b}'), "no ANSI colour codes: {err:?}");

    // A statement-terminating error stops the step too, as on the session host.
    let (r, chunks) = run(
        &link,
        pwsh_step(
            "ps/statement",
            "Write-Output 'before'\n[int]::Parse('x')\nWrite-Output 'after'",
        ),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    let out = stream_text(&chunks, Stream::Stdout);
    assert!(out.contains("before") && !out.contains("after"), "{out}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_native_exit_code_reaches_the_result() {
    let Some(pwsh) = tollgate_tests::real::pwsh("agent_pwsh_real LASTEXITCODE") else {
        return;
    };
    let pki = TestPki::new().unwrap();
    let (_agent, link) = agent(&pki, "ps4", 44, &pwsh).await;
    // The script's last act is a native command: `pwsh -File` alone would exit 0 here.
    let (r, chunks) = run(
        &link,
        pwsh_step("ps/native7", "Write-Output 'start'\nsh -c 'exit 7'"),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 7 });
    assert!(stream_text(&chunks, Stream::Stdout).contains("start"));
    // A native success after a failure: the last one decides.
    let (r, _) = run(
        &link,
        pwsh_step("ps/native0", "sh -c 'exit 7'\nsh -c 'exit 0'"),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 0 });
    // `exit n` still wins over the last native exit code.
    let (r, _) = run(&link, pwsh_step("ps/native-exit", "sh -c 'exit 7'\nexit 5")).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 5 });
    // A script that does not parse is a failure, not a success.
    let (r, chunks) = run(&link, pwsh_step("ps/parse", "if (")).await;
    match r.status {
        ExecStatus::Exited { code } => {
            assert_ne!(code, 0, "{}", stream_text(&chunks, Stream::Stderr))
        }
        other => panic!("expected a non-zero exit, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_twice_runs_once() {
    let Some(pwsh) = tollgate_tests::real::pwsh("agent_pwsh_real idempotency") else {
        return;
    };
    let pki = TestPki::new().unwrap();
    let (_agent, link) = agent(&pki, "ps5", 45, &pwsh).await;
    let target = pki.root().join("appended.txt");
    let script = format!(
        "Add-Content -LiteralPath {} -Value 'ran'\nWrite-Output 'appended'",
        ps_path(&target)
    );
    let (first, chunks) = run(&link, pwsh_step("ps/once", &script)).await;
    assert_eq!(first.status, ExecStatus::Exited { code: 0 });
    assert!(!first.replayed);
    assert!(stream_text(&chunks, Stream::Stdout).contains("appended"));
    let (second, _) = run(&link, pwsh_step("ps/once", &script)).await;
    assert!(second.replayed, "{second:?}");
    assert_eq!(second.status, first.status);
    assert_eq!(
        std::fs::read_to_string(&target).unwrap().lines().count(),
        1,
        "the script ran once"
    );
    let q = tokio::time::timeout(LIMIT, link.query("ps/once"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(q, IdempotencyStatus::Finished(ref r) if r.status == ExecStatus::Exited { code: 0 }),
        "{q:?}"
    );
}

/// Step error semantics through the agent's pwsh wrapper (a `pwsh` process per step): the
/// shared table under `errors = "stop"` and `"continue"`; under `stop` the agent's stderr says
/// why a step that exited 0 failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_records_fail_a_step_unless_it_says_continue() {
    let Some(pwsh) = tollgate_tests::real::pwsh("agent_pwsh_real errors") else {
        return;
    };
    let pki = TestPki::new().unwrap();
    let (_agent, link) = agent(&pki, "ps6", 46, &pwsh).await;
    for (i, case) in tollgate_tests::pwsh::ERROR_CASES.iter().enumerate() {
        for errors in [StepErrors::Stop, StepErrors::Continue] {
            let mut req = pwsh_step(&format!("agent/errors/{i}/{errors}"), case.script);
            req.errors = errors;
            let (r, chunks) = run(&link, req).await;
            case.assert(errors, &r.status, &chunks);
        }
    }
    let mut req = pwsh_step(
        "agent/errors/why",
        "Write-Error 'tg-why' -ErrorAction Continue\nexit 0",
    );
    req.errors = StepErrors::Stop;
    let (r, chunks) = run(&link, req).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    let err = stream_text(&chunks, Stream::Stderr);
    assert!(err.contains("tg-why"), "{err}");
    assert!(
        err.contains("wrote 1 error record(s) (errors = 'stop')"),
        "{err}"
    );
}
