//! Start-up: read every run's journal, decide from it alone whether the run is closed
//! ([`crate::core::ledger`]), and close every run a previous process left open, whatever its
//! stage. An open run is never resumed: each in-flight step's idempotency key is asked about,
//! the answers are journaled, and the run is closed typed by the safety core
//! ([`crate::core::closed::close_after_restart`]). A run whose journal cannot be read or does
//! not verify is registered as unreadable: its id is never reused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use actix::prelude::*;
use tollgate_protocol::Mode;
use tollgate_protocol::outcome::{OutcomeKind, ReasonCode, RunReport};
use uuid::Uuid;

use crate::core::closed::{OpenRun, StepFact, close_after_restart, in_flight};
use crate::core::ledger::{Known, OnRestart, RunRecord, Stage, on_restart};
use crate::core::outcome::outcome_from_journal;
use crate::core::timeline::EventKind;
use crate::journal::chain::{Line, parse_line};
use crate::journal::summary;
use crate::journal::{Journal, QUARANTINE_FILE, ledger_fact, verify_signed};
use crate::runtime::coordinator::Setup;
use crate::runtime::host::{HostActor, QueryKey};
use crate::runtime::recorder::{Append, Recorder, WriteSummary};

fn reason_of(s: &str) -> ReasonCode {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .unwrap_or(ReasonCode::OutcomeUncertain)
}

fn mode_of(m: Option<&String>) -> Mode {
    match m.map(String::as_str) {
        Some("quick") => Mode::Quick,
        _ => Mode::Full,
    }
}

/// The report of a closed run, rebuilt from its journal (its last `run_finished` line): enough
/// for listing, re-submission and replay checks. `summary.json` is for people; the journal is
/// what decides.
pub fn report_from_journal(
    run_id: Uuid,
    record: &RunRecord,
    lines: &[Line],
    artifacts: &Path,
) -> RunReport {
    let started = lines
        .iter()
        .find(|l| l.event_kind() == Some(EventKind::RunStarted));
    let finished = lines
        .iter()
        .rev()
        .find(|l| l.event_kind() == Some(EventKind::RunFinished));
    let input = |l: Option<&Line>, k: &str| l.and_then(|l| l.inputs.get(k)).cloned();
    let kind: Option<OutcomeKind> = input(finished, "outcome")
        .and_then(|o| serde_json::from_value(serde_json::Value::String(o)).ok());
    let reason = finished
        .and_then(|l| l.reason.as_deref())
        .map(reason_of)
        .unwrap_or(ReasonCode::OutcomeUncertain);
    let rule = finished.and_then(|l| l.rule.clone());
    let detail = input(finished, "detail").unwrap_or_default();
    let step = finished.and_then(|l| l.step.clone());
    let outcome = outcome_from_journal(kind, reason, rule.clone(), detail.clone(), step);
    let requested_mode = mode_of(started.and_then(|l| l.inputs.get("requested_mode")));
    let effective_mode = lines
        .iter()
        .rev()
        .find(|l| l.event_kind() == Some(EventKind::PlanSealed))
        .map(|l| mode_of(l.inputs.get("effective_mode")))
        .unwrap_or(requested_mode);
    RunReport {
        run_id,
        action: record.action,
        requested_mode,
        effective_mode,
        outcome,
        reason,
        rule,
        detail,
        hosts: Vec::new(),
        artifacts: artifacts.display().to_string(),
    }
}

fn run_dirs(runs_dir: &Path) -> Vec<(Uuid, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(runs_dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(Uuid, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let id = e.file_name().to_str()?.parse::<Uuid>().ok()?;
            Some((id, e.path()))
        })
        .collect();
    dirs.sort();
    dirs
}

/// What start-up trusts of one run.
struct ReadRun {
    /// The lines the coordinator provably wrote (up to the last valid signed checkpoint).
    lines: Vec<Line>,
    record: RunRecord,
    /// Why the lines after them were quarantined, if any were.
    quarantined: Option<String>,
}

/// A run's authenticated journal lines and its ledger record, or why it is unreadable. Lines
/// after the last valid signed checkpoint are never adopted: they are moved to
/// [`QUARANTINE_FILE`] and the timeline is cut back to what the coordinator signed.
fn read_run(run_id: Uuid, dir: &Path, public_key: &[u8]) -> Result<ReadRun, String> {
    let path = dir.join(Journal::FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // A torn last line (a crash mid-write) was never fsynced: it is cut, not judged.
    let end = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let whole = &bytes[..end];
    let report = verify_signed(run_id, whole, None, public_key);
    let problem = (!report.ok).then(|| {
        format!(
            "{}: line {}: {}",
            path.display(),
            report.first_bad_line.unwrap_or(0),
            report.problem.clone().unwrap_or_default()
        )
    });
    if problem.is_some() && report.signed == 0 {
        return Err(problem.unwrap_or_default());
    }
    let pieces: Vec<&[u8]> = whole
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let trusted = report.signed.min(pieces.len() as u64) as usize;
    let lines: Vec<Line> = pieces[..trusted]
        .iter()
        .map(|l| parse_line(l))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(why) = &problem {
        quarantine(&path, dir, &pieces[trusted..], trusted)
            .map_err(|e| format!("{why}; and it could not be quarantined: {e}"))?;
    }
    let facts: Vec<_> = lines.iter().map(ledger_fact).collect();
    let record = RunRecord::from_journal(&facts).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(ReadRun {
        lines,
        record,
        quarantined: problem,
    })
}

/// Moves `tail` (the lines after the first `keep`) to the quarantine file, fsynced, then cuts
/// the timeline back to its first `keep` lines.
fn quarantine(path: &Path, dir: &Path, tail: &[&[u8]], keep: usize) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut q = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(QUARANTINE_FILE))?;
    for l in tail {
        q.write_all(l)?;
        q.write_all(b"\n")?;
    }
    q.sync_all()?;
    let bytes = std::fs::read(path)?;
    let cut: usize = bytes
        .split_inclusive(|b| *b == b'\n')
        .take(keep)
        .map(<[u8]>::len)
        .sum();
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(cut as u64)?;
    f.sync_all()
}

/// What the journal of an open run says, for the safety core. The targets are those of the
/// run's last `run_started` (a continuation names the escalation's hosts).
fn open_run(run_id: Uuid, record: &RunRecord, lines: &[Line], all_hosts: &[String]) -> OpenRun {
    let started = lines
        .iter()
        .rev()
        .find(|l| l.event_kind() == Some(EventKind::RunStarted));
    let requested_mode = mode_of(started.and_then(|l| l.inputs.get("requested_mode")));
    let targets = match started
        .and_then(|l| l.inputs.get("targets"))
        .map(String::as_str)
    {
        None | Some("(all)") => all_hosts.to_vec(),
        Some(t) => t.split(',').map(str::to_string).collect(),
    };
    let in_flight = in_flight(lines.iter().filter_map(step_fact));
    OpenRun {
        run_id,
        action: record.action,
        requested_mode,
        targets,
        in_flight,
        quarantined: None,
    }
}

/// What a journal line says about a step's key ([`crate::core::closed::step_fact`]).
fn step_fact(l: &Line) -> Option<StepFact> {
    crate::core::closed::step_fact(
        crate::core::timeline::EventKind::parse(&l.kind),
        l.host.as_deref(),
        l.step.as_deref(),
        &l.inputs,
    )
}

/// What start-up found, for the `Coordinator` to adopt before it takes any intent.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Closed runs (including those this start closed): report, record, start time.
    pub closed: Vec<(RunReport, RunRecord, u64)>,
    /// Run ids whose record is unreadable or missing.
    pub damaged: Vec<(Uuid, Known)>,
}

/// Reads every run's journal; closes every run that is not closed.
pub async fn recover(
    runs_dir: &Path,
    indexed: &BTreeSet<Uuid>,
    hosts: &BTreeMap<String, Addr<HostActor>>,
    recorder: &Addr<Recorder>,
    setup: &Setup,
) -> Recovered {
    let all_hosts: Vec<String> = setup
        .inventory
        .hosts()
        .iter()
        .map(|h| h.name.clone())
        .collect();
    let mut out = Recovered::default();
    let dirs = run_dirs(runs_dir);
    let present: BTreeSet<Uuid> = dirs.iter().map(|(id, _)| *id).collect();
    for missing in indexed.difference(&present) {
        tracing::error!(run = %missing, "the signed run index lists this run but its directory is missing (deleted or renamed): its id is never reused");
        out.damaged.push((*missing, Known::Missing));
    }
    for (run_id, dir) in dirs {
        if !indexed.contains(&run_id) {
            tracing::error!(run = %run_id, dir = %dir.display(), "a run directory that the signed run index does not name (planted, or renamed from another id): not adopted");
            out.damaged.push((run_id, Known::Unreadable));
            continue;
        }
        let ReadRun {
            lines,
            record,
            quarantined,
        } = match read_run(run_id, &dir, &setup.public_key) {
            Ok(r) => r,
            Err(problem) => {
                tracing::error!(run = %run_id, %problem, "the run's journal cannot be read or does not verify: its id is never reused (`tollgate runs verify`)");
                out.damaged.push((run_id, Known::Unreadable));
                continue;
            }
        };
        if let Some(why) = &quarantined {
            tracing::error!(run = %run_id, problem = %why, "timeline lines not covered by a signed checkpoint were quarantined (rule E014); the run closes as tampered");
        }
        let started_ms = lines.first().map(|l| l.at_ms).unwrap_or(0);
        if on_restart(record.stage) == OnRestart::Keep {
            let report = report_from_journal(run_id, &record, &lines, &dir);
            // Closed in its journal, but the process died before its summary was written (none,
            // or the escalation's, anchoring fewer lines): rebuilt from the signed lines. A
            // summary that does not verify is left as it is: it is evidence, and `runs verify`
            // reports it.
            if summary_is_stale(&dir, run_id, &lines, &setup.public_key) {
                tracing::warn!(run = %run_id, "the closed run's summary.json did not match its journal: rewritten from the journal");
                write_summary(run_id, &report, &record, &lines, recorder, setup).await;
            }
            out.closed.push((report, record, started_ms));
            continue;
        }
        let closing = Closing {
            run_id,
            dir: &dir,
            record: &record,
            lines: &lines,
            quarantined,
        };
        match close_run(closing, &all_hosts, hosts, recorder, setup).await {
            Ok(report) => {
                tracing::warn!(run = %run_id, stage = record.stage.as_str(), "closed a run left open by a previous coordinator");
                out.closed.push((
                    report,
                    RunRecord {
                        stage: Stage::Closed,
                        ..record
                    },
                    started_ms,
                ));
            }
            Err(problem) => {
                tracing::error!(run = %run_id, %problem, "could not journal the closing of an open run: its id is never reused");
                out.damaged.push((run_id, Known::Unreadable));
            }
        }
    }
    out
}

/// Whether a closed run's summary must be (re)written: there is none, or it is a genuine,
/// signed summary of an earlier part of the run (fewer lines than the journal now has).
fn summary_is_stale(dir: &Path, run_id: Uuid, lines: &[Line], public_key: &[u8]) -> bool {
    let Ok(bytes) = std::fs::read(dir.join("summary.json")) else {
        return true;
    };
    let Ok(doc) = serde_json::from_slice::<summary::Summary>(&bytes) else {
        return false;
    };
    doc.run_id == run_id
        && summary::is_signed(&doc, public_key)
        && doc.timeline.events < lines.len() as u64
}

/// Writes the signed summary of a closed run from its journal lines.
async fn write_summary(
    run_id: Uuid,
    report: &RunReport,
    record: &RunRecord,
    lines: &[Line],
    recorder: &Addr<Recorder>,
    setup: &Setup,
) {
    let decisions: Vec<Line> = lines
        .iter()
        .filter(|l| l.decision.is_some())
        .cloned()
        .collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return;
    };
    let anchor = summary::sign_anchor(&setup.signer, run_id, lines.len() as u64, &last.hash);
    let doc = summary::build(
        report,
        &record.requestor,
        record.shadow,
        &decisions,
        first.at_ms,
        last.at_ms,
        anchor,
    );
    let doc = summary::sign(doc, &setup.signer);
    if let Ok(json) = serde_json::to_vec_pretty(&doc) {
        let _ = recorder.send(WriteSummary { run_id, json }).await;
    }
}

/// One open run to close.
struct Closing<'a> {
    run_id: Uuid,
    dir: &'a Path,
    record: &'a RunRecord,
    lines: &'a [Line],
    quarantined: Option<String>,
}

/// Closes one open run: settles its in-flight steps by their keys, journals the close, writes
/// its summary.
async fn close_run(
    c: Closing<'_>,
    all_hosts: &[String],
    hosts: &BTreeMap<String, Addr<HostActor>>,
    recorder: &Addr<Recorder>,
    setup: &Setup,
) -> Result<RunReport, String> {
    let Closing {
        run_id,
        dir,
        record,
        lines,
        quarantined,
    } = c;
    let mut open = open_run(run_id, record, lines, all_hosts);
    open.quarantined = quarantined;
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
        Ok(Err(e)) => return Err(e.to_string()),
        Err(e) => return Err(e.to_string()),
    };
    let report = result.to_report(&dir.display().to_string());
    let mut decisions: Vec<Line> = lines
        .iter()
        .filter(|l| l.decision.is_some())
        .cloned()
        .collect();
    decisions.extend(appended.lines.into_iter().filter(|l| l.decision.is_some()));
    let started_ms = lines.first().map(|l| l.at_ms).unwrap_or(now);
    let anchor = summary::sign_anchor(&setup.signer, run_id, appended.events, &appended.last_hash);
    let doc = summary::build(
        &report,
        &record.requestor,
        record.shadow,
        &decisions,
        started_ms,
        now,
        anchor,
    );
    let doc = summary::sign(doc, &setup.signer);
    if let Ok(json) = serde_json::to_vec_pretty(&doc) {
        let _ = recorder.send(WriteSummary { run_id, json }).await;
    }
    Ok(report)
}
