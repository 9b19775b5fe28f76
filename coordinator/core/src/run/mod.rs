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

mod admission;
pub mod answers;
mod backoff;
mod ending;
mod exec;
mod io;
mod preflight;
pub mod replies;
mod settings;

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::Mode;
use tollgate_protocol::outcome::ReasonCode;

pub use admission::token_issued_event;
pub use answers::{check_answer, idempotency_answer, step_result};
pub use backoff::backoff_ms;
pub use io::{
    CheckAnswer, CheckRequest, Dispatch, Effect, IdempotencyAnswer, Input, ProbePurpose,
    ProbeRequest, StepResult,
};
pub use settings::{RunSettings, RunSpec};

use self::exec::{Execution, Next};
use super::facts::{HostFacts, ProbeFailure, ProbeOutcome};
use super::lifecycle::{HostState, LifecycleEvent, transition};
use super::outcome::TypedOutcome;
use super::plan::{Draft, Intent, Plan, PlanError};
use super::rules::{self, RuleId};
use super::timeline::{EventKind, TimelineEvent, Verdict};
use super::token::Claims;
use crate::config::ProbeScript;

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

impl RunEnd {
    /// The run ends blocked by `rule` for `reason`.
    fn blocked(reason: ReasonCode, rule: RuleId, detail: String) -> Self {
        RunEnd {
            outcome: TypedOutcome::PolicyBlocked { reason, rule },
            reason,
            rule,
            verdict: Verdict::Block,
            detail,
        }
    }
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
