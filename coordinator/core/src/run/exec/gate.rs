//! The barrier stage of a destructive phase: collect re-probes, then decide once.

use std::collections::BTreeSet;

use tollgate_protocol::Action;

use super::{Execution, Next, Part};
use crate::barrier::{BarrierDecision, BarrierInput, evaluate_barrier};
use crate::facts::ProbeOutcome;
use crate::lifecycle::{HostState, LifecycleEvent};
use crate::policy::TokenEvidence;
use crate::run::admission::scope_of;
use crate::run::{Ctx, Out, RunEnd, RunError, probe_event};
use crate::timeline::{EventKind, Verdict};
use crate::token::{self, VerifyContext};

impl Execution {
    pub(super) fn on_reprobed(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        phase: usize,
        host: String,
        outcome: ProbeOutcome,
    ) -> Result<Next, RunError> {
        let Part::Barrier {
            pending, answers, ..
        } = &mut self.part
        else {
            return Err(RunError::NotAwaited {
                input: "Reprobed",
                detail: "no barrier is in progress".into(),
            });
        };
        if phase != self.phase || !pending.remove(&host) {
            return Err(RunError::NotAwaited {
                input: "Reprobed",
                detail: format!("no re-probe of {host:?} is pending for phase {phase}"),
            });
        }
        let name = self
            .plan
            .phases()
            .get(phase)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        out.record(probe_event(out, &host, &outcome, "barrier").phase(&name));
        answers.insert(host, outcome);
        if !pending.is_empty() {
            return Ok(Next::Stay);
        }
        Ok(self.decide_barrier(ctx, out))
    }

    pub(super) fn decide_barrier(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        let Part::Barrier {
            started_ms,
            answers,
            ..
        } = &self.part
        else {
            return Next::Stay;
        };
        let started_ms = *started_ms;
        let answers = answers.clone();
        let hosts = self.plan.host_names();
        let no_nonces = BTreeSet::new();
        // The token is verified again now: this run consumed its nonce when it was presented,
        // so the replay check is against nothing; everything else is checked afresh.
        let checked = self.token.as_ref().map(|t| {
            token::verify(
                Some(&t.text),
                &scope_of(&self.plan, &hosts),
                &VerifyContext {
                    now_ms: out.now,
                    public_key: &ctx.settings.token_public_key,
                    consumed: &no_nonces,
                    authorization: &ctx.settings.authorization,
                },
            )
        });
        let evidence = match &checked {
            None => TokenEvidence::NotPresented,
            Some(Ok(t)) => TokenEvidence::Verified(t),
            Some(Err(r)) => TokenEvidence::Rejected(r),
        };
        let decision = evaluate_barrier(&BarrierInput {
            plan: &self.plan,
            phase: self.phase,
            previous: &self.results,
            reprobes: &answers,
            states: &ctx.states,
            barrier_started_ms: started_ms,
            now_ms: out.now,
            requested_mode: ctx.intent.requested_mode,
            token: evidence,
            config: &ctx.settings.policy,
        });
        let phase_name = self.phase_name();
        let phase_hosts: Vec<String> = self
            .plan
            .phase_hosts(self.phase)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut ev = out
            .event(EventKind::BarrierEvaluated)
            .phase(&phase_name)
            .input("phase_index", self.phase)
            .input("barrier_started_ms", started_ms)
            .input("freshness_ms", ctx.settings.policy.freshness_ms)
            .input(
                "token",
                match &checked {
                    None => "none".to_owned(),
                    Some(Ok(t)) => format!("verified nonce={}", t.claims.nonce_hex()),
                    Some(Err(r)) => format!("rejected: {r}"),
                },
            );
        for h in &phase_hosts {
            let planned = self.plan.fingerprint(h).unwrap_or("");
            let seen = match answers.get(h) {
                Some(ProbeOutcome::Reported(f)) => format!(
                    "fingerprint={} planned={planned} probed_at_ms={}",
                    f.fingerprint, f.probed_at_ms
                ),
                Some(ProbeOutcome::Failed(e)) => format!("failed: {}", e.describe()),
                None => "no answer".to_owned(),
            };
            ev = ev.input(&format!("host.{h}"), seen);
        }
        let ev = match &decision {
            BarrierDecision::Allow { ruling } => ev
                .decided(Verdict::Allow, ruling.rule)
                .input("detail", &ruling.detail),
            BarrierDecision::Block {
                reason,
                rule,
                detail,
                ..
            } => ev
                .decided(Verdict::Block, rule)
                .reason(*reason)
                .input("detail", detail),
        };
        out.record(ev);
        // Lifecycle: what each re-probe means for its host.
        for h in &phase_hosts {
            let event = reprobe_event(
                answers.get(h),
                self.plan.fingerprint(h),
                started_ms,
                out.now,
                ctx.settings.policy.freshness_ms,
            );
            ctx.apply(out, h, event);
            if let Some(ProbeOutcome::Reported(f)) = answers.get(h)
                && event == LifecycleEvent::ProbeSucceeded
            {
                ctx.facts.insert(h.clone(), f.clone());
            }
        }
        match decision {
            BarrierDecision::Allow { .. } => {
                if ctx.intent.action == Action::Teardown {
                    for h in &phase_hosts {
                        if ctx.state(h) == HostState::Running {
                            ctx.apply(out, h, LifecycleEvent::TokenVerifiedForTeardown);
                        }
                    }
                }
                self.barrier_passed = Some(self.phase);
                self.start_steps(ctx, out)
            }
            BarrierDecision::Block {
                reason,
                rule,
                detail,
                ..
            } => {
                self.barrier_passed = None;
                let end = RunEnd::blocked(
                    reason,
                    rule,
                    format!("barrier before phase {phase_name} blocked: {detail}"),
                );
                self.stop_with(ctx, out, end)
            }
        }
    }
}

fn reprobe_event(
    answer: Option<&ProbeOutcome>,
    planned: Option<&str>,
    started_ms: u64,
    now_ms: u64,
    freshness_ms: u64,
) -> LifecycleEvent {
    match answer {
        None => LifecycleEvent::ProbeTimedOut,
        Some(ProbeOutcome::Failed(f)) => f.lifecycle_event(),
        Some(ProbeOutcome::Reported(f)) => {
            if !f.has_valid_fingerprint() {
                LifecycleEvent::FactsMalformed
            } else if Some(f.fingerprint.as_str()) != planned {
                LifecycleEvent::FingerprintDrift
            } else if f.probed_at_ms < started_ms
                || f.probed_at_ms > now_ms
                || now_ms - f.probed_at_ms > freshness_ms
            {
                LifecycleEvent::ProbeTimedOut
            } else {
                LifecycleEvent::ProbeSucceeded
            }
        }
    }
}
