//! Model test of whole histories: several runs sharing a small fleet, across coordinator
//! restarts, driven by a random operator script.
//!
//! The driver is a model of the coordinator made only of the pure core, composed the way the
//! runtime composes it (`runtime/coordinator.rs`, `runtime/run.rs`, `service/recovery.rs`):
//!
//! * **submit**: `ledger::admit` on what the ledger knows of the id, `RunMachine::new`,
//!   `ledger::transition(Started)`, then the host leases of the machine's hosts (all or none);
//!   a continuation keeps the record it was born with and adds its requester to the submitters;
//! * **effects**: every `Record` goes to the run's journal; `AwaitConfirmation` advances the
//!   ledger (`ConfirmationRequested`) and remembers the plan to approve; `ConsumeToken` advances
//!   it (`TokenAccepted`) and consumes the nonce; `Finish` closes the run (ledger `Finished`,
//!   leases released, pending approvals dropped). A shadow run's checks and steps are answered
//!   by the driver (`NotInDesiredState`, `Succeeded`) without reaching a host, as the runtime
//!   fakes them;
//! * **approve**: refused while a live token exists; only a run waiting for approval, with the
//!   plan hash it printed; `PendingApproval` with every submitter as a requester; on completion
//!   `token_claims`, `token_issued_event` journaled, `TokenIssuer::issue`;
//! * **execute**: an open run gets `TokenPresented` with the consumed nonces; a closed one is
//!   answered by `closed::judge`;
//! * **restart**: every machine, lease and pending approval is dropped; every run's ledger
//!   record is folded from its journal (`RunRecord::from_journal`, as `journal::ledger_fact`
//!   reads lines), and each one `on_restart` closes goes through `close_after_restart`, its
//!   in-flight steps (sent and never settled, as `recovery::open_run` finds them through
//!   `closed::in_flight`) answered
//!   from the model agents' idempotency stores. Consumed nonces persist.
//!
//! The model hosts run a step only when a non-shadow run's dispatch is answered as having run
//! (or, at a restart, when an in-flight step is decided to have run before the crash); every
//! run of a step is recorded in the agent store under its idempotency key.
//!
//! Properties, checked on every history:
//!
//! 1. a step runs on a host at most once per (run, host, step), and a key that ran is never
//!    sent again;
//! 2. a destructive step runs only under a token issued by the approval path for that exact run
//!    (and that machine), accepted by the machine, while the run is open and executing;
//! 3. every run ends typed: after the script everything is answered, the coordinator restarts
//!    once, and every run is closed in the ledger, in its journal, with a typed result; no run is
//!    ever stuck with nothing left to answer; every escalation's next command names its run;
//! 4. no host is worked by two open runs at once (a step dispatched by a run while another open
//!    run has dispatched to the host), and no run closes with work still out on its hosts;
//! 5. a shadow run never executes anything (no step, no check) on a host;
//! 6. the requester (or any submitter) of a run is never among the approvers of its token.
//!
//! On failure the message carries the history as the driver played it (what each action did).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test helpers may panic

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tollgate_core::approval::{ApprovalProgress, ApprovalRequest, PendingApproval};
use tollgate_core::closed::{self, OpenRun, close_after_restart};
use tollgate_core::config::{
    Authorization, ClassTable, ClassTokenPolicy, Inventory, Operations, RetryPolicy, Role,
    parse_inventory, parse_operations,
};
use tollgate_core::facts::{HostFacts, ProbeFailure, ProbeOutcome};
use tollgate_core::leases::Leases;
use tollgate_core::ledger::{
    self, Admission, JournalFact, Known, LedgerEvent, OnRestart, RunRecord, Stage, on_restart,
};
use tollgate_core::outcome::{RunResult, TypedOutcome};
use tollgate_core::plan::Intent;
use tollgate_core::policy::PolicyConfig;
use tollgate_core::run::{
    CheckAnswer, Effect, IdempotencyAnswer, Input, ProbePurpose, RunMachine, RunSettings, RunSpec,
    StepResult, token_issued_event,
};
use tollgate_core::timeline::{EventKind, TimelineEvent, Verdict};
use tollgate_core::token::TokenIssuer;
use tollgate_protocol::outcome::{OutcomeKind, ReasonCode};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

const T0: u64 = 1_700_000_000_000;
const FRESHNESS: u64 = 30_000;
const ALICE: &str = "spiffe://h/operator/alice";
const BOB: &str = "spiffe://h/operator/bob";
const CAROL: &str = "spiffe://h/operator/carol";
const ROLES: [&str; 2] = ["web", "db"];
const CLASSES: [&str; 2] = ["standard", "protected"];
const GARBAGE: &str = "tg1.garbage.garbage";

/// Deploy has no destructive step; teardown drains (not destructive), then has two destructive
/// phases.
const OPS_A: &str = r#"
[[deploy.phases]]
name = "a"
[[deploy.phases.steps]]
id = "install"
roles = ["web", "db"]
run = "install"
destructive = false
retries = 2
check = "test installed"
[[deploy.phases]]
name = "b"
[[deploy.phases.steps]]
id = "start"
roles = ["web"]
run = "start"
destructive = false

[[teardown.phases]]
name = "drain"
[[teardown.phases.steps]]
id = "drain"
roles = ["web"]
run = "drain"
destructive = false
[[teardown.phases]]
name = "rm"
[[teardown.phases.steps]]
id = "rm-web"
roles = ["web"]
run = "rm web"
destructive = true
retries = 2
[[teardown.phases.steps]]
id = "note-db"
roles = ["db"]
run = "note"
destructive = false
check = "test noted"
[[teardown.phases]]
name = "purge"
[[teardown.phases.steps]]
id = "purge-db"
roles = ["db"]
run = "purge"
destructive = true
"#;

/// Deploy starts with a destructive phase (reimage); teardown has nothing destructive.
const OPS_B: &str = r#"
[[deploy.phases]]
name = "reimage"
[[deploy.phases.steps]]
id = "wipe"
roles = ["web", "db"]
run = "wipe"
destructive = true
retries = 1
check = "test wiped"
[[deploy.phases]]
name = "configure"
[[deploy.phases.steps]]
id = "configure"
roles = ["db"]
run = "configure"
destructive = false
retries = 1

[[teardown.phases]]
name = "stop"
[[teardown.phases.steps]]
id = "stop"
roles = ["web"]
run = "stop"
destructive = false
"#;

fn fingerprint(host: &str) -> String {
    let b = host
        .bytes()
        .fold(7u8, |a, x| a.wrapping_mul(31).wrapping_add(x));
    hex::encode([b; 32])
}

// ---------------------------------------------------------------------------------------------
// The script.

/// The fleet: hosts h0.. as (role, class) indices, and which operations file.
#[derive(Clone)]
struct Fleet {
    hosts: Vec<(usize, usize)>,
    ops_b: bool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (r, c))| format!("h{i}={}/{}", ROLES[*r], CLASSES[*c]))
            .collect();
        write!(
            f,
            "Fleet[{}; ops {}]",
            hosts.join(" "),
            if self.ops_b { "B" } else { "A" }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Alice,
    Bob,
    Carol,
}

impl Who {
    fn id(self) -> &'static str {
        match self {
            Who::Alice => ALICE,
            Who::Bob => BOB,
            Who::Carol => CAROL,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum By {
    Requester,
    Alice,
    Bob,
    /// An approver who has not approved this plan yet and did not submit the run, if any.
    Someone,
}

/// A run id: a fresh one, or the k-th id the coordinator knows (open, escalated or closed).
#[derive(Debug, Clone, Copy)]
enum Id {
    Fresh,
    Existing(u8),
}

/// Which token an operator presents.
#[derive(Debug, Clone, Copy)]
enum Tok {
    /// The last token issued for the run.
    Right,
    /// A token issued for another run.
    OtherRuns,
    /// A token already consumed.
    Replayed,
    /// The k-th token ever issued, to its own run (it may be stale, expired, of a closed run).
    Old(u8),
    Garbage,
}

/// How a pending request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Ok,
    /// Steps: failed without running.
    Transient,
    /// Steps: ran and failed.
    Permanent,
    /// Steps: ran, and the answer was lost.
    LostRan,
    /// Steps: did not run, and the answer was lost.
    LostNotRun,
    /// Idempotency queries: the query failed.
    QueryFailed,
    /// Checks: already in the desired state.
    CheckDone,
    /// Checks: the check failed.
    CheckFailed,
    /// Probes: unreachable.
    ProbeFailed,
}

#[derive(Debug, Clone)]
enum Act {
    Submit {
        id: Id,
        action: Action,
        mode: Mode,
        shadow: bool,
        hosts: u8,
        by: Who,
    },
    /// Run the next command of an escalation printed earlier (possibly before a restart).
    FollowEscalation {
        pick: u8,
        by: Who,
    },
    Approve {
        pick: u8,
        by: By,
        wrong_hash: bool,
    },
    Execute {
        pick: u8,
        token: Tok,
    },
    Cancel {
        pick: u8,
    },
    Answer {
        pick: u8,
        how: How,
    },
    Clock {
        secs: u8,
    },
    /// The coordinator restarts. Bit i of `ran`: the i-th in-flight step had run on its host
    /// before the crash; bit i of `unreachable`: the i-th recovery query gets no answer.
    Restart {
        ran: u8,
        unreachable: u8,
    },
}

fn fleet() -> impl Strategy<Value = Fleet> {
    (
        proptest::collection::vec((0usize..2, 0usize..2), 2..=4),
        any::<bool>(),
    )
        .prop_map(|(hosts, ops_b)| Fleet { hosts, ops_b })
}

fn act() -> impl Strategy<Value = Act> {
    let who = || prop_oneof![Just(Who::Alice), Just(Who::Bob), Just(Who::Carol)];
    let id = prop_oneof![3 => Just(Id::Fresh), 1 => any::<u8>().prop_map(Id::Existing)];
    let action = prop_oneof![Just(Action::Deploy), Just(Action::Teardown)];
    let mode = prop_oneof![Just(Mode::Quick), Just(Mode::Full)];
    let by = prop_oneof![
        1 => Just(By::Requester),
        1 => Just(By::Alice),
        1 => Just(By::Bob),
        3 => Just(By::Someone),
    ];
    let tok = prop_oneof![
        4 => Just(Tok::Right),
        1 => Just(Tok::OtherRuns),
        1 => Just(Tok::Replayed),
        1 => any::<u8>().prop_map(Tok::Old),
        1 => Just(Tok::Garbage),
    ];
    let how = prop_oneof![
        12 => Just(How::Ok),
        2 => Just(How::Transient),
        1 => Just(How::Permanent),
        1 => Just(How::LostRan),
        1 => Just(How::LostNotRun),
        1 => Just(How::QueryFailed),
        2 => Just(How::CheckDone),
        1 => Just(How::CheckFailed),
        1 => Just(How::ProbeFailed),
    ];
    prop_oneof![
        6 => (id, action, mode, proptest::bool::weighted(0.25), any::<u8>(), who()).prop_map(
            |(id, action, mode, shadow, hosts, by)| Act::Submit {
                id,
                action,
                mode,
                shadow,
                hosts,
                by
            }
        ),
        3 => (any::<u8>(), who()).prop_map(|(pick, by)| Act::FollowEscalation { pick, by }),
        8 => (any::<u8>(), by, proptest::bool::weighted(0.05)).prop_map(
            |(pick, by, wrong_hash)| Act::Approve {
                pick,
                by,
                wrong_hash
            }
        ),
        8 => (any::<u8>(), tok).prop_map(|(pick, token)| Act::Execute { pick, token }),
        1 => any::<u8>().prop_map(|pick| Act::Cancel { pick }),
        30 => (any::<u8>(), how).prop_map(|(pick, how)| Act::Answer { pick, how }),
        3 => (0u8..=90).prop_map(|secs| Act::Clock { secs }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(ran, unreachable)| Act::Restart {
            ran,
            unreachable
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model.

/// The coordinator's `RunEntry.last`: what the run last reported.
#[derive(Debug, Clone)]
enum Last {
    None,
    /// `ConfirmationRequired`: the plan to approve.
    Awaiting {
        operation_hash: String,
        required: u8,
        self_approval: bool,
    },
    Closed(Box<RunResult>),
}

/// What the coordinator keeps of a run id: the ledger record and the journal survive a
/// restart; the rest is rebuilt (recovery adopts a closed run with no submitters).
#[derive(Debug)]
struct Entry {
    record: RunRecord,
    submitters: Vec<String>,
    last: Last,
    journal: Vec<TimelineEvent>,
}

/// A step sent to a host, not answered yet.
#[derive(Debug, Clone)]
struct Sent {
    host: String,
    step: String,
    key: String,
    destructive: bool,
}

/// An open run's machine and the requests it has out (lost at a restart).
#[derive(Debug)]
struct Live {
    m: RunMachine,
    incarnation: u64,
    shadow: bool,
    /// The nonce of the token this machine accepted.
    accepted: Option<String>,
    probes: Vec<(ProbePurpose, String)>,
    checks: Vec<(String, String)>,
    dispatches: Vec<Sent>,
    queries: Vec<(String, String, String)>,
    wakes: BTreeSet<u64>,
}

/// A step that ran on a model host, as its agent's idempotency store keeps it.
#[derive(Debug, Clone)]
struct Ran {
    run: Uuid,
    host: String,
    step: String,
    result: StepResult,
}

/// A token the approval path issued.
#[derive(Debug, Clone)]
struct Issued {
    run: Uuid,
    incarnation: u64,
    nonce: String,
    text: String,
}

#[derive(Debug, Clone, Copy)]
enum Req {
    Probe,
    Check,
    Dispatch,
    Query,
}

/// How often the interesting paths were taken (a generator that stops reaching one fails the
/// test rather than passing vacuously).
#[derive(Debug, Default, Clone)]
struct Cov {
    admitted: usize,
    continued: usize,
    reuse_refused: usize,
    host_busy: usize,
    escalations: usize,
    awaiting_approval: usize,
    self_approval_refused: usize,
    second_approver_needed: usize,
    tokens_issued: usize,
    tokens_rejected: usize,
    tokens_accepted: usize,
    judged_closed: usize,
    steps_ran: usize,
    destructive_ran: usize,
    shadow_steps_faked: usize,
    cancels: usize,
    restarts_closing_open_runs: usize,
    restarts_settling_in_flight: usize,
    completed_with_steps: usize,
}

impl Cov {
    fn fields(&self) -> [(&'static str, usize); 19] {
        [
            ("admitted runs", self.admitted),
            ("continuations admitted", self.continued),
            ("run id reuse refused", self.reuse_refused),
            ("host busy refusals", self.host_busy),
            ("escalations", self.escalations),
            ("plans awaiting approval", self.awaiting_approval),
            ("self-approvals refused", self.self_approval_refused),
            ("second approver needed", self.second_approver_needed),
            ("tokens issued", self.tokens_issued),
            ("tokens rejected", self.tokens_rejected),
            ("tokens accepted", self.tokens_accepted),
            ("tokens judged for closed runs", self.judged_closed),
            ("steps run on hosts", self.steps_ran),
            ("destructive steps run on hosts", self.destructive_ran),
            ("shadow steps faked", self.shadow_steps_faked),
            ("cancels fed to open runs", self.cancels),
            (
                "restarts closing open runs",
                self.restarts_closing_open_runs,
            ),
            (
                "restarts settling in-flight steps",
                self.restarts_settling_in_flight,
            ),
            (
                "runs completed after running steps",
                self.completed_with_steps,
            ),
        ]
    }

    fn add(&mut self, o: &Cov) {
        self.admitted += o.admitted;
        self.continued += o.continued;
        self.reuse_refused += o.reuse_refused;
        self.host_busy += o.host_busy;
        self.escalations += o.escalations;
        self.awaiting_approval += o.awaiting_approval;
        self.self_approval_refused += o.self_approval_refused;
        self.second_approver_needed += o.second_approver_needed;
        self.tokens_issued += o.tokens_issued;
        self.tokens_rejected += o.tokens_rejected;
        self.tokens_accepted += o.tokens_accepted;
        self.judged_closed += o.judged_closed;
        self.steps_ran += o.steps_ran;
        self.destructive_ran += o.destructive_ran;
        self.shadow_steps_faked += o.shadow_steps_faked;
        self.cancels += o.cancels;
        self.restarts_closing_open_runs += o.restarts_closing_open_runs;
        self.restarts_settling_in_flight += o.restarts_settling_in_flight;
        self.completed_with_steps += o.completed_with_steps;
    }
}

struct Model<'a> {
    issuer: &'a TokenIssuer,
    public_key: Vec<u8>,
    authz: Authorization,
    inventory: Inventory,
    operations: Operations,
    settings: RunSettings,
    hosts: Vec<String>,
    now: u64,
    next_id: u128,
    next_nonce: u64,
    next_incarnation: u64,
    // The coordinator process: lost at a restart.
    live: BTreeMap<Uuid, Live>,
    leases: Leases,
    approvals: BTreeMap<Uuid, PendingApproval>,
    // Durable: journals and ledger records, consumed nonces.
    runs: BTreeMap<Uuid, Entry>,
    consumed: BTreeSet<String>,
    // The world: agents' idempotency stores (by key), checks that ran, what operators saw.
    store: BTreeMap<String, Ran>,
    checks_ran: Vec<Uuid>,
    escalations: Vec<(Uuid, String)>,
    issued: Vec<Issued>,
    // Oracle.
    ran_steps: BTreeSet<(Uuid, String, String)>,
    requested_by: BTreeMap<Uuid, BTreeSet<String>>,
    worked: BTreeMap<String, BTreeSet<Uuid>>,
    ran_by_run: BTreeMap<Uuid, usize>,
    log: String,
    cov: Cov,
}

macro_rules! say {
    ($m:expr, $($t:tt)*) => {{
        let _ = writeln!($m.log, $($t)*);
    }};
}

macro_rules! ensure {
    ($m:expr, $cond:expr, $prop:expr, $($t:tt)*) => {
        if !$cond {
            return Err($m.violation($prop, format!($($t)*)));
        }
    };
}

fn name(id: Uuid) -> String {
    format!("R{}", id.as_u128())
}

fn short_key(key: &str) -> String {
    let attempt = key.rsplit('-').next().unwrap_or("?");
    format!("{}..#{attempt}", key.get(4..12).unwrap_or(key))
}

fn inventory_text(hosts: &[(usize, usize)]) -> String {
    let mut s = String::new();
    for (i, (role, class)) in hosts.iter().enumerate() {
        let _ = write!(
            s,
            "[[hosts]]\nname = \"h{i}\"\nrole = \"{}\"\nsafety_class = \"{}\"\ntransport.local = {{}}\n",
            ROLES[*role], CLASSES[*class]
        );
    }
    s
}

/// What a journal line means to the ledger, read off the event as `journal::ledger_fact`
/// reads a line: through the same `ledger::fact_of`.
fn journal_fact(ev: &TimelineEvent) -> JournalFact {
    ledger::fact_of(
        Some(ev.kind),
        ev.verdict == Some(Verdict::Allow),
        &ev.inputs,
        ev.at_ms,
    )
}

fn record_of(journal: &[TimelineEvent]) -> Result<RunRecord, ledger::RecordError> {
    let facts: Vec<JournalFact> = journal.iter().map(journal_fact).collect();
    RunRecord::from_journal(&facts)
}

/// What the journal of an open run says: `recovery::open_run`, read off the events.
fn open_run(
    run_id: Uuid,
    record: &RunRecord,
    journal: &[TimelineEvent],
    all_hosts: &[String],
) -> OpenRun {
    let started = journal
        .iter()
        .rev()
        .find(|e| e.kind == EventKind::RunStarted);
    let input = |k: &str| started.and_then(|e| e.inputs.get(k)).map(String::as_str);
    let requested_mode = match input("requested_mode") {
        Some("quick") => Mode::Quick,
        _ => Mode::Full,
    };
    let targets = match input("targets") {
        None | Some("(all)") => all_hosts.to_vec(),
        Some(t) => t.split(',').map(str::to_owned).collect(),
    };
    // As `recovery::step_fact` reads lines: through the same `closed::step_fact`.
    let in_flight = closed::in_flight(journal.iter().filter_map(|e| {
        closed::step_fact(
            Some(e.kind),
            e.host.as_deref(),
            e.step.as_deref(),
            &e.inputs,
        )
    }));
    OpenRun {
        run_id,
        action: record.action,
        requested_mode,
        targets,
        in_flight,
        quarantined: None,
    }
}

/// `tollgate ACTION --mode full --hosts H1,H2 --run RUN_ID [--shadow]`, as an operator reads it.
fn parse_escalation(cmd: &str) -> Option<(Action, Vec<String>, Uuid, bool)> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    if words.first() != Some(&"tollgate") {
        return None;
    }
    let action = match *words.get(1)? {
        "deploy" => Action::Deploy,
        "teardown" => Action::Teardown,
        _ => return None,
    };
    let after = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    if after("--mode") != Some("full") {
        return None;
    }
    let hosts = after("--hosts")?.split(',').map(str::to_owned).collect();
    let run = after("--run")?.parse().ok()?;
    Some((action, hosts, run, words.contains(&"--shadow")))
}

impl<'a> Model<'a> {
    fn new(issuer: &'a TokenIssuer, fleet: &Fleet) -> Self {
        let inventory = parse_inventory(&inventory_text(&fleet.hosts), "inventory.toml").unwrap();
        let operations =
            parse_operations(if fleet.ops_b { OPS_B } else { OPS_A }, "operations.toml").unwrap();
        let hosts = inventory.hosts().iter().map(|h| h.name.clone()).collect();
        let mut grants = BTreeMap::new();
        grants.insert(
            ALICE.to_owned(),
            BTreeSet::from([Role::Approver, Role::Operator]),
        );
        grants.insert(
            BOB.to_owned(),
            BTreeSet::from([Role::Approver, Role::Operator]),
        );
        grants.insert(CAROL.to_owned(), BTreeSet::from([Role::Operator]));
        let authz = Authorization::new(grants);
        let public_key = issuer.public_key();
        let settings = RunSettings {
            policy: PolicyConfig {
                tokens: ClassTable {
                    disposable: ClassTokenPolicy {
                        lifetime_ms: 3_600_000,
                        approvers: 1,
                    },
                    standard: ClassTokenPolicy {
                        lifetime_ms: 300_000,
                        approvers: 1,
                    },
                    protected: ClassTokenPolicy {
                        lifetime_ms: 120_000,
                        approvers: 2,
                    },
                },
                freshness_ms: FRESHNESS,
                self_approval: false,
            },
            retry: RetryPolicy {
                max_attempts: 3,
                base_backoff_ms: 500,
                max_backoff_ms: 4_000,
            },
            max_parallel_hosts: 2,
            probe_timeout_ms: 5_000,
            authorization: authz.clone(),
            token_public_key: public_key.clone(),
            jitter_seed: 0,
        };
        let mut log = String::new();
        let _ = writeln!(log, "{fleet:?}");
        Model {
            issuer,
            public_key,
            authz,
            inventory,
            operations,
            settings,
            hosts,
            now: T0,
            next_id: 0,
            next_nonce: 0,
            next_incarnation: 0,
            live: BTreeMap::new(),
            leases: Leases::new(),
            approvals: BTreeMap::new(),
            runs: BTreeMap::new(),
            consumed: BTreeSet::new(),
            store: BTreeMap::new(),
            checks_ran: Vec::new(),
            escalations: Vec::new(),
            issued: Vec::new(),
            ran_steps: BTreeSet::new(),
            requested_by: BTreeMap::new(),
            worked: BTreeMap::new(),
            ran_by_run: BTreeMap::new(),
            log,
            cov: Cov::default(),
        }
    }

    fn violation(&self, property: &str, what: String) -> TestCaseError {
        TestCaseError::fail(format!(
            "property {property} violated: {what}\n--- the history, as played ---\n{}",
            self.log
        ))
    }

    fn fresh_id(&mut self) -> Uuid {
        self.next_id += 1;
        Uuid::from_u128(self.next_id)
    }

    /// The pick-th run among those `prefer` likes (most of the time), else among all.
    fn pick_run(&self, pick: u8, prefer: impl Fn(Uuid, &Entry) -> bool) -> Option<Uuid> {
        let all: Vec<Uuid> = self.runs.keys().copied().collect();
        if all.is_empty() {
            return None;
        }
        let preferred: Vec<Uuid> = self
            .runs
            .iter()
            .filter(|(id, e)| prefer(**id, e))
            .map(|(id, _)| *id)
            .collect();
        let p = usize::from(pick);
        if p < 224 && !preferred.is_empty() {
            Some(preferred[p % preferred.len()])
        } else {
            Some(all[p % all.len()])
        }
    }

    /// An approver who did not submit `id` and has not approved its pending plan yet.
    fn someone(&self, id: Uuid) -> String {
        let e = &self.runs[&id];
        let done = self.approvals.get(&id).map(|p| p.approvers().to_vec());
        [ALICE, BOB]
            .into_iter()
            .find(|a| {
                !e.submitters.iter().any(|s| s == a)
                    && !done.as_ref().is_some_and(|d| d.iter().any(|x| x == a))
            })
            .unwrap_or(ALICE)
            .to_owned()
    }

    fn awaiting_token(&self, id: Uuid) -> bool {
        self.live
            .get(&id)
            .is_some_and(|l| l.m.stage_name() == "awaiting a token")
    }

    fn act(&mut self, act: &Act) -> Result<(), TestCaseError> {
        match *act {
            Act::Submit {
                id,
                action,
                mode,
                shadow,
                hosts,
                by,
            } => {
                let run = match id {
                    Id::Existing(k) if !self.runs.is_empty() => *self
                        .runs
                        .keys()
                        .nth(usize::from(k) % self.runs.len())
                        .unwrap(),
                    _ => self.fresh_id(),
                };
                let targets: Vec<String> = if hosts & 0x80 != 0 {
                    Vec::new()
                } else {
                    self.hosts
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| hosts & (1 << i) != 0)
                        .map(|(_, h)| h.clone())
                        .collect()
                };
                self.submit(run, action, mode, targets, shadow, by.id())
            }
            Act::FollowEscalation { pick, by } => {
                if self.escalations.is_empty() {
                    say!(self, "  no escalation to follow");
                    return Ok(());
                }
                let (owner, cmd) =
                    self.escalations[usize::from(pick) % self.escalations.len()].clone();
                let parsed = parse_escalation(&cmd);
                ensure!(
                    self,
                    parsed.as_ref().is_some_and(|p| p.2 == owner),
                    "3",
                    "the escalation of {} prints a next command that does not continue it: {cmd}",
                    name(owner)
                );
                let (action, hosts, run, shadow) = parsed.unwrap();
                say!(self, "  follows: {cmd}");
                self.submit(run, action, Mode::Full, hosts, shadow, by.id())
            }
            Act::Approve {
                pick,
                by,
                wrong_hash,
            } => {
                let Some(id) = self.pick_run(pick, |id, e| {
                    matches!(e.last, Last::Awaiting { .. }) && self.awaiting_token(id)
                }) else {
                    say!(self, "  no run to approve");
                    return Ok(());
                };
                let approver = match by {
                    By::Requester => self.runs[&id].record.requestor.clone(),
                    By::Alice => ALICE.to_owned(),
                    By::Bob => BOB.to_owned(),
                    By::Someone => self.someone(id),
                };
                self.approve(id, &approver, wrong_hash)
            }
            Act::Execute { pick, token } => self.execute_with(pick, token),
            Act::Cancel { pick } => {
                let Some(id) = self.pick_run(pick, |id, _| self.live.contains_key(&id)) else {
                    say!(self, "  no run to cancel");
                    return Ok(());
                };
                if self.live.contains_key(&id) {
                    say!(self, "  cancel {}", name(id));
                    self.cov.cancels += 1;
                    self.feed(
                        id,
                        Input::Cancel {
                            reason: "cancelled by an operator".into(),
                        },
                    )
                } else {
                    say!(self, "  cancel {}: refused, not running", name(id));
                    Ok(())
                }
            }
            Act::Answer { pick, how } => self.answer(pick, how),
            Act::Clock { secs } => {
                self.now += u64::from(secs) * 1_000;
                self.tick_due()
            }
            Act::Restart { ran, unreachable } => self.restart(ran, unreachable),
        }
    }

    // --- Submit (runtime::coordinator, `Handler<Submit>`) -------------------------------------

    fn submit(
        &mut self,
        run: Uuid,
        action: Action,
        mode: Mode,
        targets: Vec<String>,
        shadow: bool,
        requestor: &str,
    ) -> Result<(), TestCaseError> {
        let what = format!(
            "submit {} {action} {mode}{} hosts={} by {}",
            name(run),
            if shadow { " --shadow" } else { "" },
            if targets.is_empty() {
                "(all)".to_owned()
            } else {
                targets.join(",")
            },
            requestor.rsplit('/').next().unwrap_or(requestor)
        );
        let known = self.runs.get(&run).map(|e| Known::Record(e.record.clone()));
        if let Err(why) = ledger::admit(
            known.as_ref(),
            Admission {
                action,
                mode,
                shadow,
            },
        ) {
            say!(self, "  {what}: refused: {why}");
            self.cov.reuse_refused += 1;
            return Ok(());
        }
        let mut settings = self.settings.clone();
        settings.jitter_seed = self.next_incarnation;
        let machine = RunMachine::new(RunSpec {
            intent: Intent {
                run_id: run,
                action,
                requested_mode: mode,
                targets,
                shadow,
            },
            requestor: requestor.to_owned(),
            inventory: self.inventory.clone(),
            operations: self.operations.clone(),
            settings,
        })
        .unwrap();
        let known_stage = match &known {
            Some(Known::Record(r)) => Some(r.stage),
            _ => None,
        };
        let stage = match ledger::transition(known_stage, LedgerEvent::Started, self.now) {
            Ok(s) => s,
            Err(e) => {
                say!(self, "  {what}: refused: {e}");
                return Ok(());
            }
        };
        if let Err(busy) = self
            .leases
            .acquire(run, machine.host_states().keys().map(String::as_str))
        {
            say!(self, "  {what}: refused: {busy}");
            self.cov.host_busy += 1;
            return Ok(());
        }
        self.approvals.remove(&run);
        say!(self, "  {what}: admitted");
        self.cov.admitted += 1;
        match self.runs.get_mut(&run) {
            Some(e) => {
                // A continuation keeps the shape and requester the run was born with.
                self.cov.continued += 1;
                e.record.stage = stage;
                e.submitters.push(requestor.to_owned());
                e.last = Last::None;
            }
            None => {
                self.runs.insert(
                    run,
                    Entry {
                        record: RunRecord {
                            action,
                            shadow,
                            requestor: requestor.to_owned(),
                            stage,
                        },
                        submitters: vec![requestor.to_owned()],
                        last: Last::None,
                        journal: Vec::new(),
                    },
                );
            }
        }
        self.requested_by
            .entry(run)
            .or_default()
            .insert(requestor.to_owned());
        self.next_incarnation += 1;
        self.live.insert(
            run,
            Live {
                m: machine,
                incarnation: self.next_incarnation,
                shadow,
                accepted: None,
                probes: Vec::new(),
                checks: Vec::new(),
                dispatches: Vec::new(),
                queries: Vec::new(),
                wakes: BTreeSet::new(),
            },
        );
        self.feed(run, Input::Start)
    }

    // --- The run actor: feeding the machine and performing its effects ------------------------

    fn feed(&mut self, id: Uuid, input: Input) -> Result<(), TestCaseError> {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let Some(live) = self.live.get_mut(&id) else {
                return Ok(());
            };
            let what = input.name();
            match live.m.step(self.now, input) {
                Ok(effects) => {
                    for effect in effects {
                        self.perform(id, effect, &mut queue)?;
                    }
                }
                // The runtime logs and ignores an input the machine cannot take now.
                Err(e) => say!(self, "  {}: {what} ignored: {e}", name(id)),
            }
        }
        Ok(())
    }

    fn perform(
        &mut self,
        id: Uuid,
        effect: Effect,
        queue: &mut VecDeque<Input>,
    ) -> Result<(), TestCaseError> {
        let now = self.now;
        let n = name(id);
        match effect {
            Effect::Record(ev) => {
                if let Some(e) = self.runs.get_mut(&id) {
                    e.journal.push(ev);
                }
            }
            Effect::Probe {
                purpose, requests, ..
            } => {
                if let Some(l) = self.live.get_mut(&id) {
                    l.probes
                        .extend(requests.into_iter().map(|r| (purpose, r.host)));
                }
            }
            Effect::AwaitConfirmation {
                plan,
                operation_hash,
                approvals_required,
                ..
            } => {
                say!(
                    self,
                    "  {n} awaits approval ({approvals_required} approver(s)) of plan {}..",
                    &operation_hash[..8.min(operation_hash.len())]
                );
                self.cov.awaiting_approval += 1;
                let e = self.runs.get_mut(&id).unwrap();
                e.last = Last::Awaiting {
                    operation_hash,
                    required: approvals_required,
                    self_approval: plan.self_approval,
                };
                let advanced = ledger::transition(
                    Some(e.record.stage),
                    LedgerEvent::ConfirmationRequested,
                    now,
                );
                let stage = e.record.stage;
                ensure!(
                    self,
                    advanced.is_ok(),
                    "ledger",
                    "the ledger refused confirmation_requested for {n} ({}): {:?}",
                    stage.as_str(),
                    advanced
                );
                self.runs.get_mut(&id).unwrap().record.stage = advanced.unwrap();
            }
            Effect::TokenRejected { reason, .. } => {
                say!(self, "  {n} rejected the token: {reason}");
                self.cov.tokens_rejected += 1;
            }
            Effect::ConsumeToken { nonce } => {
                let live = self.live.get(&id).unwrap();
                let incarnation = live.incarnation;
                let issued = self.issued.iter().position(|t| t.nonce == nonce);
                say!(
                    self,
                    "  {n} accepted token {}",
                    issued.map_or("(unknown)".to_owned(), |i| format!("T{}", i + 1))
                );
                ensure!(
                    self,
                    issued
                        .is_some_and(|i| self.issued[i].run == id
                            && self.issued[i].incarnation == incarnation),
                    "2",
                    "{n} accepted a token the approval path did not issue for this run"
                );
                ensure!(
                    self,
                    !self.consumed.contains(&nonce),
                    "2",
                    "{n} accepted a token whose nonce was already consumed"
                );
                // RunNotice::TokenAccepted, then the nonce store.
                let e = self.runs.get_mut(&id).unwrap();
                let advanced =
                    ledger::transition(Some(e.record.stage), LedgerEvent::TokenAccepted, now);
                let stage = e.record.stage;
                ensure!(
                    self,
                    advanced.is_ok(),
                    "ledger",
                    "the ledger refused token_accepted for {n} ({}): {:?}",
                    stage.as_str(),
                    advanced
                );
                self.runs.get_mut(&id).unwrap().record.stage = advanced.unwrap();
                self.consumed.insert(nonce.clone());
                self.live.get_mut(&id).unwrap().accepted = Some(nonce);
                self.cov.tokens_accepted += 1;
            }
            Effect::Check(c) => {
                let live = self.live.get_mut(&id).unwrap();
                if live.shadow {
                    queue.push_back(Input::CheckAnswered {
                        host: c.host,
                        step_id: c.step_id,
                        answer: CheckAnswer::NotInDesiredState,
                    });
                } else {
                    live.checks.push((c.host, c.step_id));
                }
            }
            Effect::Dispatch(d) => {
                let others: Vec<String> = self
                    .worked
                    .get(&d.host)
                    .into_iter()
                    .flatten()
                    .filter(|r| **r != id)
                    .filter(|r| !self.runs[*r].record.stage.is_closed())
                    .map(|r| name(*r))
                    .collect();
                ensure!(
                    self,
                    others.is_empty(),
                    "4",
                    "{n} dispatched {} to {} while open run(s) {} worked it",
                    d.step_id,
                    d.host,
                    others.join(",")
                );
                self.worked.entry(d.host.clone()).or_default().insert(id);
                let live = self.live.get_mut(&id).unwrap();
                if live.shadow {
                    // The runtime answers a shadow run's steps itself: nothing reaches a host.
                    self.cov.shadow_steps_faked += 1;
                    queue.push_back(Input::StepAnswered {
                        host: d.host,
                        step_id: d.step_id,
                        idempotency_key: d.idempotency_key,
                        result: StepResult::Succeeded,
                    });
                } else {
                    let sent = Sent {
                        host: d.host,
                        step: d.step_id,
                        key: d.idempotency_key,
                        destructive: d.destructive,
                    };
                    say!(
                        self,
                        "  {n} sends {}@{} {}{}",
                        sent.step,
                        sent.host,
                        short_key(&sent.key),
                        if sent.destructive {
                            " (destructive)"
                        } else {
                            ""
                        }
                    );
                    ensure!(
                        self,
                        !self.store.contains_key(&sent.key),
                        "1",
                        "{n} sent key {} of {}@{} again after it ran",
                        short_key(&sent.key),
                        sent.step,
                        sent.host
                    );
                    self.live.get_mut(&id).unwrap().dispatches.push(sent);
                }
            }
            Effect::QueryIdempotency {
                host,
                step_id,
                idempotency_key,
            } => {
                if let Some(l) = self.live.get_mut(&id) {
                    l.queries.push((host, step_id, idempotency_key));
                }
            }
            Effect::WakeAt { at_ms } => {
                if let Some(l) = self.live.get_mut(&id) {
                    l.wakes.insert(at_ms);
                }
            }
            Effect::Finish(result) => {
                // RunNotice::Closed.
                let live = self.live.remove(&id).unwrap();
                ensure!(
                    self,
                    live.dispatches.is_empty() && live.checks.is_empty() && live.queries.is_empty(),
                    "4",
                    "{n} finished with work still out on its hosts: {:?} {:?} {:?}",
                    live.dispatches,
                    live.checks,
                    live.queries
                );
                say!(
                    self,
                    "  {n} finished: {:?} ({})",
                    result.outcome,
                    result.rule.unwrap_or("-")
                );
                let outcome = result.outcome.kind();
                if let TypedOutcome::EscalationRequired { next_command, .. } = &result.outcome {
                    self.cov.escalations += 1;
                    self.escalations.push((id, next_command.clone()));
                }
                if outcome == OutcomeKind::Completed
                    && self.ran_by_run.get(&id).copied().unwrap_or(0) > 0
                {
                    self.cov.completed_with_steps += 1;
                }
                let e = self.runs.get_mut(&id).unwrap();
                e.last = Last::Closed(Box::new(result));
                let advanced = ledger::transition(
                    Some(e.record.stage),
                    LedgerEvent::Finished { outcome },
                    now,
                );
                let stage = e.record.stage;
                ensure!(
                    self,
                    advanced.is_ok(),
                    "ledger",
                    "the ledger refused run_finished ({outcome:?}) for {n} ({})",
                    stage.as_str()
                );
                let stage = advanced.unwrap();
                self.runs.get_mut(&id).unwrap().record.stage = stage;
                self.leases.release(id);
                self.approvals.remove(&id);
                if stage.is_closed() {
                    for runs in self.worked.values_mut() {
                        runs.remove(&id);
                    }
                }
            }
        }
        Ok(())
    }

    /// A step runs on its (model) host: the agent store records it under its key.
    fn run_on_host(&mut self, id: Uuid, s: &Sent, result: StepResult) -> Result<(), TestCaseError> {
        let n = name(id);
        let live = self.live.get(&id).unwrap();
        let (shadow, accepted, incarnation) =
            (live.shadow, live.accepted.clone(), live.incarnation);
        say!(
            self,
            "  {}@{} of {n} runs on the host ({result:?})",
            s.step,
            s.host
        );
        ensure!(
            self,
            !shadow,
            "5",
            "shadow run {n} ran {}@{}",
            s.step,
            s.host
        );
        ensure!(
            self,
            self.ran_steps.insert((id, s.host.clone(), s.step.clone())),
            "1",
            "{}@{} of {n} ran a second time (key {})",
            s.step,
            s.host,
            short_key(&s.key)
        );
        ensure!(
            self,
            !self.store.contains_key(&s.key),
            "1",
            "key {} ran twice",
            short_key(&s.key)
        );
        if s.destructive {
            let stage = self.runs[&id].record.stage;
            let token = accepted
                .as_ref()
                .and_then(|nonce| self.issued.iter().find(|t| &t.nonce == nonce));
            ensure!(
                self,
                token.is_some_and(|t| t.run == id && t.incarnation == incarnation),
                "2",
                "destructive {}@{} of {n} ran without a token issued for it and accepted by its machine",
                s.step,
                s.host
            );
            ensure!(
                self,
                stage == Stage::Executing,
                "2",
                "destructive {}@{} of {n} ran while its run is {}",
                s.step,
                s.host,
                stage.as_str()
            );
            self.cov.destructive_ran += 1;
        }
        self.cov.steps_ran += 1;
        *self.ran_by_run.entry(id).or_default() += 1;
        self.store.insert(
            s.key.clone(),
            Ran {
                run: id,
                host: s.host.clone(),
                step: s.step.clone(),
                result,
            },
        );
        Ok(())
    }

    // --- Answering what is out (hosts and the network) ----------------------------------------

    fn pending(&self) -> Vec<(Uuid, Req, usize)> {
        let mut all = Vec::new();
        for (id, l) in &self.live {
            all.extend((0..l.probes.len()).map(|i| (*id, Req::Probe, i)));
            all.extend((0..l.checks.len()).map(|i| (*id, Req::Check, i)));
            all.extend((0..l.dispatches.len()).map(|i| (*id, Req::Dispatch, i)));
            all.extend((0..l.queries.len()).map(|i| (*id, Req::Query, i)));
        }
        all
    }

    fn answer(&mut self, pick: u8, how: How) -> Result<(), TestCaseError> {
        let all = self.pending();
        if all.is_empty() {
            say!(self, "  nothing to answer");
            return Ok(());
        }
        let (id, req, i) = all[usize::from(pick) % all.len()];
        let now = self.now;
        let n = name(id);
        let input = match req {
            Req::Probe => {
                let (purpose, host) = self.live.get_mut(&id).unwrap().probes.remove(i);
                let outcome = if how == How::ProbeFailed {
                    ProbeOutcome::Failed(ProbeFailure::Unreachable)
                } else {
                    ProbeOutcome::Reported(HostFacts {
                        fingerprint: fingerprint(&host),
                        probed_at_ms: now,
                        facts: BTreeMap::new(),
                    })
                };
                say!(
                    self,
                    "  {n} probe of {host} ({purpose:?}): {}",
                    if how == How::ProbeFailed {
                        "unreachable"
                    } else {
                        "ok"
                    }
                );
                match purpose {
                    ProbePurpose::Preflight => Input::Probed { host, outcome },
                    ProbePurpose::Barrier { phase } => Input::Reprobed {
                        phase,
                        host,
                        outcome,
                    },
                }
            }
            Req::Check => {
                let (host, step) = self.live.get_mut(&id).unwrap().checks.remove(i);
                let shadow = self.live[&id].shadow;
                ensure!(
                    self,
                    !shadow,
                    "5",
                    "shadow run {n} ran the check of {step}@{host}"
                );
                self.checks_ran.push(id);
                let answer = match how {
                    How::CheckDone => CheckAnswer::InDesiredState,
                    How::CheckFailed => CheckAnswer::Failed {
                        reason: ReasonCode::TimedOut,
                    },
                    _ => CheckAnswer::NotInDesiredState,
                };
                say!(self, "  {n} check of {step}@{host}: {answer:?}");
                Input::CheckAnswered {
                    host,
                    step_id: step,
                    answer,
                }
            }
            Req::Dispatch => {
                let s = self.live.get_mut(&id).unwrap().dispatches.remove(i);
                let (ran, result) = match how {
                    How::Transient => (
                        None,
                        StepResult::Transient {
                            reason: ReasonCode::Unreachable,
                        },
                    ),
                    How::Permanent => {
                        let r = StepResult::Permanent {
                            reason: ReasonCode::NonZeroExit,
                            exit_code: Some(2),
                        };
                        (Some(r.clone()), r)
                    }
                    How::LostRan => (Some(StepResult::Succeeded), StepResult::OutcomeLost),
                    How::LostNotRun => (None, StepResult::OutcomeLost),
                    _ => (Some(StepResult::Succeeded), StepResult::Succeeded),
                };
                say!(
                    self,
                    "  {n} answer to {}@{} {}: {result:?}{}",
                    s.step,
                    s.host,
                    short_key(&s.key),
                    if ran.is_some() { "" } else { " (did not run)" }
                );
                if let Some(r) = ran {
                    self.run_on_host(id, &s, r)?;
                }
                Input::StepAnswered {
                    host: s.host,
                    step_id: s.step,
                    idempotency_key: s.key,
                    result,
                }
            }
            Req::Query => {
                let (host, step, key) = self.live.get_mut(&id).unwrap().queries.remove(i);
                let answer = if how == How::QueryFailed {
                    IdempotencyAnswer::QueryFailed
                } else {
                    match self.store.get(&key) {
                        Some(r) => IdempotencyAnswer::Finished(r.result.clone()),
                        None => IdempotencyAnswer::NotFound,
                    }
                };
                say!(
                    self,
                    "  {n} query of {step}@{host} {}: {answer:?}",
                    short_key(&key)
                );
                Input::IdempotencyAnswered {
                    host,
                    step_id: step,
                    idempotency_key: key,
                    answer,
                }
            }
        };
        self.feed(id, input)
    }

    fn tick_due(&mut self) -> Result<(), TestCaseError> {
        let now = self.now;
        let due: Vec<Uuid> = self
            .live
            .iter_mut()
            .filter_map(|(id, l)| {
                let due = l.wakes.first().is_some_and(|w| *w <= now);
                l.wakes.retain(|w| *w > now);
                due.then_some(*id)
            })
            .collect();
        for id in due {
            self.feed(id, Input::Tick)?;
        }
        Ok(())
    }

    // --- Approve (runtime::coordinator, `Handler<Approve>`) -----------------------------------

    fn approve(&mut self, id: Uuid, approver: &str, wrong_hash: bool) -> Result<(), TestCaseError> {
        let now = self.now;
        let n = name(id);
        let who = approver.rsplit('/').next().unwrap_or(approver).to_owned();
        let e = &self.runs[&id];
        if let Stage::Approved { token_expires_ms } = e.record.stage
            && now < token_expires_ms
        {
            say!(self, "  approve {n} by {who}: refused, a token is live");
            return Ok(());
        }
        let waiting = matches!(
            e.record.stage,
            Stage::AwaitingApproval | Stage::Approved { .. }
        );
        let (hash, required, self_approval) = match (&e.last, self.live.contains_key(&id)) {
            (
                Last::Awaiting {
                    operation_hash,
                    required,
                    self_approval,
                },
                true,
            ) if waiting => (operation_hash.clone(), *required, *self_approval),
            _ => {
                say!(
                    self,
                    "  approve {n} by {who}: refused, not waiting for approval"
                );
                return Ok(());
            }
        };
        let mut requesters = e.submitters.clone();
        requesters.push(e.record.requestor.clone());
        let pending = self.approvals.remove(&id).unwrap_or_else(|| {
            PendingApproval::new(ApprovalRequest {
                run_id: id,
                operation_hash: hash.clone(),
                required,
                requesters,
                self_approval,
            })
        });
        let named = if wrong_hash { "00".repeat(32) } else { hash };
        let complete = match pending.approve(approver, &named, &self.authz) {
            Err(refused) => {
                say!(self, "  approve {n} by {who}: refused: {}", refused.error);
                if matches!(
                    refused.error,
                    tollgate_core::approval::ApprovalError::SelfApproval(_)
                ) {
                    self.cov.self_approval_refused += 1;
                }
                self.approvals.insert(id, refused.pending);
                return Ok(());
            }
            Ok(ApprovalProgress::Pending { pending, counted }) => {
                say!(
                    self,
                    "  approve {n} by {who}: recorded (counted: {counted}), another approver is needed"
                );
                self.cov.second_approver_needed += 1;
                self.approvals.insert(id, pending);
                return Ok(());
            }
            Ok(ApprovalProgress::Complete(c)) => c,
        };
        let before = self.runs[&id].record.stage;
        self.runs.get_mut(&id).unwrap().record.stage = Stage::Approved {
            token_expires_ms: u64::MAX,
        };
        self.next_nonce += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.next_nonce.to_be_bytes());
        nonce[8] = 0xa5;
        let live = self.live.get(&id).unwrap();
        let incarnation = live.incarnation;
        let Some(claims) = live.m.token_claims(complete.approvers.clone(), now, nonce) else {
            self.runs.get_mut(&id).unwrap().record.stage = before;
            say!(
                self,
                "  approve {n} by {who}: refused, no longer waiting for a token"
            );
            return Ok(());
        };
        let e = self.runs.get_mut(&id).unwrap();
        e.journal.push(token_issued_event(&claims));
        e.record.stage = Stage::Approved {
            token_expires_ms: claims.expires_at_ms,
        };
        let text = self.issuer.issue(&claims).unwrap();
        self.issued.push(Issued {
            run: id,
            incarnation,
            nonce: claims.nonce_hex(),
            text,
        });
        self.cov.tokens_issued += 1;
        say!(
            self,
            "  approve {n} by {who}: token T{} issued to {:?}, expires in {} s",
            self.issued.len(),
            claims
                .approvers
                .iter()
                .map(|a| a.rsplit('/').next().unwrap_or(a))
                .collect::<Vec<_>>(),
            (claims.expires_at_ms - now) / 1_000
        );
        let requesters = self.requested_by.get(&id).cloned().unwrap_or_default();
        let both: Vec<&String> = claims
            .approvers
            .iter()
            .filter(|a| requesters.contains(*a))
            .collect();
        ensure!(
            self,
            claims.run_id == id && both.is_empty(),
            "6",
            "the token for {n} names its requester(s) {both:?} among its approvers"
        );
        Ok(())
    }

    // --- Execute (runtime::coordinator, `Handler<ExecuteRun>`) --------------------------------

    fn execute_with(&mut self, pick: u8, tok: Tok) -> Result<(), TestCaseError> {
        let (run, token, label) = if let Tok::Old(k) = tok {
            if self.issued.is_empty() {
                say!(self, "  no token was ever issued");
                return Ok(());
            }
            let i = usize::from(k) % self.issued.len();
            let t = &self.issued[i];
            (t.run, t.text.clone(), format!("old token T{}", i + 1))
        } else {
            let with_token = |id: Uuid| self.issued.iter().any(|t| t.run == id);
            let any_ready = self
                .runs
                .keys()
                .any(|id| self.awaiting_token(*id) && with_token(*id));
            let Some(run) = self.pick_run(pick, |id, _| {
                self.awaiting_token(id) && (with_token(id) || !any_ready)
            }) else {
                say!(self, "  no run to execute");
                return Ok(());
            };
            let numbered = |pred: &dyn Fn(&Issued) -> bool| -> Vec<usize> {
                (0..self.issued.len())
                    .filter(|i| pred(&self.issued[*i]))
                    .collect()
            };
            let chosen: Option<usize> = match tok {
                Tok::Right => numbered(&|t| t.run == run).last().copied(),
                Tok::OtherRuns => {
                    let v = numbered(&|t| t.run != run);
                    (!v.is_empty()).then(|| v[usize::from(pick) % v.len()])
                }
                Tok::Replayed => {
                    let v = numbered(&|t| self.consumed.contains(&t.nonce));
                    let own: Vec<usize> = v
                        .iter()
                        .copied()
                        .filter(|i| self.issued[*i].run == run)
                        .collect();
                    let v = if own.is_empty() { v } else { own };
                    (!v.is_empty()).then(|| v[usize::from(pick) % v.len()])
                }
                Tok::Garbage | Tok::Old(_) => None,
            };
            match chosen {
                Some(i) => (
                    run,
                    self.issued[i].text.clone(),
                    format!("token T{}", i + 1),
                ),
                None => (run, GARBAGE.to_owned(), "garbage".to_owned()),
            }
        };
        let n = name(run);
        if self.live.contains_key(&run) {
            say!(self, "  execute {n} with {label}");
            let consumed = self.consumed.clone();
            return self.feed(
                run,
                Input::TokenPresented {
                    token,
                    consumed_nonces: consumed,
                },
            );
        }
        if self.runs.contains_key(&run) {
            // The run is over: judged, never fed to a machine.
            let (reason, rule, _) = closed::judge(
                &token,
                run,
                self.now,
                &self.public_key,
                &self.consumed,
                &self.authz,
            );
            say!(
                self,
                "  execute {n} with {label}: refused, run not open: {reason} ({rule})"
            );
            self.cov.judged_closed += 1;
        } else {
            say!(self, "  execute {n} with {label}: no such run");
        }
        Ok(())
    }

    // --- Restart (service::recovery) ----------------------------------------------------------

    fn restart(&mut self, ran: u8, unreachable: u8) -> Result<(), TestCaseError> {
        say!(self, "  RESTART");
        // Each step in flight ran on its host before the crash, or did not.
        let in_flight: Vec<(Uuid, Sent)> = self
            .live
            .iter()
            .flat_map(|(id, l)| l.dispatches.iter().map(|s| (*id, s.clone())))
            .collect();
        for (bit, (id, s)) in in_flight.into_iter().enumerate() {
            if ran & (1 << (bit % 8)) != 0 {
                self.run_on_host(id, &s, StepResult::Succeeded)?;
            }
        }
        if !self.live.is_empty() {
            self.cov.restarts_closing_open_runs += 1;
        }
        // The process is gone: machines, leases, pending approvals.
        self.live.clear();
        self.leases = Leases::new();
        self.approvals.clear();
        // Start-up: every run's record from its journal; every open one is closed.
        let ids: Vec<Uuid> = self.runs.keys().copied().collect();
        let mut query = 0usize;
        for id in ids {
            let n = name(id);
            let e = &self.runs[&id];
            let record = record_of(&e.journal);
            ensure!(
                self,
                record.is_ok(),
                "3",
                "the journal of {n} does not fold into a ledger record: {:?}",
                record
            );
            let record = record.unwrap();
            ensure!(
                self,
                record == e.record,
                "ledger",
                "{n}: the live ledger had {:?}, its journal folds to {:?}",
                e.record,
                record
            );
            if on_restart(record.stage) == OnRestart::Keep {
                self.runs.get_mut(&id).unwrap().submitters.clear();
                continue;
            }
            let open = open_run(id, &record, &e.journal, &self.hosts);
            let mut answers = BTreeMap::new();
            for f in &open.in_flight {
                if unreachable & (1 << (query % 8)) == 0 {
                    let answer = match self.store.get(&f.key) {
                        Some(r) => IdempotencyAnswer::Finished(r.result.clone()),
                        None => IdempotencyAnswer::NotFound,
                    };
                    answers.insert(f.key.clone(), answer);
                }
                query += 1;
            }
            if !open.in_flight.is_empty() {
                self.cov.restarts_settling_in_flight += 1;
            }
            let (events, result) = close_after_restart(self.now, &open, &answers);
            say!(
                self,
                "  recovery closes {n} ({}, {} in flight): {:?}",
                record.stage.as_str(),
                open.in_flight.len(),
                result.outcome
            );
            let e = self.runs.get_mut(&id).unwrap();
            e.journal.extend(events);
            e.record = RunRecord {
                stage: Stage::Closed,
                ..record
            };
            e.last = Last::Closed(Box::new(result));
            e.submitters.clear();
            let folded = record_of(&e.journal).map(|r| r.stage);
            ensure!(
                self,
                folded == Ok(Stage::Closed),
                "3",
                "{n} was closed after the restart but its journal folds to {folded:?}"
            );
        }
        self.worked.clear();
        // Every token issued so far belongs to a closed run now: no machine is left to take it.
        for (i, t) in self.issued.iter().enumerate() {
            ensure!(
                self,
                self.runs[&t.run].record.stage.is_closed(),
                "2",
                "token T{} belongs to {}, still open after the restart",
                i + 1,
                name(t.run)
            );
        }
        Ok(())
    }

    // --- After the script ---------------------------------------------------------------------

    fn drain_and_close(&mut self) -> Result<(), TestCaseError> {
        say!(self, "DRAIN");
        let mut budget = 5_000;
        let mut tried = BTreeSet::new();
        loop {
            budget -= 1;
            ensure!(self, budget > 0, "3", "the histories' runs do not settle");
            if !self.pending().is_empty() {
                self.answer(0, How::Ok)?;
                continue;
            }
            let next_wake = self.live.values().filter_map(|l| l.wakes.first()).min();
            if let Some(w) = next_wake.copied() {
                self.now = self.now.max(w);
                self.tick_due()?;
                continue;
            }
            // A run waiting for a token: approved by others and executed, if that can be done.
            let waiting = self
                .live
                .keys()
                .copied()
                .find(|id| self.awaiting_token(*id) && !tried.contains(id));
            if let Some(id) = waiting {
                tried.insert(id);
                for _ in 0..2 {
                    let who = self.someone(id);
                    self.approve(id, &who, false)?;
                }
                if let Some(t) = self.issued.iter().rev().find(|t| t.run == id) {
                    let token = t.text.clone();
                    say!(self, "  execute {} with its last token", name(id));
                    let consumed = self.consumed.clone();
                    self.feed(
                        id,
                        Input::TokenPresented {
                            token,
                            consumed_nonces: consumed,
                        },
                    )?;
                }
                continue;
            }
            break;
        }
        for (id, l) in &self.live {
            ensure!(
                self,
                l.m.stage_name() == "awaiting a token",
                "3",
                "{} is stuck {} with nothing left to answer",
                name(*id),
                l.m.stage_name()
            );
        }
        self.restart(0, 0)?;
        for (id, e) in &self.runs {
            let n = name(*id);
            ensure!(
                self,
                e.record.stage == Stage::Closed,
                "3",
                "{n} is {} after the final restart",
                e.record.stage.as_str()
            );
            let typed = match &e.last {
                Last::Closed(r) => {
                    r.run_id == *id
                        && r.rule.is_some()
                        && !matches!(r.outcome, TypedOutcome::EscalationRequired { .. })
                }
                _ => false,
            };
            ensure!(
                self,
                typed,
                "3",
                "{n} has no typed final outcome: {:?}",
                e.last
            );
            let last = e.journal.last();
            ensure!(
                self,
                last.is_some_and(|ev| ev.kind == EventKind::RunFinished
                    && ev.verdict.is_some()
                    && ev.rule.is_some()),
                "3",
                "{n}'s journal does not end with a decided run_finished: {last:?}"
            );
        }
        for r in self.store.values() {
            ensure!(
                self,
                !self.runs[&r.run].record.shadow,
                "5",
                "shadow run {} ran {}@{}",
                name(r.run),
                r.step,
                r.host
            );
        }
        for id in &self.checks_ran {
            ensure!(
                self,
                !self.runs[id].record.shadow,
                "5",
                "shadow run {} ran a check",
                name(*id)
            );
        }
        Ok(())
    }
}

fn play(issuer: &TokenIssuer, fleet: &Fleet, acts: &[Act]) -> Result<Cov, TestCaseError> {
    let mut m = Model::new(issuer, fleet);
    for (i, act) in acts.iter().enumerate() {
        say!(m, "#{i} {act:?}");
        m.act(act)?;
    }
    m.drain_and_close()?;
    Ok(m.cov)
}

#[test]
fn whole_histories_keep_the_safety_properties() {
    let issuer = TokenIssuer::from_seed(&[21; 32]).unwrap();
    let config = ProptestConfig {
        cases: 10_000,
        max_shrink_iters: 4_096,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let cov = RefCell::new(Cov::default());
    let strategy = (fleet(), proptest::collection::vec(act(), 1..80));
    let result = TestRunner::new(config).run(&strategy, |(fleet, acts)| {
        let c = play(&issuer, &fleet, &acts)?;
        cov.borrow_mut().add(&c);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let cov = cov.into_inner();
    for (what, n) in cov.fields() {
        assert!(
            n >= 100,
            "only {n} times in 10000 histories: {what} ({cov:?})"
        );
    }
}
