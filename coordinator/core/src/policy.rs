//! Policy: rules as data, evaluated in order by one function.
//!
//! [`POLICY_RULES`] is the ordered rule table. [`evaluate`] walks it for the whole run (first
//! rule that fires decides) and again for each host on its own, so every answer names its
//! rule. `effective_mode` is computed here: `quick` stays `quick`; `full` with nothing
//! destructive in scope de-escalates to `quick` (rule R005, recorded, no token).
//!
//! Missing or uncertain data never allows: a host that is `Unknown`, has no facts, or has no
//! valid fingerprint makes R002 block before any rule that could allow.

use tollgate_protocol::outcome::ReasonCode;
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

use super::canon::Encoder;
use super::commands::escalation_command;
use super::facts::HostFacts;
use super::lifecycle::HostState;
use super::rules::{self, RuleId};
use super::token::{TokenRejection, VerifiedToken};
use crate::config::{ClassTable, ClassTokenPolicy, CoordinatorConfig, SafetyClass};

/// What a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Every requested target is in the inventory (run level only).
    TargetsInInventory,
    /// Every host is known, with facts and a valid fingerprint.
    CertainData,
    /// At least one step applies.
    SomethingToDo,
    /// Quick mode with a destructive step escalates.
    QuickNeverDestroys,
    /// Full mode with nothing destructive de-escalates (admission only).
    FullWithoutDestructiveDeEscalates,
    /// Full mode with destructive steps and no token waits for one (admission only).
    DestructiveNeedsConfirmation,
    /// A barrier without a token blocks.
    BarrierNeedsToken,
    /// A presented token must have verified.
    TokenMustVerify,
    /// The token has enough distinct approvers for the hosts in scope.
    ApprovalsSufficient,
    /// Nothing objected.
    Allow,
}

impl Check {
    fn as_str(self) -> &'static str {
        match self {
            Check::TargetsInInventory => "targets_in_inventory",
            Check::CertainData => "certain_data",
            Check::SomethingToDo => "something_to_do",
            Check::QuickNeverDestroys => "quick_never_destroys",
            Check::FullWithoutDestructiveDeEscalates => "full_without_destructive_de_escalates",
            Check::DestructiveNeedsConfirmation => "destructive_needs_confirmation",
            Check::BarrierNeedsToken => "barrier_needs_token",
            Check::TokenMustVerify => "token_must_verify",
            Check::ApprovalsSufficient => "approvals_sufficient",
            Check::Allow => "allow",
        }
    }
}

/// One policy rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRule {
    /// Its id.
    pub id: RuleId,
    /// What it checks.
    pub check: Check,
}

/// The policy, in evaluation order.
pub const POLICY_RULES: &[PolicyRule] = &[
    PolicyRule {
        id: rules::R001_TARGETS_IN_INVENTORY,
        check: Check::TargetsInInventory,
    },
    PolicyRule {
        id: rules::R002_UNCERTAIN_DATA_NEVER_ALLOWS,
        check: Check::CertainData,
    },
    PolicyRule {
        id: rules::R003_NOTHING_TO_DO,
        check: Check::SomethingToDo,
    },
    PolicyRule {
        id: rules::R004_QUICK_NEVER_DESTROYS,
        check: Check::QuickNeverDestroys,
    },
    PolicyRule {
        id: rules::R005_FULL_WITHOUT_DESTRUCTIVE_DE_ESCALATES,
        check: Check::FullWithoutDestructiveDeEscalates,
    },
    PolicyRule {
        id: rules::R006_DESTRUCTIVE_NEEDS_CONFIRMATION,
        check: Check::DestructiveNeedsConfirmation,
    },
    PolicyRule {
        id: rules::R007_BARRIER_NEEDS_TOKEN,
        check: Check::BarrierNeedsToken,
    },
    PolicyRule {
        id: rules::R008_TOKEN_MUST_VERIFY,
        check: Check::TokenMustVerify,
    },
    PolicyRule {
        id: rules::R009_APPROVALS_SUFFICIENT,
        check: Check::ApprovalsSufficient,
    },
    PolicyRule {
        id: rules::R010_ALLOW,
        check: Check::Allow,
    },
];

/// The configuration policy depends on (part of the policy hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Token lifetime and approvers per safety class.
    pub tokens: ClassTable<ClassTokenPolicy>,
    /// Maximum age of a barrier re-probe.
    pub freshness_ms: u64,
    /// `tokens.self_approval`: may a run's requester approve it (never for protected hosts)?
    pub self_approval: bool,
}

impl PolicyConfig {
    /// The policy part of `coordinator.toml`.
    pub fn from_config(config: &CoordinatorConfig) -> Self {
        PolicyConfig {
            tokens: config.tokens.classes,
            freshness_ms: config.probe.freshness_ms,
            self_approval: config.tokens.self_approval,
        }
    }

    /// Whether the requester may approve a plan touching these classes: only where
    /// `tokens.self_approval` allows it, and never when a protected host is in scope.
    pub fn self_approval_allowed(&self, mut classes: impl Iterator<Item = SafetyClass>) -> bool {
        self.self_approval && !classes.any(|c| c == SafetyClass::Protected)
    }

    /// Distinct approvers a token for these classes needs: the largest requirement.
    pub fn approvals_required(&self, classes: impl IntoIterator<Item = SafetyClass>) -> u8 {
        classes
            .into_iter()
            .map(|c| self.tokens.get(c).approvers)
            .max()
            .unwrap_or(1)
    }

    /// Token lifetime for these classes: the shortest.
    pub fn token_lifetime_ms(&self, classes: impl IntoIterator<Item = SafetyClass>) -> u64 {
        classes
            .into_iter()
            .map(|c| self.tokens.get(c).lifetime_ms)
            .min()
            .unwrap_or(self.tokens.standard.lifetime_ms)
    }
}

/// SHA-256 (hex) of the canonical encoding of the rule table and the policy configuration.
///
/// Encoding (domain `tollgate/policy/v1`): rule count, then per rule its id and check name;
/// then per class (disposable, standard, protected) its name, lifetime ms and approvers; then
/// the freshness window ms.
pub fn policy_hash(config: &PolicyConfig) -> String {
    let mut e = Encoder::new("tollgate/policy/v1");
    e.u64(POLICY_RULES.len() as u64);
    for r in POLICY_RULES {
        e.str(r.id).str(r.check.as_str());
    }
    for class in SafetyClass::ALL {
        let t = config.tokens.get(class);
        e.str(class.as_str()).u64(t.lifetime_ms).u8(t.approvers);
    }
    e.u64(config.freshness_ms);
    // Only when on, so the hash of every default configuration stays what it was.
    if config.self_approval {
        e.str("self_approval");
    }
    e.sha256_hex()
}

/// When policy is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// After the preflight probes, before anything runs.
    Admission,
    /// At the barrier before destructive phase `phase`.
    Barrier {
        /// Phase index.
        phase: usize,
    },
}

/// The token situation policy sees.
#[derive(Debug, Clone, Copy)]
pub enum TokenEvidence<'a> {
    /// None presented.
    NotPresented,
    /// Presented and verified now.
    Verified(&'a VerifiedToken),
    /// Presented and refused.
    Rejected(&'a TokenRejection),
}

/// One host as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct HostInput<'a> {
    /// Name.
    pub name: &'a str,
    /// Safety class.
    pub safety_class: SafetyClass,
    /// Lifecycle state.
    pub state: HostState,
    /// Latest facts, if any.
    pub facts: Option<&'a HostFacts>,
    /// Steps that would run on it (in the action at admission, in the phase at a barrier).
    pub steps: usize,
    /// Of which destructive.
    pub destructive_steps: usize,
}

impl HostInput<'_> {
    fn is_certain(&self) -> bool {
        self.state != HostState::Unknown && self.facts.is_some_and(HostFacts::has_valid_fingerprint)
    }
}

/// Everything [`evaluate`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    /// When.
    pub stage: Stage,
    /// The run.
    pub run_id: Uuid,
    /// Its action.
    pub action: Action,
    /// The mode the operator asked for.
    pub requested_mode: Mode,
    /// A shadow run (its escalation command keeps `--shadow`).
    pub shadow: bool,
    /// Requested target names that are not in the inventory.
    pub unknown_targets: &'a [String],
    /// The target hosts that are in the inventory.
    pub hosts: &'a [HostInput<'a>],
    /// The token situation.
    pub token: TokenEvidence<'a>,
    /// Policy configuration.
    pub config: &'a PolicyConfig,
}

/// What a rule decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Nothing applies; the run completes without doing anything.
    NothingToDo,
    /// Wait for a confirmation token for the exact plan.
    ConfirmationRequired,
    /// Quick mode cannot do this; run `next_command`.
    Escalate {
        /// The exact command.
        next_command: String,
    },
    /// Refused.
    Block {
        /// Why.
        reason: ReasonCode,
    },
}

/// A decision with its rule and an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruling {
    /// The decision.
    pub decision: Decision,
    /// The rule that made it.
    pub rule: RuleId,
    /// One sentence with the facts.
    pub detail: String,
}

impl Ruling {
    /// Whether it allows proceeding.
    pub fn allows(&self) -> bool {
        self.decision == Decision::Allow
    }

    /// The reason code that goes with it, if any.
    pub fn reason(&self) -> Option<ReasonCode> {
        match &self.decision {
            Decision::Block { reason } => Some(*reason),
            Decision::Escalate { .. } => Some(ReasonCode::QuickModeNonDestructive),
            Decision::NothingToDo => Some(ReasonCode::NothingToDo),
            Decision::Allow if self.rule == rules::R005_FULL_WITHOUT_DESTRUCTIVE_DE_ESCALATES => {
                Some(ReasonCode::DeEscalated)
            }
            _ => None,
        }
    }
}

/// Policy's answer, for the run and for each host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// The mode the run executes in.
    pub effective_mode: Mode,
    /// The run's ruling.
    pub run: Ruling,
    /// Each host's ruling (unknown targets included), sorted by host.
    pub hosts: Vec<(String, Ruling)>,
    /// Distinct approvers a token needs (0 when nothing destructive is in scope).
    pub approvals_required: u8,
    /// Token lifetime for these hosts.
    pub token_lifetime_ms: u64,
    /// Whether the requester may be one of the approvers (separation of duties).
    pub self_approval: bool,
}

/// Evaluates the policy table for the run and for each host.
pub fn evaluate(input: &PolicyInput<'_>) -> PolicyDecision {
    let all: Vec<&HostInput<'_>> = input.hosts.iter().collect();
    let next_command = escalation_command(
        input.action,
        &input
            .hosts
            .iter()
            .map(|h| h.name.to_owned())
            .collect::<Vec<_>>(),
        input.run_id,
        input.shadow,
    );
    let (effective_mode, run) = evaluate_scope(input, &all, true, &next_command);
    let mut hosts: Vec<(String, Ruling)> = input
        .hosts
        .iter()
        .map(|h| {
            let (_, ruling) = evaluate_scope(input, &[h], false, &next_command);
            (h.name.to_owned(), ruling)
        })
        .collect();
    for name in input.unknown_targets {
        hosts.push((
            name.clone(),
            Ruling {
                decision: Decision::Block {
                    reason: ReasonCode::UnknownHost,
                },
                rule: rules::R001_TARGETS_IN_INVENTORY,
                detail: format!("{name} is not in the inventory"),
            },
        ));
    }
    hosts.sort_by(|a, b| a.0.cmp(&b.0));
    let destructive = input.hosts.iter().any(|h| h.destructive_steps > 0);
    let classes = input.hosts.iter().map(|h| h.safety_class);
    PolicyDecision {
        effective_mode,
        run,
        hosts,
        approvals_required: if destructive {
            input.config.approvals_required(classes.clone())
        } else {
            0
        },
        self_approval: input.config.self_approval_allowed(classes.clone()),
        token_lifetime_ms: input.config.token_lifetime_ms(classes),
    }
}

fn evaluate_scope(
    input: &PolicyInput<'_>,
    scope: &[&HostInput<'_>],
    run_level: bool,
    next_command: &str,
) -> (Mode, Ruling) {
    let steps: usize = scope.iter().map(|h| h.steps).sum();
    let destructive: usize = scope.iter().map(|h| h.destructive_steps).sum();
    let effective_mode = match input.requested_mode {
        Mode::Full if destructive > 0 => Mode::Full,
        _ => Mode::Quick,
    };
    for rule in POLICY_RULES {
        if let Some((decision, detail)) = fires(
            rule.check,
            input,
            scope,
            run_level,
            steps,
            destructive,
            next_command,
        ) {
            return (
                effective_mode,
                Ruling {
                    decision,
                    rule: rule.id,
                    detail,
                },
            );
        }
    }
    // The table ends with `Allow`, which always fires; this is only reached if it is edited
    // away, and then nothing is allowed.
    (
        effective_mode,
        Ruling {
            decision: Decision::Block {
                reason: ReasonCode::NotAuthorized,
            },
            rule: rules::R010_ALLOW,
            detail: "no policy rule decided".into(),
        },
    )
}

fn fires(
    check: Check,
    input: &PolicyInput<'_>,
    scope: &[&HostInput<'_>],
    run_level: bool,
    steps: usize,
    destructive: usize,
    next_command: &str,
) -> Option<(Decision, String)> {
    let block = |reason| Decision::Block { reason };
    match check {
        Check::TargetsInInventory => (run_level && !input.unknown_targets.is_empty()).then(|| {
            (
                block(ReasonCode::UnknownHost),
                format!("not in the inventory: {}", input.unknown_targets.join(", ")),
            )
        }),
        Check::CertainData => {
            let doubtful: Vec<String> = scope
                .iter()
                .filter(|h| !h.is_certain())
                .map(|h| describe_doubt(h))
                .collect();
            (run_level && input.hosts.is_empty() || !doubtful.is_empty()).then(|| {
                let detail = if doubtful.is_empty() {
                    "no target hosts".to_owned()
                } else {
                    doubtful.join("; ")
                };
                (block(ReasonCode::HostUnknown), detail)
            })
        }
        Check::SomethingToDo => (steps == 0).then(|| {
            (
                Decision::NothingToDo,
                format!("no {} step applies to these hosts", input.action),
            )
        }),
        Check::QuickNeverDestroys => {
            (input.requested_mode == Mode::Quick && destructive > 0).then(|| {
                (
                    Decision::Escalate {
                        next_command: next_command.to_owned(),
                    },
                    format!(
                        "{destructive} destructive step(s) would run; quick mode never destroys"
                    ),
                )
            })
        }
        Check::FullWithoutDestructiveDeEscalates => (input.stage == Stage::Admission
            && input.requested_mode == Mode::Full
            && destructive == 0)
            .then(|| {
                (
                    Decision::Allow,
                    "full mode requested but nothing destructive would run: running as quick"
                        .to_owned(),
                )
            }),
        Check::DestructiveNeedsConfirmation => (input.stage == Stage::Admission
            && destructive > 0
            && matches!(input.token, TokenEvidence::NotPresented))
        .then(|| {
            (
                Decision::ConfirmationRequired,
                format!("{destructive} destructive step(s) need a confirmation token"),
            )
        }),
        Check::BarrierNeedsToken => (matches!(input.stage, Stage::Barrier { .. })
            && matches!(input.token, TokenEvidence::NotPresented))
        .then(|| {
            (
                block(ReasonCode::TokenMissing),
                "a destructive phase needs a verified token".to_owned(),
            )
        }),
        Check::TokenMustVerify => match input.token {
            TokenEvidence::Rejected(r) => Some((block(r.reason()), r.to_string())),
            _ => None,
        },
        Check::ApprovalsSufficient => match input.token {
            TokenEvidence::Verified(t) if destructive > 0 => {
                let need = input
                    .config
                    .approvals_required(scope.iter().map(|h| h.safety_class));
                (t.claims.approvers.len() < usize::from(need)).then(|| {
                    (
                        block(ReasonCode::ApprovalsInsufficient),
                        format!(
                            "{} distinct approver(s), {need} required by the hosts' safety classes",
                            t.claims.approvers.len()
                        ),
                    )
                })
            }
            _ => None,
        },
        Check::Allow => Some((Decision::Allow, "no rule objected".to_owned())),
    }
}

fn describe_doubt(h: &HostInput<'_>) -> String {
    if h.state == HostState::Unknown {
        format!("{} is Unknown", h.name)
    } else {
        match h.facts {
            None => format!("{} has no facts", h.name),
            Some(_) => format!("{} has no valid fingerprint", h.name),
        }
    }
}
