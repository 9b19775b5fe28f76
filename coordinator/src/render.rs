//! What the CLI prints (exit statuses are [`crate::exit`]'s).
//!
//! The exit-code table lives in one place, `crate::exit`, and the README's copy is tested
//! against it (`tests/exit_codes.rs`).

use std::fmt::Write;

use tollgate_protocol::ctl::{
    Approval, DiffReport, HostStatus, ProgressEvent, ProgressKind, RunListEntry, VerifyReport,
};
use tollgate_protocol::outcome::{Outcome, PlanView, RunReport};

pub fn plan(p: &PlanView) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "plan {} for {}", p.operation_hash, p.hosts.join(", "));
    for st in &p.steps {
        if st.barrier_before {
            let _ = writeln!(
                s,
                "  ── barrier: containment, re-probe every host, policy, token ──"
            );
        }
        let mark = if st.destructive {
            "DESTRUCTIVE"
        } else {
            "safe"
        };
        // An approver sees a step that opted out of failing on its errors.
        let errors = if st.errors.is_stop() {
            ""
        } else {
            "  errors=continue (error records do not fail it)"
        };
        let _ = writeln!(
            s,
            "  {:<12} {:<20} {:<11} on {}{errors}",
            st.phase,
            st.step_id,
            mark,
            st.hosts.join(", ")
        );
    }
    let _ = writeln!(s, "  approvals required: {}", p.approvals_required);
    s
}

/// A run report in plain words.
pub fn report(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "run {}  {} (requested {}, effective {})",
        r.run_id, r.action, r.requested_mode, r.effective_mode
    );
    let rule = r
        .rule
        .as_deref()
        .map(|x| format!("  [{x}]"))
        .unwrap_or_default();
    let _ = writeln!(s, "outcome: {} ({}){rule}", r.outcome.kind(), r.reason);
    if !r.detail.is_empty() {
        let _ = writeln!(s, "  {}", r.detail);
    }
    match &r.outcome {
        Outcome::EscalationRequired { next_command, .. } => {
            let _ = writeln!(
                s,
                "  quick mode never destroys anything. To continue, run:\n    {next_command}"
            );
        }
        Outcome::ConfirmationRequired {
            plan: p,
            operation_hash,
            run_id,
        } => {
            s.push_str(&plan(p));
            let _ = writeln!(
                s,
                "  an approver must run:\n    tollgate approve {run_id} --operation-hash {operation_hash}"
            );
        }
        Outcome::PartialSuccess { succeeded, failed } => {
            let _ = writeln!(
                s,
                "  succeeded: {}  failed: {}",
                succeeded.join(", "),
                failed.join(", ")
            );
        }
        Outcome::ExecutionFailed {
            step_id,
            exit_code: Some(code),
            ..
        } => {
            let _ = writeln!(s, "  step {step_id} exited with {code}");
        }
        _ => {}
    }
    if !r.hosts.is_empty() {
        let _ = writeln!(s, "hosts:");
        for h in &r.hosts {
            let _ = writeln!(
                s,
                "  {:<12} {:<17} {:<21} {:<24} {}",
                h.host,
                h.lifecycle,
                h.outcome.kind(),
                h.reason,
                h.detail
            );
        }
    }
    let _ = writeln!(s, "artifacts: {}", r.artifacts);
    s
}

pub fn approval(a: &Approval) -> String {
    format!(
        "approved plan {} of run {}\ntoken (single use, expires at unix ms {}):\n  {}\nnext:\n  {}\n",
        a.operation_hash, a.run_id, a.expires_ms, a.token, a.next_command
    )
}

pub fn status(hosts: &[HostStatus]) -> String {
    let mut s = format!(
        "{:<12} {:<10} {:<11} {:<11} {:<16} {:<14} {}\n",
        "HOST", "ROLE", "CLASS", "TRANSPORT", "LIFECYCLE", "FINGERPRINT", "DETAIL"
    );
    for h in hosts {
        let fp = h
            .fingerprint
            .as_deref()
            .map(|f| &f[..f.len().min(12)])
            .unwrap_or("-");
        let _ = writeln!(
            s,
            "{:<12} {:<10} {:<11} {:<11} {:<16} {:<14} {}",
            h.host, h.role, h.safety_class, h.transport, h.lifecycle, fp, h.detail
        );
    }
    s
}

pub fn runs(list: &[RunListEntry]) -> String {
    let mut s = format!(
        "{:<36}  {:<9} {:<6} {:<22} {}\n",
        "RUN", "ACTION", "MODE", "STATE", "REQUESTOR"
    );
    for r in list {
        let _ = writeln!(
            s,
            "{:<36}  {:<9} {:<6} {:<22} {}",
            r.run_id, r.action, r.effective_mode, r.state, r.requestor
        );
    }
    s
}

pub fn verify(v: &VerifyReport) -> String {
    if v.ok {
        format!(
            "run {}: timeline intact ({} events, chain and signed summary agree)\n",
            v.run_id, v.events
        )
    } else {
        format!(
            "run {}: TAMPERED or damaged at line {}: {}\n",
            v.run_id,
            v.first_bad_line
                .map(|l| l.to_string())
                .unwrap_or_else(|| "?".into()),
            v.problem.as_deref().unwrap_or("unknown problem")
        )
    }
}

pub fn diff(d: &DiffReport) -> String {
    let mut s = String::new();
    if let Some(p) = &d.problem {
        let _ = writeln!(s, "runs {} and {}: not compared: {p}", d.a, d.b);
        return s;
    }
    if d.parity {
        let _ = writeln!(
            s,
            "runs {} and {}: parity ({} decisions each, same per host and for the run)",
            d.a, d.b, d.decisions_a
        );
        return s;
    }
    let _ = writeln!(
        s,
        "runs {} ({} decisions) and {} ({} decisions) DIFFER in {} scope(s):",
        d.a,
        d.decisions_a,
        d.b,
        d.decisions_b,
        d.differences.len()
    );
    for x in &d.differences {
        let _ = writeln!(s, "  {} decision {}:", x.scope, x.index);
        let _ = writeln!(s, "    A: {}", x.a.as_deref().unwrap_or("(none)"));
        let _ = writeln!(s, "    B: {}", x.b.as_deref().unwrap_or("(none)"));
    }
    s
}

/// One progress event as a short line.
pub fn progress_line(p: &ProgressEvent) -> String {
    let host = p.host.as_deref().unwrap_or("-");
    let step = p.step.as_deref().unwrap_or("");
    let phase = p.phase.as_deref().unwrap_or("phase");
    match p.kind {
        ProgressKind::ProbeStarted => match &p.host {
            Some(h) => format!("{h}: probing"),
            None => "probing".to_string(),
        },
        ProgressKind::ProbeFinished if p.ok == Some(true) => format!("{host}: probed"),
        ProgressKind::ProbeFinished => format!("{host}: probe failed ({})", p.message),
        ProgressKind::PhaseStarted => format!("{phase}: {}", p.message),
        ProgressKind::BarrierPassed => format!("barrier before {phase}: passed ({})", p.message),
        ProgressKind::BarrierBlocked => format!("barrier before {phase}: BLOCKED ({})", p.message),
        ProgressKind::StepStarted if p.message == "running" => format!("{host} {step}: running"),
        ProgressKind::StepStarted => format!("{host} {step} | {}", p.message),
        ProgressKind::StepFinished if p.ok == Some(true) => format!("{host} {step}: done"),
        ProgressKind::StepFinished => format!("{host} {step}: {}", p.message),
        ProgressKind::StepSkipped => format!("{host} {step}: already in desired state, skipped"),
        ProgressKind::HostFinished => format!("{host}: stopped ({})", p.message),
        ProgressKind::RunAccepted => "accepted".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use tollgate_protocol::StepErrors;
    use tollgate_protocol::outcome::PlanStepView;

    use super::*;

    #[test]
    fn a_plan_names_the_steps_that_opt_out_of_failing_on_errors() {
        let step = |id: &str, errors| PlanStepView {
            phase: "remove".into(),
            step_id: id.into(),
            hosts: vec!["web1".into()],
            destructive: true,
            barrier_before: false,
            errors,
        };
        let text = plan(&PlanView {
            operation_hash: "h".into(),
            hosts: vec!["web1".into()],
            steps: vec![
                step("strict", StepErrors::Stop),
                step("lenient", StepErrors::Continue),
            ],
            approvals_required: 1,
            self_approval: false,
        });
        let line = |id: &str| {
            text.lines()
                .find(|l| l.contains(id))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("lenient").contains("errors=continue"), "{text}");
        assert!(!line("strict").contains("errors"), "{text}");
    }
}
