//! Invariants, checked the same way on the namespace fleet and on the loopback lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::evidence::{journal_facts, validate_summaries_in};
use crate::lab::CliOut;
use crate::operations::DESTRUCTIVE;
use crate::results::Row;

/// What the invariant checks need from a fleet.
pub trait Fleet {
    /// `tollgate ARGS --json` as `who`.
    fn run_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> impl std::future::Future<Output = anyhow::Result<CliOut>> + Send;
    fn runs_directory(&self) -> PathBuf;
    /// Host name -> home (markers, gates, facts).
    fn homes(&self) -> BTreeMap<String, PathBuf>;
}

/// Full teardown of `hosts` on `fleet` up to a token: erin asks, alice approves (and bob when two
/// are needed); the requester never approves her own run. Returns (run id, token, operation hash).
pub async fn approved_teardown<F: Fleet>(
    fleet: &F,
    hosts: &str,
) -> anyhow::Result<(String, String, String)> {
    use anyhow::Context as _;
    let run = uuid::Uuid::new_v4().to_string();
    let out = fleet
        .run_cli(
            "erin",
            &[
                "teardown", "--mode", "full", "--hosts", hosts, "--run", &run,
            ],
        )
        .await?;
    anyhow::ensure!(
        out.outcome() == "ConfirmationRequired",
        "expected ConfirmationRequired: {out:?}"
    );
    let hash = out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
        .as_str()
        .context("operation hash")?
        .to_string();
    for who in ["alice", "bob"] {
        let a = fleet
            .run_cli(who, &["approve", &run, "--operation-hash", &hash])
            .await?;
        if let Some(t) = a.json()["token"].as_str() {
            return Ok((run, t.to_string(), hash));
        }
        anyhow::ensure!(
            a.code == 12,
            "approval by {who} neither issued nor recorded: {a:?}"
        );
    }
    anyhow::bail!("no token issued for {run}")
}

impl Fleet for crate::lab::Lab {
    fn run_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> impl std::future::Future<Output = anyhow::Result<CliOut>> + Send {
        self.cli(who, args)
    }

    fn runs_directory(&self) -> PathBuf {
        self.runs_dir()
    }

    fn homes(&self) -> BTreeMap<String, PathBuf> {
        self.agents
            .keys()
            .map(|n| (n.clone(), self.home(n)))
            .collect()
    }
}

/// Outcomes a run may end in (SPEC §3, "Typed outcomes").
pub const TYPED_OUTCOMES: &[&str] = &[
    "PolicyBlocked",
    "EscalationRequired",
    "PreflightFailed",
    "TransportUnreachable",
    "CapabilityMismatch",
    "ExecutionFailed",
    "PartialSuccess",
    "Completed",
];

/// True if a CLI answer about a run carries a typed outcome with its documented exit code.
pub fn is_typed(out: &CliOut) -> bool {
    let code_of = |o: &str| match o {
        "Completed" => 0,
        "EscalationRequired" => 10,
        "PolicyBlocked" => 20,
        "PreflightFailed" => 21,
        "TransportUnreachable" => 22,
        "CapabilityMismatch" => 23,
        "ExecutionFailed" => 24,
        "PartialSuccess" => 25,
        _ => -1,
    };
    let o = out.outcome();
    TYPED_OUTCOMES.contains(&o.as_str()) && code_of(&o) == out.code
}

/// Per-scenario evidence, summed over repetitions; the table row is made from it.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub repetitions: usize,
    /// Runs whose execution was judged (typed outcome, or closed typed after a crash).
    pub runs: usize,
    pub typed: usize,
    /// Destructive steps that began on a host whose fresh re-probe failed or whose token was not
    /// valid, or without their grounds in the journal. Must be 0.
    pub destructive_violations: Vec<String>,
    /// (run, host, step) executions that began more than once. Must be 0.
    pub twice: Vec<String>,
    pub verified_ok: usize,
    pub verified: usize,
    pub tampered: usize,
    pub tampered_detected: usize,
    /// Free-form notes (outcome mix, mechanism used).
    pub notes: BTreeMap<String, usize>,
    pub problems: Vec<String>,
}

impl Tally {
    pub fn note(&mut self, what: impl Into<String>) {
        *self.notes.entry(what.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Tally) {
        self.repetitions += other.repetitions;
        self.runs += other.runs;
        self.typed += other.typed;
        self.destructive_violations
            .extend(other.destructive_violations);
        self.twice.extend(other.twice);
        self.verified_ok += other.verified_ok;
        self.verified += other.verified;
        self.tampered += other.tampered;
        self.tampered_detected += other.tampered_detected;
        for (k, v) in other.notes {
            *self.notes.entry(k).or_default() += v;
        }
        self.problems.extend(other.problems);
    }

    pub fn passed(&self) -> bool {
        self.destructive_violations.is_empty()
            && self.twice.is_empty()
            && self.problems.is_empty()
            && self.typed == self.runs
            && self.verified_ok == self.verified
            && self.tampered_detected == self.tampered
    }

    /// The "result" cell of the table.
    pub fn summary(&self) -> String {
        let runs = if self.runs > 0 {
            format!("{}/{} runs typed; ", self.typed, self.runs)
        } else {
            String::new()
        };
        let mut s = format!(
            "{}: {runs}destructive without fresh re-probe or valid token: {}; step twice: {}; `runs verify` ok on {}/{} untampered",
            if self.passed() { "pass" } else { "FAIL" },
            self.destructive_violations.len(),
            self.twice.len(),
            self.verified_ok,
            self.verified,
        );
        if self.tampered > 0 {
            s.push_str(&format!(
                ", fails on {}/{} tampered",
                self.tampered_detected, self.tampered
            ));
        }
        if !self.notes.is_empty() {
            let notes: Vec<String> = self
                .notes
                .iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect();
            s.push_str(&format!(" ({})", notes.join(", ")));
        }
        if let Some(p) = self.problems.first() {
            s.push_str(&format!("; first problem: {p}"));
        }
        s
    }

    /// Writes the table row, then fails (with everything that went wrong) unless it passed.
    pub fn finish(self, scenario: &str, faults: &str, seed: u64) -> anyhow::Result<()> {
        Row {
            scenario: scenario.to_string(),
            repetitions: self.repetitions,
            faults: faults.to_string(),
            result: self.summary(),
            seed,
        }
        .write()?;
        eprintln!("{scenario}: {}", self.summary());
        anyhow::ensure!(
            self.passed(),
            "{scenario} (seed {seed}) failed: {}\nviolations: {:?}\ntwice: {:?}\nproblems: {:?}",
            self.summary(),
            self.destructive_violations,
            self.twice,
            self.problems
        );
        Ok(())
    }
}

/// Checks one run after it settled. `began` is what began on each (host, step) during it (marker
/// deltas); `refused` lists hosts on which nothing destructive may have begun (fresh re-probe
/// failed, token invalid, ...). Every check that fails is added to `tally`.
pub fn check_run(
    tally: &mut Tally,
    runs_dir: &Path,
    run: &str,
    began: &BTreeMap<(String, String), usize>,
    refused: &[String],
) {
    for ((host, step), n) in began {
        if *n > 1 {
            tally
                .twice
                .push(format!("{run}: {step} began {n} times on {host}"));
        }
        if step == DESTRUCTIVE && *n > 0 && refused.contains(host) {
            tally.destructive_violations.push(format!(
                "{run}: {step} began on {host}, whose re-probe failed or token was invalid"
            ));
        }
    }
    match journal_facts(runs_dir, run) {
        Err(e) => tally.problems.push(format!("{run}: {e:#}")),
        Ok(facts) => {
            tally.destructive_violations.extend(facts.unjustified);
            // An execution that began without the journal having dispatched it first.
            for ((host, step), n) in began {
                let d = facts
                    .dispatched
                    .get(&(host.clone(), step.clone()))
                    .copied()
                    .unwrap_or(0);
                if *n > d {
                    tally.problems.push(format!(
                        "{run}: {step} began {n} times on {host} but the journal dispatched it {d} times"
                    ));
                }
            }
        }
    }
}

/// After a scenario settled: no run is still `running`, `runs verify` passes on every run, every
/// summary matches the schema. Adds to `tally`; returns the runs listed.
pub async fn check_settled<F: Fleet>(
    fleet: &F,
    tally: &mut Tally,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let list = fleet.run_cli("carol", &["runs", "list"]).await?;
    let runs = list
        .json()
        .as_array()
        .cloned()
        .with_context(|| format!("runs list did not answer a list: {list:?}"))?;
    for r in &runs {
        let id = r["run_id"].as_str().unwrap_or_default();
        if crate::lab::is_working_state(r["state"].as_str().unwrap_or_default()) {
            tally.problems.push(format!(
                "run {id} is still at work ({}) after the scenario settled",
                r["state"]
            ));
        }
        let v = fleet.run_cli("carol", &["runs", "verify", id]).await?;
        tally.verified += 1;
        if v.code == 0 && v.json()["ok"] == true {
            tally.verified_ok += 1;
        } else {
            tally
                .problems
                .push(format!("untampered run {id} does not verify: {v:?}"));
        }
    }
    if let Err(e) = validate_summaries_in(&fleet.runs_directory()) {
        tally.problems.push(format!("{e:#}"));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::evidence::tests::grounded;

    #[test]
    fn a_step_begun_twice_or_undispatched_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        std::fs::write(
            dir.path().join("r/timeline.jsonl"),
            grounded(true, "aa", "allow", "allow").join("\n"),
        )
        .unwrap();
        let mut t = Tally::default();
        let began = BTreeMap::from([
            (("web1".to_string(), "remove".to_string()), 2),
            (("web2".to_string(), "drain".to_string()), 1),
        ]);
        check_run(&mut t, dir.path(), "r", &began, &["web1".to_string()]);
        assert_eq!(t.twice.len(), 1, "{t:?}");
        assert_eq!(t.destructive_violations.len(), 1, "{t:?}");
        assert_eq!(
            t.problems.len(),
            2,
            "began more often than dispatched: {t:?}"
        );
        assert!(!t.passed());
    }
}
