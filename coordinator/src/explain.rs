//! `tollgate explain RUN`: the run's timeline told in sentences. Every block, escalation,
//! approval wait, token judgement, barrier and destructive step gets one, naming its rule (with
//! the rule's own sentence) and the facts it was decided on.

use crate::core::rules;
use crate::core::timeline::{EventKind, Verdict};
use crate::journal::Line;

fn when(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

fn inputs(l: &Line, skip: &[&str]) -> String {
    let parts: Vec<String> = l
        .inputs
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" Facts: {}.", parts.join(", "))
    }
}

fn rule_text(l: &Line) -> String {
    match &l.rule {
        Some(r) => match rules::explain(r) {
            Some(sentence) => format!(" by rule {r} ({})", sentence.trim_end_matches('.')),
            None => format!(" by rule {r}"),
        },
        None => String::new(),
    }
}

fn subject(l: &Line) -> String {
    match (&l.host, &l.step) {
        (Some(h), Some(s)) => format!("{h}/{s}"),
        (Some(h), None) => h.clone(),
        (None, Some(s)) => s.clone(),
        (None, None) => "the run".into(),
    }
}

/// Sentences for the interesting lines of a timeline, in order.
pub fn sentences(lines: &[Line]) -> Vec<String> {
    let mut out = Vec::new();
    for l in lines {
        let reason = l
            .reason
            .as_ref()
            .map(|r| format!(", reason {r}"))
            .unwrap_or_default();
        let d = l.decision.as_deref().unwrap_or("");
        let destructive = l.inputs.get("destructive").is_some_and(|d| d == "true");
        let sentence = match (l.event_kind(), l.verdict()) {
            (Some(EventKind::RunStarted), _) => Some(format!(
                "{} {} {} run requested by {} for {}.",
                when(l.at_ms),
                l.inputs
                    .get("requested_mode")
                    .map(String::as_str)
                    .unwrap_or("?"),
                l.inputs.get("action").map(String::as_str).unwrap_or("?"),
                l.inputs.get("requestor").map(String::as_str).unwrap_or("?"),
                l.inputs.get("targets").map(String::as_str).unwrap_or("?"),
            )),
            (Some(EventKind::StepDispatched), _) if destructive => Some(format!(
                "{} DESTRUCTIVE step {} was dispatched{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &["destructive"])
            )),
            (_, Some(Verdict::Block)) => Some(format!(
                "{} BLOCKED {}{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &[])
            )),
            (_, Some(Verdict::Escalate)) => Some(format!(
                "{} ESCALATION required for {}{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &[])
            )),
            (_, Some(Verdict::AwaitConfirmation)) => Some(format!(
                "{} waiting for approval of {}{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &[])
            )),
            (Some(EventKind::TokenJudged), _) => Some(format!(
                "{} token {d} for {}{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &["nonce"])
            )),
            (Some(EventKind::BarrierEvaluated), _) => Some(format!(
                "{} barrier {d} for {}{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &[])
            )),
            (_, Some(Verdict::Fail)) => Some(format!(
                "{} FAILED {}{}{reason}.{}",
                when(l.at_ms),
                subject(l),
                rule_text(l),
                inputs(l, &[])
            )),
            (Some(EventKind::RunFinished), _) => Some(format!(
                "{} run finished ({d}){}{reason}.{}",
                when(l.at_ms),
                rule_text(l),
                inputs(l, &[])
            )),
            _ => None,
        };
        if let Some(s) = sentence {
            out.push(format!("[{}] {s}", l.seq));
        }
    }
    out
}
