//! Probing: the target's facts over the session, checked and fingerprinted.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;
use tollgate_protocol::agent::{ProbeReport, ProbeRequest, fingerprint};

use super::contract::{self, Request, Response};
use super::session::duration_ms;
use super::{PwshSession, SessionError};

impl PwshSession {
    /// Collects facts from the target: built-ins (`host.name`, `os.family`, `os.arch`,
    /// `pwsh.present`, `pwsh.version`, `pwsh.edition`, `boot.id`, `transport.kind`,
    /// `transport.mode`) and the probe script's JSON object as `probe.KEY`, fingerprinted.
    /// Bounded by `timeout`, starting the child included.
    pub async fn probe(
        &mut self,
        req: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReport, SessionError> {
        let deadline = Instant::now() + timeout;
        self.ensure_ready(deadline).await?;
        // Leave the script room to answer "timed out" itself before the child counts as hung.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let script_ms = req.timeout_ms.min(duration_ms(remaining) * 4 / 5).max(1);
        let wants_script = req.script.is_some();
        let (shell, script) = match req.script {
            Some(s) => (Some(s.shell), Some(s.body)),
            None => (None, None),
        };
        let id = self.take_id();
        let wire = Request::Probe {
            id,
            shell,
            script,
            timeout_ms: script_ms,
        };
        self.send(&wire, deadline)
            .await
            .map_err(|b| b.after_send())?;
        loop {
            let resp = match self.recv(deadline).await {
                Ok(r) => r,
                Err(b) => return Err(self.broke_after_send(b, timeout).await),
            };
            match resp {
                Response::Probe {
                    id: r,
                    facts,
                    volatile,
                    script_output,
                } if r == id => return self.report(facts, volatile, script_output, wants_script),
                Response::Fail {
                    id: r,
                    code,
                    message,
                } if r == id => return Err(self.failed(code, message, timeout).await),
                Response::Output { id: r, .. }
                | Response::Error { id: r, .. }
                | Response::Progress { id: r, .. }
                    if r == id => {}
                other => return Err(self.unexpected(&other, "probe").await),
            }
        }
    }

    fn report(
        &self,
        mut facts: BTreeMap<String, String>,
        volatile: BTreeMap<String, String>,
        script_output: Option<String>,
        wants_script: bool,
    ) -> Result<ProbeReport, SessionError> {
        for required in ["host.name", "os.family", "pwsh.version"] {
            if facts.get(required).is_none_or(|v| v.is_empty()) {
                return Err(SessionError::ProbeMalformed(format!(
                    "the session host reported no {required}"
                )));
            }
        }
        facts.retain(|k, _| !k.starts_with("probe.") && !k.starts_with("transport."));
        let kind = if self.settings.mode.is_in_process() {
            "local"
        } else {
            "psremoting"
        };
        facts.insert("transport.kind".into(), kind.into());
        facts.insert("transport.mode".into(), self.settings.mode.as_str().into());
        if wants_script {
            let out = script_output.ok_or_else(|| {
                SessionError::ProbeMalformed("the probe script printed nothing".into())
            })?;
            facts.extend(contract::script_facts(&out).map_err(SessionError::ProbeMalformed)?);
        }
        let fingerprint = fingerprint(&facts);
        Ok(ProbeReport {
            facts,
            volatile,
            fingerprint,
        })
    }
}
