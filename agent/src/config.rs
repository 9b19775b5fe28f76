//! `agent.toml`.
//!
//! ```toml
//! listen = "0.0.0.0:7443"                       # host:port; port 0 picks a free one
//! state_dir = "/var/lib/tollgate-agent"          # idempotency store, scripts, retained output
//! coordinator_id = "spiffe://prod/coordinator"  # the only identity accepted
//! allowed_shells = ["pwsh", "sh"]               # default: both
//! pwsh_path = "/usr/bin/pwsh"                   # default: `pwsh` on PATH
//! max_concurrent = 4                            # executions at once (default 4)
//! max_frame_bytes = 4194304                     # largest frame accepted (default 4 MiB)
//! output_retention_bytes = 1048576              # output kept and streamed per stream (default 1 MiB)
//! shutdown_grace_secs = 10                      # SIGTERM: wait this long for running scripts
//!
//! [tls]
//! ca = "pki/ca.crt"
//! cert = "pki/agent-web1.crt"
//! key = "pki/agent-web1.key"
//! crl = "pki/crl.pem"
//! crl_check_secs = 2                            # re-read the CRL this often (also on SIGHUP)
//! ```
//!
//! Relative paths are relative to the directory of the config file. Unknown keys are errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tollgate_certs::{Role, SpiffeId};
use tollgate_protocol::{ConfigError, Shell};

use crate::AgentError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    state_dir: PathBuf,
    coordinator_id: String,
    allowed_shells: Option<Vec<String>>,
    pwsh_path: Option<PathBuf>,
    max_concurrent: Option<i64>,
    max_frame_bytes: Option<i64>,
    output_retention_bytes: Option<i64>,
    shutdown_grace_secs: Option<i64>,
    tls: RawTls,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    crl: PathBuf,
    crl_check_secs: Option<i64>,
}

/// Paths of the agent's certificate material.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub crl: PathBuf,
    /// How often the CRL is re-read while the agent runs (a revoked coordinator is refused and
    /// its open connections closed without a restart).
    pub crl_check: Duration,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file it was read from (errors found later name it).
    pub source: PathBuf,
    pub listen: std::net::SocketAddr,
    pub state_dir: PathBuf,
    pub coordinator_id: SpiffeId,
    pub allowed_shells: Vec<Shell>,
    pub pwsh_path: Option<PathBuf>,
    pub max_concurrent: usize,
    pub max_frame_bytes: u32,
    pub output_retention_bytes: usize,
    pub shutdown_grace: Duration,
    pub tls: TlsPaths,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(0)
}

/// Parses and validates `text` read from `file`.
pub fn parse(text: &str, file: &Path) -> Result<AgentConfig, AgentError> {
    let label = file.display().to_string();
    let err =
        |key: &str, reason: String| AgentError::from(ConfigError::invalid(&label, key, reason));
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let key = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
            .unwrap_or("(document)")
            .to_string();
        let line = e
            .span()
            .map(|s| format!(" (line {})", line_of(text, s.start)))
            .unwrap_or_default();
        err(&key, format!("{msg}{line}"))
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    let listen = raw
        .listen
        .parse()
        .map_err(|e| err("listen", format!("{:?} is not host:port: {e}", raw.listen)))?;
    let coordinator_id: SpiffeId = raw
        .coordinator_id
        .parse()
        .map_err(|e| err("coordinator_id", format!("{e}")))?;
    if coordinator_id.role() != Role::Coordinator {
        return Err(err(
            "coordinator_id",
            format!("{coordinator_id} is not a coordinator identity"),
        ));
    }
    let allowed_shells = match raw.allowed_shells {
        None => vec![Shell::Pwsh, Shell::Sh],
        Some(list) => {
            let mut shells = Vec::new();
            for (i, s) in list.iter().enumerate() {
                let shell = match s.as_str() {
                    "pwsh" => Shell::Pwsh,
                    "sh" => Shell::Sh,
                    other => {
                        return Err(err(
                            &format!("allowed_shells[{i}]"),
                            format!("unknown shell {other:?} (pwsh or sh)"),
                        ));
                    }
                };
                if !shells.contains(&shell) {
                    shells.push(shell);
                }
            }
            shells
        }
    };
    let positive = |key: &str, v: Option<i64>, default: i64, max: i64| -> Result<i64, AgentError> {
        match v {
            None => Ok(default),
            Some(n) if (1..=max).contains(&n) => Ok(n),
            Some(n) => Err(err(key, format!("{n} is out of range 1..={max}"))),
        }
    };
    let max_concurrent = positive("max_concurrent", raw.max_concurrent, 4, 1024)? as usize;
    let max_frame_bytes = positive(
        "max_frame_bytes",
        raw.max_frame_bytes,
        4 * 1024 * 1024,
        64 * 1024 * 1024,
    )? as u32;
    if max_frame_bytes < 64 * 1024 {
        return Err(err(
            "max_frame_bytes",
            format!("{max_frame_bytes} is below the 65536-byte minimum"),
        ));
    }
    let output_retention_bytes = positive(
        "output_retention_bytes",
        raw.output_retention_bytes,
        1024 * 1024,
        1024 * 1024 * 1024,
    )? as usize;
    let shutdown_grace =
        Duration::from_secs(
            positive("shutdown_grace_secs", raw.shutdown_grace_secs, 10, 3600)? as u64,
        );
    let crl_check =
        Duration::from_secs(
            positive("tls.crl_check_secs", raw.tls.crl_check_secs, 2, 3600)? as u64,
        );
    Ok(AgentConfig {
        source: file.to_path_buf(),
        listen,
        state_dir: resolve(raw.state_dir),
        coordinator_id,
        allowed_shells,
        pwsh_path: raw.pwsh_path.map(resolve),
        max_concurrent,
        max_frame_bytes,
        output_retention_bytes,
        shutdown_grace,
        tls: TlsPaths {
            ca: resolve(raw.tls.ca),
            cert: resolve(raw.tls.cert),
            key: resolve(raw.tls.key),
            crl: resolve(raw.tls.crl),
            crl_check,
        },
    })
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        file: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.2:0"
state_dir = "state"
coordinator_id = "spiffe://prod/coordinator"
[tls]
ca = "pki/ca.crt"
cert = "pki/agent-web1.crt"
key = "pki/agent-web1.key"
crl = "/etc/tollgate/crl.pem"
"#;

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let c = parse(GOOD, Path::new("/etc/tollgate/agent.toml")).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/tollgate/state"));
        assert_eq!(c.tls.crl, Path::new("/etc/tollgate/crl.pem"));
        assert_eq!(c.allowed_shells, vec![Shell::Pwsh, Shell::Sh]);
        assert_eq!(c.max_concurrent, 4);
        assert_eq!(c.tls.crl_check, Duration::from_secs(2));
        let c = parse(
            &format!("{GOOD}crl_check_secs = 30\n"),
            Path::new("/etc/tollgate/agent.toml"),
        )
        .unwrap();
        assert_eq!(c.tls.crl_check, Duration::from_secs(30));
    }

    #[test]
    fn bad_configs_name_the_key_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            ("listen = \"127.0.0.2:0\"", "listen = \"nowhere\"", "listen"),
            (
                "coordinator_id = \"spiffe://prod/coordinator\"",
                "coordinator_id = \"spiffe://prod/agent/x\"",
                "coordinator_id",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nallowed_shells = [\"bash\"]",
                "allowed_shells[0]",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nmax_concurrent = 0",
                "max_concurrent",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\ncolour = \"blue\"",
                "colour",
            ),
            ("state_dir = \"state\"\n", "", "state_dir"),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nmax_frame_bytes = 100",
                "max_frame_bytes",
            ),
            (
                "crl = \"/etc/tollgate/crl.pem\"",
                "crl = \"/etc/tollgate/crl.pem\"\ncrl_check_secs = 0",
                "tls.crl_check_secs",
            ),
        ];
        for (from, to, key) in cases {
            let text = GOOD.replacen(from, to, 1);
            let e = parse(&text, Path::new("agent.toml")).unwrap_err();
            match &e {
                AgentError::Config(c) => {
                    assert_eq!(c.file(), "agent.toml");
                    assert_eq!(c.key(), *key, "{e}");
                    assert!(!c.reason().is_empty());
                }
                other => panic!("{other}"),
            }
        }
    }
}
