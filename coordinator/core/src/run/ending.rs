//! How a run leaves the stages before execution, and how every run ends.

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::outcome::ReasonCode;

use crate::lifecycle::LifecycleEvent;
use crate::outcome::{HostResult, RunResult};
use crate::plan::Plan;
use crate::policy::{Decision, Ruling, TokenEvidence};
use crate::rules::{self};
use crate::timeline::EventKind;
use crate::token::{self};

use super::exec::{Execution, Next};
use super::{Ctx, Effect, HostEnd, Out, RunEnd, Stage};

use super::admission::outcome_of;

impl Ctx {
    pub(super) fn start_execution(
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

    pub(super) fn cancel_before_execution(&mut self, out: &mut Out, reason: &str) -> Stage {
        let decision = self.evaluate(TokenEvidence::NotPresented);
        let end = RunEnd::blocked(
            ReasonCode::Cancelled,
            rules::E011_CANCELLED,
            format!("cancelled before execution: {reason}"),
        );
        self.finish(out, end, &decision.hosts)
    }

    pub(super) fn inventory_changed_before_execution(
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
        let end = RunEnd::blocked(
            reason,
            rule,
            format!("the inventory entry of {names} changed; submit the intent again"),
        );
        self.finish(out, end, &[])
    }

    /// Ends the run: records the decision and emits the result. Hosts without an end of their
    /// own get their policy ruling if it did not allow, else the run's outcome.
    pub(super) fn finish(
        &mut self,
        out: &mut Out,
        end: RunEnd,
        rulings: &[(String, Ruling)],
    ) -> Stage {
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
