//! The `Host` actor: owns one host's transport and serializes work on it.
//!
//! It carries requests to its [`HostTransport`] and hands the core's typed answers back; it
//! decides nothing. The transport is moved into each request's future and put back after
//! (requests are atomic, so it is here whenever one starts).

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use tollgate_protocol::agent::{ExecuteRequest, OutputChunk, ProbeRequest as WireProbe, Script};
use tollgate_protocol::{Shell, StepErrors};

use crate::config::ProbeScript;
use crate::core::facts::ProbeOutcome;
use crate::core::run::{IdempotencyAnswer, StepResult, idempotency_answer, step_result};
use crate::transport::agent::AgentConnector;
use crate::transport::{HostTransport, Reach};

use super::clock::Clock;

/// Extra time an execution may take over its own timeout before the answer counts as lost.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);

/// A line of output from a step, for progress displays.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct StepOutput {
    pub host: String,
    pub step_id: String,
    pub chunk: OutputChunk,
}

#[derive(Debug)]
pub struct HostActor {
    name: String,
    clock: Clock,
    /// `None` only while a request holds it.
    transport: Option<HostTransport>,
}

impl HostActor {
    pub fn new(name: String, reach: Reach, connector: AgentConnector, clock: Clock) -> Self {
        let transport = HostTransport::new(&name, reach, &connector);
        HostActor {
            name,
            clock,
            transport: Some(transport),
        }
    }

    /// Takes the transport for one request. Requests are atomic, so it is always here; if it
    /// ever were not, the request would fail as if the host could not be reached.
    fn take(&mut self) -> Option<HostTransport> {
        let t = self.transport.take();
        if t.is_none() {
            tracing::error!(host = %self.name, "transport in use by another request");
        }
        t
    }
}

impl Actor for HostActor {
    type Context = Context<Self>;
}

/// Probe this host.
#[derive(Debug, Message)]
#[rtype(result = "ProbeOutcome")]
pub struct Probe {
    pub script: Option<ProbeScript>,
    pub timeout_ms: u64,
}

impl Handler<Probe> for HostActor {
    type Result = AtomicResponse<Self, ProbeOutcome>;

    fn handle(&mut self, msg: Probe, _ctx: &mut Context<Self>) -> Self::Result {
        let transport = self.take();
        let clock = self.clock.clone();
        let timeout = Duration::from_millis(msg.timeout_ms.max(1));
        let req = WireProbe {
            script: msg.script.map(|s| Script {
                shell: s.shell,
                body: s.run,
            }),
            timeout_ms: msg.timeout_ms,
        };
        let fut = async move {
            let mut t = transport?;
            let answer = t.probe(req, timeout).await;
            Some((t, answer))
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |done, act, _| {
            let Some((t, answer)) = done else {
                return ProbeOutcome::Failed(crate::core::facts::ProbeFailure::Unreachable);
            };
            act.transport = Some(t);
            match answer {
                Ok(report) => {
                    ProbeOutcome::from_report(report.fingerprint, report.facts, clock.now_ms())
                }
                Err(failure) => {
                    tracing::info!(host = %act.name, ?failure, "probe failed");
                    ProbeOutcome::Failed(failure)
                }
            }
        })))
    }
}

/// Run one step (or one check) on this host.
#[derive(Debug, Message)]
#[rtype(result = "StepResult")]
pub struct Execute {
    pub step_id: String,
    pub idempotency_key: String,
    pub shell: Shell,
    pub script: String,
    pub timeout_ms: u64,
    pub errors: StepErrors,
    pub output: Option<Recipient<StepOutput>>,
}

impl Handler<Execute> for HostActor {
    type Result = AtomicResponse<Self, StepResult>;

    fn handle(&mut self, msg: Execute, _ctx: &mut Context<Self>) -> Self::Result {
        let transport = self.take();
        let host = self.name.clone();
        let limit = Duration::from_millis(msg.timeout_ms) + ANSWER_MARGIN;
        let req = ExecuteRequest {
            idempotency_key: msg.idempotency_key,
            shell: msg.shell,
            script: msg.script,
            env: BTreeMap::from([
                ("TOLLGATE_HOST".to_string(), host.clone()),
                ("TOLLGATE_STEP".to_string(), msg.step_id.clone()),
            ]),
            working_dir: None,
            timeout_ms: msg.timeout_ms,
            errors: msg.errors,
        };
        let (output, step_id) = (msg.output, msg.step_id);
        let fut = async move {
            let mut t = transport?;
            let on_output = |chunk: OutputChunk| {
                if let Some(o) = &output {
                    o.do_send(StepOutput {
                        host: host.clone(),
                        step_id: step_id.clone(),
                        chunk,
                    });
                }
            };
            let answer = t.execute(req, on_output, limit).await;
            Some((t, answer))
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|done, act, _| {
            let Some((t, answer)) = done else {
                // Nothing was sent.
                return StepResult::Transient {
                    reason: tollgate_protocol::outcome::ReasonCode::Unreachable,
                };
            };
            act.transport = Some(t);
            match answer {
                Ok(r) => step_result(&r),
                Err(failure) => {
                    tracing::info!(host = %act.name, ?failure, "step did not complete");
                    failure
                }
            }
        })))
    }
}

/// Ask what became of an idempotency key.
#[derive(Debug, Message)]
#[rtype(result = "IdempotencyAnswer")]
pub struct QueryKey {
    pub key: String,
}

impl Handler<QueryKey> for HostActor {
    type Result = AtomicResponse<Self, IdempotencyAnswer>;

    fn handle(&mut self, msg: QueryKey, _ctx: &mut Context<Self>) -> Self::Result {
        let transport = self.take();
        let fut = async move {
            let mut t = transport?;
            let answer = t.query(&msg.key).await;
            Some((t, answer))
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|done, act, _| {
            let Some((t, answer)) = done else {
                return IdempotencyAnswer::QueryFailed;
            };
            act.transport = Some(t);
            idempotency_answer(answer)
        })))
    }
}
