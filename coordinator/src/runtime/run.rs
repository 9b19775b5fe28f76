//! The `Run` actor: drives one [`RunMachine`]. It feeds inputs, journals every `Record` effect
//! (and waits until it is durable) before performing the effects after it, and streams progress
//! to whoever is watching. Every decision is the machine's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use ring::signature::Ed25519KeyPair;
use tokio::sync::mpsc;
use tollgate_protocol::ctl::{ProgressEvent, ProgressKind};
use tollgate_protocol::outcome::RunReport;
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

use crate::core::facts::{ProbeFailure, ProbeOutcome};
use crate::core::lifecycle::HostState;
use crate::core::run::replies::{self, Reply};
use crate::core::run::{
    CheckRequest, Dispatch, Effect, IdempotencyAnswer, Input, ProbePurpose, ProbeRequest,
    RunMachine, StepResult, check_answer,
};
use crate::core::timeline::{EventKind, TimelineEvent, Verdict};
use crate::journal::Line;
use crate::journal::summary;

use super::clock::Clock;
use super::host::{self, HostActor, StepOutput};
use super::recorder::{Append, Appended, Recorder, WriteSummary};

/// What a watcher of a run receives. `Answer` ends one CLI request.
#[derive(Debug, Clone)]
pub enum RunUpdate {
    Progress(ProgressEvent),
    Answer(RunReport),
}

pub type Watcher = mpsc::UnboundedSender<RunUpdate>;

/// What the run tells the coordinator.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum RunNotice {
    HostProbed {
        host: String,
        fingerprint: Option<String>,
        at_ms: u64,
        detail: String,
    },
    HostStates {
        states: BTreeMap<String, HostState>,
    },
    Awaiting {
        run_id: Uuid,
        report: RunReport,
    },
    /// The run accepted a token: destructive work may start.
    TokenAccepted {
        run_id: Uuid,
    },
    Closed {
        run_id: Uuid,
        report: RunReport,
    },
}

/// Persist a consumed token nonce; answered once durable.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), String>")]
pub struct ConsumeNonce {
    pub nonce: String,
}

/// Everything a run needs from the coordinator.
#[derive(Clone)]
pub struct RunDeps {
    pub hosts: BTreeMap<String, Addr<HostActor>>,
    pub recorder: Addr<Recorder>,
    pub notices: Recipient<RunNotice>,
    pub nonces: Recipient<ConsumeNonce>,
    pub clock: Clock,
    pub signer: Arc<Ed25519KeyPair>,
    pub runs_dir: PathBuf,
}

impl std::fmt::Debug for RunDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunDeps")
            .field("hosts", &self.hosts.keys())
            .field("runs_dir", &self.runs_dir)
            .finish()
    }
}

/// Who asked and how.
#[derive(Debug, Clone)]
pub struct RunMeta {
    pub run_id: Uuid,
    pub action: Action,
    pub requested_mode: Mode,
    pub requestor: String,
    pub shadow: bool,
}

pub struct RunActor {
    meta: RunMeta,
    machine: RunMachine,
    deps: RunDeps,
    queue: VecDeque<Effect>,
    busy: bool,
    watchers: Vec<Watcher>,
    decisions: Vec<Line>,
    done: u32,
    total: u32,
    started_ms: u64,
    check_seq: u64,
    /// Inputs that arrived since the machine last ran; fed together (group commit).
    pending: Vec<Input>,
    flush_scheduled: bool,
    /// Whether the coordinator has had the full host-state map once.
    states_sent: bool,
}

impl std::fmt::Debug for RunActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunActor")
            .field("run_id", &self.meta.run_id)
            .field("stage", &self.machine.stage_name())
            .finish()
    }
}

impl RunActor {
    pub fn new(meta: RunMeta, machine: RunMachine, deps: RunDeps, watcher: Watcher) -> Self {
        let started_ms = deps.clock.now_ms();
        RunActor {
            meta,
            machine,
            deps,
            queue: VecDeque::new(),
            busy: false,
            watchers: vec![watcher],
            decisions: Vec::new(),
            done: 0,
            total: 0,
            started_ms,
            check_seq: 0,
            pending: Vec::new(),
            flush_scheduled: false,
            states_sent: false,
        }
    }

    fn artifacts(&self) -> String {
        self.deps
            .runs_dir
            .join(self.meta.run_id.to_string())
            .display()
            .to_string()
    }

    /// Queues an input. Inputs that arrive while the actor is busy (an fsync in progress, other
    /// answers in the mailbox) are fed to the machine together by one `Flush`, so their records
    /// share one journal write.
    fn feed(&mut self, ctx: &mut Context<Self>, input: Input) {
        self.pending.push(input);
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(Flush);
        }
    }

    fn step_machine(&mut self, input: Input) {
        let now = self.deps.clock.now_ms();
        if let Input::Probed { host, outcome } | Input::Reprobed { host, outcome, .. } = &input {
            let (fingerprint, detail) = match outcome {
                ProbeOutcome::Reported(f) => (Some(f.fingerprint.clone()), "probed".to_string()),
                ProbeOutcome::Failed(e) => (None, e.describe()),
            };
            self.deps.notices.do_send(RunNotice::HostProbed {
                host: host.clone(),
                fingerprint,
                at_ms: now,
                detail,
            });
        }
        match self.machine.step(now, input) {
            Ok(effects) => self.queue.extend(effects),
            Err(e) => {
                tracing::warn!(run = %self.meta.run_id, error = %e, "input ignored by the run machine")
            }
        }
    }

    fn answer(&mut self, report: RunReport) {
        for w in self.watchers.drain(..) {
            let _ = w.send(RunUpdate::Answer(report.clone()));
        }
    }

    fn progress(
        &mut self,
        kind: ProgressKind,
        ev: &TimelineEvent,
        ok: Option<bool>,
        message: String,
    ) {
        let p = ProgressEvent {
            run_id: self.meta.run_id,
            kind,
            host: ev.host.clone(),
            phase: ev.phase.clone(),
            step: ev.step.clone(),
            ok,
            done: self.done,
            total: self.total,
            message,
        };
        self.watchers
            .retain(|w| w.send(RunUpdate::Progress(p.clone())).is_ok());
    }

    /// After a batch is durable: keep decisions, tell watchers and the coordinator.
    fn recorded(&mut self, events: &[TimelineEvent], appended: Appended) {
        if self.total == 0
            && let Some(plan) = self.machine.plan()
        {
            self.total = plan
                .phases()
                .iter()
                .map(|p| p.steps.iter().map(|s| s.hosts.len() as u32).sum::<u32>())
                .sum();
        }
        self.decisions
            .extend(appended.lines.into_iter().filter(|l| l.decision.is_some()));
        for ev in events {
            let rule = ev.rule.unwrap_or("");
            match ev.kind {
                EventKind::ProbeRequested => {
                    self.progress(ProgressKind::ProbeStarted, ev, None, "probing".into())
                }
                EventKind::ProbeReported => {
                    let ok =
                        ev.verdict != Some(Verdict::Fail) && ev.verdict != Some(Verdict::Block);
                    self.progress(
                        ProgressKind::ProbeFinished,
                        ev,
                        Some(ok),
                        ev.inputs.get("detail").cloned().unwrap_or_default(),
                    )
                }
                EventKind::BarrierStarted => self.progress(
                    ProgressKind::PhaseStarted,
                    ev,
                    None,
                    "barrier: re-probing".into(),
                ),
                EventKind::BarrierEvaluated => {
                    let ok = ev.verdict == Some(Verdict::Allow);
                    let kind = if ok {
                        ProgressKind::BarrierPassed
                    } else {
                        ProgressKind::BarrierBlocked
                    };
                    self.progress(kind, ev, Some(ok), rule.to_string())
                }
                EventKind::StepDispatched => {
                    self.progress(ProgressKind::StepStarted, ev, None, "running".into())
                }
                EventKind::StepReported => {
                    let ok =
                        ev.verdict == Some(Verdict::Complete) || ev.verdict == Some(Verdict::Allow);
                    if ok {
                        self.done += 1;
                    }
                    let msg = ev
                        .reason
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "done".into());
                    self.progress(ProgressKind::StepFinished, ev, Some(ok), msg)
                }
                EventKind::StepSkipped => {
                    self.done += 1;
                    self.progress(ProgressKind::StepSkipped, ev, Some(true), rule.to_string())
                }
                EventKind::HostFailed => self.progress(
                    ProgressKind::HostFinished,
                    ev,
                    Some(false),
                    rule.to_string(),
                ),
                _ => {}
            }
        }
        // The whole map once, then only the hosts whose state changed in this batch: sending
        // every host on every batch made a run of N hosts cost O(N^2) in the coordinator.
        let all = self.machine.host_states();
        let states = if self.states_sent {
            events
                .iter()
                .filter(|ev| ev.kind == EventKind::HostStateChanged)
                .filter_map(|ev| ev.host.as_ref())
                .filter_map(|h| all.get_key_value(h))
                .map(|(h, s)| (h.clone(), *s))
                .collect()
        } else {
            all.clone()
        };
        self.states_sent = true;
        if !states.is_empty() {
            self.deps.notices.do_send(RunNotice::HostStates { states });
        }
    }

    fn report(&self, reply: Reply) -> RunReport {
        RunReport {
            run_id: self.meta.run_id,
            action: self.meta.action,
            requested_mode: self.meta.requested_mode,
            effective_mode: self
                .machine
                .plan()
                .map(|p| p.effective_mode())
                .unwrap_or(self.meta.requested_mode),
            outcome: reply.outcome,
            reason: reply.reason,
            rule: reply.rule.map(str::to_owned),
            detail: reply.detail,
            hosts: Vec::new(),
            artifacts: self.artifacts(),
        }
    }

    /// The journal could not be written: nothing more may happen in this run.
    fn journal_failed(&mut self, ctx: &mut Context<Self>, error: String) {
        tracing::error!(run = %self.meta.run_id, %error, "journal write failed: stopping the run");
        let report = self.report(replies::journal_failed(&error));
        self.answer(report.clone());
        self.deps.notices.do_send(RunNotice::Closed {
            run_id: self.meta.run_id,
            report,
        });
        ctx.stop();
    }

    /// Performs queued effects in order until one must complete before the next (a journal
    /// write, a nonce write, the end of the run).
    fn drain(&mut self, ctx: &mut Context<Self>) {
        while !self.busy {
            let Some(effect) = self.queue.pop_front() else {
                return;
            };
            if self.meta.shadow
                && let Some(input) = replies::shadow_answer(&effect)
            {
                ctx.notify(Feed(input));
                continue;
            }
            match effect {
                Effect::Record(first) => return self.record(ctx, first),
                Effect::ConsumeToken { nonce } => return self.consume_token(ctx, nonce),
                Effect::Finish(result) => {
                    let report = result.to_report(&self.artifacts());
                    return self.finish(ctx, report);
                }
                Effect::Probe {
                    purpose,
                    requests,
                    timeout_ms,
                } => self.probe(ctx, purpose, requests, timeout_ms),
                Effect::Check(c) => self.check(ctx, c),
                Effect::Dispatch(d) => self.dispatch(ctx, d),
                Effect::QueryIdempotency {
                    host,
                    step_id,
                    idempotency_key,
                } => self.query(ctx, host, step_id, idempotency_key),
                Effect::WakeAt { at_ms } => {
                    let delay = at_ms.saturating_sub(self.deps.clock.now_ms());
                    ctx.run_later(Duration::from_millis(delay), |act, ctx| {
                        act.feed(ctx, Input::Tick)
                    });
                }
                effect @ (Effect::AwaitConfirmation { .. } | Effect::TokenRejected { .. }) => {
                    self.reply(&effect)
                }
            }
        }
    }

    /// Answers the operator who waits on this run without ending it.
    fn reply(&mut self, effect: &Effect) {
        let Some(reply) = replies::reply_for(self.meta.run_id, effect) else {
            return;
        };
        let report = self.report(reply);
        if let Effect::AwaitConfirmation { .. } = effect {
            self.deps.notices.do_send(RunNotice::Awaiting {
                run_id: self.meta.run_id,
                report: report.clone(),
            });
        }
        self.answer(report);
    }

    /// Group commit: every record now queued is written with one fsync, before any of the
    /// effects queued after the first of them is performed.
    fn record(&mut self, ctx: &mut Context<Self>, first: TimelineEvent) {
        let mut batch = vec![first];
        let mut rest = VecDeque::with_capacity(self.queue.len());
        for e in self.queue.drain(..) {
            match e {
                Effect::Record(ev) => batch.push(ev),
                other => rest.push_back(other),
            }
        }
        self.queue = rest;
        self.busy = true;
        let fut = self.deps.recorder.send(Append {
            run_id: self.meta.run_id,
            events: batch.clone(),
        });
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            act.busy = false;
            match res {
                Ok(Ok(appended)) => {
                    act.recorded(&batch, appended);
                    act.drain(ctx);
                }
                Ok(Err(e)) => act.journal_failed(ctx, e.to_string()),
                Err(e) => act.journal_failed(ctx, e.to_string()),
            }
        }));
    }

    /// A token's nonce is journaled as consumed before anything after it is performed.
    fn consume_token(&mut self, ctx: &mut Context<Self>, nonce: String) {
        self.deps.notices.do_send(RunNotice::TokenAccepted {
            run_id: self.meta.run_id,
        });
        self.busy = true;
        let fut = self.deps.nonces.send(ConsumeNonce { nonce });
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            act.busy = false;
            let failed = match res {
                Ok(Ok(())) => return act.drain(ctx),
                Ok(Err(e)) => e,
                Err(e) => e.to_string(),
            };
            act.journal_failed(ctx, format!("token consumption not recorded: {failed}"));
        }));
    }

    fn probe(
        &mut self,
        ctx: &mut Context<Self>,
        purpose: ProbePurpose,
        requests: Vec<ProbeRequest>,
        timeout_ms: u64,
    ) {
        for r in requests {
            let Some(addr) = self.deps.hosts.get(&r.host).cloned() else {
                let outcome = ProbeOutcome::Failed(ProbeFailure::Unreachable);
                ctx.notify(Feed(probe_input(purpose, r.host, outcome)));
                continue;
            };
            let hostname = r.host.clone();
            let fut = addr.send(host::Probe {
                script: r.script,
                timeout_ms,
            });
            ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
                let outcome = res.unwrap_or(ProbeOutcome::Failed(ProbeFailure::Unreachable));
                act.feed(ctx, probe_input(purpose, hostname, outcome));
            }));
        }
    }

    fn check(&mut self, ctx: &mut Context<Self>, c: CheckRequest) {
        self.check_seq += 1;
        let key = format!(
            "{}:{}:{}:check:{}",
            self.meta.run_id, c.host, c.step_id, self.check_seq
        );
        let Some(addr) = self.deps.hosts.get(&c.host).cloned() else {
            return;
        };
        let (host, step_id) = (c.host, c.step_id);
        let fut = addr.send(host::Execute {
            step_id: step_id.clone(),
            idempotency_key: key,
            shell: c.shell,
            script: c.script,
            timeout_ms: c.timeout_ms,
            errors: c.errors,
            output: None,
        });
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let answer = check_answer(res.unwrap_or(StepResult::OutcomeLost));
            act.feed(
                ctx,
                Input::CheckAnswered {
                    host,
                    step_id,
                    answer,
                },
            );
        }));
    }

    fn dispatch(&mut self, ctx: &mut Context<Self>, d: Dispatch) {
        let Some(addr) = self.deps.hosts.get(&d.host).cloned() else {
            return;
        };
        let (host, step_id, key) = (d.host, d.step_id, d.idempotency_key);
        let fut = addr.send(host::Execute {
            step_id: step_id.clone(),
            idempotency_key: key.clone(),
            shell: d.shell,
            script: d.script,
            timeout_ms: d.timeout_ms,
            errors: d.errors,
            output: Some(ctx.address().recipient()),
        });
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            // A host actor that died mid-request may have sent it: unknown outcome.
            let result = res.unwrap_or(StepResult::OutcomeLost);
            act.feed(
                ctx,
                Input::StepAnswered {
                    host,
                    step_id,
                    idempotency_key: key,
                    result,
                },
            );
        }));
    }

    fn query(
        &mut self,
        ctx: &mut Context<Self>,
        host: String,
        step_id: String,
        idempotency_key: String,
    ) {
        let Some(addr) = self.deps.hosts.get(&host).cloned() else {
            return;
        };
        let fut = addr.send(host::QueryKey {
            key: idempotency_key.clone(),
        });
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let answer = res.unwrap_or(IdempotencyAnswer::QueryFailed);
            act.feed(
                ctx,
                Input::IdempotencyAnswered {
                    host,
                    step_id,
                    idempotency_key,
                    answer,
                },
            );
        }));
    }

    fn finish(&mut self, ctx: &mut Context<Self>, report: RunReport) {
        self.busy = true;
        let fut = self.deps.recorder.send(Append {
            run_id: self.meta.run_id,
            events: vec![], // a no-op append returns the current head
        });
        let run_id = self.meta.run_id;
        ctx.wait(fut.into_actor(self).then(move |res, act, _ctx| {
            let (events, last_hash) = match res {
                Ok(Ok(a)) => (a.events, a.last_hash),
                _ => (0, String::new()),
            };
            let anchor = summary::sign_anchor(&act.deps.signer, run_id, events, &last_hash);
            let doc = summary::build(
                &report,
                &act.meta.requestor,
                act.meta.shadow,
                &act.decisions,
                act.started_ms,
                act.deps.clock.now_ms(),
                anchor,
            );
            let doc = summary::sign(doc, &act.deps.signer);
            let json = serde_json::to_vec_pretty(&doc).unwrap_or_default();
            act.deps
                .recorder
                .send(WriteSummary { run_id, json })
                .into_actor(act)
                .map(move |res, act, ctx| {
                    if let Ok(Err(e)) = &res {
                        tracing::error!(run = %run_id, error = %e, "summary not written");
                    }
                    act.answer(report.clone());
                    act.deps
                        .notices
                        .do_send(RunNotice::Closed { run_id, report });
                    ctx.stop();
                })
        }));
    }
}

fn probe_input(purpose: ProbePurpose, host: String, outcome: ProbeOutcome) -> Input {
    match purpose {
        ProbePurpose::Preflight => Input::Probed { host, outcome },
        ProbePurpose::Barrier { phase } => Input::Reprobed {
            phase,
            host,
            outcome,
        },
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.feed(ctx, Input::Start);
    }
}

/// Feed every pending input to the machine, then perform the effects.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for RunActor {
    type Result = ();
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        for input in std::mem::take(&mut self.pending) {
            self.step_machine(input);
        }
        self.drain(ctx);
    }
}

/// An input to feed later (from inside the actor).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Feed(Input);

impl Handler<Feed> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: Feed, ctx: &mut Context<Self>) {
        self.feed(ctx, msg.0);
    }
}

impl Handler<StepOutput> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: StepOutput, _ctx: &mut Context<Self>) {
        let text = String::from_utf8_lossy(&msg.chunk.data)
            .trim_end()
            .to_string();
        let ev = TimelineEvent::new(0, EventKind::StepReported)
            .host(&msg.host)
            .step(&msg.step_id);
        let p = ProgressEvent {
            run_id: self.meta.run_id,
            kind: ProgressKind::StepStarted,
            host: ev.host,
            phase: None,
            step: ev.step,
            ok: None,
            done: self.done,
            total: self.total,
            message: text,
        };
        self.watchers
            .retain(|w| w.send(RunUpdate::Progress(p.clone())).is_ok());
    }
}

/// Present a token for the plan this run waits on; `watcher` gets progress and the answer.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct PresentToken {
    pub token: String,
    pub consumed: BTreeSet<String>,
    pub watcher: Watcher,
}

impl Handler<PresentToken> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: PresentToken, ctx: &mut Context<Self>) {
        self.watchers.push(msg.watcher);
        self.feed(
            ctx,
            Input::TokenPresented {
                token: msg.token,
                consumed_nonces: msg.consumed,
            },
        );
    }
}

/// Cancel the run; `watcher` gets the answer when it has closed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CancelNow {
    pub reason: String,
    pub watcher: Watcher,
}

impl Handler<CancelNow> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: CancelNow, ctx: &mut Context<Self>) {
        self.watchers.push(msg.watcher);
        self.feed(ctx, Input::Cancel { reason: msg.reason });
    }
}

/// The claims to sign for an approval (only while awaiting a token).
#[derive(Debug, Message)]
#[rtype(result = "Option<crate::core::token::Claims>")]
pub struct ClaimsFor {
    pub approvers: Vec<String>,
    pub now_ms: u64,
    pub nonce: [u8; 16],
}

impl Handler<ClaimsFor> for RunActor {
    type Result = ResponseActFuture<Self, Option<crate::core::token::Claims>>;
    /// The claims, once the `token_issued` event that records them is durable.
    fn handle(&mut self, msg: ClaimsFor, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(claims) = self
            .machine
            .token_claims(msg.approvers, msg.now_ms, msg.nonce)
        else {
            return Box::pin(actix::fut::ready(None));
        };
        let event = crate::core::run::token_issued_event(&claims);
        let fut = self.deps.recorder.send(Append {
            run_id: self.meta.run_id,
            events: vec![event.clone()],
        });
        Box::pin(fut.into_actor(self).map(move |res, act, _| match res {
            Ok(Ok(appended)) => {
                act.recorded(&[event], appended);
                Some(claims)
            }
            _ => None,
        }))
    }
}

/// The plan view, if the run has sealed one.
#[derive(Debug, Message)]
#[rtype(result = "Option<tollgate_protocol::outcome::PlanView>")]
pub struct GetPlan;

impl Handler<GetPlan> for RunActor {
    type Result = Option<tollgate_protocol::outcome::PlanView>;
    fn handle(&mut self, _: GetPlan, _ctx: &mut Context<Self>) -> Self::Result {
        self.machine.plan().map(|p| p.view())
    }
}
