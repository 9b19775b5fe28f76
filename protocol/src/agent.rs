//! Coordinator <-> agent messages (ALPN `tollgate-agent/1`).
//!
//! One bidirectional QUIC stream per request. The first stream of a connection carries
//! `Hello` / `HelloAck`; nothing else is served before it. `Execute` answers with zero or more
//! [`OutputChunk`]s and then exactly one [`ExecResult`]; every other request has one answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::version::VersionRange;
use crate::{Shell, StepErrors};

/// First message of every connection, from the dialling side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub versions: VersionRange,
    /// Free text for logs, e.g. `tollgate 0.1.0`.
    pub software: String,
}

/// The accepting side's answer: the version both will speak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u16,
    pub software: String,
}

/// A script and the interpreter to run it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Script {
    pub shell: Shell,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// Optional script whose stdout (a JSON object) joins the host's facts.
    pub script: Option<Script>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    /// Unique per (run, host, step); a repeated key never runs twice.
    pub idempotency_key: String,
    pub shell: Shell,
    pub script: String,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub timeout_ms: u64,
    /// What the script's errors mean (a `pwsh` step; an `sh` step is always `Stop` and fails
    /// by its exit code). Required on the wire (protocol 2): an agent that predates it refuses
    /// the connection instead of running a step with other error semantics.
    pub errors: StepErrors,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRequest {
    Hello(Hello),
    Probe(ProbeRequest),
    Execute(ExecuteRequest),
    Cancel { idempotency_key: String },
    QueryIdempotency { idempotency_key: String },
}

impl AgentRequest {
    pub fn name(&self) -> &'static str {
        match self {
            AgentRequest::Hello(_) => "Hello",
            AgentRequest::Probe(_) => "Probe",
            AgentRequest::Execute(_) => "Execute",
            AgentRequest::Cancel { .. } => "Cancel",
            AgentRequest::QueryIdempotency { .. } => "QueryIdempotency",
        }
    }
}

/// SHA-256 over the canonical encoding of non-volatile facts: for each fact in key order, the
/// key and the value, each as a big-endian `u32` length followed by its UTF-8 bytes. Hex.
/// The agent computes it; the coordinator recomputes it and refuses a report that disagrees.
pub fn fingerprint(facts: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (k, v) in facts {
        for part in [k, v] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Facts about a host. `facts` are non-volatile and fingerprinted; `volatile` facts (free space,
/// uptime) are reported but never part of the fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub facts: BTreeMap<String, String>,
    pub volatile: BTreeMap<String, String>,
    /// Hex SHA-256 over the canonical encoding of `facts`.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// Order of this chunk across both streams, from 0.
    pub seq: u64,
    pub stream: Stream,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecStatus {
    /// The process exited by itself (any code, zero or not).
    Exited {
        code: i32,
    },
    /// The process was killed by a signal it did not ask for.
    Killed {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    /// The shell is not allowed by the agent's config or not installed; nothing ran.
    CapabilityMismatch {
        shell: Shell,
        detail: String,
    },
    /// The process could not be started; nothing ran.
    SpawnFailed {
        detail: String,
    },
    /// The key was found `started` with no result (agent restarted mid-run): whether the
    /// script ran is unknown, and it is never re-run.
    Uncertain {
        detail: String,
    },
    /// The agent was shutting down and stopped the process; the outcome is known to be
    /// incomplete.
    Interrupted {
        detail: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub idempotency_key: String,
    pub status: ExecStatus,
    pub duration_ms: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// True when this result came from the idempotency store and nothing ran now.
    pub replayed: bool,
}

/// What the agent's store knows about a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdempotencyStatus {
    NotFound,
    Running,
    Finished(ExecResult),
    Uncertain,
}

/// Why the agent refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentErrorCode {
    UnsupportedVersion,
    HelloRequired,
    Malformed,
    Oversize,
    Busy,
    ShuttingDown,
    /// The probe script failed (non-zero exit, could not start).
    ProbeFailed,
    /// The probe script did not print one JSON object (or printed more than 64 KiB).
    ProbeMalformed,
    /// The probe script did not finish within the probe's timeout.
    ProbeTimedOut,
    /// The requested shell (of a step or a probe script) is not allowed or not installed;
    /// nothing ran.
    CapabilityMismatch,
    /// The idempotency key was used before for a different request.
    IdempotencyConflict,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    pub code: AgentErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentResponse {
    HelloAck(HelloAck),
    ProbeReport(ProbeReport),
    Output(OutputChunk),
    ExecResult(ExecResult),
    CancelAck { found: bool },
    Idempotency(IdempotencyStatus),
    Error(AgentError),
}

impl AgentResponse {
    pub fn name(&self) -> &'static str {
        match self {
            AgentResponse::HelloAck(_) => "HelloAck",
            AgentResponse::ProbeReport(_) => "ProbeReport",
            AgentResponse::Output(_) => "Output",
            AgentResponse::ExecResult(_) => "ExecResult",
            AgentResponse::CancelAck { .. } => "CancelAck",
            AgentResponse::Idempotency(_) => "Idempotency",
            AgentResponse::Error(_) => "Error",
        }
    }
}
