//! Created and Preflight: the run starts, every target host is probed, and the facts are kept.

use std::collections::BTreeSet;

use crate::facts::ProbeOutcome;
use crate::lifecycle::LifecycleEvent;
use crate::policy::HostInput;
use crate::rules::{self};
use crate::timeline::{EventKind, Verdict};

use super::{
    Ctx, Effect, HostEnd, Out, ProbePurpose, ProbeRequest, RunError, Stage, join, probe_event,
};

impl Ctx {
    pub(super) fn start(&mut self, out: &mut Out) -> Stage {
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

    pub(super) fn on_probed(
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

    pub(super) fn host_inputs(&self) -> Vec<HostInput<'_>> {
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
}
