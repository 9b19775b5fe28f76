//! Evidence: markers on the hosts, journals on the coordinator, summaries against their schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::operations::{DESTRUCTIVE, STEPS};

/// Lines in a file, 0 if it does not exist: a marker file holds one per execution that reached
/// it. The one marker counter; everything that counts markers calls it.
pub fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Executions of `step` that finished on the host whose home is `home` (`markers/STEP`).
pub fn finished(home: &Path, step: &str) -> usize {
    count_lines(&home.join("markers").join(step))
}

/// Executions of `step` that began on the host whose home is `home` (`markers/STEP.begun`;
/// only the gated operations write these).
pub fn begun(home: &Path, step: &str) -> usize {
    count_lines(&home.join("markers").join(format!("{step}.begun")))
}

/// The published schema of `summary.json`.
pub fn summary_schema() -> anyhow::Result<jsonschema::Validator> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../coordinator/schema/summary.schema.json");
    let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    jsonschema::validator_for(&schema).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Validates every `summary.json` under `runs_dir` against [`summary_schema`]; returns how many
/// were checked.
pub fn validate_summaries_in(runs_dir: &Path) -> anyhow::Result<usize> {
    let validator = summary_schema()?;
    let mut n = 0;
    for entry in std::fs::read_dir(runs_dir)? {
        let path = entry?.path().join("summary.json");
        if !path.exists() {
            continue;
        }
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        anyhow::ensure!(
            errors.is_empty(),
            "{} does not match the schema: {}",
            path.display(),
            errors.join("; ")
        );
        n += 1;
    }
    Ok(n)
}

/// Marker counts of every host, `(host, step) -> (began, finished)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Markers(pub BTreeMap<(String, String), (usize, usize)>);

impl Markers {
    /// Reads the markers of hosts whose homes are given.
    pub fn read(homes: BTreeMap<String, PathBuf>) -> Markers {
        let mut m = BTreeMap::new();
        for (host, home) in homes {
            for step in STEPS {
                let (began, done) = (begun(&home, step), finished(&home, step));
                m.insert((host.clone(), step.to_string()), (began, done));
            }
        }
        Markers(m)
    }

    /// Executions that began since `before`, per (host, step).
    pub fn began_since(&self, before: &Markers) -> BTreeMap<(String, String), usize> {
        self.0
            .iter()
            .map(|(k, (b, _))| {
                let was = before.0.get(k).map(|(b, _)| *b).unwrap_or(0);
                (k.clone(), b.saturating_sub(was))
            })
            .collect()
    }
}

/// What a run's journal says was dispatched, and on what grounds.
#[derive(Debug, Clone, Default)]
pub struct JournalFacts {
    /// `step_dispatched` events per (host, step).
    pub dispatched: BTreeMap<(String, String), usize>,
    /// Destructive dispatches that lacked, earlier in the same journal, an allowed token and an
    /// allowing barrier after a fresh probe report of that host. Must stay empty.
    pub unjustified: Vec<String>,
    pub events: usize,
}

/// Reads `runs_dir/RUN/timeline.jsonl` and checks the grounds of every destructive dispatch:
/// a `token_judged` allow, then (after the last `barrier_started`) a successful barrier
/// `probe_reported` for that host, then a `barrier_evaluated` allow whose inputs show that host's
/// fresh fingerprint equal to the planned one, all before the dispatch.
pub fn journal_facts(runs_dir: &Path, run: &str) -> anyhow::Result<JournalFacts> {
    let text = std::fs::read_to_string(runs_dir.join(run).join("timeline.jsonl"))
        .with_context(|| format!("timeline of {run}"))?;
    let mut facts = JournalFacts::default();
    let mut token_ok = false;
    let mut in_barrier = false;
    let mut reprobed: Vec<String> = Vec::new();
    let mut matched: Vec<String> = Vec::new();
    let mut barrier_ok = false;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("timeline of {run}: not JSON: {line}"))?;
        facts.events += 1;
        let kind = v["kind"].as_str().unwrap_or_default();
        let host = v["host"].as_str().unwrap_or_default().to_string();
        let decision = v["decision"].as_str().unwrap_or_default();
        match kind {
            "token_judged" => token_ok = decision == "allow",
            "barrier_started" => {
                in_barrier = true;
                barrier_ok = false;
                reprobed.clear();
                matched.clear();
            }
            "probe_reported"
                if in_barrier
                    && v["inputs"]["purpose"] == "barrier"
                    && v["inputs"]["fingerprint"].is_string() =>
            {
                reprobed.push(host);
            }
            "barrier_evaluated" => {
                in_barrier = false;
                barrier_ok = decision == "allow";
                if let Some(inputs) = v["inputs"].as_object() {
                    for (k, seen) in inputs {
                        let (Some(h), Some(seen)) = (k.strip_prefix("host."), seen.as_str()) else {
                            continue;
                        };
                        let field = |name: &str| {
                            seen.split_whitespace()
                                .find_map(|w| w.strip_prefix(name))
                                .map(str::to_string)
                        };
                        if let (Some(fresh), Some(planned)) =
                            (field("fingerprint="), field("planned="))
                            && !fresh.is_empty()
                            && fresh == planned
                        {
                            matched.push(h.to_string());
                        }
                    }
                }
            }
            "step_dispatched" => {
                let step = v["step"].as_str().unwrap_or_default().to_string();
                *facts
                    .dispatched
                    .entry((host.clone(), step.clone()))
                    .or_default() += 1;
                let grounded =
                    token_ok && barrier_ok && reprobed.contains(&host) && matched.contains(&host);
                if step == DESTRUCTIVE && !grounded {
                    facts.unjustified.push(format!(
                        "{run}: {step} dispatched on {host} (token allowed: {token_ok}, barrier allowed: {barrier_ok}, re-probed: {}, fingerprint matched: {})",
                        reprobed.contains(&host),
                        matched.contains(&host)
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    pub(crate) fn line(kind: &str, host: &str, step: &str, decision: &str, inputs: &str) -> String {
        format!(
            r#"{{"kind":"{kind}","host":{},"step":{},"decision":{},"inputs":{{{inputs}}}}}"#,
            if host.is_empty() {
                "null".into()
            } else {
                format!("\"{host}\"")
            },
            if step.is_empty() {
                "null".into()
            } else {
                format!("\"{step}\"")
            },
            if decision.is_empty() {
                "null".into()
            } else {
                format!("\"{decision}\"")
            },
        )
    }

    fn facts(lines: &[String]) -> JournalFacts {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        std::fs::write(dir.path().join("r/timeline.jsonl"), lines.join("\n")).unwrap();
        journal_facts(dir.path(), "r").unwrap()
    }

    pub(crate) fn grounded(probe: bool, seen: &str, token: &str, barrier: &str) -> Vec<String> {
        let mut v = vec![
            line("token_judged", "", "", token, ""),
            line("barrier_started", "", "", "", ""),
        ];
        if probe {
            v.push(line(
                "probe_reported",
                "web1",
                "",
                "",
                r#""purpose":"barrier","fingerprint":"aa""#,
            ));
        }
        v.push(line(
            "barrier_evaluated",
            "",
            "",
            barrier,
            &format!(r#""host.web1":"fingerprint={seen} planned=aa probed_at_ms=1""#),
        ));
        v.push(line("step_dispatched", "web1", "remove", "allow", ""));
        v
    }

    #[test]
    fn a_destructive_dispatch_needs_token_reprobe_match_and_barrier() {
        assert!(
            facts(&grounded(true, "aa", "allow", "allow"))
                .unjustified
                .is_empty()
        );
        for bad in [
            grounded(false, "aa", "allow", "allow"),
            grounded(true, "bb", "allow", "allow"),
            grounded(true, "aa", "block", "allow"),
            grounded(true, "aa", "allow", "block"),
        ] {
            assert_eq!(facts(&bad).unjustified.len(), 1, "{bad:?}");
        }
        let f = facts(&grounded(true, "aa", "allow", "allow"));
        assert_eq!(f.dispatched[&("web1".into(), "remove".into())], 1);
    }
}
