//! The run machine: one run as a pure state machine (sans-IO).
//!
//! The runtime feeds [`Input`]s with the current time to [`RunMachine::step`] and performs
//! the returned [`Effect`]s in order (journaling each [`Effect::Record`] before the effects
//! after it). It never decides anything: every safety rule is enforced here.
//!
//! ```text
//! Created --Start--> Preflight --all Probed--> admission (policy R001..R010)
//!   Block / NothingToDo / Escalate ---------------------------------> Finished
//!   ConfirmationRequired --> AwaitingToken --valid TokenPresented--> Executing
//!   Allow (quick, or full de-escalated) -----------------------------> Executing
//! Executing, per phase in order:
//!   destructive phase: Barrier (re-probe every host of the phase; containment, fresh matching
//!   fingerprints, token re-verified now, policy re-evaluated) --Allow--> Steps | --Block--> Finished
//!   Steps: hosts in parallel (at most `max_parallel_hosts`), each host its steps in order:
//!   [Check] -> Dispatch -> StepAnswered -> next | retry after backoff | query idempotency
//!   a phase with a failed or uncertain host ends the run (containment)
//! ```
//!
//! Guarantees (each checked by `tests/core_model.rs` over random runs):
//! * a destructive step is dispatched only in a phase whose barrier, computed after every host
//!   of the phase answered a re-probe issued by that barrier, allowed it with a verified token;
//! * a host that is `Unknown` or whose data is missing never gets a step;
//! * a step whose outcome was lost is queried by its key; it is re-sent (same key, once) only
//!   after the host answered `NotFound`; otherwise the host goes `Unknown`;
//! * every decision (allow, block, escalate, await, retry, skip, query, fail, complete) is a
//!   [`Effect::Record`] with its rule, before the effect it decides.

pub mod answers;
mod backoff;
mod exec;
mod io;

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::Mode;
use tollgate_protocol::outcome::ReasonCode;

pub use answers::{check_answer, idempotency_answer, step_result};
pub use backoff::backoff_ms;
pub use io::{
    CheckAnswer, CheckRequest, Dispatch, Effect, IdempotencyAnswer, Input, ProbePurpose,
    ProbeRequest, StepResult,
};

use self::exec::{Execution, Next};
use super::commands::approve_command;
use super::facts::{HostFacts, ProbeFailure, ProbeOutcome};
use super::lifecycle::{HostState, LifecycleEvent, transition};
use super::outcome::{HostResult, RunResult, TypedOutcome};
use super::plan::{Draft, Intent, Plan, PlanError};
use super::policy::{
    self, Decision, HostInput, PolicyConfig, PolicyDecision, PolicyInput, Ruling,
    Stage as PolicyStage, TokenEvidence, policy_hash,
};
use super::rules::{self, RuleId};
use super::timeline::{EventKind, TimelineEvent, Verdict};
use super::token::{self, Claims, TokenScope, VerifyContext};
use crate::config::{
    Authorization, CoordinatorConfig, Inventory, Operations, ProbeScript, RetryPolicy,
};

/// The knobs a run needs, taken from `coordinator.toml` and the token key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// Policy configuration (token classes, freshness window).
    pub policy: PolicyConfig,
    /// Retry backoff.
    pub retry: RetryPolicy,
    /// Hosts working at once within a phase (at least 1).
    pub max_parallel_hosts: usize,
    /// Time limit per probe.
    pub probe_timeout_ms: u64,
    /// Authorization table (approver roles are checked against it).
    pub authorization: Authorization,
    /// The coordinator's Ed25519 public key (tokens are verified with it).
    pub token_public_key: Vec<u8>,
    /// Seed for retry jitter.
    pub jitter_seed: u64,
}

impl RunSettings {
    /// Settings from the coordinator configuration.
    pub fn from_config(
        config: &CoordinatorConfig,
        token_public_key: Vec<u8>,
        jitter_seed: u64,
    ) -> Self {
        RunSettings {
            policy: PolicyConfig::from_config(config),
            retry: config.retry,
            max_parallel_hosts: config.concurrency.per_phase as usize,
            probe_timeout_ms: config.probe.timeout_ms,
            authorization: config.authorization.clone(),
            token_public_key,
            jitter_seed,
        }
    }
}

/// Everything a run is made from.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// What was asked.
    pub intent: Intent,
    /// Who asked (certificate identity).
    pub requestor: String,
    /// The inventory at submission.
    pub inventory: Inventory,
    /// The operations at submission.
    pub operations: Operations,
    /// Settings.
    pub settings: RunSettings,
}

/// An input the machine cannot take now. Nothing changed and no effect was produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The run already finished.
    #[error("run is finished; {input} ignored")]
    Finished {
        /// The input.
        input: &'static str,
    },
    /// The input does not belong to the current stage.
    #[error("{input} is not expected while {stage}")]
    Unexpected {
        /// The stage.
        stage: &'static str,
        /// The input.
        input: &'static str,
    },
    /// The input answers something that is not awaited (unknown host, stale key...).
    #[error("{input} not awaited: {detail}")]
    NotAwaited {
        /// The input.
        input: &'static str,
        /// What did not match.
        detail: String,
    },
}

/// Collects effects for one `step` call.
#[derive(Debug)]
pub(crate) struct Out {
    now: u64,
    effects: Vec<Effect>,
}

impl Out {
    fn event(&self, kind: EventKind) -> TimelineEvent {
        TimelineEvent::new(self.now, kind)
    }

    fn record(&mut self, event: TimelineEvent) {
        self.effects.push(Effect::Record(event));
    }

    fn push(&mut self, effect: Effect) {
        self.effects.push(effect);
    }
}

/// How a host ended, decided along the way.
#[derive(Debug, Clone)]
pub(crate) struct HostEnd {
    outcome: TypedOutcome,
    reason: ReasonCode,
    detail: String,
}

/// How the run ends.
#[derive(Debug, Clone)]
pub(crate) struct RunEnd {
    outcome: TypedOutcome,
    reason: ReasonCode,
    rule: RuleId,
    verdict: Verdict,
    detail: String,
}

/// The run's data that outlives stages.
#[derive(Debug)]
pub(crate) struct Ctx {
    intent: Intent,
    requestor: String,
    settings: RunSettings,
    probes: BTreeMap<String, ProbeScript>,
    draft: Draft,
    states: BTreeMap<String, HostState>,
    facts: BTreeMap<String, HostFacts>,
    probe_failures: BTreeMap<String, ProbeFailure>,
    ends: BTreeMap<String, HostEnd>,
    effective_mode: Mode,
}

#[derive(Debug)]
enum Stage {
    Created,
    Preflight { pending: BTreeSet<String> },
    AwaitingToken { plan: Box<Plan> },
    Executing(Box<Execution>),
    Finished,
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Created => "created",
            Stage::Preflight { .. } => "probing",
            Stage::AwaitingToken { .. } => "awaiting a token",
            Stage::Executing(_) => "executing",
            Stage::Finished => "finished",
        }
    }
}

/// One run, driven by inputs, answering with effects.
#[derive(Debug)]
pub struct RunMachine {
    ctx: Ctx,
    stage: Stage,
}

impl RunMachine {
    /// A run that has not started. Fails only if a `run_file` script was never read.
    pub fn new(spec: RunSpec) -> Result<Self, PlanError> {
        let draft = Draft::new(&spec.intent, &spec.inventory, &spec.operations)?;
        let states = draft
            .hosts()
            .iter()
            .map(|h| (h.name.clone(), HostState::Unknown))
            .collect();
        Ok(RunMachine {
            ctx: Ctx {
                effective_mode: spec.intent.requested_mode,
                intent: spec.intent,
                requestor: spec.requestor,
                settings: spec.settings,
                probes: spec.operations.probes().clone(),
                draft,
                states,
                facts: BTreeMap::new(),
                probe_failures: BTreeMap::new(),
                ends: BTreeMap::new(),
            },
            stage: Stage::Created,
        })
    }

    /// Feeds one input at `now_ms`; returns the effects to perform, in order.
    pub fn step(&mut self, now_ms: u64, input: Input) -> Result<Vec<Effect>, RunError> {
        let mut out = Out {
            now: now_ms,
            effects: Vec::new(),
        };
        let ctx = &mut self.ctx;
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);
        let result = match (stage, input) {
            (Stage::Finished, input) => Err((
                Stage::Finished,
                RunError::Finished {
                    input: input.name(),
                },
            )),
            (Stage::Executing(mut exec), input) => match exec.handle(ctx, &mut out, input) {
                Ok(Next::Stay) => Ok(Stage::Executing(exec)),
                Ok(Next::Finished) => Ok(Stage::Finished),
                Err(e) => Err((Stage::Executing(exec), e)),
            },
            (stage, Input::Tick) => Ok(stage),
            (Stage::Created, Input::Start) => Ok(ctx.start(&mut out)),
            (Stage::Preflight { pending }, Input::Probed { host, outcome }) => {
                ctx.on_probed(&mut out, pending, host, outcome)
            }
            (
                Stage::AwaitingToken { plan },
                Input::TokenPresented {
                    token,
                    consumed_nonces,
                },
            ) => Ok(ctx.on_token(&mut out, plan, &token, &consumed_nonces)),
            (
                Stage::Created | Stage::Preflight { .. } | Stage::AwaitingToken { .. },
                Input::Cancel { reason },
            ) => Ok(ctx.cancel_before_execution(&mut out, &reason)),
            (
                stage @ (Stage::Created | Stage::Preflight { .. } | Stage::AwaitingToken { .. }),
                Input::InventoryChanged { hosts },
            ) => Ok(ctx.inventory_changed_before_execution(&mut out, stage, &hosts)),
            (stage, input) => {
                let e = RunError::Unexpected {
                    stage: stage.name(),
                    input: input.name(),
                };
                Err((stage, e))
            }
        };
        match result {
            Ok(stage) => {
                self.stage = stage;
                Ok(out.effects)
            }
            Err((stage, e)) => {
                self.stage = stage;
                Err(e)
            }
        }
    }

    /// Whether the run is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Finished)
    }

    /// The current stage's name (for status).
    pub fn stage_name(&self) -> &'static str {
        self.stage.name()
    }

    /// Lifecycle state of every target host.
    pub fn host_states(&self) -> &BTreeMap<String, HostState> {
        &self.ctx.states
    }

    /// The sealed plan, once there is one and while the run is not finished.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.stage {
            Stage::AwaitingToken { plan } => Some(plan),
            Stage::Executing(exec) => Some(exec.plan()),
            _ => None,
        }
    }

    /// While waiting for a token: the claims to sign for `approvers` (sorted, distinct, as
    /// collected by [`crate::approval`]) issued at `now_ms` with `nonce`.
    pub fn token_claims(
        &self,
        approvers: Vec<String>,
        now_ms: u64,
        nonce: [u8; 16],
    ) -> Option<Claims> {
        let Stage::AwaitingToken { plan } = &self.stage else {
            return None;
        };
        Some(Claims {
            run_id: plan.run_id(),
            hosts: plan.host_names(),
            operation_hash: plan.operation_hash().to_owned(),
            action: plan.action(),
            approvers,
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(plan.token_lifetime_ms()),
            nonce,
        })
    }
}

/// The timeline event that records a token issued for `claims` (who approved, when it
/// expires, its nonce), journaled before the token leaves the coordinator.
pub fn token_issued_event(claims: &Claims) -> TimelineEvent {
    TimelineEvent::new(claims.issued_at_ms, EventKind::TokenIssued)
        .decided(Verdict::Allow, super::rules::R011_SEPARATION_OF_DUTIES)
        .input("approvers", claims.approvers.join(","))
        .input("operation_hash", &claims.operation_hash)
        .input("expires_at_ms", claims.expires_at_ms)
        .input("nonce", claims.nonce_hex())
}

fn verdict_of(ruling: &Ruling) -> Verdict {
    match ruling.decision {
        Decision::Allow => Verdict::Allow,
        Decision::NothingToDo => Verdict::Skip,
        Decision::ConfirmationRequired => Verdict::AwaitConfirmation,
        Decision::Escalate { .. } => Verdict::Escalate,
        Decision::Block { .. } => Verdict::Block,
    }
}

fn outcome_of(ruling: &Ruling) -> TypedOutcome {
    match &ruling.decision {
        Decision::Escalate { next_command } => TypedOutcome::EscalationRequired {
            rule: ruling.rule,
            next_command: next_command.clone(),
        },
        Decision::NothingToDo | Decision::Allow | Decision::ConfirmationRequired => {
            TypedOutcome::Completed
        }
        Decision::Block { reason } => TypedOutcome::PolicyBlocked {
            reason: *reason,
            rule: ruling.rule,
        },
    }
}

/// The scope a token for `plan` must match.
fn scope_of<'a>(plan: &'a Plan, hosts: &'a [String]) -> TokenScope<'a> {
    TokenScope {
        run_id: plan.run_id(),
        hosts,
        operation_hash: plan.operation_hash(),
        action: plan.action(),
        approvals_required: plan.approvals_required(),
        max_lifetime_ms: plan.token_lifetime_ms(),
    }
}

impl Ctx {
    /// Applies a lifecycle event; an illegal one sends the host to `Unknown` (fail closed).
    /// Returns whether the table allowed it.
    fn apply(&mut self, out: &mut Out, host: &str, event: LifecycleEvent) -> bool {
        let from = self.state(host);
        let (to, error) = match transition(from, event) {
            Ok(to) => (to, None),
            Err(e) => (HostState::Unknown, Some(e)),
        };
        self.states.insert(host.to_owned(), to);
        if to != from || error.is_some() {
            let mut ev = out
                .event(EventKind::HostStateChanged)
                .host(host)
                .input("from", from.as_str())
                .input("to", to.as_str())
                .input("event", event.as_str());
            if let Some(e) = &error {
                ev = ev.input("error", e);
            }
            out.record(ev);
        }
        error.is_none()
    }

    fn state(&self, host: &str) -> HostState {
        self.states.get(host).copied().unwrap_or(HostState::Unknown)
    }

    fn start(&mut self, out: &mut Out) -> Stage {
        let targets = if self.intent.targets.is_empty() {
            "(all)".to_owned()
        } else {
            self.intent.targets.join(",")
        };
        out.record(
            out.event(EventKind::RunStarted)
                .input("run_id", self.intent.run_id)
                .input("action", self.intent.action)
                .input("requested_mode", self.intent.requested_mode)
                .input("targets", targets)
                .input("requestor", &self.requestor)
                .input("shadow", self.intent.shadow),
        );
        if !self.draft.unknown_targets().is_empty() {
            return self.admission(out);
        }
        let requests: Vec<ProbeRequest> = self
            .draft
            .hosts()
            .iter()
            .map(|h| ProbeRequest {
                host: h.name.clone(),
                script: self.probes.get(&h.role).cloned(),
            })
            .collect();
        let pending: BTreeSet<String> = requests.iter().map(|r| r.host.clone()).collect();
        out.record(
            out.event(EventKind::ProbeRequested)
                .input("purpose", "preflight")
                .input("hosts", join(pending.iter())),
        );
        out.push(Effect::Probe {
            purpose: ProbePurpose::Preflight,
            requests,
            timeout_ms: self.settings.probe_timeout_ms,
        });
        Stage::Preflight { pending }
    }

    fn on_probed(
        &mut self,
        out: &mut Out,
        mut pending: BTreeSet<String>,
        host: String,
        outcome: ProbeOutcome,
    ) -> Result<Stage, (Stage, RunError)> {
        if !pending.remove(&host) {
            return Err((
                Stage::Preflight { pending },
                RunError::NotAwaited {
                    input: "Probed",
                    detail: format!("no preflight probe of {host:?} is pending"),
                },
            ));
        }
        out.record(probe_event(out, &host, &outcome, "preflight"));
        match outcome.failure() {
            None => {
                if let ProbeOutcome::Reported(facts) = outcome {
                    self.facts.insert(host.clone(), facts);
                }
                self.apply(out, &host, LifecycleEvent::ProbeSucceeded);
            }
            Some(failure) => {
                out.record(
                    out.event(EventKind::HostFailed)
                        .host(&host)
                        .decided(Verdict::Fail, rules::E001_PREFLIGHT_PROBE_FAILED)
                        .reason(failure.reason())
                        .input("probe", failure.describe()),
                );
                self.apply(out, &host, failure.lifecycle_event());
                self.ends.insert(
                    host.clone(),
                    HostEnd {
                        outcome: failure.outcome(),
                        reason: failure.reason(),
                        detail: format!("preflight probe failed: {}", failure.describe()),
                    },
                );
                self.probe_failures.insert(host, failure);
            }
        }
        if pending.is_empty() {
            Ok(self.admission(out))
        } else {
            Ok(Stage::Preflight { pending })
        }
    }

    fn host_inputs(&self) -> Vec<HostInput<'_>> {
        self.draft
            .hosts()
            .iter()
            .map(|h| {
                let (steps, destructive_steps) = self.draft.step_counts(&h.name);
                HostInput {
                    name: &h.name,
                    safety_class: h.safety_class,
                    state: self.state(&h.name),
                    facts: self.facts.get(&h.name),
                    steps,
                    destructive_steps,
                }
            })
            .collect()
    }

    fn evaluate(&self, token: TokenEvidence<'_>) -> PolicyDecision {
        let hosts = self.host_inputs();
        policy::evaluate(&PolicyInput {
            stage: PolicyStage::Admission,
            run_id: self.intent.run_id,
            action: self.intent.action,
            requested_mode: self.intent.requested_mode,
            shadow: self.intent.shadow,
            unknown_targets: self.draft.unknown_targets(),
            hosts: &hosts,
            token,
            config: &self.settings.policy,
        })
    }

    fn record_decision(&self, out: &mut Out, decision: &PolicyDecision, stage: &str) {
        let destructive: usize = self
            .draft
            .hosts()
            .iter()
            .map(|h| self.draft.step_counts(&h.name).1)
            .sum();
        let mut ev = out
            .event(EventKind::PolicyEvaluated)
            .decided(verdict_of(&decision.run), decision.run.rule)
            .input("stage", stage)
            .input("requested_mode", self.intent.requested_mode)
            .input("effective_mode", decision.effective_mode)
            .input("destructive_steps", destructive)
            .input("approvals_required", decision.approvals_required)
            .input("detail", &decision.run.detail);
        for h in self.draft.hosts() {
            let fp = self
                .facts
                .get(&h.name)
                .map_or("none".to_owned(), |f| f.fingerprint.clone());
            ev = ev.input(
                &format!("host.{}", h.name),
                format!(
                    "{} {} fingerprint={fp}",
                    self.state(&h.name),
                    h.safety_class
                ),
            );
        }
        if let Some(r) = decision.run.reason() {
            ev = ev.reason(r);
        }
        out.record(ev);
        for (host, ruling) in &decision.hosts {
            let mut ev = out
                .event(EventKind::PolicyEvaluated)
                .host(host)
                .decided(verdict_of(ruling), ruling.rule)
                .input("stage", stage)
                .input("detail", &ruling.detail);
            if let Some(r) = ruling.reason() {
                ev = ev.reason(r);
            }
            out.record(ev);
        }
    }

    fn admission(&mut self, out: &mut Out) -> Stage {
        let decision = self.evaluate(TokenEvidence::NotPresented);
        self.effective_mode = decision.effective_mode;
        self.record_decision(out, &decision, "admission");
        let run = decision.run.clone();
        match &run.decision {
            Decision::Block { reason } => {
                if let Some((host, failure)) = self.probe_failures.iter().next() {
                    let detail = format!("not run: {host} failed its preflight probe");
                    for h in self.draft.hosts() {
                        self.ends.entry(h.name.clone()).or_insert_with(|| HostEnd {
                            outcome: TypedOutcome::PolicyBlocked {
                                reason: *reason,
                                rule: run.rule,
                            },
                            reason: *reason,
                            detail: detail.clone(),
                        });
                    }
                    let end = RunEnd {
                        outcome: failure.outcome(),
                        reason: failure.reason(),
                        rule: run.rule,
                        verdict: Verdict::Block,
                        detail: format!("preflight failed on {host}: {}", failure.describe()),
                    };
                    return self.finish(out, end, &decision.hosts);
                }
                let end = RunEnd {
                    outcome: TypedOutcome::PolicyBlocked {
                        reason: *reason,
                        rule: run.rule,
                    },
                    reason: *reason,
                    rule: run.rule,
                    verdict: Verdict::Block,
                    detail: run.detail.clone(),
                };
                self.finish(out, end, &decision.hosts)
            }
            Decision::NothingToDo => {
                let end = RunEnd {
                    outcome: TypedOutcome::Completed,
                    reason: ReasonCode::NothingToDo,
                    rule: run.rule,
                    verdict: Verdict::Complete,
                    detail: run.detail.clone(),
                };
                self.finish(out, end, &decision.hosts)
            }
            Decision::Escalate { .. } => {
                let end = RunEnd {
                    outcome: outcome_of(&run),
                    reason: ReasonCode::QuickModeNonDestructive,
                    rule: run.rule,
                    verdict: Verdict::Escalate,
                    detail: run.detail.clone(),
                };
                self.finish(out, end, &decision.hosts)
            }
            Decision::ConfirmationRequired | Decision::Allow => {
                let plan = match self.seal(out, &decision) {
                    Ok(plan) => plan,
                    Err(stage) => return stage,
                };
                if run.decision == Decision::Allow {
                    self.start_execution(out, plan, None)
                } else {
                    out.record(
                        out.event(EventKind::ConfirmationRequested)
                            .input("operation_hash", plan.operation_hash())
                            .input("approvals_required", plan.approvals_required())
                            .input("token_lifetime_ms", plan.token_lifetime_ms()),
                    );
                    out.push(Effect::AwaitConfirmation {
                        plan: plan.view(),
                        operation_hash: plan.operation_hash().to_owned(),
                        approvals_required: plan.approvals_required(),
                        token_lifetime_ms: plan.token_lifetime_ms(),
                        approve_command: approve_command(plan.run_id(), plan.operation_hash()),
                    });
                    Stage::AwaitingToken {
                        plan: Box::new(plan),
                    }
                }
            }
        }
    }

    /// Seals the plan; on failure the run is finished (fail closed) and the stage returned.
    fn seal(&mut self, out: &mut Out, decision: &PolicyDecision) -> Result<Plan, Stage> {
        let hash = policy_hash(&self.settings.policy);
        match self
            .draft
            .seal(decision.effective_mode, &self.facts, decision, &hash)
        {
            Ok(plan) => {
                for h in plan.host_names() {
                    self.apply(out, &h, LifecycleEvent::PolicyAdmitted);
                }
                out.record(
                    out.event(EventKind::PlanSealed)
                        .input("operation_hash", plan.operation_hash())
                        .input("policy_hash", plan.policy_hash())
                        .input("effective_mode", plan.effective_mode())
                        .input("phases", plan.phases().len())
                        .input("destructive", plan.is_destructive()),
                );
                Ok(plan)
            }
            Err(e) => {
                let (reason, rule) = match e {
                    PlanError::DestructiveInQuick { .. } => (
                        ReasonCode::QuickModeNonDestructive,
                        rules::R004_QUICK_NEVER_DESTROYS,
                    ),
                    PlanError::UnknownHost { .. } => {
                        (ReasonCode::UnknownHost, rules::R001_TARGETS_IN_INVENTORY)
                    }
                    _ => (
                        ReasonCode::HostUnknown,
                        rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS,
                    ),
                };
                let end = RunEnd {
                    outcome: TypedOutcome::PolicyBlocked { reason, rule },
                    reason,
                    rule,
                    verdict: Verdict::Block,
                    detail: e.to_string(),
                };
                Err(self.finish(out, end, &decision.hosts))
            }
        }
    }

    fn on_token(
        &mut self,
        out: &mut Out,
        plan: Box<Plan>,
        text: &str,
        consumed: &BTreeSet<String>,
    ) -> Stage {
        let hosts = plan.host_names();
        let verdict = token::verify(
            Some(text),
            &scope_of(&plan, &hosts),
            &VerifyContext {
                now_ms: out.now,
                public_key: &self.settings.token_public_key,
                consumed,
                authorization: &self.settings.authorization,
            },
        );
        let evidence = match &verdict {
            Ok(t) => TokenEvidence::Verified(t),
            Err(r) => TokenEvidence::Rejected(r),
        };
        let decision = self.evaluate(evidence);
        let mut ev = out
            .event(EventKind::TokenJudged)
            .decided(verdict_of(&decision.run), decision.run.rule)
            .input("operation_hash", plan.operation_hash())
            .input("detail", &decision.run.detail);
        if let Ok(t) = &verdict {
            ev = ev
                .input("nonce", t.claims.nonce_hex())
                .input("approvers", t.claims.approvers.join(","))
                .input("expires_at_ms", t.claims.expires_at_ms);
        }
        if let Some(r) = decision.run.reason() {
            ev = ev.reason(r);
        }
        out.record(ev);
        match verdict {
            Ok(t) if decision.run.allows() => {
                out.push(Effect::ConsumeToken {
                    nonce: t.claims.nonce_hex(),
                });
                self.start_execution(out, *plan, Some(t))
            }
            _ => {
                out.push(Effect::TokenRejected {
                    reason: decision.run.reason().unwrap_or(ReasonCode::NotAuthorized),
                    rule: decision.run.rule,
                    detail: decision.run.detail,
                });
                Stage::AwaitingToken { plan }
            }
        }
    }

    fn start_execution(
        &mut self,
        out: &mut Out,
        plan: Plan,
        token: Option<token::VerifiedToken>,
    ) -> Stage {
        for h in plan.host_names() {
            self.apply(out, &h, LifecycleEvent::ExecutionStarted);
        }
        let mut exec = Box::new(Execution::new(plan, token));
        match exec.enter_phase(self, out, 0) {
            Next::Stay => Stage::Executing(exec),
            Next::Finished => Stage::Finished,
        }
    }

    fn cancel_before_execution(&mut self, out: &mut Out, reason: &str) -> Stage {
        let decision = self.evaluate(TokenEvidence::NotPresented);
        let end = RunEnd {
            outcome: TypedOutcome::PolicyBlocked {
                reason: ReasonCode::Cancelled,
                rule: rules::E011_CANCELLED,
            },
            reason: ReasonCode::Cancelled,
            rule: rules::E011_CANCELLED,
            verdict: Verdict::Block,
            detail: format!("cancelled before execution: {reason}"),
        };
        self.finish(out, end, &decision.hosts)
    }

    fn inventory_changed_before_execution(
        &mut self,
        out: &mut Out,
        stage: Stage,
        hosts: &[String],
    ) -> Stage {
        let affected: Vec<&String> = hosts
            .iter()
            .filter(|h| self.states.contains_key(h.as_str()))
            .collect();
        if affected.is_empty() {
            return stage;
        }
        for h in &affected {
            self.apply(out, h, LifecycleEvent::InventoryChanged);
        }
        let names = affected
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let (reason, rule) = (
            ReasonCode::HostUnknown,
            rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS,
        );
        let end = RunEnd {
            outcome: TypedOutcome::PolicyBlocked { reason, rule },
            reason,
            rule,
            verdict: Verdict::Block,
            detail: format!("the inventory entry of {names} changed; submit the intent again"),
        };
        self.finish(out, end, &[])
    }

    /// Ends the run: records the decision and emits the result. Hosts without an end of their
    /// own get their policy ruling if it did not allow, else the run's outcome.
    fn finish(&mut self, out: &mut Out, end: RunEnd, rulings: &[(String, Ruling)]) -> Stage {
        let host_rulings: BTreeMap<&str, &Ruling> =
            rulings.iter().map(|(h, r)| (h.as_str(), r)).collect();
        let run_end = HostEnd {
            outcome: end.outcome.clone(),
            reason: end.reason,
            detail: end.detail.clone(),
        };
        let mut names: BTreeSet<String> =
            self.draft.hosts().iter().map(|h| h.name.clone()).collect();
        names.extend(self.draft.unknown_targets().iter().cloned());
        let hosts = names
            .into_iter()
            .map(|name| {
                let host_end =
                    self.ends.get(&name).cloned().unwrap_or_else(|| {
                        match host_rulings.get(name.as_str()) {
                            Some(r)
                                if !r.allows()
                                    && !matches!(
                                        r.decision,
                                        Decision::ConfirmationRequired | Decision::NothingToDo
                                    ) =>
                            {
                                HostEnd {
                                    outcome: outcome_of(r),
                                    reason: r.reason().unwrap_or(end.reason),
                                    detail: r.detail.clone(),
                                }
                            }
                            _ => run_end.clone(),
                        }
                    });
                let mut facts = BTreeMap::new();
                if let Some(f) = self.facts.get(&name) {
                    facts.insert("fingerprint".to_owned(), f.fingerprint.clone());
                    facts.insert("probed_at_ms".to_owned(), f.probed_at_ms.to_string());
                }
                if let Some(p) = self.probe_failures.get(&name) {
                    facts.insert("probe".to_owned(), p.describe());
                }
                HostResult {
                    lifecycle: self.state(&name),
                    host: name,
                    reason: host_end.reason,
                    outcome: host_end.outcome,
                    detail: host_end.detail,
                    facts,
                }
            })
            .collect();
        out.record(
            out.event(EventKind::RunFinished)
                .decided(end.verdict, end.rule)
                .reason(end.reason)
                .input("outcome", end.outcome.kind())
                .input("detail", &end.detail),
        );
        out.push(Effect::Finish(RunResult {
            run_id: self.intent.run_id,
            action: self.intent.action,
            requested_mode: self.intent.requested_mode,
            effective_mode: self.effective_mode,
            outcome: end.outcome,
            reason: end.reason,
            rule: Some(end.rule),
            detail: end.detail,
            hosts,
        }));
        Stage::Finished
    }
}

fn probe_event(out: &Out, host: &str, outcome: &ProbeOutcome, purpose: &str) -> TimelineEvent {
    let ev = out
        .event(EventKind::ProbeReported)
        .host(host)
        .input("purpose", purpose);
    match outcome {
        ProbeOutcome::Reported(f) => ev
            .input("fingerprint", &f.fingerprint)
            .input("probed_at_ms", f.probed_at_ms),
        ProbeOutcome::Failed(e) => ev.reason(e.reason()).input("failure", e.describe()),
    }
}

fn join<'a>(items: impl Iterator<Item = &'a String>) -> String {
    items.map(String::as_str).collect::<Vec<_>>().join(",")
}
