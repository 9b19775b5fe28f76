//! Configuration files (SPEC §2), validated on load.
//!
//! Three files, each parsed with `deny_unknown_fields` and then validated. Every error is a
//! [`ConfigError`] naming the **file**, the **key** (a dotted path such as
//! `hosts[2].transport.agent.address`) and the **reason**. `parse_*` functions are pure (text in,
//! value out); `load_*` read the file and call them, and are the only I/O here.
//!
//! Names of hosts, roles, phases and steps are DNS labels: 1 to 63 of `[a-z0-9-]`, not starting
//! or ending with `-`. Durations are an integer number of seconds (`30`) or an integer with a
//! unit `ms`, `s`, `m` or `h` (`"250ms"`, `"30s"`, `"5m"`, `"1h"`).
//!
//! # `inventory.toml`
//!
//! ```toml
//! [[hosts]]
//! name = "web1"                  # unique DNS label
//! role = "web"                   # DNS label; selects steps
//! safety_class = "standard"      # disposable | standard | protected
//! # exactly one of transport.agent / transport.psremoting / transport.local:
//! transport.agent = { address = "127.0.0.2:7443", identity = "spiffe://example.org/agent/web1" }
//!
//! [[hosts]]
//! name = "db1"
//! role = "db"
//! safety_class = "protected"
//! [hosts.transport.psremoting]
//! host_name = "db1.corp.example"       # SSH; or computer_name = "..." for WinRM (exactly one)
//! transport = "ssh"                    # optional; must match: host_name=ssh, computer_name=wsman
//! port = 22                            # optional
//! # ssh only (each refused with computer_name / transport = "wsman"); known_hosts, subsystem,
//! # connect_timeout, keepalive and ssh_options left out take coordinator.toml's [psremoting]
//! # defaults, else the ssh client's:
//! user = "deploy"
//! key_file = "~/.ssh/id_ed25519"       # private key on the coordinator's machine
//! known_hosts = "keys/known_hosts"     # the only known_hosts file consulted (pre-seed it)
//! subsystem = "powershell"             # sshd subsystem: non-empty, only A-Z a-z 0-9 . _ -
//! connect_timeout = "10s"              # whole seconds, 1s..5m (ssh ConnectTimeout)
//! keepalive = "15s"                    # whole seconds, 1s..1h (ssh ServerAliveInterval)
//! ssh_options = { ProxyJump = "bastion.corp.example", Ciphers = "aes256-gcm@openssh.com" }
//! state_dir = "/var/lib/tollgate"      # optional: idempotency markers, a path on the TARGET
//! # WinRM instead: computer_name = "db1.corp.example", transport = "wsman", port = 5986,
//! # configuration_name = "Tollgate", credential_ref = "db-admin" (a name, never a secret);
//! # both wsman only.
//!
//! [[hosts]]
//! name = "admin"
//! role = "tools"
//! safety_class = "disposable"
//! transport.local = {}
//! ```
//!
//! Rules: at least one host; unique names; agent `address` is `HOST:PORT`; agent `identity` is
//! `spiffe://FLEET/agent/NAME` with NAME the host's own name (so identities are unique too).
//!
//! `ssh_options` are extra `ssh -o NAME=VALUE` options from an allow-list ([`ALLOWED_SSH_OPTIONS`]:
//! AddressFamily, BindAddress, Ciphers, Compression, ConnectionAttempts, HostKeyAlgorithms,
//! IPQoS, KexAlgorithms, MACs, ProxyJump, PubkeyAcceptedAlgorithms, RekeyLimit,
//! ServerAliveCountMax, TCPKeepAlive), names in any letter case. Refused, with the way to say
//! it: ConnectTimeout (`connect_timeout`), ServerAliveInterval (`keepalive`),
//! UserKnownHostsFile and GlobalKnownHostsFile (`known_hosts`), IdentityFile (`key_file`);
//! StrictHostKeyChecking, BatchMode, IdentitiesOnly and PasswordAuthentication are always set
//! by Tollgate (host keys are checked strictly, never prompted). A value is a string of 1 to
//! 256 bytes with no whitespace, control character, quote, `=`, `;`, `{`, `}`, `$` or backtick.
//!
//! `key_file` and `known_hosts` are relative to the inventory's directory, with `~` expanded
//! ([`Inventory::resolve_paths`]); `state_dir` is a path on the target and is never resolved.
//!
//! # `operations.toml`
//!
//! ```toml
//! [[deploy.phases]]
//! name = "install"
//! [[deploy.phases.steps]]
//! id = "install-app"
//! roles = ["web"]                # roles from the inventory (see validate_operations)
//! shell = "pwsh"                 # pwsh (default) | sh
//! run = "Install-App -Version 1.2"   # or run_file = "scripts/install.ps1" (relative to this file)
//! destructive = false            # REQUIRED, no default
//! timeout = "5m"                 # default 5m; 1s..24h
//! retries = 2                    # transient failures only; default 0, at most 10
//! check = "if (Test-App) { exit 0 } else { exit 1 }"   # optional: exit 0 = already done, skip
//! errors = "stop"                # pwsh only; default "stop": an error record or a throw fails
//!                                # the step. "continue": errors are shown, the exit code decides
//!
//! [[teardown.phases]]
//! name = "remove"
//! [[teardown.phases.steps]]
//! id = "remove-app"
//! roles = ["web"]
//! run = "Remove-App"
//! destructive = true
//!
//! [probes.web]                   # optional per role; stdout is a JSON object of facts
//! shell = "pwsh"
//! run = "@{ app = (Get-AppVersion) } | ConvertTo-Json"
//! ```
//!
//! Rules: both `deploy` and `teardown` have at least one phase; phases have unique names and at
//! least one step; step ids are unique within an action; a step has `run` or `run_file`, not
//! both; roles are non-empty and listed once. A phase is destructive if any of its steps is.
//!
//! # `coordinator.toml`
//!
//! Every key is optional; the values shown are the defaults unless marked *example*.
//!
//! ```toml
//! listen = "127.0.0.1:7440"          # QUIC control endpoint, IP:PORT
//! state_dir = "state"                # journals and run artifacts
//! inventory = "inventory.toml"
//! operations = "operations.toml"
//! pwsh = "pwsh"                      # executable used for PowerShell remoting: a bare name is
//!                                    # looked up on PATH, a path ("~/bin/pwsh") is resolved
//!
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/coordinator.pem"
//! key = "pki/coordinator.key"
//! crl = "pki/crl.pem"                # example; no CRL by default
//!
//! [authorization]                    # example; empty by default (nobody may do anything)
//! "spiffe://example.org/operator/alice" = ["operator", "approver"]
//! "spiffe://example.org/operator/bob" = ["approver"]
//! "spiffe://example.org/operator/ci" = ["viewer"]
//!
//! [tokens]
//! lifetime = "15m"                   # 1s..24h; default for every class
//! signing_key = "state/token-signing.pk8"   # default: STATE_DIR/token-signing.pk8
//! [tokens.disposable]
//! lifetime = "15m"                   # may be longer than tokens.lifetime (up to 24h)
//! approvers = 1                      # 1 or 2
//! [tokens.standard]
//! lifetime = "15m"                   # at most tokens.lifetime
//! approvers = 1
//! [tokens.protected]
//! lifetime = "15m"                   # at most tokens.lifetime
//! approvers = 2                      # two distinct approvers by default
//!
//! [probe]
//! timeout = "10s"                    # 100ms..5m, one probe
//! freshness = "60s"                  # 1s..1h, max age of a barrier re-probe
//!
//! [concurrency]
//! global = 64                        # steps in flight across runs, >= 1
//! per_phase = 16                     # hosts at once in one phase, 1..=global (default min(16, global))
//!
//! [retry]
//! max_attempts = 3                   # 1..=10; caps every step's 1 + retries
//! base_backoff_ms = 200              # 1..=max_backoff_ms, doubled per retry
//! max_backoff_ms = 10000             # at most 600000
//!
//! [rollout]
//! batches = ["100%"]                 # e.g. ["1", "50%", "100%"]; cumulative; last is "100%"
//! max_failure_ratio = 0.0            # 0.0..=1.0
//!
//! [psremoting]                       # PowerShell session hosts
//! open_timeout = "60s"               # 1s..10m: start a session host and open its session
//! request_timeout = "15s"            # 1s..5m: a query or cancel answer
//! restart_backoff = "100ms"          # 1ms..5m: first delay before restarting a session host
//! restart_backoff_max = "5s"         # restart_backoff..5m: the delay doubles up to this
//! # Defaults for every SSH host (same rules as the inventory keys; a host's own value wins,
//! # its ssh_options are laid over these). None by default; examples:
//! known_hosts = "~/.ssh/tollgate_known_hosts"
//! subsystem = "powershell"
//! connect_timeout = "10s"
//! keepalive = "15s"
//! ssh_options = { ServerAliveCountMax = "3" }
//! ```
//!
//! Relative paths are relative to the directory of `coordinator.toml`, and a leading `~` or
//! `~/` is the home directory (`~user` is refused): [`CoordinatorConfig::resolve_relative_to`]
//! resolves them, `load_coordinator` calls it. `pwsh` is resolved only when it is a path.

mod coordinator;
mod inventory;
mod locate;
mod operations;
mod paths;
mod ssh;
mod values;

pub use coordinator::{
    Authorization, Batch, ClassTable, ClassTokenPolicy, Concurrency, CoordinatorConfig,
    DEFAULT_LISTEN, DEFAULT_TOKEN_LIFETIME_MS, MAX_TOKEN_LIFETIME_MS, ProbeSettings,
    PsRemotingSettings, RetryPolicy, Role, Rollout, TlsPaths, TokenSettings, parse_coordinator,
};
pub use inventory::{
    AgentTransport, Host, Inventory, PsRemoting, PsTarget, SafetyClass, Transport, parse_inventory,
};
pub use operations::{
    ActionSpec, DEFAULT_STEP_TIMEOUT_MS, MAX_STEP_RETRIES, MAX_STEP_TIMEOUT_MS, Operations, Phase,
    ProbeScript, ScriptSource, Step, parse_operations, validate_operations,
};
pub use ssh::{ALLOWED_SSH_OPTIONS, MAX_SSH_OPTION_VALUE, SshOptions};
pub use tollgate_protocol::ConfigError;
pub use values::{is_dns_label, is_spiffe_id, parse_duration_ms, show_ms};
