//! A local fleet on loopback: the configuration files for agents, inventory, operations,
//! coordinator and clients. Used by `tollgate demo` and by the multi-process tests, so both run
//! exactly the files an operator would write.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tollgate_certs::pki::Pki;
use tollgate_certs::{Role, SpiffeId};

/// One agent host of a lab fleet.
#[derive(Debug, Clone)]
pub struct LabHost {
    pub name: String,
    pub role: String,
    pub safety_class: String,
    pub addr: SocketAddr,
}

fn leaf(
    pki: &Pki,
    role: Role,
    name: Option<&str>,
) -> Result<(PathBuf, PathBuf), tollgate_certs::CertError> {
    Ok(pki.leaf_paths(&SpiffeId::new(pki.fleet(), role, name)?))
}

/// `agent.toml` for `host`, listening on `listen`, keeping state in `state_dir`.
pub fn agent_toml(
    pki: &Pki,
    host: &str,
    listen: SocketAddr,
    state_dir: &Path,
) -> Result<String, tollgate_certs::CertError> {
    let (cert, key) = leaf(pki, Role::Agent, Some(host))?;
    Ok(format!(
        "listen = \"{listen}\"\nstate_dir = {state_dir:?}\ncoordinator_id = \"spiffe://{fleet}/coordinator\"\nallowed_shells = [\"sh\", \"pwsh\"]\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\ncrl = {crl:?}\n",
        fleet = pki.fleet(),
        ca = pki.ca_cert_path(),
        crl = pki.crl_path(),
    ))
}

/// `inventory.toml` for agent hosts.
pub fn inventory_toml(fleet: &str, hosts: &[LabHost]) -> String {
    let mut s = String::new();
    for h in hosts {
        let _ = write!(
            s,
            "[[hosts]]\nname = \"{}\"\nrole = \"{}\"\nsafety_class = \"{}\"\ntransport.agent = {{ address = \"{}\", identity = \"spiffe://{fleet}/agent/{}\" }}\n\n",
            h.name, h.role, h.safety_class, h.addr, h.name
        );
    }
    s
}

/// `coordinator.toml`. `grants` maps operator names to roles (`operator`, `approver`, `viewer`).
pub fn coordinator_toml(
    pki: &Pki,
    listen: SocketAddr,
    state_dir: &Path,
    inventory: &Path,
    operations: &Path,
    grants: &[(&str, &[&str])],
    extra: &str,
) -> Result<String, tollgate_certs::CertError> {
    let (cert, key) = leaf(pki, Role::Coordinator, None)?;
    let mut authz = String::new();
    for (name, roles) in grants {
        let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
        let _ = writeln!(
            authz,
            "\"spiffe://{}/operator/{name}\" = [{}]",
            pki.fleet(),
            roles.join(", ")
        );
    }
    Ok(format!(
        "listen = \"{listen}\"\nstate_dir = {state_dir:?}\ninventory = {inventory:?}\noperations = {operations:?}\n{extra}\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\ncrl = {crl:?}\n\n[authorization]\n{authz}",
        ca = pki.ca_cert_path(),
        crl = pki.crl_path(),
    ))
}

/// `client.toml` for operator `name`.
pub fn client_toml(
    pki: &Pki,
    name: &str,
    coordinator: SocketAddr,
) -> Result<String, tollgate_certs::CertError> {
    let (cert, key) = leaf(pki, Role::Operator, Some(name))?;
    let id = SpiffeId::coordinator(pki.fleet())?;
    Ok(crate::client::ClientConfig::render(
        coordinator,
        &id,
        &pki.ca_cert_path(),
        &cert,
        &key,
        &pki.crl_path(),
    ))
}

/// The demo's operations: `sh` steps that keep each host's "application" under
/// `$TOLLGATE_AGENT_STATE/../app`, and a probe that reports `$TOLLGATE_AGENT_STATE/../facts.json`.
/// With `ps_home`, also PowerShell steps and a probe for role `ops` (a host reached through a
/// real `pwsh`), keeping its application under `ps_home/app`.
pub fn demo_operations_toml(ps_home: Option<&Path>) -> String {
    let (ps_deploy, ps_probe) = match ps_home {
        None => (String::new(), String::new()),
        Some(home) => {
            let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "''"));
            let app = q(&home.join("app"));
            let facts = q(&home.join("facts.json"));
            (
                format!(
                    "[[deploy.phases.steps]]\nid = \"install-app-ps\"\nroles = [\"ops\"]\nshell = \"pwsh\"\nrun = \"$null = New-Item -ItemType Directory -Force -Path {app}; Set-Content -LiteralPath (Join-Path {app} 'version') -Value '1.0'; \\\"installed 1.0 with PowerShell $($PSVersionTable.PSVersion)\\\"\"\ndestructive = false\ntimeout = \"60s\"\n\n"
                ),
                format!(
                    "[probes.ops]\nshell = \"pwsh\"\nrun = \"Get-Content -Raw -LiteralPath {facts}\"\n"
                ),
            )
        }
    };
    let d = r#"D=\"$TOLLGATE_AGENT_STATE/..\""#;
    format!(
        r#"[[deploy.phases]]
name = "prepare"
[[deploy.phases.steps]]
id = "create-dirs"
roles = ["web", "db"]
shell = "sh"
run = "{d}; mkdir -p \"$D/app\" && echo prepared \"$D/app\""
check = "{d}; test -d \"$D/app\""
destructive = false
timeout = "30s"

[[deploy.phases]]
name = "install"
[[deploy.phases.steps]]
id = "install-app"
roles = ["web", "db"]
shell = "sh"
run = "{d}; echo 1.0 > \"$D/app/version\" && echo installed 1.0"
destructive = false
timeout = "30s"
retries = 1

{ps_deploy}[[teardown.phases]]
name = "drain"
[[teardown.phases.steps]]
id = "drain"
roles = ["web", "db"]
shell = "sh"
run = "{d}; touch \"$D/drained\" && echo drained"
destructive = false
timeout = "30s"

[[teardown.phases]]
name = "remove"
[[teardown.phases.steps]]
id = "remove-app"
roles = ["web", "db"]
shell = "sh"
run = "{d}; rm -rf \"$D/app\" && echo removed >> \"$D/teardown.log\" && echo removed"
destructive = true
timeout = "30s"

[probes.web]
shell = "sh"
run = "cat \"$TOLLGATE_AGENT_STATE/../facts.json\""

[probes.db]
shell = "sh"
run = "cat \"$TOLLGATE_AGENT_STATE/../facts.json\""

{ps_probe}"#
    )
}
