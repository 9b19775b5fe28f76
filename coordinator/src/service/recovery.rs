//! Start-up: adopt closed runs from their summaries, and close every run a previous process
//! left open. An open run is never resumed blindly: each in-flight step's idempotency key is
//! asked about, the answers are journaled, and the run is closed typed by the safety core
//! ([`crate::core::closed::close_after_restart`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use actix::prelude::*;
use tollgate_protocol::outcome::{Outcome, OutcomeKind, ReasonCode, RunReport};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

use crate::core::closed::{InFlight, OpenRun, close_after_restart};
use crate::journal::Journal;
use crate::journal::chain::{Line, parse_line};
use crate::journal::summary::{self, Summary};
use crate::runtime::coordinator::{Adopt, Coordinator, Setup};
use crate::runtime::host::{HostActor, QueryKey};
use crate::runtime::recorder::{Append, Recorder, WriteSummary};

fn reason_of(s: &str) -> ReasonCode {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .unwrap_or(ReasonCode::OutcomeUncertain)
}

/// A run report rebuilt from a summary (enough for listing, re-submission and replay checks).
pub fn report_of(s: &Summary, artifacts: &Path) -> RunReport {
    let reason = reason_of(&s.outcome.reason);
    let rule = s.outcome.rule.clone().unwrap_or_default();
    let kind: Option<OutcomeKind> =
        serde_json::from_value(serde_json::Value::String(s.outcome.kind.clone())).ok();
    let outcome = match kind {
        Some(OutcomeKind::Completed) => Outcome::Completed,
        Some(OutcomeKind::PartialSuccess) => Outcome::PartialSuccess {
            succeeded: s
                .hosts
                .iter()
                .filter(|h| h.outcome == "Completed")
                .map(|h| h.host.clone())
                .collect(),
            failed: s
                .hosts
                .iter()
                .filter(|h| h.outcome != "Completed")
                .map(|h| h.host.clone())
                .collect(),
        },
        Some(OutcomeKind::EscalationRequired) => Outcome::EscalationRequired {
            rule,
            next_command: s.outcome.detail.clone(),
        },
        Some(OutcomeKind::PreflightFailed) => Outcome::PreflightFailed { reason },
        Some(OutcomeKind::TransportUnreachable) => Outcome::TransportUnreachable { reason },
        Some(OutcomeKind::CapabilityMismatch) => Outcome::CapabilityMismatch {
            capability: s.outcome.detail.clone(),
        },
        Some(OutcomeKind::ExecutionFailed) => Outcome::ExecutionFailed {
            step_id: String::new(),
            reason,
            exit_code: None,
        },
        _ => Outcome::PolicyBlocked { reason, rule },
    };
    let mode = |m: &str| if m == "full" { Mode::Full } else { Mode::Quick };
    RunReport {
        run_id: s.run_id,
        action: if s.action == "deploy" {
            Action::Deploy
        } else {
            Action::Teardown
        },
        requested_mode: mode(&s.requested_mode),
        effective_mode: mode(&s.effective_mode),
        outcome,
        reason,
        rule: s.outcome.rule.clone(),
        detail: s.outcome.detail.clone(),
        hosts: Vec::new(),
        artifacts: artifacts.display().to_string(),
    }
}

fn run_dirs(runs_dir: &Path) -> Vec<(Uuid, std::path::PathBuf)> {
    let Ok(rd) = std::fs::read_dir(runs_dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let id = e.file_name().to_str()?.parse::<Uuid>().ok()?;
            Some((id, e.path()))
        })
        .collect()
}

/// Registers every run that has a summary.
pub fn adopt_closed_runs(runs_dir: &Path, coordinator: &mut Coordinator) {
    for (_, dir) in run_dirs(runs_dir) {
        let Ok(bytes) = std::fs::read(dir.join("summary.json")) else {
            continue;
        };
        match serde_json::from_slice::<Summary>(&bytes) {
            Ok(s) => {
                coordinator.adopt_closed(report_of(&s, &dir), s.requestor.clone(), s.started_ms)
            }
            Err(e) => tracing::error!(dir = %dir.display(), error = %e, "unreadable summary.json"),
        }
    }
}

/// Reads the whole lines of a timeline (a torn last line is ignored, as the journal will cut it).
fn read_lines(dir: &Path) -> Option<Vec<Line>> {
    let bytes = std::fs::read(dir.join(Journal::FILE)).ok()?;
    let end = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    bytes[..end]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| parse_line(l).ok())
        .collect()
}

/// What the journal of an open run says, for the safety core.
fn open_run(run_id: Uuid, lines: &[Line], all_hosts: &[String]) -> Option<OpenRun> {
    let started = lines.iter().find(|l| l.kind == "run_started")?;
    let action = match started.inputs.get("action").map(String::as_str) {
        Some("deploy") => Action::Deploy,
        _ => Action::Teardown,
    };
    let requested_mode = match started.inputs.get("requested_mode").map(String::as_str) {
        Some("quick") => Mode::Quick,
        _ => Mode::Full,
    };
    let targets = match started.inputs.get("targets").map(String::as_str) {
        None | Some("(all)") => all_hosts.to_vec(),
        Some(t) => t.split(',').map(str::to_string).collect(),
    };
    let reported: BTreeSet<&str> = lines
        .iter()
        .filter(|l| l.kind == "step_reported")
        .filter_map(|l| l.inputs.get("idempotency_key").map(String::as_str))
        .collect();
    let mut seen = BTreeSet::new();
    let in_flight = lines
        .iter()
        .filter(|l| l.kind == "step_dispatched")
        .filter_map(|l| {
            let key = l.inputs.get("idempotency_key")?;
            if reported.contains(key.as_str()) || !seen.insert(key.clone()) {
                return None;
            }
            Some(InFlight {
                host: l.host.clone()?,
                step: l.step.clone().unwrap_or_default(),
                key: key.clone(),
                destructive: l.inputs.get("destructive").is_some_and(|d| d == "true"),
            })
        })
        .collect();
    Some(OpenRun {
        run_id,
        action,
        requested_mode,
        targets,
        in_flight,
    })
}

/// Closes every run without a summary.
pub async fn close_open_runs(
    runs_dir: &Path,
    hosts: &BTreeMap<String, Addr<HostActor>>,
    recorder: &Addr<Recorder>,
    coordinator: &Addr<Coordinator>,
    setup: &Setup,
) {
    let all_hosts: Vec<String> = setup
        .inventory
        .hosts()
        .iter()
        .map(|h| h.name.clone())
        .collect();
    for (run_id, dir) in run_dirs(runs_dir) {
        if dir.join("summary.json").exists() || !dir.join(Journal::FILE).exists() {
            continue;
        }
        let Some(lines) = read_lines(&dir) else {
            tracing::error!(run = %run_id, "timeline is corrupt: the run is left open for inspection (`tollgate runs verify`)");
            continue;
        };
        let Some(open) = open_run(run_id, &lines, &all_hosts) else {
            tracing::error!(run = %run_id, "timeline has no run_started event: left as is");
            continue;
        };
        let mut answers = BTreeMap::new();
        for f in &open.in_flight {
            if let Some(h) = hosts.get(&f.host)
                && let Ok(answer) = h.send(QueryKey { key: f.key.clone() }).await
            {
                answers.insert(f.key.clone(), answer);
            }
        }
        let now = setup.clock.now_ms();
        let (events, result) = close_after_restart(now, &open, &answers);
        let appended = match recorder.send(Append { run_id, events }).await {
            Ok(Ok(a)) => a,
            other => {
                tracing::error!(run = %run_id, result = ?other.err(), "could not journal the closing of an open run");
                continue;
            }
        };
        let report = result.to_report(&dir.display().to_string());
        let requestor = lines
            .iter()
            .find(|l| l.kind == "run_started")
            .and_then(|l| l.inputs.get("requestor").cloned())
            .unwrap_or_default();
        let mut decisions: Vec<Line> = lines.into_iter().filter(|l| l.decision.is_some()).collect();
        decisions.extend(appended.lines.into_iter().filter(|l| l.decision.is_some()));
        let started_ms = decisions.first().map(|l| l.at_ms).unwrap_or(now);
        let anchor =
            summary::sign_anchor(&setup.signer, run_id, appended.events, &appended.last_hash);
        let doc = summary::build(
            &report, &requestor, false, &decisions, started_ms, now, anchor,
        );
        if let Ok(json) = serde_json::to_vec_pretty(&doc) {
            let _ = recorder.send(WriteSummary { run_id, json }).await;
        }
        tracing::warn!(run = %run_id, in_flight = open.in_flight.len(), "closed a run left open by a previous coordinator");
        coordinator.do_send(Adopt {
            report,
            requestor,
            started_ms,
        });
    }
}
