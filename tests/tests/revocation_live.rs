//! Issue 12, finding 5: revocation takes effect while every process keeps running. Real
//! `tollgate serve`, real agents, the CLI, on loopback; nothing is restarted after a revocation
//! (the process ids are checked).
//!
//! The coordinator here re-reads its CRL only on SIGHUP (`tls.crl_check = "1h"`), so each of
//! its steps proves the signal path; the agents re-read theirs on their own every 2 s (the
//! default), which proves the periodic path. Waiting is on the coordinator's own log line
//! ("new CRL in force", written after every open connection was re-checked) and on the QUIC
//! close of a link, each with a deadline.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use tollgate_certs::pki::RevokeTarget;
use tollgate_certs::trust::CLOSE_UNTRUSTED;
use tollgate_certs::{Role, SpiffeId};
use tollgate_tests::fleet::FLEET;
use tollgate_tests::invariants::is_typed;
use tollgate_tests::lab::{DEFAULT_HOSTS, Lab};
use tollgate_tests::operations;
use tollgate_tests::proc::eventually;

const LIMIT: Duration = Duration::from_secs(20);

fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Sends SIGHUP to serve and waits until it has put the new CRL in force.
async fn hangup_and_wait(lab: &Lab, log: &Path) {
    let before = log_lines(log, "new CRL in force").len();
    lab.serve.as_ref().unwrap().hangup().unwrap();
    assert!(
        eventually(LIMIT, || log_lines(log, "new CRL in force").len() > before).await,
        "serve did not put the new CRL in force within {LIMIT:?} of SIGHUP; see {}",
        log.display()
    );
}

fn pids(lab: &Lab) -> Vec<Option<u32>> {
    let mut p = vec![lab.serve.as_ref().unwrap().pid()];
    p.extend(lab.agents.values().map(|a| a.pid()));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_without_a_restart() {
    let mut lab = Lab::start_with(
        DEFAULT_HOSTS,
        &operations::gated(),
        "",
        vec![("TOLLGATE_LOG", "tollgate_certs=info,warn".into())],
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&lab.config).unwrap();
    std::fs::write(
        &lab.config,
        text.replacen("[tls]\n", "[tls]\ncrl_check = \"1h\"\n", 1),
    )
    .unwrap();
    lab.serve.as_mut().unwrap().kill().await.unwrap();
    lab.start_serve().await.unwrap();
    let log = lab.config.with_extension("log");
    let processes = pids(&lab);
    assert!(processes.iter().all(Option::is_some));

    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let out = lab
        .cli("erin", &["deploy", "--hosts", "web1"])
        .await
        .unwrap();
    assert_eq!(
        out.code, 0,
        "erin may deploy before her revocation: {out:?}"
    );

    // 1. An operator revoked: her next command is refused by the running coordinator.
    lab.pki
        .pki
        .revoke(&RevokeTarget::Identity(
            SpiffeId::new(FLEET, Role::Operator, Some("erin")).unwrap(),
        ))
        .unwrap();
    hangup_and_wait(&lab, &log).await;
    let before = lab.markers();
    let out = lab.cli("erin", &["deploy"]).await.unwrap();
    assert_eq!(out.code, 3, "a revoked operator was heard: {out:?}");
    assert!(
        lab.markers().began_since(&before).values().all(|n| *n == 0),
        "steps began for a revoked operator"
    );
    let out = lab
        .cli("alice", &["deploy", "--hosts", "web1"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "alice is not revoked: {out:?}");

    // 2. An agent revoked: the coordinator closes its open link to it and refuses new ones.
    let web2 = SpiffeId::agent(FLEET, "web2").unwrap();
    lab.pki
        .pki
        .revoke(&RevokeTarget::Identity(web2.clone()))
        .unwrap();
    hangup_and_wait(&lab, &log).await;
    let cut = log_lines(&log, "no longer verifies");
    assert!(
        cut.iter().any(|l| l.contains(&web2.to_string())),
        "the open link to web2 was not closed: {cut:?}"
    );
    let before = lab.markers();
    let out = lab
        .cli("alice", &["deploy", "--hosts", "web2"])
        .await
        .unwrap();
    assert!(
        is_typed(&out) && out.code != 0,
        "a deploy to a revoked agent: {out:?}"
    );
    let began = lab.markers().began_since(&before);
    assert!(
        began.values().all(|n| *n == 0),
        "steps began on a revoked agent: {began:?}"
    );
    let out = lab
        .cli("alice", &["deploy", "--hosts", "web1"])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "web1 is not revoked: {out:?}");

    // 3. The coordinator revoked: every agent, re-reading its CRL on its own, closes the
    // coordinator's open links and refuses new ones. A link held here with the coordinator's
    // own identity shows it.
    let connector = lab.pki.coordinator().unwrap();
    let web1 = &lab.agents["web1"];
    let link = web1.connect(&connector).await.unwrap();
    lab.pki
        .pki
        .revoke(&RevokeTarget::Identity(
            SpiffeId::coordinator(FLEET).unwrap(),
        ))
        .unwrap();
    match tokio::time::timeout(LIMIT, link.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, CLOSE_UNTRUSTED.into(), "{close:?}");
        }
        other => panic!("the agent did not close the revoked coordinator's link: {other:?}"),
    }
    let again = web1.connect(&connector).await;
    assert!(again.is_err(), "an agent accepted a revoked coordinator");
    // Operators' CLIs check the coordinator's certificate against the same CRL.
    let out = lab.cli("alice", &["status"]).await.unwrap();
    assert_eq!(
        out.code, 3,
        "the CLI trusted a revoked coordinator: {out:?}"
    );

    assert_eq!(pids(&lab), processes, "a process was restarted");
    for a in lab.agents.values() {
        assert!(tollgate_tests::proc::alive(a.pid().unwrap()));
    }
}
