//! The SSH settings of PowerShell remoting over SSH. One shape, [`SshOptions`], read the same way
//! from an inventory host (`transport.psremoting` with `host_name`) and from the fleet-wide
//! defaults (`[psremoting]` in `coordinator.toml`); [`SshOptions::overlaid_on`] merges the two.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::ConfigError;
use super::locate::key_segment;
use super::values::whole_seconds_in;

/// The `ssh -o` options a file may set with `ssh_options`, in their canonical spelling (a file
/// may write them in any letter case). Everything else is refused.
pub const ALLOWED_SSH_OPTIONS: [&str; 14] = [
    "AddressFamily",
    "BindAddress",
    "Ciphers",
    "Compression",
    "ConnectionAttempts",
    "HostKeyAlgorithms",
    "IPQoS",
    "KexAlgorithms",
    "MACs",
    "ProxyJump",
    "PubkeyAcceptedAlgorithms",
    "RekeyLimit",
    "ServerAliveCountMax",
    "TCPKeepAlive",
];

/// Why Tollgate itself sets these ssh options: the host keys are checked strictly, never
/// prompted (an unknown host key would hang a session).
const ALWAYS_SET: &str = "Tollgate always sets it: host keys are checked strictly, never prompted";

/// ssh options that have their own key, or that Tollgate always sets, and what to do instead.
const RESERVED_SSH_OPTIONS: [(&str, &str); 9] = [
    ("ConnectTimeout", "use connect_timeout"),
    ("ServerAliveInterval", "use keepalive"),
    ("UserKnownHostsFile", "use known_hosts"),
    ("GlobalKnownHostsFile", "use known_hosts"),
    ("IdentityFile", "use key_file (per host, in the inventory)"),
    ("StrictHostKeyChecking", ALWAYS_SET),
    ("BatchMode", ALWAYS_SET),
    ("IdentitiesOnly", ALWAYS_SET),
    ("PasswordAuthentication", ALWAYS_SET),
];

/// Longest `ssh_options` value, in bytes.
pub const MAX_SSH_OPTION_VALUE: usize = 256;
/// `connect_timeout` bounds: 1s..=300s.
const CONNECT_TIMEOUT_MS: (u64, u64) = (1_000, 300_000);
/// `keepalive` bounds: 1s..=1h.
const KEEPALIVE_MS: (u64, u64) = (1_000, 3_600_000);

/// SSH settings of one host, or the fleet's defaults for every SSH host. Every field is
/// optional: `None` (or an empty map) leaves it to the defaults, then to the ssh client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshOptions {
    /// `known_hosts`: the known_hosts file used alone for host-key checking (ssh's
    /// `UserKnownHostsFile`, with no global file). Resolved relative to its file, `~` expanded.
    pub known_hosts: Option<PathBuf>,
    /// `subsystem`: the sshd subsystem that starts PowerShell (`powershell` by convention).
    /// Non-empty, only `[A-Za-z0-9._-]`.
    pub subsystem: Option<String>,
    /// `ssh_options`: extra `ssh -o NAME=VALUE` options, names in their canonical spelling
    /// (one of [`ALLOWED_SSH_OPTIONS`]); values are plain words (see [`MAX_SSH_OPTION_VALUE`]).
    pub ssh_options: BTreeMap<String, String>,
    /// `connect_timeout` (ssh's `ConnectTimeout`), whole seconds, 1s..=300s, in milliseconds.
    pub connect_timeout_ms: Option<u64>,
    /// `keepalive` (ssh's `ServerAliveInterval`), whole seconds, 1s..=1h, in milliseconds.
    pub keepalive_ms: Option<u64>,
}

impl SshOptions {
    /// These settings over `defaults`: every value set here wins, anything else is the
    /// default's; `ssh_options` are the default's with this one's keys laid over them.
    pub fn overlaid_on(&self, defaults: &SshOptions) -> SshOptions {
        let mut ssh_options = defaults.ssh_options.clone();
        ssh_options.extend(
            self.ssh_options
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        SshOptions {
            known_hosts: self
                .known_hosts
                .clone()
                .or_else(|| defaults.known_hosts.clone()),
            subsystem: self
                .subsystem
                .clone()
                .or_else(|| defaults.subsystem.clone()),
            ssh_options,
            connect_timeout_ms: self.connect_timeout_ms.or(defaults.connect_timeout_ms),
            keepalive_ms: self.keepalive_ms.or(defaults.keepalive_ms),
        }
    }
}

/// The SSH keys of a table as deserialized (the tables themselves keep `deny_unknown_fields`,
/// so each declares the keys and hands them over here).
#[derive(Debug, Default)]
pub(crate) struct RawSsh {
    pub(crate) known_hosts: Option<String>,
    pub(crate) subsystem: Option<String>,
    pub(crate) ssh_options: Option<BTreeMap<String, String>>,
    pub(crate) connect_timeout: Option<toml::Value>,
    pub(crate) keepalive: Option<toml::Value>,
}

impl RawSsh {
    /// The first SSH key given, in file-documentation order (for refusing them on WinRM).
    pub(crate) fn first_given(&self) -> Option<&'static str> {
        [
            ("known_hosts", self.known_hosts.is_some()),
            ("subsystem", self.subsystem.is_some()),
            ("ssh_options", self.ssh_options.is_some()),
            ("connect_timeout", self.connect_timeout.is_some()),
            ("keepalive", self.keepalive.is_some()),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }

    /// Validates the keys of the table at `key` (e.g. `hosts[2].transport.psremoting`).
    pub(crate) fn convert(self, file: &str, key: &str) -> Result<SshOptions, ConfigError> {
        let err =
            |name: &str, why: String| ConfigError::invalid(file, format!("{key}.{name}"), why);
        let known_hosts = match self.known_hosts {
            Some(p) if p.trim().is_empty() => {
                return Err(err("known_hosts", "must not be empty".into()));
            }
            p => p.map(PathBuf::from),
        };
        if let Some(s) = &self.subsystem
            && !is_subsystem_name(s)
        {
            return Err(err(
                "subsystem",
                format!("{s:?} must be non-empty and only A-Z, a-z, 0-9, '.', '_' and '-'"),
            ));
        }
        let ssh_options = convert_ssh_options(file, key, self.ssh_options.unwrap_or_default())?;
        let seconds = |name: &str, value: Option<toml::Value>, (min, max): (u64, u64)| {
            value
                .map(|v| whole_seconds_in(&v, min, max).map_err(|why| err(name, why)))
                .transpose()
        };
        Ok(SshOptions {
            known_hosts,
            subsystem: self.subsystem,
            ssh_options,
            connect_timeout_ms: seconds(
                "connect_timeout",
                self.connect_timeout,
                CONNECT_TIMEOUT_MS,
            )?,
            keepalive_ms: seconds("keepalive", self.keepalive, KEEPALIVE_MS)?,
        })
    }
}

/// An sshd subsystem name: non-empty, only `[A-Za-z0-9._-]`.
fn is_subsystem_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks every option's name and value; names come out in their canonical spelling.
fn convert_ssh_options(
    file: &str,
    key: &str,
    raw: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut written_as: BTreeMap<&str, String> = BTreeMap::new();
    for (name, value) in raw {
        let option_key = format!("{key}.ssh_options.{}", key_segment(&name));
        let err = |why: String| ConfigError::invalid(file, &option_key, why);
        let canonical = canonical_ssh_option(&name).map_err(err)?;
        if let Some(first) = written_as.insert(canonical, name.clone()) {
            return Err(err(format!(
                "given twice (as `{first}` and `{name}`; option names ignore letter case)"
            )));
        }
        check_ssh_option_value(&value).map_err(err)?;
        out.insert(canonical.to_owned(), value);
    }
    Ok(out)
}

/// The canonical spelling of an allowed option name, in any letter case; otherwise why not.
fn canonical_ssh_option(name: &str) -> Result<&'static str, String> {
    if let Some(allowed) = ALLOWED_SSH_OPTIONS
        .iter()
        .find(|a| a.eq_ignore_ascii_case(name))
    {
        return Ok(allowed);
    }
    if let Some((_, instead)) = RESERVED_SSH_OPTIONS
        .iter()
        .find(|(reserved, _)| reserved.eq_ignore_ascii_case(name))
    {
        return Err(format!("not allowed: {instead}"));
    }
    Err(format!(
        "not an allowed ssh option; allowed: {}",
        ALLOWED_SSH_OPTIONS.join(", ")
    ))
}

/// A value is one plain word: nothing an ssh config line or a shell could read as more.
fn check_ssh_option_value(value: &str) -> Result<(), String> {
    let plain = |c: char| {
        !c.is_whitespace()
            && !c.is_control()
            && !matches!(c, '"' | '\'' | '=' | ';' | '{' | '}' | '$' | '`')
    };
    if value.is_empty() || value.len() > MAX_SSH_OPTION_VALUE || !value.chars().all(plain) {
        return Err(format!(
            "{value:?} must be 1 to {MAX_SSH_OPTION_VALUE} bytes with no whitespace, control \
             character, quote, '=', ';', '{{', '}}', '$' or '`'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn convert(raw: RawSsh) -> Result<SshOptions, ConfigError> {
        raw.convert("f.toml", "t")
    }

    #[test]
    fn every_key_is_read() {
        let ssh = convert(RawSsh {
            known_hosts: Some("~/.ssh/fleet_known_hosts".into()),
            subsystem: Some("powershell".into()),
            ssh_options: Some(options(&[
                ("proxyjump", "bastion"),
                ("CIPHERS", "aes256-gcm@openssh.com"),
            ])),
            connect_timeout: Some(toml::Value::String("10s".into())),
            keepalive: Some(toml::Value::Integer(15)),
        })
        .unwrap();
        assert_eq!(ssh.known_hosts, Some("~/.ssh/fleet_known_hosts".into()));
        assert_eq!(ssh.subsystem.as_deref(), Some("powershell"));
        assert_eq!(
            ssh.ssh_options,
            options(&[
                ("Ciphers", "aes256-gcm@openssh.com"),
                ("ProxyJump", "bastion")
            ]),
            "names in their canonical spelling"
        );
        assert_eq!(
            (ssh.connect_timeout_ms, ssh.keepalive_ms),
            (Some(10_000), Some(15_000))
        );
        assert_eq!(convert(RawSsh::default()).unwrap(), SshOptions::default());
    }

    #[test]
    fn an_option_given_twice_in_two_spellings_is_refused() {
        let err = convert(RawSsh {
            ssh_options: Some(options(&[("Ciphers", "a"), ("ciphers", "b")])),
            ..RawSsh::default()
        })
        .unwrap_err();
        assert_eq!(err.key(), "t.ssh_options.ciphers");
        assert_eq!(
            err.reason(),
            "given twice (as `Ciphers` and `ciphers`; option names ignore letter case)"
        );
    }

    #[test]
    fn option_values_are_plain_words() {
        for ok in [
            "yes",
            "aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
            "user@bastion:2222",
            &"a".repeat(256),
        ] {
            assert_eq!(check_ssh_option_value(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\tb",
            "a\u{7}",
            "\"a\"",
            "'a'",
            "a=b",
            "a;b",
            "{a}",
            "$a",
            "`a`",
            &"a".repeat(257),
        ] {
            assert!(check_ssh_option_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_option_name_is_allowed_reserved_or_unknown() {
        for name in ALLOWED_SSH_OPTIONS {
            assert_eq!(canonical_ssh_option(&name.to_lowercase()), Ok(name));
        }
        assert_eq!(
            canonical_ssh_option("connecttimeout"),
            Err("not allowed: use connect_timeout".into())
        );
        assert_eq!(
            canonical_ssh_option("BatchMode"),
            Err(format!("not allowed: {ALWAYS_SET}"))
        );
        let unknown = canonical_ssh_option("ProxyCommand").unwrap_err();
        assert!(
            unknown.starts_with("not an allowed ssh option; allowed: AddressFamily, "),
            "{unknown}"
        );
        for (reserved, _) in RESERVED_SSH_OPTIONS {
            assert!(!ALLOWED_SSH_OPTIONS.contains(&reserved), "{reserved}");
        }
    }

    #[test]
    fn subsystem_names() {
        for ok in ["powershell", "pwsh-7.4", "a_b"] {
            assert!(is_subsystem_name(ok), "{ok}");
        }
        for bad in ["", "power shell", "a/b", "é"] {
            assert!(!is_subsystem_name(bad), "{bad}");
        }
    }

    #[test]
    fn host_values_win_and_options_overlay_the_defaults() {
        let defaults = SshOptions {
            known_hosts: Some("/etc/tollgate/known_hosts".into()),
            subsystem: Some("powershell".into()),
            ssh_options: options(&[
                ("Ciphers", "aes256-gcm@openssh.com"),
                ("ProxyJump", "bastion"),
            ]),
            connect_timeout_ms: Some(10_000),
            keepalive_ms: Some(15_000),
        };
        let host = SshOptions {
            known_hosts: Some("/srv/db1_known_hosts".into()),
            ssh_options: options(&[("ProxyJump", "bastion2"), ("Compression", "yes")]),
            keepalive_ms: Some(30_000),
            ..SshOptions::default()
        };
        assert_eq!(
            host.overlaid_on(&defaults),
            SshOptions {
                known_hosts: Some("/srv/db1_known_hosts".into()),
                subsystem: Some("powershell".into()),
                ssh_options: options(&[
                    ("Ciphers", "aes256-gcm@openssh.com"),
                    ("Compression", "yes"),
                    ("ProxyJump", "bastion2"),
                ]),
                connect_timeout_ms: Some(10_000),
                keepalive_ms: Some(30_000),
            }
        );
        assert_eq!(SshOptions::default().overlaid_on(&defaults), defaults);
        assert_eq!(host.overlaid_on(&SshOptions::default()), host);
    }
}
