//! Steps on hosts: checks, dispatches, answers, retries and idempotency queries.

use std::collections::{BTreeMap, HashSet};

use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Shell, StepErrors};

use super::{Execution, Failure, MAX_QUERIES, Next, Part, Status, Task};
use crate::barrier::HostPhaseResult;
use crate::lifecycle::{HostState, LifecycleEvent};
use crate::outcome::TypedOutcome;
use crate::plan::PlannedStep;
use crate::rules::{self, RuleId};
use crate::run::backoff::backoff_ms;
use crate::run::io::{CheckAnswer, CheckRequest, Dispatch, Effect, IdempotencyAnswer, StepResult};
use crate::run::{Ctx, Out, RunError};
use crate::timeline::{EventKind, Verdict};

/// The step a host is at: its planned step without the step's host list. Answers look it up
/// once each; cloning the whole list there made a run over N hosts cost O(N^2).
#[derive(Debug, Clone)]
pub(super) struct CurrentStep {
    pub id: String,
    pub shell: Shell,
    pub script: String,
    pub check: Option<String>,
    pub destructive: bool,
    pub timeout_ms: u64,
    pub retries: u32,
    pub errors: StepErrors,
}

impl CurrentStep {
    fn of(step: &PlannedStep) -> Self {
        CurrentStep {
            id: step.id.clone(),
            shell: step.shell,
            script: step.script.clone(),
            check: step.check.clone(),
            destructive: step.destructive,
            timeout_ms: step.timeout_ms,
            retries: step.retries,
            errors: step.errors,
        }
    }
}

impl Execution {
    pub(super) fn start_steps(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        let Some(phase) = self.plan.phases().get(self.phase) else {
            return self.complete(ctx, out);
        };
        let mut tasks = BTreeMap::new();
        // Each step's hosts as a set: a lookup per (host, step), not a scan of the step's hosts.
        let runs_on: Vec<HashSet<&str>> = phase
            .steps
            .iter()
            .map(|s| s.hosts.iter().map(String::as_str).collect())
            .collect();
        for host in self.plan.phase_hosts(self.phase) {
            let steps: Vec<usize> = runs_on
                .iter()
                .enumerate()
                .filter(|(_, hosts)| hosts.contains(host))
                .map(|(i, _)| i)
                .collect();
            tasks.insert(
                host.to_owned(),
                Task {
                    steps,
                    cursor: 0,
                    status: Status::Queued,
                },
            );
        }
        self.part = Part::Steps { tasks };
        self.settle(ctx, out)
    }

    pub(super) fn tasks(&mut self) -> Option<&mut BTreeMap<String, Task>> {
        match &mut self.part {
            Part::Steps { tasks } => Some(tasks),
            Part::Barrier { .. } => None,
        }
    }

    pub(super) fn task(&mut self, host: &str) -> Option<&mut Task> {
        self.tasks().and_then(|t| t.get_mut(host))
    }

    pub(super) fn current_step(&self, host: &str) -> Option<CurrentStep> {
        let Part::Steps { tasks } = &self.part else {
            return None;
        };
        let task = tasks.get(host)?;
        let index = *task.steps.get(task.cursor)?;
        self.plan
            .phases()
            .get(self.phase)?
            .steps
            .get(index)
            .map(CurrentStep::of)
    }

    /// Starts queued hosts while slots are free, then ends the phase if every host is done.
    pub(super) fn settle(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        let max = ctx.settings.max_parallel_hosts.max(1);
        loop {
            let Some(tasks) = self.tasks() else {
                return Next::Stay;
            };
            // One pass: hosts in progress, and the first one still queued.
            let mut active = 0usize;
            let mut next = None;
            for (host, task) in tasks {
                match task.status {
                    Status::Done(_) => {}
                    Status::Queued => {
                        if next.is_none() {
                            next = Some(host);
                        }
                    }
                    _ => active += 1,
                }
            }
            match next.cloned() {
                Some(host) if active < max => self.advance(ctx, out, &host),
                // Nothing queued and nothing in progress: every host is done.
                None if active == 0 => return self.end_phase(ctx, out),
                _ => return Next::Stay,
            }
        }
    }

    /// Moves `host` to its current step (check or dispatch), or marks it done.
    pub(super) fn advance(&mut self, ctx: &mut Ctx, out: &mut Out, host: &str) {
        if self.cancelled {
            self.give_up_cancelled(ctx, host);
            return;
        }
        if matches!(ctx.state(host), HostState::Unknown) {
            // Unknown allows nothing but a probe: not even a check.
            let detail = "host went Unknown; it gets no further step".to_owned();
            let f = Failure::blocked(
                ReasonCode::HostUnknown,
                rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS,
                detail,
            );
            self.fail(ctx, out, host, f);
            return;
        }
        let Some(step) = self.current_step(host) else {
            if let Some(t) = self.task(host) {
                t.status = Status::Done(HostPhaseResult::Succeeded);
            }
            return;
        };
        if let Some(check) = &step.check {
            out.record(
                out.event(EventKind::CheckRequested)
                    .host(host)
                    .phase(&self.phase_name())
                    .step(&step.id),
            );
            out.push(Effect::Check(CheckRequest {
                host: host.to_owned(),
                phase: self.phase,
                step_id: step.id.clone(),
                shell: step.shell,
                script: check.clone(),
                timeout_ms: step.timeout_ms,
                errors: step.errors,
            }));
            if let Some(t) = self.task(host) {
                t.status = Status::Checking;
            }
            return;
        }
        let key = self.plan.idempotency_key(host, &step.id, 1);
        self.dispatch(
            ctx,
            out,
            host,
            &step,
            1,
            key,
            false,
            rules::E002_DISPATCH_ADMITTED_STEP,
        );
    }

    /// Sends `step` to `host`, if every safety condition holds; otherwise fails the host.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dispatch(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        host: &str,
        step: &CurrentStep,
        attempt: u32,
        key: String,
        resent: bool,
        rule: RuleId,
    ) {
        let phase_name = self.phase_name();
        if step.destructive && (self.barrier_passed != Some(self.phase) || self.token.is_none()) {
            // Unreachable by construction (destructive phases start only through an allowing
            // barrier); kept so that no path can ever send a destructive step without one.
            let detail = format!("step {} is destructive and no barrier allowed it", step.id);
            let f = Failure::blocked(
                ReasonCode::TokenMissing,
                rules::R007_BARRIER_NEEDS_TOKEN,
                detail,
            );
            self.fail(ctx, out, host, f);
            return;
        }
        if !ctx.apply(out, host, LifecycleEvent::StepDispatched) {
            let detail = format!("host is not in a state that accepts step {}", step.id);
            let f = Failure::blocked(
                ReasonCode::HostUnknown,
                rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS,
                detail,
            );
            self.fail(ctx, out, host, f);
            return;
        }
        out.record(
            out.event(EventKind::StepDispatched)
                .host(host)
                .phase(&phase_name)
                .step(&step.id)
                .decided(Verdict::Allow, rule)
                .input("phase_index", self.phase)
                .input("idempotency_key", &key)
                .input("attempt", attempt)
                .input("destructive", step.destructive)
                .input(
                    "barrier",
                    if step.destructive {
                        format!("passed for phase {}", self.phase)
                    } else {
                        "not required".to_owned()
                    },
                ),
        );
        out.push(Effect::Dispatch(Dispatch {
            host: host.to_owned(),
            phase: self.phase,
            phase_name,
            step_id: step.id.clone(),
            shell: step.shell,
            script: step.script.clone(),
            timeout_ms: step.timeout_ms,
            idempotency_key: key.clone(),
            attempt,
            destructive: step.destructive,
            errors: step.errors,
        }));
        if let Some(t) = self.task(host) {
            t.status = Status::InFlight {
                attempt,
                key,
                resent,
            };
        }
    }

    pub(super) fn on_check(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        host: &str,
        step_id: &str,
        answer: CheckAnswer,
    ) -> Result<Next, RunError> {
        let step = self
            .current_step(host)
            .filter(|s| s.id == step_id)
            .filter(|_| {
                self.task(host)
                    .is_some_and(|t| t.status == Status::Checking)
            })
            .ok_or_else(|| RunError::NotAwaited {
                input: "CheckAnswered",
                detail: format!("no check of {step_id:?} on {host:?} is out"),
            })?;
        let phase_name = self.phase_name();
        let ev = out
            .event(EventKind::CheckReported)
            .host(host)
            .phase(&phase_name)
            .step(step_id);
        match answer {
            CheckAnswer::InDesiredState => {
                out.record(ev.input("answer", "in desired state"));
                out.record(
                    out.event(EventKind::StepSkipped)
                        .host(host)
                        .phase(&phase_name)
                        .step(step_id)
                        .decided(Verdict::Skip, rules::E003_CHECK_SAYS_DONE),
                );
                if let Some(t) = self.task(host) {
                    t.cursor += 1;
                }
                self.advance(ctx, out, host);
            }
            CheckAnswer::NotInDesiredState => {
                out.record(ev.input("answer", "not in desired state"));
                let key = self.plan.idempotency_key(host, &step.id, 1);
                self.dispatch(
                    ctx,
                    out,
                    host,
                    &step,
                    1,
                    key,
                    false,
                    rules::E002_DISPATCH_ADMITTED_STEP,
                );
            }
            CheckAnswer::Failed { reason } => {
                out.record(ev.reason(reason).input("answer", "failed"));
                self.fail(
                    ctx,
                    out,
                    host,
                    Failure::execution(
                        &step.id,
                        reason,
                        None,
                        rules::E012_CHECK_FAILED,
                        "the step's check failed",
                    ),
                );
            }
        }
        Ok(self.settle(ctx, out))
    }

    pub(super) fn on_step(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        host: &str,
        step_id: &str,
        key: &str,
        result: StepResult,
    ) -> Result<Next, RunError> {
        let awaited = self
            .current_step(host)
            .filter(|s| s.id == step_id)
            .and_then(|s| match self.task(host).map(|t| t.status.clone()) {
                Some(Status::InFlight {
                    attempt,
                    key: k,
                    resent,
                }) if k == key => Some((s, attempt, resent)),
                _ => None,
            });
        let Some((step, attempt, resent)) = awaited else {
            return Err(RunError::NotAwaited {
                input: "StepAnswered",
                detail: format!("{step_id:?} on {host:?} with key {key} is not in flight"),
            });
        };
        out.record(
            out.event(EventKind::StepReported)
                .host(host)
                .phase(&self.phase_name())
                .step(step_id)
                .input("idempotency_key", key)
                .input("result", describe(&result))
                .input("settled", !matches!(result, StepResult::OutcomeLost)),
        );
        self.on_result(
            ctx,
            out,
            host,
            &step,
            attempt,
            key.to_owned(),
            resent,
            result,
        );
        Ok(self.settle(ctx, out))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_result(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        host: &str,
        step: &CurrentStep,
        attempt: u32,
        key: String,
        resent: bool,
        result: StepResult,
    ) {
        match result {
            StepResult::Succeeded => {
                if let Some(t) = self.task(host) {
                    t.cursor += 1;
                }
                self.advance(ctx, out, host);
            }
            StepResult::Transient { reason } => {
                let max = (1 + step.retries)
                    .min(ctx.settings.retry.max_attempts)
                    .max(1);
                if attempt < max && !self.cancelled {
                    let delay = backoff_ms(
                        &ctx.settings.retry,
                        attempt,
                        ctx.settings.jitter_seed,
                        &format!("{host}/{}", step.id),
                    );
                    let due_ms = out.now.saturating_add(delay);
                    out.record(
                        out.event(EventKind::RetryScheduled)
                            .host(host)
                            .phase(&self.phase_name())
                            .step(&step.id)
                            .decided(Verdict::Retry, rules::E004_RETRY_TRANSIENT)
                            .reason(reason)
                            .input("attempt", attempt)
                            .input("next_attempt", attempt + 1)
                            .input("max_attempts", max)
                            .input("delay_ms", delay),
                    );
                    out.push(Effect::WakeAt { at_ms: due_ms });
                    if let Some(t) = self.task(host) {
                        t.status = Status::RetryWait {
                            attempt: attempt + 1,
                            due_ms,
                        };
                    }
                } else {
                    let detail = format!("transient failure on attempt {attempt} of {max}");
                    self.fail(
                        ctx,
                        out,
                        host,
                        Failure::execution(
                            &step.id,
                            reason,
                            None,
                            rules::E005_FAILURE_STOPS_HOST,
                            &detail,
                        ),
                    );
                }
            }
            StepResult::Permanent { reason, exit_code } => {
                self.fail(
                    ctx,
                    out,
                    host,
                    Failure::execution(
                        &step.id,
                        reason,
                        exit_code,
                        rules::E005_FAILURE_STOPS_HOST,
                        "permanent failure",
                    ),
                );
            }
            StepResult::OutcomeLost => {
                self.query(out, host, &step.id, attempt, key, resent, 1);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn query(
        &mut self,
        out: &mut Out,
        host: &str,
        step_id: &str,
        attempt: u32,
        key: String,
        resent: bool,
        queries: u32,
    ) {
        out.record(
            out.event(EventKind::OutcomeQueried)
                .host(host)
                .phase(&self.phase_name())
                .step(step_id)
                .decided(Verdict::Query, rules::E006_LOST_OUTCOME_QUERIES_KEY)
                .reason(ReasonCode::OutcomeUncertain)
                .input("idempotency_key", &key)
                .input("query", queries),
        );
        out.push(Effect::QueryIdempotency {
            host: host.to_owned(),
            step_id: step_id.to_owned(),
            idempotency_key: key.clone(),
        });
        if let Some(t) = self.task(host) {
            t.status = Status::Querying {
                attempt,
                key,
                resent,
                queries,
            };
        }
    }

    pub(super) fn on_query(
        &mut self,
        ctx: &mut Ctx,
        out: &mut Out,
        host: &str,
        step_id: &str,
        key: &str,
        answer: IdempotencyAnswer,
    ) -> Result<Next, RunError> {
        let awaited = self
            .current_step(host)
            .filter(|s| s.id == step_id)
            .and_then(|s| match self.task(host).map(|t| t.status.clone()) {
                Some(Status::Querying {
                    attempt,
                    key: k,
                    resent,
                    queries,
                }) if k == key => Some((s, attempt, resent, queries)),
                _ => None,
            });
        let Some((step, attempt, resent, queries)) = awaited else {
            return Err(RunError::NotAwaited {
                input: "IdempotencyAnswered",
                detail: format!("no query of {key} for {step_id:?} on {host:?} is out"),
            });
        };
        let phase_name = self.phase_name();
        out.record(
            out.event(EventKind::IdempotencyAnswered)
                .host(host)
                .phase(&phase_name)
                .step(step_id)
                .input("idempotency_key", key)
                .input("answer", describe_answer(&answer))
                .input(
                    "settled",
                    matches!(
                        answer,
                        IdempotencyAnswer::Finished(_) | IdempotencyAnswer::NotFound
                    ),
                ),
        );
        let key = key.to_owned();
        match answer {
            IdempotencyAnswer::Finished(StepResult::OutcomeLost)
            | IdempotencyAnswer::Uncertain
            | IdempotencyAnswer::QueryFailed => self.uncertain(ctx, out, host, &step.id),
            IdempotencyAnswer::Finished(result) => {
                if let Some(t) = self.task(host) {
                    t.status = Status::InFlight {
                        attempt,
                        key: key.clone(),
                        resent,
                    };
                }
                self.on_result(ctx, out, host, &step, attempt, key, resent, result);
            }
            IdempotencyAnswer::NotFound if !resent && !self.cancelled => {
                self.dispatch(
                    ctx,
                    out,
                    host,
                    &step,
                    attempt,
                    key,
                    true,
                    rules::E007_RESEND_AFTER_NOT_FOUND,
                );
            }
            IdempotencyAnswer::NotFound => self.uncertain(ctx, out, host, &step.id),
            IdempotencyAnswer::Running if queries < MAX_QUERIES => {
                let delay = backoff_ms(
                    &ctx.settings.retry,
                    queries,
                    ctx.settings.jitter_seed,
                    &format!("{host}/{}/query", step.id),
                );
                let due_ms = out.now.saturating_add(delay);
                out.record(
                    out.event(EventKind::OutcomeQueried)
                        .host(host)
                        .phase(&phase_name)
                        .step(step_id)
                        .decided(Verdict::Query, rules::E006_LOST_OUTCOME_QUERIES_KEY)
                        .input("idempotency_key", &key)
                        .input("still_running_ask_again_in_ms", delay),
                );
                out.push(Effect::WakeAt { at_ms: due_ms });
                if let Some(t) = self.task(host) {
                    t.status = Status::QueryWait {
                        attempt,
                        key,
                        resent,
                        queries,
                        due_ms,
                    };
                }
            }
            IdempotencyAnswer::Running => self.uncertain(ctx, out, host, &step.id),
        }
        Ok(self.settle(ctx, out))
    }

    pub(super) fn uncertain(&mut self, ctx: &mut Ctx, out: &mut Out, host: &str, step_id: &str) {
        self.fail(
            ctx,
            out,
            host,
            Failure {
                outcome: TypedOutcome::ExecutionFailed {
                    step_id: step_id.to_owned(),
                    reason: ReasonCode::OutcomeUncertain,
                    exit_code: None,
                },
                reason: ReasonCode::OutcomeUncertain,
                rule: rules::E008_UNCERTAIN_OUTCOME_UNKNOWN,
                result: HostPhaseResult::Uncertain,
                event: Some(LifecycleEvent::OutcomeUncertain),
                detail: format!("whether {step_id} ran could not be established"),
            },
        );
    }

    pub(super) fn on_tick(&mut self, ctx: &mut Ctx, out: &mut Out) -> Next {
        let now = out.now;
        let Some(tasks) = self.tasks() else {
            return Next::Stay;
        };
        let due: Vec<(String, Status)> = tasks
            .iter()
            .filter(|(_, t)| match t.status {
                Status::RetryWait { due_ms, .. } | Status::QueryWait { due_ms, .. } => {
                    due_ms <= now
                }
                _ => false,
            })
            .map(|(h, t)| (h.clone(), t.status.clone()))
            .collect();
        for (host, status) in due {
            let Some(step) = self.current_step(&host) else {
                continue;
            };
            match status {
                Status::RetryWait { attempt, .. } => {
                    if self.cancelled {
                        self.give_up_cancelled(ctx, &host);
                    } else {
                        let key = self.plan.idempotency_key(&host, &step.id, attempt);
                        self.dispatch(
                            ctx,
                            out,
                            &host,
                            &step,
                            attempt,
                            key,
                            false,
                            rules::E004_RETRY_TRANSIENT,
                        );
                    }
                }
                Status::QueryWait {
                    attempt,
                    key,
                    resent,
                    queries,
                    ..
                } => {
                    self.query(out, &host, &step.id, attempt, key, resent, queries + 1);
                }
                _ => {}
            }
        }
        self.settle(ctx, out)
    }
}

fn describe(result: &StepResult) -> String {
    match result {
        StepResult::Succeeded => "succeeded".into(),
        StepResult::Transient { reason } => format!("transient failure: {reason}"),
        StepResult::Permanent { reason, exit_code } => match exit_code {
            Some(c) => format!("permanent failure: {reason} (exit {c})"),
            None => format!("permanent failure: {reason}"),
        },
        StepResult::OutcomeLost => "outcome lost".into(),
    }
}

fn describe_answer(answer: &IdempotencyAnswer) -> String {
    match answer {
        IdempotencyAnswer::NotFound => "not found".into(),
        IdempotencyAnswer::Running => "running".into(),
        IdempotencyAnswer::Finished(r) => format!("finished: {}", describe(r)),
        IdempotencyAnswer::Uncertain => "uncertain".into(),
        IdempotencyAnswer::QueryFailed => "query failed".into(),
    }
}
