//! Transports: how the coordinator reaches a host. Each one carries requests and answers and
//! maps its own failures to the core's typed answers; none of them decides anything.
//!
//! [`HostTransport`] is the one seam the Host actor talks to: probe, execute, query. Adding a
//! transport is a folder here (its connection, its `answers` mapping and the function that reads
//! its inventory entry into a [`Reach`]), a variant of [`Reach`] and of [`HostTransport`], and
//! its inventory enum in `core::config` (which the operation hash in `core::plan` binds).

pub mod agent;
pub mod pwsh;

use std::net::SocketAddr;
use std::time::Duration;

use tollgate_certs::SpiffeId;
use tollgate_protocol::agent::{
    ExecResult, ExecuteRequest, IdempotencyStatus, OutputChunk, ProbeReport, ProbeRequest,
};
use tollgate_protocol::outcome::ReasonCode;

use crate::config::{ConfigError, Transport};
use crate::core::facts::ProbeFailure;
use crate::core::run::StepResult;

use self::agent::AgentConnector;
use self::agent::host::AgentHost;
use self::pwsh::{PwshSession, PwshSettings};

/// How a host is reached (from the inventory).
#[derive(Debug, Clone)]
pub enum Reach {
    Agent {
        addr: SocketAddr,
        id: SpiffeId,
    },
    /// A supervised `pwsh` session host: PowerShell Remoting (WinRM or SSH), or the local
    /// runspace (the `local` transport).
    Pwsh(Box<PwshSettings>),
    /// A transport this build cannot drive; every request fails typed with this reason.
    Unsupported {
        reason: String,
    },
}

/// Where an inventory entry is read: for errors that name the file and key, and the settings
/// every transport may need.
#[derive(Debug, Clone)]
pub struct ReachContext<'a> {
    /// The inventory file label.
    pub inventory: &'a str,
    /// The entry's key (`hosts[N].transport`).
    pub key: String,
    /// The coordinator's fleet (an agent must belong to it).
    pub fleet: &'a str,
    /// The `pwsh` executable from `coordinator.toml`.
    pub pwsh: &'a str,
    /// `[psremoting]` of `coordinator.toml`: session timings and fleet-wide SSH defaults.
    pub psremoting: &'a crate::config::PsRemotingSettings,
}

impl ReachContext<'_> {
    /// A refusal of `sub` (a key under this entry).
    pub fn invalid(&self, sub: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.inventory, format!("{}.{sub}", self.key), reason)
    }
}

impl Reach {
    /// How the inventory's `transport` entry is reached; each transport reads its own.
    pub fn of(transport: &Transport, at: &ReachContext<'_>) -> Result<Reach, ConfigError> {
        match transport {
            Transport::Agent(a) => agent::reach(a, at),
            Transport::PsRemoting(p) => Ok(pwsh::reach_remote(p, at)),
            Transport::Local => Ok(pwsh::reach_local(at)),
        }
    }
}

/// One host's connection, whichever transport reaches it.
#[derive(Debug)]
pub enum HostTransport {
    Agent(Box<AgentHost>),
    Pwsh(Box<PwshSession>),
    Unsupported { reason: String },
}

impl HostTransport {
    pub fn new(host: &str, reach: Reach, connector: &AgentConnector) -> Self {
        match reach {
            Reach::Agent { addr, id } => {
                HostTransport::Agent(Box::new(AgentHost::new(addr, id, connector.clone())))
            }
            Reach::Pwsh(settings) => {
                HostTransport::Pwsh(Box::new(PwshSession::new(host.to_string(), *settings)))
            }
            Reach::Unsupported { reason } => HostTransport::Unsupported { reason },
        }
    }

    /// Asks for facts, within `timeout` (connecting included).
    pub async fn probe(
        &mut self,
        req: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReport, ProbeFailure> {
        match self {
            HostTransport::Agent(a) => a.probe(req, timeout).await,
            HostTransport::Pwsh(s) => s
                .probe(req, timeout)
                .await
                .map_err(|e| pwsh::answers::probe_failure(&e)),
            HostTransport::Unsupported { .. } => Err(ProbeFailure::Unreachable),
        }
    }

    /// Runs one step; an agent's answer must come within `limit` (a session bounds itself by
    /// the request's timeout and its own margin). `Err` is the failure as the core reads it.
    pub async fn execute(
        &mut self,
        req: ExecuteRequest,
        on_output: impl FnMut(OutputChunk),
        limit: Duration,
    ) -> Result<ExecResult, StepResult> {
        match self {
            HostTransport::Agent(a) => a.execute(req, on_output, limit).await,
            HostTransport::Pwsh(s) => s
                .execute(req, on_output)
                .await
                .map_err(|e| pwsh::answers::step_failure(&e)),
            // Nothing can be sent: safe to retry once the inventory is fixed.
            HostTransport::Unsupported { .. } => Err(StepResult::Transient {
                reason: ReasonCode::Unreachable,
            }),
        }
    }

    /// What became of an idempotency key; `None` if the host could not be asked.
    pub async fn query(&mut self, key: &str) -> Option<IdempotencyStatus> {
        match self {
            HostTransport::Agent(a) => a.query(key).await,
            HostTransport::Pwsh(s) => s.query(key).await.ok(),
            HostTransport::Unsupported { .. } => None,
        }
    }
}
