//! Admission: policy over the probed facts, the plan sealed, and the confirmation token checked.

use std::collections::BTreeSet;

use tollgate_protocol::outcome::ReasonCode;

use crate::commands::approve_command;
use crate::lifecycle::LifecycleEvent;
use crate::outcome::TypedOutcome;
use crate::plan::{Plan, PlanError};
use crate::policy::{
    self, Decision, PolicyDecision, PolicyInput, Ruling, Stage as PolicyStage, TokenEvidence,
    policy_hash,
};
use crate::rules::{self};
use crate::timeline::{EventKind, TimelineEvent, Verdict};
use crate::token::{self, Claims, TokenScope, VerifyContext};

use super::{Ctx, Effect, HostEnd, Out, RunEnd, Stage};

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

pub(super) fn verdict_of(ruling: &Ruling) -> Verdict {
    match ruling.decision {
        Decision::Allow => Verdict::Allow,
        Decision::NothingToDo => Verdict::Skip,
        Decision::ConfirmationRequired => Verdict::AwaitConfirmation,
        Decision::Escalate { .. } => Verdict::Escalate,
        Decision::Block { .. } => Verdict::Block,
    }
}

pub(super) fn outcome_of(ruling: &Ruling) -> TypedOutcome {
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
pub(super) fn scope_of<'a>(plan: &'a Plan, hosts: &'a [String]) -> TokenScope<'a> {
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
    pub(super) fn evaluate(&self, token: TokenEvidence<'_>) -> PolicyDecision {
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

    pub(super) fn record_decision(&self, out: &mut Out, decision: &PolicyDecision, stage: &str) {
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

    pub(super) fn admission(&mut self, out: &mut Out) -> Stage {
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
                let end = RunEnd::blocked(*reason, run.rule, run.detail.clone());
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
    pub(super) fn seal(&mut self, out: &mut Out, decision: &PolicyDecision) -> Result<Plan, Stage> {
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
                let end = RunEnd::blocked(reason, rule, e.to_string());
                Err(self.finish(out, end, &decision.hosts))
            }
        }
    }

    pub(super) fn on_token(
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
}
