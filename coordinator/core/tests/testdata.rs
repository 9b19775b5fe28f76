//! The data-driven tables: every file under `tests/testdata/` is read through one [`check`].
//! A case is a directive line, its input, `----`, and the output the core must give, word for
//! word. `REWRITE=1 cargo test -p tollgate-core --test testdata` rewrites the outputs (read the
//! diff before committing it: a changed line is a changed behaviour).
//!
//! Directives:
//! * `inventory`, `operations`, `operations-against-inventory`, `coordinator`: the input is a
//!   configuration file; the output is what the operator reads (`ok`, or `file: key: reason`).
//! * `lifecycle`: the whole transition table, one row per event, one column per state.
//! * `transition`: input lines `STATE EVENT`; output the state reached or the refusal.
//! * `policy stage=admission|barrier mode=quick|full action=deploy|teardown [token=valid|
//!   expired|forged|replayed] [approvers=(alice,bob)] [unknown=(name,...)] [self-approval]`:
//!   input lines `NAME CLASS STATE STEPS/DESTRUCTIVE [no-facts|bad-fingerprint]`; output the
//!   run's ruling and every host's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::collections::{BTreeMap, BTreeSet};

use datadriven::{TestCase, walk};
use tollgate_core::config::{
    Authorization, ClassTable, ClassTokenPolicy, Role, SafetyClass, parse_coordinator,
    parse_inventory, parse_operations, validate_operations,
};
use tollgate_core::facts::HostFacts;
use tollgate_core::lifecycle::{HostState, LifecycleEvent, TransitionError, transition};
use tollgate_core::policy::{
    Decision, HostInput, PolicyConfig, PolicyInput, Ruling, Stage, TokenEvidence, evaluate,
};
use tollgate_core::token::{Claims, TokenIssuer, TokenScope, VerifyContext, verify};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

#[test]
fn testdata() {
    walk("tests/testdata", |f| f.run(check));
}

/// The one entry point: a case in, the core's answer out.
fn check(case: &mut TestCase) -> String {
    match case.directive.as_str() {
        "inventory" | "operations" | "operations-against-inventory" | "coordinator" => {
            config(&case.directive, &case.input)
        }
        "lifecycle" => lifecycle_table(),
        "transition" => transitions(&case.input),
        "policy" => policy(case),
        other => panic!("unknown directive {other:?}"),
    }
}

// --- configuration -------------------------------------------------------------------------

/// The inventory `operations-against-inventory` validates against.
const INVENTORY: &str = r#"
[[hosts]]
name = "web1"
role = "web"
safety_class = "standard"
transport.local = {}
[[hosts]]
name = "db1"
role = "db"
safety_class = "protected"
transport.local = {}
"#;

fn config(kind: &str, text: &str) -> String {
    let result = match kind {
        "inventory" => parse_inventory(text, "inv.toml").map(|_| ()),
        "operations" => parse_operations(text, "ops.toml").map(|_| ()),
        "operations-against-inventory" => {
            let inv = parse_inventory(INVENTORY, "inv.toml").expect("fixture inventory is valid");
            parse_operations(text, "ops.toml").and_then(|ops| validate_operations(&ops, &inv))
        }
        _ => parse_coordinator(text, "coord.toml").map(|_| ()),
    };
    match result {
        Ok(()) => "ok\n".into(),
        Err(e) => {
            // The rendered message carries all three parts, file first.
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("{}: {}: ", e.file(), e.key())),
                "{shown}"
            );
            assert!(shown.ends_with(e.reason()), "{shown}");
            format!("{e}\n")
        }
    }
}

// --- lifecycle -----------------------------------------------------------------------------

fn cell(state: HostState, event: LifecycleEvent) -> String {
    match transition(state, event) {
        Ok(to) => to.as_str().to_owned(),
        Err(TransitionError::HostUnknown { .. }) => "probe-first".into(),
        Err(TransitionError::TokenRequired { .. }) => "needs-token".into(),
        Err(TransitionError::NotAllowed { .. }) => "-".into(),
    }
}

/// Every (state, event) pair, aligned by construction.
fn lifecycle_table() -> String {
    let mut rows = vec![
        std::iter::once("event \\ state".to_owned())
            .chain(HostState::ALL.iter().map(|s| s.as_str().to_owned()))
            .collect::<Vec<_>>(),
    ];
    for e in LifecycleEvent::ALL {
        rows.push(
            std::iter::once(e.as_str().to_owned())
                .chain(HostState::ALL.iter().map(|s| cell(*s, e)))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn state(name: &str) -> HostState {
    HostState::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .unwrap_or_else(|| panic!("unknown state {name:?}"))
}

fn event(name: &str) -> LifecycleEvent {
    LifecycleEvent::ALL
        .into_iter()
        .find(|e| e.as_str() == name)
        .unwrap_or_else(|| panic!("unknown event {name:?}"))
}

fn transitions(input: &str) -> String {
    let mut out = String::new();
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        let (s, e) = line.split_once(' ').expect("STATE EVENT");
        let answer = match transition(state(s.trim()), event(e.trim())) {
            Ok(to) => to.as_str().to_owned(),
            Err(err) => format!("refused: {err}"),
        };
        out.push_str(&format!("{line} -> {answer}\n"));
    }
    out
}

// --- policy --------------------------------------------------------------------------------

const RUN: Uuid = Uuid::from_u128(0x5eed);
const NOW: u64 = 1_700_000_000_000;
const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn policy_config(self_approval: bool) -> PolicyConfig {
    let class = |lifetime_ms, approvers| ClassTokenPolicy {
        lifetime_ms,
        approvers,
    };
    PolicyConfig {
        tokens: ClassTable {
            disposable: class(7_200_000, 1),
            standard: class(900_000, 1),
            protected: class(600_000, 2),
        },
        freshness_ms: 30_000,
        self_approval,
    }
}

/// alice and bob approve; carol only operates.
fn authorization() -> Authorization {
    let who = |n: &str| format!("spiffe://t/operator/{n}");
    Authorization::new(BTreeMap::from([
        (who("alice"), BTreeSet::from([Role::Approver])),
        (who("bob"), BTreeSet::from([Role::Approver])),
        (who("carol"), BTreeSet::from([Role::Operator])),
    ]))
}

struct Host {
    name: String,
    class: SafetyClass,
    state: HostState,
    steps: usize,
    destructive: usize,
    facts: Option<HostFacts>,
}

fn host_line(line: &str) -> Host {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [name, class, st, work, rest @ ..] = words.as_slice() else {
        panic!("want NAME CLASS STATE STEPS/DESTRUCTIVE [FLAG], got {line:?}");
    };
    let class = SafetyClass::ALL
        .into_iter()
        .find(|c| c.as_str() == *class)
        .unwrap_or_else(|| panic!("unknown class {class:?}"));
    let (steps, destructive) = work.split_once('/').expect("STEPS/DESTRUCTIVE");
    let fingerprint = match rest.first() {
        Some(&"bad-fingerprint") => "not-hex".to_owned(),
        _ => "f0".repeat(32),
    };
    Host {
        name: (*name).to_owned(),
        class,
        state: state(st),
        steps: steps.parse().expect("steps"),
        destructive: destructive.parse().expect("destructive"),
        facts: (rest.first() != Some(&"no-facts")).then(|| HostFacts {
            fingerprint,
            probed_at_ms: NOW,
            facts: BTreeMap::new(),
        }),
    }
}

fn decision(r: &Ruling) -> String {
    let what = match &r.decision {
        Decision::Allow => "allow".to_owned(),
        Decision::NothingToDo => "nothing to do".to_owned(),
        Decision::ConfirmationRequired => "confirmation required".to_owned(),
        Decision::Escalate { next_command } => format!("escalate to `{next_command}`"),
        Decision::Block { reason } => format!("block {reason}"),
    };
    format!("{what} ({})", r.rule)
}

fn policy(case: &mut TestCase) -> String {
    let stage: String = case.take_arg("stage").expect("stage=");
    let mode: String = case.take_arg("mode").expect("mode=");
    let action: String = case.take_arg("action").expect("action=");
    let token: Option<String> = case.try_take_arg("token").expect("token=");
    let approvers: Vec<String> = case
        .try_take_args("approvers")
        .expect("approvers=")
        .unwrap_or_else(|| vec!["alice".into()]);
    let unknown: Vec<String> = case
        .try_take_args("unknown")
        .expect("unknown=")
        .unwrap_or_default();
    let self_approval = case.take_flag("self-approval").expect("self-approval");
    case.expect_empty().expect("no other arguments");

    let hosts: Vec<Host> = case
        .input
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(host_line)
        .collect();
    let inputs: Vec<HostInput<'_>> = hosts
        .iter()
        .map(|h| HostInput {
            name: &h.name,
            safety_class: h.class,
            state: h.state,
            facts: h.facts.as_ref(),
            steps: h.steps,
            destructive_steps: h.destructive,
        })
        .collect();
    let mut names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    names.sort();
    let action = match action.as_str() {
        "deploy" => Action::Deploy,
        "teardown" => Action::Teardown,
        other => panic!("unknown action {other:?}"),
    };
    let checked = token.map(|kind| present(&kind, &approvers, &names, action));
    let evidence = match &checked {
        None => TokenEvidence::NotPresented,
        Some(Ok(v)) => TokenEvidence::Verified(v),
        Some(Err(r)) => TokenEvidence::Rejected(r),
    };
    let config = policy_config(self_approval);
    let d = evaluate(&PolicyInput {
        stage: match stage.as_str() {
            "admission" => Stage::Admission,
            "barrier" => Stage::Barrier { phase: 1 },
            other => panic!("unknown stage {other:?}"),
        },
        run_id: RUN,
        action,
        requested_mode: match mode.as_str() {
            "quick" => Mode::Quick,
            "full" => Mode::Full,
            other => panic!("unknown mode {other:?}"),
        },
        shadow: false,
        unknown_targets: &unknown,
        hosts: &inputs,
        token: evidence,
        config: &config,
    });
    let mut out = format!(
        "run: {}\nmode {}, approvers needed {}, token lifetime {} ms\n",
        decision(&d.run),
        d.effective_mode.as_str(),
        d.approvals_required,
        d.token_lifetime_ms
    );
    for (host, ruling) in &d.hosts {
        out.push_str(&format!("{host}: {}\n", decision(ruling)));
    }
    out
}

/// A token of `kind` for this run and these hosts, checked as the run machine checks it.
fn present(
    kind: &str,
    approvers: &[String],
    hosts: &[String],
    action: Action,
) -> Result<tollgate_core::token::VerifiedToken, tollgate_core::token::TokenRejection> {
    let issuer = TokenIssuer::from_seed(&[1; 32]).unwrap();
    let forger = TokenIssuer::from_seed(&[2; 32]).unwrap();
    let claims = Claims {
        run_id: RUN,
        hosts: hosts.to_vec(),
        operation_hash: HASH.into(),
        action,
        approvers: approvers
            .iter()
            .map(|a| format!("spiffe://t/operator/{a}"))
            .collect(),
        issued_at_ms: NOW,
        expires_at_ms: NOW + 600_000,
        nonce: [3; 16],
    };
    let (text, now, consumed) = match kind {
        "valid" => (issuer.issue(&claims).unwrap(), NOW + 1, BTreeSet::new()),
        "expired" => (
            issuer.issue(&claims).unwrap(),
            NOW + 600_001,
            BTreeSet::new(),
        ),
        "forged" => (forger.issue(&claims).unwrap(), NOW + 1, BTreeSet::new()),
        "replayed" => (
            issuer.issue(&claims).unwrap(),
            NOW + 1,
            BTreeSet::from([claims.nonce_hex()]),
        ),
        other => panic!("unknown token kind {other:?}"),
    };
    verify(
        Some(&text),
        &TokenScope {
            run_id: RUN,
            hosts,
            operation_hash: HASH,
            action,
            approvals_required: 1,
            max_lifetime_ms: 600_000,
        },
        &VerifyContext {
            now_ms: now,
            public_key: &issuer.public_key(),
            consumed: &consumed,
            authorization: &authorization(),
        },
    )
}
