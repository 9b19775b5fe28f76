//! Malformed files: each error names the file, the key and the reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use tollgate_coordinator::config::{
    ConfigError, parse_coordinator, parse_inventory, parse_operations, validate_operations,
};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Inventory,
    Operations,
    /// Operations validated against `INVENTORY`.
    OperationsAgainstInventory,
    Coordinator,
}

const HOST: &str = r#"
[[hosts]]
name = "web1"
role = "web"
safety_class = "standard"
transport.agent = { address = "127.0.0.2:7443", identity = "spiffe://f/agent/web1" }
"#;

const INVENTORY: &str = r#"
[[hosts]]
name = "web1"
role = "web"
safety_class = "standard"
transport.local = {}
[[hosts]]
name = "db1"
role = "db"
safety_class = "protected"
transport.local = {}
"#;

const TEARDOWN: &str = r#"
[[teardown.phases]]
name = "remove"
[[teardown.phases.steps]]
id = "remove"
roles = ["web"]
run = "x"
destructive = true
"#;

/// A deploy action with one step whose body is `step` (appended after `id`).
fn ops_with_step(step: &str) -> String {
    format!(
        "[[deploy.phases]]\nname = \"p\"\n[[deploy.phases.steps]]\nid = \"s\"\n{step}\n{TEARDOWN}"
    )
}

fn check(kind: Kind, text: &str) -> ConfigError {
    let label = match kind {
        Kind::Inventory => "inv.toml",
        Kind::Operations | Kind::OperationsAgainstInventory => "ops.toml",
        Kind::Coordinator => "coord.toml",
    };
    let result = match kind {
        Kind::Inventory => parse_inventory(text, label).map(|_| ()),
        Kind::Operations => parse_operations(text, label).map(|_| ()),
        Kind::OperationsAgainstInventory => {
            let inv = parse_inventory(INVENTORY, "inv.toml").expect("fixture inventory is valid");
            parse_operations(text, label).and_then(|ops| validate_operations(&ops, &inv))
        }
        Kind::Coordinator => parse_coordinator(text, label).map(|_| ()),
    };
    let err = result.expect_err("must be refused");
    assert_eq!(err.file(), label, "{err}");
    err
}

#[test]
fn malformed_files_name_file_key_and_reason() {
    use Kind::*;
    let two_hosts = format!("{HOST}{}", HOST.replace("127.0.0.2", "127.0.0.3"));
    let step_ok = "roles = [\"web\"]\nrun = \"x\"\ndestructive = false";
    let cases: Vec<(Kind, String, &str, &str)> = vec![
        // inventory.toml
        (Inventory, "hosts = [".into(), "line 1, column 10", "invalid"),
        (Inventory, "".into(), "hosts", "at least one"),
        (Inventory, HOST.replace("safety_class = \"standard\"", "safety_class = \"critical\""), "hosts[0].safety_class", "unknown variant `critical`"),
        (Inventory, HOST.replace("safety_class = \"standard\"\n", ""), "hosts[0].safety_class", "missing field `safety_class`"),
        (Inventory, HOST.replace("address =", "adress ="), "hosts[0].transport.agent.adress", "unknown field `adress`"),
        (Inventory, format!("{HOST}colour = \"blue\"\n"), "hosts[0].colour", "unknown field `colour`"),
        (Inventory, two_hosts.clone(), "hosts[1].name", "duplicate host name \"web1\""),
        (Inventory, HOST.replace("name = \"web1\"", "name = \"Web_1\""), "hosts[0].name", "a-z, 0-9"),
        (Inventory, HOST.replace("role = \"web\"", "role = \"\""), "hosts[0].role", "1 to 63"),
        (Inventory, format!("{HOST}transport.local = {{}}\n"), "hosts[0].transport", "exactly one of `agent`, `psremoting` or `local` is required, found 2"),
        (Inventory, HOST.replace("transport.agent = { address = \"127.0.0.2:7443\", identity = \"spiffe://f/agent/web1\" }", "transport = {}"), "hosts[0].transport", "found 0"),
        (Inventory, HOST.replace("127.0.0.2:7443", "127.0.0.2"), "hosts[0].transport.agent.address", "HOST:PORT"),
        (Inventory, HOST.replace("agent/web1", "agent/web2"), "hosts[0].transport.agent.identity", "spiffe://FLEET/agent/web1"),
        (Inventory, HOST.replace("transport.agent = { address = \"127.0.0.2:7443\", identity = \"spiffe://f/agent/web1\" }", "transport.psremoting = { computer_name = \"a\", host_name = \"b\" }"), "hosts[0].transport.psremoting", "exactly one of `computer_name`"),
        (Inventory, HOST.replace("transport.agent = { address = \"127.0.0.2:7443\", identity = \"spiffe://f/agent/web1\" }", "transport.psremoting = { computer_name = \"a\", transport = \"ssh\" }"), "hosts[0].transport.psremoting.transport", "needs transport = \"wsman\""),
        (Inventory, HOST.replace("transport.agent = { address = \"127.0.0.2:7443\", identity = \"spiffe://f/agent/web1\" }", "transport.psremoting = { computer_name = \"a\", key_file = \"k\" }"), "hosts[0].transport.psremoting.key_file", "only allowed with transport = \"ssh\""),
        (Inventory, HOST.replace("transport.agent = { address = \"127.0.0.2:7443\", identity = \"spiffe://f/agent/web1\" }", "transport.psremoting = { host_name = \"a\", port = 70000 }"), "hosts[0].transport.psremoting.port", "expected u16"),
        (Inventory, HOST.replace("transport.agent = { address = \"127.0.0.2:7443\", identity = \"spiffe://f/agent/web1\" }", "transport.psremoting = { host_name = \"a\", transport = \"telnet\" }"), "hosts[0].transport.psremoting.transport", "unknown variant `telnet`"),
        // operations.toml
        (Operations, ops_with_step("roles = [\"web\"]\nrun = \"x\""), "deploy.phases[0].steps[0].destructive", "no default"),
        (Operations, ops_with_step("roles = [\"web\"]\nrun = \"x\"\ndestructive = \"no\""), "deploy.phases[0].steps[0].destructive", "expected a boolean"),
        (Operations, ops_with_step("roles = [\"web\"]\ndestructive = false"), "deploy.phases[0].steps[0].run", "`run` (text) or `run_file`"),
        (Operations, ops_with_step("roles = [\"web\"]\nrun = \"x\"\nrun_file = \"y\"\ndestructive = false"), "deploy.phases[0].steps[0].run_file", "not both"),
        (Operations, ops_with_step(&format!("{step_ok}\nshell = \"bash\"")), "deploy.phases[0].steps[0].shell", "unknown variant `bash`"),
        (Operations, ops_with_step(&format!("{step_ok}\ntimeout = \"5 minutes\"")), "deploy.phases[0].steps[0].timeout", "expected a duration"),
        (Operations, ops_with_step(&format!("{step_ok}\ntimeout = \"48h\"")), "deploy.phases[0].steps[0].timeout", "between 1s and 24h"),
        (Operations, ops_with_step(&format!("{step_ok}\nretries = 11")), "deploy.phases[0].steps[0].retries", "at most 10"),
        (Operations, ops_with_step(&format!("{step_ok}\nretries = -1")), "deploy.phases[0].steps[0].retries", "invalid value"),
        (Operations, ops_with_step(&format!("{step_ok}\nchek = \"x\"")), "deploy.phases[0].steps[0].chek", "unknown field `chek`"),
        (Operations, ops_with_step("roles = []\nrun = \"x\"\ndestructive = false"), "deploy.phases[0].steps[0].roles", "at least one role"),
        (Operations, format!("[[deploy.phases]]\nname = \"p\"\n{TEARDOWN}"), "deploy.phases[0].steps", "has no steps"),
        (Operations, TEARDOWN.into(), "deploy", "missing field `deploy`"),
        (Operations, format!("[deploy]\nphases = []\n{TEARDOWN}"), "deploy.phases", "at least one phase"),
        (Operations, ops_with_step(&format!("{step_ok}\n[[deploy.phases.steps]]\nid = \"s\"\n{step_ok}")), "deploy.phases[0].steps[1].id", "duplicate step id \"s\""),
        (Operations, format!("{}\n[[deploy.phases]]\nname = \"p\"\n[[deploy.phases.steps]]\nid = \"t\"\n{step_ok}", ops_with_step(step_ok)), "deploy.phases[1].name", "duplicate phase name"),
        (Operations, format!("{}\n[probes.web]\nshell = \"sh\"\n", ops_with_step(step_ok)), "probes.web.run", "missing field `run`"),
        // operations.toml against inventory.toml
        (OperationsAgainstInventory, ops_with_step("roles = [\"web\", \"cache\"]\nrun = \"x\"\ndestructive = false"), "deploy.phases[0].steps[0].roles[1]", "role \"cache\" is not the role of any host in inv.toml (roles: db, web)"),
        (OperationsAgainstInventory, format!("{}\n[probes.cache]\nrun = \"x\"\n", ops_with_step(step_ok)), "probes.cache", "not the role of any host"),
        // coordinator.toml
        (Coordinator, "listen = \"localhost\"".into(), "listen", "not IP:PORT"),
        (Coordinator, "port = 7440".into(), "port", "unknown field `port`"),
        (Coordinator, "[tls]\nca = \"\"".into(), "tls.ca", "must not be empty"),
        (Coordinator, "[authorization]\n\"spiffe://f/operator/alice\" = [\"admin\"]".into(), "authorization.\"spiffe://f/operator/alice\"[0]", "unknown variant `admin`"),
        (Coordinator, "[authorization]\nalice = [\"approver\"]".into(), "authorization.alice", "not a SPIFFE id"),
        (Coordinator, "[tokens.standard]\napprovers = 3".into(), "tokens.standard.approvers", "must be 1 or 2"),
        (Coordinator, "[tokens.protected]\napprovers = 1".into(), "tokens.protected.approvers", "must be 2 (a protected host always needs two distinct approvers"),
        (Coordinator, "[tokens]\nself_approval = \"yes\"".into(), "tokens.self_approval", "invalid type"),
        (Coordinator, "[tokens]\nlifetime = \"10m\"\n[tokens.standard]\nlifetime = \"1h\"".into(), "tokens.standard.lifetime", "between 1s and 10m"),
        (Coordinator, "[tokens.disposable]\nlifetime = \"48h\"".into(), "tokens.disposable.lifetime", "between 1s and 24h"),
        (Coordinator, "[tokens.protected]\nttl = \"1m\"".into(), "tokens.protected.ttl", "unknown field `ttl`"),
        (Coordinator, "[probe]\nfreshness = \"2h\"".into(), "probe.freshness", "between 1s and 1h"),
        (Coordinator, "[concurrency]\nglobal = 4\nper_phase = 8".into(), "concurrency.per_phase", "between 1 and concurrency.global (4)"),
        (Coordinator, "[retry]\nbase_backoff_ms = 5000\nmax_backoff_ms = 1000".into(), "retry.base_backoff_ms", "between 1 and retry.max_backoff_ms"),
        (Coordinator, "[retry]\nmax_attempts = 0".into(), "retry.max_attempts", "between 1 and 10"),
        (Coordinator, "[rollout]\nbatches = [\"1\", \"50%\"]".into(), "rollout.batches[1]", "last batch must be \"100%\""),
        (Coordinator, "[rollout]\nbatches = [\"50%\", \"10%\", \"100%\"]".into(), "rollout.batches[1]", "does not grow"),
        (Coordinator, "[rollout]\nbatches = [\"half\", \"100%\"]".into(), "rollout.batches[0]", "not a host count"),
        (Coordinator, "[rollout]\nmax_failure_ratio = 1.5".into(), "rollout.max_failure_ratio", "between 0.0 and 1.0"),
        (Coordinator, "[rollout]\nmax_failure_ratio = nan".into(), "rollout.max_failure_ratio", "between 0.0 and 1.0"),
    ];
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for (kind, text, key, reason) in &cases {
        let err = check(*kind, text);
        if err.key() != *key || !err.reason().contains(reason) {
            failures.push(format!(
                "{kind:?}: want key {key:?} reason ~{reason:?}\n  got  key {:?} reason {:?}\n  text: {text:?}",
                err.key(),
                err.reason()
            ));
        }
        // The rendered message carries all three.
        let shown = err.to_string();
        assert!(
            shown.contains(err.file()) && shown.contains(err.key()) && shown.contains(err.reason())
        );
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
