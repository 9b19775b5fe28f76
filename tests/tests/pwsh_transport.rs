//! The PowerShell transport's `PwshSession` against `tollgate-pwsh-standin`, a program that
//! takes pwsh's command line, speaks the session-host contract, keeps real idempotency markers,
//! and can be told to crash, hang, write garbage, refuse authentication or lose its session.
//! Every fault must end in its typed outcome, and the next request must work on a new child.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tollgate_coordinator::core::facts::ProbeFailure;
use tollgate_coordinator::transport::pwsh::{
    Backoff, PwshMode, PwshSession, PwshSettings, RefusalCode, SessionError, SessionHealth,
    WinRmAuth, WinRmTarget,
};
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk, ProbeRequest, Script,
    Stream, fingerprint,
};
use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Shell, StepErrors};
use tollgate_tests::evidence::count_lines;

/// Bound on every await: a broken session must fail a test, never hang it.
const LIMIT: Duration = Duration::from_secs(60);

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn settings(&self, mode: PwshMode) -> PwshSettings {
        let mut s = PwshSettings::new(
            tollgate_tests::bins::path("tollgate-pwsh-standin").unwrap(),
            mode,
        );
        s.state_dir = Some(self.state().to_string_lossy().into_owned());
        s.connect_timeout = Duration::from_secs(20);
        s.request_timeout = Duration::from_secs(20);
        s.answer_margin = Duration::from_secs(20);
        s.backoff = Backoff {
            start: Duration::from_millis(10),
            max: Duration::from_millis(200),
        };
        s
    }

    fn local(&self) -> PwshSession {
        PwshSession::new("local1".into(), self.settings(PwshMode::None))
    }

    fn winrm(&self) -> PwshSession {
        PwshSession::new(
            "db1".into(),
            self.settings(PwshMode::WinRm(WinRmTarget::new("db1.test"))),
        )
    }

    /// Arms stand-in faults (one directive a line).
    fn faults(&self, text: &str) {
        std::fs::create_dir_all(self.state()).unwrap();
        std::fs::write(self.state().join("standin-faults"), text).unwrap();
    }

    fn clear_faults(&self) {
        let _ = std::fs::remove_file(self.state().join("standin-faults"));
    }

    fn launches(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state().join("standin-launches.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn step(key: &str, script: &str, timeout_ms: u64) -> ExecuteRequest {
    ExecuteRequest {
        idempotency_key: key.to_string(),
        shell: Shell::Pwsh,
        script: script.to_string(),
        env: BTreeMap::from([("TOLLGATE_STEP".to_string(), "deploy.1".to_string())]),
        working_dir: None,
        timeout_ms,
        errors: StepErrors::Stop,
    }
}

async fn execute(
    s: &mut PwshSession,
    req: ExecuteRequest,
) -> (Result<ExecResult, SessionError>, Vec<OutputChunk>) {
    let mut chunks = Vec::new();
    let r = tokio::time::timeout(LIMIT, s.execute(req, |c| chunks.push(c)))
        .await
        .expect("execute answered in time");
    (r, chunks)
}

async fn probe(
    s: &mut PwshSession,
    script: Option<&str>,
    timeout: Duration,
) -> Result<tollgate_protocol::agent::ProbeReport, SessionError> {
    let req = ProbeRequest {
        script: script.map(|b| Script {
            shell: Shell::Pwsh,
            body: b.to_string(),
        }),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap(),
    };
    tokio::time::timeout(LIMIT, s.probe(req, timeout))
        .await
        .expect("probe answered in time")
}

async fn query(s: &mut PwshSession, key: &str) -> IdempotencyStatus {
    tokio::time::timeout(LIMIT, s.query(key))
        .await
        .expect("query answered in time")
        .expect("query ok")
}

fn text(chunks: &[OutputChunk]) -> String {
    chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

/// True once `pid` is gone (the session reaps what it kills, so no waiting is needed).
fn gone(pid: u32) -> bool {
    #[cfg(unix)]
    {
        !tollgate_tests::proc::alive(pid)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Runs a probe that must work, and returns the child's pid.
async fn healthy(s: &mut PwshSession) -> u32 {
    probe(s, None, Duration::from_secs(20))
        .await
        .expect("the session works");
    assert_eq!(s.health(), &SessionHealth::Ready);
    s.child_pid().expect("a child runs")
}

// ---------------------------------------------------------------------------------------------
// Happy paths.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_builtin_and_script_facts_with_their_fingerprint() {
    let fx = Fixture::new();
    let mut s = fx.local();
    assert_eq!(s.health(), &SessionHealth::NotStarted);
    let r = probe(
        &mut s,
        Some(r#"out {"role":"web","port":443}"#),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    for k in [
        "host.name",
        "os.family",
        "os.arch",
        "pwsh.version",
        "pwsh.present",
    ] {
        assert!(r.facts.contains_key(k), "missing {k}: {:?}", r.facts);
    }
    assert_eq!(r.facts["os.family"], std::env::consts::OS);
    assert_eq!(r.facts["transport.kind"], "local");
    assert_eq!(r.facts["transport.mode"], "none");
    assert_eq!(r.facts["probe.role"], "web");
    assert_eq!(r.facts["probe.port"], "443");
    assert!(r.volatile.contains_key("time.unix_ms"));
    assert!(!r.facts.contains_key("time.unix_ms"));
    assert_eq!(r.fingerprint, fingerprint(&r.facts));
    assert_eq!(s.hello().unwrap().mode, "none");

    // Same host, same facts: same fingerprint. A probe script that prints no object fails.
    let again = probe(
        &mut s,
        Some(r#"out {"role":"web","port":443}"#),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(again.fingerprint, r.fingerprint);
    let bad = probe(&mut s, Some("out [1,2]"), Duration::from_secs(20)).await;
    assert!(
        matches!(bad, Err(SessionError::ProbeMalformed(ref m)) if m.contains("object")),
        "{bad:?}"
    );
    let failed = probe(&mut s, Some("exit 4"), Duration::from_secs(20)).await;
    assert!(
        matches!(failed, Err(SessionError::ProbeFailed(ref m)) if m.contains("code 4")),
        "{failed:?}"
    );
    // None of that broke the session: one child all along.
    assert_eq!(s.spawns(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_streams_ordered_output_and_exit_code() {
    let fx = Fixture::new();
    let mut s = fx.local();
    // errors = "continue": the error record is shown and the script goes on to `exit 3`.
    let mut req = step(
        "run1/local1/a",
        "out one\nerr two\nwarn three\nenv TOLLGATE_STEP\nprogress 50 half\nexit 3",
        30_000,
    );
    req.errors = StepErrors::Continue;
    let (r, chunks) = execute(&mut s, req).await;
    let r = r.unwrap();
    assert_eq!(r.status, ExecStatus::Exited { code: 3 });
    assert!(!r.replayed);
    assert_eq!(r.idempotency_key, "run1/local1/a");
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3]);
    let streams: Vec<Stream> = chunks.iter().map(|c| c.stream).collect();
    assert_eq!(
        streams,
        [
            Stream::Stdout,
            Stream::Stderr,
            Stream::Stderr,
            Stream::Stdout
        ]
    );
    assert_eq!(text(&chunks), "one\ntwo\nWARNING: three\ndeploy.1\n");
    assert!(s.last_script_error().is_none());
}

/// The stand-in keeps the step error semantics the coordinator asks for (as the WinRM session
/// would): under `stop` an error record ends the step with exit 1 and its record, even before
/// `exit 0`; under `continue` it is shown and the exit code decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_records_fail_a_step_unless_it_says_continue() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let script = "err copy failed\nout after\nexit 0";
    let (r, chunks) = execute(&mut s, step("run1/local1/stop", script, 30_000)).await;
    assert_eq!(r.unwrap().status, ExecStatus::Exited { code: 1 });
    assert!(!text(&chunks).contains("after"), "stopped at the error");
    let e = s.last_script_error().expect("the record");
    assert_eq!(e.message, "copy failed");
    let mut req = step("run1/local1/continue", script, 30_000);
    req.errors = StepErrors::Continue;
    let (r, chunks) = execute(&mut s, req).await;
    assert_eq!(r.unwrap().status, ExecStatus::Exited { code: 0 });
    assert!(text(&chunks).contains("after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_error_is_exit_1_with_its_message_and_category() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let (r, chunks) = execute(
        &mut s,
        step(
            "run1/local1/throw",
            "out before\nthrow ObjectNotFound The item was not found\nout after",
            30_000,
        ),
    )
    .await;
    assert_eq!(r.unwrap().status, ExecStatus::Exited { code: 1 });
    let e = s.last_script_error().expect("the error record");
    assert_eq!(e.category, "ObjectNotFound");
    assert_eq!(e.message, "The item was not found");
    let out = text(&chunks);
    assert!(out.contains("before"));
    assert!(!out.contains("after"));
    assert!(
        out.contains("ObjectNotFound: The item was not found"),
        "{out}"
    );
    assert_eq!(chunks.last().unwrap().stream, Stream::Stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_runs_exactly_once_and_is_queryable() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let target = fx.file("appended.txt");
    let script = format!("append {} ran\nout done", target.display());
    assert_eq!(
        query(&mut s, "run1/local1/once").await,
        IdempotencyStatus::NotFound
    );

    let (first, out1) = execute(&mut s, step("run1/local1/once", &script, 30_000)).await;
    let first = first.unwrap();
    assert_eq!(first.status, ExecStatus::Exited { code: 0 });
    assert!(!first.replayed);
    assert_eq!(text(&out1), "done\n");

    let (second, out2) = execute(&mut s, step("run1/local1/once", &script, 30_000)).await;
    let second = second.unwrap();
    assert!(second.replayed, "the second send must replay, not run");
    assert_eq!(second.status, first.status);
    assert!(out2.is_empty());
    assert_eq!(count_lines(&target), 1, "the script ran twice");

    match query(&mut s, "run1/local1/once").await {
        IdempotencyStatus::Finished(r) => {
            assert_eq!(r.status, ExecStatus::Exited { code: 0 });
            assert!(r.replayed);
        }
        other => panic!("expected Finished, got {other:?}"),
    }
    // The marker is on the target, not in the child: a new child still knows the key.
    drop(s);
    let mut fresh = fx.local();
    let (third, _) = execute(&mut fresh, step("run1/local1/once", &script, 30_000)).await;
    assert!(third.unwrap().replayed);
    assert_eq!(count_lines(&target), 1);

    // Another key is another step.
    let (other, _) = execute(&mut fresh, step("run1/local1/twice", &script, 30_000)).await;
    assert!(!other.unwrap().replayed);
    assert_eq!(count_lines(&target), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_for_another_request_is_refused() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let target = fx.file("appended.txt");
    let (r, _) = execute(
        &mut s,
        step(
            "k/conflict",
            &format!("append {} a", target.display()),
            30_000,
        ),
    )
    .await;
    r.unwrap();
    let (r, _) = execute(
        &mut s,
        step(
            "k/conflict",
            &format!("append {} b", target.display()),
            30_000,
        ),
    )
    .await;
    let e = r.unwrap_err();
    assert!(
        matches!(e, SessionError::IdempotencyConflict(ref m) if m.contains("k/conflict")),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "a\n");
    assert_eq!(s.spawns(), 1, "a refusal does not break the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_is_timed_out_and_stored() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let target = fx.file("late.txt");
    let script = format!(
        "out started\nsleep 60000\nappend {} too-late",
        target.display()
    );
    let (r, chunks) = execute(&mut s, step("k/slow", &script, 300)).await;
    assert_eq!(r.unwrap().status, ExecStatus::TimedOut);
    assert_eq!(text(&chunks), "started\n");
    assert!(!target.exists());
    // The session host stopped the step itself: the child is the same one.
    assert_eq!(s.spawns(), 1);
    assert_eq!(s.health(), &SessionHealth::Ready);
    match query(&mut s, "k/slow").await {
        IdempotencyStatus::Finished(r) => assert_eq!(r.status, ExecStatus::TimedOut),
        other => panic!("expected Finished(TimedOut), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_step_can_be_cancelled() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let target = fx.file("never.txt");
    let canceller = s.canceller();
    assert!(!canceller.cancel("k/cancel"), "nothing runs yet");
    let mut asked = None;
    let mut seen = String::new();
    let script = format!(
        "out started\nsleep 60000\nappend {} never",
        target.display()
    );
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(step("k/cancel", &script, 120_000), |c| {
            seen.push_str(&String::from_utf8_lossy(&c.data));
            if seen.contains("started") && asked.is_none() {
                asked = Some(canceller.cancel("k/cancel"));
            }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(asked, Some(true));
    assert_eq!(r.status, ExecStatus::Cancelled);
    assert!(!target.exists());
    assert!(!canceller.cancel("k/cancel"), "nothing runs any more");
    // With nothing in flight, cancel says so (over the contract).
    assert!(
        !tokio::time::timeout(LIMIT, s.cancel("k/cancel"))
            .await
            .unwrap()
            .unwrap()
    );
    assert_eq!(s.spawns(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_a_session_never_started_starts_nothing() {
    let fx = Fixture::new();
    let mut s = fx.local();
    assert!(!s.cancel("k").await.unwrap());
    assert_eq!(s.spawns(), 0);
}

// ---------------------------------------------------------------------------------------------
// Faults: each ends typed, and the session recovers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_step_started_is_transient_and_nothing_ran() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let old = healthy(&mut s).await;
    fx.faults("crash-on=invoke\n");
    let target = fx.file("appended.txt");
    let script = format!("append {} ran", target.display());
    let (r, _) = execute(&mut s, step("k/crash-early", &script, 30_000)).await;
    let e = r.unwrap_err();
    assert!(
        matches!(e, SessionError::Unreachable(ref m) if m.contains("nothing ran") && m.contains("exited with code 101")),
        "{e:?}"
    );
    assert!(e.is_transient());
    assert!(gone(old), "the crashed child is reaped");
    // Recovery already started a new child to ask about the key.
    assert_eq!(s.spawns(), 2);
    assert_ne!(s.child_pid(), Some(old));
    // Retrying the same key is safe and runs it once.
    let (r, _) = execute(&mut s, step("k/crash-early", &script, 30_000)).await;
    assert_eq!(r.unwrap().status, ExecStatus::Exited { code: 0 });
    assert_eq!(count_lines(&target), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_destructive_step_is_uncertain_and_never_rerun() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let old = healthy(&mut s).await;
    fx.faults("crash-during=invoke\n");
    let target = fx.file("destroyed.txt");
    let script = format!("append {} destroyed", target.display());
    let (r, chunks) = execute(&mut s, step("k/destroy", &script, 30_000)).await;
    let r = r.unwrap();
    match &r.status {
        ExecStatus::Uncertain { detail } => {
            assert!(detail.contains("left started"), "{detail}");
            assert!(detail.contains("exited with code 101"), "{detail}");
        }
        other => panic!("expected Uncertain, got {other:?}"),
    }
    assert_eq!(
        text(&chunks),
        "partial\n",
        "output before the crash is delivered"
    );
    assert!(gone(old));
    assert_eq!(
        s.health(),
        &SessionHealth::Ready,
        "recovered on a new child"
    );
    assert_eq!(
        query(&mut s, "k/destroy").await,
        IdempotencyStatus::Uncertain
    );
    // Sending it again never runs it blindly.
    let (again, _) = execute(&mut s, step("k/destroy", &script, 30_000)).await;
    assert!(matches!(
        again.unwrap().status,
        ExecStatus::Uncertain { .. }
    ));
    assert!(!target.exists());
    // And other work goes on.
    let (other, _) = execute(&mut s, step("k/next", "out fine", 30_000)).await;
    assert_eq!(other.unwrap().status, ExecStatus::Exited { code: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_a_remote_session_is_uncertain_even_without_a_marker() {
    // The child died, but a WinRM session can outlive it on the target and still start the
    // step: "no marker yet" proves nothing there.
    let fx = Fixture::new();
    let mut s = fx.winrm();
    healthy(&mut s).await;
    fx.faults("crash-on=invoke\n");
    let (r, _) = execute(&mut s, step("k/remote", "out x", 30_000)).await;
    match r.unwrap().status {
        ExecStatus::Uncertain { detail } => {
            assert!(detail.contains("may still start it"), "{detail}")
        }
        other => panic!("expected Uncertain, got {other:?}"),
    }
    assert_eq!(s.spawns(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_probe_times_out_and_the_child_is_replaced() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let old = healthy(&mut s).await;
    fx.faults("hang-on=probe\n");
    let e = probe(&mut s, None, Duration::from_millis(800))
        .await
        .unwrap_err();
    assert_eq!(e, SessionError::Timeout(Duration::from_millis(800)));
    assert!(e.is_transient());
    assert!(matches!(s.health(), SessionHealth::Broken { .. }));
    assert!(gone(old), "the hung child is killed");
    assert!(s.child_pid().is_none());
    let new = healthy(&mut s).await;
    assert_ne!(new, old);
    assert_eq!(s.spawns(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_hung_past_its_deadline_ends_uncertain() {
    let fx = Fixture::new();
    let mut settings = fx.settings(PwshMode::None);
    settings.answer_margin = Duration::from_millis(300);
    let mut s = PwshSession::new("local1".into(), settings);
    let old = healthy(&mut s).await;
    fx.faults("hang-during=invoke\n");
    let (r, _) = execute(&mut s, step("k/hang", "out x", 200)).await;
    match r.unwrap().status {
        ExecStatus::Uncertain { detail } => {
            assert!(detail.contains("did not answer"), "{detail}");
        }
        other => panic!("expected Uncertain, got {other:?}"),
    }
    assert!(gone(old));
    assert_eq!(s.spawns(), 2);
    assert_eq!(query(&mut s, "k/hang").await, IdempotencyStatus::Uncertain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_a_protocol_error_and_the_child_is_replaced() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let old = healthy(&mut s).await;
    fx.faults("garbage-on=probe\n");
    let e = probe(&mut s, None, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SessionError::Protocol(ref m) if m.contains("this is not the contract")),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(gone(old));
    let new = healthy(&mut s).await;
    assert_ne!(new, old);

    // Garbage while a step is sent: in-process, the step had not started, so nothing ran.
    fx.faults("garbage-on=invoke\n");
    let (r, _) = execute(&mut s, step("k/garbage", "out x", 30_000)).await;
    let e = r.unwrap_err();
    assert!(
        matches!(e, SessionError::Unreachable(ref m) if m.contains("broke the contract") && m.contains("nothing ran")),
        "{e:?}"
    );
    assert_eq!(s.spawns(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_host_answering_in_another_contract_version_is_a_version_mismatch() {
    let fx = Fixture::new();
    fx.faults("hello-version=2\n");
    let mut s = fx.local();
    let e = probe(&mut s, None, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::Refused {
                code: RefusalCode::UnsupportedVersion,
                ref message,
            } if message.contains("contract v2")
        ),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert_eq!(
        tollgate_coordinator::transport::pwsh::answers::probe_failure(&e),
        ProbeFailure::VersionMismatch
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_authentication_is_not_transient_and_backs_off() {
    let fx = Fixture::new();
    fx.faults("auth-fail\n");
    let mut s = fx.winrm();
    let start = s.backoff();
    let e = probe(&mut s, None, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SessionError::AuthFailed(ref m) if m.contains("Access is denied") && m.contains("db1")),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert_eq!(e.reason(), ReasonCode::AuthFailed);
    assert!(s.child_pid().is_none());

    // Nothing is sent while authentication fails, and each failure waits longer.
    let target = fx.file("appended.txt");
    let (r, _) = execute(
        &mut s,
        step("k/auth", &format!("append {} x", target.display()), 30_000),
    )
    .await;
    assert!(matches!(r, Err(SessionError::AuthFailed(_))), "{r:?}");
    assert!(!target.exists());
    assert_eq!(s.spawns(), 2);
    assert!(s.backoff() > start * 2, "back-off grows: {:?}", s.backoff());

    // Once the credential is fixed, the session opens and the back-off resets.
    fx.clear_faults();
    healthy(&mut s).await;
    assert_eq!(s.backoff(), start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_is_transient() {
    let fx = Fixture::new();
    fx.faults("unreachable\n");
    let mut s = fx.winrm();
    let e = probe(&mut s, None, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SessionError::Unreachable(ref m) if m.contains("not reachable")),
        "{e:?}"
    );
    assert!(e.is_transient());
    healthy(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_midway_is_typed_and_recovers() {
    let fx = Fixture::new();
    let mut s = fx.winrm();
    // The first request is served, the second finds the session gone.
    fx.faults("lose-session-after=1\n");
    let old = healthy(&mut s).await;
    let target = fx.file("appended.txt");
    let (r, _) = execute(
        &mut s,
        step("k/lost", &format!("append {} x", target.display()), 30_000),
    )
    .await;
    match r.unwrap().status {
        ExecStatus::Uncertain { detail } => {
            assert!(detail.contains("session_lost"), "{detail}");
        }
        other => panic!("expected Uncertain, got {other:?}"),
    }
    assert!(gone(old));
    assert_eq!(query(&mut s, "k/lost").await, IdempotencyStatus::Uncertain);

    // Lost during a probe: transient, and the next probe works.
    fx.faults("lose-session-on=probe\n");
    let e = probe(&mut s, None, Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(matches!(e, SessionError::Lost(_)), "{e:?}");
    assert!(e.is_transient());
    healthy(&mut s).await;
    assert_eq!(s.spawns(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pwsh_is_a_capability_mismatch_naming_the_path() {
    let fx = Fixture::new();
    let missing = fx.file("no-such-dir/pwsh");
    let mut s = PwshSession::new("local1".into(), PwshSettings::new(&missing, PwshMode::None));
    let (r, _) = execute(&mut s, step("k/missing", "out x", 1000)).await;
    match r.unwrap().status {
        ExecStatus::CapabilityMismatch { shell, detail } => {
            assert_eq!(shell, Shell::Pwsh);
            assert!(detail.contains(&missing.display().to_string()), "{detail}");
        }
        other => panic!("expected CapabilityMismatch, got {other:?}"),
    }
    let e = probe(&mut s, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SessionError::PwshMissing { ref path, .. } if path == &missing),
        "{e:?}"
    );
    assert!(e.to_string().contains(&missing.display().to_string()));
    assert!(!e.is_transient());
    assert_eq!(e.reason(), ReasonCode::ShellUnavailable);
    assert_eq!(s.spawns(), 0);

    let mut bare = PwshSession::new(
        "local1".into(),
        PwshSettings::new("tollgate-no-such-pwsh-5c1e", PwshMode::None),
    );
    let e = probe(&mut bare, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("tollgate-no-such-pwsh-5c1e") && e.to_string().contains("PATH"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn winrm_gets_pwsh_arguments_and_only_the_credential_reference() {
    let fx = Fixture::new();
    let secret = "s3cr3t-Pa55word";
    let cred = fx.file("db1.cred");
    std::fs::write(&cred, format!("svc-tollgate:{secret}\n")).unwrap();
    let mut target = WinRmTarget::new("db1.test");
    target.port = Some(5986);
    target.authentication = WinRmAuth::Negotiate;
    target.configuration_name = Some("PowerShell.7".into());
    let mut settings = fx.settings(PwshMode::WinRm(target));
    settings.credential_ref = Some(format!("file:{}", cred.display()));
    let mut s = PwshSession::new("db1".into(), settings);
    healthy(&mut s).await;

    let launches = fx.launches();
    assert_eq!(launches.len(), 1);
    let l = &launches[0];
    let argv: Vec<String> = serde_json::from_value(l["argv"].clone()).unwrap();
    assert_eq!(
        argv[..4],
        ["-NoLogo", "-NoProfile", "-NonInteractive", "-File"]
    );
    assert!(argv[4].ends_with(".ps1"), "{argv:?}");
    let state = fx.state().to_string_lossy().into_owned();
    assert_eq!(
        argv[5..],
        [
            "-Mode",
            "winrm",
            "-ComputerName",
            "db1.test",
            "-Port",
            "5986",
            "-Authentication",
            "Negotiate",
            "-ConfigurationName",
            "PowerShell.7",
            "-StateDir",
            &state,
            "-UseSsl"
        ]
    );
    assert_eq!(l["credential_ref"], format!("file:{}", cred.display()));
    assert_eq!(
        l["credential_user"], "svc-tollgate",
        "the session host resolved it"
    );
    let everything = format!("{argv:?} {s:?} {l}");
    assert!(
        !everything.contains(secret),
        "the secret leaked: {everything}"
    );

    // A reference that does not resolve stops before anything starts, naming the variable.
    let mut settings = fx.settings(PwshMode::WinRm(WinRmTarget::new("db1.test")));
    settings.credential_ref = Some("env:TOLLGATE_TEST_CRED_SURELY_UNSET_9D".into());
    let mut s = PwshSession::new("db1".into(), settings);
    let e = probe(&mut s, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SessionError::CredentialUnavailable(ref m) if m.contains("TOLLGATE_TEST_CRED_SURELY_UNSET_9D")),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert_eq!(s.spawns(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_session_kills_its_child() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let pid = healthy(&mut s).await;
    drop(s);
    let dead = tollgate_tests::proc::eventually(Duration::from_secs(10), || gone(pid)).await;
    assert!(dead, "child {pid} outlived its session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_the_child_leave_by_itself() {
    let fx = Fixture::new();
    let mut s = fx.local();
    let pid = healthy(&mut s).await;
    tokio::time::timeout(LIMIT, s.close(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(gone(pid));
    assert_eq!(s.health(), &SessionHealth::NotStarted);
    // A closed session starts again on demand.
    healthy(&mut s).await;
    assert_eq!(s.spawns(), 2);
}
