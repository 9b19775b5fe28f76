//! `tollgate-agent` as a real process on 127.0.0.x, driven by the coordinator's agent client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tollgate_certs::Role;
use tollgate_coordinator::transport::agent::{AgentLink, LinkError};
use tollgate_protocol::Shell;
use tollgate_protocol::agent::{
    AgentErrorCode, ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk,
    ProbeRequest, Script, Stream,
};
use tollgate_tests::evidence::count_lines;
use tollgate_tests::fleet::{AgentOptions, AgentProcess, TestPki};
use tollgate_tests::proc::{alive, eventually};

const LIMIT: Duration = Duration::from_secs(30);

fn sh(key: &str, script: &str, timeout_ms: u64) -> ExecuteRequest {
    ExecuteRequest {
        idempotency_key: key.to_string(),
        shell: Shell::Sh,
        script: script.to_string(),
        env: BTreeMap::new(),
        working_dir: None,
        timeout_ms,
        errors: tollgate_protocol::StepErrors::Stop,
    }
}

async fn run(link: &AgentLink, req: ExecuteRequest) -> (ExecResult, Vec<OutputChunk>) {
    let mut chunks = Vec::new();
    let r = tokio::time::timeout(LIMIT, link.execute(req, |c| chunks.push(c)))
        .await
        .expect("in time")
        .expect("ok");
    (r, chunks)
}

/// Starts `req` in the background; returns a receiver of its output and its join handle.
fn spawn_exec(
    link: &AgentLink,
    req: ExecuteRequest,
) -> (
    mpsc::UnboundedReceiver<OutputChunk>,
    tokio::task::JoinHandle<Result<ExecResult, LinkError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let link = link.clone();
    let h = tokio::spawn(async move { link.execute(req, move |c| drop(tx.send(c))).await });
    (rx, h)
}

async fn wait_for_output(rx: &mut mpsc::UnboundedReceiver<OutputChunk>, needle: &str) {
    let found = tokio::time::timeout(LIMIT, async {
        let mut seen = String::new();
        while let Some(c) = rx.recv().await {
            seen.push_str(&String::from_utf8_lossy(&c.data));
            if seen.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "output {needle:?} never came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_interleaved_output_in_order_with_exit_code_and_duration() {
    let pki = TestPki::new().unwrap();
    let agent = AgentProcess::start(&pki, &AgentOptions::new("web1", 2))
        .await
        .unwrap();
    let link = agent.connect(&pki.coordinator().unwrap()).await.unwrap();
    let script =
        "echo o1; sleep 0.2; echo e1 >&2; sleep 0.2; echo o2; sleep 0.2; echo e2 >&2; exit 3";
    let (r, chunks) = run(&link, sh("order-1", script, 20_000)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 3 });
    assert!(r.duration_ms >= 600, "duration {} ms", r.duration_ms);
    assert!(!r.replayed && !r.stdout_truncated && !r.stderr_truncated);
    let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(
        seqs,
        (0..chunks.len() as u64).collect::<Vec<_>>(),
        "sequence numbers are dense and ordered"
    );
    let got: Vec<(Stream, String)> = chunks
        .iter()
        .map(|c| {
            (
                c.stream,
                String::from_utf8_lossy(&c.data).trim().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (Stream::Stdout, "o1".to_string()),
            (Stream::Stderr, "e1".to_string()),
            (Stream::Stdout, "o2".to_string()),
            (Stream::Stderr, "e2".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_leave_no_child_alive() {
    let pki = TestPki::new().unwrap();
    let agent = AgentProcess::start(&pki, &AgentOptions::new("web1", 3))
        .await
        .unwrap();
    let link = agent.connect(&pki.coordinator().unwrap()).await.unwrap();
    let dir = pki.root().join("pids");
    std::fs::create_dir_all(&dir).unwrap();

    // Timeout: a grandchild sleeps "forever"; its pid is written first.
    let pidfile = dir.join("timeout.pid");
    let script = format!(
        "sleep 1000 & echo $! > {}; echo started; wait",
        pidfile.display()
    );
    let (r, _) = run(&link, sh("timeout-1", &script, 700)).await;
    assert_eq!(r.status, ExecStatus::TimedOut);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)).await,
        "grandchild {pid} survived the timeout"
    );

    // Cancel: wait until it says it started, then cancel over another stream.
    let pidfile = dir.join("cancel.pid");
    let script = format!(
        "sleep 1000 & echo $! > {}; echo started; wait",
        pidfile.display()
    );
    let (mut out, handle) = spawn_exec(&link, sh("cancel-1", &script, 600_000));
    wait_for_output(&mut out, "started").await;
    assert!(
        link.cancel("cancel-1").await.unwrap(),
        "cancel found the execution"
    );
    let r = tokio::time::timeout(LIMIT, handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.status, ExecStatus::Cancelled);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)).await,
        "grandchild {pid} survived the cancel"
    );
    assert!(
        !link.cancel("cancel-1").await.unwrap(),
        "nothing left to cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_runs_once_across_repeats_and_restarts() {
    let pki = TestPki::new().unwrap();
    let mut agent = AgentProcess::start(&pki, &AgentOptions::new("web1", 4))
        .await
        .unwrap();
    let connector = pki.coordinator().unwrap();
    let file = pki.root().join("appended.txt");
    let req = sh(
        "append-1",
        &format!("echo line >> {}", file.display()),
        10_000,
    );

    let link = agent.connect(&connector).await.unwrap();
    let (first, _) = run(&link, req.clone()).await;
    assert_eq!(first.status, ExecStatus::Exited { code: 0 });
    assert!(!first.replayed);
    let (second, _) = run(&link, req.clone()).await;
    assert!(second.replayed, "second send is answered from the store");
    assert_eq!(second.status, first.status);
    assert_eq!(count_lines(&file), 1);

    // Graceful restart.
    assert!(agent.terminate().await.unwrap().success());
    agent.restart().await.unwrap();
    let link = agent.connect(&connector).await.unwrap();
    let (third, _) = run(&link, req.clone()).await;
    assert!(third.replayed);
    assert_eq!(
        count_lines(&file),
        1,
        "a restart does not make the agent forget"
    );
    assert!(
        matches!(link.query("append-1").await.unwrap(), IdempotencyStatus::Finished(r) if r.status == first.status)
    );

    // The same key for a different script is refused, not replayed.
    let other = sh("append-1", "echo different", 10_000);
    let err = link.execute(other, |_| {}).await.unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Refused {
                code: AgentErrorCode::IdempotencyConflict,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        link.query("never-sent").await.unwrap(),
        IdempotencyStatus::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_left_started_by_a_killed_agent_is_uncertain_and_never_rerun() {
    let pki = TestPki::new().unwrap();
    let mut agent = AgentProcess::start(&pki, &AgentOptions::new("web1", 5))
        .await
        .unwrap();
    let connector = pki.coordinator().unwrap();
    let file = pki.root().join("ran.txt");
    let req = sh(
        "doomed-1",
        &format!("echo ran >> {}; echo started; sleep 1000", file.display()),
        600_000,
    );
    let link = agent.connect(&connector).await.unwrap();
    let (mut out, handle) = spawn_exec(&link, req.clone());
    wait_for_output(&mut out, "started").await;
    agent.kill().await.unwrap();
    let lost = tokio::time::timeout(LIMIT, handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(lost, LinkError::Lost(_)),
        "a dispatched request whose connection dies is Lost: {lost}"
    );

    agent.restart().await.unwrap();
    let link = agent.connect(&connector).await.unwrap();
    assert_eq!(
        link.query("doomed-1").await.unwrap(),
        IdempotencyStatus::Uncertain
    );
    let (r, _) = run(&link, req).await;
    assert!(matches!(r.status, ExecStatus::Uncertain { .. }), "{r:?}");
    assert!(r.replayed);
    assert_eq!(count_lines(&file), 1, "an uncertain key is never run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pwsh_where_none_is_installed_is_capability_mismatch_and_nothing_runs() {
    let pki = TestPki::new().unwrap();
    // If this machine has pwsh, point the agent at one that does not exist.
    let opts = if tollgate_agent_has_pwsh() {
        AgentOptions::new("web1", 6).with("pwsh_path = \"/nonexistent/pwsh\"")
    } else {
        AgentOptions::new("web1", 6)
    };
    let agent = AgentProcess::start(&pki, &opts).await.unwrap();
    let link = agent.connect(&pki.coordinator().unwrap()).await.unwrap();
    let marker = pki.root().join("pwsh-ran");
    let req = ExecuteRequest {
        shell: Shell::Pwsh,
        ..sh(
            "pwsh-1",
            &format!("New-Item -ItemType File {}", marker.display()),
            10_000,
        )
    };
    let (r, chunks) = run(&link, req).await;
    match &r.status {
        ExecStatus::CapabilityMismatch { shell, detail } => {
            assert_eq!(*shell, Shell::Pwsh);
            assert!(detail.contains("pwsh"), "{detail}");
        }
        other => panic!("expected CapabilityMismatch, got {other:?}"),
    }
    assert!(chunks.is_empty() && !marker.exists(), "nothing executed");
    assert_eq!(
        link.query("pwsh-1").await.unwrap(),
        IdempotencyStatus::NotFound,
        "nothing recorded"
    );

    // A shell the config does not allow is refused the same way.
    let agent2 = AgentProcess::start(
        &pki,
        &AgentOptions::new("web2", 7).with("allowed_shells = [\"pwsh\"]"),
    )
    .await
    .unwrap();
    let link2 = agent2.connect(&pki.coordinator().unwrap()).await.unwrap();
    let (r, _) = run(
        &link2,
        sh("sh-1", &format!("touch {}", marker.display()), 10_000),
    )
    .await;
    assert!(
        matches!(&r.status, ExecStatus::CapabilityMismatch { shell: Shell::Sh, detail } if detail.contains("allowed_shells")),
        "{r:?}"
    );
    assert!(!marker.exists());
}

fn tollgate_agent_has_pwsh() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("pwsh").is_file()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_facts_and_a_stable_fingerprint() {
    let pki = TestPki::new().unwrap();
    let agent = AgentProcess::start(&pki, &AgentOptions::new("web1", 8))
        .await
        .unwrap();
    let link = agent.connect(&pki.coordinator().unwrap()).await.unwrap();
    let plain = ProbeRequest {
        script: None,
        timeout_ms: 10_000,
    };
    let a = link.probe(plain.clone(), LIMIT).await.unwrap();
    let b = link.probe(plain, LIMIT).await.unwrap();
    assert_eq!(
        a.fingerprint, b.fingerprint,
        "nothing changed, same fingerprint"
    );
    assert_eq!(a.fingerprint.len(), 64);
    for key in [
        "host.name",
        "os.family",
        "os.arch",
        "agent.version",
        "agent.id",
        "pwsh.present",
    ] {
        assert!(a.facts.contains_key(key), "missing {key}: {:?}", a.facts);
    }
    assert_eq!(a.facts["agent.id"], "spiffe://test/agent/web1");
    assert!(a.volatile.contains_key("time.unix_ms") && !a.facts.contains_key("time.unix_ms"));

    let scripted = |body: &str| ProbeRequest {
        script: Some(Script {
            shell: Shell::Sh,
            body: body.into(),
        }),
        timeout_ms: 10_000,
    };
    let c = link
        .probe(
            scripted(r#"echo '{"app_version":"1.2.3","replicas":3}'"#),
            LIMIT,
        )
        .await
        .unwrap();
    assert_eq!(c.facts["probe.app_version"], "1.2.3");
    assert_eq!(c.facts["probe.replicas"], "3");
    assert_ne!(
        c.fingerprint, a.fingerprint,
        "probe facts are fingerprinted"
    );
    let d = link
        .probe(
            scripted(r#"echo '{"app_version":"1.2.4","replicas":3}'"#),
            LIMIT,
        )
        .await
        .unwrap();
    assert_ne!(
        c.fingerprint, d.fingerprint,
        "a changed fact changes the fingerprint"
    );

    for (body, want, needle) in [
        ("echo not json", AgentErrorCode::ProbeMalformed, "not JSON"),
        ("exit 7", AgentErrorCode::ProbeFailed, "code 7"),
        ("sleep 30", AgentErrorCode::ProbeTimedOut, "timed out"),
    ] {
        let req = ProbeRequest {
            timeout_ms: 500,
            ..scripted(body)
        };
        // The code is what the coordinator acts on; the words are for people.
        match link.probe(req, LIMIT).await.unwrap_err() {
            LinkError::Refused { code, message } if code == want => {
                assert!(message.contains(needle), "{body}: {message}")
            }
            other => panic!("{body}: {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_identity_garbage_and_oversize_clients_are_refused_and_service_continues() {
    let pki = TestPki::new().unwrap();
    let mut agent = AgentProcess::start(
        &pki,
        &AgentOptions::new("web1", 9).with("max_frame_bytes = 65536"),
    )
    .await
    .unwrap();
    let good = pki.coordinator().unwrap();
    let link = agent.connect(&good).await.unwrap();

    // An operator certificate is refused during the handshake, before any request.
    let operator = pki.connector_as(Role::Operator, Some("mallory")).unwrap();
    let err = agent.connect(&operator).await.unwrap_err().to_string();
    assert!(err.contains("WrongRole"), "{err}");
    // Another agent's certificate posing as the coordinator, too.
    let imposter = pki.connector_as(Role::Agent, Some("web2")).unwrap();
    let err = agent.connect(&imposter).await.unwrap_err().to_string();
    assert!(err.contains("WrongRole"), "{err}");

    // A coordinator-certified client that sends garbage, then one that announces an oversize frame.
    for (bytes, want) in [
        (b"\x00\x00\x00\x05hello".to_vec(), AgentErrorCode::Malformed),
        ((u32::MAX).to_be_bytes().to_vec(), AgentErrorCode::Oversize),
    ] {
        let answer = raw_request(&pki, &agent, &bytes).await;
        assert_eq!(answer, Some(want));
    }

    // The right client is still served, on its existing connection and on a new one.
    let (r, _) = run(&link, sh("after-abuse", "echo fine", 10_000)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 0 });
    let fresh = agent.connect(&good).await.unwrap();
    fresh
        .probe(
            ProbeRequest {
                script: None,
                timeout_ms: 5_000,
            },
            LIMIT,
        )
        .await
        .unwrap();
    assert!(agent.pid().is_some_and(alive));
    agent.kill().await.unwrap();
}

/// Opens a raw connection with the coordinator's identity, says Hello properly, then sends
/// `bytes` as a request and returns the error code the agent answers with.
async fn raw_request(pki: &TestPki, agent: &AgentProcess, bytes: &[u8]) -> Option<AgentErrorCode> {
    use tollgate_protocol::agent::{AgentRequest, AgentResponse, Hello};
    use tollgate_protocol::io::{read_frame, write_frame};
    use tollgate_protocol::{FrameLimits, SUPPORTED};
    let identity = pki.identity(Role::Coordinator, None).unwrap();
    let cfg = tollgate_certs::quic::client_config(
        &identity,
        &pki.trust().unwrap(),
        agent.id.clone(),
        tollgate_protocol::AGENT_ALPN,
        tollgate_certs::RejectionLog::new(),
        tollgate_certs::quic::QuicTimeouts::default(),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(cfg, agent.addr, &agent.id.server_name())
        .unwrap()
        .await
        .unwrap();
    let limits = FrameLimits::DEFAULT;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = AgentRequest::Hello(Hello {
        versions: SUPPORTED,
        software: "abuser".into(),
    });
    write_frame(&mut send, &hello, &limits).await.unwrap();
    send.finish().unwrap();
    let ack: Option<AgentResponse> = read_frame(&mut recv, &limits).await.unwrap();
    assert!(matches!(ack, Some(AgentResponse::HelloAck(_))));
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let answer = tokio::time::timeout(LIMIT, read_frame::<_, AgentResponse>(&mut recv, &limits))
        .await
        .unwrap();
    // The agent then closes this connection.
    let reason = tokio::time::timeout(LIMIT, conn.closed()).await.unwrap();
    assert!(reason.to_string().contains("closed by peer"), "{reason}");
    match answer {
        Ok(Some(AgentResponse::Error(e))) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_records_the_outcome_of_what_was_running() {
    let pki = TestPki::new().unwrap();
    let mut agent = AgentProcess::start(
        &pki,
        &AgentOptions::new("web1", 10).with("shutdown_grace_secs = 1"),
    )
    .await
    .unwrap();
    let connector = pki.coordinator().unwrap();
    let link = agent.connect(&connector).await.unwrap();
    let pidfile = pki.root().join("grace.pid");
    let script = format!(
        "sleep 1000 & echo $! > {}; echo started; wait",
        pidfile.display()
    );
    let (mut out, handle) = spawn_exec(&link, sh("long-1", &script, 600_000));
    wait_for_output(&mut out, "started").await;
    let status = agent.terminate().await.unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
    // The client still got the typed end, and the grandchild is gone.
    let r = tokio::time::timeout(LIMIT, handle).await.unwrap().unwrap();
    if let Ok(r) = &r {
        assert!(matches!(r.status, ExecStatus::Interrupted { .. }), "{r:?}");
    }
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || !alive(pid)).await);
    agent.restart().await.unwrap();
    let link = agent.connect(&connector).await.unwrap();
    match link.query("long-1").await.unwrap() {
        IdempotencyStatus::Finished(r) => {
            assert!(matches!(r.status, ExecStatus::Interrupted { .. }), "{r:?}")
        }
        other => panic!("shutdown must record a result, got {other:?}"),
    }
}
