//! The plan: a step graph with an operation hash.
//!
//! Building happens in two steps because policy needs to know what would run before it can
//! decide the mode, and the hash needs the mode:
//!
//! 1. [`Draft::new`] resolves the targets and keeps, per phase and step, the hosts whose role
//!    the step lists (phases in order; hosts in parallel within a phase). Steps that apply to
//!    no target and phases left empty are dropped.
//! 2. [`Draft::seal`] takes the effective mode, the probed facts and the policy decision and
//!    produces the [`Plan`], with a barrier before every destructive phase and its
//!    `operation_hash`.
//!
//! # `operation_hash`
//!
//! Lowercase hex SHA-256 of this [`super::canon`] encoding (domain `tollgate/operation/v2`; v1 did not bind the
//! state dir or the SSH settings):
//!
//! 1. action (text), effective mode (text);
//! 2. host count, then per host **sorted by name**: name, role, safety class, transport (kind,
//!    then its fields in declaration order, options as `0`/`1`+value, numbers as text), the
//!    probed fingerprint. For PowerShell remoting that is target, port, configuration name,
//!    credential ref, user, key file (resolved), state dir, then the SSH settings *in force*
//!    (the host's over `[psremoting]`'s, laid by `Inventory::with_ssh_defaults`): known_hosts
//!    (resolved), subsystem, the `ssh_options` count and each name and value in name order,
//!    connect timeout ms, keep-alive ms. A changed known_hosts file, `ProxyJump` or state dir
//!    therefore changes the hash, and a token approved before it no longer applies. Session
//!    timings (`open_timeout`, `request_timeout`, back-off) change how long Tollgate waits,
//!    not where it acts, and are not bound;
//! 3. phase count, then per phase in order: name, destructive (bool), step count, then per step
//!    in order: id, shell, the script bytes, check (option), destructive, timeout ms, retries,
//!    errors (`stop` or `continue`), participating hosts (sorted list);
//! 4. the policy hash (text).
//!
//! The run id is *not* part of it (tokens bind the run separately), so two runs of the same
//! operation on the same fleet state have the same hash, which `runs diff` can compare.
//!
//! # Idempotency keys
//!
//! `ik1-<hex SHA-256 of (domain tollgate/idempotency/v1, run id bytes, host, step id,
//! operation hash)>-<attempt>`. The prefix is stable per (run, host, step); the attempt suffix
//! (1, 2, ...) changes only for a retry after a *definite* transient failure, because an agent
//! answers a repeated key with its first result. A step whose outcome was lost is queried and
//! re-sent with the *same* key.

use std::collections::{BTreeMap, BTreeSet};

use tollgate_protocol::outcome::{PlanStepView, PlanView};
use tollgate_protocol::{Action, Mode, Shell, StepErrors};
use uuid::Uuid;

use super::canon::Encoder;
use super::facts::HostFacts;
use super::policy::PolicyDecision;
use crate::config::{Host, Inventory, Operations, PsTarget, SafetyClass, Transport};

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// Chosen by the client.
    pub run_id: Uuid,
    /// Deploy or teardown.
    pub action: Action,
    /// Quick or full.
    pub requested_mode: Mode,
    /// Host names; empty means every host of the inventory.
    pub targets: Vec<String>,
    /// Decision-only: probe, decide and record, execute nothing. Fixed at the run's birth.
    pub shadow: bool,
}

/// Why a plan could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A `run_file` step was never resolved to text.
    #[error(
        "step {step_id}: run_file {path:?} was not read (load operations with load_operations)"
    )]
    UnresolvedScript {
        /// The step.
        step_id: String,
        /// Its file.
        path: String,
    },
    /// A quick plan would contain a destructive step.
    #[error("step {step_id} is destructive and the plan is quick")]
    DestructiveInQuick {
        /// The step.
        step_id: String,
    },
    /// A host has no usable facts (no probe, or no valid fingerprint).
    #[error("host {host} has no valid probed fingerprint")]
    MissingFacts {
        /// The host.
        host: String,
    },
    /// A target is not in the inventory.
    #[error("host {host} is not in the inventory")]
    UnknownHost {
        /// The host.
        host: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DraftStep {
    id: String,
    shell: Shell,
    script: String,
    check: Option<String>,
    destructive: bool,
    timeout_ms: u64,
    retries: u32,
    errors: StepErrors,
    hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DraftPhase {
    name: String,
    steps: Vec<DraftStep>,
}

/// The steps an intent would run, before the mode and facts are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    run_id: Uuid,
    action: Action,
    hosts: Vec<Host>,
    unknown: Vec<String>,
    phases: Vec<DraftPhase>,
}

impl Draft {
    /// Resolves targets and selects steps. Unknown targets are kept aside (policy blocks them).
    pub fn new(
        intent: &Intent,
        inventory: &Inventory,
        ops: &Operations,
    ) -> Result<Draft, PlanError> {
        let mut hosts: Vec<Host> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        if intent.targets.is_empty() {
            hosts = inventory.hosts().to_vec();
        } else {
            let wanted: BTreeSet<&str> = intent.targets.iter().map(String::as_str).collect();
            for name in wanted {
                match inventory.host(name) {
                    Some(h) => hosts.push(h.clone()),
                    None => unknown.push(name.to_owned()),
                }
            }
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let mut phases = Vec::new();
        for phase in &ops.action(intent.action).phases {
            let mut steps = Vec::new();
            for step in &phase.steps {
                let script = step.run.body().ok_or_else(|| PlanError::UnresolvedScript {
                    step_id: step.id.clone(),
                    path: match &step.run {
                        crate::config::ScriptSource::File { path, .. } => path.clone(),
                        crate::config::ScriptSource::Inline(_) => String::new(),
                    },
                })?;
                let on: Vec<String> = hosts
                    .iter()
                    .filter(|h| step.roles.contains(&h.role))
                    .map(|h| h.name.clone())
                    .collect();
                if on.is_empty() {
                    continue;
                }
                steps.push(DraftStep {
                    id: step.id.clone(),
                    shell: step.shell,
                    script: script.to_owned(),
                    check: step.check.clone(),
                    destructive: step.destructive,
                    timeout_ms: step.timeout_ms,
                    retries: step.retries,
                    errors: step.errors,
                    hosts: on,
                });
            }
            if !steps.is_empty() {
                phases.push(DraftPhase {
                    name: phase.name.clone(),
                    steps,
                });
            }
        }
        Ok(Draft {
            run_id: intent.run_id,
            action: intent.action,
            hosts,
            unknown,
            phases,
        })
    }

    /// Target hosts found in the inventory, sorted by name.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Target names not in the inventory.
    pub fn unknown_targets(&self) -> &[String] {
        &self.unknown
    }

    /// (steps, destructive steps) that would run on `host`.
    pub fn step_counts(&self, host: &str) -> (usize, usize) {
        let mut steps = 0;
        let mut destructive = 0;
        for s in self.phases.iter().flat_map(|p| &p.steps) {
            if s.hosts.iter().any(|h| h == host) {
                steps += 1;
                destructive += usize::from(s.destructive);
            }
        }
        (steps, destructive)
    }

    /// Whether any selected step is destructive.
    pub fn is_destructive(&self) -> bool {
        self.phases
            .iter()
            .flat_map(|p| &p.steps)
            .any(|s| s.destructive)
    }

    /// Fixes the plan for `effective_mode` with the probed `facts` and policy's `decision`.
    pub fn seal(
        &self,
        effective_mode: Mode,
        facts: &BTreeMap<String, HostFacts>,
        decision: &PolicyDecision,
        policy_hash: &str,
    ) -> Result<Plan, PlanError> {
        if let Some(host) = self.unknown.first() {
            return Err(PlanError::UnknownHost { host: host.clone() });
        }
        if effective_mode == Mode::Quick
            && let Some(s) = self
                .phases
                .iter()
                .flat_map(|p| &p.steps)
                .find(|s| s.destructive)
        {
            return Err(PlanError::DestructiveInQuick {
                step_id: s.id.clone(),
            });
        }
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for h in &self.hosts {
            let f = facts
                .get(&h.name)
                .filter(|f| f.has_valid_fingerprint())
                .ok_or_else(|| PlanError::MissingFacts {
                    host: h.name.clone(),
                })?;
            hosts.push(PlannedHost {
                host: h.clone(),
                fingerprint: f.fingerprint.clone(),
            });
        }
        let phases: Vec<PlannedPhase> = self
            .phases
            .iter()
            .map(|p| {
                let destructive = p.steps.iter().any(|s| s.destructive);
                PlannedPhase {
                    name: p.name.clone(),
                    destructive,
                    barrier_before: destructive,
                    steps: p
                        .steps
                        .iter()
                        .map(|s| PlannedStep {
                            id: s.id.clone(),
                            shell: s.shell,
                            script: s.script.clone(),
                            check: s.check.clone(),
                            destructive: s.destructive,
                            timeout_ms: s.timeout_ms,
                            retries: s.retries,
                            errors: s.errors,
                            hosts: s.hosts.clone(),
                        })
                        .collect(),
                }
            })
            .collect();
        let operation_hash =
            operation_hash(self.action, effective_mode, &hosts, &phases, policy_hash);
        Ok(Plan {
            run_id: self.run_id,
            action: self.action,
            effective_mode,
            hosts,
            phases,
            policy_hash: policy_hash.to_owned(),
            approvals_required: decision.approvals_required,
            token_lifetime_ms: decision.token_lifetime_ms,
            self_approval: decision.self_approval,
            operation_hash,
        })
    }
}

/// A target host with the fingerprint the plan was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedHost {
    /// Its inventory entry.
    pub host: Host,
    /// Its probed fingerprint.
    pub fingerprint: String,
}

/// One step and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// Step id.
    pub id: String,
    /// Interpreter.
    pub shell: Shell,
    /// Script text.
    pub script: String,
    /// Optional check script.
    pub check: Option<String>,
    /// Destructive?
    pub destructive: bool,
    /// Per-attempt timeout.
    pub timeout_ms: u64,
    /// Transient retries.
    pub retries: u32,
    /// What the step's PowerShell errors mean (`errors`).
    pub errors: StepErrors,
    /// Hosts it runs on, sorted.
    pub hosts: Vec<String>,
}

/// One phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPhase {
    /// Phase name.
    pub name: String,
    /// Whether any step is destructive.
    pub destructive: bool,
    /// Whether a barrier (containment, re-probe, policy, token) precedes it: exactly when it
    /// is destructive.
    pub barrier_before: bool,
    /// Steps in order.
    pub steps: Vec<PlannedStep>,
}

/// A sealed plan. Immutable: its hash covers everything that runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    run_id: Uuid,
    action: Action,
    effective_mode: Mode,
    hosts: Vec<PlannedHost>,
    phases: Vec<PlannedPhase>,
    policy_hash: String,
    approvals_required: u8,
    token_lifetime_ms: u64,
    self_approval: bool,
    operation_hash: String,
}

impl Plan {
    /// The run.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The mode it runs in.
    pub fn effective_mode(&self) -> Mode {
        self.effective_mode
    }

    /// Target hosts, sorted by name.
    pub fn hosts(&self) -> &[PlannedHost] {
        &self.hosts
    }

    /// Target host names, sorted.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.host.name.clone()).collect()
    }

    /// The planned host `name`.
    pub fn host(&self, name: &str) -> Option<&PlannedHost> {
        self.hosts.iter().find(|h| h.host.name == name)
    }

    /// The fingerprint `host` had when planned.
    pub fn fingerprint(&self, host: &str) -> Option<&str> {
        self.host(host).map(|h| h.fingerprint.as_str())
    }

    /// Phases in order.
    pub fn phases(&self) -> &[PlannedPhase] {
        &self.phases
    }

    /// Hosts taking part in phase `index`.
    pub fn phase_hosts(&self, index: usize) -> BTreeSet<&str> {
        self.phases
            .get(index)
            .map(|p| {
                p.steps
                    .iter()
                    .flat_map(|s| s.hosts.iter().map(String::as_str))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether any phase is destructive.
    pub fn is_destructive(&self) -> bool {
        self.phases.iter().any(|p| p.destructive)
    }

    /// The policy hash it was built under.
    pub fn policy_hash(&self) -> &str {
        &self.policy_hash
    }

    /// Its operation hash.
    pub fn operation_hash(&self) -> &str {
        &self.operation_hash
    }

    /// Distinct approvers a token needs.
    pub fn approvals_required(&self) -> u8 {
        self.approvals_required
    }

    /// Whether the requester may be one of the approvers.
    pub fn self_approval(&self) -> bool {
        self.self_approval
    }

    /// Lifetime a token for it may have.
    pub fn token_lifetime_ms(&self) -> u64 {
        self.token_lifetime_ms
    }

    /// Safety classes of its hosts.
    pub fn classes(&self) -> impl Iterator<Item = SafetyClass> + '_ {
        self.hosts.iter().map(|h| h.host.safety_class)
    }

    /// The idempotency key of `attempt` (from 1) of `step_id` on `host`.
    pub fn idempotency_key(&self, host: &str, step_id: &str, attempt: u32) -> String {
        let mut e = Encoder::new("tollgate/idempotency/v1");
        e.bytes(self.run_id.as_bytes())
            .str(host)
            .str(step_id)
            .str(&self.operation_hash);
        format!("ik1-{}-{attempt}", e.sha256_hex())
    }

    /// The operator's view.
    pub fn view(&self) -> PlanView {
        PlanView {
            operation_hash: self.operation_hash.clone(),
            hosts: self.host_names(),
            steps: self
                .phases
                .iter()
                .flat_map(|p| {
                    p.steps.iter().map(|s| PlanStepView {
                        phase: p.name.clone(),
                        step_id: s.id.clone(),
                        hosts: s.hosts.clone(),
                        destructive: s.destructive,
                        barrier_before: p.barrier_before,
                        errors: s.errors,
                    })
                })
                .collect(),
            approvals_required: self.approvals_required,
            self_approval: self.self_approval,
        }
    }
}

fn operation_hash(
    action: Action,
    mode: Mode,
    hosts: &[PlannedHost],
    phases: &[PlannedPhase],
    policy_hash: &str,
) -> String {
    let mut e = Encoder::new("tollgate/operation/v2");
    e.str(action.as_str()).str(mode.as_str());
    let mut sorted: Vec<&PlannedHost> = hosts.iter().collect();
    sorted.sort_by(|a, b| a.host.name.cmp(&b.host.name));
    e.u64(sorted.len() as u64);
    for h in sorted {
        encode_host(&mut e, &h.host);
        e.str(&h.fingerprint);
    }
    e.u64(phases.len() as u64);
    for p in phases {
        e.str(&p.name).bool(p.destructive).u64(p.steps.len() as u64);
        for s in &p.steps {
            let mut on: Vec<&str> = s.hosts.iter().map(String::as_str).collect();
            on.sort_unstable();
            e.str(&s.id)
                .str(s.shell.as_str())
                .bytes(s.script.as_bytes())
                .opt_str(s.check.as_deref())
                .bool(s.destructive)
                .u64(s.timeout_ms)
                .u64(u64::from(s.retries))
                .str(s.errors.as_str())
                .strs(on.into_iter());
        }
    }
    e.str(policy_hash);
    e.sha256_hex()
}

fn encode_host(e: &mut Encoder, h: &Host) {
    e.str(&h.name).str(&h.role).str(h.safety_class.as_str());
    e.str(h.transport.kind());
    match &h.transport {
        Transport::Agent(a) => {
            e.str(&a.address).str(&a.identity);
        }
        Transport::PsRemoting(p) => {
            match &p.target {
                PsTarget::ComputerName(n) => e.str("computer_name").str(n),
                PsTarget::HostName(n) => e.str("host_name").str(n),
            };
            e.opt_str(p.port.map(|x| x.to_string()).as_deref())
                .opt_str(p.configuration_name.as_deref())
                .opt_str(p.credential_ref.as_deref())
                .opt_str(p.user.as_deref())
                .opt_str(p.key_file.as_ref().map(|k| k.to_string_lossy()).as_deref())
                .opt_str(p.state_dir.as_deref());
            let ssh = &p.ssh;
            e.opt_str(
                ssh.known_hosts
                    .as_ref()
                    .map(|k| k.to_string_lossy())
                    .as_deref(),
            )
            .opt_str(ssh.subsystem.as_deref())
            .u64(ssh.ssh_options.len() as u64);
            for (name, value) in &ssh.ssh_options {
                e.str(name).str(value);
            }
            e.opt_str(ssh.connect_timeout_ms.map(|ms| ms.to_string()).as_deref())
                .opt_str(ssh.keepalive_ms.map(|ms| ms.to_string()).as_deref());
        }
        Transport::Local => {}
    }
}
