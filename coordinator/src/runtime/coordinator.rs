//! The `Coordinator` actor: intake of intents, the runs registry, the token authority, and the
//! fleet's last known state. It asks the safety core for every decision.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use ring::rand::SecureRandom;
use ring::signature::Ed25519KeyPair;
use tollgate_protocol::Mode;
use tollgate_protocol::ctl::{
    Approval, CtlError, CtlErrorCode, HostStatus, OperationIntent, RunListEntry,
};
use tollgate_protocol::outcome::{Outcome, PlanView, RunReport};
use uuid::Uuid;

use crate::config::{CoordinatorConfig, Inventory, Operations};
use crate::core::approval::{ApprovalProgress, ApprovalRequest, PendingApproval};
use crate::core::commands::execute_command;
use crate::core::leases::Leases;
use crate::core::ledger::{self, Admission, AdmitRefused, Known, LedgerEvent, RunRecord, Stage};
use crate::core::lifecycle::HostState;
use crate::core::plan::Intent;
use crate::core::run::{RunMachine, RunSettings, RunSpec};
use crate::core::token::TokenIssuer;

use super::clock::Clock;
use super::host::HostActor;
use super::nonces::NonceStore;
use super::recorder::Recorder;
use super::run::{
    CancelNow, ClaimsFor, ConsumeNonce, GetPlan, PresentToken, RunActor, RunDeps, RunMeta,
    RunNotice, RunUpdate, Watcher,
};

/// Everything the coordinator is configured with.
#[derive(Clone)]
pub struct Setup {
    pub config: CoordinatorConfig,
    pub inventory: Inventory,
    pub operations: Operations,
    pub clock: Clock,
    pub issuer: Arc<TokenIssuer>,
    pub signer: Arc<Ed25519KeyPair>,
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("state_dir", &self.config.state_dir)
            .finish()
    }
}

#[derive(Debug)]
struct RunEntry {
    addr: Option<Addr<RunActor>>,
    record: RunRecord,
    requested_mode: Mode,
    /// Everyone who submitted it (first submission and continuation): none may approve it.
    submitters: Vec<String>,
    started_ms: u64,
    last: Option<RunReport>,
}

impl RunEntry {
    fn state(&self) -> String {
        let shadow = if self.record.shadow { " (shadow)" } else { "" };
        match (&self.addr, &self.last) {
            (None, Some(r)) if self.record.stage.is_closed() => {
                format!("{}{shadow}", r.outcome.kind())
            }
            _ => format!("{}{shadow}", self.record.stage.as_str()),
        }
    }

    /// Moves the entry's stage by the ledger's table; a refused event changes nothing.
    fn advance(&mut self, event: LedgerEvent, now_ms: u64) -> Result<(), ledger::LedgerError> {
        self.record.stage = ledger::transition(Some(self.record.stage), event, now_ms)?;
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
struct FleetView {
    lifecycle: Option<HostState>,
    fingerprint: Option<String>,
    last_probe_ms: Option<u64>,
    detail: String,
}

pub struct Coordinator {
    setup: Setup,
    hosts: BTreeMap<String, Addr<HostActor>>,
    recorder: Addr<Recorder>,
    nonces: NonceStore,
    runs: BTreeMap<Uuid, RunEntry>,
    /// Run ids whose record is unreadable or missing: never reused.
    damaged: BTreeMap<Uuid, Known>,
    leases: Leases,
    fleet: BTreeMap<String, FleetView>,
    approvals: HashMap<Uuid, PendingApproval>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("runs", &self.runs.len())
            .finish()
    }
}

fn ctl_error(code: CtlErrorCode, message: impl Into<String>) -> CtlError {
    CtlError {
        code,
        message: message.into(),
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The system RNG does not fail on supported platforms; a zero seed would only weaken jitter,
    // and a zero nonce is still single-use-checked.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b
}

impl Coordinator {
    pub fn new(
        setup: Setup,
        hosts: BTreeMap<String, Addr<HostActor>>,
        recorder: Addr<Recorder>,
        nonces: NonceStore,
    ) -> Self {
        let fleet = setup
            .inventory
            .hosts()
            .iter()
            .map(|h| (h.name.clone(), FleetView::default()))
            .collect();
        Coordinator {
            setup,
            hosts,
            recorder,
            nonces,
            runs: BTreeMap::new(),
            damaged: BTreeMap::new(),
            leases: Leases::new(),
            fleet,
            approvals: HashMap::new(),
        }
    }

    fn runs_dir(&self) -> std::path::PathBuf {
        self.setup.config.state_dir.join("runs")
    }

    fn settings(&self) -> RunSettings {
        RunSettings::from_config(
            &self.setup.config,
            self.setup.public_key.clone(),
            u64::from_le_bytes(random_bytes()),
        )
    }

    /// Registers a run closed before this process started (or closed by its recovery).
    pub fn adopt_closed(&mut self, report: RunReport, record: RunRecord, started_ms: u64) {
        self.runs.insert(
            report.run_id,
            RunEntry {
                addr: None,
                record: RunRecord {
                    stage: Stage::Closed,
                    ..record
                },
                requested_mode: report.requested_mode,
                submitters: Vec::new(),
                started_ms,
                last: Some(report),
            },
        );
    }

    /// Registers a run id whose record is unreadable or missing: it is never reused.
    pub fn adopt_damaged(&mut self, run_id: Uuid, known: Known) {
        self.damaged.insert(run_id, known);
    }

    /// What the ledger knows of `run_id`.
    fn known(&self, run_id: Uuid) -> Option<Known> {
        match self.runs.get(&run_id) {
            Some(e) => Some(Known::Record(e.record.clone())),
            None => self.damaged.get(&run_id).cloned(),
        }
    }
}

/// The control-protocol error for a refused admission.
fn refused_admission(run_id: Uuid, why: AdmitRefused) -> CtlError {
    let code = match why {
        AdmitRefused::Missing => CtlErrorCode::RunMissing,
        AdmitRefused::Unreadable => CtlErrorCode::RunUnreadable,
        _ => CtlErrorCode::RunNotReusable,
    };
    ctl_error(
        code,
        format!(
            "run {run_id} cannot be used for this intent: {why} (rule {}); choose a new run id",
            crate::core::rules::R013_RUN_ID_NAMES_ONE_STORY
        ),
    )
}

impl Actor for Coordinator {
    type Context = Context<Self>;
}

/// Adopt runs found on disk at start.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Adopt {
    pub report: RunReport,
    pub record: RunRecord,
    pub started_ms: u64,
}

impl Handler<Adopt> for Coordinator {
    type Result = ();
    fn handle(&mut self, msg: Adopt, _: &mut Context<Self>) {
        self.adopt_closed(msg.report, msg.record, msg.started_ms);
    }
}

/// An operator's intent. Progress and the answer go to `watcher`.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CtlError>")]
pub struct Submit {
    pub intent: OperationIntent,
    pub requestor: String,
    pub watcher: Watcher,
}

impl Handler<Submit> for Coordinator {
    type Result = Result<(), CtlError>;

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) -> Self::Result {
        let i = msg.intent;
        if !i.requestor.is_empty() && i.requestor != msg.requestor {
            return Err(ctl_error(
                CtlErrorCode::InvalidRequest,
                format!(
                    "the intent names requestor {} but the certificate is {}",
                    i.requestor, msg.requestor
                ),
            ));
        }
        let known = self.known(i.run_id);
        ledger::admit(
            known.as_ref(),
            Admission {
                action: i.action,
                mode: i.requested_mode,
                shadow: i.shadow,
            },
        )
        .map_err(|why| refused_admission(i.run_id, why))?;
        let spec = RunSpec {
            intent: Intent {
                run_id: i.run_id,
                action: i.action,
                requested_mode: i.requested_mode,
                targets: i.target_hosts,
                shadow: i.shadow,
            },
            requestor: msg.requestor.clone(),
            inventory: self.setup.inventory.clone(),
            operations: self.setup.operations.clone(),
            settings: self.settings(),
        };
        let machine = RunMachine::new(spec)
            .map_err(|e| ctl_error(CtlErrorCode::InvalidRequest, e.to_string()))?;
        let now = self.setup.clock.now_ms();
        let stage = ledger::transition(
            known.as_ref().and_then(|k| match k {
                Known::Record(r) => Some(r.stage),
                _ => None,
            }),
            LedgerEvent::Started,
            now,
        )
        .map_err(|e| {
            ctl_error(
                CtlErrorCode::RunNotReusable,
                format!("run {}: {e}", i.run_id),
            )
        })?;
        self.leases
            .acquire(i.run_id, machine.host_states().keys().map(String::as_str))
            .map_err(|busy| {
                ctl_error(
                    CtlErrorCode::HostBusy,
                    format!(
                        "{busy} (rule {})",
                        crate::core::rules::R012_ONE_OPEN_RUN_PER_HOST
                    ),
                )
            })?;
        let deps = RunDeps {
            hosts: self.hosts.clone(),
            recorder: self.recorder.clone(),
            notices: ctx.address().recipient(),
            nonces: ctx.address().recipient(),
            clock: self.setup.clock.clone(),
            signer: self.setup.signer.clone(),
            runs_dir: self.runs_dir(),
        };
        let meta = RunMeta {
            run_id: i.run_id,
            action: i.action,
            requested_mode: i.requested_mode,
            requestor: msg.requestor.clone(),
            shadow: i.shadow,
        };
        let addr = RunActor::new(meta, machine, deps, msg.watcher).start();
        self.approvals.remove(&i.run_id);
        // A continuation keeps the shape and requester the run was born with.
        let record = match known {
            Some(Known::Record(r)) => RunRecord { stage, ..r },
            _ => RunRecord {
                action: i.action,
                shadow: i.shadow,
                requestor: msg.requestor.clone(),
                stage,
            },
        };
        let started_ms = self
            .runs
            .get(&i.run_id)
            .map(|e| e.started_ms)
            .unwrap_or(now);
        let mut submitters = self
            .runs
            .get(&i.run_id)
            .map(|e| e.submitters.clone())
            .unwrap_or_default();
        submitters.push(msg.requestor.clone());
        self.runs.insert(
            i.run_id,
            RunEntry {
                addr: Some(addr),
                record,
                requested_mode: i.requested_mode,
                submitters,
                started_ms,
                last: None,
            },
        );
        Ok(())
    }
}

/// What an approval produced.
#[derive(Debug, Clone)]
pub enum ApproveResult {
    /// The last required approval: here is the token.
    Issued(Approval),
    /// Recorded; more distinct approvers are needed.
    Pending {
        approvers: Vec<String>,
        required: u8,
    },
}

#[derive(Debug, Message)]
#[rtype(result = "Result<ApproveResult, CtlError>")]
pub struct Approve {
    pub run_id: Uuid,
    pub operation_hash: String,
    pub approver: String,
}

impl Handler<Approve> for Coordinator {
    type Result = ResponseActFuture<Self, Result<ApproveResult, CtlError>>;

    fn handle(&mut self, msg: Approve, _: &mut Context<Self>) -> Self::Result {
        let refuse = |e: CtlError| -> Self::Result { Box::pin(actix::fut::ready(Err(e))) };
        let now = self.setup.clock.now_ms();
        if let Some(e) = self.runs.get(&msg.run_id)
            && let Stage::Approved { token_expires_ms } = e.record.stage
            && now < token_expires_ms
        {
            return refuse(ctl_error(
                CtlErrorCode::AlreadyApproved,
                format!(
                    "run {} is already approved and its token is live; no second token is issued (rule {})",
                    msg.run_id,
                    crate::core::rules::R011_SEPARATION_OF_DUTIES
                ),
            ));
        }
        let awaiting = self.runs.get(&msg.run_id).and_then(|e| {
            let waiting = matches!(
                e.record.stage,
                Stage::AwaitingApproval | Stage::Approved { .. }
            );
            match (&e.addr, &e.last) {
                (Some(addr), Some(r)) if waiting => match &r.outcome {
                    Outcome::ConfirmationRequired {
                        operation_hash,
                        plan,
                        ..
                    } => Some((addr.clone(), operation_hash.clone(), plan.clone(), e)),
                    _ => None,
                },
                _ => None,
            }
        });
        let Some((addr, plan_hash, plan, entry)) = awaiting else {
            return refuse(ctl_error(
                CtlErrorCode::InvalidRequest,
                format!("run {} is not waiting for approval", msg.run_id),
            ));
        };
        let required = plan.approvals_required;
        let mut requesters = entry.submitters.clone();
        requesters.push(entry.record.requestor.clone());
        let pending = self.approvals.remove(&msg.run_id).unwrap_or_else(|| {
            PendingApproval::new(ApprovalRequest {
                run_id: msg.run_id,
                operation_hash: plan_hash,
                required,
                requesters,
                self_approval: plan.self_approval,
            })
        });
        let progress = match pending.approve(
            &msg.approver,
            &msg.operation_hash,
            &self.setup.config.authorization,
        ) {
            Ok(p) => p,
            Err(refused) => {
                self.approvals.insert(msg.run_id, refused.pending);
                let code = match refused.error {
                    crate::core::approval::ApprovalError::SelfApproval(_) => {
                        CtlErrorCode::SelfApproval
                    }
                    _ => CtlErrorCode::NotAuthorized,
                };
                let e = ctl_error(code, refused.error.to_string());
                return Box::pin(actix::fut::ready(Err(e)));
            }
        };
        let complete = match progress {
            ApprovalProgress::Pending { pending, .. } => {
                let result = ApproveResult::Pending {
                    approvers: pending.approvers().to_vec(),
                    required,
                };
                self.approvals.insert(msg.run_id, pending);
                return Box::pin(actix::fut::ready(Ok(result)));
            }
            ApprovalProgress::Complete(c) => c,
        };
        // Held from now: a second approval that arrives while this token is being made sees a
        // live token (its expiry is set once the claims are known).
        let run_id = msg.run_id;
        let before = self.runs.get(&run_id).map(|e| e.record.stage);
        if let Some(e) = self.runs.get_mut(&run_id) {
            e.record.stage = Stage::Approved {
                token_expires_ms: u64::MAX,
            };
        }
        let fut = addr.send(ClaimsFor {
            approvers: complete.approvers,
            now_ms: now,
            nonce: random_bytes(),
        });
        Box::pin(fut.into_actor(self).map(move |res, act, _| {
            let claims = res.ok().flatten();
            if let Some(e) = act.runs.get_mut(&run_id)
                && matches!(e.record.stage, Stage::Approved { .. })
            {
                match (&claims, before) {
                    (Some(c), _) => {
                        e.record.stage = Stage::Approved {
                            token_expires_ms: c.expires_at_ms,
                        }
                    }
                    (None, Some(b)) => e.record.stage = b,
                    (None, None) => {}
                }
            }
            let claims = claims.ok_or_else(|| {
                ctl_error(
                    CtlErrorCode::InvalidRequest,
                    "the run is no longer waiting for a token",
                )
            })?;
            let token = act
                .setup
                .issuer
                .issue(&claims)
                .map_err(|e| ctl_error(CtlErrorCode::Internal, e.to_string()))?;
            Ok(ApproveResult::Issued(Approval {
                run_id: claims.run_id,
                operation_hash: claims.operation_hash.clone(),
                next_command: execute_command(claims.run_id, &token),
                token,
                expires_ms: claims.expires_at_ms,
            }))
        }))
    }
}

/// Present a token to a waiting run.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CtlError>")]
pub struct ExecuteRun {
    pub run_id: Uuid,
    pub token: String,
    pub watcher: Watcher,
}

impl Handler<ExecuteRun> for Coordinator {
    type Result = Result<(), CtlError>;

    fn handle(&mut self, msg: ExecuteRun, _: &mut Context<Self>) -> Self::Result {
        let entry =
            self.runs
                .get(&msg.run_id)
                .ok_or_else(|| match self.damaged.get(&msg.run_id) {
                    Some(Known::Missing) => ctl_error(
                        CtlErrorCode::RunMissing,
                        format!("run {}: {}", msg.run_id, AdmitRefused::Missing),
                    ),
                    Some(_) => ctl_error(
                        CtlErrorCode::RunUnreadable,
                        format!("run {}: {}", msg.run_id, AdmitRefused::Unreadable),
                    ),
                    None => ctl_error(CtlErrorCode::UnknownRun, format!("no run {}", msg.run_id)),
                })?;
        match &entry.addr {
            Some(addr) => {
                addr.do_send(PresentToken {
                    token: msg.token,
                    consumed: self.nonces.consumed().clone(),
                    watcher: msg.watcher,
                });
                Ok(())
            }
            None => {
                // The run is over. A token for it can only be a replay (or garbage): say which,
                // by the same verification every token goes through.
                let last = entry.last.clone();
                let (reason, rule, detail) = crate::core::closed::judge(
                    &msg.token,
                    msg.run_id,
                    self.setup.clock.now_ms(),
                    &self.setup.public_key,
                    self.nonces.consumed(),
                    &self.setup.config.authorization,
                );
                match last {
                    Some(mut report) => {
                        report.outcome = Outcome::PolicyBlocked {
                            reason,
                            rule: rule.to_string(),
                        };
                        report.reason = reason;
                        report.rule = Some(rule.to_string());
                        report.detail = detail;
                        report.hosts.clear();
                        let _ = msg.watcher.send(RunUpdate::Answer(report));
                        Ok(())
                    }
                    None => Err(ctl_error(
                        CtlErrorCode::InvalidRequest,
                        format!("run {} is finished", msg.run_id),
                    )),
                }
            }
        }
    }
}

/// Cancel an open run on an operator's word.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CtlError>")]
pub struct CancelRun {
    pub run_id: Uuid,
    pub by: String,
    pub watcher: Watcher,
}

impl Handler<CancelRun> for Coordinator {
    type Result = Result<(), CtlError>;

    fn handle(&mut self, msg: CancelRun, _: &mut Context<Self>) -> Self::Result {
        match self
            .runs
            .get(&msg.run_id)
            .map(|e| (&e.addr, e.record.stage))
        {
            Some((Some(addr), _)) => {
                addr.do_send(CancelNow {
                    reason: format!("cancelled by {}", msg.by),
                    watcher: msg.watcher,
                });
                Ok(())
            }
            Some((None, stage)) => Err(ctl_error(
                CtlErrorCode::InvalidRequest,
                format!(
                    "run {} is not running ({}); there is nothing to cancel",
                    msg.run_id,
                    stage.as_str()
                ),
            )),
            None => Err(ctl_error(
                CtlErrorCode::UnknownRun,
                format!("no run {}", msg.run_id),
            )),
        }
    }
}

#[derive(Debug, Message)]
#[rtype(result = "Result<PlanView, CtlError>")]
pub struct PlanShow {
    pub run_id: Uuid,
}

impl Handler<PlanShow> for Coordinator {
    type Result = ResponseActFuture<Self, Result<PlanView, CtlError>>;

    fn handle(&mut self, msg: PlanShow, _: &mut Context<Self>) -> Self::Result {
        let addr = self.runs.get(&msg.run_id).and_then(|e| e.addr.clone());
        let Some(addr) = addr else {
            let e = ctl_error(
                CtlErrorCode::UnknownRun,
                format!("run {} has no live plan", msg.run_id),
            );
            return Box::pin(actix::fut::ready(Err(e)));
        };
        let run_id = msg.run_id;
        Box::pin(addr.send(GetPlan).into_actor(self).map(move |res, _, _| {
            res.ok().flatten().ok_or_else(|| {
                ctl_error(
                    CtlErrorCode::UnknownRun,
                    format!("run {run_id} has no sealed plan yet"),
                )
            })
        }))
    }
}

#[derive(Debug, Message)]
#[rtype(result = "Vec<HostStatus>")]
pub struct Status;

impl Handler<Status> for Coordinator {
    type Result = MessageResult<Status>;

    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.setup
                .inventory
                .hosts()
                .iter()
                .map(|h| {
                    let v = self.fleet.get(&h.name).cloned().unwrap_or_default();
                    HostStatus {
                        host: h.name.clone(),
                        role: h.role.clone(),
                        safety_class: h.safety_class.as_str().to_string(),
                        transport: h.transport.kind().to_string(),
                        lifecycle: v
                            .lifecycle
                            .map(|s| format!("{s:?}"))
                            .unwrap_or_else(|| "Unknown".into()),
                        fingerprint: v.fingerprint,
                        last_probe_ms: v.last_probe_ms,
                        detail: v.detail,
                    }
                })
                .collect(),
        )
    }
}

#[derive(Debug, Message)]
#[rtype(result = "Vec<RunListEntry>")]
pub struct RunsList;

impl Handler<RunsList> for Coordinator {
    type Result = MessageResult<RunsList>;

    fn handle(&mut self, _: RunsList, _: &mut Context<Self>) -> Self::Result {
        let mut runs: Vec<RunListEntry> = self
            .runs
            .iter()
            .map(|(id, e)| RunListEntry {
                run_id: *id,
                action: e.record.action,
                effective_mode: e
                    .last
                    .as_ref()
                    .map(|r| r.effective_mode)
                    .unwrap_or(e.requested_mode),
                requestor: e.record.requestor.clone(),
                state: e.state(),
                started_ms: e.started_ms,
            })
            .collect();
        runs.sort_by_key(|r| r.started_ms);
        MessageResult(runs)
    }
}

impl Handler<RunNotice> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: RunNotice, _: &mut Context<Self>) {
        match msg {
            RunNotice::HostProbed {
                host,
                fingerprint,
                at_ms,
                detail,
            } => {
                let v = self.fleet.entry(host).or_default();
                v.last_probe_ms = Some(at_ms);
                v.fingerprint = fingerprint;
                v.detail = detail;
            }
            RunNotice::HostStates { states } => {
                for (h, s) in states {
                    self.fleet.entry(h).or_default().lifecycle = Some(s);
                }
            }
            RunNotice::Awaiting { run_id, report } => {
                let now = self.setup.clock.now_ms();
                if let Some(e) = self.runs.get_mut(&run_id) {
                    e.last = Some(report);
                    if let Err(err) = e.advance(LedgerEvent::ConfirmationRequested, now) {
                        tracing::error!(run = %run_id, %err, "ledger refused confirmation_requested");
                    }
                }
            }
            RunNotice::TokenAccepted { run_id } => {
                let now = self.setup.clock.now_ms();
                if let Some(e) = self.runs.get_mut(&run_id)
                    && let Err(err) = e.advance(LedgerEvent::TokenAccepted, now)
                {
                    tracing::error!(run = %run_id, %err, "ledger refused token_accepted");
                }
            }
            RunNotice::Closed { run_id, report } => {
                let now = self.setup.clock.now_ms();
                if let Some(e) = self.runs.get_mut(&run_id) {
                    e.addr = None;
                    let outcome = report.outcome.kind();
                    e.last = Some(report);
                    if let Err(err) = e.advance(LedgerEvent::Finished { outcome }, now) {
                        // A run the table cannot place is closed: never reused.
                        tracing::error!(run = %run_id, %err, "ledger refused run_finished; closing the run");
                        e.record.stage = Stage::Closed;
                    }
                }
                self.leases.release(run_id);
                self.approvals.remove(&run_id);
            }
        }
    }
}

impl Handler<ConsumeNonce> for Coordinator {
    type Result = Result<(), String>;

    fn handle(&mut self, msg: ConsumeNonce, _: &mut Context<Self>) -> Self::Result {
        self.nonces
            .consume(&msg.nonce)
            .map_err(|e| format!("{}: {e}", self.nonces.path().display()))
    }
}
