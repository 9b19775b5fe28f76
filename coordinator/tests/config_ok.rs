//! Valid files: the documented examples, the test fleet, defaults, and loading from disk.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::path::Path;

use tollgate_coordinator::config::{
    Batch, ConfigError, PsTarget, Role, SafetyClass, ScriptSource, Transport, load_coordinator,
    load_inventory, load_inventory_of, load_operations, parse_coordinator, parse_inventory,
    parse_operations, validate_operations,
};
use tollgate_protocol::{Action, Shell};

/// The ```toml blocks of the config module docs, in order (inventory, operations, coordinator).
fn doc_examples() -> Vec<String> {
    let src = include_str!("../core/src/config/mod.rs");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in src.lines() {
        let body = line.strip_prefix("//!").unwrap_or("");
        let body = body.strip_prefix(' ').unwrap_or(body);
        match (&mut current, body.trim()) {
            (None, "```toml") => current = Some(Vec::new()),
            (Some(lines), "```") => {
                blocks.push(lines.join("\n"));
                current = None;
            }
            (Some(lines), _) => lines.push(body),
            (None, _) => {}
        }
    }
    blocks
}

fn fleet(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fleet")
        .join(name)
}

#[test]
fn the_documented_examples_parse_and_agree_with_each_other() {
    let blocks = doc_examples();
    assert_eq!(
        blocks.len(),
        3,
        "inventory, operations and coordinator examples"
    );
    let inv = parse_inventory(&blocks[0], "inventory.toml").unwrap();
    let ops = parse_operations(&blocks[1], "operations.toml").unwrap();
    validate_operations(&ops, &inv).unwrap();
    let cfg = parse_coordinator(&blocks[2], "coordinator.toml").unwrap();
    assert_eq!(inv.hosts().len(), 3);
    assert!(matches!(inv.hosts()[2].transport, Transport::Local));
    assert_eq!(cfg.tokens.classes.protected.approvers, 2);
    assert!(
        cfg.authorization
            .has_role("spiffe://example.org/operator/bob", Role::Approver)
    );
    assert!(
        !cfg.authorization
            .has_role("spiffe://example.org/operator/bob", Role::Operator)
    );
}

#[test]
fn an_empty_coordinator_file_takes_every_default() {
    let cfg = parse_coordinator("", "coordinator.toml").unwrap();
    assert_eq!(cfg.listen.to_string(), "127.0.0.1:7440");
    assert_eq!(cfg.state_dir, Path::new("state"));
    assert_eq!(cfg.tokens.signing_key, Path::new("state/token-signing.pk8"));
    assert_eq!(cfg.tokens.classes.standard.lifetime_ms, 900_000);
    assert_eq!(cfg.tokens.classes.standard.approvers, 1);
    assert_eq!(cfg.tokens.classes.protected.approvers, 2);
    assert_eq!(cfg.probe.timeout_ms, 10_000);
    assert_eq!(cfg.probe.freshness_ms, 60_000);
    assert_eq!(
        (cfg.concurrency.global, cfg.concurrency.per_phase),
        (64, 16)
    );
    assert_eq!(cfg.retry.max_attempts, 3);
    assert_eq!(cfg.rollout.batches, vec![Batch::Percent(100)]);
    assert!(
        cfg.authorization.grants().is_empty(),
        "nobody may do anything by default"
    );
    assert!(cfg.tls.crl.is_none());
}

#[test]
fn loads_the_test_fleet_from_disk_and_resolves_paths() {
    let inv = load_inventory(&fleet("inventory.toml")).unwrap();
    let web2 = inv.host("web2").unwrap();
    assert_eq!(web2.safety_class, SafetyClass::Disposable);
    let Transport::PsRemoting(db) = &inv.host("db1").unwrap().transport else {
        panic!("db1 uses psremoting")
    };
    assert_eq!(db.target, PsTarget::HostName("db1.test.fleet".into()));
    assert_eq!(db.user.as_deref(), Some("deploy"));

    let ops = load_operations(&fleet("operations.toml")).unwrap();
    validate_operations(&ops, &inv).unwrap();
    let remove = &ops.action(Action::Teardown).phases[1];
    assert!(remove.is_destructive());
    assert!(!ops.action(Action::Teardown).phases[0].is_destructive());
    assert_eq!(
        remove.steps[0].run,
        ScriptSource::File {
            path: "scripts/remove.sh".into(),
            body: Some("#!/bin/sh\nrm -rf /opt/app\n".into())
        }
    );
    assert_eq!(
        remove.steps[1].shell,
        Shell::Pwsh,
        "pwsh is the default shell"
    );
    let install = &ops.action(Action::Deploy).phases[0].steps[0];
    assert_eq!((install.timeout_ms, install.retries), (30_000, 2));
    assert_eq!(
        ops.action(Action::Deploy).phases[1].steps[0].timeout_ms,
        300_000
    );

    let cfg = load_coordinator(&fleet("coordinator.toml")).unwrap();
    assert_eq!(cfg.state_dir, fleet("state"));
    assert_eq!(cfg.tls.ca, fleet("pki/ca.pem"));
    assert_eq!(cfg.tokens.classes.disposable.lifetime_ms, 7_200_000);
    assert_eq!(cfg.tokens.classes.protected.lifetime_ms, 600_000);
    assert_eq!(
        cfg.rollout.batches,
        vec![Batch::Count(1), Batch::Percent(50), Batch::Percent(100)]
    );
}

#[test]
fn parse_leaves_run_files_unresolved_and_load_reports_unreadable_ones() {
    let text = std::fs::read_to_string(fleet("operations.toml")).unwrap();
    let ops = parse_operations(&text, "ops.toml").unwrap();
    let step = &ops.action(Action::Teardown).phases[1].steps[0];
    assert_eq!(step.run.body(), None);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("operations.toml");
    std::fs::write(&path, &text).unwrap();
    let err = load_operations(&path).unwrap_err();
    assert_eq!(err.key(), "teardown.phases[1].steps[0].run_file");
    assert!(err.reason().contains("scripts/remove.sh"), "{err}");
}

#[test]
fn a_missing_file_is_a_read_error_naming_it() {
    let err = load_inventory(Path::new("/nonexistent/inventory.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert_eq!(err.file(), "/nonexistent/inventory.toml");
}

#[test]
fn the_fleet_ssh_defaults_are_laid_under_the_inventory_it_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("coordinator.toml"),
        "inventory = \"fleet/inventory.toml\"\n\
         [psremoting]\n\
         known_hosts = \"keys/known_hosts\"\n\
         connect_timeout = \"7s\"\n\
         ssh_options = { ProxyJump = \"bastion\", Ciphers = \"aes256-gcm@openssh.com\" }\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("fleet")).unwrap();
    std::fs::write(
        dir.path().join("fleet/inventory.toml"),
        "[[hosts]]\nname = \"db1\"\nrole = \"db\"\nsafety_class = \"standard\"\n\
         [hosts.transport.psremoting]\nhost_name = \"db1.test\"\nconnect_timeout = \"3s\"\n\
         ssh_options = { ProxyJump = \"other\" }\n\
         [[hosts]]\nname = \"win1\"\nrole = \"db\"\nsafety_class = \"standard\"\n\
         [hosts.transport.psremoting]\ncomputer_name = \"win1.test\"\n",
    )
    .unwrap();
    let cfg = load_coordinator(&dir.path().join("coordinator.toml")).unwrap();
    let inv = load_inventory_of(&cfg).unwrap();
    let Transport::PsRemoting(db) = &inv.host("db1").unwrap().transport else {
        panic!("db1 uses psremoting")
    };
    assert_eq!(
        db.ssh.known_hosts.as_deref(),
        Some(dir.path().join("keys/known_hosts").as_path()),
        "the default, resolved relative to coordinator.toml"
    );
    assert_eq!(
        db.ssh.connect_timeout_ms,
        Some(3_000),
        "the host's own wins"
    );
    assert_eq!(db.ssh.ssh_options["ProxyJump"], "other");
    assert_eq!(db.ssh.ssh_options["Ciphers"], "aes256-gcm@openssh.com");
    let Transport::PsRemoting(win) = &inv.host("win1").unwrap().transport else {
        panic!("win1 uses psremoting")
    };
    assert_eq!(
        win.ssh,
        Default::default(),
        "a WinRM host takes no SSH defaults"
    );
}
