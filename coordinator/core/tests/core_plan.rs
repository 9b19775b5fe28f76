//! Plans: barriers before destructive phases, and an operation hash that is stable under host
//! order and changes with every script byte, host, inventory entry, fingerprint and policy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tollgate_core::config::{
    ActionSpec, Host, Inventory, Operations, PsRemoting, SafetyClass, ScriptSource, SshOptions,
    Transport, parse_inventory, parse_operations,
};
use tollgate_core::facts::HostFacts;
use tollgate_core::plan::{Draft, Intent, Plan, PlanError};
use tollgate_core::policy::{Decision, PolicyDecision, Ruling};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

fn inventory() -> Inventory {
    parse_inventory(
        include_str!("../../tests/data/fleet/inventory.toml"),
        "inventory.toml",
    )
    .unwrap()
}

fn operations() -> Operations {
    let mut ops = parse_operations(
        include_str!("../../tests/data/fleet/operations.toml"),
        "operations.toml",
    )
    .unwrap();
    ops.resolve_run_files(|_| {
        Ok(include_str!("../../tests/data/fleet/scripts/remove.sh").to_owned())
    })
    .unwrap();
    ops
}

fn fingerprint(seed: u8) -> String {
    hex::encode([seed; 32])
}

fn facts_for(inv: &Inventory) -> BTreeMap<String, HostFacts> {
    inv.hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            (
                h.name.clone(),
                HostFacts {
                    fingerprint: fingerprint(i as u8 + 1),
                    probed_at_ms: 1,
                    facts: BTreeMap::new(),
                },
            )
        })
        .collect()
}

fn decision() -> PolicyDecision {
    PolicyDecision {
        effective_mode: Mode::Full,
        run: Ruling {
            decision: Decision::Allow,
            rule: "R010-allow",
            detail: String::new(),
        },
        hosts: Vec::new(),
        approvals_required: 2,
        token_lifetime_ms: 600_000,
        self_approval: false,
    }
}

struct Case {
    inv: Inventory,
    ops: Operations,
    action: Action,
    targets: Vec<String>,
    facts: BTreeMap<String, HostFacts>,
    policy_hash: String,
    run_id: Uuid,
}

impl Case {
    fn new(action: Action) -> Self {
        let inv = inventory();
        Case {
            facts: facts_for(&inv),
            inv,
            ops: operations(),
            action,
            targets: Vec::new(),
            policy_hash: "p".repeat(64),
            run_id: Uuid::from_u128(1),
        }
    }

    fn try_plan(&self, mode: Mode) -> Result<Plan, PlanError> {
        let intent = Intent {
            run_id: self.run_id,
            action: self.action,
            requested_mode: mode,
            targets: self.targets.clone(),
            shadow: false,
        };
        Draft::new(&intent, &self.inv, &self.ops)?.seal(
            mode,
            &self.facts,
            &decision(),
            &self.policy_hash,
        )
    }

    fn plan(&self) -> Plan {
        let mode = if self.action == Action::Teardown {
            Mode::Full
        } else {
            Mode::Quick
        };
        self.try_plan(mode).unwrap()
    }

    fn hash(&self) -> String {
        self.plan().operation_hash().to_owned()
    }

    fn edit_step(
        &mut self,
        phase: usize,
        step: usize,
        f: impl FnOnce(&mut tollgate_core::config::Step),
    ) {
        let mut deploy = self.ops.action(Action::Deploy).clone();
        let mut teardown = self.ops.action(Action::Teardown).clone();
        let spec: &mut ActionSpec = match self.action {
            Action::Deploy => &mut deploy,
            Action::Teardown => &mut teardown,
        };
        f(&mut spec.phases[phase].steps[step]);
        self.ops = Operations::new("ops", deploy, teardown, self.ops.probes().clone()).unwrap();
    }

    /// Edits the SSH host db1's `transport.psremoting`.
    fn edit_ssh(&mut self, f: impl FnOnce(&mut PsRemoting)) {
        self.edit_host("db1", |h| match &mut h.transport {
            Transport::PsRemoting(p) => f(p),
            other => panic!("db1 is not a psremoting host: {other:?}"),
        })
    }

    fn edit_host(&mut self, name: &str, f: impl FnOnce(&mut Host)) {
        let mut hosts = self.inv.hosts().to_vec();
        f(hosts.iter_mut().find(|h| h.name == name).unwrap());
        self.inv = Inventory::new("inv", hosts).unwrap();
    }
}

#[test]
fn a_barrier_precedes_every_destructive_phase_and_only_those() {
    let names = ["db1", "web1", "web2"];
    for action in [Action::Deploy, Action::Teardown] {
        for mask in 1..8u8 {
            let mut case = Case::new(action);
            case.targets = names
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, n)| (*n).to_owned())
                .collect();
            let plan = case.try_plan(Mode::Full).unwrap();
            for phase in plan.phases() {
                assert_eq!(
                    phase.barrier_before, phase.destructive,
                    "{action} {mask} {}",
                    phase.name
                );
                assert_eq!(phase.destructive, phase.steps.iter().any(|s| s.destructive));
                assert!(!phase.steps.is_empty());
            }
            for step in plan.view().steps {
                let phase = plan.phases().iter().find(|p| p.name == step.phase).unwrap();
                assert_eq!(step.barrier_before, phase.barrier_before);
            }
        }
    }
    let teardown = Case::new(Action::Teardown).plan();
    let barriers: Vec<&str> = teardown
        .phases()
        .iter()
        .filter(|p| p.barrier_before)
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(barriers, vec!["remove"]);
}

#[test]
fn steps_run_where_their_roles_are_and_empty_phases_are_dropped() {
    let mut case = Case::new(Action::Teardown);
    case.targets = vec!["db1".into()];
    let plan = case.plan();
    // `drain` only has web steps: dropped for a db-only run.
    let phases: Vec<&str> = plan.phases().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(phases, vec!["remove"]);
    assert_eq!(plan.phases()[0].steps.len(), 1);
    assert_eq!(plan.phases()[0].steps[0].id, "remove-db");
    assert_eq!(plan.host_names(), vec!["db1"]);
    let view = plan.view();
    assert_eq!(view.operation_hash, plan.operation_hash());
    assert_eq!(view.approvals_required, 2);
    assert_eq!(view.steps.len(), 1);
}

#[test]
fn sealing_refuses_what_it_cannot_stand_behind() {
    let case = Case::new(Action::Teardown);
    assert!(matches!(
        case.try_plan(Mode::Quick),
        Err(PlanError::DestructiveInQuick { .. })
    ));
    let mut missing = Case::new(Action::Teardown);
    missing.facts.remove("web2");
    assert_eq!(
        missing.try_plan(Mode::Full),
        Err(PlanError::MissingFacts {
            host: "web2".into()
        })
    );
    let mut bad = Case::new(Action::Teardown);
    bad.facts.get_mut("db1").unwrap().fingerprint = "nope".into();
    assert_eq!(
        bad.try_plan(Mode::Full),
        Err(PlanError::MissingFacts { host: "db1".into() })
    );
    let mut unknown = Case::new(Action::Deploy);
    unknown.targets = vec!["web1".into(), "ghost".into()];
    assert_eq!(
        unknown.try_plan(Mode::Quick),
        Err(PlanError::UnknownHost {
            host: "ghost".into()
        })
    );
    let unresolved = parse_operations(
        include_str!("../../tests/data/fleet/operations.toml"),
        "ops",
    )
    .unwrap();
    let intent = Intent {
        run_id: Uuid::nil(),
        action: Action::Teardown,
        requested_mode: Mode::Full,
        targets: vec![],
        shadow: false,
    };
    assert!(matches!(
        Draft::new(&intent, &inventory(), &unresolved),
        Err(PlanError::UnresolvedScript { .. })
    ));
}

#[test]
fn idempotency_keys_are_deterministic_and_distinct() {
    let plan = Case::new(Action::Deploy).plan();
    let again = Case::new(Action::Deploy).plan();
    let mut other_run = Case::new(Action::Deploy);
    other_run.run_id = Uuid::from_u128(2);
    let other_run = other_run.plan();
    assert_eq!(
        plan.operation_hash(),
        other_run.operation_hash(),
        "the run id is not hashed"
    );
    let mut keys = BTreeSet::new();
    for host in ["db1", "web1", "web2"] {
        for step in ["install", "start-web"] {
            for attempt in 1..=3 {
                let k = plan.idempotency_key(host, step, attempt);
                assert_eq!(k, again.idempotency_key(host, step, attempt));
                assert_ne!(k, other_run.idempotency_key(host, step, attempt));
                assert!(k.starts_with("ik1-") && k.ends_with(&format!("-{attempt}")));
                assert!(keys.insert(k));
            }
        }
    }
}

#[test]
fn each_hashed_input_changes_the_hash() {
    let base = Case::new(Action::Teardown).hash();
    type Edit = Box<dyn Fn(&mut Case)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "timeout",
            Box::new(|c| c.edit_step(1, 0, |s| s.timeout_ms += 1_000)),
        ),
        (
            "retries",
            Box::new(|c| c.edit_step(1, 0, |s| s.retries += 1)),
        ),
        (
            "shell",
            Box::new(|c| c.edit_step(0, 0, |s| s.shell = tollgate_protocol::Shell::Pwsh)),
        ),
        (
            "check added",
            Box::new(|c| c.edit_step(0, 0, |s| s.check = Some("exit 1".into()))),
        ),
        (
            "destructive flag",
            Box::new(|c| c.edit_step(0, 0, |s| s.destructive = true)),
        ),
        (
            "step id",
            Box::new(|c| c.edit_step(1, 1, |s| s.id = "remove-db2".into())),
        ),
        (
            "safety class",
            Box::new(|c| c.edit_host("web2", |h| h.safety_class = SafetyClass::Protected)),
        ),
        (
            "agent address",
            Box::new(|c| {
                c.edit_host("web1", |h| {
                    if let Transport::Agent(a) = &mut h.transport {
                        a.address = "127.0.0.9:7443".into()
                    }
                })
            }),
        ),
        (
            "psremoting user",
            Box::new(|c| {
                c.edit_host("db1", |h| {
                    if let Transport::PsRemoting(p) = &mut h.transport {
                        p.user = Some("root".into())
                    }
                })
            }),
        ),
        (
            "errors continue",
            Box::new(|c| c.edit_step(1, 1, |s| s.errors = tollgate_protocol::StepErrors::Continue)),
        ),
        (
            "psremoting key_file",
            Box::new(|c| c.edit_ssh(|p| p.key_file = Some("/keys/other".into()))),
        ),
        (
            "psremoting state_dir",
            Box::new(|c| c.edit_ssh(|p| p.state_dir = Some("/var/lib/other".into()))),
        ),
        (
            "ssh known_hosts",
            Box::new(|c| c.edit_ssh(|p| p.ssh.known_hosts = Some("/etc/tollgate/kh".into()))),
        ),
        (
            "ssh subsystem",
            Box::new(|c| c.edit_ssh(|p| p.ssh.subsystem = Some("pwsh7".into()))),
        ),
        (
            "ssh ProxyJump",
            Box::new(|c| {
                c.edit_ssh(|p| {
                    p.ssh
                        .ssh_options
                        .insert("ProxyJump".into(), "bastion.test.fleet".into());
                })
            }),
        ),
        (
            "ssh connect_timeout",
            Box::new(|c| c.edit_ssh(|p| p.ssh.connect_timeout_ms = Some(5_000))),
        ),
        (
            "ssh keepalive",
            Box::new(|c| c.edit_ssh(|p| p.ssh.keepalive_ms = Some(30_000))),
        ),
        ("policy", Box::new(|c| c.policy_hash = "q".repeat(64))),
        (
            "host set",
            Box::new(|c| c.targets = vec!["web1".into(), "db1".into()]),
        ),
    ];
    assert_ne!(
        base,
        Case::new(Action::Deploy).hash(),
        "the action is hashed"
    );
    let mut seen = BTreeSet::from([base]);
    for (name, edit) in edits {
        let mut c = Case::new(Action::Teardown);
        edit(&mut c);
        let h = c.hash();
        assert!(seen.insert(h), "{name} did not change the hash");
    }
}

/// The fleet-wide `[psremoting]` SSH defaults are part of what the hash binds, once laid under
/// the inventory (as the service does at load): changing a default known_hosts file or adding a
/// default `ProxyJump` changes the plan an approver signed for; a host's own value wins over the
/// default, so a default it overrides changes nothing.
#[test]
fn fleet_ssh_defaults_are_bound_through_the_inventory() {
    let hash_with = |defaults: &SshOptions| {
        let mut c = Case::new(Action::Teardown);
        c.inv = c.inv.clone().with_ssh_defaults(defaults);
        c.hash()
    };
    let none = hash_with(&SshOptions::default());
    assert_eq!(
        none,
        Case::new(Action::Teardown).hash(),
        "empty defaults change nothing"
    );
    let kh = SshOptions {
        known_hosts: Some("/etc/tollgate/known_hosts".into()),
        ..SshOptions::default()
    };
    assert_ne!(hash_with(&kh), none, "a default known_hosts is bound");
    let mut jump = SshOptions::default();
    jump.ssh_options
        .insert("ProxyJump".into(), "bastion".into());
    assert_ne!(hash_with(&jump), none, "a default ProxyJump is bound");

    // Laying the defaults twice is laying them once.
    let mut c = Case::new(Action::Teardown);
    let once = c.inv.clone().with_ssh_defaults(&kh);
    assert_eq!(once.clone().with_ssh_defaults(&kh), once);

    // The host's own known_hosts wins: a different default under it changes nothing.
    c.edit_ssh(|p| p.ssh.known_hosts = Some("/own/known_hosts".into()));
    let own = c.hash();
    c.inv = c.inv.clone().with_ssh_defaults(&kh);
    assert_eq!(
        c.hash(),
        own,
        "the host's own known_hosts wins over the default"
    );

    // Agent hosts take no SSH defaults.
    let inv = inventory().with_ssh_defaults(&kh);
    for h in inv.hosts().iter().filter(|h| h.name != "db1") {
        assert_eq!(Some(h), inventory().host(&h.name));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn host_order_does_not_matter(
        inv_order in Just(vec![0usize, 1, 2]).prop_shuffle(),
        target_order in Just(vec!["db1", "web1", "web2"]).prop_shuffle(),
        action in prop_oneof![Just(Action::Deploy), Just(Action::Teardown)],
    ) {
        let base = Case::new(action).hash();
        let mut c = Case::new(action);
        let hosts = c.inv.hosts().to_vec();
        c.inv = Inventory::new("inv", inv_order.iter().map(|i| hosts[*i].clone()).collect()).unwrap();
        c.targets = target_order.iter().map(|s| (*s).to_owned()).collect();
        prop_assert_eq!(c.hash(), base);
    }

    #[test]
    fn every_script_byte_matters(
        step in 0usize..3,
        pos in any::<prop::sample::Index>(),
        replacement in proptest::char::range('!', '~'),
    ) {
        let (phase, step) = [(0, 0), (1, 0), (1, 1)][step];
        let base = Case::new(Action::Teardown);
        let original = base.plan().phases()[phase].steps[step].script.clone();
        let chars: Vec<char> = original.chars().collect();
        let i = pos.index(chars.len());
        prop_assume!(chars[i] != replacement);
        let mut changed = chars.clone();
        changed[i] = replacement;
        let changed: String = changed.into_iter().collect();
        let mut c = Case::new(Action::Teardown);
        c.edit_step(phase, step, |s| s.run = ScriptSource::Inline(changed.clone()));
        let plan = c.plan();
        prop_assert_eq!(&plan.phases()[phase].steps[step].script, &changed);
        prop_assert_ne!(c.hash(), base.hash());
    }

    #[test]
    fn every_fingerprint_matters(host in prop::sample::select(vec!["db1", "web1", "web2"]), seed in 100u8..=255) {
        let base = Case::new(Action::Teardown).hash();
        let mut c = Case::new(Action::Teardown);
        c.facts.get_mut(host).unwrap().fingerprint = fingerprint(seed);
        prop_assert_ne!(c.hash(), base);
    }

    #[test]
    fn every_host_and_inventory_entry_matters(
        subset in proptest::collection::btree_set(prop::sample::select(vec!["db1", "web1", "web2"]), 1..3),
        host in prop::sample::select(vec!["db1", "web1", "web2"]),
        role_suffix in "[a-z]{1,5}",
    ) {
        let full = Case::new(Action::Deploy);
        let mut part = Case::new(Action::Deploy);
        part.targets = subset.iter().map(|s| (*s).to_owned()).collect();
        if subset.len() < 3 {
            let plan = part.try_plan(Mode::Quick).unwrap();
            prop_assert_ne!(plan.operation_hash(), full.hash());
        }
        // Renaming a role keeps the host in no step at all, or changes which steps it runs;
        // either way the inventory entry is hashed.
        let mut c = Case::new(Action::Deploy);
        c.edit_host(host, |h| h.role = format!("{}{role_suffix}", h.role));
        if c.try_plan(Mode::Quick).is_ok() {
            prop_assert_ne!(c.hash(), full.hash());
        }
    }

    #[test]
    fn every_policy_matters(p in "[0-9a-f]{64}") {
        let base = Case::new(Action::Deploy).hash();
        let mut c = Case::new(Action::Deploy);
        c.policy_hash = p;
        prop_assert_ne!(c.hash(), base);
    }
}
