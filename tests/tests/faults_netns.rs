//! Issue 7, part one: the fleet under network faults and crashes. Every agent runs in its own
//! network namespace, `tollgate serve` and the CLI in another (`tollgate_tests::netns`); links are
//! cut, delayed and healed, agents and the coordinator are SIGKILLed and restarted, at times drawn
//! from a printed seed (`TOLLGATE_FAULT_SEED` replays it).
//!
//! Every scenario checks the same invariants (`invariants::check_run`,
//! `invariants::check_settled`): no destructive step began on a host whose fresh re-probe failed
//! or whose token was not valid, and none without a token, a matching barrier re-probe and a
//! barrier allow in its journal; no step began twice in a run; every run ends typed; `runs
//! verify` passes on every run; every summary matches its schema.
//!
//! Needs root (network namespaces). Without it the tests fail, unless `TOLLGATE_SKIP_NETNS=1`.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tollgate_tests::invariants::{self, Tally, check_run, check_settled, is_typed};
use tollgate_tests::lab::CliOut;
use tollgate_tests::netns::{self, NetLab, NetLabOptions, quiesce};
use tollgate_tests::operations;
use tollgate_tests::seeds::{self, Rng};

/// How long a step may take to reach its gate.
const WAIT: Duration = Duration::from_secs(30);
/// Repetitions running at once within one scenario (scenarios also run side by side).
const PARALLEL: usize = 4;

/// Binds a UDP socket inside namespace `ns` (for the delay relay): a short-lived thread enters
/// the namespace; the socket stays there after the thread is gone.
fn udp_in(ns: &str, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            std::net::UdpSocket::bind(addr)
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace binder thread panicked"))?
    })
}

/// False (and a note) when the namespace scenarios are explicitly skipped.
fn enabled(scenario: &str) -> bool {
    if netns::skip_requested() {
        eprintln!("{scenario}: SKIPPED because TOLLGATE_SKIP_NETNS=1 (needs root and iproute2)");
        return false;
    }
    true
}

/// Runs `reps` repetitions, `PARALLEL` at a time, each with its own seed forked from the
/// scenario's; a repetition that errors becomes a problem naming its seed.
async fn repeat<F, Fut>(seed: u64, reps: usize, rep: F) -> Tally
where
    F: Fn(u64, usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Tally>> + Send + 'static,
{
    let mut rng = Rng::new(seed);
    let seeds: Vec<u64> = (0..reps).map(|_| rng.fork()).collect();
    let mut total = Tally::default();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < reps || !set.is_empty() {
        while next < reps && set.len() < PARALLEL {
            let (s, i) = (seeds[next], next);
            let fut = rep(s, i);
            set.spawn(async move { (i, s, fut.await) });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            match joined {
                Ok((_, _, Ok(t))) => total.merge(t),
                Ok((i, s, Err(e))) => {
                    total.repetitions += 1;
                    total
                        .problems
                        .push(format!("repetition {i} (rep seed {s}): {e:#}"));
                }
                Err(e) => total.problems.push(format!("a repetition panicked: {e}")),
            }
        }
    }
    total
}

fn outcome_note(out: &CliOut) -> String {
    match out.reason().as_str() {
        "" => out.outcome(),
        r => format!("{} ({r})", out.outcome()),
    }
}

/// Counts a run's answer: typed (with its documented exit code) or a problem.
fn judge(t: &mut Tally, run: &str, out: &CliOut) {
    t.runs += 1;
    if is_typed(out) {
        t.typed += 1;
        t.note(outcome_note(out));
    } else {
        t.problems
            .push(format!("{run}: the answer is not a typed outcome: {out:?}"));
    }
}

async fn deploy_completed(lab: &NetLab) -> anyhow::Result<()> {
    let out = lab.cli("alice", &["deploy"]).await?;
    anyhow::ensure!(
        out.code == 0 && out.outcome() == "Completed",
        "deploy: {out:?}"
    );
    Ok(())
}

/// After a fault is healed, the fleet works again: a deploy completes (retried while the
/// coordinator's reconnection back-off, at most 5 s, runs out) and a fresh full teardown of every
/// host completes with `remove` beginning exactly once on each.
async fn recovers(lab: &NetLab, t: &mut Tally) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = lab.cli("alice", &["deploy"]).await?;
        if out.code == 0 {
            break;
        }
        anyhow::ensure!(
            is_typed(&out) && Instant::now() < deadline,
            "the fleet did not recover after the fault was healed: {out:?}"
        );
    }
    let all = lab.host_names().join(",");
    let (run, token, _) = lab.approved_teardown(&all).await?;
    let before = lab.markers();
    let out = lab
        .cli("alice", &["execute", &run, "--token", &token])
        .await?;
    anyhow::ensure!(
        out.code == 0,
        "teardown after healing did not complete: {out:?}"
    );
    let began = lab.markers().began_since(&before);
    for h in lab.host_names() {
        let n = began
            .get(&(h.clone(), operations::DESTRUCTIVE.to_string()))
            .copied();
        anyhow::ensure!(
            n == Some(1),
            "after healing, remove began {n:?} times on {h}"
        );
    }
    check_run(t, &lab.runs_dir(), &run, &began, &[]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Partitions
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum CutPoint {
    /// While a non-destructive step of the phase before the barrier runs.
    BeforeBarrier,
    /// While the barrier re-probes the host.
    DuringReprobe,
    /// While the destructive step runs on the host.
    DuringDestructive,
}

async fn partition_rep(seed: u64, point: CutPoint) -> anyhow::Result<Tally> {
    let mut rng = Rng::new(seed);
    let mut t = Tally {
        repetitions: 1,
        ..Tally::default()
    };
    let lab = NetLab::start(NetLabOptions::new()).await?;
    deploy_completed(&lab).await?;
    let hosts = lab.host_names();
    let all = hosts.join(",");
    let (run, token, _) = lab.approved_teardown(&all).await?;
    let held = rng.pick(&hosts).clone();
    let (gate, victim) = match point {
        CutPoint::BeforeBarrier => {
            let mut choices = hosts.clone();
            choices.push("coordinator".into());
            ("drain", rng.pick(&choices).clone())
        }
        CutPoint::DuringReprobe => ("probe", held.clone()),
        CutPoint::DuringDestructive => ("remove", held.clone()),
    };
    lab.arm_gate(&held, gate)?;
    let before = lab.markers();
    let exec = lab.spawn_cli("alice", &["execute", &run, "--token", &token])?;
    lab.wait_started(&held, gate, WAIT).await?;
    // The randomized part of the timing: how long after the step began the link goes.
    tokio::time::sleep(rng.millis(0, 300)).await;
    lab.cut(&victim)?;
    lab.release_gate(&held, gate)?;
    let out = exec.await??;
    judge(&mut t, &run, &out);
    quiesce(&lab, WAIT).await?;
    let began = lab.markers().began_since(&before);
    let refused: Vec<String> = match point {
        // A cut before or during the barrier stops the destructive phase on every host.
        CutPoint::BeforeBarrier | CutPoint::DuringReprobe => hosts.clone(),
        CutPoint::DuringDestructive => Vec::new(),
    };
    check_run(&mut t, &lab.runs_dir(), &run, &began, &refused);
    if let CutPoint::DuringDestructive = point {
        let n = began.get(&(held.clone(), "remove".to_string())).copied();
        if n != Some(1) {
            t.problems.push(format!(
                "{run}: remove began {n:?} times on {held}, cut while it ran (expected once, never re-sent)"
            ));
        }
    }
    if out.code == 0 {
        t.problems.push(format!(
            "{run}: a cut {point:?} on {victim} still completed"
        ));
    }
    lab.heal(&victim)?;
    recovers(&lab, &mut t).await?;
    check_settled(&lab, &mut t).await?;
    Ok(t)
}

async fn partition_scenario(name: &str, point: CutPoint, reps: usize, faults: &str) {
    if !enabled(name) {
        return;
    }
    let seed = seeds::scenario_seed(name);
    let t = repeat(seed, reps, |s, _| partition_rep(s, point)).await;
    t.finish(name, faults, seed).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_before_barrier() {
    partition_scenario(
        "partition_before_barrier",
        CutPoint::BeforeBarrier,
        8,
        "link of a random host (or the coordinator) cut 0-300 ms after `drain` began on a random host; healed after the run answered",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_during_reprobe() {
    partition_scenario(
        "partition_during_reprobe",
        CutPoint::DuringReprobe,
        8,
        "link of a random host cut 0-300 ms into its barrier re-probe; healed after the run answered",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_during_destructive_step() {
    partition_scenario(
        "partition_during_destructive_step",
        CutPoint::DuringDestructive,
        8,
        "link of a random host cut 0-300 ms after `remove` began on it (its answer is lost); healed after the run answered",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// A 5 s delay on one link
// ---------------------------------------------------------------------------------------------

/// Longest any CLI answer may take with one link delayed by 5 s.
const DELAY_BOUND: Duration = Duration::from_secs(60);

async fn delay_rep(seed: u64) -> anyhow::Result<Tally> {
    let mut rng = Rng::new(seed);
    let mut t = Tally {
        repetitions: 1,
        ..Tally::default()
    };
    let hosts: Vec<String> = ["db1", "web1", "web2"].map(String::from).to_vec();
    let victim = rng.pick(&hosts).clone();
    let mut opts = NetLabOptions::new();
    opts.relayed = vec![victim.clone()];
    opts.binder = Some(udp_in);
    let lab = NetLab::start(opts).await?;
    deploy_completed(&lab).await?;
    let all = hosts.join(",");

    // (a) Delayed before a run: its probe cannot answer within the 2 s probe timeout.
    let how = lab.delay(&victim, Duration::from_secs(5))?;
    t.note(format!("delay by {how}"));
    let before = lab.markers();
    let started = Instant::now();
    let out = lab.cli("alice", &["deploy"]).await?;
    let took = started.elapsed();
    let run = out.json()["run_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    judge(&mut t, &run, &out);
    if took > DELAY_BOUND {
        t.problems
            .push(format!("deploy with {victim} delayed took {took:?}"));
    }
    if out.code == 0 {
        t.problems.push(format!(
            "deploy completed although {victim}'s probe cannot answer in time"
        ));
    }
    let began = lab.markers().began_since(&before);
    check_run(&mut t, &lab.runs_dir(), &run, &began, &hosts);
    lab.heal(&victim)?;
    recovers(&lab, &mut t).await?;

    // (b) Delayed while a step runs before the barrier: the barrier's re-probe of the delayed
    // host times out, so the destructive phase runs nowhere.
    let (run, token, _) = lab.approved_teardown(&all).await?;
    lab.arm_gate(&victim, "drain")?;
    let before = lab.markers();
    let started = Instant::now();
    let exec = lab.spawn_cli("alice", &["execute", &run, "--token", &token])?;
    lab.wait_started(&victim, "drain", WAIT).await?;
    tokio::time::sleep(rng.millis(0, 300)).await;
    lab.delay(&victim, Duration::from_secs(5))?;
    lab.release_gate(&victim, "drain")?;
    let out = exec.await??;
    let took = started.elapsed();
    judge(&mut t, &run, &out);
    if took > DELAY_BOUND {
        t.problems.push(format!(
            "execute with {victim} delayed took {took:?} (bound {DELAY_BOUND:?})"
        ));
    }
    quiesce(&lab, WAIT).await?;
    let began = lab.markers().began_since(&before);
    check_run(&mut t, &lab.runs_dir(), &run, &began, &hosts);
    lab.heal(&victim)?;
    recovers(&lab, &mut t).await?;
    check_settled(&lab, &mut t).await?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delay_5s_on_one_link() {
    let name = "delay_5s_on_one_link";
    if !enabled(name) {
        return;
    }
    let seed = seeds::scenario_seed(name);
    let t = repeat(seed, 4, |s, _| delay_rep(s)).await;
    t.finish(
        name,
        "5 s delay towards a random host (tc netem, or a userspace relay where the kernel lacks sch_netem): (a) before a deploy, (b) 0-300 ms after `drain` began on it; each CLI answer bounded by 60 s; healed",
        seed,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// An agent killed and restarted mid-step
// ---------------------------------------------------------------------------------------------

async fn agent_kill_rep(seed: u64) -> anyhow::Result<Tally> {
    let mut rng = Rng::new(seed);
    let mut t = Tally {
        repetitions: 1,
        ..Tally::default()
    };
    let mut lab = NetLab::start(NetLabOptions::new()).await?;
    deploy_completed(&lab).await?;
    let hosts = lab.host_names();
    let (run, token, _) = lab.approved_teardown(&hosts.join(",")).await?;
    let held = rng.pick(&hosts).clone();
    let step = *rng.pick(&["drain", "remove"]);
    let whole_host = rng.below(2) == 0;
    lab.arm_gate(&held, step)?;
    let before = lab.markers();
    let exec = lab.spawn_cli("alice", &["execute", &run, "--token", &token])?;
    lab.wait_started(&held, step, WAIT).await?;
    tokio::time::sleep(rng.millis(0, 300)).await;
    if whole_host {
        lab.crash_host(&held).await?;
        t.note("host crashed (agent and scripts)");
    } else {
        lab.agent_mut(&held)?.kill().await?;
        t.note("agent alone killed");
    }
    tokio::time::sleep(rng.millis(0, 1000)).await;
    lab.agent_mut(&held)?.restart().await?;
    lab.release_gate(&held, step)?;
    let out = exec.await??;
    judge(&mut t, &run, &out);
    quiesce(&lab, WAIT).await?;
    let began = lab.markers().began_since(&before);
    let refused = if step == "drain" {
        hosts.clone()
    } else {
        Vec::new()
    };
    check_run(&mut t, &lab.runs_dir(), &run, &began, &refused);
    let n = began.get(&(held.clone(), step.to_string())).copied();
    if n != Some(1) {
        t.problems.push(format!(
            "{run}: {step} began {n:?} times on {held}, killed while it ran (expected once)"
        ));
    }
    if out.code == 0 {
        t.problems.push(format!(
            "{run}: completed although {held}'s {step} outcome was lost"
        ));
    }
    recovers(&lab, &mut t).await?;
    check_settled(&lab, &mut t).await?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_killed_and_restarted_mid_step() {
    let name = "agent_killed_and_restarted_mid_step";
    if !enabled(name) {
        return;
    }
    let seed = seeds::scenario_seed(name);
    let t = repeat(seed, 10, |s, _| agent_kill_rep(s)).await;
    t.finish(
        name,
        "SIGKILL of a random host's agent (alone, or with its scripts) 0-300 ms into `drain` or `remove`, restarted 0-1000 ms later",
        seed,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// The coordinator SIGKILLed at random points
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillPoint {
    WhileSubmitting,
    AwaitingToken,
    DuringDrain,
    DuringReprobe,
    DuringRemove,
    RandomlyAfterExecute,
    AfterCompletion,
}

const KILL_POINTS: &[KillPoint] = &[
    KillPoint::WhileSubmitting,
    KillPoint::AwaitingToken,
    KillPoint::DuringDrain,
    KillPoint::DuringReprobe,
    KillPoint::DuringRemove,
    KillPoint::RandomlyAfterExecute,
    KillPoint::AfterCompletion,
];

/// One lab, `runs` teardown runs in a row, the coordinator SIGKILLed once in each.
async fn coordinator_kill_lab(seed: u64, runs: usize) -> anyhow::Result<Tally> {
    let mut rng = Rng::new(seed);
    let mut t = Tally::default();
    let mut lab = NetLab::start(NetLabOptions::new()).await?;
    let hosts = lab.host_names();
    let all = hosts.join(",");
    let mut followers = Vec::new();
    for _ in 0..runs {
        t.repetitions += 1;
        deploy_completed(&lab).await?;
        let point = *rng.pick(KILL_POINTS);
        let before = lab.markers();
        let held = rng.pick(&hosts).clone();
        let mut exec = None;
        let run = match point {
            KillPoint::WhileSubmitting => {
                let run = uuid::Uuid::new_v4().to_string();
                let submit = lab.spawn_cli(
                    "alice",
                    &["teardown", "--mode", "full", "--hosts", &all, "--run", &run],
                )?;
                tokio::time::sleep(rng.millis(0, 150)).await;
                exec = Some(submit);
                run
            }
            KillPoint::AwaitingToken => lab.approved_teardown(&all).await?.0,
            KillPoint::AfterCompletion => {
                let (run, token, _) = lab.approved_teardown(&all).await?;
                let out = lab
                    .cli("alice", &["execute", &run, "--token", &token])
                    .await?;
                anyhow::ensure!(out.code == 0, "{out:?}");
                run
            }
            KillPoint::RandomlyAfterExecute => {
                let (run, token, _) = lab.approved_teardown(&all).await?;
                exec = Some(lab.spawn_cli("alice", &["execute", &run, "--token", &token])?);
                tokio::time::sleep(rng.millis(0, 800)).await;
                run
            }
            KillPoint::DuringDrain | KillPoint::DuringReprobe | KillPoint::DuringRemove => {
                let gate = match point {
                    KillPoint::DuringDrain => "drain",
                    KillPoint::DuringReprobe => "probe",
                    _ => "remove",
                };
                let (run, token, _) = lab.approved_teardown(&all).await?;
                lab.arm_gate(&held, gate)?;
                exec = Some(lab.spawn_cli("alice", &["execute", &run, "--token", &token])?);
                lab.wait_started(&held, gate, WAIT).await?;
                tokio::time::sleep(rng.millis(0, 200)).await;
                run
            }
        };
        lab.kill_serve().await?;
        for h in &hosts {
            for g in ["drain", "probe", "remove"] {
                lab.release_gate(h, g)?;
            }
        }
        lab.start_serve().await?;
        if point == KillPoint::WhileSubmitting
            && let Some(e) = exec.take()
        {
            // A submit that reached no coordinator before the kill may reach the restarted
            // one: then it is a new open run holding every host (a host belongs to one open
            // run), so the operator cancels it before the next repetition. If the killed
            // coordinator answered it, the restart has closed it already.
            let out = e.await??;
            if out.outcome() == "ConfirmationRequired" {
                let c = lab.cli("alice", &["cancel", &run]).await?;
                if c.reason() == "Cancelled" {
                    t.note("the submit reached the restarted coordinator; cancelled");
                } else if c.json()["code"] == "InvalidRequest" {
                    t.note("the submit was answered before the kill; the restart closed it");
                } else {
                    t.problems.push(format!("{run}: cancel answered {c:?}"));
                }
            } else if out.code != 3 && !is_typed(&out) {
                t.problems
                    .push(format!("{run} ({point:?}): the submit answered {out:?}"));
            }
        }
        if let Some(e) = exec {
            followers.push((run.clone(), point, e));
        }
        quiesce(&lab, WAIT).await?;
        let began = lab.markers().began_since(&before);
        let list = lab.cli("carol", &["runs", "list"]).await?.json();
        let state = list
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["run_id"] == run.as_str()))
            .map(|r| r["state"].as_str().unwrap_or_default().to_string());
        match state {
            None if point == KillPoint::WhileSubmitting => {
                t.note("killed before the run was recorded");
            }
            None => t
                .problems
                .push(format!("{run} ({point:?}) is missing after the restart")),
            Some(state) => {
                t.runs += 1;
                if invariants::TYPED_OUTCOMES.contains(&state.as_str()) {
                    t.typed += 1;
                    t.note(format!("{point:?} → {state}"));
                } else {
                    t.problems.push(format!(
                        "{run} ({point:?}) is {state:?} after the restart, not a typed outcome"
                    ));
                }
                let refused = match point {
                    KillPoint::WhileSubmitting
                    | KillPoint::AwaitingToken
                    | KillPoint::DuringDrain
                    | KillPoint::DuringReprobe => hosts.clone(),
                    _ => Vec::new(),
                };
                check_run(&mut t, &lab.runs_dir(), &run, &began, &refused);
            }
        }
    }
    // The CLIs that were following a killed coordinator: each ended (exit 3, "went away"), or
    // answered typed if the run ended before the kill. None hangs.
    for (run, point, f) in followers {
        let out = f.await??;
        if out.code != 3 && !is_typed(&out) && out.outcome() != "ConfirmationRequired" {
            t.problems.push(format!(
                "{run} ({point:?}): the CLI following the killed coordinator answered {out:?}"
            ));
        }
    }
    deploy_completed(&lab).await?;
    check_settled(&lab, &mut t).await?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_sigkill_at_random_points() {
    let name = "coordinator_sigkill_at_random_points";
    if !enabled(name) {
        return;
    }
    let seed = seeds::scenario_seed(name);
    // 5 labs x 6 runs = 30 runs, each with one SIGKILL.
    let t = repeat(seed, 5, |s, _| coordinator_kill_lab(s, 6)).await;
    assert!(t.repetitions >= 20, "the issue asks for at least 20 runs");
    t.finish(
        name,
        "SIGKILL of `tollgate serve` at a random point of a full teardown (while submitting, awaiting the token, during drain, re-probe or remove, 0-800 ms after execute, after completion), then restart",
        seed,
    )
    .unwrap();
}
