//! The happy paths of `pwsh_transport.rs`, against a real `pwsh` running the shipped
//! session-host script in `none` mode (the `local` transport). Runs only where `pwsh` is on
//! PATH; elsewhere each test says it did not run, and why, and passes, unless
//! `TOLLGATE_REQUIRE_PWSH=1` (CI sets it once it has installed pwsh): then a missing pwsh fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use tollgate_coordinator::transport::pwsh::{PwshMode, PwshSession, PwshSettings, SessionHealth};
use tollgate_protocol::agent::{
    ExecStatus, IdempotencyStatus, ProbeRequest, Script, Stream, fingerprint,
};
use tollgate_protocol::{Shell, StepErrors};
use tollgate_tests::pwsh::{
    ERROR_CASES, LIMIT, execute, local_session, ps_path, step, stream_text,
};

/// `pwsh` from PATH, or `None` after saying that these tests did not run.
fn real_pwsh() -> Option<PathBuf> {
    tollgate_tests::real::pwsh("real-pwsh tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_probe_reports_facts() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let req = ProbeRequest {
        script: Some(Script {
            shell: Shell::Pwsh,
            body: "[pscustomobject]@{ role = 'web'; port = 443 } | ConvertTo-Json -Compress".into(),
        }),
        timeout_ms: 30_000,
    };
    let r = tokio::time::timeout(LIMIT, s.probe(req, Duration::from_secs(90)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.facts["os.family"], std::env::consts::OS);
    assert!(!r.facts["pwsh.version"].is_empty());
    assert!(!r.facts["host.name"].is_empty());
    assert_eq!(r.facts["probe.role"], "web");
    assert_eq!(r.facts["probe.port"], "443");
    assert_eq!(r.fingerprint, fingerprint(&r.facts));
    assert_eq!(s.health(), &SessionHealth::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_streams_output_errors_and_exit_code() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let script = "Write-Output 'one'\nWrite-Error 'two'\nWrite-Warning 'three'\nWrite-Output $env:TOLLGATE_STEP\nexit 3";
    // errors = "continue": the error record is shown and the script runs on to `exit 3`.
    let mut req = step("real/out", Shell::Pwsh, script, 60_000);
    req.errors = StepErrors::Continue;
    let (r, chunks) = execute(&mut s, req).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 3 });
    let out = stream_text(&chunks, Stream::Stdout);
    let err = stream_text(&chunks, Stream::Stderr);
    assert!(out.contains("one") && out.contains("deploy.1"), "{out}");
    assert!(
        err.contains("two") && err.contains("WARNING: three"),
        "{err}"
    );
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (0..chunks.len() as u64).collect::<Vec<_>>());
}

/// Step error semantics on the local transport: every case of the shared table under
/// `errors = "stop"` (the default) and `"continue"`; under `stop` a step that wrote an error
/// record and exited 0 says why it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_error_records_fail_a_step_unless_it_says_continue() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    for (i, case) in ERROR_CASES.iter().enumerate() {
        for errors in [StepErrors::Stop, StepErrors::Continue] {
            let mut req = step(
                &format!("real/errors/{i}/{errors}"),
                Shell::Pwsh,
                case.script,
                60_000,
            );
            req.errors = errors;
            let (r, chunks) = execute(&mut s, req).await;
            case.assert(errors, &r.status, &chunks);
        }
    }
    let mut req = step(
        "real/errors/why",
        Shell::Pwsh,
        "Write-Error 'tg-why' -ErrorAction Continue\nexit 0",
        60_000,
    );
    req.errors = StepErrors::Stop;
    let (r, _) = execute(&mut s, req).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    let e = s
        .last_script_error()
        .expect("the first error record, named");
    assert!(
        e.message.contains("1 error record") && e.message.contains("tg-why"),
        "{}",
        e.message
    );
    assert_eq!(e.category, "NotSpecified");
    let fqid = e.fqid.as_deref().unwrap_or_default();
    assert!(
        fqid.starts_with("Microsoft.PowerShell.Commands.WriteErrorException"),
        "{fqid}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_terminating_error_has_message_and_category() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let missing = dir.path().join("not-here");
    let script = format!(
        "Write-Output 'before'\nGet-Item -LiteralPath {} -ErrorAction Stop\nWrite-Output 'after'",
        ps_path(&missing)
    );
    let (r, chunks) = execute(&mut s, step("real/throw", Shell::Pwsh, &script, 60_000)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    let e = s.last_script_error().expect("an error record");
    assert_eq!(e.category, "ObjectNotFound");
    assert!(e.message.contains("not-here"), "{}", e.message);
    let out = stream_text(&chunks, Stream::Stdout);
    assert!(out.contains("before") && !out.contains("after"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_runs_a_key_exactly_once() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let target = dir.path().join("appended.txt");
    let script = format!("Add-Content -LiteralPath {} -Value 'ran'", ps_path(&target));
    let (first, _) = execute(&mut s, step("real/once", Shell::Pwsh, &script, 60_000)).await;
    assert_eq!(first.status, ExecStatus::Exited { code: 0 });
    let (second, _) = execute(&mut s, step("real/once", Shell::Pwsh, &script, 60_000)).await;
    assert!(second.replayed);
    assert_eq!(std::fs::read_to_string(&target).unwrap().lines().count(), 1);
    let q = tokio::time::timeout(LIMIT, s.query("real/once"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(q, IdempotencyStatus::Finished(ref r) if r.status == ExecStatus::Exited { code: 0 }),
        "{q:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_times_out_and_cancels() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let script = "Write-Output 'started'\nStart-Sleep -Seconds 120";
    let (r, _) = execute(&mut s, step("real/slow", Shell::Pwsh, script, 1500)).await;
    assert_eq!(r.status, ExecStatus::TimedOut);
    assert_eq!(s.spawns(), 1, "the session host stopped the step itself");

    let canceller = s.canceller();
    let mut seen = String::new();
    let mut asked = None;
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(step("real/cancel", Shell::Pwsh, script, 120_000), |c| {
            seen.push_str(&String::from_utf8_lossy(&c.data));
            if seen.contains("started") && asked.is_none() {
                asked = Some(canceller.cancel("real/cancel"));
            }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(asked, Some(true));
    assert_eq!(r.status, ExecStatus::Cancelled);
    assert_eq!(s.spawns(), 1);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_runs_sh_steps() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let (r, chunks) = execute(
        &mut s,
        step("real/sh", Shell::Sh, "echo hi\nexit 4", 60_000),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 4 });
    assert!(stream_text(&chunks, Stream::Stdout).contains("hi"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_refuses_a_key_reused_for_another_script() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let (first, _) = execute(
        &mut s,
        step("real/conflict", Shell::Pwsh, "Write-Output one", 60_000),
    )
    .await;
    assert_eq!(first.status, ExecStatus::Exited { code: 0 });
    let e = tokio::time::timeout(
        LIMIT,
        s.execute(
            step("real/conflict", Shell::Pwsh, "Write-Output two", 60_000),
            |_| {},
        ),
    )
    .await
    .unwrap()
    .expect_err("another script under a used key");
    assert!(
        matches!(
            e,
            tollgate_coordinator::transport::pwsh::SessionError::IdempotencyConflict(_)
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_reports_a_step_that_does_not_parse() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let (r, chunks) = execute(
        &mut s,
        step(
            "real/broken",
            Shell::Pwsh,
            "Write-Output 'never'\nif ($true {",
            60_000,
        ),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    assert!(
        !stream_text(&chunks, Stream::Stdout).contains("never"),
        "nothing of it ran"
    );
    let e = s.last_script_error().expect("the parse error");
    assert!(e.message.contains("Missing"), "{}", e.message);
    assert_eq!(s.spawns(), 1, "a broken step does not break the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_step_writing_to_the_contract_channel_is_killed_and_uncertain() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    // In-process (local mode) a step can reach the session host's own stdout.
    let script = "[Console]::Out.WriteLine('not the contract')\nStart-Sleep -Seconds 30";
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(step("real/garbage", Shell::Pwsh, script, 60_000), |_| {}),
    )
    .await
    .unwrap();
    match r {
        Ok(r) => assert!(matches!(r.status, ExecStatus::Uncertain { .. }), "{r:?}"),
        Err(e) => panic!("a started step must end typed, not {e}"),
    }
    let (after, _) = execute(
        &mut s,
        step("real/after-garbage", Shell::Pwsh, "Write-Output ok", 60_000),
    )
    .await;
    assert_eq!(after.status, ExecStatus::Exited { code: 0 });
    assert_eq!(
        s.spawns(),
        2,
        "the child that broke the contract was replaced"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_session_host_killed_mid_step_is_uncertain_and_never_rerun() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let target = dir.path().join("destroyed.txt");
    let script = format!(
        "Write-Output 'started'\nStart-Sleep -Seconds 60\nAdd-Content -LiteralPath {} -Value x",
        ps_path(&target)
    );
    let (_, _) = execute(
        &mut s,
        step("real/warm", Shell::Pwsh, "Write-Output warm", 60_000),
    )
    .await;
    let pid = s.child_pid().expect("a running session host");
    let mut killed = false;
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(step("real/killed", Shell::Pwsh, &script, 120_000), |c| {
            if !killed && String::from_utf8_lossy(&c.data).contains("started") {
                killed = true;
                // The whole PowerShell: the dotnet-tool `pwsh` is a shim whose child
                // (`dotnet pwsh.dll`) is the real session host; killing the shim alone
                // leaves it running and answering.
                let mut all = tollgate_tests::proc::descendants(pid);
                all.push(pid);
                tollgate_tests::sshd::kill_all(&all);
            }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(killed);
    assert!(matches!(r.status, ExecStatus::Uncertain { .. }), "{r:?}");
    let (again, _) = execute(&mut s, step("real/killed", Shell::Pwsh, &script, 120_000)).await;
    assert!(
        matches!(again.status, ExecStatus::Uncertain { .. }),
        "never re-run: {again:?}"
    );
    assert!(!target.exists());
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_pwsh_session_host_hung_past_the_deadline_is_replaced() {
    let Some(pwsh) = real_pwsh() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = PwshSettings::new(pwsh, PwshMode::None);
    settings.state_dir = Some(dir.path().join("state").to_string_lossy().into_owned());
    settings.answer_margin = Duration::from_millis(500);
    let mut s = PwshSession::new("local".into(), settings);
    let (_, _) = execute(
        &mut s,
        step("real/warm", Shell::Pwsh, "Write-Output warm", 60_000),
    )
    .await;
    let pid = s.child_pid().expect("a running session host");
    // A frozen session host (SIGSTOP) answers nothing: past the step's deadline and the margin
    // the coordinator kills it and says the step is uncertain.
    let mut stopped = false;
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(
            step(
                "real/hung",
                Shell::Pwsh,
                "Write-Output 'started'\nStart-Sleep -Seconds 30",
                1_500,
            ),
            |c| {
                if !stopped && String::from_utf8_lossy(&c.data).contains("started") {
                    stopped = true;
                    use nix::sys::signal::{Signal, kill};
                    let mut all = tollgate_tests::proc::descendants(pid);
                    all.push(pid);
                    for p in all {
                        let _ = kill(nix::unistd::Pid::from_raw(p as i32), Signal::SIGSTOP);
                    }
                }
            },
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(stopped);
    assert!(matches!(r.status, ExecStatus::Uncertain { .. }), "{r:?}");
    assert!(
        !tollgate_tests::proc::alive(pid),
        "the hung child was killed"
    );
    let (after, _) = execute(
        &mut s,
        step("real/after-hang", Shell::Pwsh, "Write-Output ok", 60_000),
    )
    .await;
    assert_eq!(after.status, ExecStatus::Exited { code: 0 });
}
