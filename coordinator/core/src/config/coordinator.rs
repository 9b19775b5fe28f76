//! `coordinator.toml`: where the service listens, its certificates and state, who may do what,
//! and the knobs of the safety core (tokens, probes, concurrency, retries, rollout).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use super::inventory::{PsRemoting, SafetyClass};
use super::locate::{key_segment, parse_toml};
use super::paths::{resolve_at, resolve_path};
use super::ssh::{RawSsh, SshOptions};
use super::values::{duration_in, is_spiffe_id, show_ms};

/// Default `listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7440";
/// Default `tokens.lifetime`: 15 minutes.
pub const DEFAULT_TOKEN_LIFETIME_MS: u64 = 900_000;
/// Longest token lifetime any class may have: 24 hours.
pub const MAX_TOKEN_LIFETIME_MS: u64 = 86_400_000;

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read status, runs and explanations.
    Viewer,
    /// Submit intents and execute approved plans.
    Operator,
    /// Approve plans (receive confirmation tokens).
    Approver,
}

impl Role {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
        }
    }
}

/// The authorization table: identity -> roles. An identity that is not listed has no role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorization {
    grants: BTreeMap<String, BTreeSet<Role>>,
}

impl Authorization {
    /// Builds a table from grants.
    pub fn new(grants: BTreeMap<String, BTreeSet<Role>>) -> Self {
        Authorization { grants }
    }

    /// Whether `identity` holds `role`.
    pub fn has_role(&self, identity: &str, role: Role) -> bool {
        self.grants.get(identity).is_some_and(|r| r.contains(&role))
    }

    /// Every grant, by identity.
    pub fn grants(&self) -> &BTreeMap<String, BTreeSet<Role>> {
        &self.grants
    }
}

/// A value per safety class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassTable<T> {
    /// For `disposable` hosts.
    pub disposable: T,
    /// For `standard` hosts.
    pub standard: T,
    /// For `protected` hosts.
    pub protected: T,
}

impl<T> ClassTable<T> {
    /// The value for `class`.
    pub fn get(&self, class: SafetyClass) -> &T {
        match class {
            SafetyClass::Disposable => &self.disposable,
            SafetyClass::Standard => &self.standard,
            SafetyClass::Protected => &self.protected,
        }
    }
}

/// Token rules for one safety class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassTokenPolicy {
    /// How long a token for a plan touching this class stays valid.
    pub lifetime_ms: u64,
    /// Distinct approvers a plan touching this class needs (1 or 2).
    pub approvers: u8,
}

/// `[tokens]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    /// PKCS#8 Ed25519 key the coordinator signs tokens with.
    pub signing_key: PathBuf,
    /// Lifetime and approvers per class.
    pub classes: ClassTable<ClassTokenPolicy>,
    /// `tokens.self_approval` (default false): may a run's requester approve it? Never for
    /// a plan with a protected host.
    pub self_approval: bool,
}

/// `[tls]`: the coordinator's own certificate and the fleet CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// Coordinator certificate (PEM).
    pub cert: PathBuf,
    /// Coordinator private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation list (PEM), if revocation is in use.
    pub crl: Option<PathBuf>,
    /// `tls.crl_check` (default 2s): how often the CRL is re-read while the coordinator runs
    /// (also at once on SIGHUP). A revoked operator or agent is refused and its open
    /// connections closed without a restart.
    pub crl_check_ms: u64,
}

/// `[probe]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// How long one probe may take.
    pub timeout_ms: u64,
    /// How old a barrier re-probe may be when the barrier decides.
    pub freshness_ms: u64,
}

/// `[concurrency]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    /// Steps in flight across all runs.
    pub global: u32,
    /// Hosts working at once within one phase of one run.
    pub per_phase: u32,
}

/// `[retry]`: backoff for transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Upper bound on attempts of any step (a step's own `retries` is capped by it).
    pub max_attempts: u32,
    /// Delay before the first retry, doubled for each further one.
    pub base_backoff_ms: u64,
    /// Largest delay.
    pub max_backoff_ms: u64,
}

/// One rollout batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `"N"`: this many hosts in total so far.
    Count(u32),
    /// `"P%"`: this share of the target hosts in total so far.
    Percent(u8),
}

/// `[rollout]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Cumulative batch sizes; the last is always `100%`.
    pub batches: Vec<Batch>,
    /// Failed hosts / hosts so far above which the next batch does not start.
    pub max_failure_ratio: f64,
}

/// `[psremoting]`: how the coordinator runs its PowerShell session hosts, and the SSH defaults
/// of every host reached over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsRemotingSettings {
    /// Fleet-wide SSH defaults; a host's own value wins (see [`PsRemotingSettings::ssh_for`]).
    /// `known_hosts` is resolved relative to `coordinator.toml`.
    pub ssh: SshOptions,
    /// `open_timeout` (default 60s, 1s..=10m): starting a session host and opening its session.
    pub open_timeout_ms: u64,
    /// `request_timeout` (default 15s, 1s..=5m): how long a query or cancel answer may take.
    pub request_timeout_ms: u64,
    /// `restart_backoff` (default 100ms, 1ms..=5m): the first delay before restarting a session
    /// host that failed, doubled for each further failure.
    pub restart_backoff_ms: u64,
    /// `restart_backoff_max` (default 5s, `restart_backoff`..=5m): the longest restart delay.
    pub restart_backoff_max_ms: u64,
}

impl PsRemotingSettings {
    /// Default `open_timeout`: 60 seconds.
    pub const DEFAULT_OPEN_TIMEOUT_MS: u64 = 60_000;
    /// Default `request_timeout`: 15 seconds.
    pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 15_000;
    /// Default `restart_backoff`: 100 milliseconds.
    pub const DEFAULT_RESTART_BACKOFF_MS: u64 = 100;
    /// Default `restart_backoff_max`: 5 seconds.
    pub const DEFAULT_RESTART_BACKOFF_MAX_MS: u64 = 5_000;

    /// The SSH settings in force for `host`: each of the host's own values wins, else the
    /// fleet default; `ssh_options` are the defaults with the host's options laid over them.
    /// (Meaningful for an SSH host; a WinRM host has no SSH settings of its own.)
    pub fn ssh_for(&self, host: &PsRemoting) -> SshOptions {
        host.ssh.overlaid_on(&self.ssh)
    }
}

impl Default for PsRemotingSettings {
    /// No SSH defaults; every timing at its default.
    fn default() -> Self {
        PsRemotingSettings {
            ssh: SshOptions::default(),
            open_timeout_ms: Self::DEFAULT_OPEN_TIMEOUT_MS,
            request_timeout_ms: Self::DEFAULT_REQUEST_TIMEOUT_MS,
            restart_backoff_ms: Self::DEFAULT_RESTART_BACKOFF_MS,
            restart_backoff_max_ms: Self::DEFAULT_RESTART_BACKOFF_MAX_MS,
        }
    }
}

/// A validated `coordinator.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// The file (or label) this configuration came from; names it in errors.
    pub source: String,
    /// Address of the QUIC control endpoint.
    pub listen: SocketAddr,
    /// Journals, run artifacts, token key.
    pub state_dir: PathBuf,
    /// Path of `inventory.toml`.
    pub inventory: PathBuf,
    /// Path of `operations.toml`.
    pub operations: PathBuf,
    /// The `pwsh` executable for PowerShell remoting: a bare name (looked up on `PATH` when
    /// started) or a path (resolved like every other path once `resolve_relative_to` has run).
    pub pwsh: String,
    /// Certificates.
    pub tls: TlsPaths,
    /// Who may do what.
    pub authorization: Authorization,
    /// Confirmation tokens.
    pub tokens: TokenSettings,
    /// Probes and freshness.
    pub probe: ProbeSettings,
    /// Concurrency limits.
    pub concurrency: Concurrency,
    /// Transient-failure retries.
    pub retry: RetryPolicy,
    /// Batches and gates.
    pub rollout: Rollout,
    /// PowerShell session hosts and SSH defaults.
    pub psremoting: PsRemotingSettings,
}

impl CoordinatorConfig {
    /// Resolves every coordinator-side path as written in a file in `dir` (the directory of
    /// `coordinator.toml`): `~`, `~/rest` (or `~\rest`) is `home` joined with `rest` (refused
    /// when `home` is `None`), `~user/...` is refused, an absolute path is kept and any other
    /// path joins `dir`. `pwsh` is resolved only when it is a path (it has a separator or starts
    /// with `~`); a bare name stays a name for `PATH`.
    pub fn resolve_relative_to(
        mut self,
        dir: &Path,
        home: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let file = self.source.clone();
        let mut paths: Vec<(&str, &mut PathBuf)> = vec![
            ("state_dir", &mut self.state_dir),
            ("inventory", &mut self.inventory),
            ("operations", &mut self.operations),
            ("tls.ca", &mut self.tls.ca),
            ("tls.cert", &mut self.tls.cert),
            ("tls.key", &mut self.tls.key),
            ("tokens.signing_key", &mut self.tokens.signing_key),
        ];
        if let Some(crl) = &mut self.tls.crl {
            paths.push(("tls.crl", crl));
        }
        if let Some(known_hosts) = &mut self.psremoting.ssh.known_hosts {
            paths.push(("psremoting.known_hosts", known_hosts));
        }
        for (key, path) in paths {
            resolve_at(&file, key, path, dir, home)?;
        }
        self.pwsh = resolve_pwsh(&file, &self.pwsh, dir, home)?;
        Ok(self)
    }
}

/// `pwsh` resolved when it is a path; a bare name is returned as is.
fn resolve_pwsh(
    file: &str,
    pwsh: &str,
    dir: &Path,
    home: Option<&Path>,
) -> Result<String, ConfigError> {
    if !pwsh.starts_with('~') && !pwsh.chars().any(std::path::is_separator) {
        return Ok(pwsh.to_owned());
    }
    let err = |why: String| ConfigError::invalid(file, "pwsh", why);
    resolve_path(Path::new(pwsh), dir, home)
        .map_err(err)?
        .into_os_string()
        .into_string()
        .map_err(|p| err(format!("{p:?}: the resolved path is not valid UTF-8")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    listen: Option<String>,
    state_dir: Option<String>,
    inventory: Option<String>,
    operations: Option<String>,
    pwsh: Option<String>,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    authorization: BTreeMap<String, Vec<Role>>,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    probe: RawProbe,
    #[serde(default)]
    concurrency: RawConcurrency,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    rollout: RawRollout,
    #[serde(default)]
    psremoting: RawPsRemotingSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    crl: Option<String>,
    crl_check: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    lifetime: Option<toml::Value>,
    signing_key: Option<String>,
    self_approval: Option<bool>,
    disposable: Option<RawClassTokens>,
    standard: Option<RawClassTokens>,
    protected: Option<RawClassTokens>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassTokens {
    lifetime: Option<toml::Value>,
    approvers: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    timeout: Option<toml::Value>,
    freshness: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConcurrency {
    global: Option<u32>,
    per_phase: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    base_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPsRemotingSettings {
    known_hosts: Option<String>,
    subsystem: Option<String>,
    ssh_options: Option<BTreeMap<String, String>>,
    connect_timeout: Option<toml::Value>,
    keepalive: Option<toml::Value>,
    open_timeout: Option<toml::Value>,
    request_timeout: Option<toml::Value>,
    restart_backoff: Option<toml::Value>,
    restart_backoff_max: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    batches: Option<Vec<String>>,
    max_failure_ratio: Option<f64>,
}

/// Parses and validates `coordinator.toml` text; `file` names it in errors. Paths are kept as
/// written (see [`CoordinatorConfig::resolve_relative_to`]).
pub fn parse_coordinator(text: &str, file: &str) -> Result<CoordinatorConfig, ConfigError> {
    let raw: RawCoordinator = parse_toml(text, file)?;
    let err = |key: &str, reason: String| ConfigError::invalid(file, key, reason);

    let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| err("listen", format!("{listen_text:?} is not IP:PORT")))?;
    let state_dir = non_empty_path(file, "state_dir", raw.state_dir, "state")?;

    let mut grants = BTreeMap::new();
    for (identity, roles) in raw.authorization {
        let key = format!("authorization.{}", key_segment(&identity));
        if !is_spiffe_id(&identity) {
            return Err(err(
                &key,
                format!("{identity:?} is not a SPIFFE id (spiffe://FLEET/operator/NAME)"),
            ));
        }
        grants.insert(identity, roles.into_iter().collect());
    }

    let default_lifetime = match &raw.tokens.lifetime {
        None => DEFAULT_TOKEN_LIFETIME_MS,
        Some(v) => {
            duration_in(v, 1_000, MAX_TOKEN_LIFETIME_MS).map_err(|r| err("tokens.lifetime", r))?
        }
    };
    let class = |name: &str,
                 raw: &Option<RawClassTokens>,
                 approvers: u8,
                 min_approvers: u8,
                 cap_ms: u64| {
        let raw_lifetime = raw.as_ref().and_then(|r| r.lifetime.as_ref());
        let lifetime_ms = match raw_lifetime {
            None => default_lifetime,
            Some(v) => duration_in(v, 1_000, cap_ms)
                .map_err(|r| err(&format!("tokens.{name}.lifetime"), r))?,
        };
        let approvers = raw.as_ref().and_then(|r| r.approvers).unwrap_or(approvers);
        if !(min_approvers..=2).contains(&approvers) {
            let allowed = if min_approvers == 2 {
                "must be 2 (a protected host always needs two distinct approvers, neither of them the requester)".to_owned()
            } else {
                "must be 1 or 2".to_owned()
            };
            return Err(err(
                &format!("tokens.{name}.approvers"),
                format!("{allowed}, got {approvers}"),
            ));
        }
        Ok(ClassTokenPolicy {
            lifetime_ms,
            approvers,
        })
    };
    let classes = ClassTable {
        // Only disposable hosts may allow a longer lifetime than `tokens.lifetime`.
        disposable: class(
            "disposable",
            &raw.tokens.disposable,
            1,
            1,
            MAX_TOKEN_LIFETIME_MS,
        )?,
        standard: class("standard", &raw.tokens.standard, 1, 1, default_lifetime)?,
        protected: class("protected", &raw.tokens.protected, 2, 2, default_lifetime)?,
    };
    let signing_key = match raw.tokens.signing_key {
        Some(p) => non_empty_path(file, "tokens.signing_key", Some(p), "")?,
        None => state_dir.join("token-signing.pk8"),
    };

    let probe = ProbeSettings {
        timeout_ms: match &raw.probe.timeout {
            None => 10_000,
            Some(v) => duration_in(v, 100, 300_000).map_err(|r| err("probe.timeout", r))?,
        },
        freshness_ms: match &raw.probe.freshness {
            None => 60_000,
            Some(v) => duration_in(v, 1_000, 3_600_000).map_err(|r| err("probe.freshness", r))?,
        },
    };

    let global = raw.concurrency.global.unwrap_or(64);
    let per_phase = raw.concurrency.per_phase.unwrap_or(global.min(16));
    if global == 0 {
        return Err(err("concurrency.global", "must be at least 1".into()));
    }
    if per_phase == 0 || per_phase > global {
        return Err(err(
            "concurrency.per_phase",
            format!("must be between 1 and concurrency.global ({global}), got {per_phase}"),
        ));
    }

    let retry = RetryPolicy {
        max_attempts: raw.retry.max_attempts.unwrap_or(3),
        base_backoff_ms: raw.retry.base_backoff_ms.unwrap_or(200),
        max_backoff_ms: raw.retry.max_backoff_ms.unwrap_or(10_000),
    };
    if !(1..=10).contains(&retry.max_attempts) {
        return Err(err(
            "retry.max_attempts",
            format!("must be between 1 and 10, got {}", retry.max_attempts),
        ));
    }
    if retry.base_backoff_ms == 0 || retry.base_backoff_ms > retry.max_backoff_ms {
        return Err(err(
            "retry.base_backoff_ms",
            format!(
                "must be between 1 and retry.max_backoff_ms ({}), got {}",
                retry.max_backoff_ms, retry.base_backoff_ms
            ),
        ));
    }
    if retry.max_backoff_ms > 600_000 {
        return Err(err(
            "retry.max_backoff_ms",
            format!(
                "must be at most 600000 (10 minutes), got {}",
                retry.max_backoff_ms
            ),
        ));
    }

    let rollout = convert_rollout(file, raw.rollout)?;
    let psremoting = convert_psremoting(file, raw.psremoting)?;

    Ok(CoordinatorConfig {
        source: file.to_owned(),
        listen,
        inventory: non_empty_path(file, "inventory", raw.inventory, "inventory.toml")?,
        operations: non_empty_path(file, "operations", raw.operations, "operations.toml")?,
        pwsh: match raw.pwsh {
            Some(p) if p.trim().is_empty() => {
                return Err(err("pwsh", "must not be empty".into()));
            }
            Some(p) => p,
            None => "pwsh".to_owned(),
        },
        tls: TlsPaths {
            ca: non_empty_path(file, "tls.ca", raw.tls.ca, "pki/ca.pem")?,
            cert: non_empty_path(file, "tls.cert", raw.tls.cert, "pki/coordinator.pem")?,
            key: non_empty_path(file, "tls.key", raw.tls.key, "pki/coordinator.key")?,
            crl: match raw.tls.crl {
                Some(p) => Some(non_empty_path(file, "tls.crl", Some(p), "")?),
                None => None,
            },
            crl_check_ms: match &raw.tls.crl_check {
                None => 2_000,
                Some(v) => duration_in(v, 100, 3_600_000).map_err(|r| err("tls.crl_check", r))?,
            },
        },
        state_dir,
        authorization: Authorization::new(grants),
        tokens: TokenSettings {
            signing_key,
            classes,
            self_approval: raw.tokens.self_approval.unwrap_or(false),
        },
        probe,
        concurrency: Concurrency { global, per_phase },
        retry,
        rollout,
        psremoting,
    })
}

fn non_empty_path(
    file: &str,
    key: &str,
    value: Option<String>,
    default: &str,
) -> Result<PathBuf, ConfigError> {
    match value {
        Some(p) if p.trim().is_empty() => Err(ConfigError::invalid(file, key, "must not be empty")),
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(PathBuf::from(default)),
    }
}

fn convert_rollout(file: &str, raw: RawRollout) -> Result<Rollout, ConfigError> {
    let texts = raw.batches.unwrap_or_else(|| vec!["100%".to_owned()]);
    if texts.is_empty() {
        return Err(ConfigError::invalid(
            file,
            "rollout.batches",
            "must not be empty (leave it out for a single batch of 100%)",
        ));
    }
    let mut batches = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let key = format!("rollout.batches[{i}]");
        let batch = parse_batch(text).ok_or_else(|| {
            ConfigError::invalid(
                file,
                &key,
                format!("{text:?} is not a host count (\"1\") or a percentage (\"50%\", 1 to 100)"),
            )
        })?;
        let grows = batches
            .iter()
            .rev()
            .find_map(|prev: &Batch| match (prev, &batch) {
                (Batch::Count(a), Batch::Count(b)) => Some(b > a),
                (Batch::Percent(a), Batch::Percent(b)) => Some(b > a),
                _ => None,
            });
        if grows == Some(false) {
            return Err(ConfigError::invalid(
                file,
                key,
                format!("{text:?} does not grow the rollout (batches are cumulative)"),
            ));
        }
        batches.push(batch);
    }
    if batches.last() != Some(&Batch::Percent(100)) {
        return Err(ConfigError::invalid(
            file,
            format!("rollout.batches[{}]", batches.len() - 1),
            "the last batch must be \"100%\"",
        ));
    }
    let ratio = raw.max_failure_ratio.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(ConfigError::invalid(
            file,
            "rollout.max_failure_ratio",
            format!("must be between 0.0 and 1.0, got {ratio}"),
        ));
    }
    Ok(Rollout {
        batches,
        max_failure_ratio: ratio,
    })
}

fn convert_psremoting(
    file: &str,
    raw: RawPsRemotingSettings,
) -> Result<PsRemotingSettings, ConfigError> {
    let d = PsRemotingSettings::default();
    let timing = |name: &str, value: &Option<toml::Value>, default: u64, min: u64, max: u64| {
        value.as_ref().map_or(Ok(default), |v| {
            duration_in(v, min, max)
                .map_err(|why| ConfigError::invalid(file, format!("psremoting.{name}"), why))
        })
    };
    let settings = PsRemotingSettings {
        ssh: RawSsh {
            known_hosts: raw.known_hosts,
            subsystem: raw.subsystem,
            ssh_options: raw.ssh_options,
            connect_timeout: raw.connect_timeout,
            keepalive: raw.keepalive,
        }
        .convert(file, "psremoting")?,
        open_timeout_ms: timing(
            "open_timeout",
            &raw.open_timeout,
            d.open_timeout_ms,
            1_000,
            600_000,
        )?,
        request_timeout_ms: timing(
            "request_timeout",
            &raw.request_timeout,
            d.request_timeout_ms,
            1_000,
            300_000,
        )?,
        restart_backoff_ms: timing(
            "restart_backoff",
            &raw.restart_backoff,
            d.restart_backoff_ms,
            1,
            300_000,
        )?,
        restart_backoff_max_ms: timing(
            "restart_backoff_max",
            &raw.restart_backoff_max,
            d.restart_backoff_max_ms,
            1,
            300_000,
        )?,
    };
    let (first, max) = (settings.restart_backoff_ms, settings.restart_backoff_max_ms);
    if first > max {
        // Name the key the file wrote: the default maximum is not the operator's mistake.
        return Err(if raw.restart_backoff_max.is_some() {
            ConfigError::invalid(
                file,
                "psremoting.restart_backoff_max",
                format!(
                    "must be at least psremoting.restart_backoff ({}), got {}",
                    show_ms(first),
                    show_ms(max)
                ),
            )
        } else {
            ConfigError::invalid(
                file,
                "psremoting.restart_backoff",
                format!(
                    "must be at most psremoting.restart_backoff_max ({}, the default), got {}",
                    show_ms(max),
                    show_ms(first)
                ),
            )
        });
    }
    Ok(settings)
}

fn parse_batch(text: &str) -> Option<Batch> {
    if let Some(p) = text.strip_suffix('%') {
        let p: u8 = p.parse().ok()?;
        (1..=100).contains(&p).then_some(Batch::Percent(p))
    } else {
        let n: u32 = text.parse().ok()?;
        (n >= 1).then_some(Batch::Count(n))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Transport, parse_inventory};

    fn parse(text: &str) -> CoordinatorConfig {
        parse_coordinator(text, "coord.toml").unwrap()
    }

    #[test]
    fn psremoting_defaults() {
        assert_eq!(parse("").psremoting, PsRemotingSettings::default());
        let d = PsRemotingSettings::default();
        assert_eq!(
            (
                d.open_timeout_ms,
                d.request_timeout_ms,
                d.restart_backoff_ms,
                d.restart_backoff_max_ms
            ),
            (60_000, 15_000, 100, 5_000)
        );
        assert_eq!(d.ssh, SshOptions::default());
    }

    #[test]
    fn psremoting_keys_are_read() {
        let cfg = parse(
            r#"
[psremoting]
known_hosts = "known_hosts"
subsystem = "pwsh"
ssh_options = { ProxyJump = "bastion" }
connect_timeout = "20s"
keepalive = 30
open_timeout = "2m"
request_timeout = "30s"
restart_backoff = "250ms"
restart_backoff_max = "1m"
"#,
        );
        let p = &cfg.psremoting;
        assert_eq!(p.ssh.known_hosts, Some(PathBuf::from("known_hosts")));
        assert_eq!(p.ssh.subsystem.as_deref(), Some("pwsh"));
        assert_eq!(
            p.ssh.ssh_options.get("ProxyJump").map(String::as_str),
            Some("bastion")
        );
        assert_eq!(
            (p.ssh.connect_timeout_ms, p.ssh.keepalive_ms),
            (Some(20_000), Some(30_000))
        );
        assert_eq!(
            (
                p.open_timeout_ms,
                p.request_timeout_ms,
                p.restart_backoff_ms,
                p.restart_backoff_max_ms
            ),
            (120_000, 30_000, 250, 60_000)
        );
    }

    #[test]
    fn ssh_for_lets_the_host_win_and_overlays_options() {
        let cfg = parse(
            r#"
[psremoting]
known_hosts = "/etc/tollgate/known_hosts"
subsystem = "powershell"
connect_timeout = "10s"
ssh_options = { ProxyJump = "bastion", Ciphers = "aes256-gcm@openssh.com" }
"#,
        );
        let inv = parse_inventory(
            r#"
[[hosts]]
name = "db1"
role = "db"
safety_class = "standard"
transport.psremoting = { host_name = "db1", keepalive = "15s", connect_timeout = "30s", ssh_options = { proxyjump = "bastion2", Compression = "yes" } }
"#,
            "inv.toml",
        )
        .unwrap();
        let Some(Transport::PsRemoting(host)) = inv.host("db1").map(|h| &h.transport) else {
            panic!("db1 is a psremoting host")
        };
        let ssh = cfg.psremoting.ssh_for(host);
        assert_eq!(
            ssh,
            SshOptions {
                known_hosts: Some("/etc/tollgate/known_hosts".into()),
                subsystem: Some("powershell".into()),
                ssh_options: BTreeMap::from([
                    ("Ciphers".to_owned(), "aes256-gcm@openssh.com".to_owned()),
                    ("Compression".to_owned(), "yes".to_owned()),
                    ("ProxyJump".to_owned(), "bastion2".to_owned()),
                ]),
                connect_timeout_ms: Some(30_000),
                keepalive_ms: Some(15_000),
            }
        );
    }

    #[test]
    fn resolve_relative_to_resolves_every_coordinator_path() {
        let cfg = parse(
            r#"
state_dir = "~/tollgate-state"
inventory = "/srv/fleet/inventory.toml"
pwsh = "bin/pwsh"
[tls]
crl = "pki/crl.pem"
[psremoting]
known_hosts = "~/.ssh/known_hosts"
"#,
        )
        .resolve_relative_to(Path::new("/etc/tollgate"), Some(Path::new("/home/op")))
        .unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/home/op/tollgate-state"));
        assert_eq!(
            cfg.tokens.signing_key,
            PathBuf::from("/home/op/tollgate-state/token-signing.pk8")
        );
        assert_eq!(cfg.inventory, PathBuf::from("/srv/fleet/inventory.toml"));
        assert_eq!(
            cfg.operations,
            PathBuf::from("/etc/tollgate/operations.toml")
        );
        assert_eq!(cfg.tls.ca, PathBuf::from("/etc/tollgate/pki/ca.pem"));
        assert_eq!(
            cfg.tls.crl,
            Some(PathBuf::from("/etc/tollgate/pki/crl.pem"))
        );
        assert_eq!(
            cfg.psremoting.ssh.known_hosts,
            Some(PathBuf::from("/home/op/.ssh/known_hosts"))
        );
        assert_eq!(cfg.pwsh, "/etc/tollgate/bin/pwsh");
    }

    #[test]
    fn a_bare_pwsh_stays_a_name_and_a_tilde_pwsh_is_a_path() {
        let resolve = |pwsh: &str| {
            parse(&format!("pwsh = {pwsh:?}"))
                .resolve_relative_to(Path::new("/etc/tollgate"), Some(Path::new("/home/op")))
                .map(|c| c.pwsh)
        };
        assert_eq!(resolve("pwsh"), Ok("pwsh".to_owned()));
        assert_eq!(resolve("pwsh-preview"), Ok("pwsh-preview".to_owned()));
        assert_eq!(resolve("~/bin/pwsh"), Ok("/home/op/bin/pwsh".to_owned()));
        assert_eq!(
            resolve("/opt/microsoft/powershell/7/pwsh"),
            Ok("/opt/microsoft/powershell/7/pwsh".to_owned())
        );
        let err = resolve("~admin/bin/pwsh").unwrap_err();
        assert_eq!((err.file(), err.key()), ("coord.toml", "pwsh"));
    }

    #[test]
    fn resolve_relative_to_names_the_key_it_cannot_resolve() {
        let err = parse("[psremoting]\nknown_hosts = \"~/.ssh/known_hosts\"")
            .resolve_relative_to(Path::new("/etc/tollgate"), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "coord.toml: psremoting.known_hosts: \"~/.ssh/known_hosts\": no home directory is \
             known to expand `~`; write the full path"
        );
        let err = parse("[tls]\nca = \"~ca/ca.pem\"")
            .resolve_relative_to(Path::new("/etc/tollgate"), Some(Path::new("/home/op")))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "coord.toml: tls.ca: \"~ca/ca.pem\": ~user is not expanded; write the full path"
        );
    }
}
