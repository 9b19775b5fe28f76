//! CLI <-> coordinator messages (ALPN `tollgate-ctl/1`).
//!
//! One bidirectional stream per request. The first stream of a connection carries
//! `Hello` / `HelloAck`. Long requests (`Submit`, `Execute`) stream [`ProgressEvent`]s and end
//! with one final answer; the others answer once. The caller's identity is never taken from a
//! message: the coordinator reads it from the client certificate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::{Hello, HelloAck};
use crate::outcome::{PlanView, RunReport};
use crate::{Action, Mode};

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationIntent {
    pub action: Action,
    pub requested_mode: Mode,
    /// Host names from the inventory; empty means every host.
    pub target_hosts: Vec<String>,
    /// Chosen by the client so a retried submission is recognised.
    pub run_id: Uuid,
    /// Informational: the coordinator records the certificate identity, and refuses a
    /// request whose `requestor` disagrees with it.
    pub requestor: String,
    /// Decide everything, execute nothing.
    pub shadow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlRequest {
    Hello(Hello),
    Submit(OperationIntent),
    PlanShow {
        run_id: Uuid,
    },
    Approve {
        run_id: Uuid,
        operation_hash: String,
    },
    Execute {
        run_id: Uuid,
        token: String,
    },
    /// Stop an open run: nothing new starts, in-flight steps finish, the run closes typed
    /// (`PolicyBlocked(Cancelled)`) and gives its hosts back.
    Cancel {
        run_id: Uuid,
    },
    Status,
    RunsList,
    RunsShow {
        run_id: Uuid,
    },
    RunsVerify {
        run_id: Uuid,
    },
    Explain {
        run_id: Uuid,
    },
    /// Do two runs take the same decisions (a shadow run against the real one)?
    RunsDiff {
        a: Uuid,
        b: Uuid,
    },
}

/// One host's lifecycle as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub role: String,
    pub safety_class: String,
    pub transport: String,
    pub lifecycle: String,
    pub fingerprint: Option<String>,
    /// Unix milliseconds of the last probe.
    pub last_probe_ms: Option<u64>,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunListEntry {
    pub run_id: Uuid,
    pub action: Action,
    pub effective_mode: Mode,
    pub requestor: String,
    pub state: String,
    pub started_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub run_id: Uuid,
    pub ok: bool,
    pub events: u64,
    /// The first line (1-based) that fails, and why.
    pub first_bad_line: Option<u64>,
    pub problem: Option<String>,
}

/// Where two runs part in one scope (a host, or `(run)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionDifference {
    pub scope: String,
    /// 1-based position of the first differing decision in that scope.
    pub index: u64,
    pub a: Option<String>,
    pub b: Option<String>,
}

/// The answer to `runs diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    pub a: Uuid,
    pub b: Uuid,
    /// Both timelines verify and every scope took the same decisions in the same order.
    pub parity: bool,
    pub decisions_a: u64,
    pub decisions_b: u64,
    pub differences: Vec<DecisionDifference>,
    /// Set when a timeline does not verify: its decisions are not compared.
    pub problem: Option<String>,
}

/// A signed, single-use authorization for one plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub run_id: Uuid,
    pub operation_hash: String,
    /// Compact text form, safe to paste into a shell.
    pub token: String,
    pub expires_ms: u64,
    /// The command to run next.
    pub next_command: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProgressKind {
    RunAccepted,
    ProbeStarted,
    ProbeFinished,
    PhaseStarted,
    StepStarted,
    StepFinished,
    StepSkipped,
    BarrierPassed,
    BarrierBlocked,
    HostFinished,
}

/// A streamed progress event; `done`/`total` count steps for progress bars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub run_id: Uuid,
    pub kind: ProgressKind,
    pub host: Option<String>,
    pub phase: Option<String>,
    pub step: Option<String>,
    pub ok: Option<bool>,
    pub done: u32,
    pub total: u32,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlErrorCode {
    UnsupportedVersion,
    HelloRequired,
    Malformed,
    NotAuthorized,
    UnknownRun,
    UnknownHost,
    InvalidRequest,
    Internal,
    /// A target host belongs to another open run (the message names it).
    HostBusy,
    /// The run id exists and may not be reused (closed, open, or another shape).
    RunNotReusable,
    /// The signed run index lists the run, but its directory is gone (deleted or renamed).
    RunMissing,
    /// The run's journal cannot be read or does not verify.
    RunUnreadable,
    /// The approver is the run's requester, and policy forbids self-approval here.
    SelfApproval,
    /// The plan already has a live token; no second one is issued.
    AlreadyApproved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtlError {
    pub code: CtlErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CtlResponse {
    HelloAck(HelloAck),
    Progress(ProgressEvent),
    Run(RunReport),
    Plan(PlanView),
    Approved(Approval),
    /// An approval was recorded; more distinct approvers are needed before a token is issued.
    ApprovalRecorded {
        run_id: Uuid,
        approvers: Vec<String>,
        required: u8,
    },
    Status {
        hosts: Vec<HostStatus>,
    },
    Runs {
        runs: Vec<RunListEntry>,
    },
    /// A run's summary document (the same JSON as `summary.json`).
    Summary {
        json: String,
    },
    Verified(VerifyReport),
    Diff(DiffReport),
    Explanation {
        lines: Vec<String>,
    },
    Error(CtlError),
}

/// Free-form facts attached to answers (kept as text so the wire stays schema-stable).
pub type Facts = BTreeMap<String, String>;
