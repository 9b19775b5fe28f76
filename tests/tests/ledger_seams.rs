//! The run ledger's seams, end to end with real processes: a run id's whole life across a
//! coordinator SIGKILL (closed at restart, never reused, its token dead), shadow fixed at birth,
//! host leases (HostBusy, cancel), separation of duties (SelfApproval, AlreadyApproved, two
//! distinct non-requester approvers for protected hosts), and an unreadable journal's id never
//! reused. Steps append to marker files, so "ran at most once" is read from the hosts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use tollgate_tests::lab::{CliOut, DEFAULT_HOSTS, Lab};
use tollgate_tests::seeds::{self, Rng};

/// Bound for anything the test waits on (never a synchronisation sleep).
const WAIT: Duration = Duration::from_secs(60);

/// Repetitions of the SIGKILL story.
const REPETITIONS: usize = 24;

/// Run stages the ledger lists for an open run, and the outcomes that leave a run waiting.
const OPEN_STATES: &[&str] = &[
    "created",
    "escalated",
    "continued",
    "awaiting-approval",
    "approved",
    "executing",
    "EscalationRequired",
    "ConfirmationRequired",
];

/// Outcome kinds a closed run is listed with.
const CLOSED_STATES: &[&str] = &[
    "Completed",
    "PartialSuccess",
    "PolicyBlocked",
    "PreflightFailed",
    "TransportUnreachable",
    "CapabilityMismatch",
    "ExecutionFailed",
];

/// The seed: `TOLLGATE_FAULT_SEED` if set (as the fault suites do), else fresh; printed with
/// the command that replays it.
fn seed(test: &str) -> u64 {
    seeds::seed_for("--test ledger_seams", test)
}

/// `who` approves `run`'s plan `hash`.
async fn approve(lab: &Lab, run: &str, hash: &str, who: &str) -> CliOut {
    lab.cli(who, &["approve", run, "--operation-hash", hash])
        .await
        .unwrap()
}

/// The `{code, message}` error code of a refused request.
fn error_code(out: &CliOut) -> String {
    out.json()["code"].as_str().unwrap_or_default().to_string()
}

fn error_message(out: &CliOut) -> String {
    out.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The printed next command of an `EscalationRequired` answer.
fn next_command(out: &CliOut) -> String {
    out.json()["outcome"]["EscalationRequired"]["next_command"]
        .as_str()
        .unwrap_or_else(|| panic!("no next_command: {out:?}"))
        .to_string()
}

/// The run id a printed command names (the word after `--run`).
fn run_of(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "--run")
        .unwrap_or_else(|| panic!("no --run in {command:?}"));
    words[i + 1].to_string()
}

/// A printed command as CLI arguments: split on whitespace, without the leading `tollgate`.
fn args_of(command: &str) -> Vec<&str> {
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some("tollgate"), "{command}");
    words.collect()
}

fn operation_hash(out: &CliOut) -> String {
    out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no operation hash: {out:?}"))
        .to_string()
}

fn token_of(out: &CliOut) -> Option<String> {
    out.json()["token"].as_str().map(str::to_string)
}

/// `(host, step) -> finished count` for every host and the teardown steps ([`Lab::markers`]).
fn markers(lab: &Lab) -> BTreeMap<(String, String), usize> {
    lab.markers()
        .0
        .into_iter()
        .filter(|((_, step), _)| ["drain", "remove"].contains(&step.as_str()))
        .map(|(host_step, (_, finished))| (host_step, finished))
        .collect()
}

/// The key of [`markers`] for `host` and `step`.
fn key(host: &str, step: &str) -> (String, String) {
    (host.to_string(), step.to_string())
}

/// Bytes of newline-terminated lines in a run's timeline (0 if it does not exist yet).
fn journal_lines(lab: &Lab, run: &str) -> usize {
    std::fs::read(lab.runs_dir().join(run).join("timeline.jsonl"))
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

/// The kinds of a run's timeline lines, leniently (a torn last line is skipped).
fn journal_kinds(lab: &Lab, run: &str) -> Vec<String> {
    let bytes = std::fs::read(lab.runs_dir().join(run).join("timeline.jsonl")).unwrap_or_default();
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| v["kind"].as_str().map(str::to_string))
        .collect()
}

/// The listed state of `run` (panics if `runs list` does not list it).
async fn listed_state(lab: &Lab, run: &str) -> String {
    let out = lab.cli("alice", &["runs", "list"]).await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    out.json()
        .as_array()
        .unwrap_or_else(|| panic!("runs list: {out:?}"))
        .iter()
        .find(|r| r["run_id"] == run)
        .unwrap_or_else(|| panic!("run {run} not listed: {out:?}"))["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// After the token was issued, before anyone executes it.
    AwaitingToken,
    /// With `execute` under way: once the run's journal has grown by this many lines (0:
    /// at once), or the execute has answered, whichever is first.
    DuringExecute { lines: usize },
}

/// README flow, with the coordinator SIGKILLed at a seeded random point of every repetition:
/// the run is closed after the restart, its id is never reused, its token does nothing, its
/// journal verifies, and no step ran twice on any host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_after_approval_closes_the_run_and_no_step_runs_twice() {
    let seed = seed("sigkill_anywhere_after_approval_closes_the_run_and_no_step_runs_twice");
    let mut rng = Rng::new(seed);
    // A seeded schedule: a quarter of the repetitions kill while the token waits, the rest at
    // a random journal line of the execute (some land after it has finished: that is a point
    // too). 24 lines is a little more than a whole execute of web1,web2 writes.
    let mut schedule: Vec<KillPoint> = (0..REPETITIONS)
        .map(|i| {
            if i % 4 == 0 {
                KillPoint::AwaitingToken
            } else {
                KillPoint::DuringExecute {
                    lines: usize::try_from(rng.below(25)).unwrap(),
                }
            }
        })
        .collect();
    for i in (1..schedule.len()).rev() {
        let j = usize::try_from(rng.below(i as u64 + 1)).unwrap();
        schedule.swap(i, j);
    }

    let mut lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    let log = lab.config.with_extension("log");
    let out = lab.cli("alice", &["deploy"]).await.unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
    let first = markers(&lab);
    let mut tally: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut pending = Vec::new();

    for (rep, point) in schedule.iter().copied().enumerate() {
        let ctx = format!("seed {seed}, repetition {rep}, kill {point:?}, serve log {log:?}");
        let before = markers(&lab);

        // Quick: nothing runs, the next command is printed.
        let quick = lab
            .cli("erin", &["teardown", "--hosts", "web1,web2"])
            .await
            .unwrap();
        assert_eq!(
            (quick.code, quick.outcome().as_str()),
            (10, "EscalationRequired"),
            "{ctx}: {quick:?}"
        );
        let next = next_command(&quick);
        assert!(
            next.starts_with("tollgate teardown --mode full --hosts web1,web2 --run "),
            "{ctx}: {next}"
        );
        let run = run_of(&next);
        assert_eq!(quick.json()["run_id"], run.as_str(), "{ctx}: {quick:?}");

        // The printed command, literally: a plan to approve.
        let full = lab.cli("erin", &args_of(&next)).await.unwrap();
        assert_eq!(
            (full.code, full.outcome().as_str()),
            (11, "ConfirmationRequired"),
            "{ctx}: {full:?}"
        );
        let hash = operation_hash(&full);
        let approval = lab
            .cli("alice", &["approve", &run, "--operation-hash", &hash])
            .await
            .unwrap();
        assert_eq!(approval.code, 0, "{ctx}: {approval:?}");
        let token = token_of(&approval).unwrap_or_else(|| panic!("{ctx}: {approval:?}"));
        assert_eq!(markers(&lab), before, "{ctx}: nothing ran before execute");

        // SIGKILL at the scheduled point.
        let exec = match point {
            KillPoint::AwaitingToken => {
                lab.serve.as_mut().unwrap().kill().await.unwrap();
                None
            }
            KillPoint::DuringExecute { lines } => {
                let base = journal_lines(&lab, &run);
                let exec = lab.spawn_cli("alice", &["execute", &run, "--token", &token]);
                let deadline = tokio::time::Instant::now() + WAIT;
                // Polls the journal (an event the OS offers no notification for here); the
                // interval only sets the kill's resolution.
                while journal_lines(&lab, &run) < base + lines && !exec.is_finished() {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{ctx}: the journal never grew by {lines} lines"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let answered = exec.is_finished();
                lab.serve.as_mut().unwrap().kill().await.unwrap();
                Some((lines, answered, exec))
            }
        };
        // Serve is dead: the journal is exactly what the killed process left.
        let kinds = journal_kinds(&lab, &run);
        let finished_before_kill = kinds.iter().filter(|k| *k == "run_finished").count() >= 2;
        // An execute CLI still connected to the killed coordinator notices only at its QUIC
        // idle timeout (15 s): its answer is collected at the end, not waited for here.
        let answered_before_kill = exec.as_ref().is_some_and(|(_, answered, _)| *answered);
        if let Some((lines, _, handle)) = exec {
            pending.push((ctx.clone(), lines, finished_before_kill, handle));
        }
        lab.start_serve().await.unwrap();
        let after_restart = markers(&lab);

        // The run is closed: not escalated, not awaiting anything.
        let state = listed_state(&lab, &run).await;
        assert!(
            CLOSED_STATES.contains(&state.as_str()) && !OPEN_STATES.contains(&state.as_str()),
            "{ctx}: run {run} is listed {state:?} after the restart"
        );
        if !finished_before_kill {
            let show = lab.cli("alice", &["runs", "show", &run]).await.unwrap();
            let summary: serde_json::Value = serde_json::from_str(&show.stdout)
                .unwrap_or_else(|e| panic!("{ctx}: runs show: {e}: {show:?}"));
            assert_eq!(
                summary["outcome"]["rule"], "E013-closed-after-restart",
                "{ctx}: an open run is closed by the restart: {summary}"
            );
        } else {
            assert_eq!(state, "Completed", "{ctx}: finished before the kill");
        }

        // The same printed command again: the id is never reused.
        let again = lab.cli("erin", &args_of(&next)).await.unwrap();
        assert_eq!(
            (again.code, error_code(&again).as_str()),
            (4, "RunNotReusable"),
            "{ctx}: {again:?}"
        );
        assert!(error_message(&again).contains(&run), "{ctx}: {again:?}");

        // The old token does nothing at all.
        let replay = lab
            .cli("alice", &["execute", &run, "--token", &token])
            .await
            .unwrap();
        assert_eq!(
            (replay.code, replay.outcome().as_str()),
            (20, "PolicyBlocked"),
            "{ctx}: {replay:?}"
        );
        assert_eq!(
            markers(&lab),
            after_restart,
            "{ctx}: neither the re-submission nor the old token ran anything"
        );

        let v = lab.cli("carol", &["runs", "verify", &run]).await.unwrap();
        assert_eq!(
            (v.code, v.json()["ok"].as_bool()),
            (0, Some(true)),
            "{ctx}: {v:?}"
        );

        // Hosts get the app back for the next repetition.
        let deploy = lab.cli("alice", &["deploy"]).await.unwrap();
        assert_eq!(
            (deploy.code, deploy.outcome().as_str()),
            (0, "Completed"),
            "{ctx}: {deploy:?}"
        );

        // Counted after the redeploy, so a step the kill left running on an agent has landed.
        let after = markers(&lab);
        let delta = |h: &str, s: &str| after[&key(h, s)] - before[&key(h, s)];
        for h in ["web1", "web2"] {
            for s in ["drain", "remove"] {
                assert!(
                    delta(h, s) <= 1,
                    "{ctx}: {s} ran {} times on {h} in one story",
                    delta(h, s)
                );
            }
        }
        assert_eq!(
            (delta("db1", "drain"), delta("db1", "remove")),
            (0, 0),
            "{ctx}: db1 was never a target"
        );
        let removed = delta("web1", "remove") + delta("web2", "remove");
        if removed > 0 {
            assert_eq!(
                (delta("web1", "drain"), delta("web2", "drain")),
                (1, 1),
                "{ctx}: remove ran only past the barrier, after both drains"
            );
        }
        let what = match point {
            KillPoint::AwaitingToken => "killed awaiting the token",
            _ if answered_before_kill => "answered before the kill",
            _ if finished_before_kill => "finished (journaled) before the kill",
            _ if removed > 0 => "killed during execute, after remove started",
            _ if delta("web1", "drain") + delta("web2", "drain") > 0 => {
                "killed during execute, after drain"
            }
            _ => "killed during execute, before any step ran",
        };
        *tally.entry(what).or_default() += 1;
        eprintln!(
            "repetition {rep}: {point:?}: {what}; listed {state}; drain +{}/+{}, remove +{}/+{}",
            delta("web1", "drain"),
            delta("web2", "drain"),
            delta("web1", "remove"),
            delta("web2", "remove"),
        );
    }

    let last = markers(&lab);
    let removes: Vec<usize> = ["web1", "web2"]
        .iter()
        .map(|h| last[&key(h, "remove")] - first[&key(h, "remove")])
        .collect();
    eprintln!("seed {seed}: {tally:?}; remove ran {removes:?} times on web1, web2");

    // Every execute CLI ended: with the killed coordinator gone (3), or with the run's answer
    // if it had one before the kill (then that answer was journaled first). One whose process
    // started late may have read the restarted coordinator's client file: the old token then
    // does nothing there (PolicyBlocked; the marker counts above cover what it ran).
    for (ctx, lines, finished_before_kill, handle) in pending {
        let out = tokio::time::timeout(WAIT, handle)
            .await
            .unwrap_or_else(|_| panic!("{ctx}: the execute CLI hung after the kill"))
            .unwrap()
            .unwrap();
        let ok = match out.code {
            3 => true,
            0 => out.outcome() == "Completed" && finished_before_kill,
            20 => out.outcome() == "PolicyBlocked",
            _ => false,
        };
        assert!(
            ok,
            "{ctx}: the execute CLI (kill after {lines} journal lines) saw its coordinator die \
             (3), or completed with a journaled answer (run_finished before the kill: \
             {finished_before_kill}), or was refused: {out:?}"
        );
    }
    assert_eq!(
        markers(&lab),
        last,
        "seed {seed}: nothing ran after the last story, whatever the execute CLIs reached"
    );
}

/// A run born shadow stays shadow: its continuation without `--shadow` is refused, the
/// printed command (which keeps `--shadow`) is admitted, and its execute runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_escalation_continues_only_as_shadow_and_runs_nothing() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);

    let quick = lab
        .cli("erin", &["teardown", "--hosts", "web1", "--shadow"])
        .await
        .unwrap();
    assert_eq!(
        (quick.code, quick.outcome().as_str()),
        (10, "EscalationRequired"),
        "{quick:?}"
    );
    let next = next_command(&quick);
    assert!(
        next.starts_with("tollgate teardown --mode full --hosts web1 --run ")
            && next.split_whitespace().any(|w| w == "--shadow"),
        "the printed command keeps --shadow: {next}"
    );
    let run = run_of(&next);
    let literal = args_of(&next);

    // Without --shadow: refused, naming the flag.
    let live: Vec<&str> = literal
        .iter()
        .copied()
        .filter(|w| *w != "--shadow")
        .collect();
    assert_eq!(live.len() + 1, literal.len(), "{next}");
    let out = lab.cli("erin", &live).await.unwrap();
    assert_eq!(
        (out.code, error_code(&out).as_str()),
        (4, "RunNotReusable"),
        "a shadow run cannot continue live: {out:?}"
    );
    assert!(error_message(&out).contains("--shadow"), "{out:?}");
    // Nor in quick mode, shadow or not.
    let mut quick_again = literal.clone();
    let m = quick_again.iter().position(|w| *w == "full").unwrap();
    quick_again[m] = "quick";
    let out = lab.cli("erin", &quick_again).await.unwrap();
    assert_eq!(
        (out.code, error_code(&out).as_str()),
        (4, "RunNotReusable"),
        "an escalation continues only in full mode: {out:?}"
    );

    // The refusals left the escalation intact: the literal command continues it.
    let full = lab.cli("erin", &literal).await.unwrap();
    assert_eq!(
        (full.code, full.outcome().as_str()),
        (11, "ConfirmationRequired"),
        "{full:?}"
    );
    let hash = operation_hash(&full);
    let approval = lab
        .cli("alice", &["approve", &run, "--operation-hash", &hash])
        .await
        .unwrap();
    let token = token_of(&approval).unwrap_or_else(|| panic!("{approval:?}"));
    let done = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(
        (done.code, done.outcome().as_str()),
        (0, "Completed"),
        "{done:?}"
    );
    assert_eq!(
        (lab.ran("web1", "drain"), lab.ran("web1", "remove")),
        (0, 0),
        "a shadow run executes nothing"
    );
    assert_eq!(lab.ran_anywhere("remove"), 0);
    assert_eq!(listed_state(&lab, &run).await, "Completed (shadow)");
    let show = lab.cli("carol", &["runs", "show", &run]).await.unwrap();
    let summary: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(summary["shadow"], true, "{summary}");
}

/// A host belongs to one open run: another intent naming it is refused HostBusy (naming the
/// holder), all or none; other hosts stay free; a cancel gives the hosts back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_run_holds_its_hosts_until_it_is_cancelled() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);
    let prepared = |h: &str| lab.ran(h, "prepare");
    assert_eq!(
        (prepared("web1"), prepared("web2"), prepared("db1")),
        (1, 1, 1)
    );

    let holder = uuid::Uuid::new_v4().to_string();
    let open = lab
        .cli(
            "erin",
            &[
                "teardown",
                "--mode",
                "full",
                "--hosts",
                "web1,web2",
                "--run",
                &holder,
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        (open.code, open.outcome().as_str()),
        (11, "ConfirmationRequired"),
        "{open:?}"
    );

    let busy: [(&str, &[&str], &str); 4] = [
        ("deploy web2", &["deploy", "--hosts", "web2"], "web2"),
        (
            "full teardown web2",
            &["teardown", "--mode", "full", "--hosts", "web2"],
            "web2",
        ),
        // db1 is free but web1 is not: all or none.
        (
            "quick teardown db1,web1",
            &["teardown", "--hosts", "db1,web1"],
            "web1",
        ),
        ("deploy everything", &["deploy"], "web1"),
    ];
    for (what, args, host) in busy {
        let out = lab.cli("alice", args).await.unwrap();
        assert_eq!(
            (out.code, error_code(&out).as_str()),
            (4, "HostBusy"),
            "{what}: {out:?}"
        );
        let message = error_message(&out);
        assert!(
            message.contains(&holder) && message.contains(&format!("host {host} ")),
            "{what}: the refusal names {host} and the holding run {holder}: {out:?}"
        );
    }
    assert_eq!(
        (prepared("web1"), prepared("web2"), prepared("db1")),
        (1, 1, 1),
        "a refused intent runs nothing"
    );

    // db1 alone is free (the refused db1,web1 intent took no lease on it).
    let db1 = lab
        .cli("alice", &["deploy", "--hosts", "db1"])
        .await
        .unwrap();
    assert_eq!(
        (db1.code, db1.outcome().as_str()),
        (0, "Completed"),
        "{db1:?}"
    );
    assert_eq!(prepared("db1"), 2);

    let cancelled = lab.cli("erin", &["cancel", &holder]).await.unwrap();
    assert_eq!(
        (
            cancelled.code,
            cancelled.outcome().as_str(),
            cancelled.reason().as_str()
        ),
        (20, "PolicyBlocked", "Cancelled"),
        "{cancelled:?}"
    );
    assert_eq!(listed_state(&lab, &holder).await, "PolicyBlocked");
    let again = lab.cli("erin", &["cancel", &holder]).await.unwrap();
    assert_eq!(
        again.code, 4,
        "a closed run has nothing to cancel: {again:?}"
    );

    let web2 = lab
        .cli("alice", &["deploy", "--hosts", "web2"])
        .await
        .unwrap();
    assert_eq!(
        (web2.code, web2.outcome().as_str()),
        (0, "Completed"),
        "web2 is free once its run is cancelled: {web2:?}"
    );
    assert_eq!(prepared("web2"), 2);
    let web1 = lab
        .cli("alice", &["teardown", "--mode", "full", "--hosts", "web1"])
        .await
        .unwrap();
    assert_eq!(web1.outcome(), "ConfirmationRequired", "{web1:?}");
    assert_eq!(lab.ran_anywhere("drain") + lab.ran_anywhere("remove"), 0);
}

/// The requester never approves her own run; one live token per plan; a protected host needs
/// two distinct approvers, neither of them the requester.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_never_approves_and_a_plan_gets_one_token() {
    let lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    assert_eq!(lab.cli("alice", &["deploy"]).await.unwrap().code, 0);

    // A standard host, requested by alice.
    let run = uuid::Uuid::new_v4().to_string();
    let plan = lab
        .cli(
            "alice",
            &[
                "teardown", "--mode", "full", "--hosts", "web1", "--run", &run,
            ],
        )
        .await
        .unwrap();
    assert_eq!(plan.outcome(), "ConfirmationRequired", "{plan:?}");
    let hash = operation_hash(&plan);
    let own = approve(&lab, &run, &hash, "alice").await;
    assert_eq!(
        (own.code, error_code(&own).as_str(), token_of(&own)),
        (4, "SelfApproval", None),
        "{own:?}"
    );
    let bobs = approve(&lab, &run, &hash, "bob").await;
    assert_eq!(bobs.code, 0, "{bobs:?}");
    let token = token_of(&bobs).unwrap_or_else(|| panic!("{bobs:?}"));
    for who in ["bob", "alice"] {
        let second = approve(&lab, &run, &hash, who).await;
        assert_eq!(second.code, 4, "{who}: {second:?}");
        assert_eq!(
            token_of(&second),
            None,
            "{who}: no second token: {second:?}"
        );
        if who == "bob" {
            assert_eq!(error_code(&second), "AlreadyApproved", "{second:?}");
        } else {
            assert!(
                ["AlreadyApproved", "SelfApproval"].contains(&error_code(&second).as_str()),
                "{second:?}"
            );
        }
    }
    // Bob's token is the plan's one real token.
    let done = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await
        .unwrap();
    assert_eq!(
        (done.code, done.outcome().as_str()),
        (0, "Completed"),
        "{done:?}"
    );
    assert_eq!(
        (lab.ran("web1", "remove"), lab.ran("web2", "remove")),
        (1, 0)
    );

    // A protected host, requested by alice: bob is the only other approver, so no token ever.
    let run = uuid::Uuid::new_v4().to_string();
    let plan = lab
        .cli(
            "alice",
            &[
                "teardown", "--mode", "full", "--hosts", "db1", "--run", &run,
            ],
        )
        .await
        .unwrap();
    assert_eq!(plan.outcome(), "ConfirmationRequired", "{plan:?}");
    assert_eq!(
        plan.json()["outcome"]["ConfirmationRequired"]["plan"]["approvals_required"],
        2,
        "{plan:?}"
    );
    let hash = operation_hash(&plan);
    let own = approve(&lab, &run, &hash, "alice").await;
    assert_eq!(
        (own.code, error_code(&own).as_str(), token_of(&own)),
        (4, "SelfApproval", None),
        "{own:?}"
    );
    let bobs = approve(&lab, &run, &hash, "bob").await;
    assert_eq!((bobs.code, token_of(&bobs)), (12, None), "{bobs:?}");
    assert_eq!(bobs.json()["required"], 2, "{bobs:?}");
    assert_eq!(
        bobs.json()["approvers"].as_array().map(Vec::len),
        Some(1),
        "{bobs:?}"
    );
    for who in ["bob", "alice", "bob"] {
        let more = approve(&lab, &run, &hash, who).await;
        assert_eq!(token_of(&more), None, "{who}: {more:?}");
        assert_ne!(more.code, 0, "{who}: {more:?}");
        if who == "alice" {
            assert_eq!(
                (more.code, error_code(&more).as_str()),
                (4, "SelfApproval"),
                "{more:?}"
            );
        } else {
            assert_eq!(
                more.json()["approvers"].as_array().map(Vec::len),
                Some(1),
                "bob twice is one approver: {more:?}"
            );
        }
    }
    let blocked = lab
        .cli("alice", &["execute", &run, "--token", ""])
        .await
        .unwrap();
    assert_eq!(
        (blocked.code, blocked.reason().as_str()),
        (20, "TokenMissing"),
        "{blocked:?}"
    );
    assert_eq!(
        (lab.ran("db1", "drain"), lab.ran("db1", "remove")),
        (0, 0),
        "nothing ran on db1"
    );
}

/// A run whose timeline is garbage after a restart is never reused (RunUnreadable, exit 5),
/// its token does nothing, `runs verify` reports it, and it holds no host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_timeline_after_restart_is_never_reused() {
    let mut lab = Lab::start(DEFAULT_HOSTS).await.unwrap();
    // A closed run and an open one (awaiting its token).
    let closed = uuid::Uuid::new_v4().to_string();
    let out = lab
        .cli("alice", &["deploy", "--hosts", "web1", "--run", &closed])
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let open = uuid::Uuid::new_v4().to_string();
    let out = lab
        .cli(
            "erin",
            &[
                "teardown", "--mode", "full", "--hosts", "web2", "--run", &open,
            ],
        )
        .await
        .unwrap();
    assert_eq!(out.outcome(), "ConfirmationRequired", "{out:?}");
    let hash = operation_hash(&out);
    let approval = lab
        .cli("alice", &["approve", &open, "--operation-hash", &hash])
        .await
        .unwrap();
    let token = token_of(&approval).unwrap_or_else(|| panic!("{approval:?}"));
    for run in [&closed, &open] {
        let v = lab.cli("carol", &["runs", "verify", run]).await.unwrap();
        assert_eq!(v.code, 0, "verifies before the damage: {v:?}");
    }

    lab.serve.as_mut().unwrap().kill().await.unwrap();
    for run in [&closed, &open] {
        let timeline = lab.runs_dir().join(run).join("timeline.jsonl");
        assert!(timeline.exists(), "{timeline:?}");
        // Whole lines of garbage: not a torn tail a crash could leave.
        std::fs::write(&timeline, b"\x00\xffnot a timeline\x7f\n{\"kind\":\n").unwrap();
    }
    lab.start_serve().await.unwrap();

    let (closed_id, open_id) = (closed.as_str(), open.as_str());
    let reuse: [(&str, &str, Vec<&str>); 3] = [
        (
            "alice",
            "deploy the closed run again",
            vec!["deploy", "--hosts", "web1", "--run", closed_id],
        ),
        (
            "erin",
            "the closed run's id for a teardown",
            vec![
                "teardown", "--mode", "full", "--hosts", "web1", "--run", closed_id,
            ],
        ),
        (
            "erin",
            "re-submit the open run",
            vec![
                "teardown", "--mode", "full", "--hosts", "web2", "--run", open_id,
            ],
        ),
    ];
    for (who, what, args) in reuse {
        let out = lab.cli(who, &args).await.unwrap();
        assert_eq!(
            (out.code, error_code(&out).as_str()),
            (5, "RunUnreadable"),
            "{what}: {out:?}"
        );
    }
    let exec = lab
        .cli("alice", &["execute", &open, "--token", &token])
        .await
        .unwrap();
    assert_eq!(
        (exec.code, error_code(&exec).as_str()),
        (5, "RunUnreadable"),
        "{exec:?}"
    );
    assert_eq!(
        lab.ran_anywhere("drain") + lab.ran_anywhere("remove"),
        0,
        "nothing of the damaged run ran"
    );
    for run in [&closed, &open] {
        let v = lab.cli("carol", &["runs", "verify", run]).await.unwrap();
        assert_eq!(
            (v.code, v.json()["ok"].as_bool()),
            (5, Some(false)),
            "{run}: {v:?}"
        );
    }
    // A damaged run holds nothing: its hosts take a new run.
    let out = lab
        .cli("alice", &["deploy", "--hosts", "web1,web2"])
        .await
        .unwrap();
    assert_eq!(
        (out.code, out.outcome().as_str()),
        (0, "Completed"),
        "{out:?}"
    );
}
