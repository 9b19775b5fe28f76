//! PowerShell Remoting over SSH for real: the coordinator's session host (a real `pwsh`)
//! opens a real PSSession (`New-PSSession -HostName`) to a real `sshd` on 127.0.0.x whose
//! `powershell` subsystem is the real `pwsh -sshs`. Keys come from `ssh-keygen`; each test seeds
//! its own `known_hosts`, never the account's `~/.ssh`. Runs where `pwsh` and `sshd` are present;
//! elsewhere it says it did not run (and fails under `TOLLGATE_REQUIRE_PWSH=1` /
//! `TOLLGATE_REQUIRE_SSHD=1`, which CI sets).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tollgate_coordinator::core::outcome::{Capability, TypedOutcome};
use tollgate_coordinator::transport::pwsh::{
    PwshMode, PwshSession, PwshSettings, SessionError, SessionHealth, SshTarget, answers,
};
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, ProbeRequest,
};
use tollgate_protocol::{Shell, StepErrors};
use tollgate_tests::sshd::{KeyPair, Sshd, SshdSpec, current_user, write_known_hosts};

const LIMIT: Duration = Duration::from_secs(120);

/// One sshd target, the coordinator's key, and a known_hosts file that pins the target.
struct Target {
    dir: tempfile::TempDir,
    pwsh: PathBuf,
    client: KeyPair,
    sshd: Sshd,
    known_hosts: PathBuf,
}

impl Target {
    /// `None` where pwsh or sshd is missing (after saying so).
    fn start(addr: Ipv4Addr) -> Option<Target> {
        Target::start_with(addr, "powershell", |_| {})
    }

    fn start_with(addr: Ipv4Addr, subsystem: &str, edit: impl FnOnce(&Path)) -> Option<Target> {
        let (pwsh, sshd_program) = tollgate_tests::real::pwsh_and_sshd("real SSH-remoting tests")?;
        let dir = tempfile::tempdir().unwrap();
        let client = KeyPair::generate(&dir.path().join("coordinator_ed25519")).unwrap();
        edit(dir.path());
        let spec = SshdSpec {
            addr,
            authorized: vec![client.public.clone()],
            pwsh: pwsh.clone(),
            subsystem: subsystem.to_owned(),
            extra: Vec::new(),
        };
        let sshd = Sshd::start(&sshd_program, &dir.path().join("sshd"), &spec).unwrap();
        let known_hosts = dir.path().join("known_hosts");
        write_known_hosts(&known_hosts, &[sshd.known_hosts_line()]).unwrap();
        Some(Target {
            dir,
            pwsh,
            client,
            sshd,
            known_hosts,
        })
    }

    /// The inventory entry's settings for this target, as the transport receives them.
    fn ssh(&self) -> SshTarget {
        let mut t = SshTarget::new(self.sshd.addr.to_string());
        t.port = Some(self.sshd.port);
        t.user = Some(current_user());
        t.key_file = Some(self.client.private.clone());
        t.known_hosts = Some(self.known_hosts.clone());
        t.connect_timeout_secs = Some(10);
        t
    }

    fn session_with(&self, ssh: SshTarget) -> PwshSession {
        let mut s = PwshSettings::new(self.pwsh.clone(), PwshMode::Ssh(ssh));
        s.state_dir = Some(self.dir.path().join("target-state").display().to_string());
        s.connect_timeout = Duration::from_secs(60);
        s.request_timeout = Duration::from_secs(30);
        s.answer_margin = Duration::from_secs(30);
        PwshSession::new(format!("ssh-{}", self.sshd.addr), s)
    }

    fn session(&self) -> PwshSession {
        self.session_with(self.ssh())
    }
}

fn step(key: &str, script: &str, timeout_ms: u64) -> ExecuteRequest {
    tollgate_tests::pwsh::step(key, Shell::Pwsh, script, timeout_ms)
}

fn probe_request() -> ProbeRequest {
    ProbeRequest {
        script: None,
        timeout_ms: 30_000,
    }
}

async fn execute(s: &mut PwshSession, req: ExecuteRequest) -> (ExecResult, String) {
    let mut out = String::new();
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(req, |c| out.push_str(&String::from_utf8_lossy(&c.data))),
    )
    .await
    .expect("in time")
    .expect("executed");
    (r, out)
}

async fn probe_error(s: &mut PwshSession) -> (SessionError, Duration) {
    let started = Instant::now();
    let e = tokio::time::timeout(LIMIT, s.probe(probe_request(), Duration::from_secs(60)))
        .await
        .expect("in time")
        .expect_err("the probe must fail");
    (e, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_session_probes_streams_and_runs_a_key_once() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 31)) else {
        return;
    };
    let mut s = t.session();
    let facts = tokio::time::timeout(LIMIT, s.probe(probe_request(), Duration::from_secs(90)))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("probe over ssh: {e}\n{}", t.sshd.log()));
    assert_eq!(facts.facts["os.family"], "linux");
    assert!(!facts.facts["pwsh.version"].is_empty());
    assert_eq!(s.health(), &SessionHealth::Ready);
    assert_eq!(s.hello().map(|h| h.mode.as_str()), Some("ssh"));
    assert!(
        t.sshd.log().contains("subsystem 'powershell'"),
        "{}",
        t.sshd.log()
    );

    let marker = t.dir.path().join("ran.txt");
    let script = format!(
        "Write-Output \"on $([System.Net.Dns]::GetHostName()) as $env:TOLLGATE_STEP\"\nAdd-Content -LiteralPath '{}' -Value 'ran'",
        marker.display()
    );
    let (r, out) = execute(&mut s, step("ssh/once", &script, 60_000)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 0 }, "{out}");
    assert!(out.contains("as deploy.1"), "{out}");
    let (again, _) = execute(&mut s, step("ssh/once", &script, 60_000)).await;
    assert!(again.replayed, "the same key answers its stored result");
    assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 1);
    assert_eq!(
        s.spawns(),
        1,
        "one session host, one PSSession, for every step"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_host_key_missing_from_known_hosts_fails_closed_before_connecting() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 32)) else {
        return;
    };
    // A known_hosts file that names another host only.
    let other = t.dir.path().join("other_known_hosts");
    write_known_hosts(
        &other,
        &[format!("[127.0.0.99]:22 {}", t.sshd.host_key.key_only())],
    )
    .unwrap();
    let mut ssh = t.ssh();
    ssh.known_hosts = Some(other.clone());
    let mut s = t.session_with(ssh);
    let (e, took) = probe_error(&mut s).await;
    assert!(matches!(e, SessionError::HostKeyUnknown(_)), "{e}");
    assert!(!e.is_transient(), "never retried: a person adds the key");
    assert!(e.to_string().contains(&t.sshd.host_spec()), "{e}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        !t.sshd.log().contains("Connection from"),
        "no connection is made to a host whose key is not pinned:\n{}",
        t.sshd.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_changed_host_key_fails_closed_without_authenticating() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 33)) else {
        return;
    };
    let impostor = KeyPair::generate(&t.dir.path().join("impostor_host_key")).unwrap();
    write_known_hosts(
        &t.known_hosts,
        &[format!("{} {}", t.sshd.host_spec(), impostor.key_only())],
    )
    .unwrap();
    let mut s = t.session();
    let (e, took) = probe_error(&mut s).await;
    assert!(matches!(e, SessionError::HostKeyChanged(_)), "{e}");
    assert!(!e.is_transient());
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        !t.sshd.log().contains("Accepted publickey"),
        "the client must stop before it authenticates:\n{}",
        t.sshd.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_wrong_key_is_an_authentication_failure_never_retried() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 34)) else {
        return;
    };
    let stranger = KeyPair::generate(&t.dir.path().join("stranger_ed25519")).unwrap();
    let mut ssh = t.ssh();
    ssh.key_file = Some(stranger.private.clone());
    let mut s = t.session_with(ssh);
    let (e, _) = probe_error(&mut s).await;
    assert!(matches!(e, SessionError::AuthFailed(_)), "{e}");
    assert!(!e.is_transient(), "a refused key is not retried");
    let (r, _) = (
        tokio::time::timeout(
            LIMIT,
            s.execute(step("ssh/denied", "Write-Output hi", 30_000), |_| {}),
        )
        .await
        .unwrap(),
        (),
    );
    let e = r.expect_err("execute over a refused key fails");
    assert!(matches!(e, SessionError::AuthFailed(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_target_not_listening_is_unreachable_and_transient() {
    let Some(mut t) = Target::start(Ipv4Addr::new(127, 0, 0, 35)) else {
        return;
    };
    t.sshd.stop();
    let mut s = t.session();
    let (e, _) = probe_error(&mut s).await;
    assert!(matches!(e, SessionError::Unreachable(_)), "{e}");
    assert!(e.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_target_stopped_mid_step_is_uncertain_then_answered_by_its_marker() {
    let Some(mut t) = Target::start(Ipv4Addr::new(127, 0, 0, 36)) else {
        return;
    };
    let mut s = t.session();
    let script = "Write-Output 'started'\nStart-Sleep -Seconds 60\nWrite-Output 'finished'";
    let mut seen = String::new();
    let mut stopped = false;
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(step("ssh/cut", script, 120_000), |c| {
            seen.push_str(&String::from_utf8_lossy(&c.data));
            if seen.contains("started") && !stopped {
                stopped = true;
                t.sshd.stop();
            }
        }),
    )
    .await
    .expect("in time");
    assert!(stopped, "the step started before the host went away");
    // Sent, then the host vanished: never a success, never a silent re-run.
    match r {
        Ok(r) => assert!(matches!(r.status, ExecStatus::Uncertain { .. }), "{r:?}"),
        Err(e) => assert!(e.is_transient(), "{e}"),
    }
    assert!(!seen.contains("finished"), "{seen}");

    // The host comes back (same address, same host key): the key is queried, not re-sent.
    t.sshd.run().unwrap();
    let q = tokio::time::timeout(LIMIT, s.query("ssh/cut"))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("query after restart: {e}\n{}", t.sshd.log()));
    assert!(
        matches!(q, IdempotencyStatus::Uncertain | IdempotencyStatus::Running),
        "a step cut off mid-way is not finished and not unknown: {q:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_target_pwsh_killed_mid_step_is_uncertain_and_the_session_reopens() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 37)) else {
        return;
    };
    let mut s = t.session();
    let script = "Write-Output 'started'\nStart-Sleep -Seconds 60\nWrite-Output 'finished'";
    let mut seen = String::new();
    let mut killed = Vec::new();
    let r = tokio::time::timeout(
        LIMIT,
        s.execute(step("ssh/killed", script, 120_000), |c| {
            seen.push_str(&String::from_utf8_lossy(&c.data));
            if seen.contains("started") && killed.is_empty() {
                killed = t.sshd.session_pwsh_pids();
                tollgate_tests::sshd::kill_all(&killed);
            }
        }),
    )
    .await
    .expect("in time");
    assert!(
        !killed.is_empty(),
        "the target's pwsh -sshs was found and killed"
    );
    match r {
        Ok(r) => assert!(matches!(r.status, ExecStatus::Uncertain { .. }), "{r:?}"),
        Err(e) => assert!(e.is_transient(), "{e}"),
    }
    assert!(!seen.contains("finished"), "{seen}");
    // The session is re-opened for the next step, to the same host.
    let (r, out) = execute(&mut s, step("ssh/after", "Write-Output 'again'", 60_000)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 0 }, "{out}");
    assert!(out.contains("again"));
    assert_eq!(s.spawns(), 2, "one new session host after the break");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_last_native_exit_code_and_errors_cross_the_remoting_boundary() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 39)) else {
        return;
    };
    let mut s = t.session();
    // $LASTEXITCODE lives in the target's runspace; it does not cross remoting by itself.
    let (r, out) = execute(
        &mut s,
        step(
            "ssh/native",
            "Write-Output 'before'\nsh -c 'exit 7'",
            60_000,
        ),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 7 }, "{out}");
    // A terminating error on the target is exit 1, its record kept.
    let (r, _) = execute(
        &mut s,
        step(
            "ssh/throw",
            "$ErrorActionPreference = 'Stop'\nGet-Item -LiteralPath '/nonexistent/tollgate'\nWrite-Output 'after'",
            60_000,
        ),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    let e = s.last_script_error().expect("the error record crossed");
    assert_eq!(e.category, "ObjectNotFound");
    assert_eq!(s.spawns(), 1);
}

/// Step error semantics through a real SSH remoting session: the shared table under
/// `errors = "stop"` and `"continue"`, in the target's runspace, on one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_error_records_fail_a_step_unless_it_says_continue() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 40)) else {
        return;
    };
    let mut s = t.session();
    for (i, case) in tollgate_tests::pwsh::ERROR_CASES.iter().enumerate() {
        for errors in [StepErrors::Stop, StepErrors::Continue] {
            let mut req = step(&format!("ssh/errors/{i}/{errors}"), case.script, 60_000);
            req.errors = errors;
            let (r, chunks) = tollgate_tests::pwsh::execute(&mut s, req).await;
            case.assert(errors, &r.status, &chunks);
        }
    }
    assert_eq!(s.spawns(), 1, "one session host for every case");
}

/// A `pwsh` on the coordinator too old for SSH remoting with options (`New-PSSession -Options`
/// is 7.3+, and without it `BatchMode` could not be set, so ssh could prompt): the open fails
/// closed, typed `PwshTooOld` (not retried), naming the version found and the version needed,
/// and reads as `CapabilityMismatch` (shell) at preflight; no connection is made.
///
/// The old PowerShell is a stand-in (no pwsh older than 7.3 runs on this machine's .NET): the
/// real pwsh running a copy of the session host in which a `New-PSSession` function without
/// `-Options` shadows the cmdlet, which is exactly what the session host checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_pwsh_without_ssh_options_is_a_capability_mismatch_naming_both_versions() {
    let Some(t) = Target::start(Ipv4Addr::new(127, 0, 0, 41)) else {
        return;
    };
    let old = t.dir.path().join("old-pwsh");
    let copy = t.dir.path().join("session_host_before_7_3.ps1");
    std::fs::write(
        &old,
        format!(
            r#"#!/bin/sh
# The real pwsh, but the session host it runs has a New-PSSession without -Options.
count=$#
take=0
for a in "$@"; do
  if [ "$take" = 1 ]; then
    awk '{{ print }} /^Set-StrictMode/ {{ print "function New-PSSession {{ [CmdletBinding()] param([string]$HostName, [string]$UserName, [string]$KeyFilePath, [int]$Port, [string]$Subsystem) throw \"old\" }}" }}' "$a" > '{copy}'
    a='{copy}'
    take=0
  elif [ "$a" = "-File" ]; then
    take=1
  fi
  set -- "$@" "$a"
done
shift $count
exec '{real}' "$@"
"#,
            copy = copy.display(),
            real = t.pwsh.display()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let version = {
        let out = std::process::Command::new(&t.pwsh)
            .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-Command"])
            .arg("$PSVersionTable.PSVersion.ToString()")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let mut settings = PwshSettings::new(old.clone(), PwshMode::Ssh(t.ssh()));
    settings.connect_timeout = Duration::from_secs(60);
    settings.request_timeout = Duration::from_secs(30);
    let mut s = PwshSession::new("ssh-old".into(), settings);
    let (e, _) = probe_error(&mut s).await;
    assert!(copy.exists(), "the stand-in ran the shadowed copy");
    assert!(matches!(e, SessionError::PwshTooOld(_)), "{e}");
    assert!(!e.is_transient(), "not retried: a person upgrades pwsh");
    let text = e.to_string();
    assert!(
        text.contains(&format!("PowerShell {version}")) && text.contains("needs 7.3"),
        "names the version found and the one needed: {text}"
    );
    let failure = answers::probe_failure(&e);
    assert!(
        matches!(
            failure.outcome(),
            TypedOutcome::CapabilityMismatch {
                capability: Capability::Shell
            }
        ),
        "{failure:?}"
    );
    assert!(
        failure.describe().contains("needs 7.3"),
        "{}",
        failure.describe()
    );
    assert!(
        !t.sshd.log().contains("Connection from"),
        "no connection is tried:\n{}",
        t.sshd.log()
    );
}
