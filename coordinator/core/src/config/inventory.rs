//! `inventory.toml`: the hosts, their roles, safety classes and transports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use super::locate::parse_toml;
use super::paths::resolve_at;
use super::ssh::{RawSsh, SshOptions};
use super::values::{DNS_LABEL_RULE, is_dns_label, is_spiffe_id};

/// How much care a host needs. Drives approvals and token lifetimes (see `[tokens]` in
/// `coordinator.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyClass {
    /// Throwaway machines; may allow a longer token lifetime.
    Disposable,
    /// The default class.
    Standard,
    /// Machines that may require two distinct approvers.
    Protected,
}

impl SafetyClass {
    /// Every class, in order.
    pub const ALL: [SafetyClass; 3] = [
        SafetyClass::Disposable,
        SafetyClass::Standard,
        SafetyClass::Protected,
    ];

    /// The name used in the files.
    pub fn as_str(self) -> &'static str {
        match self {
            SafetyClass::Disposable => "disposable",
            SafetyClass::Standard => "standard",
            SafetyClass::Protected => "protected",
        }
    }
}

impl std::fmt::Display for SafetyClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Unique DNS-label name.
    pub name: String,
    /// The role that selects which steps run on it.
    pub role: String,
    /// How much care it needs.
    pub safety_class: SafetyClass,
    /// How the coordinator reaches it.
    pub transport: Transport,
}

/// Exactly one way to reach a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A `tollgate-agent` over QUIC with mutual TLS.
    Agent(AgentTransport),
    /// A PowerShell remoting session supervised by the coordinator (boxed: its SSH settings
    /// make it several times the size of the other variants).
    PsRemoting(Box<PsRemoting>),
    /// The coordinator's own machine.
    Local,
}

impl Transport {
    /// `agent`, `psremoting` or `local`.
    pub fn kind(&self) -> &'static str {
        match self {
            Transport::Agent(_) => "agent",
            Transport::PsRemoting(_) => "psremoting",
            Transport::Local => "local",
        }
    }
}

/// `transport.agent = { address, identity }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTransport {
    /// `HOST:PORT` to dial.
    pub address: String,
    /// The SPIFFE id the agent's certificate must carry (`spiffe://FLEET/agent/NAME`).
    pub identity: String,
}

/// Which `New-PSSession` parameter set to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsTarget {
    /// `-ComputerName` (WinRM / WS-Management).
    ComputerName(String),
    /// `-HostName` (SSH).
    HostName(String),
}

/// `transport.psremoting = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsRemoting {
    /// The machine to connect to, and so the wire (`wsman` or `ssh`).
    pub target: PsTarget,
    /// Port; `None` uses PowerShell's default for the wire.
    pub port: Option<u16>,
    /// WinRM session configuration (`-ConfigurationName`).
    pub configuration_name: Option<String>,
    /// Name of a credential the coordinator looks up (WinRM only); never a secret itself.
    pub credential_ref: Option<String>,
    /// SSH user (`-UserName`).
    pub user: Option<String>,
    /// SSH private key file (`-KeyFilePath`), on the coordinator's machine: relative to the
    /// inventory's directory and `~` expanded once [`Inventory::resolve_paths`] has run.
    pub key_file: Option<PathBuf>,
    /// SSH settings (`known_hosts`, `subsystem`, `ssh_options`, `connect_timeout`,
    /// `keepalive`); empty for WinRM. Laid over the fleet's `[psremoting]` defaults by
    /// `PsRemotingSettings::ssh_for`.
    pub ssh: SshOptions,
    /// Where the session host keeps idempotency markers on the target (default
    /// `$env:ProgramData\Tollgate` on Windows, `~/.local/state/tollgate` elsewhere). A path on
    /// the **target** host, so Tollgate never resolves or expands it: it is passed as written.
    pub state_dir: Option<String>,
}

/// A validated inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    source: String,
    hosts: Vec<Host>,
}

impl Inventory {
    /// Validates hand-built hosts (the same rules as the file). `source` names them in errors.
    pub fn new(source: &str, hosts: Vec<Host>) -> Result<Self, ConfigError> {
        validate_hosts(source, &hosts)?;
        Ok(Inventory {
            source: source.to_owned(),
            hosts,
        })
    }

    /// The file (or label) this inventory came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Hosts in file order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Every role some host has.
    pub fn roles(&self) -> BTreeSet<&str> {
        self.hosts.iter().map(|h| h.role.as_str()).collect()
    }

    /// Lays the fleet's SSH defaults (`[psremoting]` in `coordinator.toml`) under every SSH
    /// host's own settings, so the inventory a run plans from carries the settings each host is
    /// really reached with, and the operation hash binds them. WinRM and other hosts are
    /// untouched. Idempotent: laying the same defaults twice changes nothing.
    pub fn with_ssh_defaults(mut self, defaults: &SshOptions) -> Self {
        for h in &mut self.hosts {
            if let Transport::PsRemoting(p) = &mut h.transport
                && matches!(p.target, PsTarget::HostName(_))
            {
                p.ssh = p.ssh.overlaid_on(defaults);
            }
        }
        self
    }

    /// Resolves the coordinator-side paths of every host (`key_file`, `known_hosts`) as
    /// written in a file in `dir`: relative ones join `dir`, `~` is `home` (see
    /// `CoordinatorConfig::resolve_relative_to` for the rule). `state_dir` is a path on the
    /// target and stays as written.
    pub fn resolve_paths(mut self, dir: &Path, home: Option<&Path>) -> Result<Self, ConfigError> {
        for (i, h) in self.hosts.iter_mut().enumerate() {
            let Transport::PsRemoting(p) = &mut h.transport else {
                continue;
            };
            let key = format!("hosts[{i}].transport.psremoting");
            if let Some(k) = &mut p.key_file {
                resolve_at(&self.source, &format!("{key}.key_file"), k, dir, home)?;
            }
            if let Some(k) = &mut p.ssh.known_hosts {
                resolve_at(&self.source, &format!("{key}.known_hosts"), k, dir, home)?;
            }
        }
        Ok(self)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    hosts: Vec<RawHost>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    role: String,
    safety_class: SafetyClass,
    transport: RawTransport,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    agent: Option<RawAgent>,
    psremoting: Option<RawPsRemoting>,
    local: Option<RawLocal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    address: String,
    identity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Wire {
    Wsman,
    Ssh,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPsRemoting {
    computer_name: Option<String>,
    host_name: Option<String>,
    transport: Option<Wire>,
    port: Option<u16>,
    configuration_name: Option<String>,
    credential_ref: Option<String>,
    user: Option<String>,
    key_file: Option<String>,
    known_hosts: Option<String>,
    subsystem: Option<String>,
    ssh_options: Option<BTreeMap<String, String>>,
    connect_timeout: Option<toml::Value>,
    keepalive: Option<toml::Value>,
    state_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {}

/// Parses and validates `inventory.toml` text; `file` names it in errors.
pub fn parse_inventory(text: &str, file: &str) -> Result<Inventory, ConfigError> {
    let raw: RawInventory = parse_toml(text, file)?;
    let mut hosts = Vec::with_capacity(raw.hosts.len());
    for (i, h) in raw.hosts.into_iter().enumerate() {
        let key = format!("hosts[{i}]");
        let transport = convert_transport(file, &format!("{key}.transport"), h.transport)?;
        hosts.push(Host {
            name: h.name,
            role: h.role,
            safety_class: h.safety_class,
            transport,
        });
    }
    Inventory::new(file, hosts)
}

fn convert_transport(file: &str, key: &str, raw: RawTransport) -> Result<Transport, ConfigError> {
    let given = [
        raw.agent.is_some(),
        raw.psremoting.is_some(),
        raw.local.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return Err(ConfigError::invalid(
            file,
            key,
            format!("exactly one of `agent`, `psremoting` or `local` is required, found {given}"),
        ));
    }
    if let Some(a) = raw.agent {
        return Ok(Transport::Agent(AgentTransport {
            address: a.address,
            identity: a.identity,
        }));
    }
    if let Some(p) = raw.psremoting {
        return convert_psremoting(file, &format!("{key}.psremoting"), p)
            .map(|p| Transport::PsRemoting(Box::new(p)));
    }
    Ok(Transport::Local)
}

fn convert_psremoting(file: &str, key: &str, p: RawPsRemoting) -> Result<PsRemoting, ConfigError> {
    let target = convert_target(file, key, p.computer_name, p.host_name, p.transport)?;
    let ssh = RawSsh {
        known_hosts: p.known_hosts,
        subsystem: p.subsystem,
        ssh_options: p.ssh_options,
        connect_timeout: p.connect_timeout,
        keepalive: p.keepalive,
    };
    let wire_only = match &target {
        PsTarget::ComputerName(_) => ssh_only_key(p.user.as_deref(), p.key_file.as_deref(), &ssh)
            .map(|which| {
                let hint = if matches!(which, "user" | "key_file") {
                    " (use `credential_ref` for WinRM)"
                } else {
                    ""
                };
                (
                    which,
                    format!("only allowed with transport = \"ssh\"{hint}"),
                )
            }),
        PsTarget::HostName(_) => {
            wsman_only_key(p.credential_ref.as_deref(), p.configuration_name.as_deref())
                .map(|which| (which, "only allowed with transport = \"wsman\"".to_owned()))
        }
    };
    if let Some((which, reason)) = wire_only {
        return Err(ConfigError::invalid(file, format!("{key}.{which}"), reason));
    }
    if p.port == Some(0) {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.port"),
            "must be between 1 and 65535",
        ));
    }
    if p.key_file.as_ref().is_some_and(|k| k.trim().is_empty()) {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.key_file"),
            "must not be empty",
        ));
    }
    Ok(PsRemoting {
        target,
        port: p.port,
        configuration_name: p.configuration_name,
        credential_ref: p.credential_ref,
        user: p.user,
        key_file: p.key_file.map(PathBuf::from),
        ssh: ssh.convert(file, key)?,
        state_dir: p.state_dir,
    })
}

/// The machine to connect to: exactly one of `computer_name` or `host_name`, non-empty, and
/// agreeing with `transport` when that is given.
fn convert_target(
    file: &str,
    key: &str,
    computer_name: Option<String>,
    host_name: Option<String>,
    transport: Option<Wire>,
) -> Result<PsTarget, ConfigError> {
    let (target, implied, name_key) = match (computer_name, host_name) {
        (Some(c), None) => (PsTarget::ComputerName(c), Wire::Wsman, "computer_name"),
        (None, Some(h)) => (PsTarget::HostName(h), Wire::Ssh, "host_name"),
        _ => {
            return Err(ConfigError::invalid(
                file,
                key,
                "exactly one of `computer_name` (WinRM) or `host_name` (SSH) is required",
            ));
        }
    };
    if let Some(wire) = transport
        && wire != implied
    {
        let needs = match implied {
            Wire::Wsman => "wsman",
            Wire::Ssh => "ssh",
        };
        return Err(ConfigError::invalid(
            file,
            format!("{key}.transport"),
            format!("`{name_key}` needs transport = \"{needs}\""),
        ));
    }
    let (PsTarget::ComputerName(name) | PsTarget::HostName(name)) = &target;
    if name.trim().is_empty() {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.{name_key}"),
            "must not be empty",
        ));
    }
    Ok(target)
}

/// The first key given that only SSH takes, if any.
fn ssh_only_key(user: Option<&str>, key_file: Option<&str>, ssh: &RawSsh) -> Option<&'static str> {
    if user.is_some() {
        Some("user")
    } else if key_file.is_some() {
        Some("key_file")
    } else {
        ssh.first_given()
    }
}

/// The first key given that only WinRM takes, if any.
fn wsman_only_key(
    credential_ref: Option<&str>,
    configuration_name: Option<&str>,
) -> Option<&'static str> {
    if credential_ref.is_some() {
        Some("credential_ref")
    } else if configuration_name.is_some() {
        Some("configuration_name")
    } else {
        None
    }
}

fn validate_hosts(file: &str, hosts: &[Host]) -> Result<(), ConfigError> {
    if hosts.is_empty() {
        return Err(ConfigError::invalid(
            file,
            "hosts",
            "at least one [[hosts]] entry is required",
        ));
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let key = format!("hosts[{i}]");
        if !is_dns_label(&h.name) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.name"),
                format!("{:?} {DNS_LABEL_RULE}", h.name),
            ));
        }
        if let Some(first) = names.insert(&h.name, i) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.name"),
                format!("duplicate host name {:?} (first at hosts[{first}])", h.name),
            ));
        }
        if !is_dns_label(&h.role) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.role"),
                format!("{:?} {DNS_LABEL_RULE}", h.role),
            ));
        }
        if let Transport::Agent(a) = &h.transport {
            validate_agent(file, &format!("{key}.transport.agent"), &h.name, a)?;
        }
    }
    Ok(())
}

fn validate_agent(
    file: &str,
    key: &str,
    name: &str,
    a: &AgentTransport,
) -> Result<(), ConfigError> {
    let port_ok = a
        .address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !port_ok {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.address"),
            format!("{:?} is not HOST:PORT (e.g. \"127.0.0.2:7443\")", a.address),
        ));
    }
    let suffix = format!("/agent/{name}");
    if !is_spiffe_id(&a.identity) || !a.identity.ends_with(&suffix) {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.identity"),
            format!(
                "{:?} must be spiffe://FLEET/agent/{name} (the agent's certificate id for this host)",
                a.identity
            ),
        ));
    }
    let domain_and_path = a.identity.trim_start_matches("spiffe://");
    if domain_and_path.matches('/').count() != 2 {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.identity"),
            format!("{:?} must be spiffe://FLEET/agent/{name}", a.identity),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSH_HOST: &str = r#"
[[hosts]]
name = "db1"
role = "db"
safety_class = "protected"
[hosts.transport.psremoting]
host_name = "db1.corp.example"
user = "deploy"
key_file = "keys/deploy_ed25519"
known_hosts = "~/.ssh/fleet_known_hosts"
subsystem = "powershell"
connect_timeout = "10s"
keepalive = "15s"
ssh_options = { proxyjump = "bastion", Ciphers = "aes256-gcm@openssh.com" }
state_dir = "~/.local/state/tollgate"

[[hosts]]
name = "web1"
role = "web"
safety_class = "standard"
transport.psremoting = { computer_name = "web1.corp.example" }
"#;

    fn psremoting(inv: &Inventory, name: &str) -> PsRemoting {
        match &inv.host(name).map(|h| &h.transport) {
            Some(Transport::PsRemoting(p)) => (**p).clone(),
            other => panic!("{name} is not a psremoting host: {other:?}"),
        }
    }

    #[test]
    fn ssh_keys_are_read() {
        let inv = parse_inventory(SSH_HOST, "inv.toml").unwrap();
        let db = psremoting(&inv, "db1");
        assert_eq!(db.key_file, Some(PathBuf::from("keys/deploy_ed25519")));
        assert_eq!(
            db.ssh,
            SshOptions {
                known_hosts: Some("~/.ssh/fleet_known_hosts".into()),
                subsystem: Some("powershell".into()),
                ssh_options: BTreeMap::from([
                    ("Ciphers".to_owned(), "aes256-gcm@openssh.com".to_owned()),
                    ("ProxyJump".to_owned(), "bastion".to_owned()),
                ]),
                connect_timeout_ms: Some(10_000),
                keepalive_ms: Some(15_000),
            }
        );
        assert_eq!(psremoting(&inv, "web1").ssh, SshOptions::default());
    }

    #[test]
    fn resolve_paths_resolves_key_file_and_known_hosts_only() {
        let inv = parse_inventory(SSH_HOST, "inv.toml")
            .unwrap()
            .resolve_paths(Path::new("/etc/tollgate"), Some(Path::new("/home/op")))
            .unwrap();
        let db = psremoting(&inv, "db1");
        assert_eq!(
            db.key_file,
            Some(PathBuf::from("/etc/tollgate/keys/deploy_ed25519"))
        );
        assert_eq!(
            db.ssh.known_hosts,
            Some(PathBuf::from("/home/op/.ssh/fleet_known_hosts"))
        );
        assert_eq!(
            db.state_dir.as_deref(),
            Some("~/.local/state/tollgate"),
            "a path on the target host is passed as written"
        );
        assert_eq!(inv.source(), "inv.toml");
    }

    #[test]
    fn resolve_paths_names_the_key_it_cannot_resolve() {
        let inv = parse_inventory(SSH_HOST, "inv.toml").unwrap();
        let err = inv
            .clone()
            .resolve_paths(Path::new("/etc/tollgate"), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "inv.toml: hosts[0].transport.psremoting.known_hosts: \"~/.ssh/fleet_known_hosts\": \
             no home directory is known to expand `~`; write the full path"
        );
        let text = SSH_HOST.replace("keys/deploy_ed25519", "~deploy/.ssh/id");
        let err = parse_inventory(&text, "inv.toml")
            .unwrap()
            .resolve_paths(Path::new("/etc/tollgate"), Some(Path::new("/home/op")))
            .unwrap_err();
        assert_eq!(err.key(), "hosts[0].transport.psremoting.key_file");
        assert!(
            err.reason()
                .ends_with("~user is not expanded; write the full path"),
            "{err}"
        );
    }
}
