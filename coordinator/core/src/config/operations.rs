//! `operations.toml`: the `deploy` and `teardown` actions as ordered phases of steps, and the
//! per-role probe scripts.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use tollgate_protocol::{Action, Shell, StepErrors};

use super::ConfigError;
use super::inventory::Inventory;
use super::locate::{key_segment, parse_toml};
use super::values::{DNS_LABEL_RULE, duration_in, is_dns_label};

/// A step's timeout when `timeout` is not given: 5 minutes.
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 300_000;
/// The longest timeout a step may ask for: 24 hours.
pub const MAX_STEP_TIMEOUT_MS: u64 = 86_400_000;
/// The most transient-failure retries a step may ask for.
pub const MAX_STEP_RETRIES: u32 = 10;

/// Where a script's text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptSource {
    /// `run = "..."`: the text itself.
    Inline(String),
    /// `run_file = "path"`, relative to the operations file. `body` is filled by
    /// [`Operations::resolve_run_files`] (which [`load_operations`] calls).
    File {
        /// The path as written.
        path: String,
        /// The file's text once resolved.
        body: Option<String>,
    },
}

impl ScriptSource {
    /// The script text, if known (always for `Inline`, after resolution for `File`).
    pub fn body(&self) -> Option<&str> {
        match self {
            ScriptSource::Inline(s) => Some(s),
            ScriptSource::File { body, .. } => body.as_deref(),
        }
    }
}

/// One step of a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Unique within its action.
    pub id: String,
    /// Hosts whose role is listed here run the step.
    pub roles: Vec<String>,
    /// Interpreter for `run` and `check`.
    pub shell: Shell,
    /// The script.
    pub run: ScriptSource,
    /// Whether the step destroys something. Always said explicitly in the file.
    pub destructive: bool,
    /// How long one attempt may take.
    pub timeout_ms: u64,
    /// Retries after transient failures (never after a permanent one).
    pub retries: u32,
    /// DSC-style test: exit 0 means already in the desired state, so the step is skipped.
    pub check: Option<String>,
    /// What the step's PowerShell errors mean, for `run` and `check` alike (`errors`; default
    /// `stop`: an error record or a terminating error fails it). `stop` for every `sh` step.
    pub errors: StepErrors,
}

/// An ordered group of steps; hosts run it in parallel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// Unique within its action.
    pub name: String,
    /// Steps in order (never empty).
    pub steps: Vec<Step>,
}

impl Phase {
    /// A phase is destructive if any of its steps is.
    pub fn is_destructive(&self) -> bool {
        self.steps.iter().any(|s| s.destructive)
    }
}

/// One action: its phases in order (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSpec {
    /// Phases in order.
    pub phases: Vec<Phase>,
}

/// A per-role probe script; its stdout (a JSON object) joins the host's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeScript {
    /// Interpreter.
    pub shell: Shell,
    /// Script text.
    pub run: String,
}

/// A validated operations file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operations {
    source: String,
    deploy: ActionSpec,
    teardown: ActionSpec,
    probes: BTreeMap<String, ProbeScript>,
}

impl Operations {
    /// Validates hand-built actions (the same rules as the file). `source` names them in errors.
    pub fn new(
        source: &str,
        deploy: ActionSpec,
        teardown: ActionSpec,
        probes: BTreeMap<String, ProbeScript>,
    ) -> Result<Self, ConfigError> {
        validate_action(source, Action::Deploy, &deploy)?;
        validate_action(source, Action::Teardown, &teardown)?;
        for role in probes.keys() {
            if !is_dns_label(role) {
                return Err(ConfigError::invalid(
                    source,
                    format!("probes.{}", key_segment(role)),
                    format!("role {role:?} {DNS_LABEL_RULE}"),
                ));
            }
        }
        Ok(Operations {
            source: source.to_owned(),
            deploy,
            teardown,
            probes,
        })
    }

    /// The file (or label) these operations came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The phases of `action`.
    pub fn action(&self, action: Action) -> &ActionSpec {
        match action {
            Action::Deploy => &self.deploy,
            Action::Teardown => &self.teardown,
        }
    }

    /// Probe scripts by role.
    pub fn probes(&self) -> &BTreeMap<String, ProbeScript> {
        &self.probes
    }

    /// The probe script for `role`, if any.
    pub fn probe_for(&self, role: &str) -> Option<&ProbeScript> {
        self.probes.get(role)
    }

    /// Fills the body of every `run_file` step with `read(path)`. `read` gets the path as written
    /// and resolves it (the loader resolves relative to the operations file). An error names
    /// the step's `run_file` key.
    pub fn resolve_run_files(
        &mut self,
        mut read: impl FnMut(&str) -> Result<String, String>,
    ) -> Result<(), ConfigError> {
        for action in [Action::Deploy, Action::Teardown] {
            let spec = match action {
                Action::Deploy => &mut self.deploy,
                Action::Teardown => &mut self.teardown,
            };
            for (p, phase) in spec.phases.iter_mut().enumerate() {
                for (s, step) in phase.steps.iter_mut().enumerate() {
                    if let ScriptSource::File { path, body } = &mut step.run {
                        let text = read(path).map_err(|reason| {
                            ConfigError::invalid(
                                &self.source,
                                format!("{action}.phases[{p}].steps[{s}].run_file"),
                                format!("cannot read {path:?}: {reason}"),
                            )
                        })?;
                        *body = Some(text);
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperations {
    deploy: RawAction,
    teardown: RawAction,
    #[serde(default)]
    probes: BTreeMap<String, RawProbe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    #[serde(default)]
    phases: Vec<RawPhase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhase {
    name: String,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: String,
    roles: Vec<String>,
    shell: Option<Shell>,
    run: Option<String>,
    run_file: Option<String>,
    destructive: Option<bool>,
    timeout: Option<toml::Value>,
    retries: Option<u32>,
    check: Option<String>,
    errors: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    shell: Option<Shell>,
    run: String,
}

/// Parses and validates `operations.toml` text; `file` names it in errors. `run_file` steps are
/// left unresolved (see [`Operations::resolve_run_files`]).
pub fn parse_operations(text: &str, file: &str) -> Result<Operations, ConfigError> {
    let raw: RawOperations = parse_toml(text, file)?;
    let deploy = convert_action(file, Action::Deploy, raw.deploy)?;
    let teardown = convert_action(file, Action::Teardown, raw.teardown)?;
    let mut probes = BTreeMap::new();
    for (role, p) in raw.probes {
        if p.run.trim().is_empty() {
            return Err(ConfigError::invalid(
                file,
                format!("probes.{}.run", key_segment(&role)),
                "must not be empty",
            ));
        }
        probes.insert(
            role,
            ProbeScript {
                shell: p.shell.unwrap_or(Shell::Pwsh),
                run: p.run,
            },
        );
    }
    Operations::new(file, deploy, teardown, probes)
}

/// Checks operations against an inventory: every role a step or probe names must be a role
/// some host has.
pub fn validate_operations(ops: &Operations, inventory: &Inventory) -> Result<(), ConfigError> {
    let roles = inventory.roles();
    let known = || roles.iter().copied().collect::<Vec<_>>().join(", ");
    for action in [Action::Deploy, Action::Teardown] {
        for (p, phase) in ops.action(action).phases.iter().enumerate() {
            for (s, step) in phase.steps.iter().enumerate() {
                for (r, role) in step.roles.iter().enumerate() {
                    if !roles.contains(role.as_str()) {
                        return Err(ConfigError::invalid(
                            ops.source(),
                            format!("{action}.phases[{p}].steps[{s}].roles[{r}]"),
                            format!(
                                "role {role:?} is not the role of any host in {} (roles: {})",
                                inventory.source(),
                                known()
                            ),
                        ));
                    }
                }
            }
        }
    }
    for role in ops.probes().keys() {
        if !roles.contains(role.as_str()) {
            return Err(ConfigError::invalid(
                ops.source(),
                format!("probes.{}", key_segment(role)),
                format!(
                    "role {role:?} is not the role of any host in {} (roles: {})",
                    inventory.source(),
                    known()
                ),
            ));
        }
    }
    Ok(())
}

fn convert_action(file: &str, action: Action, raw: RawAction) -> Result<ActionSpec, ConfigError> {
    let mut phases = Vec::with_capacity(raw.phases.len());
    for (p, phase) in raw.phases.into_iter().enumerate() {
        let mut steps = Vec::with_capacity(phase.steps.len());
        for (s, step) in phase.steps.into_iter().enumerate() {
            let key = format!("{action}.phases[{p}].steps[{s}]");
            steps.push(convert_step(file, &key, step)?);
        }
        phases.push(Phase {
            name: phase.name,
            steps,
        });
    }
    Ok(ActionSpec { phases })
}

fn convert_step(file: &str, key: &str, raw: RawStep) -> Result<Step, ConfigError> {
    let run = match (raw.run, raw.run_file) {
        (Some(text), None) => ScriptSource::Inline(text),
        (None, Some(path)) => ScriptSource::File { path, body: None },
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.run_file"),
                "give either `run` or `run_file`, not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.run"),
                "missing: give the script as `run` (text) or `run_file` (path)",
            ));
        }
    };
    let Some(destructive) = raw.destructive else {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.destructive"),
            "missing: every step must say `destructive = true` or `destructive = false` (there is no default)",
        ));
    };
    let timeout_ms = match &raw.timeout {
        None => DEFAULT_STEP_TIMEOUT_MS,
        Some(v) => duration_in(v, 1_000, MAX_STEP_TIMEOUT_MS)
            .map_err(|reason| ConfigError::invalid(file, format!("{key}.timeout"), reason))?,
    };
    let retries = raw.retries.unwrap_or(0);
    if retries > MAX_STEP_RETRIES {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.retries"),
            format!("must be at most {MAX_STEP_RETRIES}, got {retries}"),
        ));
    }
    let shell = raw.shell.unwrap_or(Shell::Pwsh);
    let errors = match (raw.errors.as_deref(), shell) {
        (None, _) => StepErrors::Stop,
        (Some(_), Shell::Sh) => {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.errors"),
                "applies to pwsh steps only: an sh step fails by its exit code alone",
            ));
        }
        (Some("stop"), Shell::Pwsh) => StepErrors::Stop,
        (Some("continue"), Shell::Pwsh) => StepErrors::Continue,
        (Some(other), Shell::Pwsh) => {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.errors"),
                format!("must be \"stop\" (the default) or \"continue\", got {other:?}"),
            ));
        }
    };
    Ok(Step {
        id: raw.id,
        roles: raw.roles,
        shell,
        run,
        destructive,
        timeout_ms,
        retries,
        check: raw.check,
        errors,
    })
}

fn validate_action(file: &str, action: Action, spec: &ActionSpec) -> Result<(), ConfigError> {
    if spec.phases.is_empty() {
        return Err(ConfigError::invalid(
            file,
            format!("{action}.phases"),
            "at least one phase is required",
        ));
    }
    let mut phase_names = BTreeMap::new();
    let mut step_ids = BTreeMap::new();
    for (p, phase) in spec.phases.iter().enumerate() {
        let pkey = format!("{action}.phases[{p}]");
        if !is_dns_label(&phase.name) {
            return Err(ConfigError::invalid(
                file,
                format!("{pkey}.name"),
                format!("{:?} {DNS_LABEL_RULE}", phase.name),
            ));
        }
        if let Some(first) = phase_names.insert(phase.name.as_str(), p) {
            return Err(ConfigError::invalid(
                file,
                format!("{pkey}.name"),
                format!(
                    "duplicate phase name {:?} (first at {action}.phases[{first}])",
                    phase.name
                ),
            ));
        }
        if phase.steps.is_empty() {
            return Err(ConfigError::invalid(
                file,
                format!("{pkey}.steps"),
                format!("phase {:?} has no steps", phase.name),
            ));
        }
        for (s, step) in phase.steps.iter().enumerate() {
            let skey = format!("{pkey}.steps[{s}]");
            if !is_dns_label(&step.id) {
                return Err(ConfigError::invalid(
                    file,
                    format!("{skey}.id"),
                    format!("{:?} {DNS_LABEL_RULE}", step.id),
                ));
            }
            if let Some((fp, fs)) = step_ids.insert(step.id.as_str(), (p, s)) {
                return Err(ConfigError::invalid(
                    file,
                    format!("{skey}.id"),
                    format!(
                        "duplicate step id {:?} (first at {action}.phases[{fp}].steps[{fs}])",
                        step.id
                    ),
                ));
            }
            validate_step(file, &skey, step)?;
        }
    }
    Ok(())
}

fn validate_step(file: &str, key: &str, step: &Step) -> Result<(), ConfigError> {
    if step.roles.is_empty() {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.roles"),
            "at least one role is required",
        ));
    }
    let mut seen = BTreeSet::new();
    for (r, role) in step.roles.iter().enumerate() {
        if !is_dns_label(role) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.roles[{r}]"),
                format!("{role:?} {DNS_LABEL_RULE}"),
            ));
        }
        if !seen.insert(role) {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.roles[{r}]"),
                format!("role {role:?} is listed twice"),
            ));
        }
    }
    match &step.run {
        ScriptSource::Inline(text) if text.trim().is_empty() => {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.run"),
                "must not be empty",
            ));
        }
        ScriptSource::File { path, .. } if path.trim().is_empty() => {
            return Err(ConfigError::invalid(
                file,
                format!("{key}.run_file"),
                "must not be empty",
            ));
        }
        _ => {}
    }
    if step.check.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.check"),
            "must not be empty (leave `check` out instead)",
        ));
    }
    if step.timeout_ms == 0 || step.timeout_ms > MAX_STEP_TIMEOUT_MS {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.timeout"),
            "must be between 1s and 24h",
        ));
    }
    if step.retries > MAX_STEP_RETRIES {
        return Err(ConfigError::invalid(
            file,
            format!("{key}.retries"),
            format!("must be at most {MAX_STEP_RETRIES}"),
        ));
    }
    Ok(())
}
