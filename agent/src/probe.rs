//! Facts about this host, and their fingerprint.
//!
//! Built-in facts (fingerprinted): `host.name`, `os.family`, `os.arch`, `agent.version`,
//! `agent.id`, `pwsh.present`, `pwsh.version`, `boot.id` (Linux). Volatile facts (reported, never
//! fingerprinted): `state_dir.free_bytes`, `time.unix_ms`. A probe script's stdout must be one
//! JSON object; each top-level key `K` becomes the fingerprinted fact `probe.K` (strings as-is,
//! anything else as compact JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tollgate_protocol::agent::{AgentErrorCode, ExecStatus, ProbeReport, ProbeRequest};
use tollgate_protocol::{Shell, StepErrors};

use crate::exec::{self, ExecSpec};
use crate::shells::Shells;

/// Largest probe-script output accepted.
const PROBE_OUTPUT_MAX: usize = 64 * 1024;

pub use tollgate_protocol::agent::fingerprint;

/// Why a probe failed: a typed code the coordinator acts on, and words for people. The
/// coordinator never reads the words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    pub code: AgentErrorCode,
    pub message: String,
}

impl ProbeError {
    fn new(code: AgentErrorCode, message: impl Into<String>) -> Self {
        ProbeError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Turns a probe script's stdout into `probe.*` facts.
pub fn script_facts(stdout: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(stdout).map_err(|e| format!("probe output is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("probe output must be one JSON object".into());
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (format!("probe.{k}"), text)
        })
        .collect())
}

#[cfg(unix)]
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(not(unix))]
fn host_name() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_default()
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

/// Variables every script the agent runs can read: `TOLLGATE_AGENT_ID` (this agent's SPIFFE id)
/// and `TOLLGATE_AGENT_STATE` (its state directory).
pub fn script_env(identity: &str, state_dir: &Path) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("TOLLGATE_AGENT_ID".to_string(), identity.to_string()),
        (
            "TOLLGATE_AGENT_STATE".to_string(),
            state_dir.display().to_string(),
        ),
    ])
}

/// What the prober needs to know about this agent.
#[derive(Debug)]
pub struct Prober {
    pub identity: String,
    pub state_dir: PathBuf,
    pub scripts_dir: PathBuf,
    pub shells: Shells,
    /// `pwsh` version by resolved path: asking pwsh costs a process start.
    pwsh_version: Mutex<Option<(PathBuf, String)>>,
}

impl Prober {
    pub fn new(identity: String, state_dir: PathBuf, scripts_dir: PathBuf, shells: Shells) -> Self {
        Prober {
            identity,
            state_dir,
            scripts_dir,
            shells,
            pwsh_version: Mutex::new(None),
        }
    }

    async fn run_capture(
        &self,
        shell: Shell,
        program: PathBuf,
        script: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, ProbeError> {
        let spec = ExecSpec {
            shell,
            program,
            script: script.to_string(),
            env: script_env(&self.identity, &self.state_dir),
            working_dir: None,
            timeout,
            retention: PROBE_OUTPUT_MAX,
            // A probe decides by its exit code and JSON, as the session host's probe does.
            errors: StepErrors::Continue,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let (_keep_cancel, cancel) = watch::channel(false);
        let (_keep_shutdown, shutdown) = watch::channel(false);
        let outcome = exec::run(spec, &self.scripts_dir, tx, cancel, shutdown).await;
        drain.abort();
        match outcome.status {
            ExecStatus::Exited { code: 0 } if !outcome.stdout_truncated => Ok(outcome.stdout),
            ExecStatus::Exited { code: 0 } => Err(ProbeError::new(
                AgentErrorCode::ProbeMalformed,
                format!("output exceeds {PROBE_OUTPUT_MAX} bytes"),
            )),
            ExecStatus::Exited { code } => {
                let tail = String::from_utf8_lossy(&outcome.stderr);
                let tail: String = tail
                    .chars()
                    .rev()
                    .take(300)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Err(ProbeError::new(
                    AgentErrorCode::ProbeFailed,
                    format!("exited with code {code}: {}", tail.trim()),
                ))
            }
            ExecStatus::TimedOut => Err(ProbeError::new(
                AgentErrorCode::ProbeTimedOut,
                format!("timed out after {} ms", timeout.as_millis()),
            )),
            ExecStatus::CapabilityMismatch { detail, .. } => {
                Err(ProbeError::new(AgentErrorCode::CapabilityMismatch, detail))
            }
            other => Err(ProbeError::new(
                AgentErrorCode::ProbeFailed,
                format!("{other:?}"),
            )),
        }
    }

    async fn pwsh_facts(&self, facts: &mut BTreeMap<String, String>) {
        let Ok(path) = self.shells.resolve(Shell::Pwsh) else {
            facts.insert("pwsh.present".into(), "false".into());
            return;
        };
        facts.insert("pwsh.present".into(), "true".into());
        let cached = self.pwsh_version.lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|(p, _)| *p == path)
                .map(|(_, v)| v.clone())
        });
        let version = match cached {
            Some(v) => v,
            None => {
                let v = self
                    .run_capture(
                        Shell::Pwsh,
                        path.clone(),
                        "$PSVersionTable.PSVersion.ToString()",
                        Duration::from_secs(20),
                    )
                    .await
                    .map(|o| String::from_utf8_lossy(&o).trim().to_string())
                    .unwrap_or_else(|e| format!("unknown ({e})"));
                if let Ok(mut c) = self.pwsh_version.lock() {
                    *c = Some((path, v.clone()));
                }
                v
            }
        };
        facts.insert("pwsh.version".into(), version);
    }

    /// Learns what the shells report about themselves (today: `pwsh`'s version, a process start
    /// that costs seconds on a cold machine), so that no probe waits for it. Called once before
    /// the agent serves; a probe after it reads the cached answer.
    pub async fn learn_shells(&self) -> BTreeMap<String, String> {
        let mut facts = BTreeMap::new();
        self.pwsh_facts(&mut facts).await;
        facts
    }

    /// Collects facts, runs the probe script if any, and fingerprints the result.
    pub async fn probe(&self, req: &ProbeRequest) -> Result<ProbeReport, ProbeError> {
        let mut facts = BTreeMap::new();
        facts.insert("host.name".into(), host_name());
        facts.insert("os.family".into(), std::env::consts::OS.into());
        facts.insert("os.arch".into(), std::env::consts::ARCH.into());
        facts.insert("agent.version".into(), env!("CARGO_PKG_VERSION").into());
        facts.insert("agent.id".into(), self.identity.clone());
        if let Some(b) = boot_id() {
            facts.insert("boot.id".into(), b);
        }
        self.pwsh_facts(&mut facts).await;
        if let Some(script) = &req.script {
            let program = self.shells.resolve(script.shell).map_err(|e| {
                ProbeError::new(
                    AgentErrorCode::CapabilityMismatch,
                    format!("probe script: {e}"),
                )
            })?;
            let timeout = Duration::from_millis(req.timeout_ms.max(1));
            let out = self
                .run_capture(script.shell, program, &script.body, timeout)
                .await
                .map_err(|e| ProbeError::new(e.code, format!("probe script {e}")))?;
            facts.extend(
                script_facts(&out)
                    .map_err(|e| ProbeError::new(AgentErrorCode::ProbeMalformed, e))?,
            );
        }
        let mut volatile = BTreeMap::new();
        if let Some(free) = free_bytes(&self.state_dir) {
            volatile.insert("state_dir.free_bytes".into(), free.to_string());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        volatile.insert("time.unix_ms".into(), now.to_string());
        let fingerprint = fingerprint(&facts);
        Ok(ProbeReport {
            facts,
            volatile,
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_canonical_and_sensitive() {
        let mut a = BTreeMap::new();
        a.insert("x".to_string(), "1".to_string());
        a.insert("y".to_string(), "2".to_string());
        let fa = fingerprint(&a);
        let mut b = BTreeMap::new();
        b.insert("y".to_string(), "2".to_string());
        b.insert("x".to_string(), "1".to_string());
        assert_eq!(fa, fingerprint(&b));
        b.insert("x".to_string(), "11".to_string());
        assert_ne!(fa, fingerprint(&b));
        // Length prefixes keep ("ab","c") apart from ("a","bc").
        let one: BTreeMap<_, _> = [("ab".to_string(), "c".to_string())].into();
        let two: BTreeMap<_, _> = [("a".to_string(), "bc".to_string())].into();
        assert_ne!(fingerprint(&one), fingerprint(&two));
    }

    #[test]
    fn script_output_must_be_one_object() {
        let f = script_facts(br#"{"role":"web","port":443,"tags":["a"]}"#).unwrap();
        assert_eq!(f["probe.role"], "web");
        assert_eq!(f["probe.port"], "443");
        assert_eq!(f["probe.tags"], r#"["a"]"#);
        assert!(script_facts(b"[1,2]").unwrap_err().contains("object"));
        assert!(script_facts(b"not json").unwrap_err().contains("not JSON"));
    }
}
