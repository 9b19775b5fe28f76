//! `tollgate runs diff A B`: do two runs take the same decisions? (SPEC §8: a shadow run against
//! the real one, for parity.)
//!
//! A decision is a timeline line that carries one (`decision` set). Two runs are compared per
//! scope, a host or the run itself, in each scope's own order: hosts work concurrently, so the
//! interleaving across hosts differs from run to run and means nothing, while the order within a
//! host is the order of its decisions. What is compared is what was decided (kind, phase, step,
//! decision, rule, reason), not when, nor run-specific values (ids, keys, fingerprints).

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::ctl::DecisionDifference as Difference;

use crate::journal::Line;

/// The scope of decisions that name no host.
pub const RUN_SCOPE: &str = "(run)";

/// One decision, in words, without what is specific to a run.
pub fn describe(line: &Line) -> Option<String> {
    let decision = line.decision.as_deref()?;
    let mut s = line.kind.clone();
    match (&line.phase, &line.step) {
        (Some(p), Some(st)) => s.push_str(&format!(" {p}/{st}")),
        (Some(p), None) => s.push_str(&format!(" {p}")),
        (None, Some(st)) => s.push_str(&format!(" {st}")),
        (None, None) => {}
    }
    s.push_str(": ");
    s.push_str(decision);
    if let Some(rule) = &line.rule {
        s.push_str(&format!(" ({rule})"));
    }
    if let Some(reason) = &line.reason {
        s.push_str(&format!(", {reason}"));
    }
    Some(s)
}

/// Each scope's decisions, in order.
pub fn decisions(lines: &[Line]) -> BTreeMap<String, Vec<String>> {
    let mut by_scope: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        if let Some(d) = describe(line) {
            let scope = line.host.clone().unwrap_or_else(|| RUN_SCOPE.to_owned());
            by_scope.entry(scope).or_default().push(d);
        }
    }
    by_scope
}

/// The first difference in every scope where the two runs part; empty means parity.
pub fn compare(a: &[Line], b: &[Line]) -> Vec<Difference> {
    let (da, db) = (decisions(a), decisions(b));
    let scopes: BTreeSet<&String> = da.keys().chain(db.keys()).collect();
    let none = Vec::new();
    let mut out = Vec::new();
    for scope in scopes {
        let xa = da.get(scope).unwrap_or(&none);
        let xb = db.get(scope).unwrap_or(&none);
        let first = (0..xa.len().max(xb.len())).find(|&i| xa.get(i) != xb.get(i));
        if let Some(i) = first {
            out.push(Difference {
                scope: scope.clone(),
                index: i as u64 + 1,
                a: xa.get(i).cloned(),
                b: xb.get(i).cloned(),
            });
        }
    }
    out
}

/// How many decisions a timeline holds.
pub fn count(lines: &[Line]) -> u64 {
    lines.iter().filter(|l| l.decision.is_some()).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        seq: u64,
        host: Option<&str>,
        kind: &str,
        step: Option<&str>,
        decision: Option<&str>,
    ) -> Line {
        Line {
            seq,
            at_ms: 1_000 + seq,
            kind: kind.into(),
            host: host.map(str::to_owned),
            phase: step.map(|_| "p".to_owned()),
            step: step.map(str::to_owned),
            decision: decision.map(str::to_owned),
            rule: decision.map(|_| "R010".to_owned()),
            reason: None,
            inputs: BTreeMap::from([("idempotency_key".into(), format!("run-{seq}"))]),
            prev: String::new(),
            hash: String::new(),
        }
    }

    fn run(order: &[(&str, &str)]) -> Vec<Line> {
        let mut v = vec![line(0, None, "plan_sealed", None, Some("allow"))];
        for (i, (host, step)) in order.iter().enumerate() {
            v.push(line(
                i as u64 + 1,
                Some(host),
                "step_dispatched",
                Some(step),
                Some("allow"),
            ));
            v.push(line(
                100 + i as u64,
                Some(host),
                "host_state_changed",
                None,
                None,
            ));
        }
        v
    }

    #[test]
    fn the_same_decisions_interleaved_differently_are_at_parity() {
        let a = run(&[
            ("web1", "s1"),
            ("web2", "s1"),
            ("web1", "s2"),
            ("web2", "s2"),
        ]);
        let b = run(&[
            ("web2", "s1"),
            ("web2", "s2"),
            ("web1", "s1"),
            ("web1", "s2"),
        ]);
        assert_eq!(compare(&a, &b), vec![]);
        assert_eq!(count(&a), 5);
    }

    #[test]
    fn the_first_differing_decision_of_each_scope_is_named() {
        let a = run(&[("web1", "s1"), ("web1", "s2"), ("web2", "s1")]);
        let mut b = run(&[("web1", "s1"), ("web1", "s2")]);
        b[3].decision = Some("block".into());
        let d = compare(&a, &b);
        assert_eq!(
            d,
            vec![
                Difference {
                    scope: "web1".into(),
                    index: 2,
                    a: Some("step_dispatched p/s2: allow (R010)".into()),
                    b: Some("step_dispatched p/s2: block (R010)".into()),
                },
                Difference {
                    scope: "web2".into(),
                    index: 1,
                    a: Some("step_dispatched p/s1: allow (R010)".into()),
                    b: None,
                },
            ]
        );
    }

    #[test]
    fn lines_without_a_decision_and_run_specific_inputs_do_not_count() {
        let a = run(&[("web1", "s1")]);
        let mut b = run(&[("web1", "s1")]);
        for l in &mut b {
            l.inputs.insert("fingerprint".into(), "other".into());
            l.at_ms += 5_000;
        }
        b.push(line(7, Some("web1"), "host_state_changed", None, None));
        assert!(compare(&a, &b).is_empty());
    }
}
