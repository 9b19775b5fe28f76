//! The barrier before a destructive phase: one decision for the whole phase.
//!
//! In order, and the first failure blocks the phase on **all** its hosts:
//!
//! 1. **containment** (`B001`, `ContainmentFailed`): every host of every earlier phase
//!    succeeded (or skipped by check).
//! 2. **fresh matching re-probe** (`B002`, `StalePlan`): every host of the phase has a re-probe
//!    that succeeded, carries a valid fingerprint equal to the plan's, was taken no earlier than
//!    the barrier began, no later than now, and is at most the freshness window old. A missing,
//!    failed, malformed, stale or drifted answer for *any* host blocks the phase.
//! 3. **policy** re-evaluated with the fresh facts at [`Stage::Barrier`] (token included); it
//!    must `Allow`, otherwise its rule and reason block.

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::Mode;
use tollgate_protocol::outcome::ReasonCode;

use super::facts::ProbeOutcome;
use super::lifecycle::HostState;
use super::plan::Plan;
use super::policy::{self, HostInput, PolicyConfig, PolicyInput, Ruling, Stage, TokenEvidence};
use super::rules::{self, RuleId};

/// How a host did in one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPhaseResult {
    /// Every step succeeded or was skipped by its check.
    Succeeded,
    /// A step failed.
    Failed,
    /// A step's outcome could not be established.
    Uncertain,
    /// The host did not run the phase (stopped or blocked).
    NotRun,
}

/// Everything the barrier looks at.
#[derive(Debug, Clone, Copy)]
pub struct BarrierInput<'a> {
    /// The sealed plan.
    pub plan: &'a Plan,
    /// Index of the destructive phase.
    pub phase: usize,
    /// Results of every earlier phase (index = phase), per host.
    pub previous: &'a [BTreeMap<String, HostPhaseResult>],
    /// Re-probe answers per host.
    pub reprobes: &'a BTreeMap<String, ProbeOutcome>,
    /// Lifecycle state per host.
    pub states: &'a BTreeMap<String, HostState>,
    /// When the barrier began (re-probes must not be older).
    pub barrier_started_ms: u64,
    /// Now.
    pub now_ms: u64,
    /// The mode the operator asked for.
    pub requested_mode: Mode,
    /// The token, verified now.
    pub token: TokenEvidence<'a>,
    /// Policy configuration (freshness window included).
    pub config: &'a PolicyConfig,
}

/// The barrier's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BarrierDecision {
    /// The phase may run; policy's ruling computed with the fresh facts.
    Allow {
        /// Policy's ruling.
        ruling: Ruling,
    },
    /// The whole phase is blocked.
    Block {
        /// Why.
        reason: ReasonCode,
        /// The rule.
        rule: RuleId,
        /// One sentence with the facts.
        detail: String,
        /// The hosts at fault (empty when the fault is not a host's).
        hosts: Vec<String>,
    },
}

/// Decides the barrier before `input.phase`.
pub fn evaluate_barrier(input: &BarrierInput<'_>) -> BarrierDecision {
    // 1. containment
    let mut not_ok = BTreeSet::new();
    for p in 0..input.phase {
        let results = input.previous.get(p);
        for host in input.plan.phase_hosts(p) {
            let r = results.and_then(|m| m.get(host));
            if r != Some(&HostPhaseResult::Succeeded) {
                not_ok.insert(host.to_owned());
            }
        }
    }
    if !not_ok.is_empty() {
        let hosts: Vec<String> = not_ok.into_iter().collect();
        return BarrierDecision::Block {
            reason: ReasonCode::ContainmentFailed,
            rule: rules::B001_CONTAINMENT,
            detail: format!("earlier phases did not succeed on {}", hosts.join(", ")),
            hosts,
        };
    }
    let Some(phase) = input.plan.phases().get(input.phase) else {
        return BarrierDecision::Block {
            reason: ReasonCode::StalePlan,
            rule: rules::B002_FRESH_MATCHING_REPROBE,
            detail: format!("the plan has no phase {}", input.phase),
            hosts: Vec::new(),
        };
    };
    // 2. fresh, matching re-probes
    let phase_hosts = input.plan.phase_hosts(input.phase);
    let mut problems = Vec::new();
    let mut at_fault = Vec::new();
    for host in &phase_hosts {
        if let Some(problem) = reprobe_problem(input, host) {
            problems.push(format!("{host}: {problem}"));
            at_fault.push((*host).to_owned());
        }
    }
    if !problems.is_empty() {
        return BarrierDecision::Block {
            reason: ReasonCode::StalePlan,
            rule: rules::B002_FRESH_MATCHING_REPROBE,
            detail: problems.join("; "),
            hosts: at_fault,
        };
    }
    // 3. policy with the fresh facts
    let host_inputs: Vec<HostInput<'_>> = phase_hosts
        .iter()
        .filter_map(|name| {
            let planned = input.plan.host(name)?;
            let steps: Vec<_> = phase
                .steps
                .iter()
                .filter(|s| s.hosts.iter().any(|h| h == name))
                .collect();
            Some(HostInput {
                name,
                safety_class: planned.host.safety_class,
                state: input
                    .states
                    .get(*name)
                    .copied()
                    .unwrap_or(HostState::Unknown),
                facts: input.reprobes.get(*name).and_then(ProbeOutcome::usable),
                steps: steps.len(),
                destructive_steps: steps.iter().filter(|s| s.destructive).count(),
            })
        })
        .collect();
    let decision = policy::evaluate(&PolicyInput {
        stage: Stage::Barrier { phase: input.phase },
        run_id: input.plan.run_id(),
        action: input.plan.action(),
        requested_mode: input.requested_mode,
        // A barrier decides in full mode: it never escalates, so it prints no next command.
        shadow: false,
        unknown_targets: &[],
        hosts: &host_inputs,
        token: input.token,
        config: input.config,
    });
    if decision.run.allows() && host_inputs.len() == phase_hosts.len() {
        BarrierDecision::Allow {
            ruling: decision.run,
        }
    } else {
        let blocked: Vec<String> = decision
            .hosts
            .iter()
            .filter(|(_, r)| !r.allows())
            .map(|(h, _)| h.clone())
            .collect();
        BarrierDecision::Block {
            reason: decision.run.reason().unwrap_or(ReasonCode::StalePlan),
            rule: decision.run.rule,
            detail: decision.run.detail,
            hosts: blocked,
        }
    }
}

fn reprobe_problem(input: &BarrierInput<'_>, host: &str) -> Option<String> {
    let Some(outcome) = input.reprobes.get(host) else {
        return Some("no re-probe answer".into());
    };
    let facts = match outcome {
        ProbeOutcome::Failed(f) => return Some(format!("re-probe failed ({})", f.describe())),
        ProbeOutcome::Reported(f) => f,
    };
    if !facts.has_valid_fingerprint() {
        return Some("re-probe has no valid fingerprint".into());
    }
    let planned = input.plan.fingerprint(host).unwrap_or("");
    if facts.fingerprint != planned {
        return Some(format!(
            "fingerprint drifted (plan {}, now {})",
            short(planned),
            short(&facts.fingerprint)
        ));
    }
    if facts.probed_at_ms < input.barrier_started_ms {
        return Some(format!(
            "re-probe taken at {} is older than the barrier ({})",
            facts.probed_at_ms, input.barrier_started_ms
        ));
    }
    if facts.probed_at_ms > input.now_ms {
        return Some(format!(
            "re-probe time {} is in the future (now {})",
            facts.probed_at_ms, input.now_ms
        ));
    }
    let age = input.now_ms - facts.probed_at_ms;
    if age > input.config.freshness_ms {
        return Some(format!(
            "re-probe is {age} ms old, freshness window is {} ms",
            input.config.freshness_ms
        ));
    }
    None
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}
