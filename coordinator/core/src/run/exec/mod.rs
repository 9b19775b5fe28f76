//! The executing stage: barriers, then steps on hosts in parallel, one phase at a time.

mod gate;
mod steps;

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::outcome::ReasonCode;

use super::io::{Effect, Input, ProbePurpose, ProbeRequest};
use super::{Ctx, HostEnd, Out, RunEnd, RunError, join};
use crate::barrier::HostPhaseResult;
use crate::facts::ProbeOutcome;
use crate::lifecycle::{HostState, LifecycleEvent};
use crate::outcome::TypedOutcome;
use crate::plan::Plan;
use crate::rules::{self, RuleId};
use crate::timeline::{EventKind, Verdict};
use crate::token::VerifiedToken;

/// Re-queries of a key whose step is still running before the host is given up as Unknown.
const MAX_QUERIES: u32 = 5;

/// Whether the run goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    Stay,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Waiting for a concurrency slot.
    Queued,
    /// The current step's check is out.
    Checking,
    /// The current step is out.
    InFlight {
        attempt: u32,
        key: String,
        resent: bool,
    },
    /// Waiting to send `attempt` after backoff.
    RetryWait { attempt: u32, due_ms: u64 },
    /// A query of `key` is out.
    Querying {
        attempt: u32,
        key: String,
        resent: bool,
        queries: u32,
    },
    /// Waiting to query `key` again.
    QueryWait {
        attempt: u32,
        key: String,
        resent: bool,
        queries: u32,
        due_ms: u64,
    },
    /// Finished the phase.
    Done(HostPhaseResult),
}

#[derive(Debug, Clone)]
struct Task {
    /// Indices of the phase's steps this host runs, in order.
    steps: Vec<usize>,
    cursor: usize,
    status: Status,
}

#[derive(Debug)]
enum Part {
    Barrier {
        started_ms: u64,
        pending: BTreeSet<String>,
        answers: BTreeMap<String, ProbeOutcome>,
    },
    Steps {
        tasks: BTreeMap<String, Task>,
    },
}

/// The executing stage.
#[derive(Debug)]
pub(super) struct Execution {
    plan: Plan,
    token: Option<VerifiedToken>,
    phase: usize,
    part: Part,
    results: Vec<BTreeMap<String, HostPhaseResult>>,
    /// The phase whose barrier allowed destructive steps.
    barrier_passed: Option<usize>,
    cancelled: bool,
}

impl Execution {
    pub(super) fn new(plan: Plan, token: Option<VerifiedToken>) -> Self {
        Execution {
            plan,
            token,
            phase: 0,
            part: Part::Steps {
                tasks: BTreeMap::new(),
            },
            results: Vec::new(),
            barrier_passed: None,
            cancelled: false,
        }
    }

    pub(super) fn plan(&self) -> &Plan {
        &self.plan
    }

    fn phase_name(&self) -> String {
        self.plan
            .phases()
            .get(self.phase)
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    pub(super) fn handle(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        input: Input,
    ) -> Result<Next, RunError> {
        match input {
            Input::Reprobed {
                phase,
                host,
                outcome,
            } => self.on_reprobed(ctx, out, phase, host, outcome),
            Input::CheckAnswered {
                host,
                step_id,
                answer,
            } => self.on_check(ctx, out, &host, &step_id, answer),
            Input::StepAnswered {
                host,
                step_id,
                idempotency_key,
                result,
            } => self.on_step(ctx, out, &host, &step_id, &idempotency_key, result),
            Input::IdempotencyAnswered {
                host,
                step_id,
                idempotency_key,
                answer,
            } => self.on_query(ctx, out, &host, &step_id, &idempotency_key, answer),
            Input::Tick => Ok(self.on_tick(ctx, out)),
            Input::InventoryChanged { hosts } => Ok(self.on_inventory_changed(ctx, out, &hosts)),
            Input::Cancel { reason } => Ok(self.on_cancel(ctx, out, &reason)),
            other @ (Input::Start | Input::Probed { .. } | Input::TokenPresented { .. }) => {
                Err(RunError::Unexpected {
                    stage: "executing",
                    input: other.name(),
                })
            }
        }
    }

    /// Starts phase `index` (its barrier first, if destructive), or completes the run.
    pub(super) fn enter_phase(&mut self, ctx: &mut Ctx, out: &mut Out, index: usize) -> Next {
        self.phase = index;
        let Some(phase) = self.plan.phases().get(index) else {
            return self.complete(ctx, out);
        };
        if !phase.barrier_before {
            return self.start_steps(ctx, out);
        }
        let hosts: BTreeSet<String> = self
            .plan
            .phase_hosts(index)
            .into_iter()
            .map(str::to_owned)
            .collect();
        out.record(
            out.event(EventKind::BarrierStarted)
                .phase(&phase.name)
                .input("phase_index", index)
                .input("hosts", join(hosts.iter())),
        );
        out.record(
            out.event(EventKind::ProbeRequested)
                .phase(&phase.name)
                .input("purpose", "barrier")
                .input("phase_index", index)
                .input("hosts", join(hosts.iter())),
        );
        let requests = hosts
            .iter()
            .map(|h| ProbeRequest {
                host: h.clone(),
                script: self
                    .plan
                    .host(h)
                    .and_then(|p| ctx.probes.get(&p.host.role))
                    .cloned(),
            })
            .collect();
        out.push(Effect::Probe {
            purpose: ProbePurpose::Barrier { phase: index },
            requests,
            timeout_ms: ctx.settings.probe_timeout_ms,
        });
        self.part = Part::Barrier {
            started_ms: out.now,
            pending: hosts,
            answers: BTreeMap::new(),
        };
        Next::Stay
    }

    fn on_cancel(&mut self, ctx: &mut Ctx, out: &mut Out, reason: &str) -> Next {
        out.record(
            out.event(EventKind::CancelRequested)
                .decided(Verdict::Block, rules::E011_CANCELLED)
                .reason(ReasonCode::Cancelled)
                .input("cancel_requested", reason)
                .input("in_flight_steps_finish_first", true),
        );
        self.cancelled = true;
        if matches!(self.part, Part::Barrier { .. }) {
            let end = RunEnd::blocked(
                ReasonCode::Cancelled,
                rules::E011_CANCELLED,
                format!("cancelled: {reason}"),
            );
            return self.stop_with(ctx, out, end);
        }
        let waiting: Vec<String> = self
            .tasks()
            .map(|t| {
                t.iter()
                    .filter(|(_, t)| matches!(t.status, Status::Queued | Status::RetryWait { .. }))
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default();
        for host in waiting {
            self.give_up_cancelled(ctx, &host);
        }
        self.settle(ctx, out)
    }

    fn on_inventory_changed(&mut self, ctx: &mut Ctx, out: &mut Out, hosts: &[String]) -> Next {
        let planned = self.plan.host_names();
        for host in hosts.iter().filter(|h| planned.contains(h)) {
            ctx.apply(out, host, LifecycleEvent::InventoryChanged);
            let status = self.task(host).map(|t| t.status.clone());
            match status {
                // Nothing is out: give the host up now.
                Some(Status::Queued | Status::RetryWait { .. }) => {
                    let detail = "its inventory entry changed".to_owned();
                    let f = Failure::blocked(
                        ReasonCode::HostUnknown,
                        rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS,
                        detail,
                    );
                    self.fail(ctx, out, host, f);
                }
                // A step's outcome was still being established: it stays unknown.
                Some(Status::QueryWait { .. }) => {
                    if let Some(step) = self.current_step(host) {
                        self.uncertain(ctx, out, host, &step.id);
                    }
                }
                // Something is out: its answer is recorded, and the host then stops (it is
                // Unknown, so `advance` and `dispatch` refuse it). Not in this phase, or in a
                // barrier: the barrier's policy sees it Unknown and blocks.
                _ => {}
            }
        }
        self.settle(ctx, out)
    }

    fn give_up_cancelled(&mut self, ctx: &mut Ctx, host: &str) {
        ctx.ends.insert(
            host.to_owned(),
            HostEnd {
                outcome: TypedOutcome::PolicyBlocked {
                    reason: ReasonCode::Cancelled,
                    rule: rules::E011_CANCELLED,
                },
                reason: ReasonCode::Cancelled,
                detail: "cancelled before its next step".into(),
            },
        );
        if let Some(t) = self.task(host) {
            t.status = Status::Done(HostPhaseResult::NotRun);
        }
    }

    fn fail(&mut self, ctx: &mut Ctx, out: &mut Out, host: &str, f: Failure) {
        let mut ev = out
            .event(EventKind::HostFailed)
            .host(host)
            .phase(&self.phase_name())
            .decided(Verdict::Fail, f.rule)
            .reason(f.reason)
            .input("phase_index", self.phase)
            .input("detail", &f.detail);
        if let TypedOutcome::ExecutionFailed {
            step_id, exit_code, ..
        } = &f.outcome
        {
            ev = ev.step(step_id);
            if let Some(code) = exit_code {
                ev = ev.input("exit_code", code);
            }
        }
        out.record(ev);
        if let Some(event) = f.event {
            ctx.apply(out, host, event);
        }
        ctx.ends.insert(
            host.to_owned(),
            HostEnd {
                outcome: f.outcome,
                reason: f.reason,
                detail: f.detail,
            },
        );
        if let Some(t) = self.task(host) {
            t.status = Status::Done(f.result);
        }
    }

    fn end_phase(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        let Some(tasks) = self.tasks() else {
            return Next::Stay;
        };
        let results: BTreeMap<String, HostPhaseResult> = tasks
            .iter()
            .map(|(h, t)| {
                let r = match t.status {
                    Status::Done(r) => r,
                    _ => HostPhaseResult::NotRun,
                };
                (h.clone(), r)
            })
            .collect();
        let ok: Vec<&String> = results
            .iter()
            .filter(|(_, r)| **r == HostPhaseResult::Succeeded)
            .map(|(h, _)| h)
            .collect();
        let not_ok: Vec<&String> = results
            .iter()
            .filter(|(_, r)| **r != HostPhaseResult::Succeeded)
            .map(|(h, _)| h)
            .collect();
        for h in &ok {
            ctx.apply(out, h, LifecycleEvent::PhaseCompleted);
        }
        out.record(
            out.event(EventKind::PhaseCompleted)
                .phase(&self.phase_name())
                .input("phase_index", self.phase)
                .input("succeeded", join(ok.iter().copied()))
                .input("not_succeeded", join(not_ok.iter().copied())),
        );
        let stop = !not_ok.is_empty() || self.cancelled;
        self.results.push(results);
        if stop {
            self.stop(ctx, out)
        } else {
            self.enter_phase(ctx, out, self.phase + 1)
        }
    }

    /// Ends the run after a phase with failures (containment) or a cancel.
    fn stop(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        let (reason, rule) = if self.cancelled {
            (ReasonCode::Cancelled, rules::E011_CANCELLED)
        } else {
            (
                ReasonCode::ContainmentFailed,
                rules::E009_CONTAINMENT_STOPS_RUN,
            )
        };
        let failed: Vec<String> = self
            .plan
            .host_names()
            .into_iter()
            .filter(|h| {
                matches!(
                    ctx.ends.get(h).map(|e| &e.outcome),
                    Some(TypedOutcome::ExecutionFailed { .. })
                )
            })
            .collect();
        // Hosts with steps in a later phase, gathered once (not once per host).
        let later: BTreeSet<&str> = (self.phase + 1..self.plan.phases().len())
            .flat_map(|p| self.plan.phase_hosts(p))
            .collect();
        let succeeded: Vec<String> = self
            .plan
            .host_names()
            .into_iter()
            .filter(|h| !ctx.ends.contains_key(h) && !later.contains(h.as_str()))
            .collect();
        for h in &succeeded {
            ctx.ends.insert(
                h.clone(),
                HostEnd {
                    outcome: TypedOutcome::Completed,
                    reason: ReasonCode::AllStepsSucceeded,
                    detail: "all of its steps succeeded".into(),
                },
            );
        }
        for h in self.plan.host_names() {
            ctx.ends.entry(h).or_insert_with(|| HostEnd {
                outcome: TypedOutcome::PolicyBlocked { reason, rule },
                reason,
                detail: if self.cancelled {
                    "cancelled before all of its steps ran".into()
                } else {
                    "stopped: another host failed, so later phases did not run".into()
                },
            });
        }
        let end = if !failed.is_empty() && !succeeded.is_empty() {
            RunEnd {
                outcome: TypedOutcome::PartialSuccess {
                    succeeded: succeeded.clone(),
                    failed: failed.clone(),
                },
                reason: ReasonCode::SomeHostsFailed,
                rule,
                verdict: Verdict::Fail,
                detail: format!("failed on {}; later phases did not run", failed.join(", ")),
            }
        } else if let Some(first) = failed.first().and_then(|h| ctx.ends.get(h)) {
            RunEnd {
                outcome: first.outcome.clone(),
                reason: first.reason,
                rule,
                verdict: Verdict::Fail,
                detail: format!("failed on {}; later phases did not run", failed.join(", ")),
            }
        } else {
            RunEnd::blocked(reason, rule, "stopped before every phase ran".into())
        };
        self.stop_with(ctx, out, end)
    }

    /// Ends the run with `end`; hosts without an end of their own share the run's.
    fn stop_with(&mut self, ctx: &mut Ctx, out: &mut Out, end: RunEnd) -> Next {
        for h in self.plan.host_names() {
            if ctx.state(&h) == HostState::Running {
                ctx.apply(out, &h, LifecycleEvent::RunFinished);
            }
        }
        ctx.finish(out, end, &[]);
        Next::Finished
    }

    fn complete(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        for h in self.plan.host_names() {
            match ctx.state(&h) {
                HostState::Running => {
                    ctx.apply(out, &h, LifecycleEvent::RunFinished);
                }
                HostState::TeardownPending => {
                    ctx.apply(out, &h, LifecycleEvent::TeardownFinished);
                }
                _ => {}
            }
            ctx.ends.insert(
                h,
                HostEnd {
                    outcome: TypedOutcome::Completed,
                    reason: ReasonCode::AllStepsSucceeded,
                    detail: "all of its steps succeeded".into(),
                },
            );
        }
        let end = RunEnd {
            outcome: TypedOutcome::Completed,
            reason: ReasonCode::AllStepsSucceeded,
            rule: rules::E010_RUN_COMPLETED,
            verdict: Verdict::Complete,
            detail: format!("{} phase(s) completed", self.plan.phases().len()),
        };
        ctx.finish(out, end, &[]);
        Next::Finished
    }
}

/// How a host gives up.
struct Failure {
    outcome: TypedOutcome,
    reason: ReasonCode,
    rule: RuleId,
    result: HostPhaseResult,
    event: Option<LifecycleEvent>,
    detail: String,
}

impl Failure {
    /// A host refused by a rule before anything ran.
    fn blocked(reason: ReasonCode, rule: RuleId, detail: String) -> Self {
        Failure {
            outcome: TypedOutcome::PolicyBlocked { reason, rule },
            reason,
            rule,
            result: HostPhaseResult::NotRun,
            event: None,
            detail,
        }
    }

    fn execution(
        step_id: &str,
        reason: ReasonCode,
        exit_code: Option<i32>,
        rule: RuleId,
        detail: &str,
    ) -> Self {
        Failure {
            outcome: TypedOutcome::ExecutionFailed {
                step_id: step_id.to_owned(),
                reason,
                exit_code,
            },
            reason,
            rule,
            result: HostPhaseResult::Failed,
            event: Some(LifecycleEvent::StepFailed),
            detail: detail.to_owned(),
        }
    }
}
