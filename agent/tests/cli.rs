//! The `tollgate-agent` binary as an operator meets it: bad configuration stops it with a
//! message naming file, key and reason, and exit code 2.
//!
//! (These tests also make `cargo test --workspace` build the binary, which the multi-process
//! tests in `tests/` start.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn agent(config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate-agent"))
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn missing_config_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let out = agent(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn bad_key_and_bad_value_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\ncoordinator_id = \"spiffe://f/coordinator\"\n";
    let tls = "[tls]\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\ncrl = \"r\"\n";
    for (text, needle) in [
        (format!("{base}colour = \"blue\"\n{tls}"), "colour"),
        (format!("{base}max_concurrent = 0\n{tls}"), "max_concurrent"),
        (
            format!(
                "{}{tls}",
                base.replace("spiffe://f/coordinator", "spiffe://f/agent/x")
            ),
            "coordinator_id",
        ),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).unwrap();
        let out = agent(&path);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("agent.toml") && err.contains(needle),
            "{needle}: {err}"
        );
    }
}

#[test]
fn unreadable_certificate_is_named_and_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\ncoordinator_id = \"spiffe://f/coordinator\"\n[tls]\nca = \"ca.crt\"\ncert = \"missing.crt\"\nkey = \"k\"\ncrl = \"r\"\n",
    )
    .unwrap();
    let out = agent(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.crt"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

#[test]
fn an_operator_certificate_is_refused_as_the_agent_identity() {
    use tollgate_certs::files::Overwrite;
    use tollgate_certs::pki::Pki;
    use tollgate_certs::{Role, SpiffeId};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), "f").unwrap();
    pki.issue(Role::Operator, Some("alice"), Overwrite::Refuse)
        .unwrap();
    let (cert, key) = pki.leaf_paths(&SpiffeId::new("f", Role::Operator, Some("alice")).unwrap());
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\ncoordinator_id = \"spiffe://f/coordinator\"\n[tls]\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\ncrl = {:?}\n",
            dir.path().join("state"),
            pki.ca_cert_path(),
            pki.crl_path()
        ),
    )
    .unwrap();
    let out = agent(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("agent.toml")
            && err.contains("tls.cert")
            && err.contains("not an agent certificate"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}
